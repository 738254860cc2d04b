"""What the CUDA graphs capture never synchronizes with the host, checked on CPU (tests/host_sync.py).

Inside `torch.cuda.graph` capture a host sync raises (cudaErrorStreamCaptureUnsupported: the first GPU run's
every capture failed on one, 2026-12-04) and a shape taken from the data, a host tensor or an unregistered
generator is recorded wrongly. The graphs capture two callables of model/cuda_graphs.py's `BucketedStep`:
`_eager` (the model's `_step_eager` on the bucket's buffers: S4's DPLR step, S4D's diagonal step, with the
Triton kernel or the torch ops, SaShiMi's dense step, an adaptive softmax head; float32 or float16 state)
and `_block_body` (K steps with the sampler's ops, the seen sets and counts, the log-probabilities).
Without CUDA the same class runs them uncaptured (`capture=False`); here every call of either runs under
`no_host_sync`, through the paths a GPU takes (`step`, a resident batch, `decode_block` with every sampling
setting, greedy and sampled rows, stop sequences, limits that end rows mid-block, padded buckets,
log-probabilities). The Triton kernel's launch runs unchecked (Triton's interpreter is numpy on CPU; on a
GPU it is one launch); its Python wrapper is checked. The checker itself is tested on planted syncs, one of
them an `.item()` in the sampler."""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncError, no_host_sync, paused
from numerics import SAMPLING_FILTERS as FILTERS

import model.cuda_graphs as cg
from model import ModelConfig, SequenceModel, build, triton_step
from model.cuda_graphs import BucketedStep, bucket_sizes
from model.sampling import SamplingParams, row_settings, uint64_bits

TINY = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=128, cauchy_backend="torch")
V = TINY["vocab_size"]
MODELS = {  # name → (config, the layers' forms)
    "s4": (dict(TINY, kernel="s4"), {"dplr"}),
    "s4d": (dict(TINY, kernel="s4d"), {"diagonal"}),
    # an adaptive input and softmax (the official WikiText-103 recipe's head, model/adaptive.py)
    "s4d-adaptive": (dict(TINY, kernel="s4d", cutoffs=[16, 40], div_val=2, head_bias=True), {"diagonal"}),
    "sashimi": (dict(TINY, arch="sashimi", n_layers=1, pool=[2, 4]), {"dplr"}),  # widths 16, 32, 64
    "sashimi-s4d": (dict(TINY, arch="sashimi", n_layers=1, pool=[2, 4], kernel="s4d"), {"diagonal"}),
}
# every sampling setting (numerics.SAMPLING_FILTERS), greedy and sampled rows, the odd ones with stop
# sequences (a quarter of the tokens each, and a pair): met early in a block, those rows are stepped again
STOPS = [bytes([t]) for t in range(0, V, 4)] + [bytes([1, 2])]
ROWS = [
    SamplingParams(temperature=t, seed=s, stop=STOPS if s % 2 else [], **FILTERS[s % len(FILTERS)])
    for s, t in enumerate([0.0, 0.7, 1.0, 1.3, 0.0, 0.9, 1.1, 0.8, 1.0])
]  # fmt: skip
LIMITS = [40, 1, 0, 17, 30, 33, 5, 40, 2]  # segments that end rows mid-block; a row with none
LOGPROBS = [-1, 3, 0, 20, -1, 1, 2, -1, 5]
# (the kernel steps diagonal layers; the adaptive head's ops are the same whichever step)
CASES = [(name, triton) for name, (_, forms) in MODELS.items() for triton in (False, True)
         if not triton or ("diagonal" in forms and "adaptive" not in name)]  # fmt: skip
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # (the kernel: compiled there, else interpreted)


