"""What the HTTP and WebSocket routes share: limits, claiming sessions, submitting jobs to an engine,
waiting for results, and turning generated ids into text or audio. No tensors here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from model.sampling import SamplingParams
from server import media
from server.app import ServerState
from server.engine import Failed, Finished, Job, Stream
from server.errors import APIError, invalid, too_large
from server.registry import ServedModel
from server.schemas import SamplingFields
from server.sessions import (
    SessionRecord,
    StateFormatError,
    new_session_id,
    pack_state,
    unpack_state,
)


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def request_id(prefix: str = "gen") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --- limits and parameters -----------------------------------------------------------------------


def check_prompt(state: ServerState, tokens: list[int], param: str) -> None:
    limit = state.settings.max_prompt_tokens
    if len(tokens) > limit:
        raise too_large(f"{param} is {len(tokens)} tokens; the limit is {limit} (max_prompt_tokens)", param)


def check_new_tokens(state: ServerState, n: int, param: str = "max_new_tokens") -> None:
    limit = state.settings.max_new_tokens
    if n > limit:
        raise invalid(param, f"{param}: {n} is more than this server's limit of {limit}")


def random_seed() -> int:
    """For requests without a seed: still one generator per request, seeded at random."""
    return secrets.randbits(63)


def sampling_params(model: ServedModel, req: SamplingFields) -> SamplingParams:
    if req.stop and model.kind != "text":
        raise invalid("stop", "stop sequences apply to text models only")
    return SamplingParams(
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed if req.seed is not None else random_seed(),
        stop=[s.encode() for s in req.stop or []],
    )


def prompt_ids(
    state: ServerState, model: ServedModel, prompt: str | None, prompt_audio: str | None
) -> list[int]:
    ids = media.prompt_ids(model.kind, model.sample_rate, prompt, prompt_audio)
    check_prompt(state, ids, "prompt" if model.kind == "text" else "prompt_audio")
    return ids


# --- sessions ------------------------------------------------------------------------------------


def _new_record(state: ServerState, model: ServedModel, ephemeral: bool) -> SessionRecord:
    try:
        slot = model.engine.pool.reserve()
    except APIError:
        model.engine.metrics.reject("sessions_full")
        raise
    rec = SessionRecord(id=new_session_id(), model=model.id, slot=slot, busy=True, ephemeral=ephemeral)
    state.sessions.add(rec)
    return rec


def _drop_record(state: ServerState, model: ServedModel, rec: SessionRecord) -> None:
    """Undo `_new_record` (the engine never saw the session)."""
    state.sessions.remove(rec.id)
    model.engine.pool.release(rec.slot)


def claim(state: ServerState, model: ServedModel, session_id: str) -> SessionRecord:
    rec = state.sessions.claim(session_id)
    if rec.model != model.id:
        state.sessions.release(rec)
        raise invalid("model", f"session {session_id} belongs to model {rec.model!r}, not {model.id!r}")
    return rec


def session_model(state: ServerState, session_id: str) -> tuple[ServedModel, SessionRecord]:
    rec = state.sessions.get(session_id)
    return state.model(rec.model), rec


async def ingest(state: ServerState, model: ServedModel, rec: SessionRecord, ids: list[int], fresh: bool):
    """Run an ingestion-only job on a claimed (or new) session and wait for it."""
    job = Job(rec, ids, fresh=fresh, future=concurrent.futures.Future())
    try:
        model.engine.submit(job)
    except APIError:
        if fresh:
            _drop_record(state, model, rec)
        else:
            state.sessions.release(rec)
        raise
    return await asyncio.wrap_future(job.future)


async def create_session(state: ServerState, model: ServedModel, ids: list[int]) -> SessionRecord:
    rec = _new_record(state, model, ephemeral=False)
    return await ingest(state, model, rec, ids, fresh=True)


async def append(state: ServerState, model: ServedModel, session_id: str, ids: list[int]) -> SessionRecord:
    rec = claim(state, model, session_id)
    return await ingest(state, model, rec, ids, fresh=False)


async def _engine_call(state: ServerState, model: ServedModel, src: SessionRecord, fn):
    """Run fn on the engine thread with `src` claimed; release it after."""
    try:
        return await asyncio.wrap_future(model.engine.call(fn))
    finally:
        state.sessions.release(src)


async def fork(state: ServerState, session_id: str) -> SessionRecord:
    model, _ = session_model(state, session_id)
    src = claim(state, model, session_id)
    try:
        slot = model.engine.pool.reserve()
    except APIError:
        state.sessions.release(src)
        model.engine.metrics.reject("sessions_full")
        raise
    dst = SessionRecord(id=new_session_id(), model=model.id, slot=slot)
    try:
        return await _engine_call(state, model, src, lambda e: e.fork(src, dst))
    except BaseException:
        model.engine.pool.release(slot)
        raise


async def delete(state: ServerState, session_id: str) -> None:
    model, rec = session_model(state, session_id)
    await asyncio.wrap_future(model.engine.call(lambda e: e.delete_now(rec)))


async def export_state(state: ServerState, session_id: str) -> bytes:
    model, _ = session_model(state, session_id)
    rec = claim(state, model, session_id)
    raw, seen = await _engine_call(state, model, rec, lambda e: e.read_slot(rec))
    header = {
        "model": model.id,
        "fingerprint": model.fingerprint,
        "shape": model.state_shape,
        "dtype": "float32",
        "byteorder": "little",
        "n_tokens": rec.n_tokens,
        "pending": rec.pending,
        "seen": seen,
    }
    return pack_state(header, raw)


async def import_state(state: ServerState, blob: bytes) -> SessionRecord:
    try:
        header, raw = unpack_state(blob)
    except StateFormatError as exc:
        raise invalid("state", str(exc)) from None
    model_id = header.get("model")
    if not isinstance(model_id, str) or model_id not in state.models:
        if state.draining or not state.loaded:
            state.model(str(model_id))  # 503
        raise invalid("state", f"the state is for model {model_id!r}, which this server does not serve")
    model = state.models[model_id]
    if header.get("fingerprint") != model.fingerprint:
        raise invalid("state", f"the state was made by other weights than model {model_id}'s (fingerprint)")
    if header.get("shape") != model.state_shape:
        raise invalid(
            "state", f"state shape {header.get('shape')} does not match the model's {model.state_shape}"
        )
    V = model.config.vocab_size
    pending, n_tokens, seen = header.get("pending"), header.get("n_tokens"), header.get("seen")
    if not (pending is None or (isinstance(pending, int) and 0 <= pending < V)):
        raise invalid("state", f"pending token {pending!r} is not a token id")
    if not isinstance(n_tokens, int) or n_tokens < (pending is not None):
        raise invalid("state", f"token count {n_tokens!r} is invalid")
    if not isinstance(seen, list) or not all(isinstance(i, int) and 0 <= i < V for i in seen):
        raise invalid("state", "seen tokens must be a list of token ids")
    rec = _new_record(state, model, ephemeral=False)
    rec.n_tokens, rec.pending = n_tokens, pending
    try:
        rec = await asyncio.wrap_future(model.engine.call(lambda e: e.write_slot(rec, raw, seen)))
    except BaseException:
        _drop_record(state, model, rec)
        raise
    state.sessions.release(rec)
    return rec


# --- generation ----------------------------------------------------------------------------------


def start_generation(
    state: ServerState,
    model: ServedModel,
    session_id: str | None,
    ids: list[int],
    params: SamplingParams,
    max_new_tokens: int,
) -> tuple[Stream, SessionRecord]:
    """Claim the session (or a one-shot slot) and queue the job; results arrive on the stream."""
    check_new_tokens(state, max_new_tokens)
    rec = _new_record(state, model, ephemeral=True) if session_id is None else claim(state, model, session_id)
    try:
        if not ids and rec.pending is None:
            field = "prompt" if model.kind == "text" else "prompt_audio"
            raise invalid(field, f"{field} is empty and there is no session input to continue from")
        stream = Stream(state.loop, state.settings.stream_buffer)
        job = Job(rec, ids, fresh=rec.ephemeral, stream=stream, params=params, max_new_tokens=max_new_tokens)
        model.engine.submit(job)
    except APIError:
        if rec.ephemeral:
            _drop_record(state, model, rec)
        else:
            state.sessions.release(rec)
        raise
    return stream, rec


def final_of(items: list) -> Finished | None:
    last = items[-1]
    if isinstance(last, Failed):
        raise last.error
    return last if isinstance(last, Finished) else None


async def collect(stream: Stream, request: Request | None = None) -> tuple[list[int], Finished]:
    """Wait for a whole generation; a client that goes away (checked every 0.25 s) cancels it."""
    ids: list[int] = []
    loop = asyncio.get_running_loop()
    next_check = loop.time() + 0.25
    try:
        while True:
            try:
                items = await asyncio.wait_for(stream.get(), timeout=0.25)
            except TimeoutError:
                items = []
            if request is not None and loop.time() >= next_check:
                next_check = loop.time() + 0.25
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection")  # nobody reads it
            if not items:
                continue
            ids += [x for x in items if isinstance(x, int)]
            final = final_of(items)
            if final is not None:
                return ids, final
    except BaseException:
        stream.cancel()
        raise


async def events(stream: Stream) -> AsyncIterator[list]:
    """The stream's items in groups (whatever arrived together); cancels the generation if the
    consumer stops early (a client disconnect cancels the response task)."""
    finished = False
    try:
        while not finished:
            items = await stream.get()
            finished = not isinstance(items[-1], int)
            yield items
    finally:
        if not finished:
            stream.cancel()


class Output:
    """Generated ids → what a client receives: text pieces (stop sequences held back) or audio."""

    def __init__(self, model: ServedModel, params: SamplingParams, encoding: str = "pcm16") -> None:
        self.kind, self.encoding = model.kind, encoding
        self.text = media.TextAssembler(params.stop) if model.kind == "text" else None

    def text_piece(self, ids: list[int]) -> str:
        return self.text.feed(ids)

    def audio_piece(self, ids: list[int]) -> bytes:
        return media.audio_bytes(ids, self.encoding)

    def finish_text(self, final: Finished) -> str:
        return self.text.finish(final.stop_at)


def usage(final: Finished) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens}


def now_s() -> int:
    return int(time.time())
