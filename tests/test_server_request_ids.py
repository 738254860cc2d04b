"""X-Request-ID on every response, not only on those asgi-correlation-id sees (it adds the header to
`http.response.start`): a WebSocket handshake's 101 and its refusals before the accept (a bad key's 401,
a foreign origin's 403, an unknown path's 404) carry the client's id where it sent a well-formed one;
the answers written by the connection guard below the app (431, 400, the per-client 429) a new one,
in the log line of the refusal where there is one. Found by an observability audit: the README says
"Every HTTP response carries X-Request-ID", and these did not."""

from __future__ import annotations

import logging
import re
import socket
import time

import httpx
import pytest
from asgi_correlation_id import correlation_id
from server_support import ServerThread
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from server import Settings
from server.logs import RequestIds

KEY = "sk-request-ids-0123456789abcdef"
PER_CLIENT = 3
GENERATED = re.compile(r"[0-9a-f]{32}")  # a new id: a uuid4, hex (server/logs.py new_request_id)


@pytest.fixture(scope="module")
def keyed(model_dirs):
    settings = Settings(checkpoints=[str(model_dirs["text"])], api_keys=KEY, drain_timeout_s=1,
                        max_connections_per_client=PER_CLIENT)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def _handshake_refusal(url: str, **kw):
    with pytest.raises(InvalidStatus) as e:
        connect(url, open_timeout=10, **kw).close()
    return e.value.response


def test_a_websocket_handshakes_101_carries_the_request_id(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    with connect(keyed.ws_url, additional_headers={**auth, "X-Request-ID": "ws-req-7"}) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers.get_all("X-Request-ID") == ["ws-req-7"]
    with connect(keyed.ws_url, additional_headers=auth) as ws:
        assert GENERATED.fullmatch(ws.response.headers["X-Request-ID"]), ws.response.headers
    with connect(keyed.ws_url, additional_headers={**auth, "X-Request-ID": "not well formed"}) as ws:
        assert GENERATED.fullmatch(ws.response.headers["X-Request-ID"]), ws.response.headers


def test_refused_websocket_handshakes_carry_the_clients_request_id(keyed):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        (keyed.ws_url, {"Authorization": "Bearer wrong"}, 401),
        (keyed.ws_url.replace("/v1/stream", "/v1/nowhere"), auth, 404),
        (keyed.ws_url, {**auth, "Origin": "http://evil.example"}, 403),
    ]
    for i, (url, headers, status) in enumerate(cases):
        mine = f"refused-ws-{i}"
        got = _handshake_refusal(url, additional_headers={**headers, "X-Request-ID": mine})
        assert got.status_code == status, (url, headers, got.status_code)
        assert got.headers.get_all("X-Request-ID") == [mine], (status, got.headers)
        new = _handshake_refusal(url, additional_headers=headers)
        assert new.status_code == status and GENERATED.fullmatch(new.headers["X-Request-ID"]), new.headers


def _response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole HTTP response (headers and a Content-Length body) read from a raw socket."""
    sock.settimeout(timeout)
    got = b""
    while b"\r\n\r\n" not in got:
        data = sock.recv(65536)
        if not data:
            return got
        got += data
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length and (data := sock.recv(65536)):
        body += data
    return head + b"\r\n\r\n" + body


def _request_ids(response: bytes) -> list[str]:
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    return re.findall(r"(?im)^x-request-id: *(\S+)\r?$", head)


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        return _response(sock)


def test_answers_written_below_the_app_carry_a_new_request_id(keyed, caplog):
    """431 (headers too large), 400 (not HTTP) and the connection guard's 429 are written by the protocol
    (server/connections.py), which the middleware never sees: each carries a new, well-formed id, the
    client's own being unread; the 431's, the 400's and the 429's log lines carry the same id (the 431
    had no line at any level)."""
    caplog.set_level(logging.DEBUG, logger="server.connections")
    big = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: mine\r\nX-Big: " + b"a" * 70_000
    got = _raw(keyed.port, big + b"\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 431 "), got[:100]
    (rid,) = _request_ids(got)
    assert GENERATED.fullmatch(rid), rid
    got = _raw(keyed.port, b"NOT HTTP AT ALL\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 "), got[:100]
    (bad,) = _request_ids(got)
    assert GENERATED.fullmatch(bad) and bad != rid
    # (no wait for the log lines: server/connections.py logs each refusal before it writes the answer)
    (line,) = [r for r in caplog.records if "invalid HTTP" in r.getMessage()]
    RequestIds().filter(line)  # the handler's filter (server/logs.py): keeps the record's own id
    assert line.request_id == bad
    (line,) = [r for r in caplog.records if "headers too large" in r.getMessage()]
    RequestIds().filter(line)
    assert line.request_id == rid and "max_header_bytes" in line.getMessage()
    held = [socket.create_connection(("127.0.0.1", keyed.port), timeout=10) for _ in range(PER_CLIENT)]
    try:
        time.sleep(0.2)  # (accepted)
        got = _raw(keyed.port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: mine\r\n\r\n")
    finally:
        for sock in held:
            sock.close()
    assert got.startswith(b"HTTP/1.1 429 "), got[:100]
    (over,) = _request_ids(got)
    assert GENERATED.fullmatch(over) and over not in (rid, bad)
    (warning,) = [r for r in caplog.records if "max_connections_per_client" in r.getMessage()]
    RequestIds().filter(warning)
    assert warning.request_id == over


def test_an_unexpected_error_s_500_carries_the_request_id_its_traceback_line_names(model_dirs, monkeypatch):
    """A route that raises what no handler expects is Starlette's plain 500 (ServerErrorMiddleware, the
    outermost), which was outside the request id middleware: the one answer an operator most needs to
    find in the log had no X-Request-ID. It has now, and uvicorn's ERROR line with the traceback carries
    the same id."""
    from server.routes import health

    lines: list[tuple[str | None, str, bool]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((correlation_id.get(), record.getMessage(), record.exc_info is not None))

    def broken(request):
        raise RuntimeError("a bug")

    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])], drain_timeout_s=0)).start()
    keep = Keep(logging.ERROR)
    logging.getLogger("uvicorn.error").addHandler(keep)
    try:
        monkeypatch.setattr(health, "state_of", broken)
        r = httpx.get(s.url + "/metrics", headers={"X-Request-ID": "mine-500"})
    finally:
        logging.getLogger("uvicorn.error").removeHandler(keep)
        s.stop()
    assert r.status_code == 500
    assert r.headers.get("x-request-id") == "mine-500", r.headers
    assert [(rid, tb) for rid, _, tb in lines] == [("mine-500", True)], lines
