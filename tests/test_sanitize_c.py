"""scripts/sanitize-c (`make sanitize`): the fused C library's tests under AddressSanitizer and UBSan. It must
catch a real out-of-bounds read in the library (not only run clean), and refuse bad arguments by name.
Needs gcc's libasan and libubsan (Debian's gcc brings them: libgcc-12-dev, as in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sanitize-c"

# A test file for the script: one call of the library as the project makes it, then one that reads a bias
# of 16 floats as 64 (through ctypes, past fused.py's shape check): the second must abort with ASan's report.
PROBE = """
import ctypes
import torch
from model import fused

def _call(bias):
    lib = fused.library()
    x, Wt = torch.randn(3, 32), torch.randn(32, 64)
    packed, out = fused.pack_linear(Wt, lib.linear_panel_width()), torch.empty(3, 64)
    dims = [ctypes.c_long(v) for v in (1, 0, 3, 32, 64)]
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (x, packed, bias, out)]
    lib.linear_rows(*dims, *ptrs)
    return float((out.double() - (x.double() @ Wt.double() + bias[:64].double())).abs().max())

def test_clean():
    assert _call(torch.randn(64)) < 1e-4

def test_overflow():
    _call(torch.randn(16))
"""


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # this Python, and this checkout's model whatever the venv's install points at; not the suite's own
    # S4_CFLAGS (e.g. the other vector width's pass): they are not the subject
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("S4_CFLAGS", None)
    cmd = [str(SCRIPT), *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_sanitize_c_reports_an_out_of_bounds_read_and_passes_a_clean_call(tmp_path):
    probe = tmp_path / "probe_test.py"
    probe.write_text(PROBE)
    clean = _run("--", f"{probe}::test_clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    assert "1 passed" in clean.stdout and "sanitize-c: clean" in clean.stdout
    assert "-fsanitize=address,undefined" in clean.stdout  # the build it ran on
    caught = _run("--", f"{probe}::test_overflow")
    report = caught.stdout + caught.stderr
    assert caught.returncode == 1, report[-3000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-3000:]
    assert "linear_rows" in report  # the report's stack: the library's entry point
    assert "sanitize-c: FAILED" in caught.stdout


def test_sanitize_c_refuses_bad_arguments_by_name():
    """A last `--width` or `--server` without its value was `shift 2` past the arguments, which shifts
    nothing: the loop read the same option forever (a busy loop; the run hit its timeout). An empty value
    (`--width ""`) went as no option at all."""
    refusals = ((["--width", "12"], "--width must be 8 or 16"), (["--server", "x"], "--server needs a port"),
                (["--bogus"], "usage: scripts/sanitize-c"), (["--width"], "--width must be 8 or 16"),
                (["--server"], "--server needs a port"), (["--width", ""], "--width must be 8 or 16"),
                (["--server", ""], "--server needs a port"),
                (["--width", "8", "--server"], "--server needs a port"))  # fmt: skip
    for args, named in refusals:
        run = _run(*args, timeout=60)
        assert run.returncode == 2 and named in run.stderr, (args, run.stderr)


def test_the_load_cancels_audio_generations_after_their_first_or_second_sample_frame():
    """docs/reliability.md: scripts/sanitize_load.py cancels half of the generations "after their first or
    second token frame". It counted only text frames: an audio model's samples come as binary frames, which
    it skipped, so an audio turn drawn to be cancelled after its second frame was never cancelled and one
    after its first was cancelled at its `audio_header`, before any sample (two of the three shipped models
    are audio). Here a stand-in audio server streams sample frames and records after how many a cancel
    came."""
    import asyncio
    import importlib.util
    import json
    import random

    from websockets.asyncio.server import serve

    spec = importlib.util.spec_from_file_location("sanitize_load", ROOT / "scripts" / "sanitize_load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    cancelled_after = []  # per generation: the sample frames sent when its cancel came (None: no cancel)

    async def audio(ws) -> None:
        async for raw in ws:
            if json.loads(raw)["type"] != "generate":
                continue
            await ws.send(json.dumps({"type": "audio_header", "sample_rate": 8000, "encoding": "pcm16"}))
            sent, cancel = 0, None
            while sent < 100 and cancel is None:
                await ws.send(b"\0\1" * 40)
                sent += 1
                try:
                    if json.loads(await asyncio.wait_for(ws.recv(), 0.01))["type"] == "cancel":
                        cancel = sent
                except TimeoutError:
                    pass
            cancelled_after.append(cancel)
            await ws.send(
                json.dumps({"type": "done", "finish_reason": "length" if cancel is None else "cancelled"})
            )

    class CancelAfter(random.Random):
        def __init__(self, frames: int) -> None:
            super().__init__(0)
            self.frames = frames

        def choice(self, seq):
            return self.frames if list(seq) == [None, None, 1, 2] else super().choice(seq)

    async def main() -> list:
        problems: list = []
        async with serve(audio, "127.0.0.1", 0) as server:
            url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            for frames in (1, 2):
                await asyncio.wait_for(
                    load.ws_session(url, "audio", "audio", CancelAfter(frames), 1, problems), 30
                )
        return problems

    assert asyncio.run(main()) == []
    assert len(cancelled_after) == 2 and None not in cancelled_after, cancelled_after
    assert cancelled_after[0] >= 1 and cancelled_after[1] >= 2, cancelled_after


STAND_IN_PYTHON = """#!/usr/bin/env bash
# python for scripts/sanitize-c: the tests pass at once; the server answers /readyz 200 (its pid in
# $SERVER_PID); the load runs until it is stopped (its pid in $LOAD_PID)
case "$*" in
  *"-m pytest"*) exit 0 ;;
  *"-m server"*) echo $$ > "$SERVER_PID"
    exec "$REAL_PYTHON" -c 'import http.server as h, sys
