"""Liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from server.service import state_of

router = APIRouter()


@router.get("/healthz", tags=["health"], summary="The process is alive (503 once an engine has crashed)",
            responses={503: {"description": "a model's engine has crashed: restart the server"}})  # fmt: skip
async def healthz(request: Request) -> JSONResponse:
    """Liveness: 200 {"status": "alive"}, or 503 {"status": "engine_crashed", "models": [...]} once the
    engine thread of a model has died of a bug (`Engine.crashed`): its requests are 503 from then on and
    only a restart brings it back, so the liveness probe is what restarts it (as vLLM's /health fails once
    its engine is dead). /readyz alone said so, and an orchestrator's readiness takes the replica out of
    service but never restarts it: it stayed out for ever. The models are named, the reason is not (it is
    in /readyz and the log)."""
    crashed = [k for k, m in state_of(request).models.items() if m.engine.crashed]
    if crashed:
        return JSONResponse({"status": "engine_crashed", "models": crashed}, status_code=503)
    return JSONResponse({"status": "alive"})


READY = {"content": {"application/json": {"schema": {"type": "object"}}}}
NOT_READY = {**READY, "description": "loading, draining, or nothing to serve"}


@router.get("/readyz", tags=["health"], summary="Models loaded and verified (503 before, and while draining)",
            responses={200: READY, 503: NOT_READY})  # fmt: skip
async def readyz(request: Request) -> JSONResponse:
    """Ready (200) once every configured model has loaded or failed, at least one serves, and the server
    is not draining: "loading" (503) until then, though each model serves as soon as it is loaded
    (`models`; `loading`: those still loading, whose requests are a 503 naming them), as Triton's server
    readiness waits for every model while each model's own readiness is its own (here GET
    /v1/models/{id}: 200, or 503 while it loads). With API keys on, a request without a valid one (an
    orchestrator's probe) gets the same status and fields, but the reason a model is not served is
    withheld: it quotes paths on the server's disk and exception text (the log has it, and so does this
    answer with a key). The probes take any `Host` (server/origin.py), so the reason is withheld too on a
    Host the other routes refuse: a DNS-rebinding page (same-origin to the server under its own name)
    read it, keys or none."""
    st = state_of(request)
    keys = request.app.state.api_keys
    failed = st.failed
    if keys.enabled and not keys.carries_key(request.scope):
        failed = {
            k: "not served (why: in the server's log, or in this answer with an API key)" for k in failed
        }
    elif not request.app.state.origin_policy.host_allowed(request.headers.get("host")):
        failed = {
            k: "not served (why: in the server's log, or in this answer on an allowed Host)" for k in failed
        }
    if st.draining:
        reason = "draining"
    elif not st.loaded:
        reason = "loading"
    elif not st.models:
        reason = "no model could be served"
    elif crashed := [m.engine.crashed for m in st.models.values() if m.engine.crashed]:
        reason = "; ".join(crashed)  # a restart is the fix: let the orchestrator see it
    elif st.failed and st.settings.require_all_models:
        reason = "not every configured model is served (S4_REQUIRE_ALL_MODELS): " + "; ".join(
            f"{k}: {v}" for k, v in failed.items()
        )
    else:
        reason = None
    verified = {k: {n: m.rec.verification[n] for n in ("dtype", "step_rel_err", "prefill_rel_err", "tol")}
                for k, m in st.models.items()}  # fmt: skip
    body = {"ready": reason is None, "reason": reason, "models": list(st.models), "loading": list(st.loading),
            "failed": failed, "verification": verified}  # fmt: skip
    return JSONResponse(body, status_code=200 if reason is None else 503)


EXPOSITION = {"content": {"text/plain": {"schema": {"type": "string"}},
                          "application/openmetrics-text": {"schema": {"type": "string"}}}}  # fmt: skip


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (OpenMetrics where Accept asks for it)",
            response_class=PlainTextResponse, responses={200: EXPOSITION})  # fmt: skip
async def metrics(request: Request) -> Response:
    st = state_of(request)
    for m in st.models.values():
        mm = m.engine.metrics
        mm.queue_depth.set(m.engine.queued)
        mm.active_sessions.set(m.engine.pool.in_use)
        mm.state_bytes.set(m.engine.pool.in_use * m.engine.pool.bytes_per_slot)
    body, content_type = st.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
