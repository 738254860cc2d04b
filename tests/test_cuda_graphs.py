"""CUDA-graph decode step (model/cuda_graphs.py): everything that runs without CUDA.

The bucket choice, the padding, the static buffers and the eager fallback run on CPU with the capture
switched off (`capture=False`) and must reproduce the plain step bit for bit; the capture itself is
checked in tests/test_cuda.py on a GPU. Also here: the S4_CUDA_GRAPHS setting, the registry's hook on
CPU, and the clear refusal of `python -m bench.gpu` and `scripts/gpu-check` where there is no CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ModelConfig, SequenceModel, build
from model.cuda_graphs import LARGEST_BUCKET, BucketedStep, bucket_for, bucket_sizes

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=256, d_model=32, n_layers=2, d_state=16, l_max=256, cauchy_backend="torch")


@pytest.fixture(scope="module", params=["c", "torch"])
def rec(request):
    """A tiny S4 model's recurrent form: 'c' the CPU C step (as served on CPU), 'torch' the plain
    torch ops (the path a CUDA device runs and captures)."""
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**TINY, kernel="s4"))
    fused = request.param == "c"
    return net.to_recurrent(fused_step=fused, fused_network=fused)


def reached_state(rec, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows' states after a random 16-token prompt each, and their next tokens."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (n, 16), generator=g)
    _, state = rec.prefill(prompt, rec.init_state(n))
    return torch.randint(0, 256, (n,), generator=g), state


def test_buckets_are_powers_of_two_up_to_the_first_one_covering_the_batch():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(5) == (1, 2, 4, 8)
    assert bucket_sizes(128) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert bucket_sizes(129)[-1] == 256
    assert bucket_sizes(10**6) == tuple(2**k for k in range(11))  # at most LARGEST_BUCKET = 1024
    assert LARGEST_BUCKET == 1024
    assert bucket_sizes(100, largest=16) == (1, 2, 4, 8, 16)
    for bad in (0, -3, 2.5, True, "8"):
        with pytest.raises(ValueError, match="max_batch"):
            bucket_sizes(bad)
    for bad in (0, 3, 12, 2.0):
        with pytest.raises(ValueError, match="largest"):
            bucket_sizes(8, largest=bad)


def test_a_batch_takes_the_smallest_bucket_that_holds_it():
    buckets = bucket_sizes(1024)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 63, 64, 65, 1000, 1024)] == [
        1, 2, 4, 4, 8, 64, 64, 128, 1024, 1024,
    ]  # fmt: skip
    assert bucket_for(1025, buckets) is None
    with pytest.raises(ValueError, match="at least 1 row"):
        bucket_for(0, buckets)


def padded(tok: torch.Tensor, state: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows zero-padded to b rows (token 0, state 0), as a bucket holds them."""
    n = tok.shape[0]
    big = torch.zeros(state.shape[0], b, *state.shape[2:])
    big[:, :n] = state
    return torch.cat([tok, tok.new_zeros(b - n)]), big


