"""API errors: one exception type carrying the HTTP status, rendered as `{"error": {...}}` by the app
and as `{"type": "error", "code", "message"}` frames on the WebSocket.

Two shapes over HTTP. Our own routes: `{"error": {"code": <the status, an int>, "type": <the status's
phrase, snake_case>, "message", "param"}}`. The OpenAI-compatible routes (`is_openai_path`): OpenAI's
error object, `{"error": {"message", "type", "param", "code"}}` with OpenAI's types
(invalid_request_error, requests, server_error) and a string or null `code` (`APIError.openai_body`),
so the openai client raises the class it raises for OpenAI's own answers (BadRequestError,
AuthenticationError, NotFoundError, RateLimitError, ...)."""

from __future__ import annotations

import json
import sys
from http import HTTPStatus

from server.logs import log_refusal


class APIError(Exception):
    """A request the server refuses: status (HTTP code), message, the offending field if any."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
        openai_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after
        self.kind = kind  # the body's `type`, where it is not the status's phrase
        self.openai_code = openai_code  # OpenAI's `code` (a string), where `openai_body` cannot tell it

    @property
    def type(self) -> str:
        if self.kind is not None:
            return self.kind
        try:
            phrase = HTTPStatus(self.status).phrase
        except ValueError:  # 499: the client went away (nginx's code)
            phrase = "client closed request"
        return phrase.lower().replace(" ", "_").replace("-", "_")

    def body(self) -> dict:
        return {
            "error": {"code": self.status, "type": self.type, "message": self.message, "param": self.param}
        }

    def openai_body(self) -> dict:
        """The error as OpenAI's API writes it: `{"error": {"message", "type", "param", "code"}}`.
        `type`: "requests" for a 429 (OpenAI's rate limit on requests), "server_error" for a 5xx,
        else "invalid_request_error". `code`: a string or null, never the status: "invalid_api_key"
        (401), "model_not_found" (404 naming `model`), "rate_limit_exceeded" (429), or the error's own
        `openai_code`; null otherwise, as OpenAI's answers to a malformed or out-of-range field."""
        if self.status == 429:
            kind = "requests"
        elif self.status >= 500:
            kind = "server_error"
        else:
            kind = "invalid_request_error"
        code = self.openai_code
        if code is None:
            if self.status == 404 and self.param == "model":
                code = "model_not_found"
            else:
                code = OPENAI_CODES.get(self.status)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": code}}

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, round(self.retry_after)))}

    def frame(self) -> dict:
        out = {"type": "error", "code": self.status, "message": self.message}
        if self.param is not None:
            out["param"] = self.param
        if self.retry_after is not None:  # the WebSocket's Retry-After
            out["retry_after"] = max(1, round(self.retry_after))
        return out


OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}  # OpenAI's `code` by status

# errors as OpenAI's API gives them (and vLLM's /tokenize and /detokenize, which answer in its shape)
OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize")


# the top-level resources of OpenAI's API (/v1/<resource>...): a path under one that this server does not
# serve (/v1/embeddings, /v1/audio/speech) is answered as OpenAI answers an unknown URL (`unknown_openai_url`)
OPENAI_RESOURCES = frozenset({
    "assistants", "audio", "batches", "chat", "completions", "containers", "conversations", "edits",
    "embeddings", "engines", "evals", "files", "fine-tunes", "fine_tuning", "images", "models", "moderations",
    "organization", "realtime", "responses", "threads", "uploads", "vector_stores", "videos",
})  # fmt: skip
OPENAI_SERVED = "POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /v1/models/{model}"


def is_openai_path(path: str) -> bool:
    """Whether a request path is one of the OpenAI-compatible routes (`OPENAI_ROUTES`, and
    /v1/models/{id}) or any other path of OpenAI's API (`OPENAI_RESOURCES`), whose errors take OpenAI's
    shape (`error_body`)."""
    if path in OPENAI_ROUTES:
        return True
    head, _, rest = path.partition("/v1/")
    return not head and rest.split("/", 1)[0] in OPENAI_RESOURCES


