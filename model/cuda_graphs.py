"""The decode step replayed as CUDA graphs, one per batch-size bucket.

A decode step of our models is a few dozen small kernels (embedding, per layer a LayerNorm, the SSM step's
elementwise ops, the output linear and GLU; the head). At small batches each kernel runs for a few µs and
the step is bound by launching them from Python. A CUDA graph records the step's kernels once and
replays them with one launch (PyTorch: `torch.cuda.CUDAGraph`, "CUDA Graphs" in the CUDA semantics notes).

A graph replays fixed shapes at fixed addresses, so each bucket b (1, 2, 4, …, 1024) owns static buffers:
tokens (b,), state (n_layers, b, H, 2, M) float32 and the logits (b, V) float32 the graph writes. A batch
of n rows runs in the smallest bucket b ≥ n: its tokens and states are copied into rows 0..n−1, rows
n..b−1 are zeroed (token 0, state 0), the graph is replayed, and rows 0..n−1 of the state and logits are
copied out. Padded rows cannot change real rows: every op of the step is row-wise (the embedding,
LayerNorm, the linear layers, the SSM step, the head), so row i's result depends on row i's inputs
alone (`tests/test_cuda_graphs.py` checks it on CPU, `tests/test_cuda.py` on the captured graph).
A batch above the largest bucket runs the plain (eager) step.

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

Sampling stays outside the graph: it draws from one `torch.Generator` per request (`model/sampling.py`),
which a graph could only replay after registering every request's generator with every graph.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

LARGEST_BUCKET = 1024
WARMUP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS handles, the allocator's pools)


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
    state: torch.Tensor  # (n_layers, b, H, 2, M) float32, stepped in place
    logits: torch.Tensor | None = None  # (b, V) float32, written by the step (the graph's own output)
    graph: torch.cuda.CUDAGraph | None = None
    capture_s: float = 0.0  # wall time of the warm-up runs and the capture
    calls: int = field(default=0)


class BucketedStep:
    """`RecurrentModel.step` through per-bucket static buffers, replayed as CUDA graphs when `capture`.

    `__call__(tokens (n,), state (n_layers, n, H, 2, M) float32, out=None)` → (logits (n, V) float32, a
    new tensor; the next state, in `out` when given, else a new tensor), like `RecurrentModel.step`.
    Buffers (and graphs) are made on a bucket's first use, or all at once by `warm`. Not thread-safe:
    one caller (the engine thread) at a time. Raises ValueError when `capture` is asked on a model
    that is not on a CUDA device."""

    def __init__(self, rec, buckets: tuple[int, ...], capture: bool):
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be ascending distinct sizes ≥ 1, got {buckets!r}")
        if capture and rec.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {rec.device}")
        self.rec, self.buckets, self.capture = rec, tuple(buckets), capture
        self.buffers: dict[int, StepBuffers] = {}
        self.eager_calls = 0  # batches above the largest bucket, or another batch of the resident bucket
        self.resident_bucket: int | None = None  # the bucket whose buffer holds the resident batch
        self.resident_rows = 0  # its rows (0 … resident_rows − 1 of that buffer)
        self.copied_calls = 0  # steps whose state was copied in and out (not resident)

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
        buf = StepBuffers(torch.zeros(b, dtype=torch.long, device=dev), self.rec.init_state(b))
        t0 = time.perf_counter()
        if self.capture:  # as in PyTorch's CUDA-graphs notes: warm up on a side stream, then capture
            with torch.cuda.device(dev):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(WARMUP_RUNS):
                        self._eager(buf)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # its own memory pool; the logits live there
                    buf.logits = self._eager(buf)
                buf.graph = graph
                torch.cuda.synchronize()
                buf.state.zero_()
        buf.capture_s = time.perf_counter() - t0
        self.buffers[b] = buf
        return buf

    def warm(self) -> float:
        """Make every bucket's buffers (capture every graph) now; returns the seconds it took."""
        t0 = time.perf_counter()
        for b in self.buckets:
            self.bucket(b)
        return time.perf_counter() - t0

    @staticmethod
    def _is_rows_of(t: torch.Tensor | None, buf: StepBuffers, n: int) -> bool:
        """Whether t is rows 0..n−1 of buf.state (the view `resident` returns)."""
        return (
            t is not None and t.data_ptr() == buf.state.data_ptr() and t.shape[1] == n
            and t.stride() == buf.state.stride() and t.shape == buf.state[:, :n].shape
        )  # fmt: skip

    @torch.inference_mode()
    def resident(self, state: torch.Tensor) -> torch.Tensor:
        """The batch `state` (n_layers, n, H, 2, M) float32, 1 ≤ n ≤ the largest bucket, as rows 0..n−1 of
        its bucket's buffer (copied there unless it is that view already; the rows past n zeroed): step it
        with `out` the returned view and the graph replays on it in place. Makes it the one resident batch.
        A batch above the largest bucket is returned as it is. Raises ValueError for n < 1."""
        n = state.shape[1]
        b = bucket_for(n, self.buckets)
        if b is None:
            self.resident_bucket = None
            return state
        buf = self.bucket(b)
        if self._is_rows_of(state, buf, n):  # rows 0 … n − 1 of the buffer already (resident, or shrunk)
            if self.resident_bucket != b or self.resident_rows != n:
                buf.state[:, n:].zero_()
            self.resident_bucket, self.resident_rows = b, n
            return state
        view = buf.state[:, :n]
        # other rows of the same buffer (they may overlap rows 0 … n − 1): copied through a clone
        same_buffer = state.untyped_storage().data_ptr() == buf.state.untyped_storage().data_ptr()
        view.copy_(state.clone() if same_buffer else state)
        buf.state[:, n:].zero_()
        self.resident_bucket, self.resident_rows = b, n
        return view

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None):
        n = tokens.shape[0]
        b = bucket_for(n, self.buckets) if n else None
        if b is None:  # empty, or above the largest bucket
            self.eager_calls += 1
            return self.rec._step_eager(tokens, state, out)
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
            buf.state[:, :n].copy_(state)
            if b > n:  # padded rows: a zero state fed token 0 (finite, and row-wise isolated anyway)
                buf.state[:, n:].zero_()
        if buf.graph is not None:
            buf.graph.replay()
        else:
            buf.logits = self._eager(buf)
        if in_place:
            return buf.logits[:n].clone(), state
        new = torch.empty_like(state) if out is None else out
        new.copy_(buf.state[:, :n])
        return buf.logits[:n].clone(), new
