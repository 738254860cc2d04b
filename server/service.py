"""What the HTTP and WebSocket routes share: limits, claiming sessions, submitting jobs to an engine,
waiting for results, and turning generated ids into text or audio. No tensors here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from model.codecs import utf8_tail
from model.recurrent import StateRangeError
from model.sampling import SamplingParams
from server import media
from server.engine import Failed, Finished, Job, Stream
from server.errors import APIError, client_gone, invalid, not_found, prompt_too_long, quoted, unavailable
from server.logs import generation_id
from server.registry import ServedModel
from server.schemas import DEFAULT_FRAME_MS, SamplingFields, with_defaults
from server.sessions import (
    HeaderOverBudget,
    SessionRecord,
    StateFormatError,
    new_session_id,
    pack_state,
    state_arch,
    state_version,
    unpack_state,
)
from server.state import ServerState
from server.store import StoreError

log = logging.getLogger("server.service")


def state_of(request: Request) -> ServerState:
    return request.app.state.server


def request_id(prefix: str = "gen") -> str:
    """A new generation's id; the log lines of its request name it from here on (server/logs.py)."""
    gid = f"{prefix}-{uuid.uuid4().hex[:24]}"
    generation_id.set(gid)
    return gid


# --- limits and parameters -----------------------------------------------------------------------


def prompt_limit(state: ServerState, model: ServedModel | None) -> tuple[int, str]:
    """The longest prompt of `model` (None: a text model) in tokens, and the setting that sets it
    (audio: max_audio_s, in seconds at the model's rate)."""
    if model is not None and model.kind == "audio":
        return state.settings.audio_samples(model.sample_rate), "max_audio_s"
    return state.settings.max_prompt_tokens, "max_prompt_tokens"


def new_tokens_limit(state: ServerState, model: ServedModel | None) -> tuple[int, str]:
    """The largest max_new_tokens for `model` (None: a text model), and the setting that sets it."""
    return state.settings.new_tokens_limit(model.sample_rate if model is not None else None)


def new_tokens(state: ServerState, model: ServedModel, req, field: str = "max_new_tokens") -> int:
    """How many tokens a request generates at most: its `field` if it set it, else its checkpoint's
    default (config.json generation_config max_new_tokens, at most this server's limit), else the
    request model's own default."""
    value = getattr(req, field)
    if field in req.model_fields_set and value is not None:
        return value
    return default_new_tokens(state, model, value)


def default_new_tokens(state: ServerState, model: ServedModel, fallback: int) -> int:
    """The length of a generation whose request names none: the checkpoint's max_new_tokens
    (generation_config), else `fallback` (the route's own default, 64 on /v1/generate), either at most
    this server's limit (max_audio_s 0.005 at 8 kHz: 40, not a 422 over a number the client never
    sent)."""
    n = model.generation.get("max_new_tokens")
    return min(fallback if n is None else n, new_tokens_limit(state, model)[0])


def _what(state: ServerState, model: ServedModel | None, setting: str) -> str:
    if setting == "max_audio_s":
        return f"{state.settings.max_audio_s:g} s at {model.sample_rate} Hz: max_audio_s"
    return setting


def check_prompt(state: ServerState, tokens: list[int], param: str, model: ServedModel | None = None) -> None:
    limit, setting = prompt_limit(state, model)
    if len(tokens) > limit:
        raise prompt_too_long(
            f"{param} is {len(tokens)} tokens; the limit is {limit} ({_what(state, model, setting)})", param
        )


def check_new_tokens(
    state: ServerState, n: int, param: str = "max_new_tokens", model: ServedModel | None = None
) -> None:
    limit, setting = new_tokens_limit(state, model)
    if n > limit:
        what = _what(state, model, setting)
        raise invalid(param, f"{param}: {n} is more than this server's limit of {limit} ({what})")


def random_seed() -> int:
    """For requests without a seed: still one generator per request, seeded at random."""
    return secrets.randbits(63)


def sampling_params(model: ServedModel, req: SamplingFields) -> SamplingParams:
    if req.stop and model.kind != "text":
        raise invalid("stop", "stop sequences apply to text models only")
    return SamplingParams(
        **with_defaults(model.generation, req),  # temperature, top_k, top_p, repetition_penalty
        min_p=req.min_p,
        seed=req.seed if req.seed is not None else random_seed(),
        stop=[s.encode() for s in req.stop or []],
    )


async def read_prompt(
    state: ServerState, model: ServedModel, prompt: str | None, prompt_audio: str | None
) -> list[int]:
    """A request's prompt as ids for `model` (media.prompt_ids with this server's limits; 413 or 422
    naming the field). An audio file is decoded and resampled by a worker process (server/decoder.py:
    what libsndfile writes to stderr, or finds in the working directory, stays out of the server),
    waited for in a worker thread, not on the event loop: a small compressed file can take seconds of
    CPU (100 KB of FLAC, 30 s at 384 kHz in 8 channels: 1.8 s), which held every other client's stream,
    and the probes, for as long."""
    limit, _ = prompt_limit(state, model)
    max_s = state.settings.max_audio_s
    args = (model.kind, model.sample_rate, prompt, prompt_audio, max_s, limit, model.codec, model.vocab)
    if prompt_audio is None:
        return media.prompt_ids(*args)
    return await asyncio.to_thread(media.prompt_ids, *args, decode=state.decoder.read_audio)


async def prompt_ids(
    state: ServerState, model: ServedModel, prompt: str | None, prompt_audio: str | None
) -> list[int]:
    """`read_prompt`, then its length checked against the model's prompt limit (413 naming the field)."""
    ids = await read_prompt(state, model, prompt, prompt_audio)
    check_prompt(state, ids, "prompt" if model.kind == "text" else "prompt_audio", model)
    return ids


