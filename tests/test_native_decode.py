"""The native decode block (model/csrc/ssm_step.c `net_block`, RecurrentModel.decode_block; and
`sashimi_block`, SaShiMiRecurrent.decode_block): K steps with sampling and stop checks in one C call
give exactly (bit for bit) the tokens, states and seen sets of stepping each row alone with the model's
`step` and `model.sampling.sample`; its counter-based
streams (Philox4x32-10) match the Random123 known answers and the Python implementation; the C
sampler draws from the same distribution as the torch sampler."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import platform
import threading

import pytest
import torch
from numerics import SAMPLING_FILTERS as FILTERS
from numerics import block_row_logprobs, same_top_logprobs, scramble_transposed_lns

from model import ModelConfig, SequenceModel, build, fused
from model.sampling import (
    CounterRNG,
    SamplingParams,
    find_stop,
    philox4x32_10,
    philox_uniform,
    philox_uniforms_torch,
    row_settings,
    sample,
    token_logprobs,
    uint64_bits,
    uniforms,
)

SMALL = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=128, cauchy_backend="torch")
V = SMALL["vocab_size"]

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key) -> output
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


# s4-tln: isotropic with the official scalar TransposedLN as block and final norm (transposed imports)
MODELS = [
    "s4",
    "s4d",
    "s4-tln",
    "sashimi",
    "sashimi-tln",
    "sashimi-unet",
    "sashimi-bfloat16",
    "s4-bfloat16",
    "s4d-float16",
    "s4-adaptive",
]


@pytest.fixture(scope="module", params=MODELS)
def rec(request):
    torch.manual_seed(0)
    if request.param.startswith("sashimi"):  # pools [4, 4]: rows at every phase, blocks across periods
        norm = "tln" if request.param == "sashimi-tln" else "layer"  # tln: the official SaShiMi's norm
        unet = request.param == "sashimi-unet"  # down blocks and U-Net skips (2 (S4, FF) pairs per level)
        net = build(ModelConfig(**SMALL, arch="sashimi", pool=[4, 4], norm=norm, unet=unet))
        assert bool(scramble_transposed_lns(net)) == (norm == "tln")
        rec = net.to_recurrent(dtype=torch.bfloat16 if request.param.endswith("bfloat16") else None)
    elif request.param == "s4-adaptive":  # the adaptive input and softmax (the WikiText-103 recipe's), in C
        adaptive = {"cutoffs": [10, 30], "div_val": 2, "tie_projs": [False, True, True], "head_bias": True}
        cfg = ModelConfig(**SMALL, **adaptive, tie_embeddings=True)
        net = SequenceModel(cfg)
        with torch.no_grad():  # the head's zero-initialized cluster entries drawn too
            net.head.cluster_weight.normal_(0.0, 0.5)
            net.head.cluster_bias.normal_(0.0, 0.5)
        rec = net.to_recurrent()
        assert rec._net_step.adaptive is not None
    elif request.param == "s4-tln":
        net = SequenceModel(ModelConfig(**SMALL, norm="tln", d_ff=32))
        assert scramble_transposed_lns(net) == 2 * SMALL["n_layers"] + 1  # S4, FF blocks and final norm
        rec = net.to_recurrent()
    else:  # 16-bit weights: the same C step, their linear weights widened as they are read
        kernel, _, dtype = request.param.partition("-")
        net = SequenceModel(ModelConfig(**SMALL, kernel=kernel))
        rec = net.to_recurrent(dtype=getattr(torch, dtype) if dtype else None)
    assert rec.decode_block_ready(1) and fused.library() is not None
    return rec


def rows(rec, state: torch.Tensor, idx) -> torch.Tensor:
    """The rows idx (a slice or a list) of a batch of states, along the model's batch dim."""
    return state[(slice(None),) * rec.batch_dim + (idx,)]


def test_philox_matches_the_random123_known_answers_in_python_and_in_c():
    lib = fused.library()
    ctr = torch.tensor([list(c) for c, _, _ in PHILOX_KAT], dtype=torch.int64).to(torch.int32)
    key = torch.tensor([list(k) for _, k, _ in PHILOX_KAT], dtype=torch.int64).to(torch.int32)
    out = torch.zeros(len(PHILOX_KAT), 4, dtype=torch.int32)
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (ctr, key, out)]
    lib.philox_blocks(ctypes.c_long(len(PHILOX_KAT)), *ptrs)
    for i, (c, k, want) in enumerate(PHILOX_KAT):
        assert philox4x32_10(c, k) == want
        assert tuple(v & 0xFFFFFFFF for v in out[i].tolist()) == want


