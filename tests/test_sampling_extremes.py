"""Issue 16, kind 1: the sampler at numeric extremes, in the torch ops and in the C pass.

Each sampling setting at zero, tiny, denormal, huge, NaN and ±inf either raises ValueError naming the
setting or gives its mathematical limit: a tiny temperature (down to the smallest denormal) gives the
argmax, as temperature 0 does; a huge one the uniform distribution; a tiny top_p the top token; a top_k
beyond the vocabulary nothing filtered; a tiny repetition penalty all the mass on the seen token with
the largest positive logit. Logits with NaN / ±inf (a poisoned state) still give a token of the row.
References are float64 or exact (fractions), independent of the code under test."""

from __future__ import annotations

import math
import sys
from fractions import Fraction

import pytest
import torch
from conftest import devices
from server_support import reference

from model import fused, sampling
from model.sampling import SamplingParams, sample

SMALLEST = sys.float_info.min * sys.float_info.epsilon  # 5e-324, the smallest positive double
TINY_T = [1e-9, 1e-20, 1e-30, 1e-38, 1e-40, 1e-45, 1e-300, 1e-320, SMALLEST]
PATHS = ["c", "torch"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test through the C pass and through the torch ops."""
    if request.param == "c":
        assert fused.library() is not None, "the C sampling pass must build here"
    else:
        monkeypatch.setattr(fused, "library", lambda: None)
    return request.param


def draw(logits, params, seen=None):
    return sample(logits, params, [p.generator() for p in params], seen)


@pytest.mark.parametrize("T", TINY_T)
def test_tiny_and_denormal_temperatures_give_the_argmax(path, T):
    torch.manual_seed(0)
    logits = torch.randn(64, 256) * 3
    logits[1] = logits[1] * 1e-6  # tiny gaps: still the argmax at T ≤ 1e-9
    logits[2] = logits[2] * 1e37  # huge logits: (z − max) / T never overflows to NaN
    params = [SamplingParams(temperature=T, seed=k) for k in range(64)]
    want = logits.double().argmax(-1)
    assert torch.equal(draw(logits, params), want)
    assert torch.equal(draw(logits, [SamplingParams(temperature=0.0)] * 64), want)


@pytest.mark.parametrize("T", [1e30, 1e300, sys.float_info.max])
def test_huge_temperature_is_the_uniform_distribution(path, T):
    V, n = 16, 4000
    logits = torch.linspace(-20, 20, V).expand(n, V).contiguous()  # probabilities 1e-17 … 1 at T = 1
    params = [SamplingParams(temperature=T, seed=k) for k in range(n)]
    counts = torch.bincount(draw(logits, params), minlength=V).double()
    expected, sd = n / V, math.sqrt(n / V * (1 - 1 / V))
    assert (counts - expected).abs().max() < 5 * sd, counts  # uniform: each 250 ± 15 (5 sd: ±75)


def test_generation_at_t_1e_38_is_the_greedy_generation(model_dirs, path):
    prompt = list(b"ROMEO:")
    greedy = reference(model_dirs["text"], prompt, SamplingParams(temperature=0.0), 24)
    for T in (1e-9, 1e-30, 1e-38, 1e-320):
        assert reference(model_dirs["text"], prompt, SamplingParams(temperature=T, seed=1), 24) == greedy
    assert 0 not in greedy  # the fault drew NUL at every step


@pytest.mark.parametrize("top_p", [1e-6, 1e-30, 1e-40, 1e-320])
def test_tiny_top_p_keeps_the_top_token(path, top_p):
    torch.manual_seed(1)
    logits = torch.randn(32, 256)
    params = [SamplingParams(temperature=1.5, top_p=top_p, seed=k) for k in range(32)]
    assert torch.equal(draw(logits, params), logits.argmax(-1))


def test_min_p_1_keeps_only_the_most_likely_tokens(path):
    """min_p = 1 keeps the tokens whose probability is min_p × the largest, i.e. the maxima alone: the
    argmax in a row without a tie, and only the tied maxima (each drawn) in a row with one. (A ≤ in the
    torch ops' comparison dropped every token and drew token V − 1.)"""
    torch.manual_seed(4)
    B, V = 64, 256
    logits = torch.randn(B, V) * 3
    params = [SamplingParams(min_p=1.0, seed=k) for k in range(B)]
    assert torch.equal(draw(logits, params), logits.double().argmax(-1))
    n = 200
    tied = logits[:1].repeat(n, 1)
    top = float(tied[0].max())
    tied[:, [7, 100]] = top  # three maxima: 7, 100 and the row's own argmax
    maxima = set((tied[0] == top).nonzero().flatten().tolist())
    assert len(maxima) == 3
    got = draw(tied, [SamplingParams(min_p=1.0, seed=k) for k in range(n)]).tolist()
    assert set(got) == maxima, sorted(set(got))  # each of 3 equally likely: all drawn in 200 (1 − 3·(2/3)²⁰⁰)


def test_the_temperature_divides_a_float32_overflowing_difference_in_float64(path, monkeypatch):
    """(z − max z) / T with z = ±3e38 and T = 1e38: the difference −6e38 overflows float32 (to −inf, a
    token of probability 0) but not float64, where it is −6 exactly after the division. The draw then
    follows the float64 softmax of (0, −6): token 0 for u below p₀ = 1 / (1 + e⁻⁶), token 1 above (within
    1e-5 of p₀, float32 CDF rounding)."""
    z = torch.tensor([[3e38, -3e38]])
    T = torch.tensor([1e38], dtype=torch.float64)
    assert torch.equal(sampling.scale_logits(z, T), torch.tensor([[0.0, -6.0]]))
    p0 = 1 / (1 + math.exp(-6.0))  # float64 softmax of the scaled logits
    for u, want in [(p0 - 1e-5, 0), (p0 + 1e-5, 1), (0.0, 0), (1 - 2.0**-24, 1)]:
        monkeypatch.setattr(sampling, "uniforms", lambda gens, u=u: torch.full((len(gens),), u))
        assert draw(z, [SamplingParams(temperature=1e38, seed=0)]).tolist() == [want], (u, want)


@pytest.mark.parametrize("top_k", [256, 257, 2**31, 2**63, 2**70])
def test_top_k_at_or_past_the_vocabulary_filters_nothing(path, top_k):
    torch.manual_seed(2)
    logits = torch.randn(32, 256)
    off = [SamplingParams(temperature=1.0, seed=k) for k in range(32)]
    big = [SamplingParams(temperature=1.0, top_k=top_k, seed=k) for k in range(32)]
    assert torch.equal(draw(logits, big), draw(logits, off))


def test_top_p_1_filters_nothing_whatever_the_other_rows_ask(path, monkeypatch):
    """top_p = 1 is off: a row with it draws what it draws alone, whatever filters the other rows of its
    batch ask for, and with a top_k keeps exactly the top k. The torch ops (a GPU's decode batch) filter
    every row once one asks for top-k or top-p, and at top_p = 1 dropped the tail after the float32
    cumulative sum of the sorted probabilities passed 1 (117 of these 4,096 tokens): 3 of the 512
    largest uniforms then drew another token than alone, one request changing another's tokens."""
    torch.manual_seed(0)
    V, n = 4096, 512
    logits = torch.randn(V) * 3
    u = 1 - torch.arange(1, n + 1) * 2.0**-24  # the largest uniforms: where the lost tail's mass lay
    batch_u = torch.cat([torch.tensor([0.5]), u])
    monkeypatch.setattr(sampling, "uniforms", lambda gens: u if len(gens) == n else batch_u)
    plain = SamplingParams(temperature=1.0, seed=2)
    alone = draw(logits.expand(n, V), [plain] * n)
    batched = draw(logits.expand(n + 1, V), [SamplingParams(top_k=50, seed=1)] + [plain] * n)[1:]
    assert torch.equal(batched, alone), (batched != alone).nonzero().flatten().tolist()
    z = (logits - logits.max()).expand(2, V)
    kept = ~torch.isneginf(sampling.filter_logits(z, torch.tensor([0, 1000]), torch.tensor([1.0, 1.0])))
    assert kept.sum(-1).tolist() == [V, 1000]


@pytest.mark.parametrize("p", [1e-3, 1e-30, 1e-38, 1e-40, 1e-45, 1e-320])
def test_tiny_repetition_penalty_gives_its_limit(path, p):
    """CTRL penalty p → 0: a seen token with z > 0 goes to z / p → +∞, so the seen token with the
    largest positive logit takes all the mass (exact reference: fractions); rows with no positive
    seen logit keep their unseen tokens' distribution, the seen ones' z · p → 0⁻."""
    torch.manual_seed(3)
    B, V = 48, 64
    logits = torch.randn(B, V) * 4
    seen = torch.rand(B, V) < 0.3
    logits[0, seen[0]] = -logits[0, seen[0]].abs() - 0.1  # row 0: no positive seen logit
    params = [SamplingParams(temperature=1.0, repetition_penalty=p, seed=k) for k in range(B)]
    out = draw(logits, params, seen)
    for r in range(1, B):
        row = zip(logits[r].tolist(), seen[r].tolist())
        exact = [Fraction(z) / Fraction(p) if s and z > 0 else None for z, s in row]
        cands = [(v, i) for i, v in enumerate(exact) if v is not None]
        if not cands:
            continue
        best = max(cands)
        second = max([v for v, _ in cands if v != best[0]] + [Fraction(float(logits[r].max()))])
        if (best[0] - second) / 1 > 60:  # the runner-up has probability < e^-60 at T = 1
            assert int(out[r]) == best[1], (r, p)
    # row 0: the seen tokens' logits go to ~0⁻, the unseen keep theirs: the draw is any token of the row
    assert 0 <= int(out[0]) < V


def test_a_rows_own_inf_logit_outranks_seen_logits_whose_penalty_overflows(path):
    """A tiny penalty sends a seen z > 0 to z / p past float32 (5 / 1e-40 = 5e40), which is still a finite
    number: a +inf logit of the row's own outranks it and takes all the mass (`apply_repetition_penalty`).
    The overflowed tokens were +inf beside it, and shared the mass: tokens 0 and 6 drawn, and the greedy
    pick was token 0, the first +inf."""
    n, V = 200, 8
    logits = torch.tensor([5.0, 1.0, float("inf"), 0.5, -1.0, 2.0, 3.0, 0.0]).expand(n, V).contiguous()
    seen = torch.zeros(n, V, dtype=torch.bool)
    seen[:, [0, 6]] = True
    for T in (1.0, 0.0):
        params = [SamplingParams(temperature=T, repetition_penalty=1e-40, seed=k) for k in range(n)]
        got = draw(logits, params, seen)
        assert set(got.tolist()) == {2}, (T, torch.bincount(got, minlength=V).tolist())


def test_a_repetition_penalty_past_float32_is_refused_and_one_within_it_keeps_a_seen_zero_logit(path):
    """CTRL's penalty multiplies a seen logit z ≤ 0 by p, and 0 · p = 0 for every finite p. The sampler
    holds p in float32, where a finite 1e39 became inf (SamplingParams took any finite p > 0), and 0 × inf
    a NaN, read as −inf: a seen token whose logit is exactly 0 was never drawn, and a row where it was the
    only finite logit went uniform over every token, the −inf ones included (all 8 drawn in 200, both
    paths). The presence and frequency penalties were bounded to float32's range for the same reason
    (aee2eb0); a repetition penalty past it is now refused naming it. At float32's largest value the seen
    zero logit keeps its 0: the row's only token is always drawn, and beside an unseen −2 it stays ~e²
    times as likely."""
    for p in (1e39, 1e300, sampling.F32_MAX * (1 + 2**-52)):
        with pytest.raises(ValueError, match=r"repetition_penalty must be ≤ 3\.4"):
            SamplingParams(repetition_penalty=p)
    n, V = 400, 8
    logits = torch.full((n, V), float("-inf"))
    logits[:, 3] = 0.0
    seen = torch.zeros(n, V, dtype=torch.bool)
    seen[:, 3] = True
    params = [SamplingParams(repetition_penalty=sampling.F32_MAX, seed=k) for k in range(n)]
    assert set(draw(logits, params, seen).tolist()) == {3}
    logits[:, 5] = -2.0  # unseen: kept as it is
    drawn = torch.bincount(draw(logits, params, seen), minlength=V)
    assert drawn[3] + drawn[5] == n and 0.8 * n < drawn[3] < 0.95 * n, drawn  # e² / (1 + e²) = 0.881


def test_huge_repetition_penalty_matches_a_float64_reference(path):
    torch.manual_seed(4)
    V, n, pen = 8, 4000, 100.0
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5]).expand(n, V).contiguous()
    seen = torch.zeros(n, V, dtype=torch.bool)
    seen[:, [0, 6]] = True
    params = [SamplingParams(temperature=1.0, repetition_penalty=pen, seed=k) for k in range(n)]
    counts = torch.bincount(draw(logits, params, seen), minlength=V).double()
    z = logits[0].double().clone()
    z[0], z[6] = z[0] / pen, z[6] * pen
    want = torch.softmax(z, -1) * n
    sd = (want * (1 - want / n)).sqrt()
    assert ((counts - want).abs() <= 5 * sd + 1).all(), (counts, want)
    assert counts[6] == 0  # exp(-100 − 2) · 4000 ≪ 1


