"""The server's shared state: settings, models and their engines, sessions, metrics, the session
store; loading, draining and shutdown. Routes and the service layer depend on this module, never on
the app factory (server/app.py), which only wires it into FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import AsyncIterator

from server.config import Settings
from server.decoder import AudioDecoder
from server.errors import APIError, not_found, quoted, unavailable
from server.metrics import Metrics
from server.registry import ServedModel, expected_ids, load_models
from server.sessions import SessionTable, max_seen_bytes
from server.store import StateStore, StoreError, StoreWriter, open_store

log = logging.getLogger("server")


class SessionLocks:
    """One asyncio lock per session id, kept only while a task holds or awaits it: a restore from the
    session store is one at a time per session, not per server (a Redis that stalled made every restore
    wait for the ones before it, 5 s each: the sixth of six requests had its 503 after 30 s)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}  # id → (its lock, the tasks using it)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(session_id, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[session_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks.pop(session_id)
            if users > 1:
                self._locks[session_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class ServerState:
    """Everything the routes share: settings, models and their engines, sessions, metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.sessions = SessionTable()
        self.models: dict[str, ServedModel] = {}
        self.failed: dict[str, str] = {}
        # the configured models not yet loaded nor failed, in load order: each serves as soon as it is
        # loaded (`_serve`), and a request naming one still loading is a 503 naming it (`model`)
        self.loading: list[str] = expected_ids(settings)
        self.loaded = False  # every configured model has loaded or failed (or the load ended)
        self.draining = False
        self.drain_deadline: float | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.store: StateStore | None = None  # the session store (None: sessions live in this process)
        self.writer: StoreWriter | None = None
        self.restoring = SessionLocks()  # one restore from the store at a time per session
        self.fatal: str | None = None  # why nothing can be served (python -m server then exits 1)
        self.on_fatal = None  # set by python -m server: stop the process
        self.stopping = threading.Event()  # set by the drain: loading ends at its next step's boundary
        self.loader: threading.Thread | None = None  # the thread loading the models, while it runs
        self.freeze_gc = False  # set by python -m server: gc.freeze() once the models are loaded
        self.decoder = AudioDecoder(cpu_s=settings.audio_decode_cpu_s)  # prompt audio, in worker processes
        self.decoder_starting = False  # its first worker started as an audio model serves (`_serve`)
        self.built: dict = {}  # set by python -m server: its preflight's built checkpoints (`load_models`)

    @property
    def max_state_blob_bytes(self) -> int:
        """The largest session export a served model makes (what POST /v1/sessions/import accepts): its
        state, a `seen` list of its whole vocabulary, and 1 MiB for the rest of the header. (The header
        had 1 MiB in all: a 267,735-word model's session that had seen most words exported ~2 MB of header,
        and its import was a 413.)"""
        sizes = (m.state_bytes + max_seen_bytes(m.config.vocab_size) for m in self.models.values())
        return max(sizes, default=0) + (1 << 20)

    @property
    def ready(self) -> bool:
        return self.loaded and bool(self.models) and not self.draining

    def check_serving(self) -> None:
        """503 (with Retry-After) while no model is served yet (the first one loading) or the server
        drains: what GET /v1/models answers then (/readyz says "loading" or "draining"). Once one model
        serves, the list answers (with the served ones)."""
        if self.draining:
            raise unavailable("the server is shutting down")
        if not self.loaded and not self.models:
            raise unavailable("models are still loading")

    def still_loading(self, model_id: str) -> bool:
        """Whether `model_id` is a configured model still loading (not yet served, nor failed)."""
        return not self.loaded and model_id in self.loading

    def check_loaded(self, what: str) -> None:
        """503 (with Retry-After) naming the models still loading, if any: `what` is over a limit set by the
        models served so far, which a model still loading (a larger vocabulary or state) may raise."""
        if not self.loaded and self.loading:
            raise unavailable(
                f"{what} is larger than the models served so far take; it may be for a model still loading: "
                f"{', '.join(self.loading)} (GET /readyz lists the models loading)"
            )

    def model(self, model_id: str) -> ServedModel:
        """The served model `model_id`: 503 (with Retry-After) while the server drains, or while that model
        is still loading (a message naming it: the models loaded before it serve meanwhile); 404 if unknown
        or configured but not served (the message then gives the load-time reason, as /readyz does)."""
        if self.draining:
            raise unavailable("the server is shutting down")
        m = self.models.get(model_id)
        if m is not None:
            return m
        if self.still_loading(model_id):
            raise unavailable(f"model {model_id} is still loading (GET /readyz lists the models loading)")
        if model_id in self.failed:
            raise not_found(
                f"model {model_id!r} is configured but not served: {self.failed[model_id]}", param="model"
            )
        alike = [k for k in (*self.models, *self.loading) if k.casefold() == model_id.casefold()]
        hint = ""
        if alike:
            how = "served" if alike[0] in self.models else "loading"
            hint = f" (ids are case-sensitive: {alike[0]} is {how})"
        raise not_found(f"no model {quoted(model_id)}; see GET /v1/models{hint}", param="model")

    async def load(self) -> None:
        try:
            self.store = await asyncio.to_thread(
                open_store, self.settings.session_store, self.settings.session_store_ttl_s
            )
        except StoreError as exc:  # an operator who asked for a store must not silently lose sessions
            log.error("%s", exc)
            self.failed["session_store"] = f"the session store: {exc.public}"
            self._nothing_to_serve(self.failed["session_store"])
            return
        if self.store is not None:  # before the first model serves: its engine writes through it
            self.metrics.add_store_gauges(lambda: self.writer.backlog if self.writer is not None else 0)
            self.writer = StoreWriter(
                self.store,
                self.metrics.store_ops,
                on_stale=self._drop_stale,
                held=self.sessions.has,
                up=self.metrics.store_up,
                error_counter=self.metrics.store_errors,
            )
        loop = asyncio.get_running_loop()

        def loaded(m: ServedModel) -> None:  # (the loader thread)
            loop.call_soon_threadsafe(self._serve, m)

        def failed(key: str, model_id: str, why: str) -> None:
            loop.call_soon_threadsafe(self._not_served, key, model_id, why)

        try:
            _, failures = await self._in_loader_thread(
                load_models, self.settings, self.sessions, self.metrics, self.stopping, loaded, failed,
                self.built,
            )  # fmt: skip
        except Exception as exc:  # never a server that says "loading" for ever with nothing logged
            log.exception("loading the models failed")
            why = f"loading the models failed: {type(exc).__name__}: {exc}"
            if not self.models:
                self._nothing_to_serve(why)
                return
            failures = {**self.failed, **{k: why for k in self.loading}}  # (the served ones go on)
        if self.stopping.is_set():  # stopped while loading: shutdown stops the engines of those served
            return
        # (each model was served by `_serve`, scheduled before this await's result, so all are by now)
        self.failed = failures
        self.loading = []
        if self.freeze_gc:
            # what startup made (modules, models, the state pool) lives as long as the process: out of
            # the cyclic GC's sight, a full collection (which a request that allocates much sets off)
            # scans what requests made, not startup's ~280k objects (140 ms, every stream paused, on the
            # Zen 3 VM). Not in tests' in-process servers, whose frozen cycles would never be freed.
            gc.freeze()
        self.loaded = True
        if not self.models:
            self._nothing_to_serve("; ".join(f"{k}: {v}" for k, v in self.failed.items()) or "no checkpoint")
            return
        if self.failed and self.settings.require_all_models:  # /readyz answers 503 (routes/health.py)
            log.warning("serving %s; not ready (S4_REQUIRE_ALL_MODELS): %s", ", ".join(self.models),
                        "; ".join(f"{k}: {v}" for k, v in self.failed.items()))  # fmt: skip
        else:
            log.info("ready: serving %s", ", ".join(self.models))

    def _serve(self, m: ServedModel) -> None:
        """Serve a model that has just loaded and verified (on the event loop, so no request sees it half
        set up): its engine started and wired to the session store. Not once the server is stopping (the
        drain has begun: the shutdown stops the engines of the models it saw)."""
        if self.stopping.is_set():
            return
        if self.writer is not None:
            m.engine.persist = _persister(m, self.writer)
            m.engine.forget = self.writer.delete
            m.engine.let_go = self.writer.let_go
            m.engine.may_evict = self.writer.may_evict
        m.engine.start()
        self.models[m.id] = m
        self.loading = [k for k in self.loading if k != m.id]
        if m.kind == "audio" and not self.decoder_starting:  # the decoder's first worker, started beside
            # serving: it takes seconds (it imports the codecs, torch with them), which neither the model's
            # readiness nor the event loop waits for; a prompt that comes meanwhile waits for it
            self.decoder_starting = True
            threading.Thread(target=self.decoder.start, name="s4-decoder-start", daemon=True).start()
        if self.loading:
            log.info("model %s serves (still loading: %s)", m.id, ", ".join(self.loading))

    def _not_served(self, key: str, model_id: str, why: str) -> None:
        """A configured model that failed to load: its requests are a 404 with the reason from now on."""
        self.failed[key] = why
        if model_id not in self.models:
            self.loading = [k for k in self.loading if k != model_id]

    async def _in_loader_thread(self, fn, *args):
        """fn(*args) in a daemon thread (self.loader), awaited. Not asyncio.to_thread: asyncio.run waits at
        exit for its executor's threads, so a SIGTERM while the models load waited for all of them (~70 s
        with the shipped models, past a 30 s grace period: a fresh-user trial)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle(ok: bool, value) -> None:
            if not done.done():
                done.set_result(value) if ok else done.set_exception(value)

        def run() -> None:
            try:
                outcome = True, fn(*args)
            except Exception as exc:
                outcome = False, exc
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the loop is closed: the server stopped while this ran
                pass

        self.loader = threading.Thread(target=run, name="s4-loader", daemon=True)
        self.loader.start()
        return await done

    def _nothing_to_serve(self, reason: str) -> None:
        self.loaded, self.fatal, self.loading = True, reason, []
        log.error("no model can be served: %s", reason)
        if self.on_fatal is not None:
            self.on_fatal()

    async def drain(self) -> None:
        """Refuse new work (/readyz and new requests: 503) and let running requests finish, up to
        drain_timeout_s after the first call (a second call waits for the same deadline)."""
        loop = asyncio.get_running_loop()
        self.stopping.set()
        if self.drain_deadline is None:
            self.draining = True
            self.drain_deadline = loop.time() + self.settings.drain_timeout_s
        while any(m.engine.active_requests for m in self.models.values()):
            if loop.time() > self.drain_deadline:
                log.warning("drain timeout: cancelling the remaining requests")
                await self._cancel_running()
                break
            await asyncio.sleep(0.05)

    async def _cancel_running(self) -> None:
        """End every running generation "cancelled" and give its stream a moment to send that (the done
        frame or event) before uvicorn closes the connections: up to CANCEL_GRACE_S for the engines to
        end them, then a little for the event loop to write the last frames."""
        loop = asyncio.get_running_loop()
        for m in self.models.values():
            m.engine.cancel_running()
        deadline = loop.time() + CANCEL_GRACE_S
        while any(m.engine.active_requests for m in self.models.values()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

    async def shutdown(self) -> None:
        """Drain (unless the signal handler already has), then stop the engines (generations still
        running end "cancelled") and write every session's state to the store."""
        await self.drain()
        if self.writer is not None:
            self.writer.begin_final()
        await asyncio.gather(*(asyncio.to_thread(m.engine.stop) for m in self.models.values()))
        # beside the flush (up to CLOSE_WAIT_S for a file a decoder worker is decoding: not added to the stop)
        closing = asyncio.ensure_future(asyncio.to_thread(self.decoder.close))
        if self.writer is not None:  # bounded: S4_SESSION_STORE_FLUSH_TIMEOUT_S in all
            ok, report = await asyncio.to_thread(
                self.writer.stop, self.settings.session_store_flush_timeout_s
            )
            log.log(logging.INFO if ok else logging.ERROR, "session store: %s", report)
        await closing

    def _drop_stale(self, session_id: str, expected: str) -> None:
        """The store refused this replica's write of a session (another replica went on with it): drop
        the copy here, so that its next request restores the stored state. A busy session stays (its
        next write is refused too, and its next turn's version check reloads it), and so does a copy
        reloaded from the store since the write (it no longer builds on `expected`, the version the
        write named)."""
        try:
            rec = self.sessions.claim(session_id)
        except APIError:  # gone already, or a request is running on it
            return
        if not self.writer.builds_on(session_id, expected):
            self.sessions.release(rec)
            return
        model = self.models.get(rec.model)
        try:
            model.engine.call(lambda e: e.drop_copy(rec), bounded=False)
        except APIError:  # the engine is stopping: nothing will use the copy again
            self.sessions.release(rec)
            return
        self.writer.discard(session_id)  # (its version: a restore reads it anew, as `service.drop_stale`'s)


CANCEL_GRACE_S = 1.0  # after the drain timeout: for running generations to end "cancelled" (_cancel_running)


def _persister(model: ServedModel, writer: StoreWriter):
    """The engine's write-through hook for `model` (runs on its engine thread; never blocks)."""

    def persist(rec, raw: bytes, seen: list[int], only_if_missing: bool = False) -> None:
        writer.write(rec.id, model.state_header(rec, seen), raw, only_if_missing)

    return persist