def unknown_openai_url(method: str, path: str) -> APIError:
    """A request for a path of OpenAI's API that this server does not serve: a 404 worded as OpenAI's own
    ("Invalid URL (POST /v1/embeddings)"), saying what this server serves of the API."""
    url = path if len(path) <= 200 else path[:200] + "…"
    served = f"this server serves only {OPENAI_SERVED} of OpenAI's API"
    return APIError(404, f"Invalid URL ({method} {url}): {served}")


def as_openai(err: APIError) -> APIError:
    """The error as OpenAI's API gives it on an OpenAI-compatible route: a request it cannot take is a
    400 of type invalid_request_error there (the openai client raises BadRequestError; vLLM and
    llama.cpp's servers do the same), where our own routes answer 422; so is a prompt over the server's
    limit (`prompt_too_long`: our 413), with OpenAI's code `context_length_exceeded`, the one clients
    look for to shorten a prompt. Other statuses are unchanged."""
    if err.status != 422 and not (err.status == 413 and err.openai_code == CONTEXT_LENGTH_EXCEEDED):
        return err
    return APIError(
        400,
        err.message,
        param=err.param,
        retry_after=err.retry_after,
        kind="invalid_request_error",
        openai_code=err.openai_code,
    )


def json_bytes(payload: dict) -> bytes:
    """A JSON body as the routes' JSONResponse renders one (Starlette's `JSONResponse.render`: compact,
    UTF-8, no NaN), for the answers written below the routes (middlewares, a refused connection)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def answered(err: APIError, path: str) -> APIError:
    """`err` as it is answered on `path`: OpenAI's status on the OpenAI routes (`as_openai`: a 422 there is
    a 400), ours elsewhere; what a refusal's log line says (`logs.log_refusal`), as the access line."""
    return as_openai(err) if is_openai_path(path) else err


def error_body(err: APIError, path: str) -> tuple[int, dict]:
    """(status, JSON body) of `err` answered on `path`: OpenAI's status and shape on the OpenAI routes
    (`as_openai`, `APIError.openai_body`), ours elsewhere (`APIError.body`)."""
    err = answered(err, path)
    return err.status, err.openai_body() if is_openai_path(path) else err.body()


