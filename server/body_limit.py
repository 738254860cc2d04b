"""The request body size limit (`S4_MAX_BODY_BYTES`): a pure ASGI middleware in front of every route.

It works on the ASGI messages, before anything parses the body (a `BaseHTTPMiddleware` would read
the whole body first):

- a declared `Content-Length` over the limit is answered 413 at once, before a byte of the body is
  read;
- a body without one (`Transfer-Encoding: chunked`) is counted as uvicorn hands it over (64 KiB at a
  time at most: uvicorn stops reading the socket beyond that until the app asks for more) and
  answered 413 as soon as the count passes the limit.

A JSON body is also counted by its structure as it arrives (server/json_budget.py: separators,
containers, object members and floats outside strings) and answered 413 as soon as it holds more of a
kind than a valid request to its route (`budget_for`), since parsing it would hold the GIL, and pause
every stream, for as long as its count says.

A JSON body must be UTF-8 (RFC 8259 §8.1). Python's json, which FastAPI parses bodies with, also reads
UTF-16 and UTF-32 (by a BOM or by NUL bytes among the first four: `json.detect_encoding`), and the
structure count, which reads bytes as UTF-8, does not hold for them (in UTF-16 "∀" is the bytes 0x00 0x22,
and 0x22 is '"': nothing after it would be counted). So a JSON body whose first four bytes say another
encoding is answered 400 `malformed JSON: ... not UTF-8` once they have arrived, before anything parses it.

Either way the response says `Connection: close` and uvicorn closes the connection after it, so the
rest of the body is never read. The app sees the refusal as a `BodyRefused` raised by `receive()`
(an HTTPException: FastAPI re-raises it); whatever it sends after is dropped, since the refusal went out.
Refusals are counted by `on_refused(reason)` (`s4_requests_refused_total{reason="body_too_large"}`,
`{reason="json_structure"}`).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.exceptions import HTTPException

from server.errors import APIError, answered, error_body, json_bytes, malformed_json, too_large
from server.json_budget import JSONBudget, StructureCounter, not_utf8, over_budget_message
from server.logs import log_refusal


class BodyRefused(HTTPException):
    """Raised from `receive()` once the body is refused: over a limit (413), or a JSON body that is not
    UTF-8 (400); the response has been sent by then."""

    def __init__(self, message: str, status: int = 413) -> None:
        super().__init__(status, message)


def declared_length(scope: dict) -> int | None:
    """The request's Content-Length (None when absent or not a number: the HTTP parser has refused a
    malformed one before the app is called)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def size_message(limit: int, length: int | None) -> str:
    got = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    return f"the request body is {got}; the limit is {limit} bytes (max_body_bytes)"


def _response(err: APIError, path: str) -> tuple[dict, dict]:
    body = json_bytes(error_body(err, path)[1])  # OpenAI's shape on the OpenAI routes
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return (
        {"type": "http.response.start", "status": err.status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class BodySizeLimit:
    """ASGI middleware: HTTP request bodies of at most `limit_for(scope)` bytes, and JSON bodies within
    `budget_for(scope)` (json_budget.route_budget's pair, or None: not counted); 413 otherwise. A counted
    body that is not UTF-8 is a 400."""

    def __init__(
        self,
        app,
        limit_for: Callable[[dict], int],
        budget_for: Callable[[dict], tuple[JSONBudget, str | None] | None] = lambda scope: None,
        on_refused: Callable[[str], None] | None = None,
    ):
        self.app, self.limit_for, self.budget_for, self.on_refused = app, limit_for, budget_for, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length = declared_length(scope)
        if length is not None and length > limit:
            await self._refuse(send, too_large(size_message(limit, length)), "body_too_large", scope)
            return
        budget = self.budget_for(scope)
        counter = StructureCounter(budget[0]) if budget is not None else None
        received = 0
        head = b""  # a counted body's first 4 bytes: its encoding (json_budget.not_utf8)
        started = False
        refused: APIError | None = None  # the refusal, once sent

        async def receive_counted():
            nonlocal received, refused, head
            if refused is not None:
                raise BodyRefused(refused.message, refused.status)
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                reason = None  # (a body that is not UTF-8 is malformed, not refused for size: not counted)
                if counter is not None and len(head) < 4:
                    head += chunk[: 4 - len(head)]
                    if (len(head) == 4 or not message.get("more_body", False)) and (enc := not_utf8(head)):
                        refused = malformed_json(
                            f"the body is {enc.upper()}, not UTF-8 (a JSON body must be UTF-8: RFC 8259 8.1)"
                        )
                if refused is None and received > limit:
                    reason, refused = "body_too_large", too_large(size_message(limit, None))
                elif refused is None and counter is not None and (kind := counter.feed(chunk)) is not None:
                    reason = "json_structure"
                    refused = too_large(over_budget_message(kind, budget[0], budget[1]))
                if refused is not None:
                    if not started:
                        await self._refuse(send, refused, reason, scope)
                    raise BodyRefused(refused.message, refused.status)
            return message

        async def send_unless_refused(message) -> None:
            nonlocal started
            if refused is not None:
                return  # the refusal went out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_counted, send_unless_refused)
        except BodyRefused:
            if refused is None:
                raise

    async def _refuse(self, send, err: APIError, reason: str | None, scope: dict) -> None:
        if self.on_refused is not None and reason is not None:
            self.on_refused(reason)
        log_refusal(answered(err, scope.get("path", "")))
        start, body = _response(err, scope.get("path", ""))
        await send(start)
        await send(body)