@pytest.mark.parametrize(
    "field, values",
    [
        ("temperature", [float("nan"), float("inf"), float("-inf"), -1e-320, -1.0, "0.5", True, None]),
        ("top_p", [float("nan"), float("inf"), 0.0, -0.0, 1.0000001, 2.0, float("-inf")]),
        ("top_k", [-1, 1.5, float("nan"), float("inf"), True, "3"]),
        ("repetition_penalty", [float("nan"), float("inf"), 0.0, -1.0, float("-inf")]),
        ("seed", [-(2**63) - 1, 2**64, 1.5, float("nan")]),
    ],
)
def test_non_finite_or_out_of_range_settings_raise_naming_the_field(field, values):
    for v in values:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: v})


def test_non_finite_logits_still_give_a_token_of_the_row(path):
    """NaN is never drawn while the row has a number; +inf takes all the mass; a row of nothing but
    NaN / −inf is uniform; the other rows draw exactly what they draw alone."""
    torch.manual_seed(5)
    B, V = 6, 32
    logits = torch.randn(B, V)
    logits[0, ::2] = float("nan")
    logits[1, [3, 17]] = float("inf")
    logits[2] = float("nan")
    logits[3] = float("-inf")
    logits[4, 5] = float("-inf")
    for T in (0.0, 1e-40, 0.7, 1e30):
        params = [SamplingParams(temperature=T, seed=k) for k in range(B)]
        out = draw(logits, params)
        assert out.dtype == torch.long and ((0 <= out) & (out < V)).all()
        assert int(out[0]) % 2 == 1
        assert int(out[1]) in (3, 17) and (T != 0 or int(out[1]) == 3)
        assert int(out[4]) != 5
        alone = draw(logits[5:6], params[5:6])
        assert int(out[5]) == int(alone[0])
    flat = [SamplingParams(temperature=1.0, seed=k) for k in range(4000)]
    uniform = draw(logits[2:4].repeat(2000, 1), flat)
    counts = torch.bincount(uniform, minlength=V).double()
    assert (counts - 4000 / V).abs().max() < 5 * math.sqrt(4000 / V), counts