@pytest.mark.parametrize("n", [1, 3, 8, 100, 130])
def test_bucketed_step_without_capture_is_bit_identical_to_the_plain_step(rec, n):
    """Rows copied into a bucket's buffers, padded, stepped, copied out: the same bits as the plain step
    of the zero-padded batch (130 rows run in bucket 256, past the C step's 128: torch ops). Against the
    plain step of the n rows alone: the same bits on the C step (row by row, whatever the batch); within
    float32 rounding on the torch ops, whose matmuls round differently at another batch size (the plain
    step differs as much between batch sizes: measured 1-2 ulp, 2e-7 of the largest logit)."""
    tok, state = reached_state(rec, n)
    b = bucket_for(n, bucket_sizes(256))
    want_logits, want_state = rec._step_eager(*padded(tok, state, b), None)
    want_logits, want_state = want_logits[:n], want_state[:, :n]
    step = BucketedStep(rec, bucket_sizes(256), capture=False)
    logits, new = step(tok, state)
    assert logits.shape == (n, 256) and new.shape == state.shape and new.dtype == torch.float32
    assert torch.equal(logits, want_logits) and torch.equal(new, want_state)
    alone_logits, alone_state = rec._step_eager(tok, state, None)
    if rec._fused is not None:
        assert torch.equal(logits, alone_logits) and torch.equal(new, alone_state)
    else:
        torch.testing.assert_close(logits, alone_logits, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(new, alone_state, rtol=1e-5, atol=1e-6)
    # in place, as the engine's decode batch calls it (out = state)
    inplace = state.clone()
    logits2, same = step(tok, inplace, out=inplace)
    assert same is inplace and torch.equal(inplace, want_state) and torch.equal(logits2, want_logits)


@pytest.mark.parametrize("junk", ["large", "nan"])
def test_padded_rows_cannot_change_real_rows(rec, junk):
    """Why padding is safe: every op of the step is row-wise, so 3 real rows stepped beside 5 rows of
    garbage (huge values, or NaN and inf) give the same bits as beside 5 zero rows."""
    tok, state = reached_state(rec, 8, seed=1)
    zero_state, zero_tok = state.clone(), tok.clone()
    zero_state[:, 3:] = 0
    zero_tok[3:] = 0
    bad_state, bad_tok = state.clone(), tok.clone()
    bad_state[:, 3:] = 1e30 * torch.randn_like(bad_state[:, 3:])
    if junk == "nan":
        bad_state[:, 3:5] = float("nan")
        bad_state[:, 5:] = float("inf")
    bad_tok[3:] = 255
    want_logits, want_state = rec._step_eager(zero_tok, zero_state, None)
    got_logits, got_state = rec._step_eager(bad_tok, bad_state, None)
    assert torch.equal(got_logits[:3], want_logits[:3]) and torch.equal(got_state[:, :3], want_state[:, :3])
    assert torch.isfinite(want_logits).all()


def test_static_buffers_are_made_once_per_bucket_and_reused(rec):
    step = BucketedStep(rec, bucket_sizes(8), capture=False)
    tok, state = reached_state(rec, 4)
    step(tok[:3], state[:, :3].contiguous())
    buf = step.buffers[4]
    ptrs = (buf.tok.data_ptr(), buf.state.data_ptr())
    first, _ = step(tok, state)
    again, _ = step(tok[:3], state[:, :3].contiguous())
    assert list(step.buffers) == [4] and buf.calls == 3
    assert (step.buffers[4].tok.data_ptr(), step.buffers[4].state.data_ptr()) == ptrs
    # what the caller gets is its own: not a view of the static buffers, which the next call overwrites
    assert first.data_ptr() != buf.logits.data_ptr()
    kept = first.clone()
    step(torch.zeros(4, dtype=torch.long), rec.init_state(4))
    assert torch.equal(first, kept)
    # stale rows of an earlier, larger batch (row 3 of the bucket) do not leak into a smaller one
    assert torch.equal(again, rec._step_eager(*padded(tok[:3], state[:, :3], 4), None)[0][:3])


def test_the_bucket_step_checks_no_ids_itself_and_step_checks_them_once(rec, monkeypatch):
    """On an H200 every capture failed: the bucket's eager step checked the ids (torch.aminmax, then int():
    a host sync, which a capturing stream refuses). `step` checks the caller's ids once, before they are
    copied into the bucket; the bucket's own step (warm-up, capture, replay) checks nothing. An id out of
    range is still refused through the graphs path, the state untouched."""
    import model.recurrent as mr

    tok, state = reached_state(rec, 3)
    calls = []
    real = mr.check_token_ids
    monkeypatch.setattr(mr, "check_token_ids", lambda t, V: (calls.append(t.shape[0]), real(t, V)))
    step = BucketedStep(rec, (1, 2, 4), capture=False)
    step.warm()
    step(tok, state.clone())
    assert calls == []  # warm-up and the bucket's step: no check (the C step checks in C, at no cost)
    rec._graphs = step
    try:
        before = state.clone()
        logits, _ = rec.step(tok, state.clone())
        want = rec._step_eager(*padded(tok, state, 4), None)[0][:3]  # the bucket's batch: the same bits
        assert torch.equal(logits, want)
        assert calls == ([3] if rec._net_step is not None else [3, 4])  # step's (and the torch reference's)
        with pytest.raises(ValueError, match="token id 256 at index \\[1\\]"):
            rec.step(torch.tensor([1, 256, 2]), state)
        assert torch.equal(state, before)
    finally:
        rec._graphs = None


def test_a_resident_batch_steps_in_place_in_its_buckets_buffer_without_copies(rec):
    """`resident_state` moves a batch into its bucket's buffer once; stepped with out = that view it gives
    the bits of the copying path (another BucketedStep, the same bucket) with no copy in or out. While it
    is resident: another caller's batch of that bucket runs the eager step and leaves the resident rows
    alone; a step of the view with out=None leaves the view as it was; grown past the bucket (the engine's
    torch.cat) it moves to the next bucket, whose rows then hold it, and the old bucket copies again."""
    step = BucketedStep(rec, bucket_sizes(8), capture=False)
    copying = BucketedStep(rec, bucket_sizes(8), capture=False)
    rec._graphs = step
    try:
        tok, state = reached_state(rec, 3)
        ref = state.clone()
        view = rec.resident_state(state)
        assert view.data_ptr() == step.buffers[4].state.data_ptr() and step.resident_bucket == 4
        assert torch.equal(view, state) and view.shape == state.shape
        assert rec.resident_state(view) is view  # resident already: nothing moves
        t_a, t_b = tok, tok
        for _ in range(6):
            la, same = rec.step(t_a, view, out=view)
            lb, ref = copying(t_b, ref, out=ref)
            assert same is view and torch.equal(la, lb) and torch.equal(view, ref)
            t_a, t_b = la.argmax(-1), lb.argmax(-1)
        assert step.copied_calls == 0 and copying.copied_calls == 6 and step.buffers[4].calls == 6
        kept = view.clone()
        tok2, other = reached_state(rec, 4, seed=3)
        l2, s2 = rec.step(tok2, other)
        assert step.eager_calls == 1 and torch.equal(view, kept)
        want2 = rec._step_eager(tok2, other, None)
        assert torch.equal(l2, want2[0]) and torch.equal(s2, want2[1])
        l3, s3 = rec.step(t_a, view)
        assert torch.equal(view, kept) and s3 is not view and step.eager_calls == 2
        assert torch.equal(l3, rec._step_eager(t_a, kept, None)[0])  # the eager step ran
        grown = torch.cat([view, other[:, :2]], dim=1)
        moved = rec.resident_state(grown)
        assert step.resident_bucket == 8 and moved.data_ptr() == step.buffers[8].state.data_ptr()
        assert torch.equal(moved, grown) and bool((step.buffers[8].state[:, 5:] == 0).all())
        rec.step(tok2, other.clone())
        assert step.copied_calls == 1  # bucket 4 is no longer resident: copied in and out
        with pytest.raises(ValueError, match="expected"):
            rec.resident_state(torch.zeros(2, 3, 32, 2, 3))
        with pytest.raises(ValueError, match="expected"):  # not (n_layers, B, H, 2, M) at all
            rec.resident_state(torch.zeros(2, 3, 32))
        # rows 1..6 of the resident bucket's own buffer: moved to rows 0..5 through a clone (the two overlap)
        big = rec.resident_state(torch.cat([moved, other[:, :3]], dim=1))  # 8 rows, bucket 8
        assert big.data_ptr() == step.buffers[8].state.data_ptr() and step.resident_rows == 8
        want = big[:, 1:7].clone()
        again = rec.resident_state(big[:, 1:7])
        assert again.data_ptr() == big.data_ptr() and torch.equal(again, want) and step.resident_rows == 6
        assert bool((step.buffers[8].state[:, 6:] == 0).all())
        # shrunk in place (rows 0..4 of the resident 6): the rows past them are zeroed, as documented
        shrunk = rec.resident_state(again[:, :5])
        assert shrunk.data_ptr() == again.data_ptr() and step.resident_rows == 5
        assert torch.equal(shrunk, want[:, :5]) and bool((step.buffers[8].state[:, 5:] == 0).all())
        # released: the bucket copies again, and its view is stepped as any other batch
        step.release()
        copied, kept = step.copied_calls, shrunk.clone()
        rec.step(torch.zeros(5, dtype=torch.long), shrunk, out=shrunk)
        assert step.resident_bucket is None and step.copied_calls == copied + 1
        assert not torch.equal(shrunk, kept)  # stepped (in place through the copies)
        # a copying step of other rows of its bucket's own buffer (they overlap rows 0..4): through a clone
        rows, five = step.buffers[8].state[:, 1:6], torch.arange(5)
        want_logits, want_state = copying(five, rows.clone())  # (the same bucket: the same rounding)
        got_logits, got_state = rec.step(five, rows)
        assert torch.equal(got_logits, want_logits) and torch.equal(got_state, want_state)
    finally:
        rec._graphs = None


def test_the_engines_decode_batch_steps_resident_and_samples_the_same_tokens(rec, monkeypatch):
    """The engine's DecodeBatch makes its rows resident before each step: after a step its state is rows
    of the bucket's buffer, nothing was copied in or out, and the sampled tokens (one seeded generator a
    row) are those of the copying path. Rows joining past the end move it to the next bucket."""
    from bench.gpu import decode_batch

    def run(resident: bool) -> tuple[list, BucketedStep]:
        rec._graphs = BucketedStep(rec, bucket_sizes(8), capture=False)
        if not resident:
            monkeypatch.setattr(rec, "resident_state", lambda s: s, raising=False)
        try:
            batch = decode_batch(rec, 3)
            tokens = [batch.step(rec) for _ in range(5)]
            if resident:
                assert batch.state.data_ptr() == rec._graphs.buffers[4].state.data_ptr()
            grown = decode_batch(rec, 2)
            batch.join([j for j in grown.rows])  # 5 rows: bucket 8
            tokens += [batch.step(rec) for _ in range(3)]
            if resident:
                assert batch.state.data_ptr() == rec._graphs.buffers[8].state.data_ptr()
            return tokens, rec._graphs
        finally:
            rec._graphs = None
            monkeypatch.undo()

    resident, steps = run(True)
    copied, copying = run(False)
    assert steps.copied_calls == 0 and copying.copied_calls == 8
    assert resident == copied and all(len(t) in (3, 5) for t in resident)


def test_a_batch_above_the_largest_bucket_runs_the_plain_step(rec):
    step = BucketedStep(rec, (1, 2, 4), capture=False)
    tok, state = reached_state(rec, 5)
    logits, new = step(tok, state)
    want_logits, want_state = rec._step_eager(tok, state, None)
    assert step.eager_calls == 1 and 8 not in step.buffers
    assert torch.equal(logits, want_logits) and torch.equal(new, want_state)


def test_capture_is_refused_without_a_cuda_device(rec):
    with pytest.raises(ValueError, match="CUDA device"):
        BucketedStep(rec, (1, 2), capture=True)
    with pytest.raises(ValueError, match="CUDA device"):
        rec.use_cuda_graphs((1, 2))
    assert rec._graphs is None  # still the plain step
    for bad in ((), (2, 1), (1, 1, 2), (0, 1)):
        with pytest.raises(ValueError, match="buckets"):
            BucketedStep(rec, bad, capture=False)
    with pytest.raises(ValueError, match="not one of the buckets"):
        BucketedStep(rec, (1, 2), capture=False).bucket(3)


def test_the_setting_parses_0_and_1_and_refuses_anything_else(monkeypatch):
    from pydantic import ValidationError

    from server.config import Settings

    assert Settings().cuda_graphs is True
    for raw, want in (("0", False), ("1", True), ("false", False), ("true", True)):
        monkeypatch.setenv("S4_CUDA_GRAPHS", raw)
        assert Settings().cuda_graphs is want
    for raw in ("2", "-1", "maybe", ""):
        monkeypatch.setenv("S4_CUDA_GRAPHS", raw)
        with pytest.raises(ValidationError, match="cuda_graphs"):
            Settings()


def test_the_registry_captures_nothing_on_cpu(rec):
    from server.config import Settings
    from server.registry import use_cuda_graphs

    assert use_cuda_graphs(rec, Settings(cuda_graphs=True), "tiny") is False
    assert rec._graphs is None


SASHIMI = dict(arch="sashimi", vocab_size=64, d_model=16, n_layers=1, d_state=8, l_max=128,
               cauchy_backend="torch")  # fmt: skip


def graph_model(kind: str):
    """'s4-c' / 's4-torch': a tiny S4 model with its C step or its torch ops; 'sashimi*': a tiny SaShiMi
    with its torch ops (the dense step, as CUDA captures it; '-unet-tln': U-Net, TransposedLN, S4D,
    three pools)."""
    torch.manual_seed(0)
    if kind.startswith("sashimi"):
        unet = dict(unet=True, norm="tln", kernel="s4d", init="legs", pool=[2, 2, 2])
        extra = unet if "unet" in kind else {}
        return build(ModelConfig(**{**SASHIMI, **extra})).to_recurrent(fused_step=False, fused_network=False)
    fused = kind == "s4-c"
    return SequenceModel(ModelConfig(**TINY, kernel="s4")).to_recurrent(fused_step=fused, fused_network=fused)


@pytest.mark.parametrize("kind", ["s4-c", "s4-torch", "sashimi", "sashimi-unet-tln"])
def test_the_graphs_are_checked_against_the_eager_step_and_refused_when_they_differ(kind, monkeypatch):
    """`check_graphs` (run by `use_cuda_graphs` after the capture): the graphs' step of 5 rows at different
    points (a SaShiMi's at different pooling phases; its dense step) against the eager step, within
    float32 rounding here; a step that differs (here its logits scaled by 1.001) raises RuntimeError,
    which the registry answers with the plain step."""
    rec = graph_model(kind)
    rec._graphs = BucketedStep(rec, bucket_sizes(8), capture=False)
    report = rec.check_graphs()
    assert rec.graphs_check is report and set(report) == {"logits_rel_err", "state_rel_err"}
    assert max(report.values()) <= 1e-5, report  # (measured: 0 for the S4 steps, ≤ 2e-6 for SaShiMi)
    real = rec._graphs._eager
    monkeypatch.setattr(rec._graphs, "_eager", lambda buf: real(buf) * 1.001)
    with pytest.raises(RuntimeError, match="differs from the eager step: logits 1.0"):
        rec.check_graphs()
    with pytest.raises(RuntimeError, match="differs"):  # (what use_cuda_graphs runs: the graphs dropped)
        rec._checked_graphs()
    assert rec._graphs is None and rec.check_graphs() == {}


def no_host_sync(monkeypatch) -> None:
    """Make every tensor → Python conversion (the host syncs a CUDA graph's capture refuses) raise."""

    def refuse(name):
        def raise_(*args, **kwargs):
            raise AssertionError(f"a host sync under capture: Tensor.{name}")

        return raise_

    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch, "nonzero", refuse("nonzero"))


