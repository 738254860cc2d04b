"""POST /v1/generate (JSON, SSE, raw WAV). The OpenAI-compatible routes are in routes/openai.py."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from server import media
from server.engine import Stream
from server.errors import APIError
from server.registry import ServedModel
from server.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
)
from server.service import (
    Output,
    collect,
    events,
    final_of,
    prompt_ids,
    request_id,
    restore,
    sampling_params,
    start_generation,
    state_of,
    usage,
)

router = APIRouter(tags=["generate"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 429, 503)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _sse_generate(
    stream: Stream, model: ServedModel, out: Output, gid: str, session_id: str | None
) -> AsyncIterator[str]:
    async for items in events(stream):
        ids = [x for x in items if isinstance(x, int)]
        try:
            final = final_of(items)
        except APIError as err:
            yield sse(err.frame())
            return
        if ids and model.kind == "text":
            yield sse({"type": "token", "ids": ids, "text": out.text_piece(ids)})
        elif ids:
            yield sse({"type": "audio", "ids": ids, "audio": base64.b64encode(out.audio_piece(ids)).decode()})
        if final is not None:
            if model.kind == "text" and (rest := out.finish_text(final)):
                yield sse({"type": "token", "ids": [], "text": rest})
            done = {"type": "done", "id": gid, "model": model.id, "finish_reason": final.finish_reason}
            yield sse({**done, "usage": usage(final), "session_id": session_id})


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    summary="Generate text or audio (JSON, SSE with stream=true, or raw WAV with Accept: audio/wav)",
    responses={**ERRORS, 200: {"content": {"text/event-stream": {}, "audio/wav": {}}}},
)
async def generate(req: GenerateRequest, request: Request):
    st = state_of(request)
    model = st.model(req.model)
    params = sampling_params(model, req)
    ids = prompt_ids(st, model, req.prompt, req.prompt_audio)
    if req.session_id is not None:
        await restore(st, req.session_id)
    stream, job = start_generation(st, model, req.session_id, ids, params, req.max_new_tokens)
    gid, out = request_id(), Output(model, params, job=job)
    if req.stream:
        body = _sse_generate(stream, model, out, gid, req.session_id)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)
    tokens, final = await collect(stream, request)
    if model.kind == "audio" and "audio/wav" in request.headers.get("accept", ""):
        headers = {
            "X-Request-Id": gid,
            "X-Finish-Reason": final.finish_reason,
            "X-Prompt-Tokens": str(final.prompt_tokens),
            "X-Completion-Tokens": str(final.completion_tokens),
        }
        return Response(
            media.wav(tokens, model.sample_rate, model.codec), media_type="audio/wav", headers=headers
        )
    body = {
        "id": gid,
        "model": model.id,
        "tokens": tokens,
        "finish_reason": final.finish_reason,
        "usage": usage(final),
        "session_id": req.session_id,
    }
    if model.kind == "text":
        out.text_piece(tokens)
        out.finish_text(final)
        body["text"] = out.text.text
    else:
        body["audio"] = base64.b64encode(media.wav(tokens, model.sample_rate, model.codec)).decode()
    return body
