"""The C sampling pass (CPU) draws the same tokens as the torch ops (plain temperature: same arithmetic)."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import fused
from model.network import MAX_SIZE
from model.sampling import SamplingParams, _sample_torch, row_settings, sample


def test_c_sampling_matches_the_torch_ops_draw_for_draw(monkeypatch):
    assert fused.library() is not None
    torch.manual_seed(0)
    B, V, steps = 8, 256, 200
    params = [
        SamplingParams(temperature=t, seed=k) for k, t in enumerate([0.0, 0.3, 0.7, 1.0, 1.0, 1.5, 2.0, 0.9])
    ]
    logits = [torch.randn(B, V) * 3 for _ in range(steps)]

    def run():
        gens = [p.generator() for p in params]
        return torch.stack([sample(x, params, gens) for x in logits])

    fast = run()
    monkeypatch.setattr(fused, "library", lambda: None)  # the torch ops
    ref = run()
    assert fast.dtype == ref.dtype == torch.long
    assert (fast == ref).float().mean() >= 0.999  # a flip needs a draw within float rounding of a CDF step
    assert torch.equal(fast[:, 0], torch.stack(logits).argmax(-1)[:, 0])  # temperature 0: the argmax


def test_top_k_1_and_a_tiny_top_p_give_the_argmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 16)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    tok = sample(logits, [SamplingParams(top_k=1), SamplingParams(top_p=1e-6)], gens)
    assert torch.equal(tok, logits.argmax(-1))


@pytest.mark.parametrize("shape", ["normal", "zipf"])
def test_a_large_vocabulary_is_not_ranked_whole_and_draws_as_the_full_ranking(shape):
    """Past 4,096 tokens (`rank_all_max` in ssm_step.c) the C pass does not rank all V: top-k selects its
    k and sorts those, top-p alone finds its cut by buckets of the logits and sorts only the cut's. The
    same tokens, draw for draw, as the full ranking of every token (rank_all_max raised past V) on
    50,000 tokens: top-p alone, top-k alone and both; logits normal, or of Zipf's law (p ∝ rank^−1.1: a
    heavy tail, the top-p 0.9 cut thousands of tokens down); with ties (rounded to 0.25: the smaller id
    ranks first) and NaN logits (never drawn). Against the torch ops (float32 sums over 50,000 tokens)
    the draws agree but for rounding near a cut."""
    torch.manual_seed(1)
    B, V, steps = 6, 50_000, 40
    params = [
        SamplingParams(top_p=0.9, seed=1), SamplingParams(top_p=0.5, temperature=0.7, seed=2),
        SamplingParams(top_p=0.999, seed=3), SamplingParams(top_k=100, seed=4),
        SamplingParams(top_k=20_000, top_p=0.95, seed=5), SamplingParams(top_p=0.05, temperature=1.3, seed=6),
    ]  # fmt: skip
    if shape == "normal":
        logits = [(torch.randn(B, V) * 2.5 / 0.25).round() * 0.25 for _ in range(steps)]
    else:
        zipf = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))
        logits = [torch.stack([(zipf[torch.randperm(V)] / 0.25).round() * 0.25 for _ in range(B)])
                  for _ in range(steps)]  # fmt: skip
    for x in logits:
        x[:, torch.randint(0, V, (50,))] = float("nan")

    def run():
        gens = [p.generator() for p in params]
        return torch.stack([sample(x, params, gens) for x in logits])

    knob = ctypes.c_long.in_dll(fused.library(), "rank_all_max")
    assert knob.value == 4096
    partial = run()
    knob.value = 1 << 40
    try:
        full = run()
    finally:
        knob.value = 4096
    assert torch.equal(partial, full)
    assert not any(
        torch.isnan(x[r, t]) for x, row in zip(logits, partial, strict=True) for r, t in enumerate(row)
    )
    for r, p in enumerate(params):  # the top-k rows' draws are within their top k
        if p.top_k:
            ranks = [int((x[r] > x[r, t]).sum()) for x, t in zip(logits, partial[:, r], strict=True)]
            assert max(ranks) < p.top_k, (r, max(ranks))
    gens = [p.generator() for p in params]
    ref = torch.stack([_sample_torch(x, params, gens, None, None) for x in logits])
    assert (partial == ref).float().mean() >= 0.95


@pytest.mark.parametrize("shape", ["normal", "zipf"])
@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.9), (0, 0.5), (0, 0.999), (300, 1.0), (3000, 0.95)])
def test_a_large_vocabulary_keeps_the_full_ranking_s_set_at_every_quantile(shape, top_k, top_p):
    """The kept set itself, not a few draws: one row of 8,192 logits (past rank_all_max) drawn at 1,000
    evenly spaced uniforms. Any token kept by one ranking and not the other moves the CDF, and with it
    the draws at the quantiles past it: partial and full ranking must draw the same 1,000 tokens."""
    V, n = 8192, 1000
    g = torch.Generator().manual_seed(2)
    if shape == "normal":
        row = (torch.randn(V, generator=g) * 2.5 / 0.25).round() * 0.25
    else:
        row = (-1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32)))[torch.randperm(V, generator=g)]
    logits = row.expand(n, V).contiguous()
    params = [SamplingParams(top_k=top_k, top_p=top_p)] * n
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    settings = row_settings(params, V)
    lib = fused.library()
    knob = ctypes.c_long.in_dll(lib, "rank_all_max")
    partial = fused.sample_rows_full(lib, logits, settings, None, None, u)
    knob.value = 1 << 40
    try:
        full = fused.sample_rows_full(lib, logits, settings, None, None, u)
    finally:
        knob.value = 4096
    assert torch.equal(partial, full)
    assert len(set(partial.tolist())) >= 20  # (the quantiles reach far into the kept set)


def test_the_largest_vocabulary_samples_in_a_thread_of_8_mib_stack():
    """A model may have 2^22 tokens (network.MAX_SIZE); the plain-temperature sampler's CDF of V floats
    once lived on the stack (16 MiB), so its first draw in a thread of the usual 8 MiB stack (a server's
    engine thread; ulimit -s 8192) died of SIGSEGV. In a subprocess, so a crash fails only this test."""
    V = MAX_SIZE["vocab_size"]
    code = f"""
import threading, torch
from model import fused
from model.sampling import SamplingParams, sample
logits = torch.zeros(2, {V})
logits[0, {V} - 5] = logits[1, 7] = 100.0  # e^-100: every other token's mass is below a uniform's step
threading.stack_size(8 << 20)
out = []
def draw():
    gens = [SamplingParams(temperature=1.0, seed=s).generator() for s in (1, 2)]
    out.append(sample(logits, [SamplingParams(temperature=1.0)] * 2, gens).tolist())
    temp = torch.ones(2, dtype=torch.float64)
    out.append(fused.sample_rows(fused.library(), logits, temp, torch.tensor([0.5, 0.999])).tolist())
t = threading.Thread(target=draw)
t.start()
t.join()
print(out)
"""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-c", code]
    run = subprocess.run(cmd, check=False, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[-2] == str([[V - 5, 7], [V - 5, 7]])
