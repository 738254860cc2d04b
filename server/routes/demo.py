"""The demo page: GET / (server/static/index.html) and its assets under /static/ (no build step).

Neither is an API operation, so neither is in the OpenAPI schema. The page only talks to this
server (GET /v1/models, WS /v1/stream, GET /v1/sessions/{id}); the CSP below keeps it that way.
The page and its assets are revalidated on every use (Cache-Control: no-cache, with the ETag and
Last-Modified that Starlette sets): an upgraded server never has its new page run an old cached script.
A request's preconditions are judged for the page as Starlette's StaticFiles judges them for the assets
(RFC 9110 13.1: If-None-Match compared weakly, a list, `*`; else If-Modified-Since).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).resolve().parent.parent / "static"
# A Host header that is a host and a port, nothing else (it goes into the policy below)
HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(:[0-9]{1,5})?")


def csp(host: str | None) -> str:
    """The page's Content-Security-Policy: same-origin only (no CDN, no external fonts; blob: for the WAV
    download, mediastream: for the mic). WebSockets go to this host alone: 'self', and its ws:// and
    wss:// spelled out for browsers whose 'self' does not cover WebSockets (CSP Level 2). It had said
    `ws: wss:`, which let the page open a WebSocket to any host at all."""
    sockets = f" ws://{host} wss://{host}" if host and HOST.fullmatch(host) else ""
    return (
        f"default-src 'self'; connect-src 'self'{sockets}; img-src 'self' data: blob:; "
        "media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    )


REVALIDATE = {"Cache-Control": "no-cache"}  # a cached copy is used only after a 304 says it is current

router = APIRouter()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    response = FileResponse(
        page,
        stat_result=page.stat(),
        headers={"Content-Security-Policy": csp(request.headers.get("host")), **REVALIDATE},
    )
    # the client's copy is current: judged as for the assets (the ETag alone, compared as one string, was
    # a 200 to W/"tag", to a list of tags, to * and to If-Modified-Since)
    if ASSETS.is_not_modified(response.headers, request.headers):
        return Response(status_code=304, headers={"ETag": response.headers["etag"], **REVALIDATE})
    return response


class RevalidatedStaticFiles(StaticFiles):
    """StaticFiles whose responses (200 and 304) say Cache-Control: no-cache."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(REVALIDATE)
        return response


def static_files() -> StaticFiles:
    """The page's script and style sheet, mounted at /static."""
    return RevalidatedStaticFiles(directory=STATIC)


ASSETS = static_files()  # (index's preconditions are judged by its is_not_modified)
