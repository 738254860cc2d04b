"""The per-model engine: one worker thread that owns the model's device tensors.

Each iteration of its loop:
  1. admit: take new jobs from the inbox (bounded) and run control operations (fork, export, …);
  2. prefill: pick prompt chunks (`prefill_chunk_tokens`, fixed boundaries) of several jobs, at most
     `prefill_token_budget` tokens, the prompts with the fewest tokens left first (a job passed over goes
     ahead next time: nothing starves), and ingest those that complete their prompt, batching chunks of
     equal length into one prefill (on CPU, chunks of up to 512 tokens by the C step's recurrent form
     layer by layer, else the parallel form);
  3. decode: one batched recurrent step for every live generating session, sampling on the device with
     one generator per request, and one copy of the new tokens to the host; repeated (up to
     DECODE_BLOCK_STEPS steps, more while within `decode_block_ms`, `audio_decode_block_ms` for an audio
     model) while no row finishes, fills its stream or is cancelled and no new work arrives (a request
     paused for its stream's room, or waiting for a place in a full batch, is not new work: it joins
     when that comes). On CPU, when the whole-network C step serves the batch, DECODE_BLOCK_STEPS steps
     run as one native block (`DecodeBatch.block`: step, sample, log-probabilities for the rows that ask
     and stop checks in C, each row stopping on its own at its limit or stop sequence), with the same
     results token for token; on CUDA with the graphs the block replays graphs of K steps with their
     sampling (`model/cuda_graphs.py`: each row to its own limit; stop sequences checked after the
     block, a row that met one stepped again to it), also with the same results token for token;
  4. hand the new tokens to the event loop, one `call_soon_threadsafe` per iteration;
  5. ingest the other chunks picked in 2 (long prompts with more to go), so that a short prompt's first
     token, made in 3, does not wait for them. The iteration that makes a request's first token ends its
     decode stage after that step, so the token goes out at once rather than after a whole block.

Sessions that are decoding live in a resident batch (`DecodeBatch`): their states are copied out of
the slot pool when they join and back when they leave, not at every step, and the step updates the
batch in place. A request's tokens go through a bounded `Stream`; when its consumer falls behind and
the stream is full, the session leaves the batch (paused) until there is room again. Nothing is
dropped and nothing is buffered without bound.

A model whose rows step cheapest at one phase of a period (`align_period` > 1: a SaShiMi's prod(pool),
its step sparse) has its decode batch kept at one phase: a row whose phase differs waits, without
stepping, until the batch's phase comes round to its own (at most period − 1 steps; the block before
is sized to end there; a held job keeps its place in the batch), so each coarser level runs once a
period for all rows together. Not while prompts are being ingested (the decode stage then runs one step
per iteration: a wait would be iterations); the batch is aligned after, its rows at another phase
leaving to rejoin in phase. A row's tokens do not depend on when it joins (every row steps as if
alone), only its first token's time.

While a prompt is being ingested the decode stage runs one step per iteration, so a long prompt costs
the decoding sessions about one chunk's prefill per token, not its whole prefill.

A turn on a kept session ends when its route is done with the stream (`Stream.settle`), not when the
engine is: the session stays busy until its client has been handed the last frame, and keeps only the
tokens it was handed. A turn whose client went away is taken back (`_rollback`: a recent copy of the
state row, and the tokens from it re-stepped through `step`); a turn cancelled while its input is
ingested stops between chunks and the input is taken back (`_restore`).

The engine never awaits; the event loop never calls the model.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.codecs import utf8_tail
from model.recurrent import RecurrentModel
from model.sampling import (
    MAX_LOGPROBS,
    CounterRNG,
    RowSampler,
    SamplingParams,
    find_stop,
    row_settings,
    sample,
    token_logprobs,
    uint64_bits,
)
from server.config import Settings
from server.errors import APIError, not_found, over_capacity, unavailable
from server.metrics import ModelMetrics, observe_many
from server.prefix_cache import PrefixCache, boundary_keys
from server.sessions import SessionRecord, SessionTable, SlotPool
from server.store import ThrottledLog


def _id_bytes(ids) -> bytes:
    """Byte-level text: each token id is its byte."""
    return bytes(t & 0xFF for t in ids)


log = logging.getLogger("server.engine")
_kept_log = ThrottledLog(log)  # sessions kept, not evicted, while the store fails (`Engine._kept`)

GREEDY = SamplingParams(temperature=0.0)  # what the holes of a decode batch "sample"
DECODE_BLOCK_STEPS = 8  # decode steps between two admissions / hand-overs: at least this many unless ...
DECODE_BLOCK_MAX_STEPS = 64  # ... and, while within decode_block_ms, up to this many
DECODE_BLOCK_NATIVE_MAX_STEPS = 32  # steps of one native decode block (see Engine._decode_native)
# Audio models (one step per sample: thousands a second per stream) hand over every
# `audio_decode_block_ms`, up to this many steps, in native blocks of up to this many: their samples
# leave in frames of frame_ms (20 by default) anyway, and a hand-over costs the same however short
AUDIO_DECODE_BLOCK_MAX_STEPS = 512
AUDIO_DECODE_BLOCK_NATIVE_MAX_STEPS = 256


@dataclass
class Finished:
    """The last event of a generation."""

    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    # where the stop sequence starts: in the turn's text bytes, the unfinished character it continues
    # (`Job.carry`) first, then the generated ones (the text ends there; a stop that character begins
    # ends it before it), and the generated tokens wholly before it (byte-level text: stop_at less the
    # carried bytes, at least 0; a word's text may hold its start)
    stop_at: int | None = None
    cached_tokens: int = 0  # prompt tokens whose state came from the prefix cache (server/prefix_cache.py)
    stop_token: int | None = None


@dataclass
class Failed:
    """A request that could not run (the last event of its stream)."""

    error: APIError


class Stream:
    """Bounded channel from the engine thread to one request on the event loop.

    Items are token ids (ints) and one final `Finished` or `Failed`. The engine sends a token only
    while `room() > 0`, so the queue never holds more than `capacity` tokens plus the final event.
    Each hand-over puts one list on the queue (the request's tokens of that engine iteration, the final
    event last), so the event loop handles a block of tokens per call, not one token at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self.loop, self.capacity = loop, capacity
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=capacity + 1)  # non-empty lists
        self.sent = 0  # tokens sent (engine thread)
        self.taken = 0  # tokens taken (event loop)
        self.delivered = 0  # tokens the consumer has handed to its client's transport (event loop)
        self.final_taken = False  # the consumer has taken the `Finished` event (event loop)
        self.cancelled = False
        self.engine: Engine | None = None
        self.job: Job | None = None  # set by Engine.submit
        self._settled = False
        self._holding = False  # settled with `hold`: its session is released by `release`
        self.queued_write: concurrent.futures.Future | None = None  # `Engine.settle`'s, for `service.landed`
        # when the params ask for them (engine thread appends, before the token or final event is
        # delivered): per generated token (logprob, top ids, top logprobs); per prompt token after
        # the first, the same
        self.logprobs: list[tuple[float, list[int], list[float]]] = []
        self.prompt_logprobs: list[tuple[float, list[int], list[float]]] = []

    def room(self) -> int:
        return self.capacity - (self.sent - self.taken)

    def cancel(self) -> None:
        """Stop the generation at its next step (called from the event loop). A one-shot request's slot
        is then on its way back to the pool: `Engine.releasing` holds its job until it has ended."""
        self.cancelled = True
        if self.engine is not None:
            if self.job is not None and self.job.session.ephemeral and not self.job.ended:
                self.engine.expect_release(self.job)
            self.engine.wake()

    def _took(self, items: list) -> None:
        n = len(items) - (not isinstance(items[-1], int))  # a final event comes last
        was_full = self.room() <= 0
        self.taken += n
        if was_full and n and self.engine is not None:
            self.engine.wake()  # a paused session may step again

    async def get(self) -> list:
        """Wait for at least one item; return every item available now: token ids, then maybe the
        final event (always last)."""
        items = await self.queue.get()
        while not self.queue.empty():
            items += self.queue.get_nowait()
        self._took(items)
        if not isinstance(items[-1], int):
            self.final_taken = isinstance(items[-1], Finished)
        return items

    def deliver(self, n: int) -> None:
        """(event loop) The consumer has handed n more tokens (text ids, audio samples) to its client's
        transport: a send that returned while the connection was still open."""
        self.delivered += n

    def settle(self, hold: bool = False) -> None:
        """(event loop) The consumer is done with the stream: it has handed its last frame to the
        transport, or its client is gone. Called once (later calls do nothing). A kept session then
        holds exactly the `delivered` tokens of this turn: when every token taken was delivered, up to
        the final event, the session is idle from now (its TTL counts from here); otherwise the
        generation is cancelled and the engine takes the session back to its state after the delivered
        tokens (`Engine.settle`). `hold`: a complete turn's session stays busy until `release`, for a
        route that settles before its last frame (the done frame or event, sent once the turn's state is
        in the store): its TTL then counts from that frame, as the README says, not from before it (a
        slow reader's done frame could wait longer than the TTL, and the session was gone when it came)."""
        if self._settled or self.engine is None or self.job is None:
            return
        self._settled = True
        complete = self.final_taken and self.delivered >= self.taken
        if not complete:
            self.cancel()
        self._holding = complete and hold and not self.job.session.ephemeral
        self.queued_write = self.engine.settle(self.job, self.delivered, complete, release=not self._holding)

    def release(self) -> None:
        """(event loop) The route has handed the last frame of a turn settled with `hold` to its transport,
        or its client is gone: the session is idle from now. Later calls, and calls for a stream not
        held, do nothing."""
        if self._holding:
            self._holding = False
            self.engine.sessions.release(self.job.session)


@dataclass
class Snapshot:
    """A session's fields at one point of a turn, to go back to: its seen set (a copy) and its record's
    pending token, token count, unfinished character and last generation's count (its state row is kept
    beside it)."""

    seen: torch.Tensor  # (V,) bool
    pending: int | None
    n_tokens: int
    utf8_tail: bytes
    generated: int = 0