@pytest.mark.parametrize("kind", ["s4-torch", "sashimi", "sashimi-unet-tln"])
def test_what_the_graphs_record_never_waits_for_the_host(kind, monkeypatch):
    """A CUDA graph cannot record a host sync (`cudaErrorStreamCaptureUnsupported`, seen on an H200): the
    step the graphs capture (a SaShiMi's dense step) and a decode block's body, with every sampler
    option on among the rows (`SAMPLING_FILTERS`: bias, penalties, counts, top-k/top-p, min-p) and the
    log-probabilities, run here with every tensor → Python conversion made to raise."""
    from numerics import SAMPLING_FILTERS

    from model.sampling import SamplingParams, row_settings

    rec = graph_model(kind)
    V = rec.config.vocab_size
    graphs = BucketedStep(rec, (8,), capture=False)
    buf = graphs.bucket(8)
    prompts = [torch.randint(0, V, (1, 3 + r)) for r in range(8)]
    buf.state.copy_(torch.cat([rec.prefill(p, rec.init_state(1))[1] for p in prompts], rec.batch_dim))
    params = [SamplingParams(temperature=1.0, seed=s, **SAMPLING_FILTERS[s]) for s in range(8)]
    bb = graphs._block_buffers(8)
    flags = (*graphs._set_rows(bb, row_settings(params, V), 8), True)  # (and the log-probabilities)
    assert all(flags), flags
    graphs._lp_buffers(bb)
    no_host_sync(monkeypatch)
    graphs._eager(buf)
    graphs._block_body(buf, bb, 2 * getattr(rec, "period", 2) + 1, flags)