# --- sessions ------------------------------------------------------------------------------------


DELETE_WAIT_S = 10.0  # how long a DELETE waits for the running request it cancelled to end
RELEASE_WAIT_S = 2.0  # how long a request at a full slot pool waits for slot releases already under way
RELEASE_POLL_S = 0.005


class Release:
    """A slot release under way on the event loop: a session being deleted (`delete`: a closed socket's,
    or a DELETE of a session whose turn must end first). In `Engine.releasing` until `ended`."""

    ended = False


async def wait_for_slots(model: ServedModel, n: int = 1) -> None:
    """Before a request takes n new session slots: while fewer are free and slots are on their way back
    (`Engine.releasing`: a closed socket's session being deleted, a one-shot generation whose client
    left and that ends at its next step), wait for them, at most RELEASE_WAIT_S. A client that
    reconnects or retries at once is then not refused (429) for a slot it has just given back
    (docs/reliability.md, "Overload"). Returns at once when the slots are free, when nothing is being
    released, or when the requests already waiting await as many slots as are free or on their way
    back (`Engine.slots_awaited`: so the waiters, each polling every RELEASE_POLL_S, are never more than
    the slots they can get). Whoever reserves first then gets a slot; one that finds none gets its 429.
    With a session store, the slots still missing after that are made by evicting the idle sessions
    unused the longest to the store (`Engine.evict_for_room`). Slots an eviction under way frees are
    its requester's (`Engine.slots_evicting`): a request arriving meanwhile counts them as taken and
    evicts for itself (it counted them free and took them, and the requester got a 429 though idle
    sessions were left: a helper's audit, 2-3 of 8 concurrent creates on a full pool)."""
    await _wait_for_releases(model, n)
    engine = model.engine
    if engine.persist is not None and (short := n - max(0, engine.pool.free - engine.slots_evicting)) > 0:
        engine.slots_evicting += short
        try:
            await engine_answer(engine.call(lambda e: e.evict_for_room(short), bounded=False))
        finally:
            engine.slots_evicting -= short


async def _wait_for_releases(model: ServedModel, n: int) -> None:
    engine = model.engine
    deadline = time.monotonic() + RELEASE_WAIT_S
    waiting = False
    try:
        while (free := engine.pool.free) < n:
            coming = engine.releases_under_way()
            if not waiting:
                if engine.slots_awaited + n > free + coming:
                    return
                engine.slots_awaited += n
                waiting = True
            if not coming or time.monotonic() >= deadline:
                return
            await asyncio.sleep(RELEASE_POLL_S)
    finally:
        if waiting:
            engine.slots_awaited -= n


def _new_record(model: ServedModel, ephemeral: bool, session_id: str | None = None) -> SessionRecord:
    try:
        return model.engine.new_session(session_id or new_session_id(), ephemeral)
    except APIError:
        model.engine.metrics.reject("sessions_full")
        raise


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


async def request_model(state: ServerState, model_id: str | None, session_id: str | None) -> ServedModel:
    """The model a request runs on: the one it names (404 naming `model` if not served), or, when it
    names none and continues a session, the session's: the copy held here (a session's model never
    changes: the caller's `restore` checks that copy is the latest, with the request's one version check),
    or one restored from the session store first (404 naming `session_id` for a session in neither place).
    A model named beside a session that is not the session's is refused where the session is claimed
    (`claim`: 422 naming `model`). 503 while the server drains, as for any new request, and while the
    model is still loading (the models loaded before it serve meanwhile)."""
    if model_id is not None:
        return state.model(model_id)
    if session_id is None:
        raise invalid("model", "model: Field required (the model's id, or a session_id to continue)")
    state.check_serving()  # (503 while draining, or while no model serves yet)
    if not state.sessions.has(session_id):
        await restore(state, session_id)
    try:
        return session_model(state, session_id)[0]
    except APIError as err:  # (evicted to the store by its idle TTL just after `has`)
        if err.status != 404 or state.store is None:
            raise
    await restore(state, session_id)
    return session_model(state, session_id)[0]


async def engine_answer(fut: concurrent.futures.Future):
    """The engine's answer to a job or call (`fut`): its result, or its exception raised. Cancelling the
    waiter (uvicorn cancels what still runs when its graceful shutdown is over) does not cancel the
    engine's work, which may be running already and whose effects (a record added, a slot written or
    released) the caller's cleanup must know: a cancelled waiter waits for the answer all the same, then
    raises CancelledError, and `fut` is done. (Awaiting `asyncio.wrap_future(fut)` cancelled `fut`; the
    engine then raised resolving it and stopped: 503 to every request after.)"""
    waiter = asyncio.wrap_future(fut)
    cancelled = False
    while not waiter.done():
        try:
            await asyncio.wait((waiter,))  # (never cancels `waiter`)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return waiter.result()


async def ingest(
    state: ServerState, model: ServedModel, rec: SessionRecord, ids: list[int], fresh: bool
) -> tuple[SessionRecord, int]:
    """Run an ingestion-only job on a claimed (or new) session and wait for it: the session, and how many
    of the input's tokens had their state from the prefix cache."""
    job = Job(rec, ids, fresh=fresh, future=concurrent.futures.Future())
    try:
        model.engine.submit(job)
    except APIError:
        if fresh:
            _drop_record(state, model, rec)
        else:
            state.sessions.release(rec)
        raise
    return await engine_answer(job.future), job.cached


