"""The image's HEALTHCHECK: `python -m server.healthcheck` exits 0 when the server in the container answers
GET /readyz with 200, 1 otherwise (loading, draining, not listening).

It asks the address the server listens on, found as `python -m server` finds it: the `--host` / `--port`
flags on the server's command line (flags win), else S4_HOST / S4_PORT, else 127.0.0.1:8000. The HEALTHCHECK
read S4_PORT only, so `docker run s4serve --port 9000` (flags after the image name, as the README says)
was unhealthy for ever. The server is the process whose command line is `python -m server ...` (PID 1 as
the image's ENTRYPOINT; another under `docker run --init`). Flags are read in their exact spelling
(`--port 9000`, `--port=9000`), not argparse's abbreviations. It asks the server directly, whatever proxy
the environment names (HTTP_PROXY, which Docker puts into every container from the client's `proxies`
setting: urllib sent the request to the proxy, for which 127.0.0.1 is not this container). Only the standard
library is imported: it runs every 10 s beside the server.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

WILDCARD = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # listening everywhere: ask loopback
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy, whatever the environment


def server_argv(proc: Path = Path("/proc")) -> list[str]:
    """The flags of the first (lowest PID) `python -m server` process under `proc`; [] if none is found."""
    for pid in sorted((p for p in proc.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        try:
            argv = [a.decode(errors="replace") for a in (pid / "cmdline").read_bytes().split(b"\0")]
        except OSError:  # (gone meanwhile, or not ours to read)
            continue
        for i in range(len(argv) - 1):
            if argv[i] == "-m" and argv[i + 1] == "server":
                return argv[i + 2 :]
    return []


def flag(argv: list[str], name: str) -> str | None:
    """The last value given to --name (argparse keeps the last), spelled `--name V` or `--name=V`."""
    value = None
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
    return value


def readyz_url(argv: list[str], environ) -> str:
    """The /readyz URL of a server started with these flags and this environment."""
    host = flag(argv, "host") or environ.get("S4_HOST", "127.0.0.1")
    port = flag(argv, "port") or environ.get("S4_PORT", "8000")
    host = WILDCARD.get(host.strip(), host.strip())
    return f"http://{f'[{host}]' if ':' in host else host}:{port.strip()}/readyz"


def main() -> int:
    try:
        with DIRECT.open(readyz_url(server_argv(), os.environ), timeout=4) as r:
            return 0 if r.status == 200 else 1
    except (OSError, ValueError) as exc:  # refused, 503 (HTTPError), timeout, a malformed address
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