class CudaLikeModel:
    """What the registry sees of a CUDA model (its device and use_cuda_graphs), to check its choices on
    CPU: the buckets it asks for, and the fallback when the capture raises."""

    device = torch.device("cuda")

    def __init__(self, fail: bool = False) -> None:
        self.calls: list = []
        self.fail = fail

    def use_cuda_graphs(self, buckets):
        self.calls.append(buckets)
        if self.fail and buckets is not None:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return 0.01


def test_the_registry_asks_for_buckets_up_to_the_batch_limit_and_1024_at_most():
    from server.config import Settings
    from server.registry import use_cuda_graphs

    for max_batch, largest in ((1, 1), (8, 8), (100, 128), (128, 128), (5000, 1024)):
        m = CudaLikeModel()
        assert use_cuda_graphs(m, Settings(max_batch_size=max_batch), "m") is True
        assert m.calls == [tuple(2**k for k in range(largest.bit_length()))]
    m = CudaLikeModel()
    assert use_cuda_graphs(m, Settings(cuda_graphs=False), "m") is False and m.calls == []


def test_a_failed_capture_leaves_the_plain_step(caplog):
    from server.config import Settings
    from server.registry import use_cuda_graphs

    m = CudaLikeModel(fail=True)
    with caplog.at_level("ERROR", logger="server.models"):
        assert use_cuda_graphs(m, Settings(max_batch_size=4), "m") is False
    assert m.calls == [(1, 2, 4), None]  # tried, then back to the plain step
    assert "CUDA graphs not used: the capture failed" in caplog.text and "plain torch step" in caplog.text


