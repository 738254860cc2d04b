"""scripts/drain-check, the container smoke test's graceful-stop check, run against a real
`python -m server` (no container): a turn sized by the measured rate, /readyz polled from before the
signal until the server stops, so the check does not depend on the machine's speed."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from server import launch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "drain-check"


def run_check(url: str, *command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), url, "tiny-audio", "--", *command],
        env={**os.environ, "PYTHON": sys.executable, "TURN_S": "4", "MAX_SAMPLES": "1200000", **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def server_flags(model_dirs, drain_timeout_s: int) -> list[str]:
    """The tiny audio model with room for a turn that lasts (up to 150 s of audio: 1,200,000 samples at
    8 kHz), so the turn still runs when the signal comes on a loaded machine."""
    return ["--checkpoints", str(model_dirs["audio"]), "--drain-timeout-s", str(drain_timeout_s)] + [
        "--torch-threads",
        "1",
        "--max-audio-s",
        "150",
    ]


def test_drain_check_passes_on_a_graceful_stop_and_the_server_exits_0(model_dirs):
    proc, url = launch.start_server(server_flags(model_dirs, 60), timeout_s=120)
    try:
        r = run_check(url, "kill", "-TERM", str(proc.pid))
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert "drain-check: OK" in out
        assert re.search(r'after the signal: \{"ready":false,"reason":"draining".*\} 503', out), out
        # the turn was sized from the rate (at least the 2,000-sample floor) and ran to its length
        n = int(re.search(r"a turn of (\d+) samples", out).group(1))
        assert 2000 <= n <= 1200000
        assert f'"completion_tokens": {n}' in out and '"finish_reason": "length"' in out
        # and it lasted about TURN_S (4 s): the signal comes as the first /readyz poll answers, so the turn
        # runs on for most of it. Sized from one 2,000-sample request, whose fixed cost (HTTP, the session,
        # the first step) is most of its time with this tiny model, it lasted ~1 s of its "4 s", and on CI
        # a "6 s" turn ended 0.26 s after the signal, before a poll saw the drain. (A third of TURN_S: the
        # rate under load can differ from the one measured, but not threefold within seconds.)
        after = float(re.search(r"finished ([0-9.]+) s after the signal", out).group(1))
        assert after > 4 / 3, out
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_check_fails_when_the_server_never_drains(model_dirs):
    proc, url = launch.start_server(server_flags(model_dirs, 5), timeout_s=120)
    try:
        r = run_check(url, "true", STOP_WAIT_S="1")  # no signal: the turn ends, /readyz stays 200
        assert r.returncode == 1, r.stdout + r.stderr
        assert "/readyz never said 503 draining" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_the_signal_waits_for_the_first_readyz_answer_however_slow(model_dirs, tmp_path):
    """A loaded machine (CI, 2 cores, two test workers) can take longer than any fixed sleep to answer
    the first poll; a signal sent before that answer made the first line "draining" and the check
    failed a graceful stop (CI, 2026-12-06). Here every /readyz poll is held 0.5 s by a curl wrapper, so
    the first answer comes well after the 0.1 s the script used to sleep. The turn is made long enough
    (3 s at the measured rate) to still run when the signal comes, and for polls held 0.5 s to see the
    drain. (On CI, 2026-12-07, a turn meant as 6 s, its rate read from one short request, ended 0.26 s
    after the signal, during a held poll: see the sizing check in the first test.)"""
    real_curl = shutil.which("curl")
    assert real_curl
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "curl").write_text(
        f'#!/usr/bin/env bash\ncase "$*" in *"/readyz"*) sleep 0.5;; esac\nexec {real_curl} "$@"\n'
    )
    (shim / "curl").chmod(0o755)
    proc, url = launch.start_server(server_flags(model_dirs, 60), timeout_s=120)
    try:
        r = run_check(url, "kill", "-TERM", str(proc.pid), PATH=f"{shim}:{os.environ['PATH']}", TURN_S="3")
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert re.search(r'before the signal: \{"ready":true.*\} 200', out), out
        assert re.search(r'after the signal: \{"ready":false,"reason":"draining".*\} 503', out), out
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_turn_is_sized_from_a_warm_request_not_a_slow_first_one(model_dirs, tmp_path):
    """The turn was sized from one 2,000-sample request, a server's first: run cold, or beside start-up's
    work (an audio server's decoder worker imports torch as the model begins to serve), it could take many
    times a warm one, so the turn came out too short and had ended before the signal ("raise TURN_S"). It
    is sized from the fastest of three. Here the first request is held 3 s by a curl wrapper (a first
    request that slow made a 4 s turn of ~2,700 samples, done in milliseconds)."""
    real_curl = shutil.which("curl")
    assert real_curl
    shim, first = tmp_path / "bin", tmp_path / "first-done"
    shim.mkdir()
    (shim / "curl").write_text(
        f'#!/usr/bin/env bash\ncase "$*" in *"/v1/generate"*)'
        f' [ -e {first} ] || {{ touch {first}; sleep 3; }};; esac\nexec {real_curl} "$@"\n'
    )
    (shim / "curl").chmod(0o755)
    proc, url = launch.start_server(server_flags(model_dirs, 60), timeout_s=120)
    try:
        r = run_check(url, "kill", "-TERM", str(proc.pid), PATH=f"{shim}:{os.environ['PATH']}")
        out = r.stdout + r.stderr
        assert first.exists() and r.returncode == 0, out
        times = re.search(r"2000 samples in ([0-9.]+) s, 20000 in ([0-9.]+) s \(the fastest of 3 each\)", out)
        assert float(times.group(1)) < 3 and float(times.group(2)) < 3, out
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


BAD_SETTINGS = [
    ({"STOP_WAIT_S": "2.5"}, "STOP_WAIT_S must be a whole number of seconds, got '2.5'"),
    ({"TURN_S": "five"}, "TURN_S must be a number of seconds > 0, got 'five'"),
    ({"MAX_SAMPLES": "30s"}, "MAX_SAMPLES must be a whole number of samples > 0, got '30s'"),
]


def test_a_setting_that_is_no_number_is_refused_before_anything_is_sent(model_dirs, tmp_path):
    """drain-check read TURN_S, MAX_SAMPLES and STOP_WAIT_S unchecked, each where it was first used: with
    STOP_WAIT_S=2.5 it measured the rate, ran the turn and sent the signal, then printed bash's "syntax
    error: invalid arithmetic operator" and skipped its wait for the server to stop (as if 0); TURN_S=five
    became a 0 s turn (the 2,000-sample floor: "the turn ended before the signal: raise TURN_S"),
    MAX_SAMPLES=30s a turn of 0 samples ("the turn did not start", the server's 422). Each is now refused by
    name before anything is sent (exit 2, as gpu-check refuses its limits); here the 'signal' is a command
    that leaves a mark, against a server that stays up."""
    proc, url = launch.start_server(server_flags(model_dirs, 60), timeout_s=120)
    try:
        for env, said in BAD_SETTINGS:
            mark = tmp_path / "signalled"
            r = run_check(url, "touch", str(mark), **env)
            out = r.stdout + r.stderr
            assert r.returncode == 2 and r.stderr.strip() == f"drain-check: {said}", (env, r.returncode, out)
            assert not mark.exists() and r.stdout == "", (env, out)  # (nothing measured, nothing sent)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