def test_c_and_python_uniforms_agree_exactly_and_look_uniform():
    g = torch.Generator().manual_seed(0)
    keys = [int(k) for k in torch.randint(0, 2**62, (200,), generator=g)] + [0, 2**64 - 1, 2**63]
    counters = [int(c) for c in torch.randint(0, 2**40, (200,), generator=g)] + [0, 2**64 - 2, 2**32]
    gens = [CounterRNG(k, c) for k, c in zip(keys, counters)]
    c_side = uniforms(gens).tolist()  # one C call
    assert [gg.counter for gg in gens] == [c + 1 for c in counters]
    assert c_side == [philox_uniform(k, c) for k, c in zip(keys, counters)]
    stream = [philox_uniform(12345, n) for n in range(20000)]
    assert all(0.0 <= u < 1.0 for u in stream)
    assert abs(sum(stream) / len(stream) - 0.5) < 4 * math.sqrt(1 / 12 / len(stream))  # mean within 4 sigma
    counts = torch.histc(torch.tensor(stream), bins=10, min=0, max=1)
    chi2 = float(((counts - 2000) ** 2 / 2000).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def _prefilled(rec, B: int, seed: int):
    """B rows at different points of their sequences: prompts of different lengths prefilled."""
    g = torch.Generator().manual_seed(seed)
    state = rec.init_state(B)
    tok = torch.zeros(B, dtype=torch.long)
    for r in range(B):
        prompt = torch.randint(0, V, (1, 3 + 5 * r), generator=g)
        _, x = rec.prefill(prompt[:, :-1], rec.init_state(1))
        rows(rec, state, slice(r, r + 1)).copy_(x)
        tok[r] = prompt[0, -1]
    return state.contiguous(), tok


def _one_step(rec, state, tok, params, limits, seen, asked=None):
    """The reference: each row stepped and sampled alone (`step` + `sample`, its own CounterRNG, its
    seen set and generated-token counts as the engine keeps them), stopping at its limit or a stop
    sequence. Returns per row (tokens, state, seen row, log-probabilities: with `asked` (per row −1 or
    k), `token_logprobs` of each token for the rows that ask)."""
    out = []
    for r, p in enumerate(params):
        x, t, gen = rows(rec, state, slice(r, r + 1)).clone(), tok[r : r + 1].clone(), p.generator()
        s, counts, toks, lps = seen[r : r + 1].clone(), torch.zeros(1, V), [], []
        while len(toks) < limits[r]:
            logits, x = rec.step(t, x)
            t = sample(logits, [p], [gen], s, counts if p.counts_output else None)
            if asked is not None and asked[r] >= 0:
                chosen, top_i, top_v = token_logprobs(logits, t, asked[r])
                lps.append((chosen[0], top_i[0], top_v[0]))
            toks.append(int(t))
            s[0, t] = True
            counts[0, t] += 1
            if p.stop and find_stop(bytes(v & 0xFF for v in toks), p.stop, 1) is not None:
                break
        out.append((toks, x, s, lps))
    return out


def _block(rec, state, tok, params, limits, seen, K, schedule=None, asked=None, logprobs=None):
    """The block path, run in blocks of K steps until every row is done (as the engine does), in the
    order `schedule` (fused.decode_block; None: the default); with `asked` (per row −1 or k) the rows'
    log-probabilities of each token appended to `logprobs` (a list per row, as `_one_step`'s)."""
    state, tok, seen = state.clone(), tok.clone(), seen.clone()
    gens = [p.generator() for p in params]
    toks = [[] for _ in params]
    stopped = [False] * len(params)
    settings = row_settings(params, V)
    counts = torch.zeros(len(params), V)
    while True:
        left = [0 if stopped[r] else limits[r] - len(toks[r]) for r in range(len(params))]
        if not any(left):
            break
        res = rec.decode_block(
            K, state, tok, settings=settings, counts=counts, key=uint64_bits([g.key for g in gens]),
            counter=uint64_bits([g.counter for g in gens]), limit=torch.tensor(left),
            stops=[p.stop for p in params], history=[bytes(v & 0xFF for v in t) for t in toks], seen=seen,
            schedule=schedule, logprobs=None if asked is None else torch.tensor(asked),
        )  # fmt: skip
        assert 1 <= res.steps <= K and res.times.shape == (res.steps,)
        assert bool((res.times[1:] >= res.times[:-1]).all())
        assert (res.logprobs is None) == (asked is None or max(asked) < 0)
        for r, n in enumerate(res.n_out.tolist()):
            if res.logprobs is not None and asked[r] >= 0:
                logprobs[r] += block_row_logprobs(res, r, asked[r])
            toks[r] += res.tokens[:n, r].tolist()
            gens[r].counter += n
            stopped[r] |= bool(res.stopped[r])
    for r, t in enumerate(toks):  # the block's counts are the row's generated tokens (when counted)
        if settings.counted:
            assert torch.equal(
                counts[r], torch.bincount(torch.tensor(t, dtype=torch.long), minlength=V).float()
            )
    return toks, state, seen, stopped


PARAMS = [
    SamplingParams(temperature=t, seed=s, **FILTERS[s % len(FILTERS)])
    for s, t in enumerate([0.0, 0.7, 1.0, 1.3, 0.0, 0.9] * 2)
]


# decode block orders (group_rows, group_steps): every step all rows (the order before), the default,
# and groups of 2 rows through rounds of 3 steps (12 rows = 6 a thread: 3 groups)
SCHEDULES = [(0, 1), None, (2, 3)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("K", [1, 7, 32])
def test_the_block_gives_the_one_step_paths_tokens_states_and_seen_sets_bit_for_bit(rec, K, schedule):
    B = len(PARAMS)  # >= 8 rows: the C block's threaded path
    state, tok = _prefilled(rec, B, seed=1)
    seen = torch.rand(B, V, generator=torch.Generator().manual_seed(1)) < 0.2  # the prompts' tokens
    limits = [40, 1, 0, 17, 40, 33, 5, 40, 40, 2, 39, 40]  # 0: a hole (never steps)
    ref = _one_step(rec, state, tok, PARAMS, limits, seen)
    toks, new_state, new_seen, _ = _block(rec, state, tok, PARAMS, limits, seen, K, schedule)
    for r in range(B):
        assert toks[r] == ref[r][0], f"row {r}"
        assert len(toks[r]) == limits[r]
        assert torch.equal(rows(rec, new_state, slice(r, r + 1)), ref[r][1]), f"row {r}: state"
        assert torch.equal(new_seen[r : r + 1], ref[r][2])
    assert torch.equal(rows(rec, new_state, 2), rows(rec, state, 2))  # the hole's state is untouched
    # row 0 is greedy with no filter: its tokens are the argmax chain of the steps' logits, no sampler in
    # it (the check here before, each greedy row's tokens forming a nonempty set, could not fail)
    assert PARAMS[0].temperature == 0 and PARAMS[0].plain(V) and limits[0] > 1
    x, t, chain = rows(rec, state, slice(0, 1)).clone(), tok[:1].clone(), []
    for _ in range(limits[0]):
        logits, x = rec.step(t, x)
        t = logits.float().argmax(-1)
        chain.append(int(t))
    assert toks[0] == chain


@pytest.mark.parametrize("schedule", [(0, 1), None])
def test_the_block_reports_each_tokens_log_probabilities_as_the_one_step_path(rec, schedule):
    """Rows that ask for log-probabilities (k = 0, 3, 5 and 20 most likely; the others none) get, for
    each token of the block, the log_softmax of the raw logits at it and the k most likely, as
    `token_logprobs` gives the one-step path: on the CPU the same bits, ties in the same order (it runs the
    block's own C computation: a word-level model's rows with stop sequences step one at a time and take
    their batch with them, and their log-probabilities moved in the last bit, a trial found); and the same
    tokens and states as without the request. (torch's log_softmax, the path elsewhere, agrees within
    float32 rounding: `same_top_logprobs`, 2e-6.)"""
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=4)
    seen = torch.rand(B, V, generator=torch.Generator().manual_seed(4)) < 0.2
    limits = [20, 3, 0, 20, 11, 20, 5, 20, 20, 2, 19, 20]
    asked = [3, -1, 5, 20, -1, 0, 5, -1, 3, 20, -1, 1]
    ref = _one_step(rec, state, tok, PARAMS, limits, seen, asked)
    got = [[] for _ in PARAMS]
    toks, new_state, _, _ = _block(rec, state, tok, PARAMS, limits, seen, 7, schedule, asked, got)
    plain_toks, plain_state, _, _ = _block(rec, state, tok, PARAMS, limits, seen, 7, schedule)
    assert toks == plain_toks and torch.equal(new_state, plain_state)
    for r in range(B):
        assert toks[r] == ref[r][0], f"row {r}"
        assert len(got[r]) == (limits[r] if asked[r] >= 0 else 0), f"row {r}"
        for (c, ti, tv), (rc, rti, rtv) in zip(got[r], ref[r][3]):
            assert len(ti) == min(asked[r], V) and (ti, tv, c) == (rti, rtv, rc), f"row {r}"
            assert c <= 0 and tv == sorted(tv, reverse=True), f"row {r}"
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(9))
    tokens = torch.arange(6)
    with torch.no_grad():
        lp = logits.log_softmax(-1)
        tv, ti = lp.topk(5, dim=-1)
    chosen, c_ids, c_vals = token_logprobs(logits, tokens, 5)
    for r in range(6):
        assert same_top_logprobs(c_ids[r], c_vals[r], ti[r].tolist(), tv[r].tolist(), 2e-6)
        assert abs(chosen[r] - float(lp[r, r])) <= 2e-6


def test_top_logprobs_agree_up_to_the_order_of_ties_only():
    ids, vals = [4, 2, 9], [-1.0, -2.0, -2.0]
    assert same_top_logprobs(ids, vals, [4, 2, 9], vals, 1e-6)
    assert same_top_logprobs([4, 9, 2], vals, ids, vals, 1e-6)  # a tie in the other order
    assert same_top_logprobs([4, 2, 7], vals, ids, vals, 1e-6)  # 7 ties with the k-th place
    assert not same_top_logprobs([2, 4, 9], vals, ids, vals, 1e-6)  # no tie: another order
    assert not same_top_logprobs([4, 2, 2], vals, ids, vals, 1e-6)  # an id twice
    assert not same_top_logprobs(ids, [-1.0, -2.0, -2.1], ids, vals, 1e-6)  # a value off
    assert not same_top_logprobs([4, 7, 9], [-1.0, -2.0, -2.5], ids, [-1.0, -2.0, -2.5], 1e-6)
    assert not same_top_logprobs(ids[:2], vals[:2], ids, vals, 1e-6)


