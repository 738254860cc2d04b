"""The decode batch at one pooling phase (server/engine.py `_decode`, `_align`, `_decode_native`), on the
paths that timing alone rarely reaches, with the engine driven by hand one loop iteration at a time
(tests/test_scheduling.py's Driver), so each path is reached deterministically:

- a job held for its phase that is cancelled, or that a drain finds held;
- no job is held while a prompt is being ingested, and the batch is aligned once it is;
- a row that stopped at its stream's room mid-block, whether its client read its stream while the block
  ran (the stage ends: `behind`) or after (the row leaves, paused).

A tiny SaShiMi (pool [4, 4]: period 16), both decode paths: the native C block and the one-step loop.
Every session's tokens are those it makes alone (same prompt, same seed: the counter-based streams), and
after the batch is aligned every decode call steps rows of one phase."""

from __future__ import annotations

import threading

import pytest
import torch
from test_scheduling import Driver
from test_server_sashimi import make_text_sashimi

from model.sampling import SamplingParams
from server.engine import DecodeBatch

PERIOD = 16
# a hand-over period far longer than a stage's most steps take for a model this small (tens of µs a
# step), so that a stage's blocks go on until something ends them: what these tests watch for
SETTINGS = dict(decode_block_ms=100.0)


@pytest.fixture(scope="module")
def rec():
    rec = make_text_sashimi().eval().to_recurrent()
    assert rec.align_period == PERIOD and rec.decode_block_ready(4)
    return rec


@pytest.fixture(params=[True, False], ids=["native-block", "one-step-loop"])
def native(request, monkeypatch):
    if not request.param:
        monkeypatch.setattr(DecodeBatch, "native", lambda self, rec: False)
    return request.param


def params(seed: int) -> SamplingParams:
    return SamplingParams(seed=seed, temperature=1.0)


def alone(rec, prompt: list[int], n: int, seed: int) -> list[int]:
    """The tokens a generation makes as the only one on the engine."""
    d = Driver(rec, **SETTINGS)
    job = d.generate(prompt, max_new=n, params=params(seed))
    d.until(lambda: d.final(job), limit=10 * n)
    d.close()
    return d.out(job)


class Watch:
    """Each decode call the engine makes (the native block, or one step): (steps asked, the distinct
    phases of the rows it steps, whether a prompt is being ingested); `hook()` (engine thread) runs after
    each call returns, before the engine reads its result."""

    def __init__(self, d: Driver) -> None:
        self.d, self.calls, self.hook = d, [], None
        rec = d.engine.rec  # (the Driver's Recorder: these attributes shadow the model's)
        step, block = rec.step, rec.decode_block

        def phases_of(state, rows) -> int:
            return len(set(rec.row_phases(state, rows)))

        def watched_step(tokens, state, out=None):
            # (the one-step loop steps holes too: the phases counted are those of the live rows)
            live = [i for i, j in enumerate(d.engine.batch.rows) if j is not None]
            self.calls.append((1, phases_of(state, torch.tensor(live)), bool(d.engine._prefilling)))
            res = step(tokens, state, out=out)
            if self.hook is not None:
                self.hook()
            return res

        def watched_block(K, state, tokens, **kw):
            rows = (kw["limit"] > 0).nonzero().flatten()
            self.calls.append((K, phases_of(state, rows), bool(d.engine._prefilling)))
            res = block(K, state, tokens, **kw)
            if self.hook is not None:
                self.hook()
            return res

        rec.step, rec.decode_block = watched_step, watched_block


def phase(d: Driver, job) -> int:
    return d.engine.rec.row_phases(d.engine.pool.state, torch.tensor([job.session.slot]))[0]


def start(rec, prompts: list[int], n: int, **settings):
    """A Driver with a generation for each prompt length in `prompts` (the prompt 65, 66, …; seed 100 + k),
    started one after another, each decoding before the next arrives; its Watch."""
    d = Driver(rec, **{**SETTINGS, **settings})
    watch = Watch(d)
    jobs = []
    for k, length in enumerate(prompts):
        jobs.append(d.generate(list(range(65, 65 + length)), max_new=n, params=params(100 + k)))
        d.until(lambda: d.out(jobs[-1]))
    return d, watch, jobs