@pytest.fixture
def checked(monkeypatch):
    """Every call of what the graphs capture (`BucketedStep._eager`, `_block_body`) run under
    `no_host_sync`; the Triton kernel's launch unchecked (`paused`). Yields a dict counting the checked
    calls by name and the kernel's launches."""
    calls = {"_eager": 0, "_block_body": 0, "kernel": 0}
    for name in ("_eager", "_block_body"):
        real = getattr(BucketedStep, name)

        def run(self, *args, _real=real, _name=name):
            calls[_name] += 1
            with no_host_sync(f"BucketedStep.{_name}") as ops:
                result = _real(self, *args)
            assert ops, f"{_name} ran no op under the check"
            return result

        monkeypatch.setattr(BucketedStep, name, run)
    real_kernel = triton_step._kernel
    real_kernel()  # (imports triton: the wrapper reads triton.cdiv)

    class Launch:  # kernel[grid](...) as Triton's: the launch itself unchecked
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls["kernel"] += 1
                with paused():
                    return real_kernel()[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_step, "_kernel", Launch)
    return calls


def recurrent(name: str, triton: bool, state_dtype: torch.dtype):
    """A tiny model's recurrent form with the torch ops a CUDA device runs (no C step), the Triton kernel
    on or off, its decode batch's state in `state_dtype`."""
    torch.manual_seed(0)
    cfg, forms = MODELS[name]
    net = build(ModelConfig(**cfg)) if "arch" in cfg else SequenceModel(ModelConfig(**cfg))
    rec = net.to_recurrent(device=DEV, fused_step=False, fused_network=False, triton_step=False)
    assert {f.form for f in getattr(rec, "forms", {}).values() or rec.layers} == forms
    if triton:
        rec.use_triton_step(True)
    rec.state_dtype = state_dtype  # (what `use_state_dtype` sets once its check passes: its 512 probe steps
    # are slow in Triton's interpreter, and what is checked here is what the graphs capture, not accuracy)
    return rec


def batch(rec, B: int):
    """B rows after prompts of 9 + row tokens (a SaShiMi's at different pooling phases), in the decode
    batch's state dtype, their pending tokens and seen sets."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (1, 9 + r), generator=g).to(DEV) for r in range(B)]
    state = torch.cat([rec.prefill(p, rec.init_state(1))[1] for p in prompts], rec.batch_dim)
    tok = torch.randint(0, V, (B,), generator=g).to(DEV)
    seen = (torch.rand(B, V, generator=g) < 0.2).to(DEV)
    return state.to(rec.state_dtype).contiguous(), tok, seen


def block(rec, state, tok, seen, K: int, logprobs=None):
    """One `decode_block` of the ROWS' settings and LIMITS (counts on the host, as the engine keeps them)."""
    B = len(ROWS)
    gens = [p.generator() for p in ROWS]
    return rec.decode_block(
        K, state, tok, settings=row_settings(ROWS, V), counts=torch.zeros(B, V),
        key=uint64_bits([g.key for g in gens]), counter=uint64_bits([g.counter for g in gens]),
        limit=torch.tensor(LIMITS), stops=[p.stop for p in ROWS], history=[b""] * B, seen=seen,
        logprobs=logprobs,
    )  # fmt: skip


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize(("name", "triton"), CASES, ids=[f"{n}-{'triton' if t else 'ops'}" for n, t in CASES])
def test_what_the_graphs_capture_never_synchronizes_with_the_host(checked, name, triton, state_dtype):
    """Every captured call of a step (copied in and out; padded: 9 rows in bucket 16, 3 in bucket 4;
    resident, in place) and of decode blocks (every sampling setting, stops met early and stepped again,
    rows ended mid-block, log-probabilities; graphs of 1 … 16 steps back to back) runs with no host sync,
    no data-dependent shape, no host tensor or data and no random op (`no_host_sync`)."""
    rec = recurrent(name, triton, state_dtype)
    rec._graphs = BucketedStep(rec, bucket_sizes(16), capture=False)
    try:
        assert rec.triton_step_active == triton
        state, tok, seen = batch(rec, len(ROWS))
        for n in (len(ROWS), 3):  # buckets 16 and 4, padded
            rec.step(tok[:n], state.narrow(rec.batch_dim, 0, n).clone())
        view = rec.resident_state(state.clone())
        rec.step(tok, view, out=view)
        rec._graphs.release()
        res = block(rec, state, tok, seen, 24)  # (graphs of 16 and 8 steps; rows ending at 1, 2, 5, 17)
        assert res.steps == 24 and rec._graphs.reruns == 1, "no stop met early: the rerun went unchecked"
        block(rec, state, tok, seen, 7, logprobs=torch.tensor(LOGPROBS))
        assert checked["_eager"] >= 3 and checked["_block_body"] >= 6
        assert (checked["kernel"] > 0) == triton
    finally:
        rec._graphs = None


