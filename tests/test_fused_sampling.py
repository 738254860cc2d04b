"""The C sampling pass (CPU) draws the same tokens as the torch ops (plain temperature: same arithmetic)."""

import ctypes

import torch

from model import fused
from model.sampling import SamplingParams, _sample_torch, sample


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


def test_a_large_vocabulary_ranks_only_its_top_candidates_and_draws_as_the_full_ranking():
    """Past 4,096 tokens (`rank_all_max` in ssm_step.c) the C pass ranks only the top k, or sorted
    prefixes of the ranking until top_p's cut falls inside one (select_top), not all V: the same tokens,
    draw for draw, as the full ranking of every token (rank_all_max raised past V) on 50,000 tokens, top-p
    alone, top-k alone and both, with ties (logits rounded to 0.25: the smaller id ranks first). Against
    the torch ops (float32 sums over 50,000 tokens) the draws agree but for rounding near a cut."""
    torch.manual_seed(1)
    B, V, steps = 6, 50_000, 40
    params = [
        SamplingParams(top_p=0.9, seed=1), SamplingParams(top_p=0.5, temperature=0.7, seed=2),
        SamplingParams(top_p=0.999, seed=3), SamplingParams(top_k=100, seed=4),
        SamplingParams(top_k=20_000, top_p=0.95, seed=5), SamplingParams(top_p=0.05, temperature=1.3, seed=6),
    ]  # fmt: skip
    logits = [(torch.randn(B, V) * 2.5 / 0.25).round() * 0.25 for _ in range(steps)]

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
    for r, p in enumerate(params):  # the top-k rows' draws are within their top k
        if p.top_k:
            ranks = [int((x[r] > x[r, t]).sum()) for x, t in zip(logits, partial[:, r], strict=True)]
            assert max(ranks) < p.top_k, (r, max(ranks))
    gens = [p.generator() for p in params]
    ref = torch.stack([_sample_torch(x, params, gens, None, None) for x in logits])
    assert (partial == ref).float().mean() >= 0.95