class A(h.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
h.HTTPServer(("127.0.0.1", int(sys.argv[1])), A).serve_forever()' "${@: -1}" ;;
  *sanitize_load.py*) echo $$ > "$LOAD_PID"; exec sleep 300 ;;
esac
exit 1
"""


def test_a_stopped_sanitize_c_stops_the_server_it_started(tmp_path):
    """`scripts/sanitize-c --server PORT` started the instrumented server in the background and stopped
    it only after the load: a SIGTERM to the script meanwhile (a `timeout`, a CI job cancelled, a closed
    terminal's SIGHUP) ended the script and left the server serving on PORT, and the load running. Here a
    stand-in python serves /readyz and runs a load that never ends; the script is stopped during it."""
    import signal
    import time

    from server.launch import free_port

    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    server_pid, load_pid = tmp_path / "server.pid", tmp_path / "load.pid"
    env = {**os.environ, "PYTHON": str(python), "REAL_PYTHON": sys.executable, "SERVER_PID": str(server_pid),
           "LOAD_PID": str(load_pid), "SANITIZE_CACHE": str(tmp_path / "cache")}  # fmt: skip
    env.pop("S4_CFLAGS", None)
    script = subprocess.Popen([str(SCRIPT), "--server", str(free_port())], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pids = []
    try:
        deadline = time.monotonic() + 60
        while not (load_pid.exists() and load_pid.read_text().strip()) and time.monotonic() < deadline:
            assert script.poll() is None, script.stdout.read()
            time.sleep(0.1)
        pids = [int(server_pid.read_text()), int(load_pid.read_text())]
        script.send_signal(signal.SIGTERM)
        script.wait(timeout=30)

        def gone(pid: int) -> bool:  # (exited: no such process, or a zombie its parent has not reaped)
            try:
                return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                return True

        deadline = time.monotonic() + 15
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids), ("left running: server, load", [gone(pid) for pid in pids])
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if script.poll() is None:
            script.kill()
