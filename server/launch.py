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
    """A loopback port free now (the kernel's choice). Free only now: another process may bind it before
    the caller does (`start_server` then tries another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Whether 127.0.0.1:`port` cannot be bound now (as uvicorn binds it: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


PORT_TRIES = 3  # free ports `start_server` tries when another process took the one it chose first


class ServerExited(RuntimeError):
    """The server's process exited before it was ready (its reason is on its stderr)."""


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
    The process is killed and RuntimeError raised if it exits or times out first; where it exited because
    another process took the free port it was given between `free_port` and its start, another free port is
    tried (PORT_TRIES in all; a `port` given is not replaced)."""
    for _ in range(PORT_TRIES - 1 if port is None else 0):
        chosen = free_port()
        try:
            return _start_server(flags, timeout_s, chosen, env, cwd)
        except ServerExited:
            if not port_taken(chosen):  # (it exited for another reason)
                raise
    return _start_server(flags, timeout_s, port or free_port(), env, cwd)


def _start_server(flags, timeout_s: float, port: int, env: dict | None, cwd: Path | None):
    import httpx

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
            # (trust_env=False: the server itself, never through a proxy HTTP_PROXY names, for which
            # 127.0.0.1 is another machine, nor one NO_PROXY's `127.0.0.0/8` would have had to exempt)
            if httpx.get(url + "/readyz", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    if proc.poll() is not None:
        raise ServerExited(f"the server exited with status {proc.returncode} ({' '.join(cmd[2:])})")
    proc.kill()
    raise RuntimeError(f"the server did not become ready ({' '.join(cmd[2:])})")