def test_the_block_ranks_tied_and_nan_logits_as_torch_topk_does_with_ids_distinct():
    """A model whose logits are its head's bias (head weights 0): tied logits rank the smaller id first;
    a NaN logit ranks above every number (torch.topk's order), its log-probabilities NaN; the ids are
    always distinct; k = 0 gives the chosen token's alone and k > V all V."""
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**{**SMALL, "head_bias": True}))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(1.0)
        net.head.bias[[9, 5, 3]] = 2.0
    rec = net.to_recurrent()
    args = dict(settings=row_settings([SamplingParams(seed=1)] * 3, V), counts=None,
                key=uint64_bits([1, 2, 3]), counter=uint64_bits([0, 0, 0]), limit=torch.tensor([2, 2, 2]),
                stops=[[]] * 3, history=[b""] * 3)  # fmt: skip
    state, tok = rec.init_state(3).contiguous(), torch.zeros(3, dtype=torch.long)
    res = rec.decode_block(2, state, tok, seen=torch.zeros(3, V, dtype=torch.bool),
                           logprobs=torch.tensor([5, 0, 2 * V]), **args)  # fmt: skip
    chosen, ids, vals = res.logprobs
    lse = torch.logsumexp(net.head.bias.detach().double(), 0)
    assert ids.shape == (2, 3, V) and ids[:, 0, :5].tolist() == [[3, 5, 9, 0, 1]] * 2
    assert torch.allclose(vals[:, 0, :5].double(), net.head.bias.detach().double()[ids[:, 0, :5]] - lse)
    assert torch.allclose(chosen.double(), net.head.bias.detach().double()[res.tokens] - lse)
    assert sorted(ids[0, 2].tolist()) == list(range(V)) and ids[0, 2, :3].tolist() == [3, 5, 9]
    with torch.no_grad():  # the bias the C step reads in place, after conversion: a NaN logit, which no
        rec.net.head.bias[7] = float("nan")  # verified model makes
    res = rec.decode_block(2, state, tok, seen=torch.zeros(3, V, dtype=torch.bool),
                           logprobs=torch.tensor([5, 0, 2 * V]), **args)  # fmt: skip
    chosen, ids, vals = res.logprobs
    assert ids[:, 0, :4].tolist() == [[7, 3, 5, 9]] * 2 and bool(vals[:, 0, :5].isnan().all())
    assert sorted(ids[0, 2].tolist()) == list(range(V)) and bool(chosen.isnan().all())


def test_step_times_never_run_backwards_when_a_threads_last_group_stops_mid_round(rec):
    """Groups of 2 rows through rounds of 3 steps (12 rows: 6 a thread on 2 threads, 12 on one): each
    thread's last group stops after the round's first step, so that step's latest stamp is that group's
    while the next step's is an earlier group's. `times` is still non-decreasing (step k is done no
    earlier than step k − 1; `_block` asserts it), which the engine's ITL metrics rely on; the tokens are
    the one-step loop's."""
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=4)
    seen = torch.zeros(B, V, dtype=torch.bool)
    limits = [1 if r in (4, 5, 10, 11) else 9 for r in range(B)]
    ref = _one_step(rec, state, tok, PARAMS, limits, seen)
    toks, _, _, _ = _block(rec, state, tok, PARAMS, limits, seen, K=3, schedule=(2, 3))
    assert toks == [r[0] for r in ref]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rows_stopping_mid_block_are_exact_and_leave_the_other_rows_bit_identical(rec, schedule):
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=2)
    seen = torch.zeros(B, V, dtype=torch.bool)
    limits = [48] * B
    free, _, _, _ = _block(rec, state, tok, PARAMS, limits, seen, K=48)
    # stop sequences taken from what rows 1, 3 and 5 generate (one spans two tokens, one three), so
    # they end mid-block; the two-token one also crosses a block boundary at K = 8
    stops = {1: [bytes(v & 0xFF for v in free[1][9:11])], 3: [bytes([free[3][30] & 0xFF])],
             5: [b"\xff\xfe\xfd", bytes(v & 0xFF for v in free[5][5:8])]}  # fmt: skip
    params = [dataclasses.replace(p, stop=stops.get(r, [])) for r, p in enumerate(PARAMS)]
    ref = _one_step(rec, state, tok, params, limits, seen)
    for K in (8, 48):
        toks, new_state, new_seen, stopped = _block(rec, state, tok, params, limits, seen, K, schedule)
        for r in range(B):
            assert toks[r] == ref[r][0], f"K={K} row {r}"
            assert torch.equal(rows(rec, new_state, slice(r, r + 1)), ref[r][1]), f"K={K} row {r}: state"
            assert torch.equal(new_seen[r : r + 1], ref[r][2])
            if r in stops:
                assert stopped[r] and len(toks[r]) < 48 and toks[r] == free[r][: len(toks[r])]
            else:
                assert not stopped[r] and toks[r] == free[r]  # unchanged by the rows that stopped


@pytest.mark.parametrize("K", [5, 8])
def test_a_long_stop_begun_in_an_earlier_block_ends_the_row_at_the_token_that_completes_it(rec, K):
    """A row's output so far reaches the block as its history, of which the C check keeps the last
    longest-stop − 1 bytes. A history shorter than that, but longer than half of it, kept only its last
    (longest − 1 − length) bytes (a negative slice start), so a stop that had begun in an earlier block was
    missed and the row stepped on past it (the server: a stop of 40 'a's on a run of 'a's ended after 46 to
    77 tokens, its text cut at the stop but its tokens, usage and session holding the rest). Stops that begin
    at each row's first token, of lengths a block boundary falls inside, end the row at their last token."""
    B = 4
    state, tok = _prefilled(rec, B, seed=3)
    seen = torch.zeros(B, V, dtype=torch.bool)
    params = [SamplingParams(temperature=t, seed=10 + r) for r, t in enumerate([0.0, 0.8, 1.0, 1.2])]
    free, _, _, _ = _block(rec, state, tok, params, [64] * B, seen, K=64)
    for L in (12, 33, 64):  # (keep 11: a history of 8 kept 3 bytes; 32: 17-31 kept 1-15; 63)
        stopping = [
            dataclasses.replace(p, stop=[bytes(v & 0xFF for v in free[r][:L])]) for r, p in enumerate(params)
        ]
        toks, _, _, stopped = _block(rec, state, tok, stopping, [64] * B, seen, K)
        for r in range(B):
            assert stopped[r] and toks[r] == free[r][:L], f"L={L} row {r}: {len(toks[r])} tokens"


@pytest.fixture(scope="module", params=["s4d", "sashimi"])
def rec20(request):
    """d_state 40: 20 modes a channel, two vectors of 8 and a scalar tail of 4 in the diagonal step."""
    torch.manual_seed(0)
    kw = {**SMALL, "d_state": 40}
    if request.param == "sashimi":
        return build(ModelConfig(**kw, arch="sashimi", pool=[4, 4], kernel="s4d")).to_recurrent()
    return SequenceModel(ModelConfig(**kw, kernel="s4d")).to_recurrent()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rows_stepped_eight_at_a_time_give_each_rows_bits_alone(rec20, schedule):
    """20 rows, 10 a thread: the C step takes a diagonal layer's rows 8 at a time through its SSM step
    (one load of a channel's parameters for the 8 rows), and the linear layers in tiles of 8 rows, then
    4, then rows alone; each row's tokens and state are still those of the row stepped alone."""
    rec = rec20
    assert {(r["form"], r["modes"]) for r in rec.report} == {("diagonal", 20)}
    params = [dataclasses.replace(PARAMS[r % len(PARAMS)], seed=100 + r) for r in range(20)]
    B = len(params)
    state, tok = _prefilled(rec, B, seed=5)
    seen = torch.zeros(B, V, dtype=torch.bool)
    limits = [12] * B
    ref = _one_step(rec, state, tok, params, limits, seen)
    toks, new_state, _, _ = _block(rec, state, tok, params, limits, seen, 12, schedule)
    for r in range(B):
        assert toks[r] == ref[r][0], f"row {r}"
        assert torch.equal(rows(rec, new_state, slice(r, r + 1)), ref[r][1]), f"row {r}: state"


