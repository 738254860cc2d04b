"""The FastAPI app: factory, lifespan (load → convert → verify → warm up → ready; drain on shutdown),
error rendering.

The server accepts connections while models load: /healthz answers at once, /readyz says 503 until
every configured model is loaded (or has failed) and at least one is served, and again while draining.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import APIKeyMiddleware, APIKeys, document_api_keys
from server.body_limit import BodySizeLimit
from server.config import Settings
from server.errors import APIError, as_openai, validation_error
from server.routes import demo, generate, health, openai, sessions, websocket
from server.state import ServerState

log = logging.getLogger("server")


DOCS_ASSETS = "/static-offline-docs"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon


OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions")  # errors as OpenAI's API gives them


def _error_response(err: APIError, request: Request) -> JSONResponse:
    if request.url.path in OPENAI_ROUTES:
        err = as_openai(err)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop = asyncio.get_running_loop()
        loading = asyncio.create_task(state.load())
        try:
            yield
        finally:
            await state.shutdown()
            loading.cancel()

    # /docs and /redoc load Swagger UI and ReDoc from the server (the fastapi-offline package's copies,
    # under DOCS_ASSETS), not from a CDN: they work offline.
    app = FastAPIOffline(
        static_url=DOCS_ASSETS,
        title="s4serve",
        version="0.1.0",
        summary="Streaming inference for S4 state-space language models (text and audio)",
        lifespan=lifespan,
    )
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = validation_error(list(exc.errors()), request.headers.get("content-type"))
        return _error_response(err, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail)), request)

    for module in (health, openai, generate, sessions, websocket, demo):
        app.include_router(module.router)
    app.mount("/static", demo.static_files(), name="static")
    keys = APIKeys(settings.api_keys)
    if keys.enabled:
        refused = state.metrics.auth_failures
        app.add_middleware(APIKeyMiddleware, keys=keys, on_refused=lambda kind: refused.labels(kind).inc())
        document_api_keys(app)
        log.info("API keys required (%d configured)", len(settings.api_keys))

    def body_limit(scope: dict) -> int:
        if scope.get("path") == IMPORT_PATH:  # a state blob's size is set by the model, not by the client
            return max(settings.max_body_bytes, state.max_state_blob_bytes)
        return settings.max_body_bytes

    too_large = state.metrics.requests_refused.labels("body_too_large")
    app.add_middleware(BodySizeLimit, limit_for=body_limit, on_refused=too_large.inc)
    return app


IMPORT_PATH = "/v1/sessions/import"
