"""The demo page: GET / (server/static/index.html) and its assets under /static/ (no build step).

Neither is an API operation, so neither is in the OpenAPI schema. The page only talks to this
server (GET /v1/models, WS /v1/stream, GET /v1/sessions/{id}); the CSP below keeps it that way.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
# Same-origin only: no CDN, no external fonts; blob: for the WAV download, mediastream for the mic.
CSP = (
    "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data: blob:; "
    "media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(
        STATIC / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
    )


def static_files() -> StaticFiles:
    """The page's script and style sheet, mounted at /static."""
    return StaticFiles(directory=STATIC)
