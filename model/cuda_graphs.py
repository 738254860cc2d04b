"""The decode step replayed as CUDA graphs, one per batch-size bucket.

A decode step of our models is a few dozen small kernels (embedding, per layer a LayerNorm, the SSM step's
elementwise ops, the output linear and GLU; the head). At small batches each kernel runs for a few µs and
the step is bound by launching them from Python. A CUDA graph records the step's kernels once and
replays them with one launch (PyTorch: `torch.cuda.CUDAGraph`, "CUDA Graphs" in the CUDA semantics notes).

A graph replays fixed shapes at fixed addresses, so each bucket b (1, 2, 4, …, 1024) owns static buffers:
tokens (b,), state (n_layers, b, H, 2, M) in the model's `state_dtype` (float32, or float16:
`use_state_dtype`; a SaShiMi's (b, numel)) and the logits (b, V) float32 the graph writes; a state of
another dtype steps eagerly. A batch of n rows runs in the smallest bucket b ≥ n: its tokens and states are
copied into rows 0..n−1, rows n..b−1 are zeroed (token 0, state 0), the graph is replayed, and rows 0..n−1
of the state and logits are copied out. Padded rows cannot change real rows: every op of the step is
row-wise (the embedding, LayerNorm, the linear layers, the SSM step, the head), so row i's result depends on
row i's inputs alone (`tests/test_cuda_graphs.py` checks it on CPU, `tests/test_cuda.py` on the captured
graph). A batch above the largest bucket runs the plain (eager) step.

**A resident batch.** The copies in and out move the whole state twice a step: at 1,024 rows of the audio
model 4 × 134 MB, as much traffic as the Triton step itself. `resident(state)` moves a batch's state into
its bucket's buffer once and returns the view rows 0..n−1 of it; a step given that view (with `out` the
same view, as the engine steps) replays the graph on it in place, with no copies (with another `out`, or
none, it runs the eager step: the view must then stay as it was). One batch is resident at
a time (the engine's decode batch); while it is, another caller's batch of that bucket runs the eager step
on its own tensors (the replay would overwrite the resident rows). `resident` of another size (the batch
grew or was compacted) moves it to that size's bucket.

The same class runs without CUDA (`capture=False`): the buckets, padding and static buffers, with the
eager step in place of the replay. The CPU tests check that path bit for bit against the plain step.

**Decode blocks: K steps with their sampling in one graph** (`decode_block`, the CUDA side of the native
decode block of `RecurrentModel.decode_block`). A step alone leaves the sampling, a host copy of the tokens
and the engine's per-row Python to every step: at 1,024 audio streams on an H200 the engine made 302
steps/s against the bare step's 771 (2026-12-04). A block graph records K steps (K = 1, 2, 4, …, 64) of
the bucket: the model's step on the bucket's buffers, `model.sampling.sample_with` (the torch sampler's ops,
as the engine's `RowSampler` runs them) on the uniforms of the rows' counter-based streams, the seen sets
and counts, the token fed back; a block of k steps replays the graphs of k's binary digits back to back
and copies the k × n tokens to the host once. The uniforms are drawn on the host beforehand (the C
Philox, about 11 ns a draw here: 3 ms for 256 steps of 1,024 rows) and sent over in one copy: the streams
are pure functions of (key, index), so a row's tokens are those of `step` + `sample` with its generator,
whatever else is in the batch (its logits those of the bucket's batch size: on a GPU another size's matmuls
may round differently, within float32's 1e-5, which can change a near-tie's token). Each row makes its own
limit's tokens, as in the C block: the block runs as
long as its longest row, in segments that end where a row reaches its limit; that row's tensors are kept
there and put back at the end. A row's stop sequences are checked on the host after the block; one that
met a stop early is stepped again from the block's start to it (the same tokens). The sampler's optional
steps (a logit bias, penalties, top-k/top-p, min-p) are chosen on the host, so each combination any row
needs has its own graphs: those of plain sampling (temperature, greedy) are captured by `warm` with the
step's, every size for every bucket, the others at their first block (thread-local capture: another
engine's thread may allocate meanwhile). A bucket's block graphs share one memory pool (they never run at
once, and their results are copied into static tensors).

Sampling per single step (`__call__`) stays outside the graph (`model.sampling.RowSampler`).

**SaShiMi** (`SaShiMiRecurrent`, whose state is (B, numel): the batch at dim `rec.batch_dim` = 0, where
an isotropic model's is at dim 1) captures its dense step (`SaShiMiRecurrent._step_level`): its eager
step picks on the host the rows that reach each coarser level (a sync a level, shapes that change every
step), which a graph cannot record, so the graphs compute every level for every row and keep the state
updates only of the rows that step there (`torch.where` on the pool buffers and the torch step's SSM
states; the Triton kernel takes the rows as a mask and neither reads nor writes the others' states, so
the coarse levels' state traffic stays the sparse step's). That costs the coarse levels' FLOPs at every
step (about 7× the sparse step's for the shipped audio-digits) and no host sync; a stepping row's ops
are the sparse step's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

import torch

from model import fused
from model.sampling import (
    MAX_LOGPROBS,
    RowTensors,
    counter_uniforms,
    first_stop_end,
    sample_with,
    settings_tensors,
)

log = logging.getLogger("model.cuda_graphs")

LARGEST_BUCKET = 1024
STATE16_ROWS, STATE16_STEPS = 4, 256  # `check_state_dtype`'s probe
# One capture at a time in the process: torch's captures share one capture stream, and a capture's start
# (empty_cache) asserts that none is under way (two models' engine threads could otherwise collide)
CAPTURE_LOCK = threading.Lock()
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS handles, the allocator's pools)
BLOCK_STEPS = (1, 2, 4, 8, 16, 32, 64)  # the decode-block graphs' step counts (a longer block: several)
PLAIN = (False,) * 6  # a block graph's flags for plain sampling (temperature, greedy), no log-probabilities
LOGPROBS_K = MAX_LOGPROBS  # the most likely tokens a block graph reports (at most V)
# the sampler settings of a bucket's rows past a block's batch (`RowTensors` fields: value, dtype): greedy,
# no filter or penalty (their tokens are ignored)
PAD_ROW = {
    "temperature": (1.0, torch.float64), "greedy": (True, torch.bool), "top_k": (0, torch.long),
    "top_p": (1.0, torch.float32), "min_p": (0.0, torch.float32), "penalty": (1.0, torch.float32),
    "presence": (0.0, torch.float32), "frequency": (0.0, torch.float32),
}  # fmt: skip


def bucket_sizes(max_batch: int, largest: int = LARGEST_BUCKET) -> tuple[int, ...]:
    """Powers of two 1, 2, 4, … up to the first one ≥ `max_batch`, and at most `largest` (a power of two).
    Raises ValueError for max_batch < 1 or a `largest` that is not a power of two ≥ 1."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
    if isinstance(largest, bool) or not isinstance(largest, int) or largest < 1 or largest & (largest - 1):
        raise ValueError(f"largest must be a power of two ≥ 1, got {largest!r}")
    out, b = [], 1
    while b <= largest:
        out.append(b)
        if b >= max_batch:
            break
        b *= 2
    return tuple(out)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket ≥ n rows, or None when n exceeds the largest (the eager step runs it).
    `buckets` ascending. Raises ValueError for n < 1."""
    if n < 1:
        raise ValueError(f"a batch has at least 1 row, got {n}")
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class StepBuffers:
    """One bucket's static tensors (on the model's device) and, on CUDA, its captured graph."""

    tok: torch.Tensor  # (b,) int64
    state: torch.Tensor  # (n_layers, b, H, 2, M) float32 (SaShiMi: (b, numel)), stepped in place
    logits: torch.Tensor | None = None  # (b, V) float32, written by the step (the graph's own output)
    graph: torch.cuda.CUDAGraph | None = None
    capture_s: float = 0.0  # wall time of the warm-up runs and the capture
    calls: int = field(default=0)


@dataclass
class BlockBuffers:
    """One bucket's static tensors for the decode blocks (on the model's device), and their graphs keyed
    by (steps, the sampler's optional steps). Rows past a block's batch sample greedily (their settings'
    defaults) and are ignored."""

    rows: RowTensors  # (b,) settings; bias (b, V) zeros unless a row has a logit_bias
    u: torch.Tensor  # (max steps, b) float32: step i's uniforms
    out: torch.Tensor  # (max steps, b) int64: step i's tokens, written by the graph
    seen: torch.Tensor  # (b, V) bool
    counts: torch.Tensor  # (b, V) float32
    ones: torch.Tensor  # (b,) float32: what a sampled token adds to its count
    marks: torch.Tensor  # (b,) bool, all True: what a sampled token sets in `seen`
    source: object = None  # the RowSettings last copied into `rows` ...
    flags: tuple = ()  # ... and their `block_flags`
    graphs: dict = field(default_factory=dict)
    capture_s: float = 0.0  # wall time of its graphs' warm-up runs and captures, all together
    calls: int = 0
    pool: object = None  # the memory pool its graphs share (none replays while another runs, and each
    # writes its results into the static tensors above: its temporaries are dead after its replay)
    lp: tuple | None = None  # log-probabilities, made at their first block: step i's chosen (max steps, b)
    # float32, top ids (max steps, b, LOGPROBS_K) int64, top values (max steps, b, LOGPROBS_K) float32


def block_flags(rows: RowTensors) -> tuple[bool, ...]:
    """The sampler's optional steps some row needs: (a logit bias, repetition penalty, presence/frequency
    counts, top-k/top-p, min-p); each combination is its own graph."""
    return rows.bias is not None, rows.any_penalty, rows.any_counted, rows.any_filter, rows.any_min_p


def block_pieces(k: int) -> list[int]:
    """k ≥ 1 steps as a sum of BLOCK_STEPS sizes, largest first (the graphs replayed back to back)."""
    out = []
    while k:
        piece = max(p for p in BLOCK_STEPS if p <= k)
        out.append(piece)
        k -= piece
    return out


class BucketedStep:
    """`RecurrentModel.step` (or `SaShiMiRecurrent.step`) through per-bucket static buffers, replayed as
    CUDA graphs when `capture`.

    `__call__(tokens (n,), state (n_layers, n, H, 2, M) in `state_dtype` (a SaShiMi's (n, numel): rows at dim
    `rec.batch_dim`), out=None)` → (logits (n, V) float32, a new tensor; the next state, in `out` when
    given, else a new tensor), like `RecurrentModel.step`.
    Buffers (and graphs) are made on a bucket's first use, or all at once by `warm`. Not thread-safe:
    one caller (the engine thread) at a time. Raises ValueError when `capture` is asked on a model
    that is not on a CUDA device."""

    def __init__(self, rec, buckets: tuple[int, ...], capture: bool):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct sizes ≥ 1, got {buckets!r}")
        if capture and rec.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {rec.device}")
        self.rec, self.buckets, self.capture = rec, tuple(buckets), capture
        self.state_dtype = rec.state_dtype  # the buffers' (`GraphedModel.use_state_dtype`)
        self.bd = rec.batch_dim  # the batch's dim in a state: 1 (RecurrentModel), 0 (SaShiMiRecurrent)
        self.buffers: dict[int, StepBuffers] = {}
        self.eager_calls = 0  # batches above the largest bucket, or another batch of the resident bucket
        self.resident_bucket: int | None = None  # the bucket whose buffer holds the resident batch
        self.resident_rows = 0  # its rows (0 … resident_rows − 1 of that buffer)
        self.copied_calls = 0  # steps whose state was copied in and out (not resident)
        self.blocks: dict[int, BlockBuffers] = {}  # the decode blocks' buffers and graphs, by bucket
        self.eager_blocks = 0  # decode blocks run without graphs (another batch was resident in the bucket)
        self.warmed_blocks = False  # `warm` captured the plain-sampling block graphs
        self.block_capture_error: str | None = None  # a block graph's capture failed: blocks run their ops
        # without graphs from then on (logged once)
        self.reruns = 0  # decode blocks whose stop rows were stepped again to their stop
        self.rerun_mismatches = 0  # ... whose second run made other tokens (logged; none expected)

    def _eager(self, buf: StepBuffers) -> torch.Tensor:
        # buf.tok holds ids `step` checked (or the padding's zeros); no check here: under capture the
        # check's host sync is refused (cudaErrorStreamCaptureUnsupported, seen on an H200)
        logits, _ = self.rec._step_eager(buf.tok, buf.state, out=buf.state, ids_checked=True)
        return logits

    @torch.inference_mode()
    def bucket(self, b: int) -> StepBuffers:
        """Bucket b's buffers, made (and its graph captured) on first use."""
        buf = self.buffers.get(b)
        if buf is not None:
            return buf
        if b not in self.buckets:
            raise ValueError(f"{b} is not one of the buckets {self.buckets}")
        dev = self.rec.device
        with torch.inference_mode(False):  # normal tensors: the engine's rows (resident views of them) are
            # updated in place outside inference mode too (a joiner filling a hole)
            buf = StepBuffers(torch.zeros(b, dtype=torch.long, device=dev),
                              self.rec.init_state(b).to(self.state_dtype).clone())  # fmt: skip
        t0 = time.perf_counter()
        if self.capture:  # as in PyTorch's CUDA-graphs notes: warm up on a side stream, then capture
            with CAPTURE_LOCK, torch.cuda.device(dev):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        self._eager(buf)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                before = torch.cuda.current_stream(dev)
                # its own memory pool; the logits live there. thread_local, as a block's capture: another
                # model's engine thread may allocate meanwhile (a bucket captured at its first use)
                try:
                    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                        buf.logits = self._eager(buf)
                except RuntimeError:  # (torch's CUDA errors and out of memory are RuntimeErrors)
                    # torch's graph context leaves its capture stream current when the capture's end
                    # raises (an op that invalidated it): this thread's work would go on on that stream,
                    # unordered with the others (the server serves the plain step after a failed capture)
                    torch.cuda.set_stream(before)
                    raise
                buf.graph = graph
                torch.cuda.synchronize()
                buf.state.zero_()
        buf.capture_s = time.perf_counter() - t0
        self.buffers[b] = buf
        return buf

    @torch.inference_mode()
    def warm(self, blocks: bool = True) -> float:
        """Make every bucket's buffers (capture every graph) now, with `blocks` also each bucket's
        decode-block graphs of every size for plain sampling (temperature or greedy: what audio streams
        use; other sampler settings are captured at their first block); returns the seconds it took."""
        t0 = time.perf_counter()
        self.warmed_blocks = blocks
        for b in self.buckets:
            buf = self.bucket(b)
            if blocks and self.capture:
                bb = self._block_buffers(b)
                for k in BLOCK_STEPS:
                    self._block_graph(buf, bb, k, PLAIN)
        return time.perf_counter() - t0

    def _rows(self, t: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Rows start … start + n − 1 of a state (a view along the batch dim)."""
        return t.narrow(self.bd, start, n)

    def _load(self, buf: StepBuffers, state: torch.Tensor, n: int) -> None:
        """Copy the batch `state` (n rows) into rows 0..n−1 of buf.state and zero the rows past them (padding:
        a zero state fed token 0, finite, and row-wise isolated anyway). Other rows of that same buffer go
        through a clone: they may overlap rows 0..n−1."""
        same_buffer = state.untyped_storage().data_ptr() == buf.state.untyped_storage().data_ptr()
        self._rows(buf.state, 0, n).copy_(state.clone() if same_buffer else state)
        self._rows(buf.state, n, buf.tok.shape[0] - n).zero_()

    def _is_rows_of(self, t: torch.Tensor | None, buf: StepBuffers, n: int) -> bool:
        """Whether t is rows 0..n−1 of buf.state (the view `resident` returns)."""
        return (
            t is not None and t.data_ptr() == buf.state.data_ptr() and t.shape[self.bd] == n
            and t.stride() == buf.state.stride() and t.shape == self._rows(buf.state, 0, n).shape
        )  # fmt: skip

    @torch.inference_mode()
    def resident(self, state: torch.Tensor) -> torch.Tensor:
        """The batch `state` (n_layers, n, H, 2, M) in `state_dtype` (SaShiMi: (n, numel)), 1 ≤ n ≤ the
        largest bucket, as rows 0..n−1 of its bucket's buffer (copied there unless it is that view already;
        the rows past n zeroed): step it with `out` the returned view and the graph replays on it in place.
        Makes it the one resident batch. A batch above the largest bucket is returned as it is. Raises
        ValueError for n < 1."""
        n = state.shape[self.bd]
        b = bucket_for(n, self.buckets)
        if b is None:
            self.resident_bucket = None
            return state
        buf = self.bucket(b)
        if self._is_rows_of(state, buf, n):  # rows 0 … n − 1 of the buffer already (resident, or shrunk)
            if self.resident_bucket != b or self.resident_rows != n:
                self._rows(buf.state, n, b - n).zero_()
            self.resident_bucket, self.resident_rows = b, n
            return state
        self._load(buf, state, n)
        self.resident_bucket, self.resident_rows = b, n
        return self._rows(buf.state, 0, n)

    def release(self) -> None:
        """End the resident batch's residency (if any): its bucket copies batches in and out again, and the
        view `resident` returned must no longer be stepped (its rows are the buffer's, which the next
        replay overwrites)."""
        self.resident_bucket, self.resident_rows = None, 0

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None):
        n = tokens.shape[0]
        b = bucket_for(n, self.buckets) if n else None
        if b is None or state.dtype != self.state_dtype:  # empty, above the largest bucket, or a state of
            # another dtype than the buffers' (copied in and out, it would be rounded otherwise)
            self.eager_calls += 1
            return self.rec._step_eager(tokens, state, out, ids_checked=b is not None)
        buf = self.bucket(b)
        # stepped in place in the buffer: the resident batch, asked to be updated in place (out=state; with
        # another out the state passed in must stay as it was)
        in_place = (
            b == self.resident_bucket
            and n == self.resident_rows
            and out is state
            and self._is_rows_of(state, buf, n)
        )
        if b == self.resident_bucket and not in_place:  # the replay would overwrite the resident rows
            self.eager_calls += 1
            return self.rec._step_eager(tokens, state, out, ids_checked=True)
        buf.calls += 1
        buf.tok[:n].copy_(tokens)
        if b > n:
            buf.tok[n:].zero_()
        if not in_place:
            self.copied_calls += 1
            self._load(buf, state, n)
        if buf.graph is not None:
            buf.graph.replay()
        else:
            buf.logits = self._eager(buf)
        if in_place:
            return buf.logits[:n].clone(), state
        new = torch.empty_like(state) if out is None else out
        new.copy_(self._rows(buf.state, 0, n))
        return buf.logits[:n].clone(), new

    # --- decode blocks: K steps with their sampling in one graph -----------------------------------

    def _block_buffers(self, b: int) -> BlockBuffers:
        """Bucket b's decode-block buffers, made on first use."""
        if b not in self.blocks:
            self.blocks[b] = self._new_block_buffers(b)
        return self.blocks[b]

    @torch.inference_mode(False)
    def _new_block_buffers(self, b: int) -> BlockBuffers:
        dev, V = self.rec.device, self.rec.config.vocab_size
        f32 = torch.float32
        pad = {name: torch.full((b,), v, dtype=dtype, device=dev) for name, (v, dtype) in PAD_ROW.items()}
        rows = RowTensors(
            **pad,
            bias=torch.zeros(b, V, dtype=f32, device=dev),
            any_penalty=False, any_counted=False, any_filter=False, any_min_p=False,
        )  # fmt: skip
        steps = max(BLOCK_STEPS)
        return BlockBuffers(
            rows=rows,
            u=torch.zeros(steps, b, dtype=f32, device=dev),
            out=torch.zeros(steps, b, dtype=torch.long, device=dev),
            seen=torch.zeros(b, V, dtype=torch.bool, device=dev),
            counts=torch.zeros(b, V, dtype=f32, device=dev),
            ones=torch.ones(b, dtype=f32, device=dev),
            marks=torch.ones(b, dtype=torch.bool, device=dev),
        )

    @staticmethod
    def _set_rows(bb: BlockBuffers, settings: fused.RowSettings, B: int) -> tuple[bool, ...]:
        """Copy the B rows' settings into bb.rows (the rows past them sample greedily), unless they are
        there already (the same RowSettings: the engine keeps one while its rows last); their flags."""
        if settings is not bb.source:
            new = settings_tensors(settings, bb.marks.device)
            for name, (value, _) in PAD_ROW.items():
                mine = getattr(bb.rows, name)
                mine[:B].copy_(getattr(new, name))
                mine[B:].fill_(value)
            bb.rows.bias.zero_()
            if new.bias is not None:
                bb.rows.bias[:B].copy_(new.bias)
            bb.source, bb.flags = settings, block_flags(new)
        return bb.flags

    def _block_body(self, buf: StepBuffers, bb: BlockBuffers, k: int, flags: tuple[bool, ...]) -> None:
        """k steps of the bucket on its buffers, each sampled (`sample_with` on bb.u[i]) and fed back: the
        ops a block graph records (run as they are without capture). `flags`: the sampler's optional
        steps (`block_flags`) and whether to write the log-probabilities into bb.lp (`token_logprobs`'s
        ops). No host sync."""
        has_bias, penalty, counted, filtered, min_p, logprobs = flags
        rows = replace(bb.rows, bias=bb.rows.bias if has_bias else None, any_penalty=penalty,
                       any_counted=counted, any_filter=filtered, any_min_p=min_p)  # fmt: skip
        for i in range(k):
            logits = self._eager(buf)
            if logprobs:  # of the raw logits, before the sampler's steps (model.sampling.token_logprobs)
                lp = logits.float().log_softmax(-1)
                top_v, top_i = lp.topk(bb.lp[1].shape[2], dim=-1)
                bb.lp[1][i].copy_(top_i)
                bb.lp[2][i].copy_(top_v)
            new = sample_with(logits.float(), rows, bb.u[i], bb.seen if penalty else None,
                              bb.counts if counted else None)  # fmt: skip
            if logprobs:
                bb.lp[0][i].copy_(lp.gather(1, new[:, None])[:, 0])
            at = new[:, None]  # (plain scatters: one element a row, no host sync under capture)
            bb.seen.scatter_(1, at, bb.marks[:, None])
            if counted:
                bb.counts.scatter_add_(1, at, bb.ones[:, None])
            bb.out[i].copy_(new)
            buf.tok.copy_(new)

    def _block_graph(self, buf: StepBuffers, bb: BlockBuffers, k: int, flags: tuple[bool, ...]):
        """The graph of k steps with these sampler flags, captured on first use (one warm-up step first on
        a side stream, the buffers it changes put back), or None once a capture has failed (then logged
        once, with why: `block_capture_error`; the caller runs the block's ops without a graph, and the
        buffers are as they were)."""
        graph = bb.graphs.get((k, flags))
        if graph is not None or self.block_capture_error is not None:
            return graph
        t0 = time.perf_counter()
        dev = buf.state.device
        mine = (buf.tok, buf.state, bb.seen, bb.counts, bb.out)
        with CAPTURE_LOCK, torch.cuda.device(dev):
            kept = [t.clone() for t in mine]
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._block_body(buf, bb, 1, flags)
                torch.cuda.current_stream().wait_stream(side)
                for t, old in zip(mine, kept):
                    t.copy_(old)
                graph = torch.cuda.CUDAGraph()
                # thread_local: another model's engine thread may allocate meanwhile (a capture after load)
                with torch.cuda.graph(graph, pool=bb.pool, capture_error_mode="thread_local"):
                    self._block_body(buf, bb, k, flags)
                torch.cuda.synchronize()
            except RuntimeError as exc:  # (torch's CUDA errors and out of memory are RuntimeErrors)
                # a capture that raised may leave its stream current: back to the device's default one
                torch.cuda.set_stream(torch.cuda.default_stream(dev))
                for t, old in zip(mine, kept):
                    t.copy_(old)
                torch.cuda.synchronize()
                self.block_capture_error = f"{type(exc).__name__}: {exc}"
                bb.capture_s += time.perf_counter() - t0
                log.warning(
                    "the decode-block graph of %d steps (sampler steps %s) was not captured: %s; "
                    "decode blocks run their ops without graphs",
                    k,
                    flags,
                    self.block_capture_error,
                )
                return None
            if bb.pool is None:
                bb.pool = graph.pool()
        bb.graphs[(k, flags)] = graph
        bb.capture_s += time.perf_counter() - t0
        return graph

    @torch.inference_mode()
    def decode_block(self, K: int, state: torch.Tensor, tok: torch.Tensor, *, settings: fused.RowSettings,
                     counts: torch.Tensor | None, key: torch.Tensor, counter: torch.Tensor,
                     limit: torch.Tensor, stops: list[list[bytes]], history: list[bytes], seen: torch.Tensor,
                     interrupt=None, schedule=None, logprobs=None) -> fused.BlockResult:  # fmt: skip
        """`RecurrentModel.decode_block` through the bucket's block graphs: the same arguments and result as
        the native block (`fused.decode_block`): each row makes min(K, limit[row]) tokens, or stops at a
        stop sequence (over the tokens' low bytes, after `history`), and ends as it would have after them
        (state, pending token, seen set, counts; rows with limit 0 as they began). The block runs as long
        as its longest row, in segments that end where a row reaches its limit (that row's tensors are
        kept there and put back at the end, while it steps on with the others). Stop sequences are checked
        on the host after the block (`model.sampling.first_stop_end`): a row that met one before its last
        token is put back as it began the block and stepped again to the stop, with the others kept (the
        same bucket, graphs and uniforms: the same tokens), one more run of the graphs in a block where
        a stop ends a row early. Differences: `interrupt` and `schedule` are not used (the graphs run to
        the block's end); `times` are spread evenly over the block's steps (they run on the device,
        unobserved) and `setup_s` is the time spent capturing graphs. `logprobs` (B,) int64 on the host, −1
        or k ≥ 0 per row, checked as the native block's (`fused.logprob_request`): `BlockResult.logprobs`,
        at most LOGPROBS_K = 20 a row, by the same torch ops as `model.sampling.token_logprobs`, in graphs
        of their own.

        state (n_layers, B, H, 2, M) in `state_dtype` (SaShiMi: (B, numel); the batch made resident by
        `resident`: stepped in place; another tensor: copied in and out), tok (B,) int64 and seen (B, V) bool
        on the model's device, counts (B, V) float32 on any device, key, counter and limit (B,) int64 on the
        host; updated in place as the native block updates them (counter advanced by each row's tokens). B ≤
        the largest bucket. Raises ValueError on bad shapes or a pending token of a stepping row outside the
        vocabulary (naming it; nothing is changed)."""
        from model.network import check_token_ids  # noqa: PLC0415

        V, B = self.rec.config.vocab_size, tok.shape[0]
        b = bucket_for(B, self.buckets) if B else None
        if b is None:
            raise ValueError(f"decode block: {B} rows, the graphs' buckets hold 1 … {self.buckets[-1]}")
        fused.check_block_args(K, limit)
        buf = self.bucket(b)
        dev = buf.state.device  # (the tensors' own: cuda:0 where the model says cuda)
        want = list(self.rec.state_shape)
        want.insert(self.bd, B)
        want = tuple(want)
        if tuple(state.shape) != want or state.dtype != self.state_dtype or state.device != dev:
            name = str(self.state_dtype).removeprefix("torch.")
            raise ValueError(f"decode block: state must be {want} {name} on {dev}, got {tuple(state.shape)} "
                             f"{state.dtype} on {state.device}")  # fmt: skip
        if tok.shape != (B,) or tok.dtype != torch.long or tok.device != dev:
            raise ValueError(f"decode block: tok must be ({B},) int64 on {dev}")
        if seen.shape != (B, V) or seen.dtype != torch.bool or seen.device != dev:
            raise ValueError(f"decode block: seen must be ({B}, {V}) bool on {dev}")
        for t in (key, counter, limit):
            if t.shape != (B,) or t.dtype != torch.long or t.device.type != "cpu":
                raise ValueError(f"decode block: key, counter and limit must be ({B},) int64 on the CPU")
        settings.check(B, V)
        if settings.counted and (counts is None or counts.shape != (B, V) or counts.dtype != torch.float32):
            raise ValueError(f"decode block: counts must be ({B}, {V}) float32")
        if len(stops) != B or len(history) != B:
            raise ValueError(f"decode block: stops and history need one entry per row ({B})")
        if bool((limit < 0).any()):
            raise ValueError("decode block: limits must be ≥ 0")
        lp_k = fused.logprob_request(logprobs, B)
        if lp_k is not None and int(lp_k.max()) > LOGPROBS_K:
            raise ValueError(f"decode block: the graphs report at most {LOGPROBS_K} log-probabilities a row")
        n_out = limit.clamp(max=K)
        steps = int(n_out.max())
        if not steps:
            none = torch.zeros(B, dtype=torch.long)
            return fused.BlockResult(
                0, none.new_zeros(0, B), none, none.bool(), torch.zeros(0, dtype=torch.float64)
            )
        check_token_ids(torch.where(n_out.to(dev) > 0, tok, 0), V)

        in_place = b == self.resident_bucket and B == self.resident_rows and self._is_rows_of(state, buf, B)
        if not in_place and b == self.resident_bucket:  # another batch lives in this bucket: on buffers of
            # its own, without graphs
            self.eager_blocks += 1
            buf = StepBuffers(torch.zeros_like(buf.tok), torch.zeros_like(buf.state))
            bb, graphs = self._new_block_buffers(b), False
        else:
            bb, graphs = self._block_buffers(b), self.capture
        flags = (*self._set_rows(bb, settings, B), lp_k is not None)
        if lp_k is not None and bb.lp is None:
            self._lp_buffers(bb)
        t0 = time.perf_counter()
        if not in_place:
            self.copied_calls += 1
            self._load(buf, state, B)
        buf.tok[:B].copy_(tok)
        buf.tok[B:].zero_()
        bb.seen[:B].copy_(seen)
        if settings.counted:
            bb.counts[:B].copy_(counts)
        # every row's uniforms for the block: stream key[r] at indices counter[r] … counter[r] + steps − 1
        index = counter[None, :] + torch.arange(steps)[:, None]  # int64 wraps as uint64 does
        u = counter_uniforms(key.expand(steps, B), index)
        if dev.type == "cuda":
            u = u.pin_memory().to(dev, non_blocking=True)
        # rows with stop sequences: their tensors as the block began (a row that meets a stop before its
        # last token is stepped again from there to the stop)
        stop_rows = [r for r, row_stops in enumerate(stops) if row_stops and n_out[r]]
        if stop_rows:
            began = self._take(self._row_tensors(buf, bb), torch.tensor(stop_rows, device=dev))
        out, lp, setup = self._run(buf, bb, graphs, flags, n_out, u, B)

        def finish():  # the rows' tensors out of the bucket (queued on the device)
            tok.copy_(buf.tok[:B])
            seen.copy_(bb.seen[:B])
            if settings.counted:
                counts.copy_(bb.counts[:B])
            if not in_place:
                state.copy_(self._rows(buf.state, 0, B))

        if not stop_rows:
            finish()
        tokens = out.cpu()  # the wait for the device (without stop rows the only one)
        stopped = torch.zeros(B, dtype=torch.bool)
        again = torch.zeros(B, dtype=torch.long)  # rows to step again, to their stop
        for r in stop_rows:
            made = bytes(int(t) & 0xFF for t in tokens[: n_out[r], r])
            end = first_stop_end(history[r], made, stops[r])
            if end is not None:
                stopped[r] = True
                if end < n_out[r]:
                    again[r] = end
        if bool(again.any()):  # back to where those rows began, and stepped again to their stop: the same
            # bucket, graphs and uniforms (every op is row-wise), so the same tokens; the others kept
            self.reruns += 1
            rows = again.nonzero().flatten()
            pos = torch.tensor([stop_rows.index(r) for r in rows.tolist()], device=dev)
            self._put(buf, bb, rows.to(dev), self._take(began, pos))
            redo, redo_lp, more = self._run(buf, bb, graphs, flags, again, u, B)
            setup += more
            n_out = torch.where(again > 0, again, n_out)
            steps = int(n_out.max())
            done, redo = again > 0, redo.cpu()
            tokens, n = tokens[:steps].clone(), redo.shape[0]
            if not torch.equal(redo[:, done], tokens[:n, done]):  # (not seen: the same ops on the same rows)
                self.rerun_mismatches += 1
                log.warning("a decode block's rows stepped again to their stop made other tokens than the "
                            "first time; their second run's tokens stand")  # fmt: skip
            tokens[:n, done] = redo[:, done]
            for r in done.nonzero().flatten().tolist():  # (what the tokens that stand end on)
                made = bytes(int(t) & 0xFF for t in tokens[: n_out[r], r])
                stopped[r] = first_stop_end(history[r], made, stops[r]) is not None
            if lp is not None:  # the rows' second run's, with their tokens
                lp = tuple(t[:steps].clone() for t in lp)
                for mine, theirs in zip(lp, redo_lp):
                    mine[:n, done.to(dev)] = theirs[:, done.to(dev)]
        bb.calls += 1
        if stop_rows:
            finish()
            if dev.type == "cuda":  # (the block's end, for its times: this stream's, not the device's, which
                # is invalid while another model's engine thread captures a graph, CUDA's "prohibited
                # operations": it would fail here and invalidate that capture)
                torch.cuda.current_stream(dev).synchronize()
        t1 = time.perf_counter()
        counter += n_out
        span = max(t1 - t0 - setup, 0.0)  # (captures are setup, not steps)
        times = t0 + setup + span * torch.arange(1, steps + 1, dtype=torch.float64) / steps
        if lp is not None:
            kmax = min(int(lp_k.max()), self.rec.config.vocab_size)
            lp = (lp[0][:steps].cpu(), lp[1][:steps, :, :kmax].cpu(), lp[2][:steps, :, :kmax].cpu())
        return fused.BlockResult(steps, tokens, n_out, stopped, times, setup, lp)

    @torch.inference_mode(False)
    def _lp_buffers(self, bb: BlockBuffers) -> None:
        """bb.lp, the block graphs' log-probability outputs (before their first capture)."""
        steps, b = bb.u.shape
        k, dev = min(LOGPROBS_K, self.rec.config.vocab_size), bb.u.device
        bb.lp = (torch.zeros(steps, b, device=dev), torch.zeros(steps, b, k, dtype=torch.long, device=dev),
                 torch.zeros(steps, b, k, device=dev))  # fmt: skip

    def _run(self, buf: StepBuffers, bb: BlockBuffers, graphs: bool, flags: tuple[bool, ...],
             n_out: torch.Tensor, u: torch.Tensor, B: int):  # fmt: skip
        """Step the bucket's rows max(n_out) steps (graphs of those sizes captured first, unless they
        are), sampled on u[i] at step i, row r keeping what it had after n_out[r] steps (segments that end
        where a row reaches its count: its tensors kept there and put back at the end; rows with 0 are
        fed token 0 meanwhile, their own need not be an id). Returns the tokens (steps, B) on the device,
        the log-probabilities (when flags[5]: bb.lp's, steps by B) and the seconds spent capturing graphs."""
        steps = int(n_out.max())
        ends = sorted(set(n_out.tolist()) - {steps})
        plan, t = [], 0
        for e in [*ends, steps]:
            plan.append((block_pieces(e - t) if e > t else [], e))
            t = e
        t_setup = time.perf_counter()
        if graphs:  # captured before the steps start (a late capture: other sampler settings)
            for k in {k for pieces, _ in plan for k in pieces}:
                self._block_graph(buf, bb, k, flags)
        setup = time.perf_counter() - t_setup
        dev = buf.state.device
        out = torch.empty(steps, B, dtype=torch.long, device=dev)
        lp = None if not flags[5] else tuple(torch.empty(steps, B, *t.shape[2:], dtype=t.dtype, device=dev)
                                             for t in bb.lp)  # fmt: skip
        kept = []  # (rows, `_take` of them) where they reached their count
        done = 0
        for pieces, end in plan:
            for k in pieces:
                bb.u[:k, :B].copy_(u[done : done + k])
                graph = self._block_graph(buf, bb, k, flags) if graphs else None
                if graph is not None:
                    graph.replay()
                else:  # (without CUDA, or after a failed capture)
                    self._block_body(buf, bb, k, flags)
                out[done : done + k].copy_(bb.out[:k, :B])
                for mine, theirs in zip(lp or (), bb.lp or ()):
                    mine[done : done + k].copy_(theirs[:k, :B])
                done += k
            if end < steps:
                rows = (n_out == end).nonzero().flatten().to(dev)
                kept.append((rows, self._take(self._row_tensors(buf, bb), rows)))
                if end == 0:
                    buf.tok.index_fill_(0, rows, 0)
        for rows, taken in kept:
            self._put(buf, bb, rows, taken)
        return out, lp, setup

    @staticmethod
    def _row_tensors(buf: StepBuffers, bb: BlockBuffers) -> tuple:
        """A bucket's per-row block tensors: (state, pending tokens, seen sets, counts)."""
        return buf.state, buf.tok, bb.seen, bb.counts

    def _take(self, tensors: tuple, rows: torch.Tensor) -> tuple:
        """Copies of `rows` of (state, pending tokens, seen sets, counts) (`_row_tensors`, or another
        `_take`: its rows by position); the state's along its batch dim."""
        state, tok, seen, counts = tensors
        return (state.index_select(self.bd, rows), tok.index_select(0, rows), seen.index_select(0, rows),
                counts.index_select(0, rows))  # fmt: skip

    def _put(self, buf: StepBuffers, bb: BlockBuffers, rows: torch.Tensor, taken: tuple) -> None:
        """Put back what `_take` copied, into the bucket's buffers at `rows`."""
        for mine, theirs in zip(self._row_tensors(buf, bb), taken):
            mine.index_copy_(self.bd if mine is buf.state else 0, rows, theirs)