def test_a_seed_gives_the_same_tokens_and_state_alone_and_in_any_batch(rec):
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=3)
    seen = torch.zeros(B, V, dtype=torch.bool)
    together, st, _, _ = _block(rec, state, tok, PARAMS, [30] * B, seen, K=16)
    order = list(reversed(range(B)))  # another batch order, and each row alone
    flipped, sf, _, _ = _block(rec, rows(rec, state, order).contiguous(), tok[order],
                               [PARAMS[i] for i in order], [30] * B, seen, K=5)  # fmt: skip
    for r in (1, 3, 5):
        one = rows(rec, state, slice(r, r + 1)).contiguous()
        alone, sa, _, _ = _block(rec, one, tok[r : r + 1], [PARAMS[r]], [30], seen[:1], K=16)
        assert alone[0] == together[r] == flipped[order.index(r)]
        assert torch.equal(rows(rec, sa, 0), rows(rec, st, r))
        assert torch.equal(rows(rec, sf, order.index(r)), rows(rec, st, r))


@pytest.mark.parametrize(("schedule", "steps"), [((0, 1), 1), ((2, 3), 3), ((2, 9), 9), ((100, 4), 1)])
def test_an_interrupt_ends_the_block_after_one_round_with_every_row_exact(rec, schedule, steps):
    """A flag set before the call: the block makes its first round only, one step when a thread's rows
    form one group (at most group_rows of them), else group_steps steps (12 rows: 6 a thread), and
    every row has exactly the uninterrupted rows' first tokens and that point's state."""
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=4)
    seen = torch.zeros(B, V, dtype=torch.bool)
    ref = _one_step(rec, state, tok, PARAMS, [steps] * B, seen)
    gens = [p.generator() for p in PARAMS]
    res = rec.decode_block(
        16, state, tok, settings=row_settings(PARAMS, V), counts=torch.zeros(B, V),
        key=uint64_bits([g.key for g in gens]), counter=uint64_bits([g.counter for g in gens]),
        limit=torch.full((B,), 40), stops=[[]] * B, history=[b""] * B, seen=seen,
        interrupt=ctypes.c_int(1), schedule=schedule,
    )  # fmt: skip
    assert res.steps == steps and res.n_out.tolist() == [steps] * B
    for r in range(B):
        assert res.tokens[:, r].tolist() == ref[r][0], f"row {r}"
        assert torch.equal(rows(rec, state, slice(r, r + 1)), ref[r][1]), f"row {r}: state"


@pytest.fixture
def sharing():
    """The threaded block's work sharing (process-wide: fused.decode_block_state) and the thread count,
    restored after the test; yields the library."""
    lib, threads = fused.library(), torch.get_num_threads()
    before = fused.decode_block_state(lib)[1]
    yield lib
    fused.decode_block_state(lib, delay_s=0.0, share=before)
    torch.set_num_threads(threads)


LIMITS = [40, 1, 0, 17, 40, 33, 5, 40, 40, 2, 39, 40]  # 0: a hole (never steps)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_descheduled_threads_rows_are_taken_over_with_the_same_tokens_and_states(rec, sharing, threads):
    """The threaded block's first thread to start sleeps 50 ms in its first round, holding its group, as a
    descheduled thread would: the other threads take the rest of the groups (its own included) through
    their rounds (rounds are taken over), and every row's tokens, state and seen set are still the one-step
    loop's. With sharing off (each thread keeps its share of the rows: the order before) nothing is taken
    over and the results are the same."""
    torch.set_num_threads(threads)
    B = len(PARAMS)  # groups of 2 rows through rounds of 3 steps: 6 rows (3 groups) a thread at 2 threads
    state, tok = _prefilled(rec, B, seed=6)
    seen = torch.rand(B, V, generator=torch.Generator().manual_seed(6)) < 0.2
    ref = _one_step(rec, state, tok, PARAMS, LIMITS, seen)
    for share in (True, False):
        fused.decode_block_state(sharing, share=share)
        before = fused.decode_block_state(sharing, delay_s=0.05)[0]
        toks, new_state, new_seen, _ = _block(rec, state, tok, PARAMS, LIMITS, seen, K=40, schedule=(2, 3))
        taken = fused.decode_block_state(sharing)[0] - before
        assert (taken > 0) == share, (share, taken)
        for r in range(B):
            assert toks[r] == ref[r][0], f"share={share} row {r}"
            assert torch.equal(rows(rec, new_state, slice(r, r + 1)), ref[r][1]), f"share={share} row {r}"
            assert torch.equal(new_seen[r : r + 1], ref[r][2])


def test_an_interrupt_mid_block_ends_each_group_after_its_round_with_every_row_exact(rec, sharing):
    """The flag set 10 ms into a block whose first thread sleeps 100 ms holding a group: each group ends after
    the round it is in (the sleeping thread's after its first), so rows end at different steps, each at a
    round's end (3 steps) unless its limit came first, and each row's tokens and state are the one-step
    loop's for as many tokens as it made."""
    torch.set_num_threads(2)
    fused.decode_block_state(sharing, share=True)
    B = len(PARAMS)
    state, tok = _prefilled(rec, B, seed=7)
    seen = torch.zeros(B, V, dtype=torch.bool)
    gens = [p.generator() for p in PARAMS]
    flag = ctypes.c_int(0)
    setter = threading.Timer(0.01, lambda: setattr(flag, "value", 1))
    x = state.clone()
    fused.decode_block_state(sharing, delay_s=0.1)
    setter.start()
    res = rec.decode_block(
        40, x, tok.clone(), settings=row_settings(PARAMS, V), counts=torch.zeros(B, V),
        key=uint64_bits([g.key for g in gens]), counter=uint64_bits([g.counter for g in gens]),
        limit=torch.tensor(LIMITS), stops=[[]] * B, history=[b""] * B, seen=seen.clone(), interrupt=flag,
        schedule=(2, 3),
    )  # fmt: skip
    setter.join()
    made = res.n_out.tolist()
    assert all(n == lim or (n > 0 and n % 3 == 0) for n, lim in zip(made, LIMITS) if lim), made
    assert any(n < lim for n, lim in zip(made, LIMITS)), made  # (at least the sleeping thread's group)
    ref = _one_step(rec, state, tok, PARAMS, made, seen)
    for r in range(B):
        assert res.tokens[: made[r], r].tolist() == ref[r][0], f"row {r}"
        assert torch.equal(rows(rec, x, slice(r, r + 1)), ref[r][1]), f"row {r}: state"


@pytest.mark.parametrize("schedule", [(-1, 1), (8, 0)])
def test_a_bad_schedule_is_refused_by_name(rec, schedule):
    B = 2
    state, tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
    params = [SamplingParams(seed=r) for r in range(B)]
    with pytest.raises(ValueError, match="schedule"):
        rec.decode_block(
            4, state, tok, settings=row_settings(params, V), counts=None, key=uint64_bits([1, 2]),
            counter=uint64_bits([0, 0]), limit=torch.full((B,), 4), stops=[[]] * B, history=[b""] * B,
            seen=torch.zeros(B, V, dtype=torch.bool), schedule=schedule,
        )  # fmt: skip


