"""A kept session holds what its client was handed (docs/server.md, "What a dropped turn keeps").

A client that goes away in the middle of a streamed turn (WebSocket text and audio, SSE) leaves its
session holding exactly the tokens the server handed to its connection: the count, the state bit for
bit (equal to a turn that generated only those tokens), and what follows (one-shot generation on
everything before). The clients here close gracefully (a WebSocket close frame, an HTTP half-close)
and read to the end, so they see every frame the server sent before it noticed. A session whose
stream is still being delivered is not idle: its TTL counts from its last frame.
A cancel while the turn's input is being ingested stops between prompt chunks and takes the input
back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from server_support import RawSSE, RawWebSocket, ServerThread, reference, sse_events, wait_for

from model.sampling import SamplingParams
from server.sessions import unpack_state

TEXT, AUDIO = "tiny-text", "tiny-audio"
PROMPT = "ROMEO:"


def exported(client: httpx.Client, sid: str) -> tuple[dict, bytes]:
    """A session's export: (header less its times, raw state)."""
    r = client.get(f"/v1/sessions/{sid}/export")
    assert r.status_code == 200, r.text
    header, raw = unpack_state(r.content)
    for when in ("created", "last_used"):
        header.pop(when, None)
    return header, raw


def idle(client: httpx.Client, sid: str) -> dict:
    assert wait_for(lambda: client.get(f"/v1/sessions/{sid}").json()["status"] == "idle", 10)
    return client.get(f"/v1/sessions/{sid}").json()


def new_session(client: httpx.Client, model: str, prompt: str | None = PROMPT) -> str:
    body = {"model": model} | ({"prompt": prompt} if prompt is not None else {})
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def same_as_a_turn_of(
    client: httpx.Client, sid: str, model: str, prompt: str | None, got: list[int], turn: dict
):
    """The session after a dropped turn is that of a turn that generated only `got` (same settings):
    the same tokens, the same record, the same state bit for bit."""
    twin = new_session(client, model, prompt)
    r = client.post(
        "/v1/generate", json={**turn, "model": model, "session_id": twin, "max_new_tokens": len(got)}
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == got
    (h1, raw1), (h2, raw2) = exported(client, sid), exported(client, twin)
    assert h1 == h2
    assert raw1 == raw2, "the state after the dropped turn differs from a turn that generated only its tokens"
    client.delete(f"/v1/sessions/{twin}")


def continues_like_one_shot(client: httpx.Client, sid: str, got: list[int], model_dirs) -> None:
    """What follows is one-shot generation on the prompt and the tokens the client got."""
    body = {"model": TEXT, "session_id": sid, "max_new_tokens": 30, "seed": 2}
    more = client.post("/v1/generate", json=body).json()["tokens"]
    assert more == reference(model_dirs["text"], list(PROMPT.encode()) + got, SamplingParams(seed=2), 30)


@pytest.fixture(scope="module")
def slow_link(model_dirs):
    """Both tiny models behind a 4 KiB kernel send buffer, so that a client that stops reading soon has
    the server's buffers full, the route blocked in its send and the stream full (the engine paused)."""
    from server import Settings

    settings = Settings(
        checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])],
        stream_buffer=16,
        max_new_tokens=100_000,
        drain_timeout_s=1,
    )
    s = ServerThread(settings, send_buffer=4096).start()
    yield s
    s.stop()


@pytest.fixture
def slow_client(slow_link):
    with httpx.Client(base_url=slow_link.url, timeout=60) as c:
        yield c


def stalled(server: ServerThread, model: str, sid: str) -> bool:
    """The turn on `sid` waits for its client: its stream is full (the route is blocked in a send, the
    engine has paused the session), so the engine has tokens the client was not handed."""
    job = server.state.models[model].engine._running.get(sid)
    return job is not None and job.stream.room() <= 0


def send_blocked(server: ServerThread, sock) -> bool:
    """Whether the server's connection to the client socket `sock` has its writes paused (its transport's
    buffer past the high-water mark: the client reads nothing), so that the route's next send waits for
    the client. Then the route takes nothing more from the stream, and a full stream stays full: the
    engine has paused the session and makes no more tokens until the client reads. (A full stream alone
    is no proof: after every block the engine fills it, until the event loop takes what it holds.)"""
    guard = server.server.config.http.keywords["guard"]  # (server.connections.uvicorn_config's)
    port = sock.getsockname()[1]
    return any(c.client and c.client[1] == port and c.flow.write_paused for c in list(guard.connections))