@pytest.mark.parametrize("how", ["client-gone", "drain-timeout", "stop"])
def test_a_job_held_for_its_phase_that_is_cancelled_or_stopped_ends_cancelled_and_frees_its_slot(
    rec, native, how
):
    """A decodes; B, whose prompt is 5 tokens longer, arrives at another phase, so it is held. While it
    is held, inside the decode stage: its client goes away (client-gone: Stream.cancel), the drain times
    out (`Engine.cancel_running`), or the engine stops (`Engine.stop`'s flag). B ends "cancelled" without a
    token, its one-shot session's slot is back in the pool and nothing is queued. After B's cancel A goes
    on with the tokens it makes alone; otherwise A ends "cancelled" too, its tokens a prefix of those."""
    n = 600
    d, watch, (a,) = start(rec, [3], n)
    capacity, engine = d.engine.pool.capacity, d.engine
    acted: list[bool] = []

    def hook():
        if acted or b not in engine._waiting or engine._phase_wait is None:
            return
        acted.append(True)
        if how == "client-gone":
            b.stream.cancel()  # (the event loop's call when its client goes away)
        elif how == "drain-timeout":
            engine.cancel_running()
        else:
            with engine._cv:  # (what `stop` sets before it joins the thread)
                engine._stopping = True

    watch.hook = hook
    b = d.generate(list(range(65, 73)), max_new=n, params=params(7))
    d.tick()  # B's prompt is ingested, and it waits for the batch's phase
    assert acted and not d.out(b), "B was not held"
    want_a = alone(rec, list(range(65, 68)), n, 100)
    if how == "stop":  # the next iteration stops the engine
        result: list[bool] = []
        worker = threading.Thread(target=lambda: result.append(engine._iterate()), daemon=True)
        worker.start()
        worker.join(20)
        assert result == [False], "the engine did not stop"
        d.drain(a)
        d.drain(b)
    else:
        d.until(lambda: d.final(b))
    assert d.final(b).finish_reason == "cancelled" and d.out(b) == []
    if how == "client-gone":
        assert d.final(a) is None and engine.pool.free == capacity - 1  # A's slot only
        d.until(lambda: d.final(a), limit=10 * n)
        assert d.final(a).finish_reason == "length" and d.out(a) == want_a
    else:
        if how == "drain-timeout":
            d.until(lambda: d.final(a))
        assert d.final(a).finish_reason == "cancelled" and d.out(a) == want_a[: len(d.out(a))]
    assert not engine._waiting and engine.queued == 0 and not engine.batch.live
    assert engine.pool.free == capacity
    d.close()


def test_no_job_is_held_while_a_prompt_is_ingested_and_the_batch_aligns_once_it_is(rec, native):
    """A decodes; a 9-chunk prompt C and a short one B (5 prompt tokens more than A: another phase) arrive
    together. B joins at once, its first token in the iteration that ingests it, although C's chunks
    still run (the decode stage is then one step an iteration, so a wait for B's phase would be up to 15
    of them): those steps mix phases. Once C is ingested the batch is aligned: from the first decode call
    with no prompt being ingested, every call steps rows of one phase. Each makes its tokens alone."""
    chunk, n = 16, 300
    d, watch, (a,) = start(rec, [3], n, prefill_chunk_tokens=chunk, prefill_token_budget=chunk)
    first = len(watch.calls)
    c = d.generate(list(range(40, 40 + 8 * chunk + 1)), max_new=n, params=params(8))
    b = d.generate(list(range(65, 73)), max_new=n, params=params(7))
    d.tick()
    assert d.out(b) and d.engine._prefilling == [c], "B did not join while C was being ingested"
    d.until(lambda: all(d.final(j) for j in (a, b, c)), limit=50 * n)
    calls = watch.calls[first:]
    ingesting = [ph for _, ph, busy in calls if busy]
    after = next(i for i, (_, _, busy) in enumerate(calls) if not busy)
    assert all(busy for _, _, busy in calls[:after]) and not any(busy for _, _, busy in calls[after:])
    assert len(ingesting) >= 8 and max(ingesting) == 2, calls[:after]
    assert all(ph == 1 for _, ph, _ in calls[after:]), calls[after:]
    prompts = {a: range(65, 68), b: range(65, 73), c: range(40, 40 + 8 * chunk + 1)}
    for seed, job in zip((100, 7, 8), (a, b, c)):
        assert d.out(job) == alone(rec, list(prompts[job]), n, seed)
    d.close()


