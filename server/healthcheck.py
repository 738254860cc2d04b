"""The image's HEALTHCHECK: `python -m server.healthcheck` exits 0 when the server in the container answers
GET /readyz with 200, 1 otherwise (loading, draining, not listening).

It asks the address the server listens on, found as `python -m server` finds it: the `--host` / `--port`
flags on the server's command line (flags win), else S4_HOST / S4_PORT (in any case, the last one set
winning, and the port as a number, as Settings reads them), else 127.0.0.1:8000. The HEALTHCHECK
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


def variable(environ, name: str) -> str | None:
    """The variable `name` as the server's Settings reads it (pydantic-settings, case-insensitive): in any
    case, the last one set winning (`docker run -e s4_port=9100` after the image's S4_PORT)."""
    value = None
    for key, v in environ.items():
        if key.lower() == name.lower():
            value = v
    return value


def port_number(text: str) -> str:
    """A port as the server's Settings reads it, as digits: ` 9000 `, `9000.0` and `9_000` are 9000 (a
    text that is no whole number is left as it is: the server refused it, and so does the URL)."""
    try:
        number = float(text.strip())
    except ValueError:
        return text.strip()
    return str(int(number)) if number.is_integer() else text.strip()


def readyz_url(argv: list[str], environ) -> str:
    """The /readyz URL of a server started with these flags and this environment."""
    host = flag(argv, "host") or variable(environ, "S4_HOST") or "127.0.0.1"
    port = port_number(flag(argv, "port") or variable(environ, "S4_PORT") or "8000")
    host = WILDCARD.get(host.strip(), host.strip())
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"


def main() -> int:
    try:
        with DIRECT.open(readyz_url(server_argv(), os.environ), timeout=4) as r:
            return 0 if r.status == 200 else 1
    except (OSError, ValueError) as exc:  # refused, 503 (HTTPError), timeout, a malformed address
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
