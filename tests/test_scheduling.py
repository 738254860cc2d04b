"""Prefill scheduling (issue 18, item 5): a prompt is ingested in chunks between decode steps, so a long
prompt does not stall the decoding sessions; short prompts are not queued behind long ones and no prompt
starves; chunked ingestion gives the results of one-call prefill (float64 conv-mode reference); a request
cancelled mid-prefill frees its slot and leaves the others alone; the settings are range-checked.

The engine is driven here one loop iteration at a time (`Engine._iterate`, what its thread runs), in the
test's thread, so progress is counted in iterations and decode steps, never in wall time."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import time

import pytest
import torch
from server_support import make_text_model

from model import ModelConfig, SequenceModel
from model.sampling import SamplingParams
from server.__main__ import main as server_main
from server.config import MAX_PREFILL_TOKENS, Settings
from server.engine import Engine, Finished, Job, Stream
from server.metrics import Metrics
from server.sessions import SessionRecord, SessionTable

STATE_TOL = 1e-4  # ‖Δstate‖/‖state‖: the block prefill's own tolerance (tests/test_prefill_blocks.py)
LOGP_TOL = 1e-3  # max |Δ log p| against float64 conv mode (tests/test_recurrent.py)


class Recorder:
    """The recurrent model, with every prefill call (rows, length) and decode step (rows) recorded."""

    def __init__(self, rec, events: list) -> None:
        self._rec, self.events = rec, events

    def __getattr__(self, name):
        return getattr(self._rec, name)

    def prefill(self, tokens, state, **kw):
        self.events.append(("prefill", tokens.shape[0], tokens.shape[1]))
        return self._rec.prefill(tokens, state, **kw)

    def step(self, tokens, state, out=None):
        self.events.append(("step", tokens.shape[0]))
        return self._rec.step(tokens, state, out=out)

    def decode_block(self, K, state, tokens, **rows):  # the native decode block: one event per step
        res = self._rec.decode_block(K, state, tokens, **rows)
        self.events += [("step", tokens.shape[0])] * res.steps
        return res


class Driver:
    """An engine run by hand: `tick()` is one iteration of its loop. Streams are drained after each tick,
    but those of the jobs in `paused` (a job's tokens in `out(job)`, its final event in `final(job)`, None
    before)."""

    def __init__(self, rec, **settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(**{"max_sessions": 64, "max_batch_size": 64, "stream_buffer": 1 << 20,
                                    "max_queued_requests": 64, **settings})  # fmt: skip
        self.events: list = []
        self.sessions = SessionTable()
        self.engine = Engine("m", Recorder(rec, self.events), self.settings, self.sessions,
                             Metrics().for_model("m"))  # fmt: skip
        self.jobs: list[Job] = []
        self._out: dict[Stream, list[int]] = {}
        self._final: dict[Stream, Finished] = {}
        self.ticks = 0
        self._ids = itertools.count()
        self.paused: list[Job] = []  # jobs whose streams `tick` leaves alone (a client not reading)

    def generate(self, prompt: list[int], max_new: int, params: SamplingParams | None = None) -> Job:
        """A one-shot generation (its own ephemeral session), as the HTTP route submits it."""
        rec = self.engine.new_session(f"s{next(self._ids)}", ephemeral=True)
        params = params or SamplingParams(temperature=0)
        job = Job(rec, list(prompt), fresh=True, stream=Stream(self.loop, self.settings.stream_buffer),
                  params=params, max_new_tokens=max_new)  # fmt: skip
        return self.submit(job)

    def create(self, prompt: list[int]) -> tuple[concurrent.futures.Future, SessionRecord]:
        """A kept session created with `prompt` (an ingestion-only job, as POST /v1/sessions submits it):
        the job's future, done once the prompt is ingested, and the session's record."""
        rec = self.engine.new_session(f"k{next(self._ids)}", ephemeral=False)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self.engine.submit(Job(rec, list(prompt), fresh=True, future=done))
        return done, rec

    def submit(self, job: Job) -> Job:
        """Submit a generation's job (its stream's tokens then in `out(job)`)."""
        self.engine.submit(job)
        self.jobs.append(job)
        self._out[job.stream] = []
        return job

    def out(self, job: Job) -> list[int]:
        return self._out[job.stream]

    def final(self, job: Job) -> Finished | None:
        return self._final.get(job.stream)

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.events.append(("iteration",))
            assert self.engine._iterate()
            self.ticks += 1
            for job in self.jobs:
                if job not in self.paused:
                    self.drain(job)

    def drain(self, job: Job) -> None:
        """Take what the job's stream holds, as its consumer on the event loop would."""
        self.loop.run_until_complete(asyncio.sleep(0))  # deliver the hand-overs
        while not job.stream.queue.empty():
            items = job.stream.queue.get_nowait()  # one hand-over: ids, then maybe the final
            job.stream._took(items)
            for item in items:
                if isinstance(item, int):
                    self._out[job.stream].append(item)
                else:
                    self._final[job.stream] = item

    def until(self, done, limit: int = 500) -> int:
        """Tick until done() holds (at most `limit` ticks); the ticks it took."""
        for k in range(limit):
            if done():
                return k
            self.tick()
        raise AssertionError(f"not done after {limit} engine iterations")

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="module")
def rec():
    return make_text_model().eval().to_recurrent()


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_decode_steps_between_the_chunks_of_a_long_prompt(rec):
    """While a 12-chunk prompt is ingested the decoding sessions get one step per chunk; with chunking
    off (one chunk ≥ the prompt) the same prompt is one prefill call with no decode step during it."""
    for chunk, n_chunks in ((64, 12), (1024, 1)):
        d = Driver(rec, prefill_chunk_tokens=chunk, prefill_token_budget=chunk)
        decoders = [d.generate(prompt_of(5, k), max_new=10_000) for k in range(3)]
        d.until(lambda: all(d.out(j) for j in decoders))
        before = [len(d.out(j)) for j in decoders]
        start = len(d.events)
        long = d.generate(prompt_of(12 * 64 + 1, 99), max_new=1)  # 768 tokens to ingest, 1 pending
        d.until(lambda: d.final(long))
        events = d.events[start:]
        calls = [i for i, e in enumerate(events) if e[0] == "prefill"]
        assert [events[i][1:] for i in calls] == [(1, 768 // n_chunks)] * n_chunks  # one row, one chunk each
        # the iterations that ingest a chunk: each makes one decode step of the batch, no more (a chunk
        # that completes the prompt runs before the step, the others after the hand-over)
        marks = [i for i, e in enumerate(events) if e[0] == "iteration"] + [len(events)]
        ticks = [events[a:b] for a, b in itertools.pairwise(marks)]
        ingesting = [t for t in ticks if any(e[0] == "prefill" for e in t)]
        assert len(ingesting) == n_chunks
        assert [sum(e[0] == "step" for e in t) for t in ingesting] == [1] * n_chunks
        # each decoding session got a token per chunk
        assert all(len(d.out(j)) - n >= n_chunks for j, n in zip(decoders, before))
        assert d.out(long) and d.final(long).finish_reason == "length"
        d.close()


def test_a_short_prompt_is_not_queued_behind_long_ones_and_no_prompt_starves(rec):
    """Two long prompts fill the budget (2 × 64 tokens): a short prompt arriving then is ingested and
    decoded in the next iteration (first in the budget: the fewest tokens left), not after both long ones.
    With a new short prompt arriving at every iteration, each long prompt still gets a chunk at least every
    other iteration (a job passed over goes first next time), so both finish."""
    d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=128)
    longs = [d.generate(prompt_of(12 * 64 + 1, 50 + k), max_new=1) for k in range(2)]
    d.tick()
    assert not any(d.final(j) for j in longs)
    shorts = []
    while not all(d.final(j) for j in longs):
        shorts.append(d.generate(prompt_of(10, len(shorts)), max_new=2))
        d.tick()
        assert d.out(shorts[-1]), f"short prompt {len(shorts)} got no token in the iteration it arrived in"
        assert d.ticks <= 1 + 2 * 12, "a long prompt starved"
    d.until(lambda: all(d.final(j) for j in shorts))
    assert all(d.final(j).finish_reason == "length" and len(d.out(j)) == 2 for j in shorts)
    assert all(len(d.out(j)) == 1 for j in longs)
    d.close()


def test_short_prompts_arriving_together_are_prefilled_in_one_batch_beside_a_long_one(rec):
    d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=192)
    long = d.generate(prompt_of(12 * 64 + 1, 9), max_new=1)
    d.tick()
    shorts = [d.generate(prompt_of(21, 30 + k), max_new=3) for k in range(4)]
    start = len(d.events)
    d.tick()
    calls = [e[1:] for e in d.events[start:] if e[0] == "prefill"]
    assert sorted(calls) == [(1, 64), (4, 20)]  # one batched call for the four, one chunk of the long one
    assert all(d.out(j) for j in shorts)
    d.until(lambda: d.final(long) and all(d.final(j) for j in shorts))
    d.close()