def _chi2_against(probs: torch.Tensor, counts: torch.Tensor) -> tuple[float, int]:
    """Pearson's chi-square of counts against probabilities, bins with expectation < 5 pooled."""
    n = float(counts.sum())
    expected = probs.double() * n
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum()[None]])
    c = torch.cat([counts.double()[big], counts.double()[~big].sum()[None]])
    keep = e > 0
    return float(((c[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def test_the_c_sampler_and_the_torch_sampler_draw_the_same_distribution(monkeypatch):
    """20,000 draws of one row at T = 0.8 by each path (its own uniforms) against the exact float64
    softmax: both chi-square statistics below the p = 0.001 critical value; and at T -> 0 both give
    the argmax."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 32, generator=g) * 2
    p = SamplingParams(temperature=0.8)
    exact = (logits[0].double() / 0.8).softmax(-1)
    N = 20000
    draws = {}
    for path in ("c", "torch"):
        if path == "torch":
            monkeypatch.setattr(fused, "library", lambda: None)
        gen = CounterRNG(7 if path == "c" else 8)
        toks = torch.cat([sample(logits.repeat(500, 1), [p] * 500, [gen] * 500) for _ in range(N // 500)])
        draws[path] = torch.bincount(toks, minlength=32)
        chi2, dof = _chi2_against(exact, draws[path])
        # the chi-square p = 0.001 critical value by the Wilson-Hilferty approximation
        crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3
        assert chi2 < crit, (path, chi2, crit)
        for T in (1e-30, 5e-324):
            cold = SamplingParams(temperature=T)
            assert int(sample(logits, [cold], [CounterRNG(1)])) == int(logits.argmax())
    monkeypatch.undo()
    assert int(sample(logits, [SamplingParams(temperature=0.0)], [CounterRNG(1)])) == int(logits.argmax())


@pytest.mark.parametrize("K,N", [(16, 32), (18, 40), (7, 50), (256, 512)])
def test_the_linear_row_tiles_equal_the_row_loop_bit_for_bit_and_float64_within_rounding(K, N):
    """The whole-network step's linear layers run in register tiles of 8 rows (AVX-512; else 4), then
    4, then rows alone, over column panels, single vectors and scalar columns (one weight load for the
    tile's rows), the last 2-7 rows as one tile padded with zero rows; each output element keeps the row
    loop's expression, so the results are identical for every batch size: every mix of 8-, 4- and 1-row
    tiles and padded tiles, and N with vector and scalar tails."""
    lib = fused.library()
    g = torch.Generator().manual_seed(K + N)
    Wt, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    packed = fused.pack_linear(Wt, lib.linear_panel_width())
    for B in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 15, 17):
        x = torch.randn(B, K, generator=g)
        outs = [fused.linear_rows(lib, tiled, x, packed, N, bias) for tiled in (0, 1)]
        assert torch.equal(outs[0], outs[1]), B
        ref = x.double() @ Wt.double() + bias.double()
        scale = (x.double().abs() @ Wt.double().abs() + bias.double().abs()).max()
        assert float((outs[1].double() - ref).abs().max() / scale) < K * 2**-23


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 target flags")
@pytest.mark.parametrize("extra", [("-mno-avx512f",), ("-mno-avx512f", "-mno-fma")], ids=["avx2", "no-fma"])
def test_the_row_tiles_stay_bit_identical_when_built_for_older_x86(tmp_path, extra):
    """Built without AVX-512 (4-row tiles of 8-float vectors), and without FMA (fmaf per lane): the tiles
    still give the row loop's bits. GCC 12 once left one of them a multiply and an add where the others
    were fused, which this catches; the native build is checked by the test above."""
    out = tmp_path / "ssm_step.so"
    fused.compile_library(out, (*fused.FLAGS, *extra))
    lib = fused.load_library(out)
    g = torch.Generator().manual_seed(7)
    for K, N in [(7, 50), (18, 40), (256, 512)]:
        Wt, bias = torch.randn(K, N, generator=g), torch.randn(N, generator=g)
        packed = fused.pack_linear(Wt, lib.linear_panel_width())
        for B in (1, 2, 3, 4, 5, 7, 8, 13):
            x = torch.randn(B, K, generator=g)
            outs = [fused.linear_rows(lib, tiled, x, packed, N, bias) for tiled in (0, 1)]
            assert torch.equal(outs[0], outs[1]), (extra, K, N, B)
            ref = x.double() @ Wt.double() + bias.double()
            assert float((outs[1].double() - ref).abs().max()) < 1e-3 * float(ref.abs().max())


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 target flags")
@pytest.mark.parametrize(
    "extra",
    [
        None,
        ("-mno-avx512f",),
        ("-mno-avx512f", "-mno-avx2", "-mno-fma"),
        ("-march=x86-64", "-Werror=implicit-function-declaration"),  # no x86 intrinsics header at all
    ],
    # own_flags: not the width pass's build
    ids=["native_build", "own_flags_avx2", "own_flags_portable", "own_flags_baseline"],
)
def test_the_diagonal_step_with_a_partial_last_vector_is_exact_in_every_x86_build(tmp_path, extra):
    """A channel's last M mod 8 modes go through one partial vector: masked loads and stores with
    AVX-512VL or AVX2 (a run-time-size memcpy before, a libc call per load on AVX2: the text model's
    M = 35 made its batch-1 step 1.3x and its batch-8 step 2.2x slower there), a copy in the portable
    build. Every build: float64's values to float32 rounding, nothing written past a row's last mode
    (the imaginary parts follow the real ones; a sentinel follows the buffer). The baseline x86-64 build
    (no immintrin.h) compiles and loads: an intrinsic used outside the header's guard (the decode block's
    spin lock once called _mm_pause) left an undefined symbol that failed the library's load)."""
    g = torch.Generator().manual_seed(11)
    if extra is None:  # the library the suite runs on (S4_CFLAGS included)
        lib = fused.library()
    else:
        out = tmp_path / "ssm_step.so"
        fused.compile_library(out, (*fused.FLAGS, *extra))
        lib = fused.load_library(out)
    name = "native" if extra is None else " ".join(extra)
    for M in (3, 8, 13, 35):
        B, H = 3, 5
        x = torch.randn(B, H, 2, M, generator=g)
        u = torch.randn(B, H, generator=g)
        mur, mui, br, bi, cr, ci, mus = (torch.randn(H, M, generator=g) * 0.5 for _ in range(7))
        xd, ud = x.double(), u.double()[..., None]
        pd = [t.double() for t in (mur, mui, br, bi, cr, ci, mus)]
        want_r = pd[0] * xd[:, :, 0] - pd[1] * xd[:, :, 1] + pd[2] * ud
        want_i = pd[6] * xd[:, :, 1] + pd[1] * xd[:, :, 0] + pd[3] * ud  # the block's s ≠ p here
        want_y = (pd[4] * want_r - pd[5] * want_i).sum(-1)
        buf = torch.full((B * H * 2 * M + 8,), 7.0)  # a sentinel after the state
        xo, y = buf[: B * H * 2 * M].view(B, H, 2, M), torch.empty(B, H)
        fused.diag_step(lib, x, xo, u, y, fused.pointers(mur, mui, br, bi, cr, ci, mus))
        assert bool((buf[-8:] == 7.0).all()), (name, M)
        for a, b in ((xo[:, :, 0], want_r), (xo[:, :, 1], want_i), (y, want_y)):
            assert float((a.double() - b).abs().max() / b.abs().max()) < 1e-5, (name, M)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 target flags")
def test_the_avx2_overlapping_last_vector_gives_the_masked_vectors_bits(tmp_path):
    """AVX2 takes a channel's last M mod 8 modes (M >= 8) as the full vector of modes M - 8 .. M - 1,
    loaded before and stored after the full vectors (a masked store is microcoded on AMD: 1.3x the
    M = 35 SSM step). Against the same build with the masked partial vector (-DS4_MASKED_TAIL): bit for
    bit the same state and y, in place and not, one row at a time (diag_step) and 8 rows sharing the
    parameters (the network's step), with nothing written past a row's last mode."""
    builds = {}
    for name, extra in (("overlap", ()), ("masked", ("-DS4_MASKED_TAIL",))):
        out = tmp_path / f"{name}.so"
        fused.compile_library(out, (*fused.FLAGS, "-mno-avx512f", *extra))
        builds[name] = fused.load_library(out)
    g = torch.Generator().manual_seed(5)
    for M in (3, 8, 9, 13, 15, 35, 67):
        B, H = 3, 5
        x, u = torch.randn(B, H, 2, M, generator=g), torch.randn(B, H, generator=g)
        p = [torch.randn(H, M, generator=g) * 0.5 for _ in range(7)]  # held: params points into them
        params = fused.pointers(*p)
        got = {}
        for name, lib in builds.items():
            for in_place in (False, True):
                buf = torch.full((B * H * 2 * M + 8,), 7.0)  # a sentinel after the state
                xo, y = buf[: B * H * 2 * M].view(B, H, 2, M), torch.empty(B, H)
                xs = xo.copy_(x) if in_place else x
                fused.diag_step(lib, xs, xo, u, y, params)
                assert bool((buf[-8:] == 7.0).all()), (name, M, in_place)
                got[name, in_place] = (xo.clone(), y)
        for in_place in (False, True):
            (xa, ya), (xb, yb) = got["overlap", in_place], got["masked", in_place]
            assert torch.equal(xa, xb) and torch.equal(ya, yb), (M, in_place)
    # the network: 8 rows per thread (each thread's rows share each vector's parameters; the C library's
    # OpenMP threads default to the usable cores), then 3 more; layers of 8 < M < 16
    rows = 8 * len(os.sched_getaffinity(0)) + 3
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, d_state=24, kernel="s4", init="legs", l_max=64,
                      d_ff=32, cauchy_backend="torch")  # fmt: skip
    rec = SequenceModel(cfg).eval().to_recurrent()
    assert rec.M >= 8 and rec.M % 8, rec.M
    tokens = torch.randint(0, 64, (rows, 12), generator=g)
    runs = {}
    for name, lib in builds.items():
        step = fused.NetStep(lib, rec.net, rec.layers)
        state, logits = rec.init_state(rows), []
        for t in range(tokens.shape[1]):
            logits.append(step(tokens[:, t], state, state).clone())
        runs[name] = (torch.stack(logits), state)
    (la, sa), (lb, sb) = runs["overlap"], runs["masked"]
    assert torch.equal(la, lb) and torch.equal(sa, sb)


@pytest.mark.parametrize("kernel,init,form", [("s4d", "diag-lin", "diagonal"), ("s4", "legs", "dplr")])
def test_a_wide_layers_channels_split_over_threads_give_the_same_bits_as_one_thread(kernel, init, form):
    """A layer with H * M >= 65536 splits its channels over the threads when the step is not already in
    a parallel region (a batch below NET_PARALLEL_ROWS), and runs them in the calling thread inside one
    (a batch of 8 or more: each thread its own rows). Either way a row's logits and state are the same
    bits: row 0 alone (ssm_rows of one row, split), in 3 rows (split) and in 9 (each thread's rows in that
    thread); for a diagonal layer and a DPLR one (randomly initialized S4: its rows DPLR_ROWS at a time)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=1024, n_layers=1, d_state=128, kernel=kernel, init=init,
                      l_max=16, d_ff=0, cauchy_backend="torch")  # fmt: skip
    rec = SequenceModel(cfg).eval().to_recurrent()
    assert rec._net_step is not None and rec.H * rec.M >= 65536, (rec.H, rec.M)
    assert rec.report[0]["form"] == form, rec.report
    tokens = torch.randint(0, 16, (9, 6), generator=torch.Generator().manual_seed(2))
    states = {n: rec.init_state(n) for n in (1, 3, 9)}
    for t in range(tokens.shape[1]):
        logits = {}
        for n, state in list(states.items()):
            logits[n], states[n] = rec.step(tokens[:n, t], state)
        assert torch.equal(logits[1], logits[3][:1]) and torch.equal(logits[1], logits[9][:1]), t
    assert torch.equal(states[1], states[3][:, :1]) and torch.equal(states[1], states[9][:, :1])


def test_the_server_gives_the_same_tokens_and_finish_reasons_with_and_without_the_native_block(model_dirs):
    """Concurrent seeded requests with stop sequences and token limits (rows stop mid-block): the
    engine's native block and its one-step loop answer each request identically, and the native
    block did run."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from server_support import ServerThread

    from server import Settings
    from server.engine import DecodeBatch

    reqs = [{"model": "tiny-text", "prompt": "to be, or not" * (1 + k % 3), "max_new_tokens": 20 + 7 * k,
             "seed": k, "temperature": [0.0, 0.8, 1.2][k % 3], "stop": ["e", "th", "o, "][k % 3],
             **[{}, {"top_k": 20, "top_p": 0.9}, {"repetition_penalty": 1.3}][k // 3]}
            for k in range(9)]  # fmt: skip
    results = {}
    native = DecodeBatch.native
    for path in ("native", "one-step"):
        s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
        engine = s.state.models["tiny-text"].engine
        calls = []
        block = engine.rec.decode_block
        engine.rec.decode_block = lambda *a, **kw: calls.append(1) or block(*a, **kw)
        if path == "one-step":
            DecodeBatch.native = lambda self, rec: False
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(9) as ex:
                out = list(ex.map(lambda r: c.post("/v1/generate", json=r).json(), reqs))
        finally:
            DecodeBatch.native = native
            s.stop()
        results[path] = [(o["tokens"], o["finish_reason"]) for o in out]
        assert bool(calls) == (path == "native")
    assert results["native"] == results["one-step"]
    assert {reason for _, reason in results["native"]} == {"stop", "length"}


def test_a_stop_the_last_allowed_token_completes_is_a_stop_on_both_paths(model_dirs):
    """A stop sequence completed by the very token that reaches max_new_tokens ends the generation as a
    stop: finish_reason "stop", the text cut where the stop starts, as with room to spare. The one-step
    loop (a CUDA device without graphs, a word vocabulary) checked the token limit before the stop and
    answered "length" with the stop in the text (a helper's audit: ROMEO's "The shadow" with max 10);
    the native block was right. For each of 3 seeds, the stop is the 2 bytes the n-th token ends (their
    first occurrence in the library's own generation), at max_new_tokens n and n + 5, on both paths."""
    import httpx
    from server_support import ServerThread, reference

    from model.sampling import SamplingParams
    from server import Settings
    from server.engine import DecodeBatch

    prompt = "to be, or not"
    cases = []
    for seed in range(200):
        free = reference(
            model_dirs["text"], list(prompt.encode()), SamplingParams(temperature=0.8, seed=seed), 24
        )
        for n in range(8, 24):
            stop = bytes(free[n - 2 : n])
            if all(32 <= b < 127 for b in stop) and bytes(free).find(stop) == n - 2:
                cases.append(
                    (seed, n, stop.decode(), free[:n], bytes(free[: n - 2]).decode("utf-8", "replace"))
                )
                break
        if len(cases) == 3:
            break
    assert len(cases) == 3
    native = DecodeBatch.native
    for path in ("native", "one-step"):
        s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
        if path == "one-step":
            DecodeBatch.native = lambda self, rec: False
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                for seed, n, stop, tokens, text in cases:
                    for limit in (n, n + 5):
                        body = {"model": "tiny-text", "prompt": prompt, "temperature": 0.8, "seed": seed,
                                "max_new_tokens": limit, "stop": [stop]}  # fmt: skip
                        r = c.post("/v1/generate", json=body).json()
                        got = (r["finish_reason"], r["tokens"], r["text"])
                        assert got == ("stop", tokens, text), (path, seed, n, limit, stop, r)
        finally:
            DecodeBatch.native = native
            s.stop()


def test_requests_with_logprobs_decode_in_the_native_block_with_the_one_step_paths_answers(model_dirs):
    """OpenAI completions asking for logprobs (0, 3 and 20 most likely; greedy and sampled, with a stop
    sequence) beside requests that do not: the engine decodes them all in native blocks (a row asking
    for logprobs used to send its whole batch to the one-step loop), with the one-step loop's tokens,
    finish reasons and top ids, and its log-probabilities within float32 rounding (the C block sums the
    normalizer in double)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from server_support import ServerThread

    from server import Settings
    from server.engine import DecodeBatch

    reqs = [("/v1/completions", {"model": "tiny-text", "prompt": "to be, or not" * (1 + k % 2), "seed": k,
             "max_tokens": 12 + 5 * k, "temperature": [0.0, 0.9][k % 2], "stop": [["e"], []][k % 2],
             **({"logprobs": [0, 3, 20][k % 3]} if k % 4 else {})}) for k in range(6)]  # fmt: skip
    results, native = {}, DecodeBatch.native
    for path in ("native", "one-step"):
        s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
        engine = s.state.models["tiny-text"].engine
        asked = []
        block = engine.rec.decode_block
        engine.rec.decode_block = lambda *a, **kw: asked.append(kw["logprobs"] is not None) or block(*a, **kw)
        if path == "one-step":
            DecodeBatch.native = lambda self, rec: False
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(6) as ex:
                out = list(ex.map(lambda r: c.post(r[0], json=r[1]), reqs))
        finally:
            DecodeBatch.native = native
            s.stop()
        assert all(o.status_code == 200 for o in out), [o.text for o in out]
        results[path] = [o.json()["choices"][0] for o in out]
        assert any(asked) if path == "native" else not asked
    for got, want in zip(results["native"], results["one-step"]):
        lp_got, lp_want = got.pop("logprobs"), want.pop("logprobs")
        assert got == want  # text (or message) and finish reason
        if lp_want is None:
            assert lp_got is None
            continue
        # tokens, token_logprobs, top_logprobs ({token: logprob}, most likely first), text_offset
        assert lp_got["tokens"] == lp_want["tokens"] and lp_got["text_offset"] == lp_want["text_offset"]
        assert len(lp_want["tokens"]) > 0
        for a, b in zip(lp_got["token_logprobs"], lp_want["token_logprobs"], strict=True):
            assert abs(a - b) <= 2e-6
        for a, b in zip(lp_got["top_logprobs"], lp_want["top_logprobs"], strict=True):
            assert same_top_logprobs(list(a), list(a.values()), list(b), list(b.values()), 2e-6)


def _reference_probs(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor, counts: torch.Tensor):
    """model/sampling.py's pipeline for one row of finite logits, in float64, written from its
    docstrings: bias → CTRL penalty → presence/frequency → (z − max) / T → top-k, top-p ranked by z
    → min_p → softmax."""
    z = logits.double().clone()
    for t, b in p.logit_bias.items():
        z[t] += b
    pen = p.repetition_penalty
    z = torch.where(seen & (z > 0), z / pen, torch.where(seen, z * pen, z))
    z = z - counts.double() * p.frequency_penalty - (counts > 0).double() * p.presence_penalty
    s = (z - z.max()) / p.temperature
    order = torch.sort(z, descending=True, stable=True).indices
    k = p.top_k if 0 < p.top_k < len(z) else len(z)
    probs = torch.zeros_like(s)
    probs[order[:k]] = s[order[:k]].softmax(0)
    before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros(len(z), dtype=torch.bool)
    for j, v in enumerate(order.tolist()):
        keep[v] = j == 0 or (j < k and float(before[j]) < p.top_p)
    s = s.masked_fill(~keep, -math.inf)
    q = s.softmax(0)
    s = s.masked_fill(q < p.min_p * q.max(), -math.inf)
    return s.softmax(0)


@pytest.mark.parametrize("settings", FILTERS[1:], ids="+".join)
def test_the_c_and_torch_samplers_draw_every_setting_from_the_float64_distribution(monkeypatch, settings):
    """20,000 draws of one row by each path (C: what the server and the block use; torch: the
    fallback) against the float64 reference: chi-square below the p = 0.001 critical value."""
    g = torch.Generator().manual_seed(11)
    n_rows, N = 500, 20000
    logits = torch.randn(1, 32, generator=g) * 2
    seen = torch.rand(1, 32, generator=g) < 0.3
    counts = torch.randint(0, 3, (1, 32), generator=g).float()
    p = SamplingParams(temperature=0.9, **settings)
    exact = _reference_probs(logits[0], p, seen[0], counts[0])
    for path in ("c", "torch"):
        if path == "torch":
            monkeypatch.setattr(fused, "library", lambda: None)
        gen = CounterRNG(21 if path == "c" else 22)
        rows = [logits.repeat(n_rows, 1), [p] * n_rows, [gen] * n_rows, seen.repeat(n_rows, 1)]
        toks = torch.cat([sample(*rows, counts.repeat(n_rows, 1)) for _ in range(N // n_rows)])
        chi2, dof = _chi2_against(exact, torch.bincount(toks, minlength=32))
        crit = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3 if dof else 0.0
        assert chi2 <= crit, (path, chi2, crit)
        assert exact[toks].min() > 0  # nothing the reference excludes is ever drawn


def _block_args(rec, B: int, tok: torch.Tensor, **change) -> dict:
    """decode_block's keyword arguments for B rows of default settings, 4 steps each; `change` overrides."""
    params = [SamplingParams(seed=r) for r in range(B)]
    args = dict(settings=row_settings(params, V), counts=None, key=uint64_bits(list(range(1, B + 1))),
                counter=uint64_bits([0] * B), limit=torch.full((B,), 4), stops=[[]] * B, history=[b""] * B,
                seen=torch.zeros(B, V, dtype=torch.bool))  # fmt: skip
    return {**args, **change}


def test_a_block_of_steps_or_limits_out_of_range_is_refused_and_changes_nothing(rec):
    """decode_block's K, an integer in [1, MAX_BLOCK_STEPS], and each row's limit ≥ 0: K = -1 was a
    RuntimeError, 2**40 a terabyte allocation, 2.5 a TypeError, and a negative limit was read as 0 (a
    helper's audit). Each is now a ValueError naming it, the state and tokens untouched."""
    from model.fused import MAX_BLOCK_STEPS

    B = 3
    state, tok = _prefilled(rec, B, seed=6)
    before = (state.clone(), tok.clone())
    for K in (-1, 0, 2.5, True, MAX_BLOCK_STEPS + 1, 2**40):
        with pytest.raises(ValueError, match=rf"K must be an integer in \[1, {MAX_BLOCK_STEPS}\], got"):
            rec.decode_block(K, state, tok, **_block_args(rec, B, tok))
    with pytest.raises(ValueError, match=r"each row's limit must be ≥ 0, got -2"):
        rec.decode_block(4, state, tok, **_block_args(rec, B, tok, limit=torch.tensor([4, -2, 4])))
    assert torch.equal(state, before[0]) and torch.equal(tok, before[1])


def test_a_bad_logprobs_request_is_refused_and_none_asked_reports_none(rec):
    """decode_block's logprobs: (B,) int64 on the CPU with every entry −1 or ≥ 0, else a ValueError that
    names it (the state untouched); all −1 reports nothing; all 0 the chosen tokens' alone."""
    B = 3
    state, tok = _prefilled(rec, B, seed=5)
    before = state.clone()
    for bad in (torch.tensor([0, -2, 1]), torch.tensor([1, 2]), torch.tensor([1.0, 2.0, 3.0])):
        with pytest.raises(ValueError, match="logprobs must be"):
            rec.decode_block(4, state, tok.clone(), logprobs=bad, **_block_args(rec, B, tok))
        assert torch.equal(state, before)
    res = rec.decode_block(4, state.clone(), tok.clone(), logprobs=torch.full((B,), -1),
                           **_block_args(rec, B, tok))  # fmt: skip
    assert res.logprobs is None
    res = rec.decode_block(4, state.clone(), tok.clone(), logprobs=torch.zeros(B, dtype=torch.long),
                           **_block_args(rec, B, tok))  # fmt: skip
    chosen, ids, vals = res.logprobs
    assert chosen.shape == (4, B) and ids.shape == vals.shape == (4, B, 0) and bool((chosen < 0).all())


@pytest.mark.parametrize("path", ["c", "torch"])
def test_token_ids_outside_the_vocabulary_are_refused_by_every_entry_point_and_change_nothing(rec, path):
    """An id < 0 or ≥ V given to step (in place too), prefill (short: the C recurrent form; long: the
    parallel form) or a decode block's pending tokens is a ValueError naming it and its index, and the
    state is untouched. The whole-network C step used to read past the embedding table (a wrong row, or
    a segfault for a far id: found by a fresh-user trial); the C code now checks every id it is given,
    and the torch paths check before embedding. Float and bool tensors are refused, not truncated."""
    if path == "torch":  # the same model without its C step: torch ops (and the per-layer C SSM step off)
        rec = _without_c_step(rec)
    B = 3
    state = rec.init_state(B)
    state_before = state.clone()
    for bad in (V, -1, 10**7, -(2**62)):
        tokens = torch.tensor([1, bad, 2])
        with pytest.raises(ValueError, match=rf"token id {bad} at index \[1\] is outside the vocabulary"):
            rec.step(tokens, state)
        with pytest.raises(ValueError, match=rf"token id {bad} at index \[1\]"):
            rec.step(tokens, state, out=state)
        for L in (5, 600):  # 600 > prefill_by_steps_max_tokens: the parallel form
            prompt = torch.ones(B, L, dtype=torch.long)
            prompt[2, L - 1] = bad
            with pytest.raises(ValueError, match=rf"token id {bad} at index \[2, {L - 1}\]"):
                rec.prefill(prompt, state)
        if path == "c":
            with pytest.raises(ValueError, match=rf"token id {bad} at index \[1\]"):
                rec.decode_block(4, state, tokens.clone(), **_block_args(rec, B, tokens))
        assert torch.equal(state, state_before)
    if path == "c":  # a row that does not step (limit 0: a hole in the batch) may hold anything
        tokens = torch.tensor([1, -7, 2])
        res = rec.decode_block(2, state, tokens, **_block_args(rec, B, tokens, limit=torch.tensor([2, 0, 2])))
        assert res.n_out.tolist() == [2, 0, 2]
    for wrong in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])):
        with pytest.raises(ValueError, match="tokens must be integer token ids"):
            rec.step(wrong, rec.init_state(B))
    logits, _ = rec.step(torch.tensor([0, V - 1, 5], dtype=torch.int32), rec.init_state(B))  # any int dtype
    assert logits.shape == (B, V) and torch.isfinite(logits).all()
    # a state elsewhere than the model (its pointer handed to C would be another device's)
    with pytest.raises(ValueError, match="must be on the model's device"):
        rec.step(torch.tensor([1, 2, 3]), rec.init_state(B).to("meta"))
    for n in (-1, 2.0, True):  # (True was one row here, a TypeError in a SaShiMi)
        with pytest.raises(ValueError, match="batch_size must be an int"):
            rec.init_state(n)


def _without_c_step(rec):
    """A copy of `rec` (shallow) whose step and prefill take the torch ops."""
    import copy

    other = copy.copy(rec)
    other._net_step = None
    if hasattr(other, "_fused"):
        other._fused = None
    return other


def test_the_c_samplers_arguments_must_describe_the_batch(rec):
    """What the C sampler and the decode block read B rows of is checked first: sample() with fewer
    settings or generators than rows (it read past the lists: a segfault with none, random tokens with
    one for three rows), per-row settings of the wrong length, stops and history not one per row."""
    with pytest.raises(ValueError, match="one SamplingParams and one generator per row: 2 rows, got 0"):
        sample(torch.randn(2, V), [], [])
    one = SamplingParams(seed=1)
    with pytest.raises(ValueError, match="3 rows, got 1 params and 1 generators"):
        sample(torch.randn(3, V), [one], [one.generator()])
    with pytest.raises(ValueError, match=r"seen must be \(B, V\)"):
        sample(torch.randn(2, V), [one, one], [one.generator(), one.generator()],
               seen=torch.zeros(1, V, dtype=torch.bool))  # fmt: skip
    with pytest.raises(ValueError, match=r"logits must be \(B, V\)"):
        sample(torch.randn(V), [one], [one.generator()])
    B = 3
    tok = torch.zeros(B, dtype=torch.long)
    full = row_settings([SamplingParams(seed=1)] * B, V)
    short = dataclasses.replace(full, top_p=full.top_p[:2].clone())  # 2 rows of top_p for 3
    for change, what in (({"settings": short}, "row settings: top_p must be"),
                         ({"stops": [[]]}, "stops and history need one entry per row"),
                         ({"history": [b""] * 5}, "stops and history need one entry per row")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            rec.decode_block(4, rec.init_state(B), tok.clone(), **_block_args(rec, B, tok, **change))
    logits = torch.randn(B, V)
    with pytest.raises(ValueError, match="row settings"):
        fused.sample_rows_full(fused.library(), logits, short, None, None, torch.rand(B))


def test_the_c_wrappers_refuse_buffers_smaller_than_the_sizes_they_pass():
    """fused's thin wrappers pass the C code sizes from one tensor and pointers to the others: a bias, an
    output, a counter or a state copy of other sizes was read or written out of bounds (found reading the
    C code for the sanitizer audit). An empty bias, whose pointer torch gives as NULL, was taken silently
    as no bias. Each is now a ValueError before the call, and the right sizes give the right numbers."""
    lib = fused.library()
    g = torch.Generator().manual_seed(3)
    B, K, N = 3, 24, 40
    x, Wt, bias = torch.randn(B, K, generator=g), torch.randn(K, N, generator=g), torch.randn(N, generator=g)
    packed = fused.pack_linear(Wt, lib.linear_panel_width())
    want = x.double() @ Wt.double() + bias.double()
    for fn in (fused.linear_rows, fused.linear_rows_threads):
        args = (lib, 1) if fn is fused.linear_rows else (lib,)
        assert float((fn(*args, x, packed, N, bias).double() - want).abs().max()) < 1e-4
        for bad in (torch.zeros(0), bias[: N - 1].contiguous(), torch.zeros(2 * N)):
            with pytest.raises(ValueError, match="bias"):
                fn(*args, x, packed, N, bad)
    key, counter = torch.arange(5), torch.arange(5) * 7
    assert torch.equal(fused.philox_uniforms(lib, key, counter), philox_uniforms_torch(key, counter))
    for k, c in ((key, counter[:4].contiguous()), (key, counter.int()), (key.view(5, 1), counter.view(5, 1))):
        with pytest.raises(ValueError, match="philox_uniforms"):
            fused.philox_uniforms(lib, k, c)
    H, M = 2, 8
    state, u = torch.randn(B, H, 2, M, generator=g), torch.randn(B, H, generator=g)
    params = [torch.randn(H, M, generator=g) for _ in range(7)]
    ptrs = fused.pointers(*params)
    for xo, uu, y in (
        (torch.empty(B - 1, H, 2, M), u, torch.empty(B, H)),
        (torch.empty(B, H, 2, M), u[:, :1].contiguous(), torch.empty(B, H)),
        (torch.empty(B, H, 2, M), u, torch.empty(B, 1)),
    ):
        with pytest.raises(ValueError, match="diag_step"):
            fused.diag_step(lib, state, xo, uu, y, ptrs)
        with pytest.raises(ValueError, match="dplr_step"):
            fused.dplr_step(lib, state, xo, uu, y, ptrs[:4] + (ptrs[4],) * 7, 1)
