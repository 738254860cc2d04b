"""Log lines: text (default) or one JSON object a line (S4_LOG_FORMAT=json, python-json-logger), each
with the id of the HTTP request it belongs to (X-Request-ID: the client's when well-formed, else a new
one, on every response: asgi-correlation-id) and of its generation (gen-…, cmpl-…) where there is one.
Probes (/healthz, /readyz) and /metrics scrapes are logged at DEBUG, not INFO: every few seconds from
each orchestrator and scraper, they buried the requests."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from datetime import datetime

from asgi_correlation_id import CorrelationIdMiddleware, correlation_id
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a client's id echoed as is (uuids, trace ids, gen-…)
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")  # their access lines at DEBUG
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(generation_id)s"

generation_id: ContextVar[str | None] = ContextVar("generation_id", default=None)


refusals = logging.getLogger("server.refused")
access = logging.getLogger("server")  # (app.log_client_gone's logger)
LOGGED_CHARS = 500  # of a refusal's message in its log line (pydantic's may quote a whole field)


def clipped(message: str) -> str:
    """`message` as a log line quotes it: its first LOGGED_CHARS characters, then its length."""
    if len(message) <= LOGGED_CHARS:
        return message
    return f"{message[:LOGGED_CHARS]}… ({len(message):,} characters)"


def log_refusal(err) -> None:
    """One INFO line for a request the app refused, saying why (`refused 422: temperature: …`), in the
    request's context (its request id): the access line says only the status. The message is the
    answer's own: it names a field, not its value (never a key; of a prompt, at most the characters a
    model's vocabulary lacks), and quotes a client's id clipped (errors.quoted). `err`: the APIError as
    answered (errors.answered: on the OpenAI routes with OpenAI's status), so that the line's status is
    the access line's."""
    refusals.info("refused %d: %s", err.status, clipped(err.message))


class StreamEnds:
    """ASGI middleware: one INFO line for a streamed answer (SSE) whose client left before its end,
    `127.0.0.1:55830 - "POST /v1/completions" 200 client closed the connection before the stream's end
    (1,234 bytes sent)`. uvicorn's access line is written when the answer starts, so it says 200
    whatever happens after, and such a request was otherwise logged nowhere (a plain answer's client
    gone has its 499 line: app.log_client_gone). The client is known gone when the app's `receive`
    says `http.disconnect` (Starlette's StreamingResponse listens for it; the SSE routes ask it after
    each send) or a send raises OSError (ASGI spec 2.4); an answer whose last body was sent before
    that is whole; one that started after it went to nobody (its 499 has its own line). Logged in the
    request's context (its request id, and its generation id)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status: int | None = None
        sent, whole, gone = 0, False, False

        async def watched_receive():
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        async def watched_send(message) -> None:
            nonlocal status, sent, whole, gone
            if message["type"] == "http.response.start" and not gone:  # (else no answer reached it)
                status = message["status"]
            elif message["type"] == "http.response.body" and not gone:
                sent += len(message.get("body", b""))
                whole = not message.get("more_body", False)
            try:
                await send(message)
            except OSError:
                gone = True
                raise

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if gone and status is not None and not whole:
                client = scope.get("client")
                who = f"{client[0]}:{client[1]}" if client else "-"
                access.info(
                    '%s - "%s %s" %d client closed the connection before the stream\'s end (%s bytes sent)',
                    who, scope["method"], scope["path"], status, f"{sent:,}",
                )  # fmt: skip


streams = logging.getLogger("server.sse")


def log_stream_error(status: int, message: str) -> None:
    """One INFO line for an SSE stream ended by an error event (an engine failure, the end of a drain):
    `error event 503: …`, in the request's context, as a WebSocket's error frame has its line. The
    stream's access line, written when it started, says 200."""
    streams.info("error event %d: %s", status, clipped(message))


def well_formed_request_id(value: str) -> bool:
    return REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


WS_RESPONSES = ("websocket.accept", "websocket.http.response.start")  # a handshake's 101, or its refusal


class RequestIdMiddleware(CorrelationIdMiddleware):
    """asgi-correlation-id's middleware, which adds X-Request-ID to `http.response.start` only, with the
    id on a WebSocket handshake's responses too: its 101 (`websocket.accept`) and its refusal before
    the accept (`websocket.http.response.start`: a bad key's 401, a foreign origin's 403, an unknown
    path's 404; `errors.refuse`)."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "websocket":
            return await super().__call__(scope, receive, send)

        async def with_id(message) -> None:
            rid = correlation_id.get()
            if message["type"] in WS_RESPONSES and rid:
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        await super().__call__(scope, receive, with_id)


def add_request_ids(app) -> None:
    """X-Request-ID on every HTTP response and WebSocket handshake response, in the log lines of its
    request. Around the app's whole middleware stack, Starlette's ServerErrorMiddleware included (which
    it always puts outermost): responses refused by the other middleware carry it, and so does the 500
    of an error no handler expected, whose traceback line (uvicorn's) names it (add_middleware put it
    inside that one: the 500 had no id)."""
    build = app.build_middleware_stack

    def with_request_ids():
        return RequestIdMiddleware(
            build(), header_name=REQUEST_ID_HEADER, generator=new_request_id, validator=well_formed_request_id
        )

    app.build_middleware_stack = with_request_ids


# a session id (server/sessions.py new_session_id: "sess-" + 32 hex digits, 128 random bits) is a
# capability: whoever holds it reaches the session (its state, export, delete). A log line keeps its first 8
# hex digits (32 bits: enough to find a client's session in the log) and drops the rest.
SESSION_ID = re.compile(r"(sess-[0-9a-f]{8})[0-9a-f]{24}(?![0-9a-f])")


def redact_session_ids(text: str) -> str:
    """`text` with every session id shortened to `sess-` + its first 8 hex digits + `...`."""
    return SESSION_ID.sub(r"\1...", text)


class RequestIds(logging.Filter):
    """Puts the current request's id and generation id (None outside a request) on every record; a
    record logged outside a request with its own `request_id` (`extra`: a refusal written below the app,
    server/connections.py) keeps it. Session ids in the message (ours, and uvicorn's access lines' paths)
    are shortened (`redact_session_ids`): a log read by more people than the clients must not hand out
    their sessions."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = correlation_id.get() or getattr(record, "request_id", None)
        record.generation_id = generation_id.get()
        message = record.getMessage()
        if "sess-" in message:
            record.msg, record.args = redact_session_ids(message), ()
        return True


# the query parameters the API reads (POST /v1/sessions/import?model=ID); any other's value is left out of
# a logged path: the server reads no key from a query string, but a client may send one there (?api_key=)
LOGGED_QUERY_PARAMS = frozenset({"model"})


QUERY_SEPARATORS = re.compile("([&;])")  # `;` too: HTML 4's, which older clients send (Starlette reads `&`)


def redact_query(path: str) -> str:
    """`path` with the value of each query parameter but `LOGGED_QUERY_PARAMS` as `[redacted]` (a
    parameter without a value is redacted whole: it may be a bare key). Items are split at `&` and at
    `;`: a `model=x;api_key=…` was one item named `model`, logged whole with the key in it."""
    head, sep, query = path.partition("?")
    if not sep:
        return path
    out = []
    for i, item in enumerate(QUERY_SEPARATORS.split(query)):
        if i % 2:  # (a separator, kept as sent)
            out.append(item)
            continue
        name, eq, _ = item.partition("=")
        out.append(item if name in LOGGED_QUERY_PARAMS else f"{name}=[redacted]" if eq else "[redacted]")
    return f"{head}?{''.join(out)}"


WS_REQUEST_LINE = '%s - "WebSocket %s"'  # how uvicorn's WebSocket lines begin ([accepted], or a status)


class RedactQueries(logging.Filter):
    """uvicorn's access lines and WebSocket handshake lines quote a request's path with its query string:
    a key a client sent as `?api_key=…` (refused: keys are read from headers only) was written to the log
    as is. Those paths are logged through `redact_query`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        if record.name == "uvicorn.access" and len(args) == 5:
            at = 2
        elif isinstance(record.msg, str) and record.msg.startswith(WS_REQUEST_LINE) and len(args) >= 2:
            at = 1
        else:
            return True
        if "?" in str(args[at]):
            record.args = (*args[:at], redact_query(str(args[at])), *args[at + 1 :])
        return True


# line breaks and other control characters (C0 but tab, DEL, C1, U+2028/9), escaped in a text log line
CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """`text` with each control character as its Python escape (a newline as the two characters \\n)."""
    return CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request_id generation_id]: message`; the brackets only inside a request. The
    message is one line whatever it holds: a client's string in it (a session id while the store was
    down, a header) had written a forged line of its own into the log (a helper's audit); a traceback
    still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        ids = [i for i in (getattr(record, "request_id", None), getattr(record, "generation_id", None)) if i]
        record.ids = f" [{' '.join(ids)}]" if ids else ""
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class QuietProbes(logging.Filter):
    """uvicorn's access lines of QUIET_PATHS at DEBUG (dropped unless the access logger logs DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and str(args[2]).partition("?")[0] in QUIET_PATHS:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


class JsonLines(JsonFormatter):
    """One JSON object per line; its `time` in RFC 3339 with the UTC offset and milliseconds
    (`2026-12-07T03:04:38.916+00:00`), which log shippers (Loki, Elasticsearch, Datadog) read as is:
    logging's default (`2026-12-07 03:04:38,916`) has no offset and a comma."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


def configure_logging(level: str, fmt: str) -> None:
    """The root logger's one handler (stderr) at `level`, in `fmt` ("text" or "json"), with the ids."""
    handler = logging.StreamHandler()
    if fmt == "json":
        rename = {"asctime": "time", "levelname": "level", "name": "logger"}
        # uvicorn's records carry `color_message` (its message with ANSI colours): not a field of ours
        skip = [*RESERVED_ATTRS, "color_message"]
        handler.setFormatter(JsonLines(JSON_FIELDS, rename_fields=rename, reserved_attrs=skip))
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    handler.addFilter(RequestIds())
    logging.basicConfig(level=level.upper(), handlers=[handler])  # no-op where the root has handlers (pytest)
    logging.getLogger("uvicorn.access").addFilter(QuietProbes())
    # a malformed X-Request-ID is replaced with a new id; a warning for each would let a client fill the log
    logging.getLogger("asgi_correlation_id").setLevel(logging.ERROR)