@dataclass(eq=False)  # a request is itself, not its fields' values: `in`, `index` and `remove` by identity
class Job:
    """One request on one session: ingest `tokens`, then (with a stream) generate.

    A generation on a kept session can be taken back, so that the session holds only what its client
    was handed: while the turn's input is ingested, `saved` is the session before the turn (a cancel
    or disconnect then restores it: the input is not applied); from the end of ingestion, `base` is the
    session at generated token 0 and `marks` are its state rows at a few generated-token counts
    (`Engine._mark`), from which `Engine._rollback` re-steps to the count the client got."""

    session: SessionRecord
    tokens: list[int]
    fresh: bool = False  # clear the slot first (a new session)
    stream: Stream | None = None
    params: SamplingParams | None = None
    max_new_tokens: int = 0
    text: bool = False  # a text model's generation: the session keeps its unfinished character
    carry: bytes = b""  # the session's utf8_tail this generation continues (b"" after new input)
    future: concurrent.futures.Future | None = None  # ingestion-only jobs
    submitted: float = field(default_factory=time.perf_counter)
    # engine-side progress
    ingest: list[int] = field(default_factory=list)
    offset: int = 0
    out: list[int] = field(default_factory=list)
    out_bytes: bytearray = field(default_factory=bytearray)
    stops: list[bytes] = field(default_factory=list)
    generator: CounterRNG | None = None
    counts: torch.Tensor | None = None  # (V,) float: generated tokens (presence/frequency penalties)
    targets: list[int] = field(default_factory=list)  # the token each ingested one is followed by
    last_emit: float = 0.0
    delete_after: bool = False
    passed_over: int = 0  # prefill iterations in a row that had no room for this job's next chunk
    prefix_keys: dict[int, bytes] | None = None  # a new session's prompt: its prefixes' cache keys by length
    prefix_keep: set[int] = field(default_factory=set)  # of those, the lengths stored as kept rows
    following: Job | None = None  # another new session's job, ingesting the first `follow_to` tokens of
    follow_to: int = 0  # this one's input too: this one waits for their state (`Engine._cached_prefix`)
    cached: int = 0  # tokens of `ingest` whose state came from the prefix cache
    queued: bool = True  # counted in the engine's queue depth (until it decodes or ends)
    # taking a turn back (kept sessions' generations; engine thread)
    saved: tuple[torch.Tensor, Snapshot] | None = None  # (state row, fields) before the turn's input
    base: Snapshot | None = None  # the session when its first token was about to be generated
    marks: list[tuple[int, torch.Tensor]] | None = None  # (tokens generated, the state row then)
    undone: bool = False  # the turn's input was taken back (cancelled while it was being ingested)
    ended: bool = False  # the generation is over (its final event sent)
    settled: bool = False  # the consumer is done and `keep` is final (Stream.settle, not complete)
    keep: int = 0  # generated tokens the session keeps: those its client was handed
    queued_write: concurrent.futures.Future | None = None  # resolved once a complete turn's write is queued
    deleted: concurrent.futures.Future | None = None  # a DELETE meanwhile: resolved once the session is gone

    @property
    def cancelled(self) -> bool:
        return self.stream is not None and self.stream.cancelled


class Gaps:
    """A decode block's inter-token latencies, row by row, without an array per row: the rows' tokens
    i > 0 share the block's step gaps (times[i] − times[i − 1], one np.diff per block), so a row adds a
    view of them and, when its previous token came before the block, the one gap to it (np.diff with
    `prepend`, per row, was 2-3 % of the engine thread at 64 rows)."""

    def __init__(self, times: np.ndarray) -> None:
        self.times, self.gaps = times, np.diff(times)  # (steps,) seconds, (steps − 1,)
        self.parts: list[np.ndarray] = []
        self.firsts: list[float] = []

    def add(self, n: int, before: float | None = None) -> None:
        """The gaps of a row's n tokens of this block (made at times[:n]), with the gap from `before`
        (its previous token's time) to its first, if given."""
        if n > 1:
            self.parts.append(self.gaps[: n - 1])
        if before is not None:
            self.firsts.append(float(self.times[0]) - before)

    @property
    def empty(self) -> bool:
        return not self.parts and not self.firsts

    def values(self) -> np.ndarray:
        """Every gap added (seconds), in no particular order."""
        return np.concatenate([np.asarray(self.firsts, dtype=np.float64), *self.parts])


class DecodeBatch:
    """The sessions being decoded: their states (R rows on the pool's dim), pending tokens (R,) and
    seen sets (R, V) on the device, one row per session. Rows may be at different points of their
    sequences (a SaShiMi row's pooling phase included): the model steps each row as if alone. A leaving
    session leaves a hole (stepped but ignored) that the next joiner fills in place; holes are
    compacted away once they are a quarter of the rows. The states are kept in `state_dtype` (the
    model's, `use_state_dtype`: float16 rounds a joining row's float32 state, and a leaving row's widens
    back exactly), the pool's in float32."""

    def __init__(self, pool: SlotPool, state_dtype: torch.dtype = torch.float32) -> None:
        self.pool = pool
        shape = list(pool.state.shape)
        shape[pool.dim] = 0
        self.state = pool.state.new_zeros(shape, dtype=state_dtype)
        self.tok = torch.zeros(0, dtype=torch.long, device=pool.state.device)
        self.seen = pool.seen.new_zeros((0, pool.seen.shape[1]))
        self.rows: list[Job | None] = []
        self.logprobs: dict[int, tuple[float, list[int], list[float]]] = {}  # of the last step, by row
        self.dummy = CounterRNG(0, device=pool.state.device)
        self._block_args: tuple | None = None  # `block`'s per-row arguments that last while the rows do
        self.stops_in_blocks = True  # False (a word vocabulary): rows with stop sequences take `step`
        # `step`'s per-row settings, kept on the device while the rows do (RowSampler: the uniforms drawn
        # there, no per-row Python a step); off on CPU, whose C sampler is faster
        self.device_sampler = pool.state.device.type != "cpu"
        self._step_args: tuple | None = None  # (RowSampler, params, counted rows, logprob rows)
        # rows moved to and from the pool one copy each (CPU: 2.6-4x cheaper than index ops there), else by
        # a few index kernels (a GPU: not two a row); tests flip it to run the index path on CPU
        self.row_copies = pool.state.device.type == "cpu"

    @property
    def live(self) -> int:
        return sum(1 for j in self.rows if j is not None)

    def leave(self, jobs: list[Job]) -> None:
        """Write the jobs' states back to their slots; their rows become holes."""
        if not jobs:
            return
        rows = [self.rows.index(j) for j in jobs]
        if self.row_copies:
            for row, j in zip(rows, jobs):
                self.pool.row(j.session.slot).copy_(self.state.select(self.pool.dim, row))
                self.pool.seen[j.session.slot].copy_(self.seen[row])
        else:  # a few kernels, not two a row
            r = torch.tensor(rows, device=self.tok.device)
            s = torch.tensor([j.session.slot for j in jobs], device=self.tok.device)
            self.pool.put_rows(s, self.state.index_select(self.pool.dim, r))
            self.pool.seen.index_copy_(0, s, self.seen.index_select(0, r))
        self._drop_step_args()
        for row in rows:
            self.rows[row] = None
        self._block_args = None

    def join(self, jobs: list[Job]) -> None:
        """Bring the jobs' slots into the batch (holes first, then new rows)."""
        if not jobs:
            return
        self._drop_step_args()
        dev = self.tok.device
        holes = [i for i, j in enumerate(self.rows) if j is None][: len(jobs)]
        fill, grow = jobs[: len(holes)], jobs[len(holes) :]
        if fill:
            r = torch.tensor(holes, device=dev)
            if self.row_copies:
                for i, j in zip(holes, fill):
                    self.state.select(self.pool.dim, i).copy_(self.pool.row(j.session.slot))
                    self.seen[i].copy_(self.pool.seen[j.session.slot])
            else:
                s = torch.tensor([j.session.slot for j in fill], device=dev)
                self.state.index_copy_(self.pool.dim, r, self.pool.rows(s).to(self.state.dtype))
                self.seen.index_copy_(0, r, self.pool.seen.index_select(0, s))
            self.tok.index_copy_(0, r, torch.tensor([j.session.pending for j in fill], device=dev))
            for i, j in zip(holes, fill):
                self.rows[i] = j
        if grow:
            s = torch.tensor([j.session.slot for j in grow], device=dev)
            self.state = torch.cat([self.state, self.pool.rows(s).to(self.state.dtype)], dim=self.pool.dim)
            self.seen = torch.cat([self.seen, self.pool.seen.index_select(0, s)])
            self.tok = torch.cat([self.tok, torch.tensor([j.session.pending for j in grow], device=dev)])
            self.rows += grow
        self._block_args = None

    def compact(self) -> None:
        holes = len(self.rows) - self.live
        if holes and (4 * holes >= len(self.rows)):
            self._drop_step_args()
            keep = [i for i, j in enumerate(self.rows) if j is not None]
            k = torch.tensor(keep, dtype=torch.long, device=self.tok.device)
            self.state = self.state.index_select(self.pool.dim, k)  # a new contiguous tensor
            self.seen, self.tok = self.seen.index_select(0, k), self.tok.index_select(0, k)
            self.rows = [self.rows[i] for i in keep]
            self._block_args = None

    def _drop_step_args(self) -> None:
        """Forget `step`'s cached rows, first writing the device sampler's counters back to the jobs'
        generators (the draws made there are theirs)."""
        if self._step_args is not None:
            self._step_args[0].sync()
            self._step_args = None

    def _row_args(self, V: int) -> tuple:
        """(sampler or None, params, counted rows, logprob rows) of the current rows, made once while
        they last (`device_sampler`), else every step."""
        if self._step_args is not None:
            return self._step_args
        params = [GREEDY if j is None else j.params for j in self.rows]
        counted = [i for i, j in enumerate(self.rows) if j is not None and j.counts is not None]
        wants = [i for i, p in enumerate(params) if p.logprobs is not None]
        gens = [CounterRNG(0) if j is None else j.generator for j in self.rows]  # holes: a stream each
        if not (self.device_sampler and all(isinstance(g, CounterRNG) for g in gens)):
            return None, params, counted, wants
        self._step_args = (RowSampler(params, gens, V, self.tok.device), params, counted, wants)
        return self._step_args

    def _make_resident(self, rec: RecurrentModel) -> None:
        """With CUDA graphs the rows live in their bucket's buffer and step (or run decode blocks) there in
        place: moved there unless they are already (they change when rows join past the end or are
        compacted). Without graphs nothing moves."""
        if hasattr(rec, "resident_state"):
            self.state = rec.resident_state(self.state)

    def step(self, rec: RecurrentModel) -> list[int]:
        """One recurrent step of every row, in place; returns the sampled tokens (host ints). Rows
        that ask for log-probabilities get them in `self.logprobs` (row → (logprob, top ids, top
        logprobs)) from the same logits the sampler was given."""
        self._make_resident(rec)
        logits, _ = rec.step(self.tok, self.state, out=self.state)  # (R, V)
        sampler, params, counted, wants = self._row_args(logits.shape[1])
        penalized = (
            any(p.repetition_penalty != 1 for p in params) if sampler is None else sampler.rows.any_penalty
        )
        counts = None
        if counted:
            counts = torch.zeros(logits.shape, device=logits.device)  # float32 whatever the logits
            counts[counted] = torch.stack([self.rows[i].counts for i in counted])
        seen = self.seen if penalized else None
        if sampler is None:
            gens = [self.dummy if j is None else j.generator for j in self.rows]
            new = sample(logits, params, gens, seen, counts)  # (R,) on the device
        else:
            new = sampler(logits, seen, counts)
        self.seen[torch.arange(len(self.rows), device=new.device), new] = True
        for i in counted:
            self.rows[i].counts[new[i]] += 1
        self.tok = new
        self.logprobs = {}
        if wants:
            k = max(params[i].logprobs for i in wants)
            w = torch.tensor(wants, device=new.device)
            chosen, top_i, top_v = token_logprobs(logits[w], new[w], k)
            for n, i in enumerate(wants):
                kk = params[i].logprobs
                self.logprobs[i] = (chosen[n], top_i[n][:kk], top_v[n][:kk])
        return new.tolist()  # the one host copy per step (two more with logprobs)

    def native(self, rec: RecurrentModel) -> bool:
        """Whether `block` can run this batch: the model's decode block serves it (on CPU the
        whole-network C step: any number of rows; with CUDA graphs the bucket's block graphs: rows within
        the largest bucket) and every row draws from a counter-based stream (every sampling setting runs
        in the block's sampler), asks for at most MAX_LOGPROBS log-probabilities a token (the block
        reports them) and has no stop sequence unless the ids are the text's bytes (`stops_in_blocks`:
        the blocks match stops on the ids)."""
        ready = getattr(rec, "decode_block_ready", None)
        if ready is None or not ready(len(self.rows)):
            return False
        return all(
            j is None
            or (
                (j.params.logprobs or 0) <= MAX_LOGPROBS
                and isinstance(j.generator, CounterRNG)
                and (self.stops_in_blocks or not j.stops)
            )
            for j in self.rows
        )

    def block(self, rec: RecurrentModel, K: int, limits: list[int], interrupt: ctypes.c_int | None = None):
        """Up to K steps of every row with limits[row] > 0 in one native call (`decode_block`): the
        same tokens, states, seen sets and counts as K calls of `step` (rows stop on their own after
        limits[row] tokens or at a stop sequence; holes get limit 0 and do not step; `interrupt`, once
        set, ends the block after the current round of steps). Advances each job's counter-based stream by the
        tokens it drew. Returns the fused.BlockResult."""
        self._drop_step_args()  # (the generators' counters as `step` left them)
        self._make_resident(rec)
        rows = self.rows
        V = self.seen.shape[1]
        if self._block_args is None:  # the rows' settings, keys and stops: until a row joins or leaves
            settings = row_settings([GREEDY if j is None else j.params for j in rows], V)
            counted = [i for i, j in enumerate(rows) if j is not None and j.counts is not None]
            gens = [self.dummy if j is None else j.generator for j in rows]
            stops = [[] if j is None else j.stops for j in rows]
            key = uint64_bits([g.key for g in gens])
            asked = [-1 if j is None or j.params.logprobs is None else j.params.logprobs for j in rows]
            lp = torch.tensor(asked, dtype=torch.long) if max(asked, default=-1) >= 0 else None
            self._block_args = (settings, counted, gens, key, stops, any(stops), lp)
        settings, counted, gens, key, stops, any_stops, lp = self._block_args
        counts = None
        if settings.counted:  # where the rows' counts are (the device): the C block's CPU, the graphs' GPU
            counts = torch.zeros(len(rows), V, device=self.seen.device)
            counts[counted] = torch.stack([rows[i].counts for i in counted])
        history = [b"" if j is None else bytes(j.out_bytes) for j in rows] if any_stops else [b""] * len(rows)
        res = rec.decode_block(
            K, self.state, self.tok, settings=settings, counts=counts, key=key,
            counter=uint64_bits([g.counter for g in gens]), limit=torch.tensor(limits, dtype=torch.long),
            stops=stops, history=history, seen=self.seen, interrupt=interrupt, logprobs=lp,
        )  # fmt: skip
        for i in counted:
            rows[i].counts.copy_(counts[i])
        for g, n in zip(gens, res.n_out.tolist()):
            g.counter += n
        return res