async def landed(
    state: ServerState, session_id: str | None, queued: concurrent.futures.Future | None = None
) -> str | None:
    """Wait until this replica's write of `session_id` (queued by the engine before it answered, or once
    `queued` resolves: a turn's `Stream.settle`, a delete waiting for the session's running request) is
    in the session store, so that the answer to a request that changed the session comes after its state
    is where any replica reads it (README "Session store"). At most `session_store_write_wait_s` in all
    (then logged, and the caller answers anyway: "late"); nothing to wait for (None) without a store, for
    a one-shot request (`session_id` None) or with a wait of 0. Else the operation's outcome
    (`StoreWriter.landed`: "write", "delete", "error", ...)."""
    wait = state.settings.session_store_write_wait_s
    if state.writer is None or session_id is None or wait <= 0:
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        if queued is not None:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(queued)), wait)
        done = state.writer.landed(session_id)
        return await asyncio.wait_for(
            asyncio.shield(asyncio.wrap_future(done)), max(0.0, deadline - loop.time())
        )
    except TimeoutError:
        state.metrics.store_ops.labels("late").inc()
        log.warning("session %s: its state was not in the session store within %g s "
                    "(S4_SESSION_STORE_WRITE_WAIT_S); answering before it is", session_id, wait)  # fmt: skip
        return "late"


async def turn_landed(state: ServerState, stream: Stream) -> None:
    """Settle a stream whose every token its client was handed (`Stream.settle`) and wait for its
    session's write (`landed`): what a route does before its done frame or event, or its answer."""
    stream.settle()
    if stream.queued_write is not None:
        await landed(state, stream.job.session.id, stream.queued_write)


async def create_session(
    state: ServerState, model: ServedModel, ids: list[int]
) -> tuple[SessionRecord, dict]:
    """A new session holding `ids`: its record, and the input's usage (`input_usage`)."""
    await wait_for_slots(model)
    rec = _new_record(model, ephemeral=False)
    rec, cached = await ingest(state, model, rec, ids, fresh=True)
    await landed(state, rec.id)
    return rec, input_usage(ids, cached)


async def append(
    state: ServerState, model: ServedModel, session_id: str, ids: list[int]
) -> tuple[SessionRecord, dict]:
    """Feed `ids` to a session: its record, and the input's usage (`input_usage`)."""
    rec = claim(state, model, session_id)
    try:
        check_room(rec, len(ids))
    except APIError:
        state.sessions.release(rec)
        raise
    rec, cached = await ingest(state, model, rec, ids, fresh=False)
    await landed(state, rec.id)
    return rec, input_usage(ids, cached)


def input_usage(ids: list[int], cached: int) -> dict:
    """An input's usage, OpenAI's fields: its tokens, and those whose state came from the prefix cache (a
    session's first input only)."""
    return {"prompt_tokens": len(ids), "prompt_tokens_details": {"cached_tokens": cached}}


async def _engine_call(state: ServerState, model: ServedModel, src: SessionRecord, fn):
    """Run fn on the engine thread with `src` claimed; release it after."""
    try:
        return await engine_answer(model.engine.call(fn))
    finally:
        state.sessions.release(src)


async def fork(state: ServerState, session_id: str) -> SessionRecord:
    model, _ = session_model(state, session_id)
    await wait_for_slots(model)
    src = claim(state, model, session_id)
    try:
        slot = model.engine.pool.reserve()
    except APIError:
        state.sessions.release(src)
        model.engine.metrics.reject("sessions_full")
        raise
    dst = SessionRecord(id=new_session_id(), model=model.id, slot=slot)
    try:
        dst = await _engine_call(state, model, src, lambda e: e.fork(src, dst))
    except BaseException:
        if not state.sessions.holds(dst):  # (forked, its waiter cancelled: the slot is the new session's)
            model.engine.pool.release(slot)
        raise
    await landed(state, dst.id)
    return dst


async def delete(state: ServerState, session_id: str) -> None:
    """Delete a session; answered once it is gone here (a running request on it is cancelled and the
    session goes when that request ends, at its next step: waited for, at most DELETE_WAIT_S) and, with a
    store, once the store has deleted it too (`landed`). Its slot is meanwhile on its way back
    (`Engine.releasing`). A delete the store could not make (unreachable) is a 503: the session is gone
    here, and the store writer tries the store's delete again until it lands, meanwhile another replica
    can still serve the session; the client's next DELETE of it waits for that try (204 once it lands).
    While the writer holds as many such deletes as it keeps (`StoreWriter.deletes_full`), a 503 before
    anything is deleted: the session stays (`_check_deletes_room`)."""
    if state.writer is not None and not state.sessions.has(session_id) and state.writer.deleting(session_id):
        await _store_deleted(state, session_id, await landed(state, session_id))  # (a retried DELETE)
        return
    model, rec = session_model(state, session_id)
    _check_deletes_room(state, session_id)
    release = Release()
    model.engine.expect_release(release)  # (wait_for_slots: its slot is on its way back)
    gone = None
    try:
        # (never refused for a full queue: it frees a slot; a turn running: a future)
        gone = await engine_answer(model.engine.call(lambda e: e.delete_now(rec), bounded=False))
        if gone is not None:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(gone)), DELETE_WAIT_S)
            except TimeoutError:
                log.warning("session %s: its running request had not ended %g s after its delete; "
                            "answering before it has", session_id, DELETE_WAIT_S)  # fmt: skip
    finally:
        if gone is None or gone.done():
            release.ended = True
        else:  # (the engine thread resolves `gone` once the session has gone)
            gone.add_done_callback(lambda _: setattr(release, "ended", True))
    await _store_deleted(state, session_id, await landed(state, session_id, gone))