class GraphedModel:
    """The CUDA-graph methods a recurrent form shares (`RecurrentModel`, `SaShiMiRecurrent`): it sets
    `self._graphs = None` and has `device`, `batch_dim`, `state_shape`, `init_state`, `config.vocab_size`
    and `_step_eager(tokens, state, out, ids_checked=False)`, which with `ids_checked` must not
    synchronize with the host (it is what the graphs capture)."""

    _graphs: BucketedStep | None
    graphs_check: dict[str, float] | None = None  # the last `check_graphs` report
    # the dtype a decode batch stores its states in (`use_state_dtype`): the graphs' buffers, the server's
    # decode batch; `init_state`, sessions and prefill keep float32
    state_dtype: torch.dtype = torch.float32
    state_dtype_check: dict | None = None  # the last `check_state_dtype` report

    def _probe_state(self, rows: int, g: torch.Generator) -> torch.Tensor:
        """The float32 states of `rows` random prompts of 2, 5, 8, … tokens from `g` (a SaShiMi's rows at
        different pooling phases), prefilled and stacked on `batch_dim`: the checks' starting batch."""
        V, dev = self.config.vocab_size, self.device
        prompts = [torch.randint(0, V, (1, 2 + 3 * r), generator=g).to(dev) for r in range(rows)]
        return torch.cat([self.prefill(p, self.init_state(1), logits="none")[1] for p in prompts],
                         self.batch_dim)  # fmt: skip

    def _half_prefill(self, tokens: torch.Tensor, state: torch.Tensor, logits: str):
        """`prefill` of a float16 state: from its exact widening, the state after the prompt rounded back
        to float16 (the definition `_half_step` follows for a step)."""
        out, new = self.prefill(tokens, state.float(), logits)
        return out, new.to(state.dtype)

    def _half_step(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None,
                   ids_checked: bool = False):  # fmt: skip
        """The step of a float16 state on a path that steps float32 (the C steps, the torch ops): widened
        exactly, stepped (`_step_eager`), the next state rounded to nearest even into `out` (else a new
        float16 tensor). No host sync of its own (the graphs capture it)."""
        logits, new = self._step_eager(tokens, state.float(), None, ids_checked)
        return logits, new.to(state.dtype) if out is None else out.copy_(new)

    @property
    def state16_native(self) -> bool:
        """Whether the step reads and writes a float16 state at 16 bits itself (RecurrentModel: diagonal
        layers with the Triton kernel); here False: a float16 state is widened, stepped in float32 and
        rounded (`_half_step`), the same definition with more bytes moved."""
        return False

    def _state16_problem(self) -> str | None:
        """Why this model's state cannot be stored in float16 (None when it can); SaShiMi adds its phase."""
        return None

    def state16_bound(self) -> torch.Tensor:
        """`state_bound` for a state stored in float16, its roundings fed back (RecurrentModel derives
        one); here none is: inf wherever `state_bound` is not 0 (a SaShiMi's pool buffers carry rounded
        values into the blocks above them, which its bound does not follow)."""
        b = self.state_bound()
        return torch.where(b == 0, 0.0, torch.inf)

    @torch.inference_mode()
    def check_state_dtype(self, dtype: torch.dtype = torch.float16, rows: int = STATE16_ROWS,
                          steps: int = STATE16_STEPS) -> dict:  # fmt: skip
        """The step with the state stored in `dtype` (float16; bfloat16, which `use_state_dtype` refuses,
        for comparison) against the float32 step (which conversion verified
        against the float64 conv mode): `rows` rows after prompts of different lengths (fixed seed; a
        SaShiMi's at different pooling phases), then `steps` random tokens stepped eagerly twice, the
        state kept float32 and stored in `dtype`. Returns {"dtype", "rows", "steps", "logits_rel_err"
        (Frobenius, all positions), "tv_mean" and "tv_max" (the total variation ½ Σ|p − p₃₂| between the
        next-token distributions, over the positions), "argmax_differs" (share of positions whose most
        likely token differs), "state_max_abs" (the float32 run's largest |state|),
        "state_bound_max" (`state16_bound`'s largest finite entry: the largest |value| a float16 state can
        take, its roundings included), "bound_over" (entries whose float16 bound exceeds float16's largest
        value, 65,504, inf included: their stored value is not proven not to overflow), "tol"}, also kept in
        `state_dtype_check`."""
        from model.recurrent import FLOAT16_MAX, STATE16_TOL  # noqa: PLC0415

        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"check_state_dtype compares a 16-bit state (float16, bfloat16), got {dtype}")
        V, dev = self.config.vocab_size, self.device
        g = torch.Generator().manual_seed(0)
        s32 = self._probe_state(rows, g)
        s16 = s32.to(dtype)
        tokens = torch.randint(0, V, (steps, rows), generator=g).to(dev)
        peak = s32.abs().max()
        la, lb = [], []
        for t in range(steps):
            la.append(self._step_eager(tokens[t], s32, out=s32)[0].double())
            lb.append(self._step_eager(tokens[t], s16, out=s16)[0].double())
            peak = torch.maximum(peak, s32.abs().max())
        la, lb = torch.stack(la), torch.stack(lb)  # (steps, rows, V)
        tv = 0.5 * (torch.softmax(lb, -1) - torch.softmax(la, -1)).abs().sum(-1)  # (steps, rows)
        bound = self.state16_bound()
        finite = bound[torch.isfinite(bound)]
        report = {
            "dtype": str(dtype).removeprefix("torch."), "rows": rows, "steps": steps,
            "logits_rel_err": float((lb - la).norm() / la.norm().clamp_min(1e-30)),
            "tv_mean": float(tv.mean()), "tv_max": float(tv.max()),
            "argmax_differs": float((la.argmax(-1) != lb.argmax(-1)).double().mean()),
            "state_max_abs": float(peak), "state_bound_max": float(finite.max()) if finite.numel() else 0.0,
            "bound_over": int((bound > FLOAT16_MAX).sum()), "tol": STATE16_TOL,
        }  # fmt: skip
        self.state_dtype_check = report
        return report

    def use_state_dtype(self, dtype: torch.dtype | str, proven: bool = True) -> dict:
        """Store the decode batch's states in `dtype`: torch.float32 (the default) or torch.float16 (or
        their names). A float16 state halves the bytes a step moves (a GPU step is bound by them at large
        batches): each step widens it exactly, computes in float32 and rounds the next state to float16
        (`step`; the Triton kernel does it as it loads and stores). The graphs' buffers take the dtype
        (captured again, if captured). `init_state`, `prefill` and the server's sessions stay float32; a
        state of either dtype may be stepped whatever this says. float16 is checked first
        (`check_state_dtype`) and returns its report ({} for float32). `proven` (the default): float16 only
        where no state the model can reach overflows it, every rounding included (`state16_bound` within
        65,504: the diagonal layers of a pre-norm model); False: on the probe's values alone (a model whose
        bound is loose or not derived: a DPLR layer, SaShiMi), where a far larger state would give inf.
        Raises ValueError for another dtype, where float16 cannot hold the state (a SaShiMi whose phase
        counter passes 2,048) or, `proven`, where its bound passes float16's range; VerificationError when
        the float16 step's next-token distributions are more than STATE16_TOL from the float32 step's (mean
        total variation) or its probe's state overflowed float16 (the model keeps its state dtype)."""
        from model.recurrent import FLOAT16_MAX, STATE_DTYPES, VerificationError, named_dtype  # noqa: PLC0415

        dtype = named_dtype(dtype)
        if dtype not in STATE_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in STATE_DTYPES)
            raise ValueError(f"state dtype must be one of {names}, got {dtype}")
        report: dict = {}
        if dtype != torch.float32:
            if problem := self._state16_problem():
                raise ValueError(f"a float16 state cannot hold this model's state: {problem}")
            bound = self.state16_bound()
            if proven and bool((bound > FLOAT16_MAX).any()):
                unbounded, finite = int(torch.isinf(bound).sum()), bound[torch.isfinite(bound)]
                over = int((finite > FLOAT16_MAX).sum())
                why = []
                if unbounded:
                    why.append(f"{unbounded} entries have no float16 bound (a mode too slow for float16's "
                               "rounding, (1 + 2⁻¹¹)|λ| ≥ 1, or a layer none is derived for: DPLR, "
                               "SaShiMi)")  # fmt: skip
                if over:
                    why.append(f"{over} entries may reach past float16's {FLOAT16_MAX:.0f} (the largest "
                               f"{float(finite.max()):.4g})")  # fmt: skip
                raise ValueError(
                    f"a float16 state is not proven to hold this model's state: {'; '.join(why)}; every "
                    "rounding included (`state16_bound`); proven=False applies it on the probe's values alone"
                )
            report = self.check_state_dtype(dtype)
            if not report["tv_mean"] <= report["tol"] or report["state_max_abs"] > FLOAT16_MAX:
                raise VerificationError(
                    f"the step with a float16 state differs from the float32 step: next-token distributions "
                    f"{report['tv_mean']:.2e} apart (mean total variation; at most {report['tol']:.1e}), "
                    f"largest |state| {report['state_max_abs']:.4g} (float16 holds up to {FLOAT16_MAX:.0f})"
                )
        if dtype != self.state_dtype:
            old, self.state_dtype = self.state_dtype, dtype
            try:
                self._recapture()
            except RuntimeError:  # (the graphs failed their check and were dropped: the plain step serves)
                self.state_dtype = old
                raise
        return report

    def use_cuda_graphs(self, buckets: tuple[int, ...] | None, blocks: bool = True) -> float:
        """Step through CUDA graphs, one per batch-size bucket (`model/cuda_graphs.py`), captured now,
        with `blocks` also the decode-block graphs of plain sampling (`BucketedStep.warm`; without, each is
        captured at its first block); None goes back to the plain step. Returns the capture's seconds.
        Raises ValueError unless the model is on a CUDA device; RuntimeError when a capture fails or the
        graphs' step differs from the eager step (`check_graphs`; the plain step then stays)."""
        if buckets is None:
            self._graphs = None
            return 0.0
        graphs = BucketedStep(self, tuple(buckets), capture=True)
        seconds = graphs.warm(blocks=blocks)
        self._graphs = graphs
        self._checked_graphs()
        return seconds

    def _checked_graphs(self) -> None:
        """`check_graphs`; graphs that fail it are dropped (the plain step serves) before it raises."""
        try:
            self.check_graphs()
        except RuntimeError:
            self._graphs = None
            raise

    def _recapture(self) -> None:
        """Capture the CUDA graphs again (after the step they replay changed), if any are captured."""
        if self._graphs is not None:  # its buckets hold the other step (captured): made again
            old, self._graphs = self._graphs, None
            graphs = BucketedStep(self, old.buckets, capture=old.capture)
            graphs.warm(blocks=old.warmed_blocks)
            self._graphs = graphs
            self._checked_graphs()

    @torch.inference_mode()
    def check_graphs(self, rows: int = 5, tol: float | None = None) -> dict[str, float]:
        """The graphs' step against the eager step (`_step_eager`, which conversion verified against the
        float64 conv mode): `rows` rows after prompts of different lengths (a SaShiMi's at different pooling
        phases; in `state_dtype`), stepped through their bucket (copied in and out) and eagerly with the same
        random tokens, 4 steps (a SaShiMi: two pooling periods + 3). Returns the relative errors (Frobenius)
        of the logits and of the final states, also kept in `graphs_check`. Raises RuntimeError above `tol`
        (default `LOGITS_TOL` of the served dtype, at least float16's with a float16 `state_dtype`; the graphs
        may round otherwise: other matmul shapes, a SaShiMi's dense step), naming both errors: the server then
        serves with the plain step (`server.registry.use_cuda_graphs`). Without graphs, {}."""
        from model.recurrent import LOGITS_TOL  # noqa: PLC0415

        if self._graphs is None:
            return {}
        rows = min(rows, self._graphs.buckets[-1])
        V, dev = self.config.vocab_size, self.device
        g = torch.Generator().manual_seed(0)
        state = self._probe_state(rows, g).to(self.state_dtype)
        steps = 2 * self.period + 3 if hasattr(self, "period") else 4
        tokens = torch.randint(0, V, (steps, rows), generator=g).to(dev)
        graphed, eager, la, lb = state.clone(), state.clone(), [], []
        for t in range(steps):
            la.append(self._graphs(tokens[t], graphed, out=graphed)[0])
            lb.append(self._step_eager(tokens[t], eager, out=eager)[0])
        la, lb = torch.stack(la).double(), torch.stack(lb).double()
        report = {
            "logits_rel_err": float((la - lb).norm() / lb.norm().clamp_min(1e-30)),
            "state_rel_err": float(
                (graphed.double() - eager.double()).norm() / eager.double().norm().clamp_min(1e-30)
            ),
        }
        self.graphs_check = report
        limit = LOGITS_TOL[self.dtype] if tol is None else tol
        if tol is None and self.state_dtype == torch.float16:  # two paths whose float32 results differ in
            # the last bit may round a state entry to neighbouring float16 values (2⁻¹¹ relative apart)
            limit = max(limit, LOGITS_TOL[torch.float16])
        if not max(report.values()) <= limit:  # (NaN fails too)
            raise RuntimeError(
                f"the CUDA graphs' step differs from the eager step: logits {report['logits_rel_err']:.2e}, "
                f"states {report['state_rel_err']:.2e} (relative; at most {limit:.1e})"
            )
        return report

    def resident_state(self, state: torch.Tensor) -> torch.Tensor:
        """With CUDA graphs (`use_cuda_graphs`), the batch `state` (`state_shape` with the batch inserted
        at dim `batch_dim`) moved into its bucket's buffer (`BucketedStep.resident`):
        `step(tokens, view, out=view)` then replays the graph on it in place, without copying the state in
        and out (what the engine's decode batch does every step). Without graphs, or past the largest
        bucket (or for an empty batch), `state` itself. With graphs, raises ValueError for a wrong shape
        or dtype."""
        if self._graphs is None:
            return state
        bd, shape = self.batch_dim, list(self.state_shape)
        rows = state.shape[bd] if state.dim() == len(shape) + 1 else "B"
        if rows == 0:
            return state
        want = tuple(shape[:bd] + [rows] + shape[bd:])
        if tuple(state.shape) != want or state.dtype != self.state_dtype:
            name = str(self.state_dtype).removeprefix("torch.")
            raise ValueError(f"state has shape {tuple(state.shape)} {state.dtype}, expected {want} {name} "
                             "(the state dtype, `use_state_dtype`)")  # fmt: skip
        return self._graphs.resident(state)
