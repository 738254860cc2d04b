"""The FastAPI app: factory, lifespan (load → convert → verify → warm up → ready; drain on shutdown),
error rendering.

The server accepts connections while models load: /healthz answers at once, /readyz says 503 until
every configured model is loaded (or has failed) and at least one is served, and again while draining.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

from server.auth import APIKeyMiddleware, APIKeys, document_api_keys, key_warnings
from server.body_limit import BodyRefused, BodySizeLimit
from server.config import MAX_BYTES, Settings
from server.errors import (
    CLIENT_GONE,
    APIError,
    answered,
    client_gone,
    error_body,
    is_openai_path,
    json_limit_reason,
    malformed_json,
    not_found,
    refuse,
    unknown_openai_url,
    validation_error,
)
from server.json_budget import json_content_type, route_budget
from server.logs import StreamEnds, add_request_ids, log_refusal
from server.origin import CrossOrigin, OriginCheck, OriginPolicy, open_door_warnings
from server.routes import HEAD_SCOPE_KEY, demo, generate, health, openai, sessions, websocket
from server.state import ServerState

log = logging.getLogger("server")


DOCS_ASSETS = "/static-offline-docs"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon
ROUTE_MODULES = (health, openai, generate, sessions, websocket, demo)


def _error_response(err: APIError, request: Request, logged: bool = False) -> JSONResponse:
    if not logged and err.status != CLIENT_GONE:  # (a client gone has its own line: log_client_gone)
        log_refusal(answered(err, request.url.path))
    status, body = error_body(err, request.url.path)
    return JSONResponse(body, status_code=status, headers=err.headers())


def log_client_gone(request: Request) -> None:
    """The access line of a request whose client left: its 499 goes to a closed connection, for which
    uvicorn writes none (the request was counted in http_requests_total{status="499"} and logged
    nowhere). Its request id is the line's (server/logs.py RequestIds)."""
    client = request.client
    who = f"{client.host}:{client.port}" if client else "-"
    log.info('%s - "%s %s" 499 client closed the connection', who, request.method, request.url.path)


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
        if exc.status == CLIENT_GONE:
            log_client_gone(request)
        return _error_response(exc, request)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect):
        """A client that left while a route read its body (a session import's blob): a 499, logged as
        every client gone is, not a 500 with a traceback (a soak audit: each interrupted import)."""
        return await _api_error(request, client_gone())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        openai_route = is_openai_path(request.url.path)
        err = validation_error(list(exc.errors()), request.headers.get("content-type"), openai_route)
        return _error_response(err, request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        if isinstance(cause, ClientDisconnect):  # FastAPI's "There was an error parsing the body" (400) for
            # a client that left while it read a JSON body: a 499, as any client gone
            return await _gone(request, cause)
        if isinstance(cause, UnicodeDecodeError):  # FastAPI's "There was an error parsing the body": as
            # malformed as any body that is not JSON, and said as the WebSocket says it (close 1007's reason)
            err = malformed_json(f"invalid UTF-8 ({cause.reason}) at byte {cause.start}")
            return _error_response(err, request)
        if isinstance(cause, (RecursionError, ValueError)):  # Python's json past its own limits (nesting,
            # an integer's digits): said as the WebSocket's parser (pydantic's) says it
            err = malformed_json(json_limit_reason(cause))
            return _error_response(err, request)
        if exc.status_code == 404 and is_openai_path(request.url.path):  # no route: a part of OpenAI's API
            return _error_response(unknown_openai_url(request.method, request.url.path), request)
        # (a body refused by BodySizeLimit: its answer, already sent and logged there, drops this one)
        logged = isinstance(exc, BodyRefused)
        response = _error_response(APIError(exc.status_code, str(exc.detail)), request, logged)
        response.headers.update(exc.headers or {})  # (Starlette's own: a 405's Allow)
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(app, request.scope)
        return response

    for module in ROUTE_MODULES:
        app.include_router(module.router)

    @app.websocket("/{path:path}")
    async def _no_such_socket(ws: WebSocket, path: str) -> None:
        """A WebSocket handshake to any other path: a 404 in the error shape, naming the path and
        /v1/stream (Starlette's default was an empty 403, read as a refused key or origin)."""
        err = not_found(f"no WebSocket at {ws.scope.get('path', '')!r}: the stream is at /v1/stream")
        state.metrics.websocket_errors.labels("404").inc()
        await refuse(ws.scope, ws.receive, ws.send, err)

    app.mount("/static", demo.static_files(), name="static")

    def body_limit(scope: dict) -> int:
        if scope.get("path") == IMPORT_PATH:  # a state blob's size is set by the model, not by the client
            if not state.loaded and state.loading:  # (a model loading may take a larger one: the route holds
                return MAX_BYTES  # it to the models served so far as it reads, a 503 over that meanwhile)
            return max(settings.max_body_bytes, state.max_state_blob_bytes)
        return settings.max_body_bytes

    def json_budget(scope: dict):
        if scope.get("path") == IMPORT_PATH or not json_content_type(scope.get("headers", ())):
            return None  # a state blob; a body FastAPI does not parse as JSON
        return route_budget(scope.get("path", ""), settings.max_prompt_tokens, settings.max_new_tokens)

    app.add_middleware(HeadAsGet)  # the innermost: every guard sees the request as sent (HEAD)
    # inside the key check (added first: the innermost), so a client without a key learns no limit
    refused_body = state.metrics.requests_refused
    app.add_middleware(
        BodySizeLimit,
        limit_for=body_limit,
        budget_for=json_budget,
        on_refused=lambda reason: refused_body.labels(reason).inc(),
    )
    keys = app.state.api_keys = APIKeys(settings.api_keys)  # (/readyz: the reasons only with a key)
    if keys.enabled:
        refused = state.metrics.auth_failures
        app.add_middleware(APIKeyMiddleware, keys=keys, on_refused=lambda kind: refused.labels(kind).inc())
        document_api_keys(app)
        log.info("API keys required (%d configured)", len(settings.api_keys))
        for warning in key_warnings(settings.api_keys):
            log.warning("%s", warning)

    # outside the key check: a foreign page's request is refused for its origin, key or none
    policy = app.state.origin_policy = OriginPolicy(
        settings.host, settings.allowed_origins, settings.allowed_hosts
    )
    for warning in open_door_warnings(policy, keys.enabled):
        log.warning("%s", warning)
    if settings.allowed_origins:  # between the two: a listed page's preflight carries no key
        app.add_middleware(CrossOrigin, policy=policy)
    refused_for = state.metrics.requests_refused
    app.add_middleware(OriginCheck, policy=policy, on_refused=lambda reason: refused_for.labels(reason).inc())
    app.add_middleware(StreamEnds)  # (outside the guards: only answers that started)

    instrument_http(app, state.metrics.registry)
    add_request_ids(app)  # last: the outermost, so every response carries X-Request-ID
    return app


def allowed_methods(app: FastAPI, scope: dict) -> str:
    """A 405's Allow (RFC 9110 15.5.6: the methods the resource serves): those of every route whose path
    matches the request's, GET and HEAD for a static mount's files, and HEAD beside GET (`HeadAsGet`).
    Starlette's names only the first such route's (GET for a PUT on /v1/sessions/{id}, whose path serves
    DELETE too) and StaticFiles' 405 none."""
    routes = [*app.router.routes, *(r for module in ROUTE_MODULES for r in module.router.routes)]
    # the request as the app's router saw it: a mount it went into has moved its path into root_path
    root = scope.get("app_root_path", scope.get("root_path", ""))
    scope = {"type": "http", "method": scope["method"], "path": scope["path"], "root_path": root}
    methods: set[str] = set()
    for route in routes:  # (the routers' own: FastAPI wraps an included router's routes in the app's)
        if not isinstance(route, (Route, Mount)) or route.matches(scope)[0] is Match.NONE:
            continue
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):  # (/static, the docs' assets)
            methods |= {"GET", "HEAD"}
        elif isinstance(route, Route) and route.methods:
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


