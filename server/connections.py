"""Deadlines and a cap for client connections, against slow and idle clients (slowloris).

uvicorn (0.53–0.55) closes an idle keep-alive connection after `timeout_keep_alive`, but only once it has
sent a response: a connection that sends nothing, trickles its request line and headers, or sends
headers and never its body stays open for ever (neither of its HTTP/1.1 protocols has a header or
body timeout), and `limit_concurrency` answers 503 only once a request's headers are complete, so it
caps nothing against them. Here uvicorn's httptools protocol (httptools comes with uvicorn[standard])
and its websockets (sans-I/O) protocol are subclassed, and `uvicorn_config` puts them in:

- **headers**: a request's line and headers must be in within `header_timeout_s` of its first byte
  (for a connection's first request, of the accept: a connection that sends nothing is closed then
  too); else 408 (when some of the request came) and the connection is closed.
- **body**: the body must be in within `body_timeout_s` of the end of the headers; else 408 (when no
  response started) and close.
- **WebSocket handshake**: the app must accept (or refuse) an upgrade within
  `ws_handshake_timeout_s` of the upgrade request (whose headers the header deadline covers); else 503
  and close.
- **idle keep-alive**: closed `keep_alive_timeout_s` after the last response (uvicorn's timer).
- **slow readers** (HTTP and WebSocket): a client that reads nothing for `send_timeout_s` while the
  server has more for it than the transport buffers (64 KiB past the kernel's socket buffers) is cut
  off (its generation is cancelled and its slot freed: a client that stopped reading would otherwise
  hold a paused session for ever); so is one that reads nothing for `send_timeout_s` of what is left in
  that buffer once the connection is closed (a close waits for the buffer to drain: `SendDeadline`). A
  client that takes some of it, however slowly, is not: the deadline runs from its last byte taken.
- **WebSocket keepalive**: every socket is pinged every `WS_PING_INTERVAL_S`; one whose client has not
  answered within `WS_PING_TIMEOUT_S` is closed with 1008 (uvicorn's 1011 is a server fault's code); one
  still taking what was sent before the ping is behind, not gone, and is waited for while it takes it.
- **header size**: a request line and headers over `max_header_bytes` (counted exactly, before the
  parser sees them) are answered 431 and the connection closed
  (`s4_requests_refused_total{reason="headers_too_large"}`).
- **connections**: at most `max_connections` open (HTTP and WebSocket); one more is answered 503 and
  closed when accepted, before it is read.
- **connections per client**: with `max_connections_per_client` > 0, at most that many open from one
  client (`client_key`: its IPv4 address, or its IPv6 /64); one more is answered 429 and closed when
  accepted, so one client cannot hold the whole `max_connections` (nginx's `limit_conn`, keyed as
  nginx keys `$binary_remote_addr`, but with IPv6 hosts grouped by their /64, which one subscriber gets
  whole). The peer is the socket's: behind a reverse proxy every connection is the proxy's, so keep it
  0 there and limit in the proxy.

- **lingering close**: a connection closed while its client may still be sending (the per-client 429
  above, a 413 before the body is read, a 431, a 400) is not closed outright, which would leave that
  input unread and make the kernel answer it with a TCP reset: a client still writing its body then got
  ECONNRESET and, like Python's urllib, never read the response. Its write side is shut after the
  response (FIN) and its input read and dropped until the client closes its side, for at most
  `linger_timeout_s` (5 s) without input, `linger_time_s` (30 s) in all (RFC 9112, 9.6; nginx's
  `lingering_close` with its defaults) and `linger_max_bytes` (64 MiB: what a refused request can make
  the server read is bounded, as an accepted one's is by max_body_bytes). A connection lingering counts as
  open (a descriptor), not against its client's cap, and gives way to a new connection at
  `max_connections` (the oldest first, as many as that takes); the 503 at the cap, the deadlines above
  and the shutdown close outright.

Every close is counted in `s4_connections_closed_total{reason}` (the reasons: the four deadlines,
`send_timeout`, a WebSocket's input it cannot take: `PARSER_CLOSES`, its unanswered ping:
`ws_ping_timeout`, and a request pipelined past `MAX_PIPELINED`: `pipeline_full`), every refusal in
`s4_connections_refused_total{reason}`; `s4_connections_open` is the number open.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import logging
import re
import struct
import time
from dataclasses import dataclass, field

import uvicorn
from prometheus_client import Counter
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets import http11
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from server.auth import KEY_SUBPROTOCOL_PREFIX
from server.config import MAX_BYTES
from server.errors import APIError, json_bytes
from server.logs import REQUEST_ID_HEADER, RedactQueries, new_request_id, redact_query

log = logging.getLogger("server.connections")

UVICORN_MIN = (0, 53)  # pyproject.toml's floor
# every WebSocket is pinged this often, and closed (1008) when it has not answered within the timeout:
# uvicorn's defaults, set here so that the README's word holds whatever uvicorn's become
WS_PING_INTERVAL_S = 20.0
WS_PING_TIMEOUT_S = 20.0


def check_uvicorn(version: str) -> None:
    """Raise ImportError naming the installed uvicorn `version` ("major.minor[.patch]") and the floor when
    it is older than UVICORN_MIN: the protocols below use internals of uvicorn's sans-I/O WebSocket protocol
    that older releases lack or handle otherwise (measured 2026-12-03 with the server tests: 0.35–0.49 have
    no `frames`, so every text message failed; 0.50–0.52 sent a refused handshake's response with two
    Content-Length headers and did not pause a slow WebSocket reader; 0.53–0.55 pass). A version that does
    not start with two integers (a development build) is not judged."""
    try:
        have = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return
    if len(have) == 2 and have < UVICORN_MIN:
        need = ".".join(map(str, UVICORN_MIN))
        raise ImportError(
            f"the server needs uvicorn>={need} (server/connections.py extends its WebSocket protocol's "
            f"internals); uvicorn {version} is installed: pip install 'uvicorn[standard]>={need}'"
        )


check_uvicorn(uvicorn.__version__)


@dataclass
class ConnectionGuard:
    """The limits (seconds, counts) and the counters the protocols below report to."""

    header_timeout_s: float
    body_timeout_s: float
    ws_handshake_timeout_s: float
    send_timeout_s: float
    max_connections: int
    max_header_bytes: int = 1 << 16
    max_connections_per_client: int = 0  # 0: no limit
    linger_timeout_s: float = 5.0  # a lingering close (Linger): ends after this long without input …
    linger_time_s: float = 30.0  # … or this long in all (nginx's lingering_timeout and lingering_time) …
    linger_max_bytes: int = 64 << 20  # … or once it has dropped this much input
    closed: Counter | None = None  # labels: reason
    refused: Counter | None = None  # labels: reason
    requests_refused: Counter | None = None  # labels: reason
    connections: set = field(default_factory=set)  # uvicorn's open connections (set when the first opens)
    last_warning: float = -float("inf")  # time.monotonic() of the last refusal logged as a warning

    def count_closed(self, reason: str) -> None:
        log.debug("connection closed: %s", reason)  # the metric is the signal: an attack makes thousands
        if self.closed is not None:
            self.closed.labels(reason).inc()

    def count_request_refused(self, reason: str) -> None:
        if self.requests_refused is not None:
            self.requests_refused.labels(reason).inc()

    def count_refused(self, reason: str, client: str | None = None, request_id: str | None = None) -> None:
        """Count a refused connection; log it as a warning at most once per WARN_EVERY_S, with the client
        (`client_key`) it came from when the refusal is that client's, and the X-Request-ID its response
        carries (`request_id`: the line's request id)."""
        now = time.monotonic()
        if now - self.last_warning >= WARN_EVERY_S:
            self.last_warning = now
            who = f"client {client}, " if client else ""
            log.warning("connection refused: %s (%s%d open in all; at most one warning per %.0f s, every "
                        "refusal counted in s4_connections_refused_total)", reason, who,
                        len(self.connections), WARN_EVERY_S, extra={"request_id": request_id})  # fmt: skip
        if self.refused is not None:
            self.refused.labels(reason).inc()


WARN_EVERY_S = 60.0


def client_key(client: tuple[str, int] | None) -> str | None:
    """What `max_connections_per_client` counts by, from uvicorn's `(host, port)` of a TCP peer: an IPv4
    address as it is ("203.0.113.7"), an IPv4-mapped IPv6 one as its IPv4 address, any other IPv6
    address as its /64 network ("2001:db8:1:2::/64": one subscriber gets a whole /64, so counting single
    addresses would not limit it). None (not counted) for a peer without an IP address (a Unix socket)."""
    if not client:
        return None
    try:
        ip = ipaddress.ip_address(client[0].split("%", 1)[0])  # (a link-local address's zone dropped)
    except ValueError:
        return None
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def client_over_limit(key: str | None, guard: ConnectionGuard) -> bool:
    """Whether the client `key` (`client_key`) now holds more than `max_connections_per_client` open
    connections, the one just accepted included (each protocol keeps its peer's key as `client_key`;
    an upgraded connection is its WebSocket protocol, which keeps the same key). One pass over uvicorn's
    own set of the open connections, so nothing is counted twice or left counted, when the limit is set
    and more than that many are open (at most `max_connections`: 1,000 open, 80-100 µs on this 2-core VM).
    A connection in a lingering close (`Linger`) is not counted: it is being closed, and a client that
    keeps it open does so for at most `linger_time_s`."""
    limit = guard.max_connections_per_client
    if limit <= 0 or key is None or len(guard.connections) <= limit:
        return False
    n = 0
    for conn in guard.connections:
        if getattr(conn, "client_key", None) == key and getattr(conn, "lingering", None) is None:
            n += 1
            if n > limit:
                return True
    return False


def error_response(
    status: int, message: str, retry_after: float | None = None, request_id: str = ""
) -> bytes:
    """A whole HTTP/1.1 response with our JSON error body, `Connection: close` and an X-Request-ID
    (`request_id`, or a new one: the request was not read, so a client's own is not known), as every
    response has."""
    err = APIError(status, message, retry_after=retry_after)
    body = json_bytes(err.body())
    rid = (request_id or new_request_id()).encode()
    head = [STATUS_LINE[status], b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n",
            b"%s: %s\r\n" % (REQUEST_ID_HEADER.encode(), rid)]  # fmt: skip
    head += [f"{k}: {v}\r\n".encode() for k, v in err.headers().items()]
    return b"".join(head) + b"\r\n" + body


@dataclass
class Linger:
    """A lingering close under way (RFC 9112, 9.6, "Tear-down"): the response is out, the write side shut
    (FIN after it), and what the client still sends is read and dropped, until it closes its side, or
    `linger_timeout_s` passes without input, `linger_time_s` in all (loop.time() seconds), or
    `linger_max_bytes` have been dropped."""

    started: float
    last: float  # the last input
    dropped: int = 0  # bytes read and dropped
    ended: bool = False
    # once ended: when (loop.time()) and what ended it: "fin" (the client closed its side), "idle"
    # (linger_timeout_s without input), "time" (linger_time_s in all), "bytes" (linger_max_bytes dropped),
    # "room" (a new connection at the cap), "shutdown", "lost" (the connection was lost: a reset)
    ended_at: float | None = None
    reason: str = ""
    timer: asyncio.TimerHandle | None = None
    # the order lingering closes began in: loop.time() ties within a millisecond under uvloop (libuv's
    # cached clock), and "the oldest first" must still name one (a CI run ended the other of a tie)
    seq: int = field(default_factory=lambda: next(_LINGER_SEQ))

    @property
    def age_key(self) -> tuple[float, int]:
        """Sorts lingering closes oldest first, ties in the order they began."""
        return (self.started, self.seq)


_LINGER_SEQ = itertools.count()


class LingeringTransport:
    """The HTTP protocol's transport as uvicorn and this module see it: `close()` is the protocol's
    `close_transport` (a lingering close when the client may still be sending), `is_closing()` is true
    from then, and writes after it are dropped, as a closing transport's are; the rest is the transport's."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpProtocol) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_transport()

    def is_closing(self) -> bool:
        return self._protocol.lingering is not None or self._transport.is_closing()

    def write(self, data) -> None:
        if self._protocol.lingering is None:
            self._protocol.written += len(data)
            self._transport.write(data)


def make_room(guard: ConnectionGuard) -> bool:
    """Whether one more connection may open under `max_connections` (the one just accepted, already in
    uvicorn's set), after ending as many lingering closes as that takes, the oldest first: a lingering
    connection is one being closed, so it gives way to a new one. Connections whose transport is already
    closing (they leave the set a loop pass later, at connection_lost) are not counted. False, and nothing
    ended, when even ending every lingering close would not make room. One pass over the set, at the cap
    only."""
    conns = guard.connections
    if len(conns) <= guard.max_connections:
        return True
    n_open, waiting = 0, []
    for conn in conns:
        transport = getattr(conn, "raw_transport", None) or getattr(conn, "transport", None)
        if transport is not None and transport.is_closing():
            continue
        n_open += 1
        lingering = getattr(conn, "lingering", None)
        if lingering is not None and not lingering.ended:
            waiting.append(conn)
    excess = n_open - guard.max_connections
    if excess > len(waiting):
        return False
    for conn in sorted(waiting, key=lambda c: c.lingering.age_key)[: max(excess, 0)]:
        conn.end_linger("room")
    return True


class SendDeadline:
    """Cuts off a connection whose client has read nothing for `send_timeout_s` while the server had data
    for it: while the transport's write buffer is over its high-water mark (asyncio's pause_writing()), or
    once the connection is closed with bytes still in that buffer (`closed`). "Nothing": the client took
    no byte in that time (the protocol's `taken`: written, less the buffer and the kernel's unacknowledged
    bytes); one that took some gets another `send_timeout_s` from then. (The deadline ran from the pause
    to the resume whatever the client took, so one reading all along, slower than the buffer's 48-64 KiB
    a timeout, was cut off mid-stream: 16 KB/s of pcm16 with a 1.5 s timeout, after 2-3 s.) A close
    waits for the buffer to drain, which a client that reads nothing never does: such a connection (a
    WebSocket closed at its ping timeout or for a message too big, an HTTP connection closed when idle
    after a streamed answer, its last 30-50 KB unread) stayed open for ever, its descriptor held and out
    of max_connections' count (`make_room` skips closing transports), a WebSocket's handler never told it
    had gone. The connection is aborted, not closed."""

    def __init__(self, protocol, guard: ConnectionGuard) -> None:
        self.protocol, self.guard = protocol, guard
        self.timer: asyncio.TimerHandle | None = None
        self.closing = False  # the transport is closing: only connection_lost (`stop`) ends the deadline
        self.lost = False  # connection_lost has come

    def paused(self) -> None:
        if self.timer is None and not self.lost:
            self._arm(self.protocol.taken())

    def _arm(self, taken: int) -> None:
        self.taken_at = taken  # what the client had taken when the deadline started
        self.timer = self.protocol.loop.call_later(self.guard.send_timeout_s, self._expired)

    def resumed(self) -> None:
        if self.timer is not None and not self.closing:  # (a closing one: the rest must still drain)
            self.timer.cancel()
            self.timer = None

    def closed(self, transport) -> None:
        """The connection's transport has been closed: with bytes still in its buffer, the deadline runs
        (or goes on) until they are gone (connection_lost), whatever the buffer's marks say."""
        if self.lost:
            return
        self.closing = True
        if transport.get_write_buffer_size():
            self.paused()

    def stop(self) -> None:
        """The connection is gone (connection_lost)."""
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        transport = self.protocol.transport
        if transport is not None:  # (connection_lost cancels the timer: the connection is still there)
            if (taken := self.protocol.taken()) > self.taken_at:  # it reads, slowly: from its last byte
                self._arm(taken)
                return
            if not self.closing:  # (a close was counted by what closed it)
                self.guard.count_closed("send_timeout")
            self.protocol.gone()
            transport.abort()


class SendWatch:
    """Mixed in before a uvicorn protocol: asyncio's flow-control callbacks drive the connection's
    `send_deadline` (a SendDeadline the protocol sets in __init__), which calls its `gone()`."""

    send_deadline: SendDeadline

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self.send_deadline.paused()

    def resume_writing(self) -> None:
        self.send_deadline.resumed()
        super().resume_writing()  # type: ignore[misc]


class GuardedHttpProtocol(SendWatch, HttpToolsProtocol):
    """uvicorn's httptools HTTP/1.1 protocol with header and body deadlines and a connection cap.

    One timer per connection (`deadline`). The header deadline is armed at the accept, and at the
    first byte of each later request that arrives while no request is in progress (a pipelined
    request's, when the response before it is complete); it becomes the body deadline when the headers
    are complete (for a pipelined request, when its turn comes: uvicorn reads nothing more until
    then), and is cancelled when the body is complete. No deadline while the app works on a request;
    uvicorn's keep-alive timer between requests."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.deadline: asyncio.TimerHandle | None = None
        self.partial_request = False  # bytes of a request whose headers are not complete yet
        # between a request's headers and the end of its body: bytes that come then are its body, also once
        # it was answered (a route may answer before it reads the body), never a next request's headers
        self.in_body = False
        self.header_bytes = 0  # of the request whose headers are not complete yet (_headers_too_large)
        self.header_tail = b""  # the last 3 of those bytes: the blank line may straddle two reads
        self.chunk_data = True  # False from a chunk's header to its first data byte (`_trailers_too_large`)
        self.trailer_bytes = 0  # read after the last chunk's header, of the request being read
        self.written = 0  # bytes written to the connection (`taken`)
        self.send_deadline = SendDeadline(self, guard)
        self.pipeline_full = False  # a request came behind MAX_PIPELINED waiting ones (`_pipeline_full`)

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.raw_transport = transport
        self.lingering: Linger | None = None
        self.refused = False  # answered at the accept, before anything of it was read
        self.hard_close = False  # a deadline's or the shutdown's close: no lingering
        super().connection_made(LingeringTransport(transport, self))
        self.guard.connections = self.connections
        if not make_room(self.guard):
            rid = new_request_id()
            self.guard.count_refused("max_connections", request_id=rid)
            self.hard_close = True  # at the cap: no descriptor to spare for a lingering close
            self.refuse(error_response(503, "too many open connections; try again", 1, rid))
            return
        self.client_key = client_key(self.client)
        if client_over_limit(self.client_key, self.guard):
            rid = new_request_id()
            self.guard.count_refused("max_connections_per_client", self.client_key, rid)
            limit = self.guard.max_connections_per_client
            msg = (f"too many open connections from this client: at most {limit} "
                   f"(max_connections_per_client); close one and try again")  # fmt: skip
            self.refuse(error_response(429, msg, 1, rid))
            return
        self._arm(self.guard.header_timeout_s, "header_timeout")

    def refuse(self, response: bytes) -> None:
        """Answer a connection at its accept and close it (lingering, unless `hard_close`: its request may
        be on its way)."""
        self.refused = True
        self.transport.write(response)
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.lingering is not None:
            self._linger_over("lost")
        self.send_deadline.stop()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self.lingering is not None:  # the client closed its side: asyncio now closes ours (a FIN each
            self._linger_over("fin")  # way, nothing unread: no reset)
            return
        self.gone()
        super().eof_received()

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: no lingering from here on, and a lingering close ends now."""
        self.hard_close = True
        if self.lingering is not None:
            self.end_linger("shutdown")
            return
        super().shutdown()

    def _input_pending(self) -> bool:
        """Whether the client may still be sending this connection's input: it was refused at the accept,
        a request's headers or body are not all in, or pipelined requests wait."""
        cycle = self.cycle
        return (self.refused or self.partial_request or bool(self.pipeline) or self.pipeline_full
                or (cycle is not None and cycle.more_body))  # fmt: skip

    def close_transport(self) -> None:
        """Every close of this connection (uvicorn's after a `Connection: close` response, a 400, the
        refusals here; `LingeringTransport.close`). While the client may still be sending (a 413 before
        its body is read, a refusal at the accept, a 431), a plain close would leave its input unread,
        so the kernel would answer with a TCP reset, and a client still writing its body would get
        ECONNRESET and may never read the response (Python's urllib raised "Connection reset by peer"
        instead of giving the 413). So the close lingers instead, as nginx's `lingering_close`, RFC 9112
        9.6: the write side is shut after the response (FIN), input is read and dropped until the client
        closes its side (`eof_received`), or `linger_timeout_s` without input, `linger_time_s` in all, or
        `linger_max_bytes` dropped. The 503 at the cap, a deadline's close (a slow client) and the
        shutdown's do not linger (`hard_close`)."""
        raw = self.raw_transport
        if self.lingering is not None or raw.is_closing():  # (closing once connection_lost has come)
            return
        if self.hard_close or not self._input_pending() or not raw.can_write_eof():
            raw.close()
            self.send_deadline.closed(raw)  # (what a client that reads nothing leaves in the buffer)
            return
        self._disarm()
        self._unset_keepalive_if_required()
        now = self.loop.time()
        self.lingering = Linger(started=now, last=now)
        raw.write_eof()
        raw.resume_reading()  # (uvicorn pauses reading while a body waits for the app)
        self._linger_check()

    def _linger_check(self) -> None:
        lg = self.lingering
        lg.timer = None
        if lg.ended:
            return
        in_all, idle = lg.started + self.guard.linger_time_s, lg.last + self.guard.linger_timeout_s
        end = min(in_all, idle)
        if self.loop.time() >= end:
            self.end_linger("time" if in_all <= idle else "idle")
        else:
            lg.timer = self.loop.call_at(end, self._linger_check)

    def _linger_over(self, reason: str) -> None:
        """Mark the lingering close ended (when, and why: `Linger.reason`, the first one given) and cancel
        its timer."""
        lg = self.lingering
        if not lg.ended:
            lg.ended, lg.ended_at, lg.reason = True, self.loop.time(), reason
        if lg.timer is not None:
            lg.timer.cancel()
            lg.timer = None

    def end_linger(self, reason: str) -> None:
        """End a lingering close now (`reason`: `Linger.reason`): a close when the response has gone out
        (input the kernel holds unread may still draw a reset, as at nginx's lingering_time), an abort when
        the client has not read all of it."""
        lg = self.lingering
        if lg is None or lg.ended:
            return
        self._linger_over(reason)
        raw = self.raw_transport
        if raw.get_write_buffer_size():
            raw.abort()
        else:
            raw.close()

    def gone(self) -> None:
        """The client is gone: it closed its side (FIN; asyncio then closes the transport, uvicorn keeps
        no half-open connection), or it is cut off (send timeout). `connection_lost` comes a loop pass
        later, and what the app sends meanwhile is dropped by the closing transport while uvicorn still
        reports the connection open; so the running request is marked disconnected now, as
        connection_lost will (its sends are dropped, its receive() says http.disconnect): a route that
        counts the tokens it handed to the transport (`Stream.deliver`) counts none that went nowhere."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()

    def taken(self) -> int:
        """Bytes the client has taken of those written to this connection (`bytes_taken`)."""
        return bytes_taken(self.written, self.raw_transport)

    def _in_progress(self) -> bool:
        """A request's response is not complete yet."""
        return self.cycle is not None and not self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:  # a lingering close: read and dropped, up to linger_max_bytes
            self.lingering.last = self.loop.time()
            self.lingering.dropped += len(data)
            if self.lingering.dropped > self.guard.linger_max_bytes:
                self.end_linger("bytes")
            return
        if self.pipeline_full:  # its requests past the pipeline's room: dropped unread (`_pipeline_full`)
            return
        if not self._in_progress() and not self.partial_request and not self.in_body:  # they begin a request
            self.partial_request, self.header_bytes, self.header_tail = True, 0, b""
            if self.deadline is None:  # (a connection's first request: armed at the accept)
                self._arm(self.guard.header_timeout_s, "header_timeout")
        if self.partial_request and self._headers_too_large(data):
            return
        # past a chunk's header with none of its data: a read that brings no data is the last chunk's
        # trailer section (a data chunk's header is followed by its data: `on_body`)
        trailing = self.in_body and not self.chunk_data
        super().data_received(data)
        if trailing and self.in_body and not self.chunk_data and not self.pipeline_full:
            self._trailers_too_large(len(data))

    def _headers_too_large(self, data: bytes) -> bool:
        """httptools has no limit on a request line or a header (and copies a long header value
        quadratically): count the bytes up to the blank line that ends the headers, before the parser
        sees them, and answer 431 past max_header_bytes. (Counting whole reads after parsing let a read
        that also ended the headers through: up to 256 KiB.) A read that holds the end of the request
        before is not counted: pipelined requests' headers are bounded by the read, 256 KiB."""
        seen = self.header_tail + data  # the blank line may straddle two reads
        end = seen.find(b"\r\n\r\n")
        n = len(data) if end < 0 else max(0, end + 4 - len(self.header_tail))
        self.header_bytes += n
        self.header_tail = seen[-3:]
        if self.header_bytes <= self.guard.max_header_bytes or self.transport.is_closing():
            return False
        self._disarm()
        self.guard.count_request_refused("headers_too_large")
        limit = self.guard.max_header_bytes
        msg = f"the request line and headers are larger than {limit} bytes (max_header_bytes)"
        rid = new_request_id()  # one DEBUG line, as an invalid request's (it had none at any level)
        log.debug("request refused: headers too large (%s)", msg, extra={"request_id": rid})
        self.transport.write(error_response(431, msg, request_id=rid))
        self.transport.close()
        return True

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: uvicorn answered it in plain text ("Invalid HTTP request
        received."), counted nothing and logged a WARNING for each (`UVICORN_INVALID_HTTP`: a client
        could fill the logs with them, as with ws_invalid_utf8). Here our JSON error, one DEBUG line and
        `s4_requests_refused_total{reason="invalid_http"}`; the close lingers, as the other refusals'."""
        self._disarm()
        self.guard.count_request_refused("invalid_http")
        rid = new_request_id()
        log.debug("request refused: invalid HTTP (%s)", msg, extra={"request_id": rid})
        text = "invalid HTTP request: its request line, a header or its body's framing could not be parsed"
        self.transport.write(error_response(400, text, request_id=rid))
        self.transport.close()

    def _trailers_too_large(self, n: int) -> None:
        """A chunked body's trailer section (RFC 9112 7.1.2: fields after the last chunk) has no bound in
        httptools, and uvicorn appends each trailer field to the request's header list: a client sending
        trailers for the body deadline grew the server's memory by gigabytes (2.4 GB in 8 s from one
        connection), never counted against the body limit. Counted here as they are read (`n` bytes, a
        read after the last chunk's header), answered 431 past max_header_bytes, as the header section is
        (within one read of the limit: the read that holds the last chunk's header is not counted)."""
        self.trailer_bytes += n
        limit = self.guard.max_header_bytes
        if self.trailer_bytes <= limit or self.transport.is_closing():
            return
        self._disarm()
        self.guard.count_request_refused("headers_too_large")
        msg = f"the request's trailer fields are larger than {limit} bytes (max_header_bytes)"
        rid = new_request_id()  # (below the app: one DEBUG line, as the header section's refusal)
        log.debug("request refused: trailers too large (%s)", msg, extra={"request_id": rid})
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self.transport.write(error_response(431, msg, request_id=rid))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its sends are dropped
            cycle.message_event.set()
        self.transport.close()

    def on_chunk_header(self) -> None:  # (httptools: a chunk's size line, the last chunk's too)
        self.chunk_data = False

    def on_body(self, body: bytes) -> None:
        self.chunk_data = True
        super().on_body(body)

    def on_message_begin(self) -> None:
        self.partial_request = not self.pipeline_full  # (a dropped request's: no deadline for it)
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.partial_request, self.header_bytes, self.header_tail = False, 0, b""
        self.chunk_data, self.trailer_bytes = True, 0
        self.in_body = True
        queued = len(self.pipeline)
        super().on_headers_complete()
        if len(self.pipeline) > queued and (self.pipeline_full or len(self.pipeline) > MAX_PIPELINED):
            self._pipeline_full()
            return
        if self.pipeline and self.pipeline[0][0] is self.cycle:
            self._disarm()  # queued behind a running request: its body is read when its turn comes
        else:
            self._arm(self.guard.body_timeout_s, "body_timeout")

    def _pipeline_full(self) -> None:
        """A request pipelined behind MAX_PIPELINED others waiting on this connection: it, and every
        request after it, is dropped unanswered, and the connection is closed once those before it are
        answered (the last of them says `Connection: close`; RFC 9112 9.3.2: a client retries the requests
        a closed connection left unanswered). uvicorn parsed every pipelined request a read held and queued
        each (a scope and a task-to-be, ~2.3 KB), and read again after each answer: a client that sent
        requests faster than they were answered grew the server's memory without bound (one connection:
        14 MB of `GET /healthz` sent in 6 s held 684 MB, unauthenticated)."""
        self.pipeline.popleft()  # (the newest: uvicorn queues on the left and starts from the right)
        self.partial_request = False
        self._disarm()  # (the connection closes after the answers, which no deadline may cut)
        if not self.pipeline_full:  # (the first dropped; the others in the same read follow it)
            self.pipeline_full = True
            self.pipeline[0][0].keep_alive = False
            self.guard.count_closed("pipeline_full")

    def on_message_complete(self) -> None:
        if self.pipeline_full:  # (a dropped request's end)
            return
        self.in_body = False
        self._disarm()
        super().on_message_complete()
        upgrading = self.parser.should_upgrade() and self._should_upgrade()
        if self.cycle is not None and not self._in_progress() and not upgrading and not self.pipeline \
                and self.timeout_keep_alive_task is None:  # fmt: skip
            # answered before its body was in (the body's bytes stopped uvicorn's keep-alive timer)
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        starting = self.pipeline[-1][0] if self.pipeline else None
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if starting is not None:  # uvicorn started the pipelined request: now its body is awaited
            if starting.more_body:
                self._arm(self.guard.body_timeout_s, "body_timeout")
        elif self.partial_request and self.deadline is None:  # the next request began meanwhile
            self._unset_keepalive_if_required()
            self._arm(self.guard.header_timeout_s, "header_timeout")

    def handle_websocket_upgrade(self) -> None:
        if self.pipeline_full:  # (one of the requests dropped: `_pipeline_full`)
            return
        self._disarm()  # the WebSocket protocol takes the connection over, with its own deadlines:
        self._unset_keepalive_if_required()  # no timer of this protocol may close it after
        self.transport = self.raw_transport  # (and the transport itself: no lingering close)
        super().handle_websocket_upgrade()

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.guard.count_closed("keep_alive_timeout")
        super().timeout_keep_alive_handler()

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self, reason: str) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        self.hard_close = True  # a slow client: its connection is not kept open to linger
        self.guard.count_closed(reason)
        cycle = self.cycle
        if reason == "header_timeout":
            idle = cycle is None or cycle.response_complete  # no response of ours is being written
            if idle and self.partial_request:
                self.transport.write(error_response(408, "the request headers did not arrive in time"))
        elif cycle is None or not cycle.response_started:
            self.transport.write(error_response(408, "the request body did not arrive in time"))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() gets http.disconnect; its sends are dropped
            cycle.message_event.set()
        self.transport.close()


