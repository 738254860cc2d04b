"""WS /v1/stream: many turns on one session over one socket.

Client → server: JSON control frames (`session`, `generate`, `append`, `cancel`; see server/schemas.py),
and for audio models binary frames of prompt samples (pcm16 = s16le, or mulaw = one id per byte).
Server → client: `session` (bound), `token` frames (text: ids + text), for audio models an
`audio_header` (sample_rate, encoding, frame_ms, frame_samples) then binary frames of exactly
`frame_samples` samples each (the generation's last frame: the rest), `appended`, `done`
(finish_reason, usage) and `error` frames (code + message). A bad message gets an error frame and
the socket stays usable; an oversized frame closes it with code 1009.

The socket binds to one session on its first `session`, `generate` or `append` message: a new one
(deleted when the socket closes) or an existing one (`session_id`, kept; `model` may be left out: the
session's). A bound session that the idle TTL evicted comes back from the session store; one that is
gone (deleted, or expired with no store) gets a 404 naming `session_id`, and the socket is unbound
(`Connection.check_bound`).
"""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnected

from server import media, service
from server.auth import KEY_SUBPROTOCOL_PREFIX, SUBPROTOCOL
from server.engine import Stream
from server.errors import (
    APIError,
    invalid,
    json_limit_reason,
    malformed_json,
    prompt_too_long,
    refuse,
    too_large,
    validation_error,
)
from server.json_budget import over_budget_message, route_budget, text_over_budget
from server.logs import clipped
from server.registry import ServedModel
from server.schemas import WSAppend, WSCancel, WSGenerate, WSMessage, WSSession
from server.state import ServerState

router = APIRouter()
log = logging.getLogger("server.ws")


def parse_message(text: str) -> WSSession | WSGenerate | WSAppend | WSCancel:
    """A control frame, parsed as the HTTP routes parse a body: pydantic's JSON parser refuses a lone
    surrogate's escape ("\\ud800"), which JSON allows and Python's json takes, so such a message is
    parsed by Python's json and then validated, and the field that holds it is named (media.text_ids:
    422 naming prompt) instead of "malformed JSON". Raises pydantic's ValidationError, or for a message
    that is not JSON the HTTP routes' 400 (errors.malformed_json: Python's json reason and where)."""
    try:
        return WSMessage.validate_json(text)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            raise
        try:
            data = json.loads(text)
        except json.JSONDecodeError as bad:
            raise malformed_json(bad.msg, bad.pos) from None
        except (ValueError, RecursionError) as limit:  # (nesting, an integer's digits: as the HTTP routes)
            raise malformed_json(json_limit_reason(limit)) from None
        return WSMessage.validate_python(data)