def test_the_check_catches_an_item_planted_in_the_captured_sampler(checked, monkeypatch):
    """An `.item()` added to the sampler the block graphs record: the decode block fails with HostSyncError
    naming the captured call and the op (before it, the same block runs clean)."""
    rec = recurrent("s4d", False, torch.float32)
    rec._graphs = BucketedStep(rec, bucket_sizes(16), capture=False)
    try:
        state, tok, seen = batch(rec, len(ROWS))
        block(rec, state, tok, seen, 4)
        real = cg.sample_with

        def with_item(logits, *args, **kwargs):
            float(logits.max().item())  # a host read of a device value: refused under capture
            return real(logits, *args, **kwargs)

        monkeypatch.setattr(cg, "sample_with", with_item)
        with pytest.raises(HostSyncError, match=r"BucketedStep\._block_body: item"):
            block(rec, state, tok, seen, 4)
    finally:
        rec._graphs = None


def test_the_check_catches_each_kind_of_op_a_capture_refuses():
    """Each kind named in tests/host_sync.py fails inside `no_host_sync`, and the capture-safe ops beside
    them (three-argument where, masked_fill, gather, scatter, factories given a device) do not."""
    x = torch.arange(6.0)
    mask, ones = x > 2, torch.ones(6, dtype=torch.long, device=x.device)
    refused = {
        ".item()": lambda: x.sum().item(),
        "if tensor:": lambda: bool(x[0]),
        "int()": lambda: int(x[1]),
        ".tolist()": x.tolist,
        ".cpu()": x.cpu,
        ".numpy()": x.numpy,
        ".to('cpu')": lambda: x.to("cpu"),
        "torch.nonzero": lambda: torch.nonzero(x),
        "one-argument where": lambda: torch.where(mask),
        "x[mask]": lambda: x[mask],
        "x[mask] = v": lambda: x.clone().index_put_((mask,), torch.zeros((), device=x.device)),
        "masked_select": lambda: x.masked_select(mask),
        "unique": x.unique,
        "repeat_interleave(tensor)": lambda: x.repeat_interleave(ones),
        "bincount": lambda: x.long().bincount(),
        "torch.equal": lambda: torch.equal(x, x),
        "torch.tensor": lambda: torch.tensor([1.0, 2.0]),
        "a factory without device": lambda: torch.zeros(3),
        "multinomial": lambda: torch.multinomial(x + 1, 1),
        "rand": lambda: torch.rand(3, device=x.device),
        "a Generator": lambda: torch.rand(3, device=x.device, generator=torch.Generator()),
    }
    for what, fn in refused.items():
        with pytest.raises(HostSyncError), no_host_sync(what):
            fn()

    def safe(x, mask):
        y = torch.where(mask, x, 0.0).masked_fill(~mask, 1.0)
        at = torch.zeros(1, dtype=torch.long, device=x.device)
        y = y.gather(0, torch.arange(6, device=x.device)).scatter(0, at, 5.0)
        return y + torch.zeros(6, device=x.device) + x.repeat_interleave(2)[::2]

    with no_host_sync("capture-safe ops") as ops:
        y = safe(x, mask)
        with paused():
            y.sum().item()  # (a stand-in's own host work)
    assert len(ops) > 5 and torch.equal(y, safe(x, mask))