class CountingTransport:
    """A WebSocket's transport, its writes counted (`written`, bytes): what the keepalive needs to tell a
    client that is behind from one that is gone (`GuardedWebSocketProtocol.taken`). Every close of it
    (uvicorn's and this module's) goes to `send_deadline.closed`. The rest is the transport's."""

    def __init__(self, transport: asyncio.Transport, send_deadline: SendDeadline) -> None:
        self._transport, self.written, self._send_deadline = transport, 0, send_deadline

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def write(self, data) -> None:
        self.written += len(data)
        self._transport.write(data)

    def close(self) -> None:
        self._transport.close()
        self._send_deadline.closed(self._transport)


def bytes_taken(written: int, transport) -> int:
    """Of `written` bytes written to the transport, those its peer has taken: less those still in the
    transport's buffer and those the kernel has sent without the peer's acknowledgement (`kernel_unacked`:
    Linux SIOCOUTQ; elsewhere taken as acknowledged)."""
    return written - transport.get_write_buffer_size() - kernel_unacked(transport)


def kernel_unacked(transport) -> int:
    """Bytes the kernel holds for the transport's socket that the peer has not acknowledged (Linux's
    SIOCOUTQ: sent or not); 0 where that cannot be read (another OS, a socket gone)."""
    try:
        import fcntl
        import termios

        sock = transport.get_extra_info("socket")
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
    except (ImportError, AttributeError, OSError, ValueError):
        return 0