def id_outside(ids, V: int) -> int | None:
    """An id of `ids` (a list, or a dict's keys) outside the vocabulary [0, V): the smallest when it is below
    0, else the largest when it is V or more; None when every one is inside, or there are none. Two C-speed
    passes (min, max)."""
    if not ids:
        return None
    low, high = min(ids), max(ids)
    return low if low < 0 else high if high >= V else None


class Engine:
    """One model's worker thread: scheduling, prefill, batched decode, sampling, cancellation."""

    def __init__(
        self,
        model_id: str,
        rec: RecurrentModel,
        settings: Settings,
        sessions: SessionTable,
        metrics: ModelMetrics,
        token_bytes: Callable[[list[int]], bytes] | None = None,
    ) -> None:
        """token_bytes: a text model's ids → the UTF-8 bytes of their text, which stop sequences are
        matched against (a word vocabulary's, model.vocab.WordVocab.token_bytes); None: the ids are the
        bytes (byte-level text; audio has no stop sequences)."""
        self.model_id, self.rec, self.settings, self.sessions = model_id, rec, settings, sessions
        self.metrics = metrics
        self.token_bytes = token_bytes or _id_bytes
        self.pool = SlotPool(rec.init_state(settings.max_sessions), rec.config.vocab_size, rec.batch_dim)
        rows = settings.prefix_cache_rows(self.pool.bytes_per_slot)
        self.prefix_cache = None
        if rows:
            chunk, interval = settings.prefill_chunk_tokens, settings.prefix_cache_retention_interval
            self.prefix_cache = PrefixCache(rows, self.pool.bytes_per_slot, chunk, interval)
        # slot releases under way (event loop only): objects with `ended`, true once the slot is back (a
        # cancelled one-shot request's Job; a closed socket's delete, service.Release); service.wait_for_slots
        self.releasing: set = set()
        self.slots_awaited = 0  # slots the requests waiting for those releases want (event loop only)
        self.batch = DecodeBatch(self.pool, getattr(rec, "state_dtype", torch.float32))
        self.batch.stops_in_blocks = token_bytes is None  # the native blocks match stops on the ids as bytes
        self._inbox: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._queued = 0  # admitted jobs not yet decoding or done (guarded by _cv)
        self._prefilling: list[Job] = []
        self._waiting: collections.deque[Job] = collections.deque()  # ready to decode
        self._running: dict[str, Job] = {}  # session id → its job
        self._delivering: dict[str, Job] = {}  # session id → its turn, ended, until its route settles it
        self._settles: list[tuple[Job, int, bool]] = []  # from Stream.settle (guarded by _cv)
        # what `_admit` took from the inbox and from `_settles`, each kept here until it is handled, so that
        # a crash meanwhile answers the rest (`_abort_all`) (engine thread)
        self._admitting: collections.deque = collections.deque()
        self._settling: collections.deque[tuple[Job, int, bool]] = collections.deque()
        # the futures of ingest jobs and control calls not yet answered: any a crash leaves unanswered is
        # answered as the thread ends (`_loop`), so no waiter waits for ever (a cancelled one included:
        # `service.engine_answer`) (added under _cv, removed by their done callback)
        self._unanswered: set[concurrent.futures.Future] = set()
        self._outbox: list[tuple[Stream, Any]] = []
        self._stopping = False
        self._cancel_running = False  # cancel_running() asked: every running generation ends (guarded by _cv)
        self.crashed: str | None = None  # set when the engine thread died of a bug (guarded by _cv)
        self._next_housekeeping = 0.0
        self._block_step_s: float | None = None  # measured seconds per step of a native block ...
        self._block_step_rows = 0  # ... at about this many live rows (within a factor 2, else unknown)
        audio = rec.config.modality == "audio"  # the decode iteration's time and step limits:
        self._block_s = (settings.audio_decode_block_ms if audio else settings.decode_block_ms) / 1000
        self._max_steps = AUDIO_DECODE_BLOCK_MAX_STEPS if audio else DECODE_BLOCK_MAX_STEPS
        native_max = AUDIO_DECODE_BLOCK_NATIVE_MAX_STEPS if audio else DECODE_BLOCK_NATIVE_MAX_STEPS
        self._native_max_steps = native_max
        self._block_interrupt = ctypes.c_int(0)  # set by other threads: a native block ends after its round
        # rows at one phase of the model's period step cheapest together (`align_period`, a SaShiMi's
        # prod(pool)): the decode batch is kept at one phase, a row at another waits until the batch's
        # phase comes round to its own (`_decode`); 1: no preference
        self._period = int(getattr(rec, "align_period", 1))
        self._phase_wait: int | None = None  # steps until a row held for its phase can join (None: none held)
        self._phase_held: set[int] = set()  # id() of the waiting jobs held for their phase (`_decode`)
        # set by the app when a session store is configured (engine thread calls them):
        self.persist: Callable[..., None] | None = None  # (rec, raw, seen[, only_if_missing]): write a state
        self.forget: Callable[[str], None] | None = None  # delete a stored state
        self.let_go: Callable[[str], bool] | None = None  # the store holds this copy (StoreWriter.let_go)
        self.may_evict: Callable[[str], bool] | None = None  # StoreWriter.may_evict
        self.slots_evicting = 0  # (event loop) slots evictions under way free for their requesters
        # kept sessions a job has changed since their last `_persist` (engine thread): the store cannot hold
        # such a copy, whatever `let_go` knows of the last write (a turn's write-through comes after its
        # route settles it, and the session is idle from that settle: see `_persist_unless_stored`)
        self._unwritten: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name=f"engine-{model_id}", daemon=True)

    # --- called from the event loop ------------------------------------------------------------

    def expect_release(self, release) -> None:
        """(event loop) A slot is on its way back: `release.ended` turns true once it is (`releasing`,
        service.wait_for_slots)."""
        self.releases_under_way()
        self.releasing.add(release)

    def releases_under_way(self) -> int:
        """(event loop) How many slots are on their way back; the releases that have ended are dropped
        here, so `releasing` holds only those under way."""
        self.releasing = {r for r in self.releasing if not r.ended}
        return len(self.releasing)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._block_interrupt.value = 1  # (a cancel or room: seen after the block's current round)
        with self._cv:
            self._cv.notify()

    @property
    def queued(self) -> int:
        """Requests and bounded calls queued (what max_queued_requests bounds: `s4_queue_depth`)."""
        return self._queued

    @property
    def inbox(self) -> int:
        """Everything submitted and not yet taken by the engine thread, unbounded calls (deletes) too."""
        with self._cv:
            return len(self._inbox)

    @property
    def active_requests(self) -> int:
        return len(self._running)

    def _submit(self, item: Job | tuple) -> None:
        """Queue a job or a control call (fn, future, bounded). Jobs and bounded calls count against
        max_queued_requests (429 past it) and in the queue depth; an unbounded call (one that frees what
        the queue's limit protects: a delete, a dropped copy, room for a new session) neither."""
        counted = isinstance(item, Job) or item[2]
        with self._cv:
            if self._stopping:
                raise unavailable("the server is shutting down")
            if self.crashed is not None:  # nobody reads the inbox any more: refuse, never hang
                raise unavailable(self.crashed)
            if counted and self._queued >= self.settings.max_queued_requests:
                self.metrics.reject("queue_full")
                raise over_capacity(
                    f"model {self.model_id} has {self._queued} requests queued "
                    f"(max_queued_requests={self.settings.max_queued_requests})"
                )
            self._queued += counted
            self._inbox.append(item)
            fut = item.future if isinstance(item, Job) else item[1]
            if fut is not None:
                self._unanswered.add(fut)
                fut.add_done_callback(self._unanswered.discard)
            self.metrics.queue_depth.set(self._queued)
            self._block_interrupt.value = 1  # new work: a running native block ends after its round
            self._cv.notify()

    def submit(self, job: Job) -> None:
        """Queue a job (429 when the queue is full). Generation results arrive on job.stream;
        an ingestion-only job resolves job.future with the session record. Raises ValueError for a
        generation with nothing to start from (no tokens, on a new session or one without a pending
        token), for a token id outside [0, V) in the job's tokens, and for a generation whose logit_bias
        names one: each crashed the engine thread (every request of the model then failed). The routes
        refuse them first (`service.check_input`, an audio model starting from its silence; the prompts'
        and logit_bias' ids by name), but direct callers of `submit` (the library, the benchmarks) did not.
        The ids' check is two C-speed passes (min, max) over the tokens, which the routes' own checks
        already cost."""
        if job.stream is not None and not job.tokens and (job.fresh or job.session.pending is None):
            raise ValueError(
                "a generation needs a token to start from: give the job tokens, or a session with a pending "
                "token (service.start_generation gives an audio model its silence)"
            )
        V = self.pool.seen.shape[1]
        if (bad := id_outside(job.tokens, V)) is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {V}) of model {self.model_id}")
        bias = job.params.logit_bias if job.stream is not None and job.params is not None else None
        if (bad := id_outside(bias, V)) is not None:
            raise ValueError(f"logit_bias names token id {bad}, outside the vocabulary [0, {V}) of model "
                             f"{self.model_id}")  # fmt: skip
        if job.stream is not None:
            job.stream.engine, job.stream.job = self, job
        self._submit(job)

    def new_session(self, session_id: str, ephemeral: bool) -> SessionRecord:
        """(any thread) A session of this engine's model in a slot reserved for it, busy (its first job is
        about to be submitted) and added to the session table, as every Job's session must be: `_start`
        drops a job whose session the table no longer holds (deleted after its request claimed it).
        `ephemeral`: a one-shot request's session, deleted when its job ends. Raises APIError when
        every slot is in use (429, with Retry-After; nothing is then reserved or added)."""
        rec = SessionRecord(id=session_id, model=self.model_id, slot=self.pool.reserve(), busy=True,
                            ephemeral=ephemeral)  # fmt: skip
        self.sessions.add(rec)
        return rec

    def settle(
        self, job: Job, delivered: int, complete: bool, release: bool = True
    ) -> concurrent.futures.Future | None:
        """(event loop; `Stream.settle`) The consumer of `job`'s stream is done, having handed `delivered`
        generated tokens to its client's transport; `complete`: all of them, up to the final event.
        A one-shot session has nothing to keep. A kept session that got everything is released now (idle
        from now: its TTL counts from its client's last frame, not from the engine's last step) and
        written through to the store by the engine; otherwise the engine cancels the generation (if it
        still runs) and takes the session back to `delivered` tokens (`_rollback`), then releases it.
        Never refused: the session would stay busy. `release` False: a complete turn's session stays
        busy, for its caller to release (`Stream.release`). Returns, for a complete turn when a store is
        configured, a future that resolves once the engine has queued the session's write (then
        `StoreWriter.landed` waits for it); None otherwise, and when the engine is stopping."""
        if job.session.ephemeral:
            return None
        queued = None
        with self._cv:  # (before the release: a next turn's job comes after this in the engine's order)
            if complete and self.persist is not None and not self._stopping and self.crashed is None:
                queued = job.queued_write = concurrent.futures.Future()
            self._settles.append((job, delivered, complete))
            self._block_interrupt.value = 1
            self._cv.notify()
        if complete and release:
            self.sessions.release(job.session)
        return queued

    def call(self, fn: Callable[[Engine], Any], bounded: bool = True) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread (state copies: fork, export, import; a delete). `bounded`:
        refused (429) when max_queued_requests are queued, as a request is; False for a call that frees
        what the limit protects (a delete, a dropped copy, eviction for room), which a full queue had
        refused: a closed socket's session then held its slot until the TTL, in the overload that filled
        the queue (two helpers' audits)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._submit((fn, fut, bounded))
        return fut

    def cancel_running(self) -> None:
        """Cancel every generation running now (the end of a drain, before the connections close): each
        ends "cancelled" at its next step, so its client gets the done frame or event. Any thread."""
        with self._cv:
            self._cancel_running = True
            self._block_interrupt.value = 1
            self._cv.notify()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        error = unavailable("the server is shutting down")
        try:
            while self._iterate():
                pass
        except Exception as exc:  # a bug: fail every request rather than hang them
            log.exception("engine %s crashed", self.model_id)
            with self._cv:  # from now on _submit refuses with 503 (and /readyz says why)
                self.crashed = (
                    f"the engine of model {self.model_id} failed ({type(exc).__name__}); "
                    "see the server log and restart the server"
                )
            self.metrics.engine_crashes.inc()
            error = APIError(500, f"engine of model {self.model_id} failed; see the server log")
            self._abort_all(error)
            self._flush()
        finally:  # nobody answers after this: a job or call the crash caught half-way is answered now
            with self._cv:
                left = list(self._unanswered)
            for fut in left:
                _answer(fut, error=error)

    def _iterate(self) -> bool:
        """One iteration of the loop (the module docstring's four stages); False once stopped."""
        if not self._admit():
            return False
        self._housekeeping()
        later = self._prefill()
        self._decode()
        self._mark()
        self._flush()
        self._prefill_run(later)  # long prompts' chunks: after the new tokens are handed over
        return True

    def _has_work(self) -> bool:
        ready = any(j.stream.room() > 0 or j.cancelled for j in self._waiting)
        return bool(self._prefilling or self.batch.live or ready)

    def _admit(self) -> bool:
        with self._cv:
            if not self._inbox and not self._settles and not self._has_work() and not self._stopping:
                self._cv.wait(timeout=0.25)
            self._admitting.extend(self._inbox)
            self._inbox.clear()
            self._settling.extend(self._settles)
            self._settles = []
            stopping, cancel = self._stopping, self._cancel_running
            self._cancel_running = False
        while self._settling:  # first: a next turn on the session may be among the items
            self._settled(*self._settling[0])
            self._settling.popleft()  # (handled: a crash in it leaves it to `_abort_all`)
        while self._admitting:
            item = self._admitting[0]
            if isinstance(item, Job):
                self._start(item)
            else:
                fn, fut, counted = item
                if counted:
                    self._uncount(None)
                if fut.set_running_or_notify_cancel():  # (else its waiter gave it up: nobody reads it)
                    try:
                        fut.set_result(fn(self))
                    except Exception as exc:
                        fut.set_exception(exc)
            self._admitting.popleft()
        if cancel:
            for job in self._running.values():
                if job.stream is not None:
                    job.stream.cancelled = True
        if stopping:
            self._stop_work()
            return False
        return True

    def _stop_work(self) -> None:
        """The drain is over: prompts being ingested are finished (bounded by max_prompt_tokens, and
        it keeps each session's state consistent with its record; a cancelled turn's input is taken
        back instead), running generations end "cancelled" with their states back in their slots,
        queued work is refused (503), and every session's state goes to the store. The connections are
        closed by now (uvicorn closes them before the lifespan stops the engines): a kept session whose
        turn was not settled keeps the tokens its client was handed (`_rollback`), as its route would
        have had it, had its settle come before the stop."""
        while self._prefilling:
            self._prefill_run(self._prefill())
        decoding = [j for j in self.batch.rows if j is not None]
        self.batch.leave(decoding)
        for job in decoding + list(self._waiting):
            self._finish(job, "cancelled")  # (one whose client went away is taken back: `_rollback`)
        self._waiting.clear()
        for job in list(self._delivering.values()):  # ended, not settled: the connections are closed by
            self._settled(job, job.stream.delivered, False)  # now, so it keeps what its client was handed
        while self._prefilling:  # those take-backs' tokens, re-stepped before the states are written
            self._prefill_run(self._prefill())
        self._abort_all(APIError(503, "the server is shutting down"))
        if self.persist is not None:
            n = kept = 0
            for rec in self.sessions.records(self.model_id):
                written = self._persist_unless_stored(rec)
                n, kept = n + (written == 1), kept + (written == 2)
            log.info("model %s: %d session states handed to the store writer, and %d unchanged since their "
                     "last write (written only where the store no longer holds them)", self.model_id, n,
                     kept)  # fmt: skip
        self._flush()

    def _uncount(self, job: Job | None) -> None:
        """A queued item (job, or control call when None) leaves the queue."""
        if job is not None:
            if not job.queued:
                return
            job.queued = False
        with self._cv:
            self._queued -= 1
            self.metrics.queue_depth.set(self._queued)

    def _start(self, job: Job) -> None:
        rec = job.session
        if not self.sessions.holds(rec):  # deleted after its request claimed it: its slot is free
            self._uncount(job)
            job.ended = True
            if job.stream is not None:
                self._outbox.append((job.stream, Failed(_gone(rec))))
            else:
                _answer(job.future, error=_gone(rec))
            return
        if job.fresh:
            self.pool.clear(rec.slot)
        rec.has_state = True
        self._running[rec.id] = job
        if not rec.ephemeral:
            self._unwritten.add(rec.id)
        if job.stream is not None and not rec.ephemeral and job.tokens:  # a cancel may take the input back
            fields = Snapshot(self.pool.seen[rec.slot].clone(), rec.pending, rec.n_tokens, rec.utf8_tail,
                              rec.generated)  # fmt: skip
            job.saved = (self.pool.row(rec.slot).clone(), fields)
        if job.stream is not None:  # a generation counts its own tokens from here (a refused one never came)
            rec.generated = 0
        # the state holds every token but the pending one: feed the old pending token and all
        # new tokens but the last, which becomes the new pending token
        # a session at its initial state (a new one, or one created empty: a WebSocket's first turn): the
        # state after its input is a function of the input alone, which the prefix cache keys by
        new = self.prefix_cache is not None and (
            job.fresh or (rec.n_tokens == 0 and not bool(self.pool.row(rec.slot).any()))
        )
        if job.tokens:
            rec.utf8_tail = b""  # input (whole characters) follows: a held character can never complete
            job.ingest = ([rec.pending] if rec.pending is not None else []) + job.tokens[:-1]
            rec.pending = job.tokens[-1]
            rec.n_tokens += len(job.tokens)
            ids = torch.tensor(job.tokens, device=self.pool.seen.device)
            self.pool.seen[rec.slot, ids] = True
        if job.stream is not None:
            job.generator = job.params.generator(self.pool.state.device)
            job.stops = list(job.params.stop)
            if job.stops:  # matched on the turn's text: the carried character's bytes, then the generated
                job.out_bytes = bytearray(job.carry)
            if job.params.counts_output:
                job.counts = torch.zeros(self.pool.seen.shape[1], device=self.pool.state.device)
            if job.params.prompt_logprobs is not None and job.ingest:
                job.targets = job.ingest[1:] + [rec.pending]
        if new and job.ingest:
            self._cached_prefix(job)
        if job.offset < len(job.ingest):
            self._prefilling.append(job)
        else:
            self._ingested(job)

    def _cached_prefix(self, job: Job) -> None:
        """The input of a session at its initial state: its prefixes' keys, for `_prefill_run` to store the
        states at them, and (unless it wants the prompt's log-probabilities, which need the logits of every
        position) its state from the longest stored prefix, whose tokens are then not ingested. If another
        new session's job being ingested right now (or waiting, itself a follower) shares a keyed prefix
        with it that it has not passed yet (the samples of one prompt: OpenAI's `n` and `best_of`;
        questions after one document sent at once), this job follows that one to their longest such
        prefix: it ingests nothing until the other has stored its state there (as a kept row), then starts
        from the cache (`_resume`)."""
        job.prefix_keys = keys = boundary_keys(job.ingest, self.settings.prefill_chunk_tokens)
        job.prefix_keep = self.prefix_cache.plan(keys)
        if job.targets:
            return
        self.metrics.prefix_cache_queries.inc(len(job.ingest))
        stored = self.prefix_cache.longest(keys, len(job.ingest), use=False)
        best, lengths = (0 if stored is None else stored[0]), sorted(keys, reverse=True)
        first = lengths[-1]  # a prompt that shares a keyed prefix with this one shares its shortest
        for lead in self._prefilling:  # (a follower too: jobs follow earlier ones only, so no cycle)
            if lead.cancelled or lead.ended or lead.prefix_keys is None:
                continue
            if lead.prefix_keys.get(first) != keys[first]:  # (O(1) for each unrelated prompt)
                continue
            common = next((n for n in lengths if max(best, lead.offset) < n <= len(lead.ingest)
                           and lead.prefix_keys.get(n) == keys[n]), None)  # fmt: skip
            if common is not None:
                job.following, job.follow_to, best = lead, common, common
        if job.following is not None:  # (the stored prefix, shorter, is neither used nor kept)
            job.following.prefix_keep.add(job.follow_to)
        elif stored is not None:
            self._resume(job)

    def _resume(self, job: Job) -> None:
        """A new session's job starts from the longest stored prefix of its input, if longer than what it
        holds: at admission (`_cached_prefix`), or once the job it followed has passed their common
        prefix (or stopped). A job in `_prefilling` whose whole input was stored goes on to decode."""
        job.following = None
        hit = self.prefix_cache.longest(job.prefix_keys, len(job.ingest))
        if hit is not None and hit[0] > job.offset:
            self.metrics.prefix_cache_hits.inc(hit[0] - job.offset)
            job.offset = job.cached = hit[0]
            self.pool.put_rows(torch.tensor([job.session.slot], device=self.pool.state.device), hit[1])
            self._cache_gauges()  # (a spare row that serves a hit becomes kept)
        if job.offset == len(job.ingest) and job in self._prefilling:
            self._prefilling.remove(job)
            self._ingested(job)

    def _ingested(self, job: Job) -> None:
        if job.ended:  # a rollback's tokens are re-stepped
            self._turn_over(job)
        elif job.stream is None:
            self._end(job)
            _answer(job.future, job.session)
        elif job.max_new_tokens == 0:  # prompt log-probabilities only (echo)
            self._finish(job, "length")
        else:
            rec = job.session
            if not rec.ephemeral:  # generated token 0: the first rollback point
                job.saved = None
                seen = self.pool.seen[rec.slot].clone()
                job.base = Snapshot(seen, rec.pending, rec.n_tokens, rec.utf8_tail)
                job.marks = [(0, self.pool.row(rec.slot).clone())]
            self._waiting.append(job)

    def _prefill(self) -> list[tuple[Job, list[int]]]:
        """Pick prompt chunks within the token budget: one chunk (fixed boundaries, so the chunks and
        their results do not depend on load) of each job that fits, the jobs with the fewest tokens left
        first, so a short prompt that arrives while a long one is ingested waits for one chunk of it,
        not for all of it. A job passed over (its chunk did not fit) goes ahead of every job passed over
        fewer times: the job passed over most always gets its chunk (the budget holds at least one), so
        each is ingested within a bounded number of iterations whatever keeps arriving. The chunks that
        complete their prompt run now (`_prefill_run`), so their first tokens come from this iteration's
        decode; the others (long prompts with more to go) are returned, to run after this iteration's
        hand-over: a short prompt's first token does not wait for a long prompt's chunk either."""
        chunk, budget = self.settings.prefill_chunk_tokens, self.settings.prefill_token_budget
        for job in list(self._prefilling):
            if job.cancelled and not job.ended:  # stop now (a rollback's re-stepping always completes)
                self._prefilling.remove(job)
                job.following = None  # (a follower: it holds no reference to the job it waited on)
                if job.saved is not None:  # a kept session: back to its state before the turn
                    self._restore(job)
                job.undone = True  # (a one-shot session is deleted: its slot freed)
                self._finish(job, "cancelled")

        def priority(j: Job) -> tuple:  # passed over most, then fewest tokens left, then oldest
            return -j.passed_over, len(j.ingest) - j.offset, j.submitted

        # followers whose leader passed their common prefix, or stopped: a leader leaves `_prefilling` only
        # ingested (its offset at its end) or cancelled (`undone`, above), so no search of the list per row;
        # or ended: a kept session's turn whose client left as its prompt was ingested is taken back, and
        # the rollback sets its offset to 0 (tokens to step again), so its follower waited forever while
        # the engine spun, one decode step per block (a helper's audit)
        for job in list(self._prefilling):
            lead = job.following
            if lead is not None and (lead.undone or lead.ended or lead.offset >= job.follow_to):
                self._resume(job)
        order = sorted((j for j in self._prefilling if j.following is None), key=priority)
        picked: list[tuple[Job, list[int]]] = []
        used = 0
        for job in order:
            piece = job.ingest[job.offset : job.offset + chunk]
            if picked and used + len(piece) > budget:
                job.passed_over += 1
                continue
            job.passed_over = 0
            picked.append((job, piece))
            used += len(piece)
        now = [(j, p) for j, p in picked if j.offset + len(p) == len(j.ingest)]
        self._prefill_run(now)
        return [(j, p) for j, p in picked if j.offset + len(p) < len(j.ingest)]

    def _prefill_run(self, picked: list[tuple[Job, list[int]]]) -> None:
        """Ingest the picked chunks (job, its next tokens); equal-length chunks run as one batched
        prefill. A job whose prompt is then complete goes on to decode (`_ingested`). A rollback's
        tokens (`job.ended`) are stepped one at a time with the decode's `step` instead, so that its
        state is bit for bit the one its generation had after those tokens."""
        if not picked:
            return
        used = sum(len(piece) for job, piece in picked if not job.ended)
        groups: dict[tuple[int, bool], list[tuple[Job, list[int]]]] = collections.defaultdict(list)
        for job, piece in picked:
            groups[len(piece), job.ended].append((job, piece))
        dev = self.pool.state.device
        for (length, steps), group in groups.items():
            slots = torch.tensor([j.session.slot for j, _ in group], device=dev)
            toks = torch.tensor([p for _, p in group], device=dev)  # (G, L)
            if steps:  # (in the decode batch's state dtype: a float16 state rounds at every step there)
                x = self.pool.rows(slots).to(self.batch.state.dtype)
                for t in range(length):
                    self.rec.step(toks[:, t], x, out=x)
                self.pool.put_rows(slots, x)
                continue
            # rows of one group may be at different points of their sequences (for SaShiMi, different
            # pooling phases: its prefill runs rows of equal phase together, each as if alone)
            # the logits only where prompt log-probabilities were asked for: the prompt's last token is
            # stepped by the decode (Job.ingest), so ingestion itself needs only the state
            want = "all" if any(job.targets for job, _ in group) else "none"
            logits, x = self.rec.prefill(toks, self.pool.rows(slots), logits=want)
            self.pool.put_rows(slots, x)
            self._store_prefixes(group, x)
            for g, (job, piece) in enumerate(group):
                if job.targets:  # prompt log-probabilities: position i predicts the token after it
                    k = job.params.prompt_logprobs
                    nxt = torch.tensor(job.targets[job.offset : job.offset + len(piece)], device=dev)
                    chosen, top_i, top_v = token_logprobs(logits[g], nxt, k)
                    job.stream.prompt_logprobs += list(zip(chosen, top_i, top_v))
        for job, piece in picked:
            job.offset += len(piece)
            if job.offset == len(job.ingest):
                self._prefilling.remove(job)
                self._ingested(job)
        self.metrics.prefill_tokens.inc(used)

    def _store_prefixes(self, group: list[tuple[Job, list[int]]], x: torch.Tensor) -> None:
        """Store in the prefix cache the states (x's rows, in `group`'s order) of the jobs whose chunk
        ends at one of their prompt's keyed prefixes, as kept or spare rows (`PrefixCache.plan`)."""
        if self.prefix_cache is None:
            return
        dim = self.pool.dim
        for g, (job, piece) in enumerate(group):
            end = job.offset + len(piece)
            key = None if job.prefix_keys is None else job.prefix_keys.get(end)
            if key is None:
                continue
            try:
                self.prefix_cache.put(key, x.narrow(dim, g, 1), keep=end in job.prefix_keep)
            except RuntimeError as exc:  # torch.OutOfMemoryError; on CPU "... can't allocate memory ..."
                if not isinstance(exc, torch.OutOfMemoryError) and "allocate" not in str(exc):
                    raise
                kept = self.prefix_cache.shrink()
                log.warning("model %s: out of memory for the prefix cache: it keeps %d rows from now on (%s)",
                            self.model_id, kept, type(exc).__name__)  # fmt: skip
                break
        self._cache_gauges()

    def _cache_gauges(self) -> None:
        """The prefix cache's bytes and rows by kind, as held now (after rows are stored or a hit)."""
        cache, m = self.prefix_cache, self.metrics
        m.prefix_cache_bytes.set(cache.bytes)
        m.prefix_cache_rows["kept"].set(cache.kept)
        m.prefix_cache_rows["spare"].set(cache.spare)

    def _decode(self) -> None:
        b = self.batch
        leaving = [j for j in b.rows if j is not None and (j.cancelled or j.stream.room() <= 0)]
        b.leave(leaving)
        for job in leaving:
            if job.cancelled:
                self._finish(job, "cancelled")
            else:
                self._waiting.appendleft(job)  # paused: first to rejoin
        # not while prompts are ingested: the decode stage then runs one step per iteration, so a wait
        # of 15 steps would be 15 iterations with a prefill chunk each (the batch is aligned after)
        align = self._period > 1 and not self._prefilling
        target = self._align() if align else None
        free = self.settings.max_batch_size - b.live
        phase = self._waiting_phases() if align and free > 0 else {}
        joining, keep = [], collections.deque()
        held = []  # distances (steps) to the batch's phase of the jobs held only for their phase
        self._phase_held = set()
        while self._waiting:
            job = self._waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
            elif len(joining) + len(held) < free and job.stream.room() > 0:  # a held job keeps its place
                if target is None and phase:  # an empty batch: its phase is its first joiner's
                    target = phase[id(job)]
                if phase and phase[id(job)] != target:
                    held.append((phase[id(job)] - target) % self._period)
                    self._phase_held.add(id(job))
                    keep.append(job)
                    continue
                self._uncount(job)  # decoding now
                joining.append(job)
            else:  # (waits for room or a place: not for its phase)
                keep.append(job)
        self._waiting = keep
        # the stage ends where the nearest held job can join; a job waiting for room or a place does not
        # cut it into one-step blocks (`_joinable`)
        self._phase_wait = min(held) if held else None
        b.join(joining)
        b.compact()
        # DECODE_BLOCK_STEPS steps, or more while within decode_block_ms (at most
        # DECODE_BLOCK_MAX_STEPS), before the loop's other stages run again: the block ends as soon as
        # a row finishes, runs out of stream room or is cancelled, or new work arrives, so no row
        # steps past its end and a new request waits at most one step; the tokens of the block reach
        # the event loop in one hand-over (so a fast step, as for one audio stream, sends tens of
        # samples per frame instead of eight).
        t_end = time.perf_counter() + self._block_s
        if b.live and b.native(self.rec):
            self._decode_native(t_end)
            return
        for k in range(1, self._max_steps + 1):
            held = self._phase_wait
            if not b.live or (held is not None and (held - k + 1) % self._period == 0):
                return  # (a held job's phase has come round: it joins now)
            ids = b.step(self.rec)
            self.metrics.batch_size.observe(b.live)
            now = time.perf_counter()
            done, full, first = [], False, False
            for row, (job, tok) in enumerate(zip(b.rows, ids)):
                if job is not None:
                    if row in b.logprobs:
                        job.stream.logprobs.append(b.logprobs[row])
                    first |= not job.out
                    if self._emit(job, tok, now):
                        done.append(job)
                    elif job.stream.room() <= 0 or job.cancelled:
                        full = True
            if done:
                self._retire(done)
            if done or full or first or self._inbox or self._prefilling or self._joinable():
                return  # (first: a request's first token goes out now, not after the block)
            if k >= DECODE_BLOCK_STEPS and now >= t_end:
                return

    def _joinable(self) -> bool:
        """Whether the decode stage should end for a waiting job: one cancelled, or one with stream room while
        the batch has a place for it (not counting those held for their phase, `_phase_wait`). A job paused
        for room (its client's reading `wake`s the engine: a native block ends after its round) or waiting
        for a place (a row finishing, filling its stream or cancelled ends the stage) does not cut every
        row's decode into one step per iteration, as any waiting job did: one client that stopped reading,
        or one request queued behind a full batch, cost 32 rows of text-shakespeare 4x their tokens/s with
        the engine driven by hand, 1.5-1.8x through a WebSocket server (docs/server.md)."""
        places = self.settings.max_batch_size - self.batch.live - len(self._phase_held)
        return any(
            j.cancelled or (places > 0 and j.stream.room() > 0 and id(j) not in self._phase_held)
            for j in self._waiting
        )

    def _awaits_place(self) -> bool:
        """A waiting job (with stream room) has no place in the full batch: it takes the first place freed."""
        if self.batch.live < self.settings.max_batch_size:
            return False
        return any(not j.cancelled and j.stream.room() > 0 for j in self._waiting)

    def _align(self) -> int | None:
        """The decode batch's phase (of `self._period`): the one most of its live rows are at (ties: the
        smaller); a row at another (one that joined while prompts were ingested, or whose stream filled
        mid-block: it stopped stepping while the others went on) leaves, first to rejoin, in phase. None
        for an empty batch."""
        b = self.batch
        live = [i for i, j in enumerate(b.rows) if j is not None]
        if not live:
            return None
        phases = self.rec.row_phases(b.state, torch.tensor(live, device=b.state.device))
        counts = collections.Counter(phases)
        target = max(counts, key=lambda p: (counts[p], -p))
        out = [b.rows[i] for i, p in zip(live, phases) if p != target]
        if out:
            b.leave(out)
            self._waiting.extendleft(reversed(out))
        return target

    def _waiting_phases(self) -> dict[int, int]:
        """id(job) → the phase of its session's state, for the jobs waiting to decode."""
        jobs = [j for j in self._waiting if not j.cancelled]
        if not jobs:
            return {}
        slots = torch.tensor([j.session.slot for j in jobs], device=self.pool.state.device)
        return dict(zip(map(id, jobs), self.rec.row_phases(self.pool.state, slots)))

    def _retire(self, done: list[Job]) -> None:
        """Take the jobs that finished in a decode step or block out of the batch and finish each,
        with "stop" when it ended on a stop sequence, else "length"."""
        self.batch.leave(done)
        for job in done:
            self._finish(job, "stop" if job.stops and self._stop_at(job) is not None else "length")

    def _decode_native(self, t_end: float) -> None:
        """The decode loop in native blocks: each row stops inside a block on its own at its token limit, its
        stream's room or a stop sequence, exactly where the one-step loop would have. A block is as many steps
        as fit before t_end at the measured step time (a moving average over blocks, each timed from its call
        to its last step), at least what the stage lacks of DECODE_BLOCK_STEPS, at most
        DECODE_BLOCK_NATIVE_MAX_STEPS (AUDIO_… for an audio model); DECODE_BLOCK_STEPS until a step time is
        measured at about this many live rows (within a factor 2: a batch grown from 1 row to 64 would
        otherwise take 32 steps at 1 row's step time, several hand-over periods). (Sizing every block by the
        time left after a first block of 8, with the call's fixed cost and its wait for the GIL counted as
        step time, had cut audio stages into blocks of 8, 75, 45, 22, 8, 1 steps: 2026-11-30, 16 streams.) A
        block is 1 step while new work waits (a prompt, or a waiting job that can join now: `_joinable`; not
        one paused for its stream's room or queued behind a full batch) or a row has yet to make its first
        token (which then goes out at once, not after a whole block); while a job waits for a place in the
        full batch, a block ends at the first row's limit, so the job takes that place at once. New work, a
        cancel or freed stream room that arrive during a block
        end it after each group's current round (`wake` and `_submit` set the interrupt flag): one step when
        each thread has at most 8 rows, else up to 4 steps of a group of 8 (fused.BLOCK_SCHEDULE). The loop
        ends after a block in which a row finished or filled its stream, when new work arrived, or after the
        model's most steps or its hand-over period, or when less than DECODE_BLOCK_STEPS steps' time is left
        of that period (but not before DECODE_BLOCK_STEPS steps). A block of the CUDA graphs
        (`model/cuda_graphs.py`) runs to its end (no interrupt: new work waits at most one block, sized to
        the time left); the time it spent capturing a graph first (`setup_s`) is not step time."""
        b, steps = self.batch, 0
        held = self._phase_wait  # a waiting job held for its phase, the nearest this far away (None: none)
        while b.live and steps < self._max_steps:
            self._block_interrupt.value = 0  # before looking for work: nothing that arrives is missed
            rows, est = b.live, self._block_step_s
            if est is not None and not self._block_step_rows / 2 <= rows <= 2 * self._block_step_rows:
                est = None  # measured at under half or over twice these rows: measure again, in a short block
            to_phase = None if held is None else (held - steps) % self._period
            if to_phase == 0:
                return  # a held job's phase has come round: it joins now
            pending = bool(self._inbox or self._prefilling or self._joinable())
            first = any(j is not None and not j.out for j in b.rows)  # a request's first token
            if pending or first:
                K = 1
            elif est is None:  # (past DECODE_BLOCK_STEPS with no estimate, a stage has ended below)
                K = max(1, DECODE_BLOCK_STEPS - steps)
            else:  # the steps that fit before the hand-over, at least the stage's first DECODE_BLOCK_STEPS
                fit = int((t_end - time.perf_counter()) / est)
                K = max(1, DECODE_BLOCK_STEPS - steps, min(self._native_max_steps, fit))
            K = min(K, self._max_steps - steps, to_phase or K)
            limits = [
                0 if j is None else max(0, min(j.max_new_tokens - len(j.out), j.stream.room()))
                for j in b.rows
            ]
            if self._awaits_place():  # the block ends where the first row's place frees (its limit or room)
                K = min(K, min((n for n in limits if n), default=K))
            t0 = time.perf_counter()
            res = b.block(self.rec, K, limits, self._block_interrupt)
            steps += res.steps
            n_np = res.n_out.numpy()
            n_out, stopped = n_np.tolist(), res.stopped.tolist()
            tokens, times = res.tokens.t().tolist(), res.times.numpy()  # (R, steps), (steps,)
            if res.steps >= 2:  # the step time at this batch (moving average), for the next K: from the
                # call to the block's last step (C's CLOCK_MONOTONIC = perf_counter's clock), so a wait
                # for the GIL after the call (while the event loop sends the last hand-over) does not
                # count; not from the step times alone, which a thread with more than 8 rows stamps by
                # groups through rounds of steps (fused.BLOCK_SCHEDULE), bunched at each round's end
                per = max(float(times[-1]) - t0 - res.setup_s, 1e-9) / res.steps  # (setup: a graph's capture)
                if est is None:  # measured afresh: at these rows
                    est, self._block_step_rows = per, rows
                else:
                    est = 0.75 * est + 0.25 * per
                self._block_step_s = est
            # the rows stepped at each step k: those that made more than k tokens
            observe_many(self.metrics.batch_size, (n_np[None, :] > np.arange(res.steps)[:, None]).sum(1))
            done, full, behind, itl = [], False, False, Gaps(times)
            asked = {}  # row → its (chosen, top ids, top values) by step, for the rows that asked
            if res.logprobs is not None:
                lp_rows = [r for r, j in enumerate(b.rows) if j is not None and j.params.logprobs is not None]
                picked = (t[:, lp_rows].transpose(0, 1).tolist() for t in res.logprobs)  # (rows, steps, …)
                asked = dict(zip(lp_rows, zip(*picked)))
            for row, job in enumerate(b.rows):
                if job is None or not n_out[row]:
                    continue
                if row in asked:  # (before its tokens go out, as the one-step loop's)
                    (chosen, top_i, top_v), k = asked[row], job.params.logprobs
                    made = range(n_out[row])
                    job.stream.logprobs += [(chosen[i], top_i[i][:k], top_v[i][:k]) for i in made]
                if self._emit_many(job, tokens[row][: n_out[row]], times, stopped[row], itl):
                    done.append(job)
                elif job.stream.room() <= 0 or job.cancelled:
                    full = True
                elif n_out[row] < res.steps and self._period > 1:  # stopped at its room, which its
                    # client freed since: out of the batch's phase, so the stage ends and `_align` regroups
                    behind = True
            if not itl.empty:
                observe_many(self.metrics.itl, itl.values())
            if done:
                self._retire(done)
            if done or full or behind or pending or first or not res.steps:
                return
            if self._inbox or self._prefilling or self._joinable():
                return
            if steps >= DECODE_BLOCK_STEPS and (
                est is None or t_end - time.perf_counter() < DECODE_BLOCK_STEPS * est
            ):
                return  # past the hand-over, or too close to it for a block worth its fixed cost

    def _emit_many(self, job: Job, toks: list[int], times: np.ndarray, stopped: bool, itl: Gaps) -> bool:
        """Record and send a block's tokens of one job (token i made at times[i]) and add their
        inter-token latencies to `itl`, for the caller to observe in one go; True when the generation is
        complete (its limit reached, or `stopped` by a stop sequence)."""
        first = not job.out
        job.out += toks
        job.session.pending = toks[-1]
        job.session.n_tokens += len(toks)
        job.session.generated = len(job.out)
        job.stream.sent += len(toks)
        self._outbox.append((job.stream, list(toks)))  # one block: _flush delivers it as one list
        m, n = self.metrics, len(toks)
        if first:
            m.ttft.observe(float(times[0]) - job.submitted)
            itl.add(n)  # token i > 0: times[i] − times[i − 1]
        else:
            itl.add(n, job.last_emit)  # and token 0: times[0] − the job's previous token's time
        job.last_emit = float(times[n - 1])
        m.tokens.inc(n)
        if job.stops:
            job.out_bytes += self.token_bytes(toks)
        return stopped or len(job.out) >= job.max_new_tokens

    def _stop_at(self, job: Job) -> int | None:
        """Where the first stop sequence that a generated byte completes starts in `out_bytes` (the
        carried character's bytes, then the generated ones), or None."""
        return find_stop(bytes(job.out_bytes), job.stops, len(job.out_bytes) - len(job.carry))

    def _emit(self, job: Job, tok: int, now: float) -> bool:
        """Record and send one generated token; True when the generation is complete."""
        job.out.append(tok)
        job.session.pending = tok  # sampled, not yet fed: the next step (or turn) feeds it
        job.session.n_tokens += 1
        job.session.generated = len(job.out)
        job.stream.sent += 1
        self._outbox.append((job.stream, tok))
        m = self.metrics
        if len(job.out) == 1:
            m.ttft.observe(now - job.submitted)
        else:
            m.itl.observe(now - job.last_emit)
        job.last_emit = now
        m.tokens.inc()
        if job.stops:  # (before the length: a stop the last token completes is a stop, as in a native block)
            piece = self.token_bytes([tok])
            job.out_bytes += piece
            if find_stop(job.out_bytes, job.stops, len(piece)) is not None:
                return True
        return len(job.out) >= job.max_new_tokens

    def _finish(self, job: Job, reason: str) -> None:
        stop_at = stop_token = None
        if reason == "stop" and (stop_at := self._stop_at(job)) is not None:
            carried = len(job.carry)
            stop_token = max(0, stop_at - carried)
            if self.token_bytes is not _id_bytes:  # the token the stop starts in
                end, stop_token = carried, 0
                while (end := end + len(self.token_bytes([job.out[stop_token]]))) <= stop_at:
                    stop_token += 1
        prompt = 0 if job.undone else len(job.tokens)  # (cancelled during ingestion: the input not applied)
        cached = 0 if job.undone else job.cached
        self._outbox.append((job.stream, Finished(reason, prompt, len(job.out), stop_at, cached, stop_token)))
        self.metrics.e2e.observe(time.perf_counter() - job.submitted)
        self.metrics.finished[reason].inc()
        self._end(job)

    def _end(self, job: Job) -> None:
        """The job no longer runs: release its session (delete it if one-shot or asked to). A kept
        session's generation stays busy until its consumer settles the stream (`settle`): released
        then, or first taken back to the tokens its client was handed (`_rollback`)."""
        rec = job.session
        self._uncount(job)
        if job.text and job.stream is not None and not job.undone:  # before the record is released or stored
            rec.utf8_tail = utf8_tail(job.carry + self.token_bytes(job.out))
        if rec.ephemeral or job.delete_after:
            self._running.pop(rec.id, None)
            self._delete_after(job)
            # ended once its slot is back, not before: a one-shot request's job is a release under way
            # until it has ended (`releasing`, service.wait_for_slots), and a retry that saw it ended with
            # the slot not yet freed got a 429
            job.ended = True
            return
        job.ended = True
        if job.stream is None:
            self._running.pop(rec.id, None)
            self.sessions.release(rec)
            self._persist(rec)  # idle: write through
        elif job.settled:  # its client went away before the end
            self._rollback(job)
        else:
            self._running.pop(rec.id, None)  # busy until its consumer settles (Stream.settle)
            self._delivering[rec.id] = job

    def _settled(self, job: Job, delivered: int, complete: bool) -> None:
        """`settle`, on the engine thread: a complete stream's session (released already) is written
        through; otherwise the generation is cancelled if it still runs (`_end` then takes it back) or
        taken back now."""
        if self._delivering.get(job.session.id) is job:
            del self._delivering[job.session.id]
        if complete:
            job.marks = job.base = None
            if self.sessions.holds(job.session):
                self._persist(job.session)
            if job.queued_write is not None:
                _answer(job.queued_write)
            return
        job.settled, job.keep = True, delivered
        if job.ended:
            self._rollback(job)
        else:
            job.stream.cancelled = True  # (it ends at its next step or prompt chunk)

    def _rollback(self, job: Job) -> None:
        """Take a kept session back to `job.keep` generated tokens, those its client was handed (the
        generation has ended): the state row of the last mark at or before that count goes back into
        the slot, and the tokens from the mark to the count are stepped again, one at a time through the
        decode's `step` (`_prefill_run`, a chunk per engine iteration), so that the state is bit for bit
        the one the generation had after them: the session is that of a turn that generated only
        `keep` tokens. Its pending token, token count, seen set and unfinished character follow. Then it
        is released and written through (`_turn_over`)."""
        rec, k = job.session, job.keep
        if not self.sessions.holds(rec):  # deleted (or evicted) while its stream was being delivered
            self._running.pop(rec.id, None)
            if job.deleted is not None:
                _answer(job.deleted)
            return
        job.ingest, job.offset, job.targets = [], 0, []
        if job.marks is not None and k < len(job.out):
            base, (pos, row) = job.base, [m for m in job.marks if m[0] <= k][-1]
            fed = [base.pending] + job.out  # after n generated tokens the state has taken in fed[:n]
            self.pool.row(rec.slot).copy_(row)
            seen = self.pool.seen[rec.slot]
            seen.copy_(base.seen)
            if k:
                seen[torch.tensor(job.out[:k], device=seen.device)] = True
            rec.pending, rec.n_tokens, rec.generated = fed[k], base.n_tokens + k, k
            del job.out[k:]
            job.ingest, job.marks = fed[pos:k], None
            if job.text:
                rec.utf8_tail = utf8_tail(job.carry + self.token_bytes(job.out))
        if job.ingest:
            self._running[rec.id] = job  # (busy: a delete meanwhile waits for the end)
            self._prefilling.append(job)
        else:
            self._turn_over(job)

    def _turn_over(self, job: Job) -> None:
        """A settled turn is over (taken back): release its session and write it through, or delete it
        if that was asked meanwhile."""
        rec = job.session
        self._running.pop(rec.id, None)
        job.marks = job.base = None
        if job.delete_after:
            self._delete_after(job)
        else:
            self.sessions.release(rec)
            self._persist(rec)

    def _restore(self, job: Job) -> None:
        """Put a kept session back as it was before this turn's input (cancelled during ingestion)."""
        rec = job.session
        row, was = job.saved
        self.pool.row(rec.slot).copy_(row)
        self.pool.seen[rec.slot].copy_(was.seen)
        rec.pending, rec.n_tokens, rec.utf8_tail = was.pending, was.n_tokens, was.utf8_tail
        rec.generated = was.generated  # (the turn's reset in `_start` taken back too)
        job.saved = None

    def _mark(self) -> None:
        """Rollback points of the kept sessions in the decode batch: a copy of a row's state every
        `capacity` generated tokens (its stream's; taken at the end of a decode stage, so at most a
        decode block later), each dropped once its client has been handed a later one's tokens. A
        rollback then re-steps fewer than a capacity and a decode block of tokens however long the
        turn, and a turn holds a few rows: those from the last one its client passed to the newest
        (the tokens in flight, its stream's queue and the frame being sent, span about two)."""
        b = self.batch
        for i, job in enumerate(b.rows):
            if job is None or job.marks is None:
                continue
            marks, n = job.marks, len(job.out)
            while len(marks) > 1 and marks[1][0] <= job.stream.delivered:
                marks.pop(0)
            if n - marks[-1][0] >= job.stream.capacity:
                marks.append((n, b.state.select(self.pool.dim, i).clone()))

    def _abort_all(self, error: APIError) -> None:
        """Answer every job and call with `error` (a crash, or the end of a stop): each leaves the queue
        (`s4_queue_depth`), and a one-shot request's session goes with its slot (`s4_active_sessions`), as
        when it ends; a crash left both counted for ever."""
        for job in list(self._running.values()):
            if job.deleted is not None:  # (no delete comes: its DELETE is answered)
                _answer(job.deleted)
            if job.stream is not None:
                if not job.ended:  # (an ended one, a turn being taken back, has had its final event)
                    self._outbox.append((job.stream, Failed(error)))
            elif job.future is not None:
                _answer(job.future, error=error)
            self._running.pop(job.session.id, None)
            self._drop_aborted(job)
        with self._cv:
            pending = list(self._admitting) + list(self._inbox)  # (taken by a crashed `_admit`, then new)
            self._inbox.clear()
            settles = list(self._settling) + self._settles
            self._settles = []
        self._admitting.clear()
        self._settling.clear()
        for job, _, _ in settles:  # its route waits for the write it would have queued: none comes
            if job.queued_write is not None:
                _answer(job.queued_write)
        for item in pending:
            if isinstance(item, Job):
                if item.stream is not None:
                    self._outbox.append((item.stream, Failed(error)))
                else:
                    _answer(item.future, error=error)
                self._drop_aborted(item)
            else:
                if item[2]:  # (a bounded call: counted in the queue until taken)
                    self._uncount(None)
                _answer(item[1], error=error)

    def _drop_aborted(self, job: Job) -> None:
        """A job answered by `_abort_all`: out of the queue, and its one-shot session's slot freed."""
        self._uncount(job)
        if job.session.ephemeral:
            self._release(job.session)
            job.ended = True  # (its slot is back: `releasing`)

    def _flush(self) -> None:
        """Deliver this iteration's events: one thread-safe callback per event loop, one list per
        stream (its tokens in order, then its final event). An outbox item is a token id, a list of
        token ids (a block), or a final event."""
        if not self._outbox:
            return
        by_stream: dict[Stream, list] = {}
        for stream, item in self._outbox:
            items = by_stream.get(stream)
            if items is None:
                items = by_stream[stream] = []
            if isinstance(item, list):
                items += item
            else:
                items.append(item)
        self._outbox = []
        by_loop: dict[asyncio.AbstractEventLoop, list] = collections.defaultdict(list)
        for stream, items in by_stream.items():
            if items:
                by_loop[stream.loop].append((stream, items))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + min(1.0, self.settings.session_ttl_s / 4)
        for rec in self.sessions.claim_expired(self.model_id, self.settings.session_ttl_s):
            self._expire(rec)
        self._set_slot_gauges()

    def _set_slot_gauges(self) -> None:
        self.metrics.active_sessions.set(self.pool.in_use)
        self.metrics.state_bytes.set(self.pool.in_use * self.pool.bytes_per_slot)

    def _expire(self, rec: SessionRecord) -> None:
        """End a session its idle TTL has claimed (`SessionTable.claim_expired`): with a store, evicted
        (its state handed to the store writer, then its record and slot freed here); without one,
        deleted."""
        if self.persist is not None:  # evicted: its slot is freed, its state stays in the store
            if self._kept(rec):
                return
            self._evict(rec, "idle_ttl", f"idle > {self.settings.session_ttl_s:g} s")
        else:
            log.info("session %s expired (idle > %g s)", rec.id, self.settings.session_ttl_s)
            self.delete_now(rec)

    def evict_for_room(self, n: int) -> int:
        """(engine thread, `call`) With a session store, evict the n idle sessions unused the longest to
        it, as their idle TTL would (`_expire`), so that a request needing n slots gets them instead of a
        429: their states are in the store, and a later request on one restores it. Without a store,
        nothing (a session's only copy is here). Returns how many were evicted."""
        if self.persist is None or n <= 0:
            return 0
        recs = [rec for rec in self.sessions.claim_least_recent(self.model_id, n) if not self._kept(rec)]
        for rec in recs:
            self._evict(rec, "slots_full", "used least recently, for a request's slot")
        self._set_slot_gauges()
        return len(recs)

    def _kept(self, rec: SessionRecord) -> bool:
        """A claimed session that may not be evicted (`StoreWriter.may_evict`: the store fails, and its copy
        here is not known to be stored) is kept: its write handed to the writer again (it lands once the
        store answers, and a later eviction finds the copy stored), its claim released (its idle TTL counts
        again from now). True when kept."""
        if self.may_evict is None or self.may_evict(rec.id):
            return False
        self._persist(rec)
        self.sessions.unclaim(rec)
        _kept_log.log(logging.WARNING, "session %s kept in memory, not evicted: the session store is failing "
                      "and its latest state is not known to be stored", rec.id)  # fmt: skip
        return True

    def _evict(self, rec: SessionRecord, reason: str, why: str) -> None:
        """Evict a claimed session to the store: its state handed to the writer, its record and slot freed
        here, counted by `reason` (EVICTION_REASONS) and logged with `why`."""
        log.info("session %s evicted to the store (%s)", rec.id, why)
        self._persist_unless_stored(rec)
        self._release(rec)
        self.metrics.evictions[reason].inc()

    def _persist(self, rec: SessionRecord, only_if_missing: bool = False) -> int:
        """Hand a session's state to the store (when one is configured); 1 if it was. A session whose
        creation never reached the engine (refused at shutdown: its client got the error) is not.
        `only_if_missing`: the store writer writes it only where the store holds no version of it."""
        if self.persist is None or rec.ephemeral or not rec.has_state:
            return 0
        raw, seen = self.read_slot(rec)
        if only_if_missing:
            self.persist(rec, raw, seen, only_if_missing=True)
        else:
            self.persist(rec, raw, seen)
        self._unwritten.discard(rec.id)
        return 1

    def _persist_unless_stored(self, rec: SessionRecord) -> int:
        """`_persist` a copy this replica lets go of (eviction, shutdown); one the store holds already
        (`let_go`) only if the store has lost it: 1 written, 2 handed over to be written only if missing,
        0 nothing to write. A copy changed since its last
        write-through is written: an eviction can claim a session whose turn its route has just settled
        (idle from then), before this thread has written that turn through (`_settled`)."""
        unchanged = not rec.ephemeral and rec.has_state and rec.id not in self._unwritten
        if unchanged and self.let_go is not None and self.let_go(rec.id):
            return 2 * self._persist(rec, only_if_missing=True)
        return self._persist(rec)

    def _release(self, rec: SessionRecord) -> None:
        """Forget a session here (record and slot); the store is left alone. A record the table no longer
        holds has freed its slot already (deleted, evicted or dropped since the caller read it: a second
        delete of the same session), and the slot, maybe another session's now, is not freed again."""
        if not self.sessions.holds(rec):
            return
        self._unwritten.discard(rec.id)
        self.sessions.remove(rec.id)
        self.pool.release(rec.slot)
        self.metrics.active_sessions.set(self.pool.in_use)
        self.metrics.state_bytes.set(self.pool.in_use * self.pool.bytes_per_slot)

    # --- control operations (run on the engine thread through `call`) --------------------------

    def delete_now(self, rec: SessionRecord) -> concurrent.futures.Future | None:
        """Delete a session (its store delete queued: `forget`); None. A running request on it is
        cancelled first and the session goes when that request ends: a future is returned then, resolved
        once it has gone, which the DELETE's answer waits for (`service.delete`)."""
        job = self._running.get(rec.id)
        if job is not None:
            job.delete_after = True
            if job.stream is not None:
                job.stream.cancelled = True
            if job.deleted is None:
                job.deleted = concurrent.futures.Future()
            return job.deleted
        self._release(rec)
        if self.forget is not None and not rec.ephemeral:
            self.forget(rec.id)
        return None

    def _delete_after(self, job: Job) -> None:
        """The request that a delete waited for is over: delete its session, and answer the DELETE."""
        self.delete_now(job.session)
        if job.deleted is not None:
            _answer(job.deleted)

    def fork(self, src: SessionRecord, dst: SessionRecord) -> SessionRecord:
        if not self.sessions.holds(src):  # deleted after the fork claimed it
            raise _gone(src)
        self.pool.copy(src.slot, dst.slot)
        dst.n_tokens, dst.pending, dst.has_state = src.n_tokens, src.pending, True
        dst.utf8_tail = src.utf8_tail
        self.sessions.add(dst)
        self._persist(dst)
        return dst

    def drop_copy(self, rec: SessionRecord) -> None:
        """Forget a claimed session here (the store holds a newer state of it): record and slot."""
        self._release(rec)

    def check_raw(self, state: bytes) -> torch.Tensor:
        """One slot's raw float32 state as a tensor, if the model can reach it (else StateRangeError).
        Touches no slot: any thread (a stored session's info is checked off the engine thread)."""
        x = torch.frombuffer(bytearray(state), dtype=torch.float32).reshape(self.pool.row(0).shape)
        self.rec.check_state(x.unsqueeze(self.pool.dim))
        return x

    def export(self, rec: SessionRecord) -> tuple[bytes, list[int]]:
        """A claimed session's `read_slot`; 404 if it was deleted after its claim (its slot is free)."""
        if not self.sessions.holds(rec):
            raise _gone(rec)
        return self.read_slot(rec)

    def read_slot(self, rec: SessionRecord) -> tuple[bytes, list[int]]:
        """The slot's state as raw little-endian float32 bytes, and its seen token ids."""
        state = self.pool.row(rec.slot).contiguous().cpu()
        seen = self.pool.seen[rec.slot].nonzero()[:, 0].tolist()
        return state.numpy().astype("<f4", copy=False).tobytes(), seen

    def write_slot(self, rec: SessionRecord, state: bytes, seen: list[int]) -> SessionRecord:
        """Install an imported or restored state: the one way a state from outside enters a slot, so
        it is validated here (finite, within what the model can reach: RecurrentModel.check_state)."""
        x = self.check_raw(state)  # StateRangeError before the slot is touched
        self.pool.clear(rec.slot)
        self.pool.row(rec.slot).copy_(x)
        if seen:
            self.pool.seen[rec.slot, torch.tensor(seen, device=self.pool.seen.device)] = True
        rec.has_state = True
        self.sessions.add(rec)
        self._persist(rec)
        return rec


def _answer(fut: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Resolve an ingestion job's or control call's future, unless it is done already or its waiter gave
    it up (cancelled: `service.engine_answer` never does; resolving a cancelled future raises, which on
    this thread stopped the engine)."""
    if fut.done():
        return
    try:
        if error is None:
            fut.set_result(result)
        else:
            fut.set_exception(error)
    except concurrent.futures.InvalidStateError:  # cancelled meanwhile
        pass


def _gone(rec: SessionRecord) -> APIError:
    """What a request on a session deleted after its claim gets (a DELETE does not wait for the claim)."""
    return not_found(f"no session {rec.id!r}", param="session_id")


def _deliver(items: list[tuple[Stream, list]]) -> None:
    for stream, block in items:
        stream.queue.put_nowait(block)