def test_the_c_pass_and_the_torch_ops_agree_at_the_extremes(monkeypatch):
    torch.manual_seed(6)
    B, V = 40, 256
    logits = torch.randn(B, V) * 3
    logits[::7, ::3] = float("nan")
    logits[1::9, 11] = float("inf")
    logits[2::11] = float("-inf")
    temps = [0.0, 1e-45, 1e-40, 1e-30, 1e-9, 0.5, 1.0, 50.0, 100.0, 1e30]
    params = [SamplingParams(temperature=temps[k % len(temps)], seed=k) for k in range(B)]
    fast = draw(logits, params)
    monkeypatch.setattr(fused, "library", lambda: None)
    assert torch.equal(fast, draw(logits, params))


@pytest.mark.parametrize("device", devices())
def test_the_limits_hold_on_every_device(device):
    """The torch ops on each device present (CUDA where there is one): tiny and denormal temperatures
    give the argmax, NaN is never drawn, +inf takes the mass, a tiny penalty its limit."""
    torch.manual_seed(7)
    B, V = 32, 256
    logits = torch.randn(B, V) * 3
    logits[0, ::2] = float("nan")
    logits[1, 9] = float("inf")
    seen = torch.zeros(B, V, dtype=torch.bool)
    seen[2, [4, 5]] = True
    logits[2, 4], logits[2, 5] = 1.0, 2.0
    x, seen = logits.to(device), seen.to(device)
    sanitized = torch.nan_to_num(logits, nan=float("-inf"))
    for T in (0.0, 1e-40, SMALLEST, 1e-9):
        params = [SamplingParams(temperature=T, top_p=0.9, seed=k) for k in range(B)]
        out = sample(x, params, [p.generator(device) for p in params]).cpu()
        assert torch.equal(out, sanitized.argmax(-1)), T
    params = [SamplingParams(temperature=1.0, repetition_penalty=1e-320, seed=k) for k in range(B)]
    out = sample(x, params, [p.generator(device) for p in params], seen).cpu()
    assert int(out[0]) % 2 == 1 and int(out[1]) == 9 and int(out[2]) == 5


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24], ids=["u=0", "u=1-2^-24"])
@pytest.mark.parametrize(
    "settings", [{}, {"top_k": 50}, {"min_p": 0.05}], ids=["plain", "top_k", "min_p"]
)  # the plain C pass and the full pipeline
def test_the_extreme_uniforms_never_draw_a_zero_probability_token(path, monkeypatch, u, settings):
    """The counter-based streams give u in [0, 1) in steps of 2^-24: u = 0 once per 2^24 draws. The
    inverse CDF then takes the first token whose own probability adds to the CDF, so neither end of
    [0, 1) draws a token of probability 0 (masked at the start, or filtered at the end)."""
    torch.manual_seed(8)
    B, V = 6, 64
    logits = torch.randn(B, V)
    logits[:, :5] = float("-inf")  # leading zero-probability tokens
    logits[:, -5:] = float("-inf")  # trailing ones
    logits[3, :40] = -1e4  # rows whose low tokens are far below the max: probability 0 in float32
    params = [SamplingParams(temperature=t, seed=k, **settings) for k, t in enumerate([1.0, 0.5, 2.0] * 2)]
    monkeypatch.setattr(sampling, "uniforms", lambda gens: torch.full((len(gens),), u))
    got = draw(logits, params)
    probs = torch.softmax(logits / torch.tensor([p.temperature for p in params])[:, None], -1)
    assert bool((probs[torch.arange(B), got] > 0).all()), (got, u)
    first, last = (probs > 0).int().argmax(-1), V - 1 - (probs > 0).int().flip(-1).argmax(-1)
    want = first if u == 0 else last
    if not settings:  # no filter: exactly the first (u = 0) or last (u → 1) token of positive probability
        assert torch.equal(got, want), (got, want)