def last_pong(data: bytes) -> bytes | None:
    """The last frame of `data` when it holds only a server's pong frames (unmasked, FIN, ≤ 125 bytes of
    payload: RFC 6455 5.5), b"" for none, None when it holds anything else."""
    i, last = 0, b""
    while i < len(data):
        if data[i] != 0x8A or i + 1 >= len(data) or data[i + 1] > 125 or i + 2 + data[i + 1] > len(data):
            return None
        last, i = data[i : i + 2 + data[i + 1]], i + 2 + data[i + 1]
    return last


# the closes of a WebSocket whose input cannot be taken, by code: s4_connections_closed_total's reason
PARSER_CLOSES = {1002: "ws_protocol_error", 1007: "ws_invalid_utf8", 1009: "ws_message_too_big"}


class GuardedWebSocketProtocol(SendWatch, WebSocketsSansIOProtocol):
    """uvicorn's websockets (sans-I/O) protocol with a handshake deadline. Messages are bounded by
    uvicorn's `ws_max_size` (fragments and per-message-deflate output included: close 1009)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.deadline: asyncio.TimerHandle | None = None
        self.send_deadline = SendDeadline(self, guard)
        self.held_pong = b""  # the latest ping's answer, while the client reads nothing (handle_ping)

    def handle_ping(self) -> None:
        """Answer the latest ping of a read (RFC 6455, 5.5.3: an endpoint may answer only the most recent
        ping), at once, or while the client reads nothing (the write buffer over its high-water mark:
        asyncio's pause_writing) once it reads again. uvicorn wrote every pong at once, outside flow
        control, so a client that sent pings and never read grew the server's memory without bound (two
        such clients: +840 MB in 30 s, a helper's audit) until the send deadline, if ever."""
        # (a read's pongs all come at its first ping: the others find nothing to send)
        out = b"".join(self.conn.data_to_send())
        last = last_pong(out)
        if last is None:  # not only pongs (a close's answer, say): as uvicorn
            self.transport.write(out)
        elif last and self.writable.is_set():  # the latest ping of the read (5.5.3 too)
            self.transport.write(last)
        elif last:
            self.held_pong = last

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.held_pong and not self.transport.is_closing():
            pong, self.held_pong = self.held_pong, b""
            self.transport.write(pong)

    def taken(self) -> int:
        """Bytes the client has taken of those written to this connection (`bytes_taken`)."""
        return bytes_taken(self.transport.written, self.transport)

    def send_keepalive_ping(self) -> None:
        before = self.transport.written
        super().send_keepalive_ping()
        # (the ping is written behind `before` bytes: the client reads it only after taking them)
        self.ping_behind, self.taken_at_check = before, self.taken()

    def keepalive_timeout(self) -> None:
        """A client that has not answered the server's keepalive ping within `ws_ping_timeout` (its network
        gone, its program stuck) is closed with 1008 (policy) and counted (`s4_connections_closed_total
        {reason="ws_ping_timeout"}`). uvicorn closed it with 1011, the code of a server fault, and counted
        it nowhere. A client still taking what was sent before the ping (a slow link, a player that reads
        at real time behind a stream generated faster) has not seen the ping yet: it gets another
        `ws_ping_timeout` as long as it takes more of those bytes, then one more once it has taken them all.
        uvicorn cut such a reader off mid-stream (a client reading 4 KB/s of pcm16 audio: closed at 85 s,
        21 s of its 30 s read), against "a slow reader loses nothing"; one that takes nothing is judged as
        before (and, with a full buffer, by S4_SEND_TIMEOUT_S too)."""
        self.pong_timer = None
        if self.close_sent or self.transport.is_closing():
            self.pending_ping_payload = None
            return
        taken = self.taken()
        if self.taken_at_check < self.ping_behind and taken > self.taken_at_check:
            self.taken_at_check = taken
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        self.pending_ping_payload = None
        self.guard.count_closed("ws_ping_timeout")
        self.conn.fail(1008, f"keepalive ping timeout: no pong within {self.ping_timeout:g} s")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.gone()  # (the app's next send: ClientDisconnected, not uvicorn's RuntimeError: `gone`)
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(CountingTransport(transport, self.send_deadline))
        self.ping_behind = self.taken_at_check = 0  # (send_keepalive_ping)
        self.client_key = client_key(self.client)  # (counted at the accept, by the HTTP protocol)
        self.deadline = self.loop.call_later(self.guard.ws_handshake_timeout_s, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.send_deadline.stop()
        super().connection_lost(exc)

    def send_receive_event_to_app(self) -> None:
        """A text message that is not UTF-8 closes the socket with 1007 (RFC 6455, 8.1), as uvicorn does,
        but uvicorn logs it as an ERROR with a traceback (logger.exception), one per connection: a client
        could fill the logs with them. Here it is one DEBUG line and `s4_connections_closed_total{reason=
        "ws_invalid_utf8"}`. (The check decodes the message once more; messages are ≤ ws_max_size.)"""
        if self.curr_msg_data_type == "text" and not self.close_sent:
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError as exc:
                self.frames = []
                if self.conn.state is not State.OPEN:  # the client's close came in the same read: it is
                    return  # answered by the close event next (a close now raised InvalidState, an ERROR)
                self.conn.send_close(1007, f"invalid UTF-8 in a text message: {exc.reason}")
                self.handle_parser_exception()  # (counts it, and logs the one DEBUG line)
                return
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        """uvicorn's close for a message the socket cannot take, counted in `s4_connections_closed_total`
        by its code (`PARSER_CLOSES`): a message over ws_max_size (1009: it was counted nowhere, though
        an HTTP body too large is), a frame that breaks the protocol (1002), a text message or a close
        reason that is not UTF-8 (1007)."""
        sent = self.conn.close_sent
        if sent is not None and (reason := PARSER_CLOSES.get(sent.code)) is not None:
            self.guard.count_closed(reason)
        super().handle_parser_exception()
        self.gone()  # (as at a ping timeout: `gone`)

    async def send(self, message) -> None:  # type: ignore[override]
        """uvicorn's send; a denial response (the API key check's HTTP 401) ends the handshake. uvicorn
        does not mark it ended, so each refused handshake logged "ASGI callable returned without
        completing handshake." as an ERROR: a client without a key could fill the logs with them."""
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def eof_received(self) -> None:
        self.gone()
        super().eof_received()

    def gone(self) -> None:
        """The client is gone (`GuardedHttpProtocol.gone`), or this protocol has closed the socket itself (a
        ping timeout, a message it cannot take, the handshake deadline): the app's next send raises
        ClientDisconnected, which ends its handler quietly, instead of going to a closing transport. (After
        such a close uvicorn raised RuntimeError, "Unexpected ASGI message 'websocket.send', after sending
        'websocket.close'", an ERROR traceback, for a reply the app sent while a client that reads nothing
        kept the connection from being lost.)"""
        self.disconnected = True

    def _expired(self) -> None:
        self.deadline = None
        if self.handshake_complete or self.transport.is_closing():
            return
        self.guard.count_closed("ws_handshake_timeout")
        if self.handshake_initiated and self.initial_response is None:
            self.conn.send_response(self.conn.reject(503, "the WebSocket was not accepted in time\n"))
            self.transport.write(b"".join(self.conn.data_to_send()))
        self.handshake_complete = True  # whatever the app sends now is not written
        self.close_sent = True
        # and the connection is gone for the app at once, not only once connection_lost has run (the next
        # loop iteration): its late accept (or refusal) raises ClientDisconnected, which ends its handler
        # quietly, as for a client that left; it was an ERROR traceback per connection ("Unexpected ASGI
        # message 'websocket.accept', after sending 'websocket.close'")
        self.gone()
        self.transport.close()


MAX_PIPELINED = 32  # requests waiting on one connection behind the one being answered (`_pipeline_full`)


FD_MARGIN = 64  # descriptors besides client connections: the listening socket, files, Redis, threads


def raise_fd_limit(max_connections: int) -> None:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) to what `max_connections` needs,
    as far as the hard limit allows; warn when that is not enough (accept() would then fail with
    EMFILE before the cap is reached)."""
    import resource

    need = max_connections + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < need:
        log.warning("max_connections=%d needs %d open files, but `ulimit -n` allows %d: lower "
                    "S4_MAX_CONNECTIONS or raise the limit", max_connections, need, new)  # fmt: skip


UVICORN_INVALID_HTTP = "Invalid HTTP request received."  # uvicorn's WARNING before send_400_response
UVICORN_UPGRADE = "Unsupported upgrade request."  # uvicorn's WARNING for `Upgrade: h2c` (curl --http2) …


class _DropClientWarnings(logging.Filter):
    """uvicorn logs a WARNING for every request it cannot parse (UVICORN_INVALID_HTTP, before it calls
    `send_400_response`, which counts it: `GuardedHttpProtocol.send_400_response`) and for every request
    asking to upgrade to anything but a WebSocket (UVICORN_UPGRADE: `curl --http2` on http:// sends
    `Upgrade: h2c`; the request is then served over HTTP/1.1, as RFC 9110 7.8 allows). Either is a
    client's doing, one line each, so a client could fill the logs: both are dropped (the first is
    counted; the second is no fault)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in (UVICORN_INVALID_HTTP, UVICORN_UPGRADE)


CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "cookie"})
WS_HEADER_LINE = "< %s: %s"  # websockets' DEBUG line for each header of a handshake it reads
WS_REQUEST_LINE = "< %s %s %s"  # … and for its request line (method, path with the query, protocol)
REDACTED = "[redacted]"
WS_REFUSED_PREFIX = "! "  # … for a handshake it refuses ("! invalid handshake"), with the traceback
KEY_SUBPROTOCOL = re.compile(re.escape(KEY_SUBPROTOCOL_PREFIX) + r"[^\s,;]*")  # in an exception's text


def _redact_key_subprotocols(value: str) -> str:
    return ", ".join(
        KEY_SUBPROTOCOL_PREFIX + REDACTED if p.strip().startswith(KEY_SUBPROTOCOL_PREFIX) else p.strip()
        for p in value.split(",")
    )


WS_FRAME_LINES = ("< %s", "> %s")  # websockets' DEBUG line for each frame it reads or writes
DATA_OPCODES = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})


class _RedactCredentials(logging.Filter):
    """At S4_LOG_LEVEL=debug the websockets library logs every header of every WebSocket handshake, one
    line each (`< authorization: Bearer KEY`): the API keys in the clear, and in the key subprotocol
    (`s4.key.<base64url(KEY)>`) barely hidden. Those values are logged as `[redacted]`; the header's
    name, and every other header, as before. It also logs every frame, its payload's first and last
    characters (`< TEXT '{"type": "generate", "prompt": "my secret…' [99 bytes]`): a client's prompt, the
    text generated for it, audio samples. A data frame is logged by its kind and length only (`< TEXT
    [redacted, 99 bytes]`); control frames (close, ping, pong) as before. Its request line quoted the
    query (`< GET /v1/stream?api_key=KEY HTTP/1.1`): logged through `redact_query`, as uvicorn's own
    handshake line is; and a handshake it refuses is logged with the exception's traceback, whose text
    quotes the header (a padded key subprotocol, `s4.key.…=`, is no token: `invalid Sec-WebSocket-Protocol
    header: … in s4, s4.key.<base64url(KEY)>=`): a traceback naming a key subprotocol is logged with
    the key as `[redacted]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        refused = isinstance(record.msg, str) and record.msg.startswith(WS_REFUSED_PREFIX)
        if refused and record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if KEY_SUBPROTOCOL_PREFIX in text:  # (the formatters print exc_text when exc_info is gone)
                record.exc_info, record.exc_text = (
                    None,
                    KEY_SUBPROTOCOL.sub(KEY_SUBPROTOCOL_PREFIX + REDACTED, text),
                )
        args = record.args
        if record.msg == WS_REQUEST_LINE and isinstance(args, tuple) and len(args) == 3:
            record.args = (args[0], redact_query(str(args[1])), args[2])
        if record.msg in WS_FRAME_LINES and isinstance(args, tuple) and len(args) == 1:
            frame = args[0]
            if isinstance(frame, Frame) and frame.opcode in DATA_OPCODES:
                record.args = (f"{frame.opcode.name} [redacted, {len(frame.data)} bytes]",)
        elif record.msg == WS_HEADER_LINE and isinstance(args, tuple) and len(args) == 2:
            name, value = str(args[0]), str(args[1])
            if name.lower() in CREDENTIAL_HEADERS:
                record.args = (name, REDACTED)
            elif name.lower() == "sec-websocket-protocol" and KEY_SUBPROTOCOL_PREFIX in value:
                record.args = (name, _redact_key_subprotocols(value))
        return True


def lift_handshake_header_limits() -> None:
    """One limit on a WebSocket handshake's request line and headers: S4_MAX_HEADER_BYTES, as on every
    request. The websockets library parses the handshake again after httptools, with limits of its own
    (8,192 bytes a line, 128 headers: its WEBSOCKETS_MAX_LINE_LENGTH and WEBSOCKETS_MAX_NUM_HEADERS, read
    once, when it is imported), so a handshake within S4_MAX_HEADER_BYTES but with a 9 KB cookie or 130
    headers, which every HTTP route takes, got the library's plain-text 431 (no X-Request-ID, counted
    nowhere). The guard counts the request against max_header_bytes before the upgrade
    (`GuardedHttpProtocol`), so the library's limits are lifted past any setting (`MAX_BYTES`)."""
    http11.MAX_LINE_LENGTH = max(http11.MAX_LINE_LENGTH, MAX_BYTES)
    http11.MAX_NUM_HEADERS = max(http11.MAX_NUM_HEADERS, MAX_BYTES)


