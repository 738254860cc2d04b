"""The load test's one target: a server on this machine's loopback interface (127.0.0.0/8, ::1,
localhost), never another machine. Standard library only: the locustfile imports it too (locust puts the
locustfile's folder on sys.path), and nothing of the project may be imported under locust's gevent."""

from __future__ import annotations

import ipaddress
import urllib.parse


def loopback_url(url: str) -> str:
    """`url` if it is an http(s) URL of a loopback host; else ValueError saying why."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise ValueError(
            f"{url!r}: the load test targets a server on loopback only: http://127.0.0.1:PORT, "
            "http://localhost:PORT or http://[::1]:PORT"
        )
    return url