def test_a_short_prompts_first_token_goes_out_before_the_long_prompts_chunk(rec):
    """In the iteration a short prompt arrives while a long one is ingested, its chunk runs, then the
    decode step that makes its first token, then (after the hand-over) the long prompt's chunk."""
    d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=128)
    long = d.generate(prompt_of(12 * 64 + 1, 9), max_new=1)
    d.tick()
    short = d.generate(prompt_of(10, 3), max_new=5)
    start = len(d.events)
    d.tick()
    events = d.events[start + 1 :]
    assert events == [("prefill", 1, 9), ("step", 1), ("prefill", 1, 64)], events
    assert len(d.out(short)) == 1
    d.until(lambda: d.final(long) and d.final(short))
    d.close()


@pytest.mark.parametrize("native", [True, False], ids=["native-block", "one-step-loop"])
def test_a_new_requests_first_token_goes_out_after_one_step_not_a_whole_block(rec, native, monkeypatch):
    """Sessions decoding in blocks of DECODE_BLOCK_STEPS steps or more: the iteration that admits a new
    request runs one step, so its first token is handed over at once; the next ones whole blocks again.
    Both decode paths: the native block, and the one-step loop (logits requested, or no C step)."""
    from server.engine import DECODE_BLOCK_STEPS, DecodeBatch

    if not native:
        monkeypatch.setattr(DecodeBatch, "native", lambda self, rec: False)
    d = Driver(rec)
    decoders = [d.generate(prompt_of(5, k), max_new=10_000) for k in range(3)]
    d.until(lambda: all(d.out(j) for j in decoders))

    def steps_in_a_tick() -> int:
        start = len(d.events)
        d.tick()
        return sum(e[0] == "step" for e in d.events[start:])

    assert steps_in_a_tick() >= DECODE_BLOCK_STEPS
    new = d.generate(prompt_of(7, 9), max_new=100)
    assert steps_in_a_tick() == 1 and len(d.out(new)) == 1
    assert steps_in_a_tick() >= DECODE_BLOCK_STEPS and len(d.out(new)) >= 1 + DECODE_BLOCK_STEPS
    assert d.engine.batch.native(rec) == native
    d.close()