def uvicorn_config(app, settings, metrics=None, **kwargs) -> uvicorn.Config:
    """The uvicorn Config that serves `app` with `settings`' connection limits (what `python -m server`
    and the tests' server thread run); `metrics` (server.metrics.Metrics) counts closes and refusals."""
    guard = ConnectionGuard(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        ws_handshake_timeout_s=settings.ws_handshake_timeout_s,
        send_timeout_s=settings.send_timeout_s,
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
        max_connections_per_client=settings.max_connections_per_client,
        closed=metrics.connections_closed if metrics is not None else None,
        refused=metrics.connections_refused if metrics is not None else None,
        requests_refused=metrics.requests_refused if metrics is not None else None,
    )
    if metrics is not None:
        metrics.connections_open.set_function(lambda: len(guard.connections))
    lift_handshake_header_limits()
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropClientWarnings) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_DropClientWarnings())
    if not any(isinstance(f, _RedactCredentials) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_RedactCredentials())
    for logger in (uvicorn_log, logging.getLogger("uvicorn.access")):
        if not any(isinstance(f, RedactQueries) for f in logger.filters):
            logger.addFilter(RedactQueries())
    return uvicorn.Config(
        app,
        http=functools.partial(GuardedHttpProtocol, guard=guard),
        ws=functools.partial(GuardedWebSocketProtocol, guard=guard),
        ws_max_size=settings.ws_max_frame_bytes,
        ws_per_message_deflate=settings.ws_compression,
        ws_ping_interval=WS_PING_INTERVAL_S,
        ws_ping_timeout=WS_PING_TIMEOUT_S,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        **kwargs,
    )