TURN = {"max_new_tokens": 50_000, "seed": 1, "temperature": 1.0}


def test_a_websocket_closed_mid_turn_leaves_its_session_with_exactly_the_tokens_it_was_sent(
    slow_link, slow_client, model_dirs
):
    client = slow_client
    sid = new_session(client, TEXT)
    ws = RawWebSocket(slow_link.port)
    ws.send_json({"type": "generate", "model": TEXT, "session_id": sid, **TURN})
    assert ws.recv_json()["type"] == "session"
    got: list[int] = []
    while len(got) < 100:
        m = ws.recv_json()
        assert m["type"] == "token", m
        got += m["ids"]
    assert wait_for(lambda: stalled(slow_link, TEXT, sid), 30)
    ws.send_close()
    while True:  # every frame the server sent before it saw the close
        opcode, data = ws.recv_frame()
        if opcode == 8:
            break
        m = json.loads(data)
        assert m["type"] == "token", m  # (no done frame: the turn was not over)
        got += m["ids"]
    ws.close()
    info = idle(client, sid)
    assert (info["generated"], info["tokens"]) == (len(got), len(PROMPT) + len(got))
    same_as_a_turn_of(client, sid, TEXT, PROMPT, got, TURN)
    continues_like_one_shot(client, sid, got, model_dirs)


def test_an_sse_client_gone_mid_turn_leaves_its_session_with_exactly_the_tokens_it_was_sent(
    slow_link, slow_client, model_dirs
):
    client = slow_client
    sid = new_session(client, TEXT)
    sse = RawSSE(slow_link.port, "/v1/generate", {"model": TEXT, "session_id": sid, "stream": True, **TURN})
    got: list[int] = []
    while len(got) < 100:
        e = sse.event()
        assert e["type"] == "token", e
        got += e["ids"]
    # the route blocked in its send, then the stream full: the session paused for good, `made` stays put
    # (waited for the full stream alone, `made` was read at a moment the event loop lagged behind the
    # engine; the route then sent on, and the client got 416 tokens of 400 made: with the test's process
    # stopped 200 ms at a time, as a loaded machine's CPU is taken)
    assert wait_for(lambda: send_blocked(slow_link, sse.sock) and stalled(slow_link, TEXT, sid), 30)
    made = len(slow_link.state.models[TEXT].engine._running[sid].out)
    sse.shutdown()
    try:
        while True:  # every event the server sent before it saw the end of the request's side
            e = sse.event()
            assert e["type"] == "token", e
            got += e["ids"]
    except ConnectionError:
        pass
    sse.close()
    assert len(got) <= made  # nothing made after the client went was sent to it
    info = idle(client, sid)
    assert (info["generated"], info["tokens"]) == (len(got), len(PROMPT) + len(got))
    same_as_a_turn_of(client, sid, TEXT, PROMPT, got, TURN)
    continues_like_one_shot(client, sid, got, model_dirs)


def test_an_audio_websocket_closed_mid_turn_keeps_the_samples_of_the_frames_it_was_sent(
    slow_link, slow_client
):
    client = slow_client
    sid = new_session(client, AUDIO, prompt=None)
    turn = {"max_new_tokens": 200_000, "seed": 3, "temperature": 1.0}
    ws = RawWebSocket(slow_link.port)
    ws.send_json({"type": "generate", "model": AUDIO, "session_id": sid, "audio_encoding": "mulaw", **turn})
    assert ws.recv_json()["type"] == "session"
    header = ws.recv_json()
    assert header["type"] == "audio_header" and header["frame_samples"] == 160
    got: list[int] = []
    while len(got) < 160 * 30:  # 30 frames: past the first rollback point (250 ms = 2,000 samples)
        opcode, data = ws.recv_frame()
        assert opcode == 2
        got += list(data)  # mulaw: one id per byte
    assert wait_for(lambda: stalled(slow_link, AUDIO, sid), 60)
    ws.send_close()
    while (frame := ws.recv_frame())[0] != 8:
        assert frame[0] == 2
        got += list(frame[1])
    ws.close()
    info = idle(client, sid)
    assert info["generated"] == len(got) < 200_000
    assert info["tokens"] == 1 + len(got)  # the silence it started from, then the samples it was sent
    same_as_a_turn_of(client, sid, AUDIO, None, got, turn)


