"""HTTP and WebSocket routes: protocol only (parse, validate, shape responses); see server/service.py."""

from __future__ import annotations

from starlette.requests import Request

HEAD_SCOPE_KEY = "s4.head"  # set (True) by server.app.HeadAsGet on a HEAD request it hands on as its GET


def is_head(request: Request) -> bool:
    """Whether this GET is a HEAD answered as its GET (`server.app.HeadAsGet`): a route whose GET has effects
    (a session's export claims and restores it) answers it without them."""
    return bool(request.scope.get(HEAD_SCOPE_KEY))
