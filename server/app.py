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
from server.errors import APIError, not_found, unavailable
from server.metrics import Metrics
from server.registry import ServedModel, load_models
from server.sessions import SessionTable
from server.store import StateStore, StoreError, StoreWriter, open_store

log = logging.getLogger("server")


class ServerState:
    """Everything the routes share: settings, models and their engines, sessions, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.sessions = SessionTable()
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[str, str] = {}
        self.loaded = False
        self.draining = False
        self.drain_deadline: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: StateStore | None = None  # the session store (None: sessions live in this process)
        self.writer: StoreWriter | None = None
        self.restoring = asyncio.Lock()  # one restore from the store at a time
        self.fatal: str | None = None  # why nothing can be served (python -m server then exits 1)
        self.on_fatal = None  # set by python -m server: stop the process

    @property
    def max_state_blob_bytes(self) -> int:
        """The largest session export a served model makes, with room for its header (what
        POST /v1/sessions/import accepts)."""
        return max((m.state_bytes for m in self.models.values()), default=0) + (1 << 20)

    @property
    def ready(self) -> bool:
        return self.loaded and bool(self.models) and not self.draining

    def model(self, model_id: str) -> ServedModel:
        """The served model `model_id`: 503 while loading or draining, 404 if unknown."""
        if self.draining:
            raise unavailable("the server is shutting down")
        m = self.models.get(model_id)
        if m is None:
            if not self.loaded:
                raise unavailable("models are still loading")
            raise not_found(f"no model {model_id!r}; see GET /v1/models", param="model")
        return m

    async def load(self) -> None:
        try:
            self.store = await asyncio.to_thread(
                open_store, self.settings.session_store, self.settings.session_store_ttl_s
            )
        except StoreError as exc:  # an operator who asked for a store must not silently lose sessions
            self.failed["session_store"] = str(exc)
            self._nothing_to_serve(str(exc))
            return
        self.models, self.failed = await asyncio.to_thread(
            load_models, self.settings, self.sessions, self.metrics
        )
        if self.store is not None:
            self.writer = StoreWriter(self.store, self.metrics.store_ops)
            for m in self.models.values():
                m.engine.persist = _persister(m, self.writer)
                m.engine.forget = self.writer.delete
        for m in self.models.values():
            m.engine.start()
        self.loaded = True
        if not self.models:
            self._nothing_to_serve("; ".join(f"{k}: {v}" for k, v in self.failed.items()) or "no checkpoint")
            return
        log.info("ready: serving %s", ", ".join(self.models))

    def _nothing_to_serve(self, reason: str) -> None:
        self.loaded, self.fatal = True, reason
        log.error("no model can be served: %s", reason)
        if self.on_fatal is not None:
            self.on_fatal()

    async def drain(self) -> None:
        """Refuse new work (/readyz and new requests: 503) and let running requests finish, up to
        drain_timeout_s after the first call (a second call waits for the same deadline)."""
        loop = asyncio.get_running_loop()
        if self.drain_deadline is None:
            self.draining = True
            self.drain_deadline = loop.time() + self.settings.drain_timeout_s
        while any(m.engine.active_requests for m in self.models.values()):
            if loop.time() > self.drain_deadline:
                log.warning("drain timeout: cancelling the remaining requests")
                break
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        """Drain (unless the signal handler already has), then stop the engines (generations still
        running end "cancelled") and write every session's state to the store."""
        await self.drain()
        await asyncio.gather(*(asyncio.to_thread(m.engine.stop) for m in self.models.values()))
        if self.writer is not None:
            if await asyncio.to_thread(self.writer.stop, STORE_FLUSH_TIMEOUT_S):
                w = self.writer
                log.info("session store: %d states written, %d deleted", w.written, w.deleted)
            else:
                log.error("session store: %d writes not flushed in %.0f s", self.writer.backlog,
                          STORE_FLUSH_TIMEOUT_S)  # fmt: skip


STORE_FLUSH_TIMEOUT_S = 10.0
DOCS_ASSETS = "/static-offline-docs"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon


def _persister(model: ServedModel, writer: StoreWriter):
    """The engine's write-through hook for `model` (runs on its engine thread; never blocks)."""

    def persist(rec, raw: bytes, seen: list[int]) -> None:
        writer.write(rec.id, model.state_header(rec, seen), raw)

    return persist


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as an APIError naming its field (400 for malformed JSON)."""
    e = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")]
    if e.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    param = ".".join(loc) or None
    return APIError(422, f"{param or 'request'}: {e.get('msg')}", param=param)


def create_app(settings: Settings | None = None) -> FastAPI:
    from server.routes import demo, generate, health, sessions, websocket

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
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    for module in (health, generate, sessions, websocket, demo):
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