async def delete_unread(state: ServerState, session_id: str) -> None:
    """Delete a session whose stored state cannot be restored here (corrupt, made by other weights, of
    another model: the 422 of `restore`), unread: its tombstone written (`StoreWriter.delete`), answered
    as `delete` is once that lands (503 if the store could not). A DELETE of such a session was refused
    with that 422, so the client could not delete it, and it stayed until the store's TTL (a day by
    default): a helper's audit."""
    _check_deletes_room(state, session_id)
    state.writer.delete(session_id)
    await _store_deleted(state, session_id, await landed(state, session_id))


def _check_deletes_room(state: ServerState, session_id: str) -> None:
    """503 before a session is deleted when the store writer holds as many deletes as it keeps
    (`StoreWriter.deletes_full`: the store has failed them for a while): the session is then left as it
    is, here and in the store, rather than deleted here with a store delete that could not be kept."""
    if state.writer is not None and state.writer.deletes_full():
        raise unavailable(
            f"session {session_id}: not deleted: {state.writer.deletes_kept:,} deletes are waiting for the "
            "session store already (it has failed them: it is down or refuses them); the session is left as "
            "it is: send the DELETE again once the store answers"
        )


async def _store_deleted(state: ServerState, session_id: str, outcome: str | None) -> None:
    """The answer to a delete whose store operation ended `outcome` (`landed`): 503 when the store could
    not delete the session (the writer tries again), or had not answered within S4_SESSION_STORE_WRITE_WAIT_S
    ("late": a hung Redis; it was a 204 before the delete had landed, a helper's audit), else nothing
    (204)."""
    if outcome == "late":
        raise unavailable(
            f"session {session_id}: deleted on this replica, but the session store had not deleted it within "
            f"{state.settings.session_store_write_wait_s:g} s (S4_SESSION_STORE_WRITE_WAIT_S; it is applied "
            "when the store answers, and tried again until it lands; until then another replica can still "
            "serve the session): send the DELETE again to wait for it"
        )
    if outcome == "error":
        raise unavailable(
            f"session {session_id}: deleted on this replica, but the session store could not delete it yet "
            "(it is tried again until it lands; until then another replica can still serve the session): "
            "send the DELETE again to wait for it"
        )


async def export_state(state: ServerState, session_id: str) -> bytes:
    model, _ = session_model(state, session_id)
    rec = claim(state, model, session_id)
    raw, seen = await _engine_call(state, model, rec, lambda e: e.export(rec))
    return pack_state(model.state_header(rec, seen), raw)


MAX_STATE_TOKENS = 2**53 - 1  # a token count JSON clients read exactly (IEEE double integers)


def check_room(rec: SessionRecord, adds: int) -> None:
    """422 naming session_id when `adds` more tokens could take the session's count past MAX_STATE_TOKENS,
    which an import reads: a session's export must import again. (Only an import can start a count near
    it: a session decoding a million tokens a second would take 285 years to get there.)"""
    if rec.n_tokens + adds > MAX_STATE_TOKENS:
        raise invalid(
            "session_id",
            f"session {rec.id} holds {rec.n_tokens} tokens; this turn could add {adds}, past "
            f"{MAX_STATE_TOKENS}, the most a session counts (an integer JSON reads exactly)",
        )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are not numbers


# the header fields of an export that an import reads (registry.ServedModel.state_header), each required;
# version 2 adds "arch", and "utf8_tail" may be absent (exports before it existed)
STATE_FIELDS = ("model", "fingerprint", "shape", "n_tokens", "pending", "seen")