class _BlockClock:
    """The engine's `time` module with a perf_counter of the test's own, which moves only where the test
    moves it: by `step_s` a step of each native block (the block's step times, as the C side stamps them,
    from the engine's reading just before the call) and by `after_s` once the block has returned, a wait for
    the GIL after the call. The block sizing then depends on no real time: on the real clock a CPU taken
    for 100 ms during a block (a loaded machine) made its step time milliseconds, and the next blocks were
    cut short. It starts 1000 s past the real clock, after every job's `submitted` (the real clock's)."""

    def __init__(self, step_s: float, after_s: float) -> None:
        self.now, self.step_s, self.after_s = time.perf_counter() + 1000.0, step_s, after_s

    def perf_counter(self) -> float:
        return self.now

    def __getattr__(self, name):  # (monotonic, time, sleep: the real ones)
        return getattr(time, name)

    def stamp(self, res) -> None:
        """Give a block's result the times of its steps on this clock, and move the clock past them."""
        start = self.now
        res.times = start + self.step_s * torch.arange(1, res.steps + 1, dtype=torch.float64)
        self.now = start + self.step_s * res.steps + self.after_s


def test_native_blocks_are_sized_by_the_time_left_not_cut_into_a_shrinking_series(rec, monkeypatch):
    """Once a step time is measured, a decode stage is the fewest native blocks that fill its hand-over
    period: with a period (100 ms) far longer than the stage's most steps (64, for a model this small:
    tens of microseconds a step), every stage is two blocks of DECODE_BLOCK_NATIVE_MAX_STEPS (32); after
    the batch grows over twice, one stage begins with a short block that measures the new step time.
    The step time runs from a block's call to its last step, so a wait for the GIL after the call does
    not count: a first block of 8 steps whose overhead and GIL wait counted as step time had cut audio
    stages into blocks of 8, 75, 45, 22, 8, 1 steps (2026-11-30). The engine's clock is the test's
    (`_BlockClock`): 30 µs a step, and 20 ms of GIL wait after each block, which counted as step time would
    make it 655 µs (32 steps) or 2.5 ms (8)."""
    import server.engine
    from server.engine import DECODE_BLOCK_MAX_STEPS, DECODE_BLOCK_NATIVE_MAX_STEPS, DECODE_BLOCK_STEPS

    blocks: list[int] = []
    clock = _BlockClock(step_s=30e-6, after_s=20e-3)
    monkeypatch.setattr(server.engine, "time", clock)
    d = Driver(rec, decode_block_ms=100.0)
    rec_ = d.engine.rec
    orig = rec_.decode_block

    def decode_block(K, state, tokens, **rows):
        res = orig(K, state, tokens, **rows)
        clock.stamp(res)
        blocks.append(res.steps)
        return res

    rec_.decode_block = decode_block
    decoders = [d.generate(prompt_of(5, k), max_new=100_000) for k in range(3)]
    d.until(lambda: all(d.out(j) for j in decoders))
    d.tick(2)  # a step time measured
    stage = [DECODE_BLOCK_NATIVE_MAX_STEPS] * (DECODE_BLOCK_MAX_STEPS // DECODE_BLOCK_NATIVE_MAX_STEPS)
    for _ in range(3):
        blocks.clear()
        d.tick()
        assert blocks == stage
    assert d.engine._block_step_s == pytest.approx(clock.step_s)  # the steps' own time, not the wait after
    assert d.engine._block_step_rows == 3
    # the batch grows from 3 rows to 8 (over twice): a step time measured at 3 rows says little about 8,
    # so the next stage begins with a short block that measures it (DECODE_BLOCK_STEPS), then fills up
    joined = [d.generate(prompt_of(5, 10 + k), max_new=100_000) for k in range(5)]
    d.until(lambda: all(d.out(j) for j in joined))
    blocks.clear()
    d.tick()
    assert blocks[0] == DECODE_BLOCK_STEPS and sum(blocks) == DECODE_BLOCK_MAX_STEPS, blocks
    assert d.engine._block_step_rows == 8
    blocks.clear()
    d.tick()
    assert blocks == stage
    d.close()


def test_a_drain_mid_ingestion_finishes_the_long_prompt_and_ends(rec):
    """Stopping while a 12-chunk prompt is a quarter ingested: the drain ingests the rest (its chunks
    that do not complete the prompt included) and the loop ends, the job "cancelled"."""
    import threading

    d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=64)
    long = d.generate(prompt_of(12 * 64 + 1, 4), max_new=5)
    d.tick(3)
    assert 0 < long.offset < len(long.ingest)
    with d.engine._cv:
        d.engine._stopping = True
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(d.engine._iterate()), daemon=True)
    worker.start()
    worker.join(20)
    assert result == [False], "the drain did not end"
    assert long.offset == len(long.ingest) and not d.engine._prefilling
    d.loop.run_until_complete(asyncio.sleep(0))  # deliver the hand-over
    items = []
    while not long.stream.queue.empty():
        items += long.stream.queue.get_nowait()
    assert [i.finish_reason for i in items if isinstance(i, Finished)] == ["cancelled"]
    d.close()