@pytest.mark.parametrize("reads", ["during-the-block", "after-the-stage"])
def test_a_row_that_stops_at_its_stream_room_mid_block_rejoins_in_phase(rec, native, reads):
    """A and B decode at one phase. B's client stops reading: one stage's tokens stay in its stream, and
    then its room is one token. In the next block B stops after that token while A goes on, so B falls
    out of the batch's phase. Its client reads again: during the block (B's room is free when the engine
    looks: the stage ends there, and the next iteration's `_align` takes B out of the batch to rejoin in
    phase), or after the stage (B's room is full: it leaves the batch, paused, and rejoins once read, in
    phase). Either way no decode call from B's stop on steps rows of two phases, and both make their
    tokens alone. (The one-step loop steps every row at each step: B never falls out of phase there.)"""
    n = 400
    d, watch, (a, b) = start(rec, [3, 3], n)
    d.until(lambda: len(set(map(lambda j: phase(d, j), (a, b)))) == 1 and d.engine.batch.live == 2)
    d.paused.append(b)
    d.tick()  # B's tokens of this stage stay in its stream
    s = b.stream
    assert s.sent > s.taken and d.final(b) is None
    s.capacity = s.sent - s.taken + 1  # room for one token
    first, stopped = len(watch.calls), []

    def hook():
        if not stopped and s.room() == 1 and b in d.engine.batch.rows:  # (before the engine emits it)
            stopped.append(len(watch.calls))
            if reads == "during-the-block":
                d.paused.remove(b)
                d.drain(b)

    watch.hook = hook
    d.tick()
    assert stopped, "B did not step"
    if reads == "after-the-stage":
        assert s.room() == 0
        d.tick()
        assert b not in d.engine.batch.rows and b in d.engine._waiting
        d.paused.remove(b)
        d.drain(b)
    d.until(lambda: d.final(a) and d.final(b), limit=50 * n)
    assert all(ph == 1 for _, ph, _ in watch.calls[stopped[0] :]), watch.calls[first:]
    assert d.out(a) == alone(rec, list(range(65, 68)), n, 100)
    assert d.out(b) == alone(rec, list(range(65, 68)), n, 101)
    d.close()


def test_a_job_held_for_its_phase_beside_a_paused_one_joins_in_phase_and_the_stage_stays_whole(rec, native):
    """A decodes; P's client stops reading (P paused, waiting for room); then B arrives at another phase
    and is held. B joins when the batch's phase comes round to its own (within a period of steps, every
    decode call stepping rows of one phase), and the paused P does not cut the stage into one-step calls
    (it did: any waiting job but a held one made every call one step). P, read again, rejoins in phase.
    Each makes its tokens alone."""
    n = 400
    d, watch, (a, p) = start(rec, [3, 3], n)
    d.paused.append(p)
    p.stream.capacity = p.stream.sent - p.stream.taken + 4  # (its room: 4 more tokens)
    d.until(lambda: p in d.engine._waiting and p.stream.room() <= 0)
    prompt_b = list(range(40, 57 + (phase(d, a) + 8) % PERIOD))  # B's state then half a period from A's
    b = d.generate(prompt_b, max_new=n, params=params(7))
    first = len(watch.calls)
    d.tick()
    assert not d.out(b) and b in d.engine._waiting, "B was not held"
    d.until(lambda: d.out(b), limit=PERIOD)
    held = watch.calls[first:]
    assert sum(k for k, _, _ in held) < 2 * PERIOD and all(ph == 1 for _, ph, _ in watch.calls[first:])
    if native:  # (the one-step loop makes one call a step)
        assert max(k for k, _, _ in held) > 1, held
    d.paused.remove(p)
    d.drain(p)
    d.until(lambda: all(d.final(j) for j in (a, p, b)), limit=50 * n)
    assert all(ph == 1 for _, ph, _ in watch.calls[first:])
    assert d.out(a) == alone(rec, list(range(65, 68)), n, 100)
    assert d.out(p) == alone(rec, list(range(65, 68)), n, 101)
    assert d.out(b) == alone(rec, prompt_b, n, 7)
    d.close()
