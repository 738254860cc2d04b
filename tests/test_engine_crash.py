"""An engine thread that dies of a bug: its requests fail, later ones get 503 at once (they used to sit
in an inbox nobody read, forever), /readyz says why, and the other models keep serving."""

import asyncio
import concurrent.futures

import httpx
import pytest
from server_support import ServerThread

from model.sampling import SamplingParams
from server import Settings


def test_a_crashed_engine_refuses_with_503_instead_of_hanging_and_readyz_names_it(model_dirs):
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])],
                              drain_timeout_s=1)).start()  # fmt: skip
    try:
        with httpx.Client(base_url=s.url, timeout=20) as c:
            assert c.get("/healthz").json() == {"status": "alive"}
            req = {"model": "tiny-text", "prompt": "to be", "max_new_tokens": 4, "seed": 1}
            assert c.post("/v1/generate", json=req).status_code == 200
            engine = s.state.models["tiny-text"].engine

            def broken_step(*args, **kwargs):
                raise RuntimeError("a bug in the step")

            engine.rec.step = broken_step  # the next decode step raises on the engine thread
            engine.rec.decode_block = broken_step  # (the native decode block as well)
            r = c.post("/v1/generate", json=req)
            assert r.status_code == 500 and "failed" in r.json()["error"]["message"], r.text
            for call in (
                lambda: c.post("/v1/generate", json=req),
                lambda: c.post("/v1/sessions", json={"model": "tiny-text", "prompt": "x"}),
                lambda: c.post(
                    "/v1/completions", json={"model": "tiny-text", "prompt": "x", "max_tokens": 2}
                ),
            ):
                r = call()  # answered at once (the client's 20 s timeout would fail a hang)
                assert r.status_code == 503, r.text
                assert "engine of model tiny-text failed (RuntimeError)" in r.json()["error"]["message"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "tiny-text failed" in ready.json()["reason"]
            # liveness fails too, so that an orchestrator restarts the server (readiness never does)
            alive = c.get("/healthz")
            assert alive.status_code == 503, alive.text
            assert alive.json() == {"status": "engine_crashed", "models": ["tiny-text"]}
            audio = {"model": "tiny-audio", "max_new_tokens": 8, "seed": 1}
            assert c.post("/v1/generate", json=audio).status_code == 200  # the other model still serves
            metrics = c.get("/metrics").text
            assert 's4_engine_crashes_total{model="tiny-text"} 1.0' in metrics
            assert 's4_engine_crashes_total{model="tiny-audio"} 0.0' in metrics
    finally:
        s.stop()


# --- every future the engine hands out is answered when its thread dies ------------------------------


def _engine(model_dirs):
    """An engine on the tiny text model that the test runs on its own thread (`engine._loop()` returns
    once the engine has crashed), with a store hook, and kept sessions "s", "t" and "u" on it."""
    from test_server_delivery import HandRun

    run = HandRun(model_dirs["text"])
    run.engine.persist = lambda rec, raw, seen: None
    for sid in "stu":
        run.sessions.release(run.session(sid))
    return run


def _ingest(run, ids, sid="s"):
    import concurrent.futures

    from server.engine import Job

    rec = run.sessions.claim(sid)
    job = Job(rec, ids, future=concurrent.futures.Future())
    run.engine.submit(job)
    return job


def _crash_admitting(engine, tokens: list[int]) -> None:
    """The engine's admission (`_start`) raises for the job whose tokens are `tokens`: a bug on its thread."""
    start = engine._start

    def broken_start(job):
        if job.tokens == tokens:
            raise RuntimeError("a bug while admitting")
        start(job)

    engine._start = broken_start


def test_a_crash_while_admitting_answers_the_work_admitted_with_it(model_dirs):
    """A bug while one item of an admission is handled: the items taken with it (a control call, an ingest
    job, a generation's stream) are answered with the crash's error. (Before, they were dropped: their
    waiters, which a cancel no longer ends (`service.engine_answer`), waited for ever.)"""
    from server.engine import Failed, Job, Stream

    run = _engine(model_dirs)
    engine = run.engine
    _crash_admitting(engine, [1])
    first = _ingest(run, [1])  # its admission raises
    call = engine.call(lambda e: "done")
    second = _ingest(run, [2], "t")
    stream = Stream(run.loop, 4)
    rec = run.sessions.claim("u")
    engine.submit(Job(rec, [3], stream=stream, params=SamplingParams(seed=1), max_new_tokens=2))
    engine._loop()  # (returns after the crash)
    assert engine.crashed is not None
    for fut in (first.future, call, second.future):
        assert fut.done() and fut.exception().status == 500, fut
    items = run.take(stream)
    assert isinstance(items[-1], Failed) and items[-1].error.status == 500


def test_a_crash_leaves_no_request_queued_and_no_one_shot_slot_held(model_dirs):
    """The gauges of a crashed engine's model come back down: every request and call it answered with the
    crash has left the queue (s4_queue_depth 0) and every one-shot request's slot is free
    (s4_active_sessions, s4_state_resident_bytes 0; kept sessions keep theirs). Before, a crash in a
    prompt's prefill left its request queued and its slot in use for ever: the gauges read 1 and 4,096
    bytes after the 500, with nothing running."""
    from server_support import metric

    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])], drain_timeout_s=1)).start()
    try:
        with httpx.Client(base_url=s.url, timeout=20) as c:

            def broken_prefill(*args, **kwargs):
                raise RuntimeError("a bug in the prefill")

            s.state.models["tiny-text"].engine.rec.prefill = broken_prefill
            req = {"model": "tiny-text", "prompt": "to be, or not", "max_new_tokens": 4, "seed": 1}
            r = c.post("/v1/generate", json=req)
            assert r.status_code == 500 and "failed" in r.json()["error"]["message"], r.text
            for name in ("s4_queue_depth", "s4_active_sessions", "s4_state_resident_bytes"):
                assert metric(c, name, "tiny-text") == 0, name
    finally:
        s.stop()

    # the work admitted with the crash, and behind it: one-shot jobs, a kept session's job, a bounded call
    from test_server_delivery import HandRun

    from server.engine import Job, Stream

    run = HandRun(model_dirs["text"])  # 4 slots
    run.sessions.release(run.session("s"))
    engine = run.engine
    _crash_admitting(engine, [1])
    kept = engine.pool.in_use  # session s
    for i, tokens in enumerate(([5, 6], [1], [7, 8])):  # started, crashing, pending
        rec = engine.new_session(f"one-shot-{i}", ephemeral=True)
        engine.submit(Job(rec, tokens, fresh=True, stream=Stream(run.loop, 4), params=SamplingParams(seed=1),
                          max_new_tokens=2))  # fmt: skip
    call = engine.call(lambda e: "done")
    ingest = _ingest(run, [9, 9])
    assert engine.queued == 5 and engine.pool.in_use == kept + 3
    engine._loop()
    assert engine.crashed is not None and call.done() and ingest.future.done()
    assert engine.queued == 0 and engine.pool.in_use == kept
    assert not any(run.sessions.has(f"one-shot-{i}") for i in range(3))