def check_state(
    state: ServerState, blob: bytes, param: str, what: str, target: str | None = None
) -> tuple[ServedModel, dict, bytes]:
    """Validate an exported (or stored) state: format, version, checksum, every field an import reads
    (`STATE_FIELDS`), then that this server serves its model with the same weights and shapes: the model
    its header names, or `target` (an import's `model`: another id serving the same checkpoint, in another
    dtype say; 404 naming `model` if not served). 422 naming `param` otherwise."""
    if target is not None:
        state.model(target)  # (404 naming `model` before the blob is read; 503 while loading or draining)
    try:
        header, raw = unpack_state(blob, max((m.config.vocab_size for m in state.models.values()), default=0))
    except StateFormatError as exc:
        if isinstance(exc, HeaderOverBudget):  # (its budget is the largest vocabulary served so far)
            state.check_loaded(f"{what}'s header")
        raise invalid(param, f"{what}: {exc}") from None
    version = state_version(blob)
    for key in STATE_FIELDS + (("arch",) if version >= 2 else ()):
        if key not in header:  # (utf8_tail may be absent: exports before it existed have none)
            raise invalid(param, f"{what}: its header has no {key!r} field")
    model_id = target if target is not None else header["model"]
    if not isinstance(model_id, str) or model_id not in state.models:
        if state.draining or state.still_loading(str(model_id)):
            state.model(str(model_id))  # 503 (naming the model, while it loads)
        same = [m.id for m in state.models.values() if m.fingerprint == header["fingerprint"]]
        hint = ""
        if same and param == "state":  # (an import: it may name the model that serves those weights)
            hint = f" (model {same[0]} serves its weights: import it with ?model={same[0]})"
        served = "which this server does not serve"
        raise invalid(param, f"{what} is for model {quoted(str(model_id))}, {served}{hint}")
    model = state.models[model_id]
    arch = state_arch(header, version)
    if arch != model.config.arch:
        raise invalid(
            param,
            f"{what} (format version {version}) is the state of an arch {arch!r} model; model {model_id} "
            f"is arch {model.config.arch!r}",
        )
    if header["fingerprint"] != model.fingerprint:
        if header["fingerprint"] == model.fingerprint_without_vocab:  # (registry.ServedModel)
            raise invalid(
                param,
                f"{what} was made before a model's fingerprint covered its vocabulary (vocab.txt): whether "
                f"it was made with model {model_id}'s vocabulary cannot be told, so it is not taken (its ids "
                "would mean other words under another); start the session again",
            )
        other = ", or another vocabulary (vocab.txt)" if model.vocab is not None else ""
        came, whose = header["model"], ""
        if target is not None and came != model_id:  # (?model= named another: say whose state it is)
            whose = f"; it is model {quoted(str(came))}'s state"
            if came in state.models:
                whose += ": import it without ?model"
        raise invalid(
            param, f"{what} was made by other weights than model {model_id}'s{other} (fingerprint){whose}"
        )
    if header["shape"] != model.state_shape:
        shape = str(header["shape"])[:80]
        raise invalid(param, f"{what}: state shape {shape} does not match the model's {model.state_shape}")
    V = model.config.vocab_size
    pending, n_tokens, seen = header["pending"], header["n_tokens"], header["seen"]
    if not (pending is None or (_is_int(pending) and 0 <= pending < V)):
        raise invalid(param, f"{what}: pending token {pending!r} is not a token id")
    if not _is_int(n_tokens) or not 0 <= n_tokens <= MAX_STATE_TOKENS:
        raise invalid(param, f"{what}: n_tokens {n_tokens!r} is not a token count in [0, {MAX_STATE_TOKENS}]")
    if (pending is None) != (n_tokens == 0):  # the state holds every token but the pending (last) one
        raise invalid(
            param,
            f"{what}: n_tokens is {n_tokens} and pending is {pending!r}: a session that holds tokens has a "
            "pending token (its last one), an empty session (n_tokens 0) has none",
        )
    if (
        not isinstance(seen, list)
        or len(seen) > V
        or not all(_is_int(i) and 0 <= i < V for i in seen)
        or len(set(seen)) != len(seen)
    ):
        raise invalid(param, f"{what}: seen tokens must be a list of distinct token ids (at most {V})")
    header["utf8_tail"] = _checked_tail(header.get("utf8_tail", []), model.kind, param, what)
    for key in ("created", "last_used"):  # (absent in older exports)
        t = header.get(key)
        if t is not None and not (type(t) in (int, float) and 0 <= t <= time.time() + 86400):
            raise invalid(param, f"{what}: {key} {t!r} is not a time (Unix seconds)")
    generated = header.get("generated", 0)  # (absent in older exports)
    if not _is_int(generated) or not 0 <= generated <= MAX_STATE_TOKENS:
        raise invalid(param, f"{what}: generated {generated!r} is not in [0, {MAX_STATE_TOKENS}]")
    return model, header, raw


def _checked_tail(tail, kind: str, param: str, what: str) -> bytes:
    """An exported `utf8_tail` (absent in older exports: none): 0-3 byte values that begin a UTF-8
    character and do not finish it, and none for an audio model. 422 naming `param` otherwise."""
    ok = isinstance(tail, list) and len(tail) <= 3 and all(type(b) is int and 0 <= b < 256 for b in tail)
    if ok and utf8_tail(bytes(tail)) == bytes(tail) and (kind == "text" or not tail):
        return bytes(tail)
    raise invalid(param, f"{what}: utf8_tail {tail!r} is not the start of one unfinished UTF-8 character")


async def _install(
    state: ServerState,
    model: ServedModel,
    header: dict,
    raw: bytes,
    param: str,
    what: str,
    session_id: str | None = None,
) -> SessionRecord:
    """A new session (id `session_id`, or a fresh one) holding a checked state; the engine refuses
    values the model cannot reach (422 naming `param`). The header is `check_state`'s. Nothing is held
    after an error: the slot goes back to the pool whatever fails."""
    n_tokens, pending, utf8_tail, seen = (header[k] for k in ("n_tokens", "pending", "utf8_tail", "seen"))
    await wait_for_slots(model)
    rec = _new_record(model, ephemeral=False, session_id=session_id)
    fut: concurrent.futures.Future | None = None
    if session_id is not None:  # restored: the same session (an import is a new one)
        if header.get("created") is not None:
            rec.created = float(header["created"])
        rec.generated = header.get("generated", 0)
    try:
        rec.n_tokens, rec.pending, rec.utf8_tail = n_tokens, pending, utf8_tail
        fut = model.engine.call(lambda e: e.write_slot(rec, raw, seen))
        rec = await engine_answer(fut)
    except StateRangeError as exc:
        _drop_record(state, model, rec)
        raise invalid(param, f"{what}: {exc}") from None
    except BaseException:
        if fut is not None and fut.done() and fut.exception() is None:  # installed, its waiter cancelled
            state.sessions.release(rec)
        else:
            _drop_record(state, model, rec)
        raise
    state.sessions.release(rec)
    return rec


async def import_state(state: ServerState, blob: bytes, model_id: str | None = None) -> SessionRecord:
    """A new session from an exported state, on the model its header names or on `model_id` (the same
    checkpoint under another id: `check_state`)."""
    model, header, raw = check_state(state, blob, "state", "the state", model_id)
    rec = await _install(state, model, header, raw, "state", "the state")
    await landed(state, rec.id)
    return rec


MAX_SESSION_ID = 128  # longer ids are never ours: not looked up in the store
SETTLE_TIMEOUT_S = 5.0  # a restore waits this long at most for this replica's write of the session
EVICTION_WAIT_S = 5.0  # ... and this long at most for an eviction under way to free the copy here