def turn_message(text: str) -> bool:
    """Whether a refused control frame is a `generate` or `append` (the messages that use the buffered audio
    prompt), read from its JSON whatever else is wrong with it; False for text that is not JSON."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("type") in ("generate", "append")


class Connection:
    def __init__(self, ws: WebSocket, st: ServerState) -> None:
        self.ws, self.st = ws, st
        self.model: ServedModel | None = None
        self.session_id: str | None = None
        self.owns_session = False
        self.encoding = "pcm16"
        self.audio_ids: list[int] = []  # prompt samples received as binary frames
        # a binary frame refused (the buffer over max_audio_s, a malformed frame) refuses the whole prompt:
        # the frames after it are discarded, and the generate/append that would use it is refused too
        self.refused_prompt: APIError | None = None
        self.stream: Stream | None = None
        self.pump: asyncio.Task | None = None

    async def send(self, frame: dict) -> None:
        await self.ws.send_text(json.dumps(frame))

    async def run(self) -> None:
        limit = self.st.settings.ws_max_frame_bytes
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text, data = msg.get("text"), msg.get("bytes")
            if len(text or data or b"") > limit:  # uvicorn enforces it first (ws_max_size)
                await self.ws.close(code=1009, reason=f"frame larger than {limit} bytes")
                return
            try:
                if text is not None:
                    await self.on_message(text)
                elif data is not None:
                    self.on_audio(data)
            except APIError as err:
                await self.send_error(err)

    async def send_error(self, err: APIError) -> None:
        """An error frame, counted (`s4_websocket_errors_total{code}`) and logged with its reason: a
        refusal on the socket was in neither the metrics nor the log (an HTTP request's is in both)."""
        self.st.metrics.websocket_errors.labels(str(err.status)).inc()
        log.info("error frame %d: %s", err.status, clipped(err.message))
        await self.send(err.frame())

    async def on_message(self, text: str) -> None:
        """One control frame. A `generate` or `append` that is refused, for any reason, discards the audio
        prompt buffered for it from binary frames (its error says so): the client sends it again with the
        next one. It had been kept by some refusals (a bad setting, a 409, the session gone: then a new
        session, even a text model's, started with those samples as its prompt, a hidden turn) and
        discarded by others, and a client could not tell which. The error keeps its `retry_after` (a 503
        or 429: it was dropped, so that client alone got no Retry-After)."""
        try:
            await self.handle(text)
        except APIError as err:
            if self.audio_ids and turn_message(text):
                n, self.audio_ids = len(self.audio_ids), []
                raise APIError(err.status, f"{err.message} (the {n} audio prompt samples buffered for it are "
                               "discarded: send them again)", param=err.param,
                               retry_after=err.retry_after) from None  # fmt: skip
            raise

    async def handle(self, text: str) -> None:
        budget, _ = route_budget("/v1/stream", self.st.settings.max_prompt_tokens)
        if (kind := text_over_budget(text, budget)) is not None:  # before parsing (server/json_budget.py)
            self.st.metrics.requests_refused.labels("json_structure").inc()
            raise too_large(over_budget_message(kind, budget, what="message"))
        try:
            msg = parse_message(text)
        except ValidationError as exc:
            errors = exc.errors()
            for e in errors:  # drop the union tag from the location
                loc = e.get("loc", ())
                if loc and loc[0] in ("session", "generate", "append", "cancel"):
                    e["loc"] = loc[1:]
                if e.get("type", "").startswith("union_tag"):
                    e["loc"] = ("type",)
                if e.get("type") == "union_tag_not_found":  # (pydantic: "Unable to extract tag using ...")
                    e["msg"] = "Field required: a message's type is session, generate, append or cancel"
            raise validation_error(errors) from None
        if isinstance(msg, (WSGenerate, WSAppend)) and self.refused_prompt is not None:
            self.refused_prompt, err = None, self.refused_prompt
            raise APIError(
                err.status,
                f"this {msg.type} is refused: the audio prompt sent for it in binary frames was refused "
                f"({err.message}), and the frames after that were discarded; nothing was "
                f"{'generated' if isinstance(msg, WSGenerate) else 'appended'}. Send the prompt again",
                param="audio",
                retry_after=err.retry_after,
            )
        if isinstance(msg, WSCancel):
            # With nothing running a cancel is a no-op, answered by nothing: it crossed its turn's done
            # frame on the way (a client cannot avoid that race). A 409 had answered it, and a client that
            # had sent its next generate meanwhile read that error as the generate's refusal (error frames
            # name no request) while the generate ran on unseen (a helper's audit: 9 turns in 150).
            if self.stream is not None:
                self.stream.cancel()
            return
        running = self.pump is not None and not self.pump.done()
        if running and not isinstance(msg, WSSession):
            raise APIError(409, "a generation is running on this socket: wait for its done frame, or cancel")
        # A `session` message is answered during a turn too (it was a 409, which a client read as the turn's
        # failure); the turn's session is busy with it, so there (check_bound would unbind a socket whose
        # session a DELETE is taking away under the turn, before its done frame)
        if self.session_id is not None and not running:
            await self.check_bound()
        if isinstance(msg, WSSession):
            target = await self.target(msg)
            encoding = self.encoding_for(msg, target)
            await self.bind(msg, target)
            self.encoding = encoding
            await self.send(self.session_frame())  # (on a bound socket too: the reply a client waits for)
            return
        # everything about the message that needs no session is checked before one is bound, so a
        # refused first message leaves the socket as it was: no session, no model
        target = await self.target(msg)
        if isinstance(msg, WSGenerate):
            n = service.new_tokens(self.st, target, msg)  # (the checkpoint's default when it names none)
            service.check_new_tokens(self.st, n, model=target)
            ms = service.frame_ms(target, msg.frame_ms)  # a text model refuses frame_ms
            params = service.sampling_params(target, msg)
        ids = await self.prompt(target, msg)
        if self.session_id is not None and not service.still_held(self.st, self.session_id):
            await self.check_bound()  # (evicted while the prompt was read: restored, or a 404 if gone)
        if isinstance(msg, WSGenerate):  # (an empty text prompt on a new or empty session: nothing to do)
            service.check_input(self.st, target, self.session_id or msg.session_id, ids)
        encoding = self.encoding_for(msg, target)
        binds = self.session_id is None
        await self.bind(msg, target)
        try:  # a first message refused here (the session busy: 409; the queue full: 429) binds nothing
            if isinstance(msg, WSAppend):
                rec, usage = await service.append(self.st, self.model, self.session_id, ids)
            else:
                stream, job = service.start_generation(self.st, self.model, self.session_id, ids, params, n)
        except APIError:
            if binds:
                await self.unbind()
            raise
        self.encoding, self.audio_ids = encoding, []
        if isinstance(msg, WSGenerate):
            # held before the session frame's send, which raises when the client has gone: `close` then
            # settles the stream (cancelled, the session as before the turn). Set after that send, it was
            # never settled, and a kept session stayed busy (409) until deleted, its generation paused
            self.stream = stream
        if binds:
            await self.send(self.session_frame())
        if isinstance(msg, WSAppend):
            await self.send({"type": "appended", "session_id": rec.id, "tokens": rec.n_tokens,
                             "usage": usage})  # fmt: skip
            return
        out = service.Output(self.model, params, self.encoding, job, ms)
        self.pump = asyncio.create_task(self.forward(stream, out))

    async def check_bound(self) -> None:
        """The bound session, brought back from the session store if it was evicted there after its TTL;
        if it is gone (deleted, or expired with no store), the socket is unbound, so that its next
        message naming a model starts a new session, and a 404 says so."""
        await service.restore(self.st, self.session_id)
        if self.st.sessions.has(self.session_id):
            return
        sid, ttl = self.session_id, self.st.settings.session_ttl_s
        # unbound as a new socket is: no model, and no audio prompt or encoding of the one that was bound
        self.model, self.session_id, self.owns_session = None, None, False
        n = len(self.audio_ids)
        self.audio_ids, self.encoding, self.refused_prompt = [], "pcm16", None
        raise APIError(
            404,
            f"this socket's session {sid} is gone: it was deleted, or it expired after {ttl:g} s idle "
            "(S4_SESSION_TTL_S). The socket is unbound: a message naming a model starts a new session"
            + (f" (the {n} audio prompt samples buffered are discarded: send them again)" if n else ""),
            param="session_id",
        )

    async def target(self, msg: WSSession | WSGenerate | WSAppend) -> ServedModel:
        """The model `msg` runs on: the bound one (the message may not name another model or session),
        or on a first message the one it names (404 for an unknown id) or, naming none, its session's
        (`service.request_model`: restored from the session store if need be; 404 naming session_id
        for an unknown one). Binds nothing. While the server drains, a 503 (`ServerState.model`), as
        for any new request: a socket bound before the drain starts no new turn either."""
        if self.session_id is not None:
            if msg.model is not None and msg.model != self.model.id:
                raise invalid("model", f"this socket is bound to model {self.model.id}")
            if msg.session_id is not None and msg.session_id != self.session_id:
                raise invalid("session_id", f"this socket is bound to session {self.session_id}")
            return self.st.model(self.model.id)
        if msg.model is None and msg.session_id is None:
            raise invalid(
                "model", "the socket's first message must name a model, or a session_id to continue"
            )
        return await service.request_model(self.st, msg.model, msg.session_id)

    def encoding_for(self, msg: WSSession | WSGenerate | WSAppend, model: ServedModel) -> str:
        """The socket's audio encoding once `msg` is taken (set by the caller only then: a refused message
        changes nothing). An `audio_encoding` for a text model is a 422 naming it, as `frame_ms` is (it
        was taken silently)."""
        if msg.audio_encoding is None:
            return self.encoding
        if model.kind != "audio":
            raise invalid(
                "audio_encoding", f"audio_encoding applies to audio models only; {model.id} is text"
            )
        media.check_encoding(msg.audio_encoding, model.codec, model.id)
        return msg.audio_encoding

    def session_frame(self) -> dict:
        """The `session` frame: the bound session, its model and, for audio, the rate and encoding."""
        model = self.model
        frame = {"type": "session", "session_id": self.session_id, "model": model.id, "kind": model.kind}
        if model.kind == "audio":
            frame |= {"sample_rate": model.sample_rate, "encoding": self.encoding}
        return frame

    async def unbind(self) -> None:
        """Undo `bind` for a first message refused after it: the session it made is deleted, one it
        named is left as it is, and the socket is as new."""
        sid, owned = self.session_id, self.owns_session
        self.model, self.session_id, self.owns_session = None, None, False
        if owned:
            await self.delete_quietly(sid)

    async def bind(self, msg: WSSession | WSGenerate | WSAppend, model: ServedModel) -> None:
        """Bind the socket to a session of `model` (`target(msg)`) unless it is bound already: the one
        `msg` names, or a new one (deleted when the socket closes). The caller sends the `session` frame
        (`session_frame`) once the message is taken."""
        if self.session_id is not None:
            return
        if msg.session_id is not None:
            await service.restore(self.st, msg.session_id)
            rec = self.st.sessions.get(msg.session_id)
            if rec.model != model.id:
                raise invalid("model", f"session {rec.id} belongs to model {rec.model!r}")
        else:
            rec, _ = await service.create_session(self.st, model, [])
            self.owns_session = True
        self.model, self.session_id = model, rec.id

    async def prompt(self, m: ServedModel, msg: WSGenerate | WSAppend) -> list[int]:
        """The message's prompt ids for model m, after the audio samples buffered from binary frames
        (emptied by `handle` once the turn starts, and by `on_message` when it is refused); raises
        APIError (413 too long, 422 bad) naming the field. An audio file is decoded off the event loop
        (service.read_prompt)."""
        ids = await service.read_prompt(self.st, m, msg.prompt, msg.prompt_audio)
        ids = self.audio_ids + ids  # (the buffer is emptied once the turn starts: `handle`)
        service.check_prompt(self.st, ids, "prompt" if m.kind == "text" else "prompt_audio", m)
        return ids

    def on_audio(self, data: bytes) -> None:
        """Buffer a binary frame of prompt samples for the next generate/append. A frame that is refused
        (the buffer would pass max_audio_s: 413; a malformed frame: 422) refuses the whole prompt: the
        buffer is emptied, the frames after it are discarded and the next generate or append is refused
        (`refused_prompt`), so no turn runs on what is left of a prompt the client was told is refused."""
        if self.model is None or self.model.kind != "audio":
            raise invalid("audio", "binary frames are audio prompt samples: bind an audio model first")
        if self.refused_prompt is not None:
            return  # the rest of a refused prompt
        limit, setting = service.prompt_limit(self.st, self.model)
        samples = len(data) if self.encoding == "mulaw" else len(data) // 2  # counted before converting
        try:
            if len(self.audio_ids) + samples > limit:
                what = f"buffered audio prompt is longer than {limit} samples ({setting})"
                raise prompt_too_long(what, "audio")
            self.audio_ids += media.audio_frame_ids(data, self.encoding, self.model.codec)
        except APIError as err:
            self.audio_ids, self.refused_prompt = [], err
            raise APIError(
                err.status,
                f"{err.message}: the whole prompt is refused; binary frames are discarded until the next "
                "generate or append, which is refused too",
                param=err.param,
                retry_after=err.retry_after,
            ) from None

    async def forward(self, stream: Stream, out: service.Output) -> None:
        """Send a generation's frames; a slow reader blocks here, which pauses the session. A frame's
        tokens count as delivered once its send has returned (a send on a closed or closing socket
        raises); the stream is settled after the done frame, or when the socket is gone
        (`Stream.settle`: the session then keeps only the delivered tokens)."""
        model, framer = self.model, out.framer
        try:
            if framer is not None:
                clock = service.FrameClock(model)
                await self.send({"type": "audio_header", "sample_rate": model.sample_rate,
                                 "encoding": out.encoding, "channels": 1, "frame_samples": framer.samples,
                                 "frame_ms": out.frame_ms})  # fmt: skip
            async for items in service.events(stream):
                try:
                    ids, final = service.split(items)
                except APIError as err:
                    await self.send_error(err)
                    return
                if ids and framer is None:
                    await self.send({"type": "token", "ids": ids, "text": out.text_piece(ids)})
                    stream.deliver(len(ids))
                elif ids:
                    await self.send_frames(framer.feed(ids), framer, clock, stream)
                if final is not None:
                    if framer is not None:
                        if (last := framer.flush()) is not None:  # the last frame: the rest
                            await self.send_frames([last], framer, clock, stream)
                        clock.end()
                    elif rest := out.finish_text(final):
                        await self.send({"type": "token", "ids": [], "text": rest})
                    reason, use = final.finish_reason, service.usage(final)
                    await service.turn_landed(self.st, stream, hold=True)  # (in the store first)
                    await self.send({"type": "done", "finish_reason": reason, "usage": use,
                                     "session_id": self.session_id})  # fmt: skip
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket is gone; events() cancelled the generation
        finally:
            stream.settle()
            stream.release()  # (a done frame handed over: the session is idle from now)
            self.stream = None

    async def send_frames(self, frames: list, framer, clock: service.FrameClock, stream: Stream) -> None:
        """One binary message per frame, each timed on the send side (Prometheus) and its samples
        counted as delivered once sent."""
        for frame in frames:
            await self.ws.send_bytes(framer.encode(frame))
            stream.deliver(len(frame))
            clock.sent(len(frame))

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.settle()  # (the pump may be cancelled before it ever ran)
        if self.pump is not None:
            self.pump.cancel()
        # While draining the whole table goes with the process (and deleting would be refused: 503).
        if self.owns_session and self.session_id is not None and not self.st.draining:
            await self.delete_quietly(self.session_id)

    async def delete_quietly(self, sid: str) -> None:
        """Delete the socket's own session, also from the session store when it was evicted there (idle TTL,
        slots full: `service.delete_unheld`; its stored state had stayed, and continued by its id, for the
        store's TTL). One already gone (it expired while the socket sat idle: the documented TTL path, which
        had logged a warning at every such close) is not news; any other refusal is logged, and the session
        expires instead."""
        try:
            if not await service.delete_unheld(self.st, sid):
                await service.delete(self.st, sid)
        except APIError as err:
            level = logging.DEBUG if err.status == 404 else logging.WARNING
            log.log(level, "could not delete session %s of a closed socket: %s", sid, err.message)


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    # Browsers fail a socket whose server selects none of the subprotocols they offered; the demo page
    # offers `s4` (and, with API keys, the key subprotocol, which is never selected: server/auth.py).
    offered = ws.scope.get("subprotocols", ())
    if SUBPROTOCOL not in offered and any(p.startswith(KEY_SUBPROTOCOL_PREFIX) for p in offered):
        # the key subprotocol alone: accepted with none selected, which a browser then fails (1006, no
        # reason given); a 400 that says what to offer instead
        why = (f"offer the subprotocol {SUBPROTOCOL!r} beside the key subprotocol "
               f"({KEY_SUBPROTOCOL_PREFIX}…): the server selects {SUBPROTOCOL!r}, never the key")  # fmt: skip
        err = APIError(400, why, param="Sec-WebSocket-Protocol")
        ws.app.state.server.metrics.websocket_errors.labels("400").inc()
        await refuse(ws.scope, ws.receive, ws.send, err)
        return
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    conn = Connection(ws, ws.app.state.server)
    try:
        await conn.run()
    except (WebSocketDisconnect, WebSocketDisconnected):
        # (Disconnected: a send after another send found the socket gone, the audio pump's at the
        # protocol's own close, 1008 or 1009: Starlette marked the socket closed and refuses every send)
        pass
    finally:
        await conn.close()


class UpgradeRequired(APIError):
    """426 for a plain HTTP request to the WebSocket endpoint, with `Upgrade: websocket` (RFC 9110 15.5.22
    and 7.8: a 426 MUST carry Upgrade, and an Upgrade field is named in Connection)."""

    def __init__(self) -> None:
        super().__init__(426, "/v1/stream is a WebSocket endpoint: open it with a WebSocket handshake "
                         "(ws:// or wss://, Upgrade: websocket); HTTP streaming is POST /v1/generate with "
                         '"stream": true (server-sent events)')  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Upgrade": "websocket", "Connection": "Upgrade"}


@router.get("/v1/stream", include_in_schema=False)
async def stream_over_http() -> None:
    """GET /v1/stream without a WebSocket handshake (curl, a browser's address bar, a proxy that dropped
    the Upgrade header): a 404 had said no such route exists."""
    raise UpgradeRequired()
