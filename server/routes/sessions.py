"""Sessions: create, get, delete, fork, append, export and import the state."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from server import service
from server.errors import APIError, too_large
from server.routes import is_head
from server.schemas import ERROR_RESPONSES, SessionAppend, SessionCreate, SessionInfo
from server.service import state_of

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], responses=ERROR_RESPONSES)  # on every route
STATE_TYPE = "application/octet-stream"
# a session's info; `usage` only where an answer sets it (create, append), not as null elsewhere
INFO = {"response_model": SessionInfo, "response_model_exclude_unset": True}


def _info(request: Request, rec) -> dict:
    st = state_of(request)
    return rec.info(st.models[rec.model].state_bytes)


@router.post("", status_code=201, **INFO, summary="Create a session")
async def create(req: SessionCreate, request: Request):
    st = state_of(request)
    model = st.model(req.model)
    ids = await service.prompt_ids(st, model, req.prompt, req.prompt_audio)
    rec, usage = await service.create_session(st, model, ids)
    return {**_info(request, await service.unless_gone(st, request, rec)), "usage": usage}


# POST /v1/sessions/import?model=ID: the new session on another id serving the export's checkpoint
IMPORT_MODEL = Query(
    None,
    description="the served model the session continues on (default: the one the export names): another "
    "id serving the same checkpoint (the export's weights, arch and state shape), e.g. in another dtype "
    "(S4_MODEL_DTYPES); 404 if not served, 422 (naming state) for other weights",
)
STATE_BODY = {"content": {STATE_TYPE: {"schema": {"type": "string", "format": "binary"}}}, "required": True}


@router.post("/import", status_code=201, **INFO,
             openapi_extra={"requestBody": STATE_BODY},
             summary="A new session from an exported state (application/octet-stream body; another "
                     "content-type is a 415), on the model the export names or on `model`")  # fmt: skip
async def import_(request: Request, model: str | None = IMPORT_MODEL):
    st = state_of(request)
    media_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media_type not in ("", STATE_TYPE):  # (none: what a client sending raw bytes may leave out)
        raise APIError(
            415,
            f"request: an exported state is sent as content-type: {STATE_TYPE} (this request's "
            f"content-type: {media_type})",
        )
    if model is not None:
        st.model(model)  # (404 naming `model`, or 503 while it loads, before the body is read)
    limit = st.max_state_blob_bytes  # (the models served so far: a 503 over it while others load)

    def too_big() -> APIError:
        st.check_loaded("the state blob")
        st.metrics.requests_refused.labels("body_too_large").inc()  # as the body limit counts its 413
        return too_large(f"a state blob is at most {limit} bytes here", param="state")

    if int(request.headers.get("content-length") or 0) > limit:
        raise too_big()
    blob = bytearray()
    async for part in request.stream():
        blob += part
        if len(blob) > limit:
            raise too_big()
    rec = await service.import_state(st, bytes(blob), model)
    return _info(request, await service.unless_gone(st, request, rec))


@router.get("/{session_id}", **INFO, summary="A session's info")
async def get(session_id: str, request: Request):
    return await service.session_info(state_of(request), session_id)


@router.delete("/{session_id}", status_code=204,
               summary="Delete a session (a running request on it is cancelled)")  # fmt: skip
async def delete(session_id: str, request: Request) -> Response:
    st = state_of(request)
    if await service.delete_unheld(st, session_id):  # (with a store, a session not held here: no restore)
        return Response(status_code=204)
    try:
        await service.restore(st, session_id)
    except APIError as err:  # a stored state this server cannot read (corrupt, other weights, another model)
        if err.status != 422 or st.writer is None:
            raise
        if not st.sessions.has(session_id):  # (a copy held here is deleted as any other)
            await service.delete_unread(st, session_id)
            return Response(status_code=204)
    await service.delete(st, session_id)
    return Response(status_code=204)


@router.post("/{session_id}/fork", status_code=201, **INFO,
             summary="A new session with a copy of this one's state")  # fmt: skip
async def fork(session_id: str, request: Request):
    st = state_of(request)
    await service.restore(st, session_id)
    return _info(request, await service.unless_gone(st, request, await service.fork(st, session_id)))


@router.post("/{session_id}/append", **INFO,
             summary="Feed more input to a session without generating")  # fmt: skip
async def append(session_id: str, req: SessionAppend, request: Request):
    st = state_of(request)
    await service.restore(st, session_id)
    model, _ = service.session_model(st, session_id)
    ids = await service.prompt_ids(st, model, req.prompt, req.prompt_audio)
    await service.recheck(st, session_id)  # (an eviction while the prompt was read: restored)
    rec, usage = await service.append(st, model, session_id, ids)
    return {**_info(request, rec), "usage": usage}


@router.get("/{session_id}/export", responses={200: {"content": {STATE_TYPE: {}}}},
            summary="The session's state as a versioned, checksummed binary")  # fmt: skip
async def export(session_id: str, request: Request) -> Response:
    headers = {"Content-Disposition": f'attachment; filename="{session_id}.s4state"'}
    if is_head(request):  # as session info: no claim (no 409 beside a turn), no restore (no slot taken), no
        # TTL refreshed (the session's idle one or the store's): a monitor's HEAD keeps no session alive.
        # Its length is only known by building the export: none is sent (RFC 9110 9.3.2 allows it)
        await service.session_info(state_of(request), session_id)  # (404, 422 as the GET)
        response = Response(media_type=STATE_TYPE, headers=headers)
        del response.headers["content-length"]
        return response
    await service.restore(state_of(request), session_id)
    blob = await service.export_state(state_of(request), session_id)
    return Response(blob, media_type=STATE_TYPE, headers=headers)