async def restore(state: ServerState, session_id: str) -> None:
    """Make sure this process holds the latest copy of a session a request is about to claim: bring it
    back from the session store if it is not held here (written by another replica, by this one before
    a restart, or evicted after its TTL); a copy held here whose stored version is not this replica's
    (another replica went on with it, or deleted it) is dropped first, and restored. A held copy is
    marked used (`SessionTable.touch`), so that its idle TTL cannot evict or expire it between this call
    and the caller's claim (a 404 for a session held a moment before); with a store, one whose eviction
    is already under way is restored once that eviction has handed its state to the store writer. A
    session in neither place stays unknown (the caller's 404); without a store, nothing is read."""
    if len(session_id) > MAX_SESSION_ID:
        return
    if state.store is None:
        rec = state.sessions.touch(session_id)
        if rec is not None and rec.expiring:  # its TTL ran out before this request: the caller's 404
            await _eviction_over(state, rec)  # (not a 409 while the delete is under way)
        return
    if await _held(state, session_id):
        return
    async with state.restoring.hold(session_id):
        if state.sessions.has(session_id):  # held (current), or restored by a concurrent request meanwhile
            if await _held(state, session_id) or not await _drop_copy(state, session_id):
                return
        stored = await _read_stored(state, session_id, settle=True)
        if stored is None:
            return
        model, header, raw, version = stored
        state.writer.adopt(session_id, version)
        await _install(
            state, model, header, raw, "session_id", f"the stored state of session {session_id}", session_id
        )
        state.metrics.store_ops.labels("restore").inc()


async def _held(state: ServerState, session_id: str) -> bool:
    """Whether this replica holds the latest copy of a session (`_is_current`), marked used now
    (`SessionTable.touch`). False for one its idle TTL claimed meanwhile, once that eviction is over
    (waited for, at most EVICTION_WAIT_S): the caller then reads it from the store."""
    if not (state.sessions.has(session_id) and await _is_current(state, session_id)):
        return False
    rec = state.sessions.touch(session_id)
    if rec is None:
        return False
    if not rec.expiring:
        return True
    await _eviction_over(state, rec)
    return False


async def _eviction_over(state: ServerState, rec: SessionRecord) -> None:
    """Wait (at most EVICTION_WAIT_S) for the eviction of a record its idle TTL has claimed to end: the
    engine thread hands its state to the store writer (without a store: deletes it), then frees the
    record and its slot."""
    deadline = time.monotonic() + EVICTION_WAIT_S
    while state.sessions.holds(rec) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


async def _is_current(state: ServerState, session_id: str) -> bool:
    """Whether this replica's copy of a session it holds is the latest: one Redis call (the stored
    version; README "Session store"). A busy session counts as current (its claim answers 409), and so
    does every session when the store does not answer in time (the copy here serves; logged). A copy
    this replica no longer holds when the answer comes (evicted to the store after its idle TTL
    meanwhile) is not: the caller reads the store, as for a session never held here."""
    try:
        rec = state.sessions.get(session_id)
    except APIError:  # gone meanwhile
        return False
    if rec.busy:
        return True
    try:
        stored = await asyncio.to_thread(state.store.version, session_id)
    except StoreError as exc:
        _store_failed(
            state, logging.WARNING, "session %s: %s; continuing with the copy held here", session_id, exc
        )
        return state.sessions.holds(rec)
    state.writer.answered(True)
    return state.writer.is_current(session_id, stored) and state.sessions.holds(rec)


def _store_failed(state: ServerState, level: int, msg: str, *args) -> None:
    """A route's read of the session store failed: counted (`op="error"`, and `op="read"` among the
    store's errors), the store marked down (`s4_session_store_up`), logged at most once an interval
    (`StoreWriter.errors`)."""
    state.metrics.store_ops.labels("error").inc()
    state.metrics.store_errors.labels("read").inc()
    state.writer.answered(False)
    state.writer.errors.log(level, msg, *args)


async def _drop_copy(state: ServerState, session_id: str) -> bool:
    """Drop this replica's stale copy of a session (record, slot, unwritten state); False if a request
    claimed it meanwhile (True if it is gone already: evicted meanwhile)."""
    try:
        rec = state.sessions.claim(session_id)
    except APIError as err:
        return err.status == 404
    model = state.models[rec.model]
    try:
        fut = model.engine.call(lambda e: e.drop_copy(rec), bounded=False)
    except APIError:  # (the engine is stopping or has crashed: an unbounded call is not refused for a queue)
        state.sessions.release(rec)
        raise
    log.info("session %s: the store holds a newer state (another replica went on with it, or deleted it): "
             "reloading", session_id)  # fmt: skip
    state.metrics.store_ops.labels("reload").inc()
    state.writer.discard(session_id)
    await engine_answer(fut)
    return True


async def _read_stored(
    state: ServerState, session_id: str, settle: bool = False
) -> tuple[ServedModel, dict, bytes, str] | None:
    """A session's stored state, checked like an import (422 naming `session_id`), and its version; None
    if the store has none; 503 if it cannot be read. `settle`: first let this replica's queued write of
    the session (its eviction's) land, so that the version read is the latest."""

    if state.writer.deleting(session_id):  # deleted here, not yet in the store: not to be brought back
        return None

    def read():
        if settle:
            state.writer.settle(session_id, SETTLE_TIMEOUT_S)
        return state.store.get(session_id)

    try:
        got = await asyncio.to_thread(read)
    except StoreError as exc:
        _store_failed(state, logging.ERROR, "session %s: %s", session_id, exc)
        raise unavailable(f"session {session_id}: the session store cannot be read ({exc.public})") from None
    state.writer.answered(True)
    if got is None:
        return None
    blob, version = got
    model, header, raw = check_state(state, blob, "session_id", f"the stored state of session {session_id}")
    return model, header, raw, version