@pytest.fixture(scope="module")
def ref_model():
    """A tiny random text model trained for 1024 tokens (so float64 conv mode covers the whole test)."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=1024, kernel="s4d",
                      cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    return net, net.to_recurrent()


@pytest.mark.parametrize("chunk", [64, 100, 256, 2048], ids=["64-stepped", "100-unaligned", "256", "off"])
def test_chunked_ingestion_equals_one_call_prefill_and_float64_conv_mode(ref_model, chunk):
    """Per chunk size (64: every chunk stepped; 100: chunks across the prefill's 64-token blocks; 2048:
    the whole prompt in one call): the prompt log-probabilities (computed from each chunk's logits) and the
    generated tokens' log-probabilities match float64 conv mode over prompt + output (|Δ log p| ≤ 1e-3),
    greedy output is its argmax, and the state left in the slot is within 1e-4 of one-call prefill."""
    net, rec = ref_model
    prompt = prompt_of(700, 7)
    d = Driver(rec, prefill_chunk_tokens=chunk, prefill_token_budget=max(chunk, 512))
    job = d.generate(prompt, max_new=16, params=SamplingParams(temperature=0, logprobs=3, prompt_logprobs=3))
    d.until(lambda: d.final(job))
    out = d.out(job)
    assert len(out) == 16
    full = torch.tensor([prompt + out])
    with torch.no_grad():
        ref = copy.deepcopy(net).double()(full).log_softmax(-1)[0]  # (L, V) float64
    want_prompt = ref[: len(prompt) - 1].gather(1, full[0, 1 : len(prompt), None])[:, 0]
    got_prompt = torch.tensor([lp[0] for lp in job.stream.prompt_logprobs], dtype=torch.float64)
    assert got_prompt.shape == want_prompt.shape
    assert float((got_prompt - want_prompt).abs().max()) <= LOGP_TOL
    want_out = ref[len(prompt) - 1 : -1].gather(1, full[0, len(prompt) :, None])[:, 0]
    got_out = torch.tensor([lp[0] for lp in job.stream.logprobs], dtype=torch.float64)
    assert float((got_out - want_out).abs().max()) <= LOGP_TOL
    assert out == ref[len(prompt) - 1 : -1].argmax(-1).tolist()
    d.close()

    # the state an ingestion-only job leaves (a session created with the prompt)
    d = Driver(rec, prefill_chunk_tokens=chunk, prefill_token_budget=max(chunk, 512))
    done, rec_ = d.create(prompt)
    d.until(done.done)
    got = d.engine.pool.row(rec_.slot)
    _, want = rec.prefill(torch.tensor([prompt[:-1]]), rec.init_state(1))
    assert float((got - want[:, 0]).norm() / want.norm()) <= STATE_TOL
    d.close()


def test_cancelling_a_request_mid_prefill_frees_its_slot_and_leaves_the_others_alone(rec):
    params = SamplingParams(temperature=1.0, seed=3)

    def decoder_alone() -> list[int]:
        d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=64)
        a = d.generate(prompt_of(20, 1), max_new=400, params=params)
        d.until(lambda: d.final(a))
        d.close()
        return d.out(a)

    want = decoder_alone()
    d = Driver(rec, prefill_chunk_tokens=64, prefill_token_budget=64)
    a = d.generate(prompt_of(20, 1), max_new=400, params=params)
    d.until(lambda: d.out(a))
    long = d.generate(prompt_of(12 * 64 + 1, 5), max_new=5)
    d.tick(3)
    assert long.offset == 3 * 64 and d.final(long) is None  # a quarter ingested
    assert d.engine.pool.in_use == 2
    long.stream.cancel()
    d.tick()
    assert d.final(long).finish_reason == "cancelled" and d.out(long) == []
    assert d.engine.pool.in_use == 1 and long.session.id not in {r.id for r in d.sessions.records("m")}
    assert not d.engine._prefilling
    # the freed slot (holding a partly ingested state) serves the next request as a fresh one
    c = d.generate(prompt_of(30, 2), max_new=8)
    d.until(lambda: d.final(a) and d.final(c))
    assert d.out(a) == want, "the cancelled prefill changed another session's output"
    d2 = Driver(rec)
    c2 = d2.generate(prompt_of(30, 2), max_new=8)
    d2.until(lambda: d2.final(c2))
    assert d.out(c) == d2.out(c2)
    assert d.engine.pool.in_use == 0
    d.close()
    d2.close()


@pytest.mark.parametrize(
    "settings,field",
    [
        ({"prefill_chunk_tokens": 0}, "prefill_chunk_tokens"),
        ({"prefill_chunk_tokens": MAX_PREFILL_TOKENS + 1}, "prefill_chunk_tokens"),
        ({"prefill_token_budget": 0}, "prefill_token_budget"),
        ({"prefill_token_budget": MAX_PREFILL_TOKENS + 1}, "prefill_token_budget"),
        ({"prefill_chunk_tokens": 1024}, "S4_PREFILL_TOKEN_BUDGET"),  # the default budget 512 < 1024
        ({"prefill_chunk_tokens": 300, "prefill_token_budget": 299}, "S4_PREFILL_TOKEN_BUDGET"),
    ],
)
def test_prefill_settings_out_of_range_are_refused_by_name(settings, field, monkeypatch):
    with pytest.raises(ValueError, match=field):
        Settings(**settings)
    for k, v in settings.items():
        monkeypatch.setenv(f"S4_{k.upper()}", str(v))
    with pytest.raises(SystemExit, match=f"invalid settings: .*{field.upper()}"):
        server_main([])
    monkeypatch.delenv("S4_PREFILL_CHUNK_TOKENS", raising=False)
    monkeypatch.delenv("S4_PREFILL_TOKEN_BUDGET", raising=False)
    flags = [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    with pytest.raises(SystemExit, match=f"invalid settings: .*{field.upper()}"):
        server_main(flags)


def test_chunking_off_and_the_limits_are_accepted():
    s = Settings(prefill_chunk_tokens=MAX_PREFILL_TOKENS, prefill_token_budget=MAX_PREFILL_TOKENS)
    assert (s.prefill_chunk_tokens, s.prefill_token_budget) == (MAX_PREFILL_TOKENS, MAX_PREFILL_TOKENS)
    assert Settings(prefill_chunk_tokens=1, prefill_token_budget=1).prefill_token_budget == 1


@pytest.mark.parametrize("native", [True, False], ids=["native-block", "one-step-loop"])
@pytest.mark.parametrize("waits_for", ["room", "a-place"])
def test_a_job_waiting_for_room_or_a_place_does_not_cut_the_others_decode_to_one_step(
    rec, native, waits_for, monkeypatch
):
    """A job waiting to decode that cannot join the batch yet, one whose client stopped reading (its stream
    full: paused) or one behind a full batch (S4_MAX_BATCH_SIZE rows decoding), leaves the other rows their
    whole decode stage (DECODE_BLOCK_STEPS steps or more an iteration): any waiting job had cut every stage
    to one step, a hand-over per token (32 rows: 4x fewer tokens/s). It still joins at once when it can:
    the paused one in the iteration after its client reads, the other in the iteration after a row ends
    (the native block ends at the first row's limit). Both decode paths; every row's tokens are its own."""
    from server.engine import DECODE_BLOCK_STEPS, DecodeBatch

    if not native:
        monkeypatch.setattr(DecodeBatch, "native", lambda self, rec: False)

    def params(k: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, seed=k)

    def alone(prompt: list[int], n: int, seed: int) -> list[int]:
        d = Driver(rec)
        j = d.generate(prompt, max_new=n, params=params(seed))
        d.until(lambda: d.final(j), limit=10 * n)
        d.close()
        return d.out(j)

    def steps_in_a_tick() -> int:
        start = len(d.events)
        d.tick()
        return sum(e[0] == "step" for e in d.events[start:])

    n = 400
    d = Driver(rec, max_batch_size=3, decode_block_ms=0.0)  # stages of DECODE_BLOCK_STEPS steps
    lengths = [n, n, 100] if waits_for == "a-place" else [n, n]  # the third ends first: its place frees
    rows = [d.generate(prompt_of(5, k), max_new=m, params=params(k)) for k, m in enumerate(lengths)]
    d.until(lambda: all(d.out(j) for j in rows))
    d.tick(2)  # (a step time measured)
    if waits_for == "room":
        rec_ = d.engine.new_session("slow", ephemeral=True)
        stream = Stream(d.loop, 4)  # a 4-token stream its client does not read: full after one block
        late = d.submit(Job(rec_, prompt_of(5, 9), fresh=True, stream=stream, params=params(9),
                            max_new_tokens=n))  # fmt: skip
        d.paused.append(late)
        d.until(lambda: late in d.engine._waiting and late.stream.room() <= 0)
    else:
        late = d.generate(prompt_of(5, 9), max_new=n, params=params(9))
        d.tick()
        assert late in d.engine._waiting and not d.out(late)
    for _ in range(3):
        assert steps_in_a_tick() >= DECODE_BLOCK_STEPS
    if waits_for == "room":
        d.paused.remove(late)
        d.drain(late)  # its client reads: room again
        before = len(d.out(late))
        d.tick()
        assert len(d.out(late)) > before, "the paused job did not rejoin in the next iteration"
    else:
        d.until(lambda: d.final(rows[2]))
        assert not d.out(late)
        d.tick()
        assert d.out(late), "the waiting job did not take the freed place in the next iteration"
    d.until(lambda: all(d.final(j) for j in [*rows, late]), limit=20 * n)
    for k, (j, m) in enumerate(zip(rows, lengths)):
        assert d.out(j) == alone(prompt_of(5, k), m, k)
    assert d.out(late) == alone(prompt_of(5, 9), n, 9)
    assert d.engine.queued == 0 and not d.engine._waiting and d.engine.pool.in_use == 0
    d.close()