def test_a_crash_answers_the_settles_and_the_calls_it_was_handling(model_dirs):
    """A bug while a turn is settled, or while a job's answer is on its way (the store hook raises): the
    other settles' `queued_write` futures (a route waits on them before its done frame) and the job's own
    future are answered. (Before, the route waited its whole S4_SESSION_STORE_WRITE_WAIT_S, and an ingest
    whose record was handed to the store hook waited for ever.)"""
    from server.engine import Job, Stream

    run = _engine(model_dirs)
    engine = run.engine
    turns = []
    for sid in "st":
        rec = run.sessions.claim(sid)
        job = Job(rec, [], stream=Stream(run.loop, 4), params=SamplingParams(seed=1), max_new_tokens=1)
        turns.append(engine.settle(job, 0, True))
    assert all(t is not None for t in turns)

    def broken_settled(*args):
        raise RuntimeError("a bug while settling")

    engine._settled = broken_settled
    engine._loop()
    assert all(t.done() for t in turns)

    run = _engine(model_dirs)
    engine = run.engine

    def broken_persist(rec, raw, seen):
        raise RuntimeError("a bug in the store hook")

    engine.persist = broken_persist
    job = _ingest(run, [4, 5])
    engine._loop()
    assert job.future.done() and job.future.exception().status == 500


def test_a_crash_while_a_turn_is_taken_back_fails_the_other_requests_still(model_dirs):
    """A kept session's turn whose client went away is taken back after its final event (`_rollback`:
    its tokens re-stepped, the job still running). A crash then failed that job's stream too: a second final
    event, on a queue its gone client had left full (its unread tokens and the first final), so the event
    loop's hand-over raised QueueFull and the streams after it in the same hand-over never got their error:
    those requests waited for ever."""
    from server.engine import Failed, Finished

    run = _engine(model_dirs)
    engine = run.engine
    engine._max_steps = 1  # one token an iteration: each its own item on the stream's queue
    a, a_job = run.turn(run.sessions.claim("s"), SamplingParams(seed=1), 100, capacity=3)
    engine._iterate()
    assert len(run.take(a)) == 1
    a.deliver(1)  # its client was handed its first token, then reads no more
    while a.room() > 0:
        engine._iterate()
    b, _ = run.turn(run.sessions.claim("t"), SamplingParams(seed=2), 100)
    engine._iterate()
    a.settle()  # its client is gone: the turn is taken back to the one token it was handed
    engine._iterate()
    run.loop.run_until_complete(asyncio.sleep(0))
    assert a_job.ended and a_job in engine._prefilling and a.queue.full()  # (its Finished last)

    def broken_step(*args, **kwargs):
        raise RuntimeError("a bug in the step")

    engine.rec.step = broken_step  # the take-back's re-step raises on the engine thread
    engine._loop()
    assert engine.crashed is not None
    items = run.take(b)
    assert isinstance(items[-1], Failed) and items[-1].error.status == 500, items[-3:]
    assert isinstance(run.take(a)[-1], Finished)  # (its one final event: its client's gone)


