"""Start `python -m server` as a child process on a free loopback port and wait until it is ready
(/readyz 200): what the benchmarks, the load test and the reliability script run their clients against."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from server.auth import CLIENT_KEY_VARIABLES

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    flags: Sequence[str],
    timeout_s: float = 600.0,
    port: int | None = None,
    env: dict | None = None,
    cwd: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """`python -m server --host 127.0.0.1 --port <port, or a free one> --log-level warning *flags` →
    (process, base URL) once ready; `env` is added to this process's environment (S4_* settings);
    `cwd`: the checkout whose server runs (default this one: a benchmark's A/B runs another).
    The process is killed and RuntimeError raised if it exits or times out first."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *flags]  # fmt: skip
    # S4_API_KEY is a client's key (a keyed server's, for the scripts and the load test), VLLM_API_KEY
    # another server's: this server has no keys unless `flags` or `env` give it some, and either variable
    # alone would stop it (server/__main__.py)
    inherited = {k: v for k, v in os.environ.items() if k.upper() not in CLIENT_KEY_VARIABLES}
    env = {**inherited, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}  # spinning OpenMP threads stall a CPU
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not become ready ({' '.join(cmd[2:])})")