def test_cancel_while_the_prompt_is_ingested_stops_at_a_chunk_and_takes_the_prompt_back(
    server, client, monkeypatch
):
    """A 30 s audio prompt (binary frames, then generate) and a cancel once its ingestion has begun: the
    done frame comes within a few prompt chunks, not after the whole prompt, says cancelled with no
    prompt tokens used, and the session is bit for bit what it was before the turn. The prompt's chunks
    after its first wait until the cancel has reached the turn, so what is counted is chunks, not seconds
    (the cancel's time against a whole ingestion's, 0.5 s, was a loaded machine's to blur; and a test
    thread that looked late could find the whole prompt ingested before it sent the cancel). The session's
    last generation's count included (`generated`: it was left at 0, the cancelled turn's reset)."""
    engine = server.state.models[AUDIO].engine
    chunk = server.state.settings.prefill_chunk_tokens
    samples = bytes((i * 7919) % 256 for i in range(30 * 8000))  # mulaw ids: 30 s at 8 kHz
    ws = RawWebSocket(server.port)
    ws.send_json({"type": "session", "model": AUDIO, "audio_encoding": "mulaw"})
    sid = ws.recv_json()["session_id"]
    ws.sock.sendall(_binary(samples[:4000]))  # a first input: the state to come back to is not empty
    ws.send_json({"type": "append"})
    assert ws.recv_json()["tokens"] == 4000
    ws.send_json({"type": "generate", "max_new_tokens": 3, "seed": 2})  # and a last generation, of 3
    while (frame := ws.recv_frame())[0] != 1 or json.loads(frame[1])["type"] != "done":  # (binary: audio)
        assert frame[0] == 2 or json.loads(frame[1])["type"] != "error", frame
    before = exported(client, sid)
    assert (before[0]["n_tokens"], before[0]["generated"]) == (4003, 3)

    holding, started, real_prefill = [True], threading.Event(), engine.rec.prefill

    def prefill(*args, **kwargs):  # (the engine thread) after the first chunk: once the cancel is in
        if holding[0] and started.is_set():
            assert wait_for(lambda: any(j.cancelled for j in engine._prefilling), 60, 0.001)
        started.set()
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(engine.rec, "prefill", prefill)
    for i in range(0, len(samples), 60_000):
        ws.sock.sendall(_binary(samples[i : i + 60_000]))
    ingested = engine.metrics.prefill_tokens._value.get()
    ws.send_json({"type": "generate", "max_new_tokens": 100, "seed": 1})
    assert started.wait(60)
    ws.send_json({"type": "cancel"})
    while (m := ws.recv_json())["type"] not in ("done", "error"):
        pass
    holding[0] = False
    assert m["type"] == "done" and m["finish_reason"] == "cancelled", m
    # the chunk under way when the cancel came, and at most one picked before it: not the prompt's 938
    assert engine.metrics.prefill_tokens._value.get() - ingested <= 2 * chunk
    assert m["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert exported(client, sid) == before

    # the same prompt, ingested whole this time (an append)
    for i in range(0, len(samples), 60_000):
        ws.sock.sendall(_binary(samples[i : i + 60_000]))
    ws.send_json({"type": "append"})
    assert ws.recv_json()["tokens"] == 4003 + len(samples)
    ws.close()


def _binary(data: bytes) -> bytes:
    """One masked binary WebSocket frame (client to server)."""
    import os

    n, mask = len(data), os.urandom(4)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    key = np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + (np.frombuffer(data, np.uint8) ^ key).tobytes()


# --- the idle timeout counts from the last frame ------------------------------------------------------


@pytest.fixture(scope="module")
def short_ttl(model_dirs):
    """A text server whose sessions expire after 1 s idle, whose engine runs far ahead of a slow reader
    (a large stream buffer) and whose sockets have a 4 KiB kernel send buffer."""
    from server import Settings

    settings = Settings(
        checkpoints=[str(model_dirs["text"])],
        session_ttl_s=1.0,
        stream_buffer=1 << 16,
        max_new_tokens=100_000,
        drain_timeout_s=1,
    )
    s = ServerThread(settings, send_buffer=4096).start()
    yield s
    s.stop()


N_SLOW = 30_000  # tokens: some 300 KB of frames, far more than the socket buffers hold


def test_a_websocket_session_is_not_idle_while_its_frames_wait_for_a_slow_reader(short_ttl):
    engine = short_ttl.state.models[TEXT].engine
    ws = RawWebSocket(short_ttl.port)
    ws.send_json({"type": "generate", "model": TEXT, "prompt": PROMPT, "max_new_tokens": N_SLOW, "seed": 1})
    sid = ws.recv_json()["session_id"]
    assert ws.recv_json()["type"] == "token"
    # the engine is done long before the client reads on; the frames wait in the server's buffers
    assert wait_for(lambda: engine.active_requests == 0, 30)
    time.sleep(2.5)  # more than the TTL (and its housekeeping period) since the engine's last step
    n = 0
    while (m := ws.recv_json())["type"] == "token":
        n += len(m["ids"])
    assert m["type"] == "done" and m["usage"]["completion_tokens"] == N_SLOW, m
    ws.send_json({"type": "generate", "max_new_tokens": 5, "seed": 1})  # at once: the session is there
    first = ws.recv_json()
    assert first["type"] == "token", first
    while (m := ws.recv_json())["type"] == "token":
        pass
    assert m["type"] == "done" and m["session_id"] == sid
    ws.close()


def _slow_last_frame(monkeypatch, module, seconds: float) -> None:
    """`module.turn_landed` (what a streaming route awaits before its done frame or event) made to take
    `seconds` longer: what a slow session store's write, or a done frame waiting on a slow reader,
    costs between the turn's settle and its last frame."""
    from server import service  # noqa: PLC0415

    landed = service.turn_landed

    async def slow(*args, **kwargs) -> None:
        await landed(*args, **kwargs)
        await asyncio.sleep(seconds)

    monkeypatch.setattr(module, "turn_landed", slow)


def test_a_sessions_ttl_counts_from_its_done_frame_not_from_the_settle_before_it(short_ttl, monkeypatch):
    """The README: the idle TTL counts "from the turn's last frame (`done`) handed to the connection". The
    routes settled the turn (the session released: idle) before its done frame, which waits for the
    session's store write first (S4_SESSION_STORE_WRITE_WAIT_S) and then for the client's buffers: a
    session whose done frame or event took longer than its TTL was gone when the client had it (the
    WebSocket's next generate: 404; SSE: session info 404). Now it stays busy until its done is handed
    over, on both routes. (Here 3 s pass between the settle and the done; the TTL is 1 s.)"""
    from server import service  # noqa: PLC0415
    from server.routes import generate  # noqa: PLC0415

    _slow_last_frame(monkeypatch, service, 3.0)  # (the WebSocket route calls service.turn_landed)
    _slow_last_frame(monkeypatch, generate, 3.0)
    ws = RawWebSocket(short_ttl.port)
    ws.send_json({"type": "generate", "model": TEXT, "prompt": PROMPT, "max_new_tokens": 5, "seed": 1})
    sid = ws.recv_json()["session_id"]
    while (m := ws.recv_json())["type"] == "token":
        pass
    assert m["type"] == "done" and m["session_id"] == sid, m
    ws.send_json({"type": "generate", "max_new_tokens": 3, "seed": 1})
    first = ws.recv_json()
    assert first["type"] == "token", first  # (a 404 error frame naming session_id when it was let go)
    while (m := ws.recv_json())["type"] == "token":
        pass
    assert m["type"] == "done" and m["session_id"] == sid and m["usage"]["completion_tokens"] == 3, m
    ws.close()
    with httpx.Client(base_url=short_ttl.url, timeout=30) as c:
        sid = new_session(c, TEXT)
        body = {"model": TEXT, "session_id": sid, "stream": True, "max_new_tokens": 5, "seed": 1}
        events = sse_events(c.post("/v1/generate", json=body))
        assert events[-1]["type"] == "done" and events[-1]["session_id"] == sid, events[-1]
        info = c.get(f"/v1/sessions/{sid}")
        assert info.status_code == 200 and info.json()["tokens"] == len(PROMPT) + 5, info.text


def test_an_sse_session_is_not_idle_while_its_events_wait_for_a_slow_reader(short_ttl):
    engine = short_ttl.state.models[TEXT].engine
    with httpx.Client(base_url=short_ttl.url, timeout=30) as c:
        sid = new_session(c, TEXT)
        body = {"model": TEXT, "session_id": sid, "stream": True, "max_new_tokens": N_SLOW, "seed": 1}
        sse = RawSSE(short_ttl.port, "/v1/generate", body)
        assert sse.event()["type"] == "token"
        assert wait_for(lambda: engine.active_requests == 0, 30)
        time.sleep(2.5)
        assert c.get(f"/v1/sessions/{sid}").json()["status"] == "busy"  # still being delivered
        while (e := sse.event())["type"] == "token":
            pass
        assert e["type"] == "done" and e["usage"]["completion_tokens"] == N_SLOW
        info = c.get(f"/v1/sessions/{sid}")
        assert info.status_code == 200 and info.json()["tokens"] == len(PROMPT) + N_SLOW
        sse.close()


# --- the engine alone, run by hand one loop iteration at a time ------------------------------------


class HandRun:
    """An engine on the tiny text model that a test runs by hand (`engine._iterate()`), with an event
    loop that only the test turns, and the states the engine hands to the store (`written`)."""

    def __init__(self, model_dir, rec=None, **settings) -> None:
        import asyncio

        from model import load
        from server import Settings
        from server.engine import Engine
        from server.metrics import Metrics
        from server.sessions import SessionTable

        self.loop = asyncio.new_event_loop()
        self.settings = Settings(max_sessions=4, **settings)
        self.sessions = SessionTable()
        rec = rec if rec is not None else load(model_dir).to_recurrent()
        self.engine = Engine("m", rec, self.settings, self.sessions, Metrics().for_model("m"))
        self.written: dict[str, tuple[int, int | None, bytes, list[int]]] = {}

    def keep_written(self) -> None:
        """Write-through to `written` (session id → n_tokens, pending, raw state, seen), as to a store."""

        def persist(r, raw: bytes, seen: list[int]) -> None:
            self.written[r.id] = (r.n_tokens, r.pending, raw, seen)

        self.engine.persist = persist

    def session(self, sid: str):
        """A kept session holding PROMPT, claimed for a turn."""
        from server.engine import Job
        from server.sessions import SessionRecord

        s = SessionRecord(id=sid, model="m", slot=self.engine.pool.reserve(), busy=True)
        self.sessions.add(s)
        job = Job(s, list(PROMPT.encode()), fresh=True, future=concurrent.futures.Future())
        self.engine.submit(job)
        while not job.future.done():
            self.engine._iterate()
        s.busy = True  # claimed for the turn
        return s

    def turn(self, s, params: SamplingParams, n: int, capacity: int | None = None):
        from server.engine import Job, Stream

        stream = Stream(self.loop, capacity or self.settings.stream_buffer)
        job = Job(s, [], stream=stream, params=params, max_new_tokens=n)
        self.engine.submit(job)
        return stream, job

    def take(self, stream) -> list:
        """The engine's hand-overs, as the event loop gets them."""
        import asyncio

        self.loop.run_until_complete(asyncio.sleep(0))
        items = []
        while not stream.queue.empty():
            items += self.loop.run_until_complete(stream.get())
        return items

    def handed_until(self, stream, job, n: int) -> list[int]:
        """A client handed every token as it comes, up to the n-th or so, where it goes away in the middle
        of a frame's tokens (not at a rollback mark: something to re-step); the engine then runs ahead."""
        got: list[int] = []
        while True:
            self.engine._iterate()
            ids = [i for i in self.take(stream) if isinstance(i, int)]
            if len(got) + len(ids) < n:
                stream.deliver(len(ids))
                got += ids
                continue
            marks = {m for m, _ in job.marks}
            d = next(m for m in range(n, len(got) + len(ids) + 1) if m not in marks)
            stream.deliver(d - len(got))
            return got + ids[: d - len(got)]

    def twin(self, sid: str, params: SamplingParams, got: list[int]):
        """A session whose turn generated only `got` (a settled, complete stream), for comparison."""
        twin = self.session(sid)
        stream, _ = self.turn(twin, params, len(got), capacity=1 << 20)
        ids: list = []
        while not ids or isinstance(ids[-1], int):
            self.engine._iterate()
            ids += self.take(stream)
        assert ids[:-1] == got
        stream.deliver(len(got))
        stream.settle()
        self.engine._iterate()
        return twin

    def close(self) -> None:
        self.loop.close()


def test_a_rollback_restarts_from_a_recent_mark_not_from_the_start_of_the_turn(model_dirs):
    """A long turn whose client goes away after 2,000 tokens re-steps at most about a stream's capacity
    and a decode block of tokens (from the last rollback mark its client had been handed), not the
    2,000, holds a few state rows meanwhile, and leaves the state of a turn that generated only what the
    client got, bit for bit. The engine is run by hand, one loop iteration at a time."""
    from model import load
    from server.engine import DECODE_BLOCK_MAX_STEPS

    rec = load(model_dirs["text"]).to_recurrent()
    steps: list[int] = []

    class Counting:  # the model, with its single steps counted (the decode runs native blocks)
        def __getattr__(self, name):
            return getattr(rec, name)

        def step(self, tokens, state, out=None):
            steps.append(tokens.shape[0])
            return rec.step(tokens, state, out=out)

    run = HandRun(None, rec=Counting(), stream_buffer=64)
    engine, settings = run.engine, run.settings
    params = SamplingParams(temperature=1.0, seed=5)
    kept = run.session("kept")
    stream, job = run.turn(kept, params, 100_000)
    rows = 0
    got: list[int] = []
    while True:  # a client handed every token as it comes, up to the 2,000th or so
        engine._iterate()
        rows = max(rows, len(job.marks))
        ids = [i for i in run.take(stream) if isinstance(i, int)]
        if len(got) + len(ids) < 2000:
            stream.deliver(len(ids))
            got += ids
            continue
        # then it goes away in the middle of a frame's tokens (not at a mark: something to re-step)
        marks = {n for n, _ in job.marks}
        d = next(n for n in range(2000, len(got) + len(ids) + 1) if n not in marks)
        stream.deliver(d - len(got))
        got += ids[: d - len(got)]
        break
    for _ in range(5):
        engine._iterate()
    assert stream.room() <= 0 and len(job.out) > len(got)  # the engine had run ahead, then paused
    steps.clear()
    stream.settle()  # the route's end: the client was handed `got`
    while kept.busy:
        engine._iterate()
    assert kept.generated == len(got) and kept.n_tokens == len(PROMPT) + len(got)
    assert 0 < len(steps) <= settings.stream_buffer + DECODE_BLOCK_MAX_STEPS and set(steps) == {1}
    assert rows <= 4

    twin = run.twin("twin", params, got)  # a turn that generates only what the client got
    assert torch.equal(engine.pool.row(kept.slot), engine.pool.row(twin.slot))
    assert torch.equal(engine.pool.seen[kept.slot], engine.pool.seen[twin.slot])
    assert (kept.pending, kept.n_tokens) == (twin.pending, twin.n_tokens)
    run.close()


def test_a_client_gone_as_the_engine_stops_is_taken_back_before_its_state_is_written(model_dirs):
    """A client goes away mid-turn and the engine is stopped (shutdown) in the same loop iteration: the
    stop ends the turn, and the take-back it starts (a mark's row, then tokens re-stepped) is completed
    before every session's state is written to the store, which gets the state of a turn that generated
    only what the client got, and the session is not left busy. (The re-stepping was left undone: the
    store got the mark's state row with the record of the delivered count.)"""
    run = HandRun(model_dirs["text"], stream_buffer=16)
    run.keep_written()
    params = SamplingParams(temperature=1.0, seed=5)
    kept = run.session("kept")
    stream, job = run.turn(kept, params, 100_000)
    got = run.handed_until(stream, job, 40)
    run.engine._iterate()  # the engine runs ahead of its client
    assert len(job.out) > len(got)
    stream.settle()  # the client is gone ...
    run.engine._stopping = True  # ... and the shutdown stops the engine before its next iteration
    assert run.engine._iterate() is False

    n_tokens, pending, raw, seen = run.written["kept"]
    reference = HandRun(model_dirs["text"], stream_buffer=16)
    twin = reference.twin("twin", params, got)
    raw_twin, seen_twin = reference.engine.read_slot(twin)
    assert (n_tokens, pending, seen) == (twin.n_tokens, twin.pending, seen_twin)
    assert raw == raw_twin, "the stored state is not that of a turn that generated only what the client got"
    assert not kept.busy and kept.generated == len(got)
    run.close()
    reference.close()


def test_an_sse_event_read_just_before_the_client_closes_is_kept(server, client):
    """The app called with uvicorn's ASGI behaviour played by hand: each event sent is read by the client
    at once, and after its 50th token or so the client closes, its close read by the server in the next
    loop pass (as a client that reads and hangs up at once, or uvloop's order of its I/O and callbacks,
    gives). The session keeps every token of every event sent before the close: the last one included.
    (The route asked Starlette's `is_disconnected` after each send, which waits a loop pass when the
    client is still there: it read that close, and the last event's tokens, read by the client, were
    not kept.)"""
    import asyncio

    sid = new_session(client, TEXT)
    body = json.dumps(
        {"model": TEXT, "session_id": sid, "stream": True, **TURN, "max_new_tokens": 4000}
    ).encode()
    loop = server.state.loop
    read: list[int] = []

    async def call() -> None:
        gone, closed = False, asyncio.Event()
        requested = False

        def hang_up() -> None:
            nonlocal gone
            gone = True
            closed.set()

        async def receive() -> dict:  # uvicorn's: the body, then http.disconnect once the client is gone
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            if not gone:
                await closed.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:  # uvicorn's: what is sent once the client is gone is dropped
            if gone or message["type"] != "http.response.body":
                return
            for line in message["body"].decode().split("\n"):
                if line.startswith("data: ") and json.loads(line[6:])["type"] == "token":
                    read.extend(json.loads(line[6:])["ids"])
            if len(read) >= 50:
                loop.call_soon(hang_up)  # read by the client, which then closes

        headers = [(b"content-type", b"application/json"), (b"accept", b"text/event-stream"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/generate", "raw_path": b"/v1/generate",
                 "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", server.port), "state": {}}  # fmt: skip
        await server.app(scope, receive, send)

    asyncio.run_coroutine_threadsafe(call(), loop).result(60)
    info = idle(client, sid)
    assert len(read) >= 50
    assert (info["generated"], info["tokens"]) == (len(read), len(PROMPT) + len(read))
    client.delete(f"/v1/sessions/{sid}")


def test_a_turn_still_being_delivered_when_the_engine_stops_is_stored_with_what_its_client_got(model_dirs):
    """A turn over in the engine whose route has handed its client 25 of its 40 tokens and has not settled
    it when the engine stops (a slow reader at shutdown: uvicorn closes the connections, and a cancelled
    SSE response's stream is settled only once it is collected): the store gets the state of a turn that
    generated those 25 tokens, not the engine's 40, and the session is not left busy."""
    run = HandRun(model_dirs["text"], stream_buffer=64)
    run.keep_written()
    params = SamplingParams(temperature=1.0, seed=7)
    kept = run.session("kept")
    stream, job = run.turn(kept, params, 40)
    items: list = []
    while not items or isinstance(items[-1], int):
        run.engine._iterate()
        items += run.take(stream)
    got = items[:25]
    stream.deliver(len(got))  # and no settle before the stop
    run.engine._stopping = True
    assert run.engine._iterate() is False

    n_tokens, pending, raw, seen = run.written["kept"]
    reference = HandRun(model_dirs["text"], stream_buffer=64)
    twin = reference.twin("twin", params, got)
    raw_twin, seen_twin = reference.engine.read_slot(twin)
    assert (n_tokens, pending, seen) == (twin.n_tokens, twin.pending, seen_twin)
    assert raw == raw_twin, "the stored state holds tokens its client was not handed"
    assert not kept.busy and kept.generated == len(got)
    run.close()
    reference.close()