async def refuse(scope: dict, receive, send, err: APIError, headers: tuple = ()) -> None:
    """An ASGI middleware's refusal of a request before any route: `err` as JSON (OpenAI's shape on the
    OpenAI routes: `error_body`) with `headers` added; a WebSocket handshake gets it as an HTTP denial
    response (before accept), or a close 1008 from a server without the denial extension."""
    log_refusal(answered(err, scope.get("path", "")))
    status, payload = error_body(err, scope.get("path", ""))
    body = json_bytes(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": err.message[:120]})


QUOTED_CHARS = 128  # the longest model id (server.config.MODEL_ID); session ids are 37 characters


def quoted(value: str) -> str:
    """A client's id (a model's, a session's) as an error message names one it does not know: its repr, up
    to QUOTED_CHARS characters and then its length. The whole repr made a 15 MiB body whose model was DEL
    characters (U+007F, each repr'd as 4 characters and its backslash escaped by JSON) a 75 MiB 404 (a
    helper's audit)."""
    if len(value) <= QUOTED_CHARS:
        return repr(value)
    return f"{value[:QUOTED_CHARS]!r}… ({len(value):,} characters)"


MESSAGE_CHARS = 1024  # of pydantic's message in a 422 (its own are short; a validator's may quote input)


def clip_name(text: str, limit: int = QUOTED_CHARS) -> str:
    """`text` (a field's name, a message) as an error names it: its first `limit` characters, then its
    length when it is longer."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def invalid(param: str, message: str) -> APIError:
    return APIError(422, message, param=param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param)


CLIENT_GONE = 499  # nginx's code for a request whose client left before its answer


def client_gone() -> APIError:
    """A plain request whose client left before its answer (nobody reads it: counted, and logged by the
    app's handler)."""
    return APIError(CLIENT_GONE, "the client closed the connection")


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param)


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # OpenAI's code for a prompt too long for the model


def prompt_too_long(message: str, param: str) -> APIError:
    """A prompt (or append) over the server's limit, naming its field: 413 on our routes, OpenAI's 400
    `context_length_exceeded` on the OpenAI routes (`as_openai`)."""
    return APIError(413, message, param=param, openai_code=CONTEXT_LENGTH_EXCEEDED)


def over_capacity(message: str, retry_after: float = 1.0) -> APIError:
    return APIError(429, message, retry_after=retry_after)


def busy(session_id: str) -> APIError:
    return APIError(409, f"session {session_id} is busy with another request", param="session_id")


def unavailable(message: str) -> APIError:
    return APIError(503, message, retry_after=5.0)


def malformed_json(reason: str, pos: int | None = None) -> APIError:
    """400 for a body or WebSocket message that is not JSON, in one wording on every route: Python's json
    reason and the 0-based character where it stopped (`json.JSONDecodeError`'s msg and pos), e.g.
    "malformed JSON: Expecting value at character 10". Python's reasons that end in "at" ("Invalid control
    character at", "Unterminated string starting at") read "at character N", not "at at character N"; a
    control character says what it likely is (a line break or tab inside a string: a base64 that `base64`
    wrapped at 76 characters, without -w0)."""
    reason = reason.removesuffix(" at")
    where = f" at character {pos}" if isinstance(pos, int) else ""
    hint = ""
    if reason.startswith("Invalid control character"):
        hint = (
            " (a raw line break or tab inside a string: write it as \\n or \\t; a base64 made by `base64` "
            "needs -w0, which does not wrap its lines)"
        )
    return APIError(400, f"malformed JSON: {reason}{where}{hint}")


def json_limit_reason(exc: BaseException) -> str:
    """Why Python's json refused a body or message that the grammar allows: nested deeper than its
    recursion limit allows (RecursionError), or an integer of more digits than it converts (4,300 by
    default: `sys.get_int_max_str_digits`, a ValueError)."""
    if isinstance(exc, RecursionError):
        return "recursion limit exceeded (arrays and objects nested too deeply)"
    if "integer string conversion" in str(exc):
        return f"number out of range (an integer of more than {sys.get_int_max_str_digits()} digits)"
    return f"{type(exc).__name__}: {exc}"[:200]


def validation_error(errors: list[dict], content_type: str | None = None, openai: bool = False) -> APIError:
    """The first pydantic error as an APIError naming its field: 400 for malformed JSON; for the body as a
    whole, 415 when it was not sent as JSON (`content_type`, the request's header, is not
    application/json or a +json type: `curl -d` without `-H 'content-type: application/json'` sends
    a form) and 422 when it is missing; else 422. On the OpenAI routes (`openai`) a field their schema
    lacks (OpenAI's tools, response_format, ...) is "<field> is not supported by this server", as the
    routes word the fields they refuse by name, not pydantic's "Extra inputs are not permitted"."""
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    # a field's name and pydantic's message can be the client's (a member the schema lacks; a union's
    # tag, quoted by pydantic): clipped, as `quoted` clips an id (a 1 MiB name of DEL characters was
    # answered twice, in the message and the param, each \u007f escaped: 12 MiB)
    loc = [clip_name(str(p)) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    msg = str(e.get("msg"))
    if e.get("type") == "union_tag_invalid" and isinstance(tag := e.get("ctx", {}).get("tag"), str):
        msg = msg.replace(f"'{tag}'", quoted(tag), 1)
    msg = clip_name(msg, MESSAGE_CHARS)
    if e.get("type") == "json_invalid":  # FastAPI's: loc ("body", the character where Python's json stopped)
        pos = e.get("loc", ())[1:2]
        return malformed_json(e.get("ctx", {}).get("error", e.get("msg")), pos[0] if pos else None)
    if tuple(e.get("loc", ())) == ("body",):  # the body itself, not one of its fields
        media = (content_type or "").split(";")[0].strip().lower()
        if e.get("type") == "missing":
            return APIError(422, "request: the body is missing: send a JSON object")
        if media != "application/json" and not media.endswith("+json"):
            return APIError(
                415,
                "request: the body must be a JSON object sent with the header content-type: "
                f"application/json (this request's content-type: {media or 'none'})",
            )
    param = ".".join(loc) or None
    if openai and e.get("type") == "extra_forbidden" and param is not None:
        return APIError(422, f"{param} is not supported by this server", param=param)
    return APIError(422, f"{param or 'request'}: {msg}", param=param)
