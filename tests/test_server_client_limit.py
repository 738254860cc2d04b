"""`S4_MAX_CONNECTIONS_PER_CLIENT`: the connections open from one client (HTTP and WebSocket together) are
capped at the accept, one more answered 429 and closed before it is read, while other clients (another
loopback address here: Linux routes all of 127/8 to lo) are served, a refused connection disturbs no
session, and a client that closes one connection gets its place back; what a client is (`client_key`:
an IPv4 address, an IPv6 /64); and the setting's range."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time

import pytest
from pydantic import ValidationError
from server_support import (
    WS_GENERATE,
    ServerThread,
    read_until_closed,
    reference,
    token_ids,
    wait_for,
    ws_turn,
)
from websockets.sync.client import connect

from model.sampling import SamplingParams
from server import Settings
from server.connections import client_key

LIMIT = 3
TEXT = "tiny-text"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize(
    "client, key",
    [
        (("203.0.113.7", 5000), "203.0.113.7"),
        (("127.0.0.1", 1), "127.0.0.1"),
        (("2001:db8:1:2:aaaa::1", 5000), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff:ffff:ffff:ffff", 1), "2001:db8:1:2::/64"),  # the same /64: the same client
        (("2001:db8:1:3::1", 1), "2001:db8:1:3::/64"),  # the next /64: another client
        (("::ffff:198.51.100.9", 1), "198.51.100.9"),  # IPv4-mapped: its IPv4 address
        (("fe80::1%eth0", 1), "fe80::/64"),  # a link-local address's zone is not part of it
        (("::1", 1), "::/64"),
        (None, None),  # no peer address (a Unix socket): not counted
        (("", 0), None),
        (("not-an-address", 0), None),
    ],
)
def test_a_client_is_its_ipv4_address_or_its_ipv6_64(client, key):
    assert client_key(client) == key


@pytest.mark.parametrize("value", [-1, "x", 1.5])
def test_the_setting_is_range_checked_and_named(value):
    with pytest.raises(ValidationError, match="max_connections_per_client"):
        Settings(max_connections_per_client=value)
    assert Settings().max_connections_per_client == 0  # off by default (a proxy's clients are all the proxy)


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return sock


KEEP_ALIVE_S = 120.0  # the capped server's keep-alive and header deadlines: a close at either comes this late


def _refused(sock: socket.socket) -> bytes:
    """What the server sent before closing a connection it refused: closed at once, not at a deadline (a
    refusal left open until the keep-alive or header deadline closed it); read_until_closed gives up at 60 s,
    half those deadlines, and the connection must have closed before."""
    t0 = time.monotonic()
    got = read_until_closed(sock, KEEP_ALIVE_S / 2)
    assert time.monotonic() - t0 < KEEP_ALIVE_S / 2, "refused and left open: closed at a deadline"
    return got


def _refusals(s: ServerThread) -> float:
    """s4_connections_refused_total{reason="max_connections_per_client"}, read in the process (a scrape
    over HTTP would be one more connection from 127.0.0.1)."""
    labels = {"reason": "max_connections_per_client"}
    return s.state.metrics.registry.get_sample_value("s4_connections_refused_total", labels)


@pytest.fixture(scope="module")
def capped(model_dirs):
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_connections_per_client=LIMIT,
                        keep_alive_timeout_s=KEEP_ALIVE_S, header_timeout_s=KEEP_ALIVE_S)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def test_one_client_over_its_cap_is_refused_429_others_are_served_and_sessions_undisturbed(
    capped, model_dirs, caplog
):
    s = capped
    caplog.set_level(logging.WARNING, logger="server.connections")
    before = _refusals(s)
    # 127.0.0.1 holds the cap: a WebSocket (mid-session) and two idle HTTP connections
    with connect(s.ws_url, open_timeout=10) as ws:
        first = ws_turn(
            ws, {"type": "generate", "model": TEXT, "prompt": "To be", "max_new_tokens": 4, "seed": 1}
        )
        assert first[-1]["type"] == "done", first[-1]
        idle = [_connect(s.port, "127.0.0.1") for _ in range(LIMIT - 1)]
        ports = {sock.getsockname()[1] for sock in idle}  # accepted (in order: before the next one anyway)
        guard = s.server.config.http.keywords["guard"]  # (server.connections.uvicorn_config's)
        assert wait_for(lambda: ports <= {c.client[1] for c in list(guard.connections) if c.client}, 60)
        # one more HTTP request, and one more WebSocket upgrade, from 127.0.0.1: 429 at once, closed
        for request in (HEALTHZ, b"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\n\r\n"):  # fmt: skip
            extra = _connect(s.port, "127.0.0.1")
            extra.sendall(request)
            got = _refused(extra)
            assert got.startswith(b"HTTP/1.1 429 "), got[:80]
            assert b"retry-after: 1" in got.lower() and b"max_connections_per_client" in got, got
            extra.close()
        # the README's WebSocket client says why, without a traceback
        args = [sys.executable, str(WS_GENERATE), s.ws_url, "x", "--model", TEXT, "--max-new-tokens", "2"]
        script = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        assert script.returncode == 1 and "Traceback" not in script.stderr, script.stderr
        assert script.stderr.startswith(
            "refused: HTTP 429 Too Many Requests: too many open connections "
            "from this client: at most 3 (max_connections_per_client)"
        ), script.stderr
        # another client (127.0.0.2) is served meanwhile
        other = _connect(s.port, "127.0.0.2")
        other.sendall(HEALTHZ)
        assert other.recv(12) == b"HTTP/1.1 200"
        other.close()
        # the session on the capped client's WebSocket continues exactly
        frames = ws_turn(ws, {"type": "generate", "max_new_tokens": 5, "seed": 2})
        assert frames[-1]["type"] == "done", frames[-1]
        prompt = list(b"To be") + token_ids(first)
        assert token_ids(frames) == reference(model_dirs["text"], prompt, SamplingParams(seed=2), 5)
        for sock in idle:
            sock.close()
    assert _refusals(s) - before == 3
    warned = [r.getMessage() for r in caplog.records if r.name == "server.connections"]
    assert any("max_connections_per_client (client 127.0.0.1, " in m for m in warned), warned
    # the client closed its connections: it has its places back (the server sees the closes at once)
    assert wait_for(lambda: _served_from(s.port, "127.0.0.1", LIMIT), timeout=10)


def _served_from(port: int, source: str, n: int) -> bool:
    """Whether n connections from `source`, held open together, are all answered 200."""
    socks = [_connect(port, source) for _ in range(n)]
    try:
        for sock in socks:
            sock.sendall(HEALTHZ)
        return all(sock.recv(12) == b"HTTP/1.1 200" for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def test_without_the_setting_one_client_may_hold_many(model_dirs):
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
    try:
        assert _served_from(s.port, "127.0.0.1", 20)
    finally:
        s.stop()
