"""scripts/drain-check, the container smoke test's graceful-stop check, run against a real
`python -m server` (no container): a turn sized by the measured rate, /readyz polled from before the
signal until the server stops, so the check does not depend on the machine's speed."""

from __future__ import annotations

import os
import re
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
        env={**os.environ, "PYTHON": sys.executable, "TURN_S": "2", **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_drain_check_passes_on_a_graceful_stop_and_the_server_exits_0(model_dirs):
    flags = ["--checkpoints", str(model_dirs["audio"]), "--drain-timeout-s", "60", "--torch-threads", "1"]
    proc, url = launch.start_server(flags, timeout_s=120)
    try:
        r = run_check(url, "kill", "-TERM", str(proc.pid))
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert "drain-check: OK" in out
        assert re.search(r'after the signal: \{"ready":false,"reason":"draining".*\} 503', out), out
        # the turn was sized from the rate (at least the 2,000-sample floor) and ran to its length
        n = int(re.search(r"a turn of (\d+) samples", out).group(1))
        assert 2000 <= n <= 240000
        assert f'"completion_tokens": {n}' in out and '"finish_reason": "length"' in out
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drain_check_fails_when_the_server_never_drains(model_dirs):
    flags = ["--checkpoints", str(model_dirs["audio"]), "--drain-timeout-s", "5", "--torch-threads", "1"]
    proc, url = launch.start_server(flags, timeout_s=120)
    try:
        r = run_check(url, "true", STOP_WAIT_S="1")  # no signal: the turn ends, /readyz stays 200
        assert r.returncode == 1, r.stdout + r.stderr
        assert "/readyz never said 503 draining" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