async def session_info(state: ServerState, session_id: str) -> dict:
    """A session's info (GET /v1/sessions/{id}): the record here when this replica holds the latest copy,
    else the stored header, read without restoring it: no slot taken, no TTL (the store's or the
    session's) or last_used refreshed, so a dashboard polling it keeps no session alive. A copy here
    that its idle TTL is evicting, or evicted since the version check, is read from the store once that
    eviction's write has landed (it answered `busy`, or 404). A copy here of a session deleted elsewhere
    is dropped (404), its slot freed."""
    if state.store is None or len(session_id) > MAX_SESSION_ID:
        rec = state.sessions.get(session_id)
        return rec.info(state.models[rec.model].state_bytes)
    settle = False
    if state.sessions.has(session_id) and await _is_current(state, session_id):
        try:
            rec = state.sessions.get(session_id)
        except APIError:  # (evicted meanwhile)
            rec = None
        if rec is not None and not rec.expiring:
            return rec.info(state.models[rec.model].state_bytes)
        if rec is not None:
            await _eviction_over(state, rec)
        settle = True
    stored = await _read_stored(state, session_id, settle=settle)
    if stored is None:
        if state.sessions.has(session_id):  # a copy held here of a session deleted elsewhere: dropped, its
            await restore(state, session_id)  # slot freed, as a claiming route's restore drops it
        raise not_found(f"no session {quoted(session_id)}", param="session_id")
    model, header, raw, _ = stored
    what = f"the stored state of session {session_id}"
    try:
        await asyncio.to_thread(model.engine.check_raw, raw)  # as a restore would refuse it
    except StateRangeError as exc:
        raise invalid("session_id", f"{what}: {exc}") from None
    created = header.get("created") or 0.0
    stored_rec = SessionRecord(  # not held here (no slot): only its info, as a held record gives it
        id=session_id,
        model=model.id,
        slot=-1,
        n_tokens=header["n_tokens"],
        created=created,
        last_used=header.get("last_used") or created,
        generated=header.get("generated", 0),
    )
    return stored_rec.info(model.state_bytes)


# --- generation ----------------------------------------------------------------------------------


NO_INPUT = "prompt is empty and there is no session input to continue from"


def check_input(state: ServerState, model: ServedModel, session_id: str | None, ids: list[int]) -> None:
    """422 naming `prompt` when a generation on `model` would have no input: a text model, no prompt ids,
    and no session (or one with no pending token). `start_generation` refuses the same; this says so
    before anything else is done (a WebSocket's first message binds nothing when it is refused)."""
    if model.kind != "text" or ids:
        return
    try:
        rec = state.sessions.get(session_id) if session_id is not None else None
    except APIError:
        return  # an unknown session: its 404 comes where it is looked up
    if rec is None or rec.pending is None:
        raise invalid("prompt", NO_INPUT)


def start_generation(
    state: ServerState,
    model: ServedModel,
    session_id: str | None,
    ids: list[int],
    params: SamplingParams,
    max_new_tokens: int,
) -> tuple[Stream, Job]:
    """Claim the session (or a one-shot slot) and queue the job; results arrive on the stream.

    With no input at all (no prompt, and a new or empty session) an audio model starts from its
    silence: the prompt is the one id MuLaw.silence (128, the code of 0.0; every training clip starts
    with it), counted in usage.prompt_tokens. A text model has no such start: 422 naming `prompt`.
    A text session's unfinished character (`utf8_tail`) carries into this generation unless new
    input comes first; the job says so (`carry`) for the route's `Output`."""
    check_new_tokens(state, max_new_tokens, model=model)
    rec = _new_record(model, ephemeral=True) if session_id is None else claim(state, model, session_id)
    rec.generated = 0  # this request's count; export, fork and append leave the last generation's
    try:
        if not ids and rec.pending is None:
            if model.kind != "text":
                ids = [model.codec.silence]
            else:
                raise invalid("prompt", NO_INPUT)
        check_room(rec, len(ids) + max_new_tokens)
        stream = Stream(state.loop, stream_capacity(state.settings, model))
        text = model.kind == "text"
        carry = rec.utf8_tail if text and not ids and not rec.ephemeral else b""
        job = Job(rec, ids, fresh=rec.ephemeral, stream=stream, params=params, max_new_tokens=max_new_tokens,
                  text=text, carry=carry)  # fmt: skip
        model.engine.submit(job)
    except APIError:
        if rec.ephemeral:
            _drop_record(state, model, rec)
        else:
            state.sessions.release(rec)
        raise
    return stream, job


def final_of(items: list) -> Finished | None:
    last = items[-1]
    if isinstance(last, Failed):
        raise last.error
    return last if isinstance(last, Finished) else None


def split(items: list) -> tuple[list[int], Finished | None]:
    """A group of a stream's items → (its token ids, its final event or None); a `Failed` raises its
    error. The final event is always last, so this is one slice, not a pass over the tokens."""
    if isinstance(items[-1], int):
        return items, None
    return items[:-1], final_of(items)


