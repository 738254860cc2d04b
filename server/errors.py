"""API errors: one exception type carrying the HTTP status, rendered as `{"error": {...}}` by the app
and as `{"type": "error", "code", "message"}` frames on the WebSocket."""

from __future__ import annotations

from http import HTTPStatus


class APIError(Exception):
    """A request the server refuses: status (HTTP code), message, the offending field if any."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after
        self.kind = kind  # the body's `type`, where it is not the status's phrase

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

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(max(1, round(self.retry_after)))}

    def frame(self) -> dict:
        out = {"type": "error", "code": self.status, "message": self.message}
        if self.param is not None:
            out["param"] = self.param
        if self.retry_after is not None:  # the WebSocket's Retry-After
            out["retry_after"] = max(1, round(self.retry_after))
        return out


def as_openai(err: APIError) -> APIError:
    """The error as OpenAI's API gives it on an OpenAI-compatible route: a request it cannot take is a
    400 of type invalid_request_error there (the openai client raises BadRequestError; vLLM and
    llama.cpp's servers do the same), where our own routes answer 422. Other statuses are unchanged."""
    if err.status != 422:
        return err
    return APIError(
        400, err.message, param=err.param, retry_after=err.retry_after, kind="invalid_request_error"
    )


def invalid(param: str, message: str) -> APIError:
    return APIError(422, message, param=param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param=param)


def over_capacity(message: str, retry_after: float = 1.0) -> APIError:
    return APIError(429, message, retry_after=retry_after)


def busy(session_id: str) -> APIError:
    return APIError(409, f"session {session_id} is busy with another request", param="session_id")


def unavailable(message: str) -> APIError:
    return APIError(503, message, retry_after=5.0)


def validation_error(errors: list[dict], content_type: str | None = None) -> APIError:
    """The first pydantic error as an APIError naming its field: 400 for malformed JSON; for the body as a
    whole, 415 when it was not sent as JSON (`content_type`, the request's header, is not
    application/json or a +json type: `curl -d` without `-H 'content-type: application/json'` sends
    a form) and 422 when it is missing; else 422."""
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
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
    return APIError(422, f"{param or 'request'}: {e.get('msg')}", param=param)