class HeadAsGet:
    """ASGI middleware: a HEAD request is answered as its GET, headers only (RFC 9110 9.3.2: a server
    that answers GET answers HEAD). FastAPI's GET routes (probes, /metrics, /v1/models, sessions) answered
    405 to HEAD, which uptime monitors send by default (UptimeRobot), where Starlette's static routes
    answered it. The app sees GET, marked as a HEAD (`server.routes.is_head`: a session's export answers
    it without claiming the session); the body it sends is dropped (uvicorn drops a HEAD's body too); the
    guards outside it, the access line and the metrics see HEAD."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET", HEAD_SCOPE_KEY: True}, receive, headers_only)


UNCOUNTED_ROUTES = ("/metrics", "/healthz", "/readyz")  # scrapes and probes (as vLLM leaves them out)


def instrument_http(app: FastAPI, registry) -> None:
    """Every HTTP request counted and timed by prometheus-fastapi-instrumentator, in the app's own
    registry: `http_requests_total{handler,method,status}` (the exact status code, not "4xx"),
    `http_request_duration_seconds{handler,method}` and `…_highr_seconds` (to the response's last
    byte: a whole SSE stream), `http_request_size_bytes` / `http_response_size_bytes` (from
    Content-Length). Its `http_requests_inprogress` is not enabled: that gauge goes to the global
    registry whatever `registry` says (trallnag/prometheus-fastapi-instrumentator#317, open), so a
    second app in the process would fail. `handler` is the route template
    (`/v1/sessions/{session_id}`), or "none" for a path no route matches, and `method` one of
    `METHOD_LABELS` or "other", so clients cannot add series (`RouteTemplateHandlers`). Added last, so
    it is the outermost middleware: requests refused for an API key (401) or a body too large (413) are
    counted too. Not counted: `UNCOUNTED_ROUTES`, WebSockets
    (the s4_* metrics cover their generations) and what the connection guard refuses before any route
    (its own `s4_connections_*` and `s4_requests_refused_total`)."""
    Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=[f"^{path}$" for path in UNCOUNTED_ROUTES],
        registry=registry,
    ).instrument(app)
    added = app.user_middleware[0]  # the instrumentator's (add_middleware puts the newest first)
    assert added.cls is PrometheusInstrumentatorMiddleware
    templates = {getattr(r, "path", None) for r in app.routes}  # the app's own routes and mounts
    templates |= {r.path for module in ROUTE_MODULES for r in module.router.routes}
    app.user_middleware[0] = Middleware(
        RouteTemplateHandlers, *added.args, templates=templates, **added.kwargs
    )


METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})  # what the routes serve (+ preflight)


def method_label(method: str) -> str:
    """The `method` label of a request: its method where the app serves it (`METHOD_LABELS`), else
    "other"."""
    return method if method in METHOD_LABELS else "other"


class RouteTemplateHandlers(PrometheusInstrumentatorMiddleware):
    """The instrumentator's middleware with a `handler` label that is always a route's template or
    "none", and a `method` label that is one of `METHOD_LABELS` or "other". The library labels a path
    that matches no route but would after adding or removing a trailing slash (Starlette's redirect)
    with the path itself, so `GET /v1/sessions/<anything>/`, with or without a key, added series per
    request: memory and /metrics grew without bound; and it labelled any method the HTTP parser takes
    (PROPFIND, MKCALENDAR, LINK, QUERY, … 34 of them): a few requests each, on every path, grew
    /metrics from 300 lines to 4,092, without a key."""

    def __init__(self, app, *args, templates: set[str], **kwargs) -> None:
        super().__init__(app, *args, **kwargs)
        self.templates = frozenset(templates)
        self.instrumentations = [_served_method(f) for f in self.instrumentations]
        self.async_instrumentations = [_served_method_async(f) for f in self.async_instrumentations]

    def _get_handler(self, request) -> tuple[str, bool]:
        handler, templated = super()._get_handler(request)
        if templated and handler not in self.templates:
            return "none", False
        return handler, templated


IMPORT_PATH = "/v1/sessions/import"


def _served_method(instrumentation):
    """`instrumentation` (called with the library's metrics.Info) seeing `method_label`'s method."""

    def call(info) -> None:
        info.method = method_label(info.method)
        return instrumentation(info)

    return call


def _served_method_async(instrumentation):
    async def call(info) -> None:
        info.method = method_label(info.method)
        return await instrumentation(info)

    return call