class CaptureStreams:
    """torch.cuda's stream calls as `BucketedStep.bucket` makes them, on CPU, with the current stream kept
    as torch keeps it: `graph` enters its capture stream and, as torch.cuda.graph's __exit__, leaves it only
    after a capture_end that succeeded (here every capture's end raises, as for a capture an op
    invalidated)."""

    def __init__(self):
        self.default = self.current = self.Stream()

    class Stream:
        def wait_stream(self, other):
            pass

    def stream(self, s):
        streams = self

        class Context:
            def __enter__(self):
                self.before, streams.current = streams.current, s

            def __exit__(self, *exc):
                streams.current = self.before

        return Context()

    def graph(self, graph, **kwargs):
        streams, capture = self, self.Stream()

        class Graph:
            def __enter__(self):
                self.before, streams.current = streams.current, capture

            def __exit__(self, *exc):  # torch's: capture_end() (raises here), then the stream's exit
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

        return Graph()

    def patch(self, monkeypatch) -> None:
        import contextlib

        for name, fake in (
            ("device", lambda dev: contextlib.nullcontext()), ("Stream", self.Stream),
            ("current_stream", lambda dev=None: self.current),
            ("default_stream", lambda dev=None: self.default), ("stream", self.stream), ("graph", self.graph),
            ("CUDAGraph", object), ("synchronize", lambda: None),
            ("set_stream", lambda s: setattr(self, "current", s)),
        ):  # fmt: skip
            monkeypatch.setattr(torch.cuda, name, fake)


