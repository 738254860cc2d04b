"""The request body size limit (`S4_MAX_BODY_BYTES`): a pure ASGI middleware in front of every route.

It works on the ASGI messages, before anything parses the body (a `BaseHTTPMiddleware` would read
the whole body first):

- a declared `Content-Length` over the limit is answered 413 at once, before a byte of the body is
  read;
- a body without one (`Transfer-Encoding: chunked`) is counted as uvicorn hands it over (64 KiB at a
  time at most: uvicorn stops reading the socket beyond that until the app asks for more) and
  answered 413 as soon as the count passes the limit.

Either way the response says `Connection: close` and uvicorn closes the connection after it, so the
rest of the body is never read. The app sees the refusal as a `BodyTooLarge` raised by `receive()`
(an HTTPException: FastAPI re-raises it); whatever it sends after is dropped, since the 413 went out.
Refusals are counted by `on_refused` (`s4_requests_refused_total{reason="body_too_large"}`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.exceptions import HTTPException

from server.errors import error_body, too_large


class BodyTooLarge(HTTPException):
    """Raised from `receive()` once the body is over the limit (the 413 has been sent by then)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes (max_body_bytes)")


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


def _response(limit: int, length: int | None, path: str) -> tuple[dict, dict]:
    got = f"{length} bytes" if length is not None else f"more than {limit} bytes"
    err = too_large(f"the request body is {got}; the limit is {limit} bytes (max_body_bytes)")
    body = json.dumps(error_body(err, path)[1]).encode()  # OpenAI's shape on the OpenAI routes
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return (
        {"type": "http.response.start", "status": 413, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class BodySizeLimit:
    """ASGI middleware: HTTP request bodies of at most `limit_for(scope)` bytes (413 otherwise)."""

    def __init__(self, app, limit_for: Callable[[dict], int], on_refused: Callable[[], None] | None = None):
        self.app, self.limit_for, self.on_refused = app, limit_for, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length = declared_length(scope)
        if length is not None and length > limit:
            await self._refuse(send, limit, length, scope)
            return
        received = 0
        started = refused = False

        async def receive_counted():
            nonlocal received, refused
            if refused:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await self._refuse(send, limit, None, scope)
                    raise BodyTooLarge(limit)
            return message

        async def send_unless_refused(message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out instead
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive_counted, send_unless_refused)
        except BodyTooLarge:
            if not refused:
                raise

    async def _refuse(self, send, limit: int, length: int | None, scope: dict) -> None:
        if self.on_refused is not None:
            self.on_refused()
        start, body = _response(limit, length, scope.get("path", ""))
        await send(start)
        await send(body)