def test_a_generation_with_nothing_to_start_from_is_refused_at_submit_not_a_crash(model_dirs):
    """A generation job with no tokens on a new session (or one without a pending token) crashed the
    engine thread (`DecodeBatch.join`: "Could not infer dtype of NoneType"), and every request of the model
    failed from then on. The routes refuse such a request first, but `Engine.submit`'s direct callers (the
    library, the benchmarks) did not (R15's note). It is now a ValueError at submit; the engine goes on."""
    from test_server_delivery import HandRun

    from server.engine import Job, Stream
    from server.sessions import SessionRecord

    run = HandRun(model_dirs["text"])
    engine = run.engine
    for fresh in (True, False):  # a new session's job, and a session without a pending token
        rec = SessionRecord(id=f"empty-{fresh}", model="m", slot=engine.pool.reserve(), busy=True)
        run.sessions.add(rec)
        job = Job(rec, [], fresh=fresh, stream=Stream(run.loop, 8), params=SamplingParams(seed=1),
                  max_new_tokens=2)  # fmt: skip
        with pytest.raises(ValueError, match="a generation needs a token to start from"):
            engine.submit(job)
    kept = run.session("s")  # the engine still serves: a turn on a session with a prompt
    run.engine._iterate()
    stream, _ = run.turn(kept, SamplingParams(seed=1), 3)
    items: list = []
    while not items or isinstance(items[-1], int):
        assert run.engine._iterate() is not False
        items += run.take(stream)
    assert engine.crashed is None and len(items) == 4, items
    run.close()


def test_the_readme_says_when_healthz_fails():
    """The README's "Several models" called `/healthz` liveness only, "whatever the models do", where it
    answers 503 once a model's engine has died of a bug (47b6cb8; the first test above): every README
    sentence that calls it liveness says it fails then."""
    import re
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    said = [s for s in re.split(r"(?<=[.;])\s", text) if "`/healthz` is liveness" in s]
    assert said and all("engine_crashed" in s for s in said), said


def test_a_token_id_or_logit_bias_id_outside_the_vocabulary_is_refused_at_submit_not_a_crash(model_dirs):
    """A job whose input holds an id outside [0, V) (V, a negative id) crashed the engine thread as it was
    admitted (`_start`: "index 256 is out of bounds" marking it seen; a negative id wrapped there and
    reached the step), and one whose SamplingParams' logit_bias names an id ≥ V crashed it at its first
    decode step (`bias_matrix`'s IndexError): every request of the model failed from then on. The routes
    refuse such ids by name, but `Engine.submit`'s direct callers (the library, the benchmarks) did not: it
    said so ("an id outside [0, V) still crashes the engine"). Now each is a ValueError at submit naming the
    id and the vocabulary; nothing is queued, and the engine goes on serving."""
    from test_server_delivery import HandRun

    from server.engine import Job, Stream

    run = HandRun(model_dirs["text"])
    engine = run.engine
    V = engine.rec.config.vocab_size
    kept = run.session("s")
    queued = engine.queued
    for tokens, bad in (([1, V], V), ([-1, 2], -1), ([V + 10**6], V + 10**6)):
        for stream in (None, Stream(run.loop, 8)):  # an ingest (session append) and a generation
            job = Job(kept, tokens, stream=stream, params=SamplingParams(seed=1), max_new_tokens=2,
                      future=None if stream else concurrent.futures.Future())  # fmt: skip
            with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \[0, {V}\)"):
                engine.submit(job)
    for bias in ({V: 5.0}, {3: 1.0, V + 7: -1.0}):
        job = Job(kept, [], stream=Stream(run.loop, 8), params=SamplingParams(seed=1, logit_bias=bias),
                  max_new_tokens=2)  # fmt: skip
        with pytest.raises(
            ValueError, match=rf"logit_bias names token id {max(bias)}, outside the vocabulary \[0, {V}\)"
        ):
            engine.submit(job)
    assert engine.queued == queued  # nothing was queued
    stream, _ = run.turn(kept, SamplingParams(seed=1, logit_bias={V - 1: 1.0}), 3)  # ids up to V − 1 serve
    items: list = []
    while not items or isinstance(items[-1], int):
        assert run.engine._iterate() is not False
        items += run.take(stream)
    assert engine.crashed is None and len(items) == 4 and all(0 <= t < V for t in items[:-1]), items
    run.close()