async def _disconnected(request: Request) -> None:
    """Returns once the client of `request` (its body read) has gone: uvicorn's receive() then gives
    `http.disconnect` (and also once the response is complete: the caller cancels this before)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(state: ServerState, request: Request, rec: SessionRecord) -> SessionRecord:
    """`rec`, a session just made for `request` (create, fork, import), or, when its client has gone
    meanwhile, the session deleted and APIError 499: nobody knows its id, and it held a slot until its
    TTL (a helper's audit: 3 creates with 8,000-token prompts, each client gone after 20 ms, held 3 slots
    for 600 s; the one-shot routes already noticed a client leaving)."""
    if not await request.is_disconnected():
        return rec
    try:
        await delete(state, rec.id)
    except APIError as err:  # (deleted meanwhile: nothing is left)
        log.debug("session %s of a client gone: %s", rec.id, err.message)
    raise client_gone()


async def collect(stream: Stream, request: Request | None = None) -> tuple[list[int], Finished]:
    """Wait for a whole generation; a client that goes away cancels it at once (its `http.disconnect` is
    awaited beside the stream; it was polled every 0.25 s, so a retry at a full pool could find its slot
    still taken), and a kept session then keeps none of its tokens (nothing was handed to the client:
    `Stream.settle`). The whole generation counts as delivered when it is returned (the response carries
    it all). Raises APIError 499 when the client has gone."""
    ids: list[int] = []
    gone = asyncio.ensure_future(_disconnected(request)) if request is not None else None
    get: asyncio.Future | None = None
    try:
        while True:
            get = asyncio.ensure_future(stream.get())
            if gone is not None:
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise client_gone()  # nobody reads it
            got, final = split(await get)
            ids += got
            if final is not None:
                stream.deliver(len(ids))
                return ids, final
    finally:
        for task in (gone, get):  # (this wait itself cancelled: neither is left waiting)
            if task is not None:
                task.cancel()
        stream.settle()  # (cancels the generation unless it is complete)


async def events(stream: Stream, idle: float | None = None) -> AsyncIterator[list]:
    """The stream's items in groups (whatever arrived together); cancels the generation if the
    consumer stops early (a client disconnect cancels the response task). The consumer counts what it
    hands to its transport (`Stream.deliver`) and settles the stream when it is done (`Stream.settle`).
    `idle` (seconds): an empty group after each wait that long with no items (an SSE keep-alive)."""
    finished = False
    try:
        while not finished:
            try:
                async with asyncio.timeout(idle):  # (a get cut short leaves its items queued)
                    items = await stream.get()
            except TimeoutError:
                yield []
                continue
            finished = not isinstance(items[-1], int)
            yield items
    finally:
        if not finished:
            stream.cancel()


def stream_capacity(settings, model: ServedModel) -> int:
    """Undelivered steps a generation's stream holds before its session pauses: `stream_buffer`, or
    for an audio model `audio_stream_buffer_ms` of audio at its sample rate when that is more."""
    if model.kind != "audio":
        return settings.stream_buffer
    return max(settings.stream_buffer, round(model.sample_rate * settings.audio_stream_buffer_ms / 1000))


def frame_ms(model: ServedModel, requested: int | None) -> int | None:
    """A request's `frame_ms` (the schema checked its range), DEFAULT_FRAME_MS when it gives none;
    None for a text model, where a `frame_ms` is a 422 naming it."""
    if model.kind != "audio":
        if requested is not None:
            raise invalid("frame_ms", "frame_ms applies to audio models only")
        return None
    return DEFAULT_FRAME_MS if requested is None else requested


class FrameClock:
    """Send-side timing of one audio stream's frames, into the model's Prometheus metrics: the interval
    between two frames (s4_audio_frame_interval_seconds) and, at the end, the stream's real-time
    factor (s4_audio_stream_realtime_ratio: seconds of audio sent per second since the request)."""

    def __init__(self, model: ServedModel) -> None:
        self.rate, self.metrics = model.sample_rate, model.engine.metrics
        self.start = time.perf_counter()
        self.last: float | None = None
        self.samples = 0

    def sent(self, samples: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.metrics.audio_frame_interval.observe(now - self.last)
        self.last, self.samples = now, self.samples + samples

    def end(self) -> None:
        if self.last is not None and self.last > self.start:
            self.metrics.audio_realtime_factor.observe(self.samples / self.rate / (self.last - self.start))


class Output:
    """Generated ids → what a client receives: text pieces (stop sequences held back) or audio frames
    of `frame_ms` milliseconds each (None: DEFAULT_FRAME_MS; `framer`: the last one shorter; see
    media.AudioFramer).

    Text decoding belongs to the session, not the turn: a generation starts from the unfinished
    character its session held (`job.carry`), and one that does not end its text (a kept session, no
    stop sequence) holds its own unfinished character back for the next turn instead of sending U+FFFD.
    A one-shot request's text ends with it (U+FFFD for bytes nothing can complete any more)."""

    def __init__(
        self,
        model: ServedModel,
        params: SamplingParams,
        encoding: str = "pcm16",
        job: Job | None = None,
        frame_ms: int | None = None,
    ):
        self.kind, self.encoding, self.codec = model.kind, encoding, model.codec
        carry, ends = (job.carry, job.session.ephemeral) if job is not None else (b"", True)
        self.text = None
        if model.kind == "text":
            token_bytes = None if model.vocab is None else model.vocab.token_bytes
            self.text = media.TextAssembler(params.stop, carry, ends, token_bytes)
        self.framer, self.frame_ms = None, frame_ms or DEFAULT_FRAME_MS
        if model.kind == "audio":
            n = media.frame_samples(self.frame_ms, model.sample_rate)
            self.framer = media.AudioFramer(n, encoding, model.codec)

    def text_piece(self, ids: list[int]) -> str:
        return self.text.feed(ids)

    def finish_text(self, final: Finished) -> str:
        return self.text.finish(final.stop_at)


def usage(final: Finished) -> dict:
    """A generation's usage, OpenAI's fields: total_tokens = prompt_tokens + completion_tokens (as on the
    OpenAI routes), prompt_tokens_details.cached_tokens counts the prompt tokens whose state came from the
    prefix cache."""
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
    }


def now_s() -> int:
    return int(time.time())