def test_a_step_capture_that_fails_leaves_the_stream_that_was_current(rec, monkeypatch):
    """A bucket whose graph capture raises (out of memory, an op a capture refuses: the server then serves
    the plain step) hands back the stream that was current before it, as a failed block capture does: torch's
    graph context, whose capture's end raised, left its capture stream current, so the loading thread went on
    (the plain step's warm-up, the engine's state pool, the next models) on a stream ordered with none of the
    others."""
    streams = CaptureStreams()
    step = BucketedStep(rec, (1, 2), capture=False)
    step.capture = True  # (as on CUDA: refused on a CPU model)
    streams.patch(monkeypatch)
    with pytest.raises(RuntimeError, match="during capture"):
        step.bucket(2)
    assert streams.current is streams.default and 2 not in step.buffers


def no_cuda_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_bench_gpu_without_cuda_exits_with_one_clear_line(quick):
    cmd = [sys.executable, "-m", "bench.gpu", *quick]
    r = subprocess.run(
        cmd, cwd=ROOT, env=no_cuda_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("bench.gpu: no CUDA device") and "scripts/gpu-check" in lines[0]


def test_gpu_check_script_without_cuda_exits_with_one_clear_line():
    env = {**no_cuda_env(), "PYTHON": sys.executable}
    cmd = [str(ROOT / "scripts/gpu-check")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device"), r.stdout + r.stderr


def test_gpu_entry_points_answer_help_and_refuse_unknown_arguments_without_cuda():
    """--help works without a GPU (it printed the no-CUDA line and exited 1, or 0 with "skipped" for
    bench.official), and gpu-check refuses an argument it does not know: on a GPU machine a typo, or
    --help, started the whole ~8-minute run (found by a fresh-user trial)."""
    env = {**no_cuda_env(), "PYTHON": sys.executable}
    py = [sys.executable, "-m"]
    for cmd in ([*py, "bench.gpu", "--help"], [*py, "bench.official", "--help"],
                [str(ROOT / "scripts/gpu-check"), "--help"]):  # fmt: skip
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0 and ("usage" in r.stdout or "scripts/gpu-check [--quick]" in r.stdout), r
        if "bench.official" in cmd:  # its own option is listed (it was parsed by hand, unlisted)
            assert "--official DIR" in r.stdout, r.stdout
    r = subprocess.run([str(ROOT / "scripts/gpu-check"), "--quik"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2 and "unknown argument --quik" in r.stderr
    r = subprocess.run([str(ROOT / "scripts/gpu-check"), "--train"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2 and "--train needs a config" in r.stderr
