"""POST /v1/generate (JSON, SSE, raw WAV). The OpenAI-compatible routes are in routes/openai.py."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from server import media
from server.engine import Stream
from server.errors import APIError, invalid
from server.logs import log_stream_error
from server.registry import ServedModel
from server.schemas import (
    ERROR_RESPONSES,
    GenerateRequest,
    GenerateResponse,
)
from server.service import (
    FrameClock,
    Output,
    collect,
    events,
    frame_ms,
    new_tokens,
    prompt_ids,
    request_id,
    request_model,
    restore,
    sampling_params,
    split,
    start_generation,
    state_of,
    turn_landed,
    usage,
    wait_for_slots,
)
from server.state import ServerState

router = APIRouter(tags=["generate"])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _settle(stream: Stream) -> None:
    stream.settle()


def _gone_now(request: Request) -> bool:
    """Whether the server knows the client is gone, found without letting the event loop run: one step
    of `receive`, which answers http.disconnect at once when it knows. (Starlette's `is_disconnected`
    waits a loop pass when the client is there, and a close read meanwhile, after a send that reached
    the transport, made that send look dropped: its tokens, which the client had read, were not kept.)
    uvicorn drops a send only when it knows the client is gone, so right after a send this says whether
    it was dropped."""
    step = request.receive()
    try:
        step.send(None)
    except StopIteration as answer:
        return answer.value.get("type") == "http.disconnect"
    step.close()  # it would have waited for a message: nothing known yet
    return False


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# An SSE comment, which every client ignores (the event stream spec, 9.2.6): what a stream with nothing to
# send sends after each S4_SSE_KEEPALIVE_S, so that a proxy's idle timeout does not cut it.
KEEP_ALIVE = ": keep-alive\n\n"


def _sse_audio(frame, framer) -> str:
    """One audio frame as an SSE event: its ids and its s16le samples in base64."""
    audio = base64.b64encode(framer.encode(frame)).decode()
    return sse({"type": "audio", "ids": frame.tolist(), "audio": audio})


async def _sse_generate(
    st: ServerState,
    stream: Stream,
    model: ServedModel,
    out: Output,
    gid: str,
    session_id: str | None,
    request: Request,
) -> AsyncIterator[str]:
    """Text: a token event per hand-over; audio: an audio event per frame of `frame_ms` (the last
    one the rest); then the done event. An event's tokens count as delivered once Starlette's send of
    it has returned on a connection still open (uvicorn drops what is sent after a disconnect:
    `_gone_now`); the
    stream is settled when the done event is out or the client is gone (`Stream.settle`). Audio frames
    are timed as sent, as the WebSocket's are (`FrameClock`: s4_audio_frame_interval_seconds,
    s4_audio_stream_realtime_ratio). A wait of S4_SSE_KEEPALIVE_S with nothing to send (queued, a long
    prefill, a slow store's write before the done event) sends KEEP_ALIVE."""
    framer = out.framer
    clock = FrameClock(model) if framer is not None else None
    try:
        async for items in events(stream, idle=st.settings.sse_keepalive_s):
            if not items:
                yield KEEP_ALIVE
                continue
            try:
                ids, final = split(items)
            except APIError as err:
                log_stream_error(err.status, err.message)
                yield sse(err.frame())
                return
            carrying: list[tuple[str, int]] = []  # (event, the generated tokens it carries)
            if ids and framer is None:
                carrying.append((sse({"type": "token", "ids": ids, "text": out.text_piece(ids)}), len(ids)))
            elif ids:
                carrying += [(_sse_audio(frame, framer), len(frame)) for frame in framer.feed(ids)]
            if final is not None and framer is not None and (last := framer.flush()) is not None:
                carrying.append((_sse_audio(last, framer), len(last)))
            for event, n in carrying:
                yield event
                if _gone_now(request):  # (right after the send: whether uvicorn dropped it)
                    return
                stream.deliver(n)
                if clock is not None:
                    clock.sent(n)
            if final is not None:
                if clock is not None:
                    clock.end()
                if framer is None and (rest := out.finish_text(final)):
                    yield sse({"type": "token", "ids": [], "text": rest})
                done = {"type": "done", "id": gid, "model": model.id, "finish_reason": final.finish_reason}
                # its state is in the store first (a slow store: up to S4_SESSION_STORE_WRITE_WAIT_S)
                landing = asyncio.ensure_future(turn_landed(st, stream, hold=True))
                try:
                    while not (await asyncio.wait({landing}, timeout=st.settings.sse_keepalive_s))[0]:
                        yield KEEP_ALIVE
                finally:
                    landing.cancel()  # (the client gone meanwhile; done: nothing)
                landing.result()
                yield sse({**done, "usage": usage(final), "session_id": session_id})
    finally:
        stream.settle()
        stream.release()  # (after the done event went out: the generator resumes once it is sent)


@router.post(
    "/v1/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    summary="Generate text or audio (JSON, SSE with stream=true, or raw WAV with Accept: audio/wav)",
    responses={
        **ERROR_RESPONSES,
        406: ERROR_RESPONSES[415],  # an Accept that takes neither JSON nor (audio models) audio/wav
        200: {"content": {"text/event-stream": {}, "audio/wav": {}}},
    },
)
async def generate(req: GenerateRequest, request: Request):
    st = state_of(request)
    model = await request_model(st, req.model, req.session_id)
    params = sampling_params(model, req)
    ms = frame_ms(model, req.frame_ms)
    if req.frame_ms is not None and not req.stream:
        raise invalid("frame_ms", "frame_ms applies to streamed audio (stream: true, or WS /v1/stream)")
    accept = request.headers.get("accept")
    if req.stream and not media.accepts(accept, "text/event-stream"):
        raise APIError(
            406,
            "stream: true answers text/event-stream (Server-Sent Events), which this request's Accept "
            f"does not take: {accept}",
        )
    # by q (RFC 9110 12.5.1): audio/wav where the client prefers it to JSON, JSON on a tie
    if model.kind == "audio":
        answer = media.audio_answer(accept)
    else:
        answer = "application/json" if media.accepts(accept, "application/json") else None
    wav = not req.stream and answer == "audio/wav"
    if not req.stream and answer is None:
        kinds = "application/json or audio/wav" if model.kind == "audio" else "application/json"
        raise APIError(
            406,
            f"model {model.id} answers {kinds} (or text/event-stream with stream: true); this request's "
            f"Accept: {accept}",
        )
    ids = await prompt_ids(st, model, req.prompt, req.prompt_audio)
    if req.session_id is not None:
        await restore(st, req.session_id)
    else:
        await wait_for_slots(model)  # (a one-shot request's slot)
    n = new_tokens(st, model, req)  # (the checkpoint's default when the request names none)
    stream, job = start_generation(st, model, req.session_id, ids, params, n)
    gid, out = request_id(), Output(model, params, job=job, frame_ms=ms)
    if req.stream:
        body = _sse_generate(st, stream, model, out, gid, req.session_id, request)
        # (the background task settles a stream whose body never started: a client gone at once)
        after = BackgroundTask(_settle, stream)
        return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS, background=after)
    tokens, final = await collect(stream, request)
    await turn_landed(st, stream)
    if wav:
        headers = {
            "X-Generation-Id": gid,  # the JSON answer's "id" (X-Request-ID is the HTTP request's)
            "X-Finish-Reason": final.finish_reason,
            "X-Prompt-Tokens": str(final.prompt_tokens),
            "X-Completion-Tokens": str(final.completion_tokens),
            "X-Cached-Tokens": str(final.cached_tokens),
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
