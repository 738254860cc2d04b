"""The CUDA graphs' decode block (model/cuda_graphs.py `BucketedStep.decode_block`, reached through
`RecurrentModel.decode_block` once `use_cuda_graphs` is on): K steps with their sampling recorded in one
graph, tested without a GPU.

Without CUDA the same class runs the block's ops as they are (`capture=False`): the bucket's buffers,
the padding, the uniforms drawn beforehand, the sampler's ops and the seen sets and counts kept on the
device. What is checked here, bit for bit, against the GPU engine's one-step path (the batch's `step`
and `model.sampling.RowSampler`: the same torch sampler ops, one step at a time):
- the tokens, states, seen sets and counts of every sampling setting, with greedy rows and padded
  buckets, blocks longer than the largest graph (several graphs back to back), across blocks;
- each row makes min(K, its limit) tokens and ends there (rows with limit 0 as they began);
- another batch resident in the bucket is left alone (the block runs on buffers of its own);
- rows with stop sequences: checked after the block, those that met one early stepped again to it;
- refusals (ids outside the vocabulary: nothing changed), and the engine's choice;
- a block whose graph is missing (a failed capture) runs the same ops without it;
- the server's answers with the block and with the one-step loop are the same.
On a GPU, tests/test_cuda.py replays the captured graphs against the same reference."""

from __future__ import annotations

import pytest
import torch
from numerics import SAMPLING_FILTERS as FILTERS
from numerics import block_row_logprobs

from model import ModelConfig, SequenceModel, build
from model.cuda_graphs import BLOCK_STEPS, BucketedStep, block_pieces, bucket_sizes
from model.sampling import (
    RowSampler,
    SamplingParams,
    find_stop,
    first_stop_end,
    row_settings,
    token_logprobs_torch,
    uint64_bits,
)

TINY = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=128, cauchy_backend="torch")
V = TINY["vocab_size"]
SASHIMI = {**TINY, "arch": "sashimi", "n_layers": 1, "pool": [2, 4]}  # widths 16, 32, 64; period 8
MIXED = [SamplingParams(temperature=t, seed=s, **FILTERS[s % len(FILTERS)])
         for s, t in enumerate([0.0, 0.7, 1.0, 1.3, 0.0, 0.9, 1.1, 0.8, 1.0])]  # fmt: skip
PLAIN = [SamplingParams(temperature=0.9, seed=100 + s) for s in range(5)]  # the audio streams' case
STOPS = [  # rows with stop sequences (low bytes < V: the tiny model's ids) beside rows without
    SamplingParams(temperature=t, seed=50 + s, stop=stop, **FILTERS[s % len(FILTERS)])
    for s, (t, stop) in enumerate(
        [
            (1.0, [bytes([7])]),
            (0.9, []),
            (1.2, [bytes([3, 9]), bytes([11])]),
            (0.8, [bytes([1, 2, 3])]),
            (1.0, []),
            (1.1, [bytes([5]), bytes([60, 61])]),
        ]
    )
]


@pytest.fixture(scope="module", params=["c", "torch", "sashimi"])
def rec(request):
    """A tiny S4 model's recurrent form: 'c' its whole-network C step (each step of the block runs it),
    'torch' the torch ops (the path a CUDA device captures); 'sashimi' a tiny SaShiMi's torch ops (the
    dense step, which a CUDA device captures: every level of every row computed, the updates of rows
    that do not step there masked out), its rows at different pooling phases (`start`)."""
    torch.manual_seed(0)
    if request.param == "sashimi":
        return build(ModelConfig(**SASHIMI)).to_recurrent(fused_step=False, fused_network=False)
    net = SequenceModel(ModelConfig(**TINY, kernel="s4"))
    fused = request.param == "c"
    return net.to_recurrent(fused_step=fused, fused_network=fused)


def row(rec, state: torch.Tensor, r: int) -> torch.Tensor:
    """Row r of a batch's state (along the model's batch dim: 1 for S4, 0 for SaShiMi)."""
    return state.select(rec.batch_dim, r)


@pytest.fixture
def graphs(rec):
    """rec stepping through uncaptured graph buckets 1 … 16 (as `use_cuda_graphs` sets them on CUDA)."""
    rec._graphs = BucketedStep(rec, bucket_sizes(16), capture=False)
    try:
        yield rec._graphs
    finally:
        rec._graphs = None


def start(rec, B: int, seed: int = 1):
    """B rows at different points of their sequences (prompts of 9 + row tokens: a SaShiMi's rows at
    different pooling phases), their pending tokens and seen sets (on rec's device)."""
    g, n, dev = torch.Generator().manual_seed(seed), rec.config.vocab_size, rec.device
    prompts = [torch.randint(0, n, (1, 9 + r), generator=g).to(dev) for r in range(B)]
    state = torch.cat([rec.prefill(p, rec.init_state(1))[1] for p in prompts], rec.batch_dim)
    tok = torch.randint(0, n, (B,), generator=g).to(dev)
    seen = (torch.rand(B, n, generator=g) < 0.2).to(dev)
    return state.contiguous(), tok, seen


def one_step(rec, state, tok, seen, params, limits, asked=None):
    """The reference: the batch stepped one step at a time with `step` (through the same buckets: a
    batch's matmuls round alike at one size, not across sizes) and a RowSampler on the rows' settings
    (the GPU engine's one-step path); a row's tokens, state, seen set and counts are taken when it has
    made limits[row] tokens, with the log-probabilities of its tokens (`token_logprobs_torch`, as the GPU
    engine's `DecodeBatch.step`) when `asked` (per row −1 or k) asks."""
    state, tok, seen = state.clone(), tok.clone(), seen.clone()
    gens = [p.generator() for p in params]
    n, dev, rows = rec.config.vocab_size, rec.device, torch.arange(len(params), device=rec.device)
    sampler = RowSampler(params, gens, n, dev)
    counts = torch.zeros(len(params), n, device=dev)
    counted = any(p.counts_output for p in params)
    done = {r: ([], row(rec, state, r).clone(), seen[r].clone(), counts[r].clone(), [])
            for r, n in enumerate(limits) if not n}  # fmt: skip
    toks, lps = [[] for _ in params], [[] for _ in params]
    for _ in range(max(limits)):
        logits, state = rec.step(tok, state)
        tok = sampler(logits, seen if sampler.rows.any_penalty else None, counts if counted else None)
        seen[rows, tok] = True
        counts[rows, tok] += 1
        if asked is not None:
            chosen, top_i, top_v = token_logprobs_torch(logits, tok, max(asked))
        for r, t in enumerate(tok.tolist()):
            if r in done:
                continue
            toks[r].append(t)
            if asked is not None and asked[r] >= 0:
                lps[r].append((chosen[r], top_i[r][: asked[r]], top_v[r][: asked[r]]))
            ended = (
                bool(params[r].stop)
                and find_stop(bytes(v & 0xFF for v in toks[r]), params[r].stop, 1) is not None
            )
            if len(toks[r]) == limits[r] or ended:
                done[r] = (list(toks[r]), row(rec, state, r).clone(), seen[r].clone(), counts[r].clone(),
                           lps[r])  # fmt: skip
    return done


def blocks(rec, state, tok, seen, params, limits, K, asked=None, logprobs=None):
    """The block path, run in blocks of K steps until each row has its limit or has stopped (as the
    engine runs it); with `asked` (per row −1 or k) the log-probabilities of each row's tokens appended
    to `logprobs` (a list per row, as `one_step`'s)."""
    state, tok, seen = state.clone(), tok.clone(), seen.clone()
    gens = [p.generator() for p in params]
    settings = row_settings(params, rec.config.vocab_size)
    counts = torch.zeros(len(params), rec.config.vocab_size)  # on the host, as the engine keeps them
    toks = [[] for _ in params]
    stopped = [False] * len(params)
    while any(left := [0 if stopped[r] else limits[r] - len(toks[r]) for r in range(len(params))]):
        counter = uint64_bits([g.counter for g in gens])
        history = [bytes(v & 0xFF for v in t) for t in toks]
        res = rec.decode_block(
            K, state, tok, settings=settings, counts=counts, key=uint64_bits([g.key for g in gens]),
            counter=counter, limit=torch.tensor(left), stops=[p.stop for p in params], history=history,
            seen=seen, logprobs=None if asked is None else torch.tensor(asked),
        )  # fmt: skip
        n_out = res.n_out.tolist()
        if asked is not None:
            for r, k in enumerate(asked):
                if k >= 0:
                    logprobs[r] += block_row_logprobs(res, r, k)
        assert res.steps == max(n_out) and res.tokens.shape == (res.steps, len(params))
        for r, p in enumerate(params):  # each row to its own limit, as the C block, or to a stop sequence
            made = bytes(v & 0xFF for v in res.tokens[: n_out[r], r].tolist())
            end = first_stop_end(history[r], made, p.stop)
            assert bool(res.stopped[r]) == (end is not None), f"row {r}"
            assert n_out[r] == (min(left[r], K) if end is None else end), f"row {r}"
        assert bool((res.times[1:] >= res.times[:-1]).all())
        for r, n in enumerate(n_out):
            toks[r] += res.tokens[:n, r].tolist()
            gens[r].counter += n
            assert int(counter[r]) == gens[r].counter  # advanced in place, as the native block does
            stopped[r] |= bool(res.stopped[r])
    return toks, state, seen, counts


def assert_blocks_are_the_one_step_path(rec, params, limits, K) -> list[list[int]]:
    """Blocks of K steps against `one_step`, bit for bit: each row's tokens, state, seen set and counts.
    Returns the rows' tokens."""
    state, tok, seen = start(rec, len(params))
    ref = one_step(rec, state, tok, seen, params, limits)
    toks, new_state, new_seen, counts = blocks(rec, state, tok, seen, params, limits, K)
    for r in range(len(params)):
        want_toks, want_state, want_seen, want_counts, _ = ref[r]
        assert toks[r] == want_toks and (len(toks[r]) == limits[r] or params[r].stop), f"row {r}"
        assert torch.equal(row(rec, new_state, r), want_state), f"row {r}: state"
        assert torch.equal(new_seen[r], want_seen), f"row {r}: seen"
        if any(p.counts_output for p in params):
            assert torch.equal(counts[r], want_counts.cpu()), f"row {r}: counts"
    return toks


LIMITS = {
    len(MIXED): [40, 1, 0, 17, 90, 33, 5, 40, 2],
    len(PLAIN): [90, 64, 90, 90, 77],
    len(STOPS): [200] * 6,
}


@pytest.mark.parametrize(("params", "K"), [(MIXED, 1), (MIXED, 7), (MIXED, 77), (PLAIN, 200), (STOPS, 64)])
def test_a_block_gives_the_one_step_paths_tokens_states_seen_sets_and_counts_bit_for_bit(
    rec, graphs, params, K
):
    """9 rows (bucket 16: 7 padded rows) or 5 (bucket 8), limits from 0 to 90: blocks of 1, 7, 77 (graphs
    of 64, 8, 4 and 1 steps back to back) and 200 steps."""
    toks = assert_blocks_are_the_one_step_path(rec, params, LIMITS[len(params)], K)
    assert graphs.copied_calls > 0 and graphs.blocks  # (not resident: copied in and out)
    if params is MIXED:
        assert all(toks[r] for r, p in enumerate(params) if p.temperature == 0 and LIMITS[len(params)][r])
    if params is STOPS:  # three rows ended on a stop sequence (checked against the one-step path's)
        assert [len(t) < 200 for t in toks] == [True, False, True, False, False, True]
        # in 4 blocks (64, 64, 64, 8 steps): a stop row makes the block's tokens up to its stop, not one
        # token a block (2026-12-04: a one-byte stop's row made one token a block of up to 256 steps);
        # the rows that met a stop mid-block were stepped again to it, with the same tokens
        assert graphs.blocks[8].calls == 4 and graphs.reruns > 0 and graphs.rerun_mismatches == 0


def test_a_block_reports_each_tokens_log_probabilities_as_the_one_step_path(rec, graphs):
    """Rows that ask for log-probabilities (k = 0 … 20; the others none), with every sampling setting and
    stop rows that end early (stepped again to their stop): each token's log_softmax of the raw logits
    and the k most likely, bit for bit as `token_logprobs_torch` gives the one-step path (the same torch ops
    on the same logits), in graphs of their own; the tokens as without the request. More than
    LOGPROBS_K = 20 is refused. (tests/test_cuda.py: the same with the captured graphs.)"""
    assert_logprobs_are_the_one_step_paths(rec)


def assert_logprobs_are_the_one_step_paths(rec) -> None:
    """The check of the test above, for rec with graphs (uncaptured here, captured on CUDA)."""
    params = MIXED[:6] + STOPS[:3]
    asked = [3, -1, 0, 20, 5, -1, 1, 2, -1]
    limits = [40, 17, 0, 33, 40, 5, 120, 120, 120]
    state, tok, seen = start(rec, len(params), seed=7)
    ref = one_step(rec, state, tok, seen, params, limits, asked)
    reruns = rec._graphs.reruns
    got = [[] for _ in params]
    toks, *_ = blocks(rec, state, tok, seen, params, limits, 16, asked, got)
    plain, *_ = blocks(rec, state, tok, seen, params, limits, 16)
    assert toks == plain
    for r in range(len(params)):
        assert toks[r] == ref[r][0], f"row {r}"
        assert got[r] == ref[r][4] and len(got[r]) == (len(toks[r]) if asked[r] >= 0 else 0), f"row {r}"
    assert rec._graphs.reruns > reruns and rec._graphs.rerun_mismatches == 0  # (stop rows stepped again)
    with pytest.raises(ValueError, match="at most 20 log-probabilities"):
        blocks(rec, state, tok, seen, params, limits, 16, [21] + asked[1:])
    with pytest.raises(ValueError, match="logprobs must be"):
        blocks(rec, state, tok, seen, params, limits, 16, [-2] + asked[1:])


def test_a_rerun_that_makes_other_tokens_is_logged_and_its_tokens_stand(rec, graphs, monkeypatch, caplog):
    """Not expected (the same ops on the same rows), but if the second run of the rows that met a stop
    made other tokens (here its uniforms are changed), that is logged and counted, its tokens stand,
    and `stopped` says whether they end on a stop."""
    real = BucketedStep._run
    calls = []

    def run(self, buf, bb, graphs_, flags, n_out, u, B):
        calls.append(1)
        return real(self, buf, bb, graphs_, flags, n_out, 1 - u if len(calls) % 2 == 0 else u, B)

    monkeypatch.setattr(BucketedStep, "_run", run)
    params = [SamplingParams(temperature=1.5, seed=s, stop=[bytes([s % 8])]) for s in range(6)]
    state, tok, seen = start(rec, 6, seed=3)
    with caplog.at_level("WARNING", logger="model.cuda_graphs"):
        for _ in range(4):
            res = rec.decode_block(
                64, state, tok, settings=row_settings(params, V), counts=None,
                key=uint64_bits(list(range(6))), counter=uint64_bits([0] * 6), limit=torch.full((6,), 64),
                stops=[p.stop for p in params], history=[b""] * 6, seen=seen,
            )  # fmt: skip
            for r, p in enumerate(params):
                made = bytes(int(t) & 0xFF for t in res.tokens[: res.n_out[r], r])
                assert bool(res.stopped[r]) == (first_stop_end(b"", made, p.stop) is not None), r
                assert int(tok[r]) == int(res.tokens[res.n_out[r] - 1, r])
    assert graphs.rerun_mismatches > 0 and "made other tokens than the first time" in caplog.text


@pytest.mark.parametrize(
    ("history", "new", "stops", "want"),
    [(b"", b"xaby", [b"ab"], 3), (b"xa", b"bab", [b"ab"], 1), (b"xa", b"bcab", [b"abc"], 2),
     (b"ab", b"zzc", [b"abc", b"zz"], 2), (b"zab", b"ab", [b"abab"], 2), (b"q", b"yyx", [b"x", b"yy"], 2),
     (b"ab", b"", [b"b"], None), (b"ab", b"cd", [b"b"], None), (b"q", b"q", [], None),
     (b"q", b"q", [b""], None), (b"", b"aaa", [b"aa"], 2)],
)  # fmt: skip
def test_a_stop_ends_a_row_at_the_first_new_byte_that_completes_one(history, new, stops, want):
    """`first_stop_end`: the fewest new bytes after which history + them ends with a stop (as a row that
    checks after every token stops: `find_stop`); a stop wholly in the history does not count."""
    assert first_stop_end(history, new, stops) == want
    for e in range(1, len(new) + 1):  # the same answer as checking after every byte
        if find_stop(history + new[:e], [s for s in stops if s], 1) is not None:
            assert want == e
            break
    else:
        assert want is None


def test_a_block_is_a_sum_of_the_captured_sizes_largest_first():
    assert BLOCK_STEPS == (1, 2, 4, 8, 16, 32, 64)
    assert block_pieces(1) == [1] and block_pieces(77) == [64, 8, 4, 1]
    assert block_pieces(200) == [64, 64, 64, 8]
    assert all(sum(block_pieces(k)) == k for k in range(1, 300))


def test_rows_with_limit_0_end_as_they_began_and_the_others_stop_at_their_own_limits(rec, graphs):
    state, tok, seen = start(rec, 4, seed=2)
    counts = torch.rand(4, V).round()
    before = [t.clone() for t in (state, tok, seen, counts)]
    params = [SamplingParams(temperature=1.0, seed=s, presence_penalty=0.5) for s in range(4)]
    counter = uint64_bits([7, 8, 9, 10])
    res = rec.decode_block(
        16, state, tok, settings=row_settings(params, V), counts=counts, key=uint64_bits([1, 2, 3, 4]),
        counter=counter, limit=torch.tensor([0, 9, 5, 0]), stops=[[]] * 4, history=[b""] * 4, seen=seen,
    )  # fmt: skip
    assert res.steps == 9 and res.n_out.tolist() == [0, 9, 5, 0] and counter.tolist() == [7, 17, 14, 10]
    for r in (0, 3):
        assert torch.equal(row(rec, state, r), row(rec, before[0], r)) and int(tok[r]) == int(before[1][r])
        assert torch.equal(seen[r], before[2][r]) and torch.equal(counts[r], before[3][r])
    for r, n in ((1, 9), (2, 5)):  # row 2 stepped on past its 5 tokens with row 1, and was put back at 5
        made = res.tokens[:n, r]
        assert not torch.equal(row(rec, state, r), row(rec, before[0], r)) and int(tok[r]) == int(made[-1])
        assert torch.equal(counts[r] - before[3][r], torch.bincount(made, minlength=V).float())
        assert bool(seen[r][made].all())
    nothing = rec.decode_block(
        4, state, tok, settings=row_settings(params, V), counts=counts, key=uint64_bits([1, 2, 3, 4]),
        counter=counter, limit=torch.zeros(4, dtype=torch.long), stops=[[]] * 4, history=[b""] * 4, seen=seen,
    )  # fmt: skip
    assert nothing.steps == 0 and nothing.tokens.shape == (0, 4) and not nothing.n_out.any()


def test_a_resident_batch_steps_in_place_and_another_batch_of_its_bucket_leaves_it_alone(rec, graphs):
    """The engine's batch, resident in bucket 8, runs its blocks in the buffer (no copies); a block of
    another batch of that bucket runs on buffers of its own: the resident rows are untouched and its
    result is that of the same block run alone."""
    state, tok, seen = start(rec, 5, seed=3)
    view = rec.resident_state(state.clone())
    args = dict(settings=row_settings(PLAIN, V), counts=None, stops=[[]] * 5, history=[b""] * 5)

    def run(st, tk, sn):
        return rec.decode_block(9, st, tk, key=uint64_bits(list(range(5))), counter=uint64_bits([0] * 5),
                                limit=torch.full((5,), 9), seen=sn, **args)  # fmt: skip

    res = run(view, tok.clone(), seen.clone())
    assert graphs.copied_calls == 0 and view.data_ptr() == graphs.buffers[8].state.data_ptr()
    kept = view.clone()
    other_state, other_tok, other_seen = start(rec, 6, seed=4)
    alone = BucketedStep(rec, bucket_sizes(16), capture=False)
    want_state, want_tok, want_seen = other_state.clone(), other_tok.clone(), other_seen.clone()
    six = dict(key=uint64_bits(list(range(6))), limit=torch.full((6,), 9), counts=None, stops=[[]] * 6,
               history=[b""] * 6, settings=row_settings(PLAIN + PLAIN[:1], V))  # fmt: skip
    other = rec.decode_block(9, other_state, other_tok, counter=uint64_bits([0] * 6), seen=other_seen, **six)
    assert graphs.eager_blocks == 1 and torch.equal(view, kept)
    want = alone.decode_block(9, want_state, want_tok, counter=uint64_bits([0] * 6), seen=want_seen, **six)
    assert torch.equal(other.tokens, want.tokens) and torch.equal(other_state, want_state)
    assert torch.equal(other_seen, want_seen) and res.steps == 9


def test_bad_ids_are_refused_and_change_nothing(rec, graphs):
    state, tok, seen = start(rec, 3, seed=5)
    tok[1] = V + 4
    before = [t.clone() for t in (state, tok, seen)]
    args = dict(settings=row_settings(PLAIN[:3], V), counts=None, key=uint64_bits([1, 2, 3]),
                counter=uint64_bits([0, 0, 0]), history=[b""] * 3, seen=seen)  # fmt: skip
    with pytest.raises(ValueError, match=f"token id {V + 4} at index \\[1\\]"):
        rec.decode_block(4, state, tok, limit=torch.tensor([4, 4, 4]), stops=[[]] * 3, **args)
    with pytest.raises(ValueError, match="K must be"):
        rec.decode_block(0, state, tok, limit=torch.tensor([4, 4, 4]), stops=[[]] * 3, **args)
    # the bad id is a row that does not step: the block runs
    rec.decode_block(4, state, tok, limit=torch.tensor([4, 0, 4]), stops=[[]] * 3, **args)
    assert int(tok[1]) == V + 4 and torch.equal(row(rec, state, 1), row(rec, before[0], 1))
    assert rec.decode_block_ready(16) and not rec.decode_block_ready(17)


def test_the_engine_takes_the_block_for_rows_with_stops_and_up_to_20_logprobs(rec, graphs):
    from bench.gpu import decode_batch

    batch = decode_batch(rec, 3)
    assert batch.native(rec)
    batch.rows[1].stops = [b"\n"]
    assert batch.native(rec)
    batch.rows[2].params = SamplingParams(logprobs=20)
    assert batch.native(rec)
    batch.rows[2].params = SamplingParams(logprobs=21)  # (past the API's limit: a library caller's)
    assert not batch.native(rec)


def test_without_a_graph_a_block_runs_its_ops_as_they_are(rec, graphs, monkeypatch):
    """Where a block graph is missing (its capture failed: `_block_graph` gives None), the block runs the
    same ops without it, with the same tokens."""
    asked = []
    graphs.bucket(len(PLAIN) + 3)  # (bucket 8, made without a capture)
    graphs.capture = True  # (as on CUDA; every block graph "fails")
    monkeypatch.setattr(graphs, "_block_graph", lambda buf, bb, k, flags: asked.append(k))
    assert_blocks_are_the_one_step_path(rec, PLAIN, LIMITS[len(PLAIN)], 77)
    assert set(asked) == {64, 8, 4, 1} and graphs.eager_blocks == 0  # (64 + 8 + 4 + 1, then 8 + 4 + 1)


def test_a_device_named_without_an_index_is_the_tensors_device(rec, graphs, monkeypatch):
    """On CUDA a model's device is `cuda` and its tensors' `cuda:0`, two unequal torch.devices: the
    block compares tensors with its buffers' device (here the same on CPU: the model says cpu:0)."""
    monkeypatch.setattr(rec, "device", torch.device("cpu", 0))
    rec._graphs = BucketedStep(rec, bucket_sizes(4), capture=False)
    state, tok, seen = start(rec, 2)
    assert state.device != rec.device  # what a CUDA model's tensors and its device give
    res = rec.decode_block(3, state, tok, settings=row_settings(PLAIN[:2], V), counts=None,
                           key=uint64_bits([1, 2]), counter=uint64_bits([0, 0]), limit=torch.tensor([3, 3]),
                           stops=[[]] * 2, history=[b""] * 2, seen=seen)  # fmt: skip
    assert res.steps == 3


def test_a_joiner_fills_a_hole_of_the_resident_batch_and_both_paths_step_it(rec, graphs):
    """The engine's resident rows are the bucket buffer's: a job that leaves leaves a hole that the next
    joiner fills in place, outside inference mode (the buffers are normal tensors, not inference ones),
    and the joined row then steps in blocks and one step at a time."""
    from bench.gpu import decode_batch
    from server.engine import Job
    from server.sessions import SessionRecord

    batch = decode_batch(rec, 3)
    batch.tok.fill_(3)  # (decode_batch's pending token 128 is past this model's 64 ids)
    batch.block(rec, 4, [4, 4, 4])
    batch.step(rec)
    assert batch.state.data_ptr() == graphs.buffers[4].state.data_ptr()
    gone = batch.rows[1]
    batch.leave([gone])
    p = SamplingParams(temperature=1.0, seed=9)
    session = SessionRecord(id="x", model="bench", slot=gone.session.slot, pending=5)
    batch.join([Job(session, [], params=p, generator=p.generator())])
    assert torch.equal(row(rec, batch.state, 1), batch.pool.row(gone.session.slot)) and int(batch.tok[1]) == 5
    res = batch.block(rec, 4, [4, 4, 4])
    assert res.n_out.tolist() == [4, 4, 4] and len(batch.step(rec)) == 3


def serve_as_on_a_gpu(monkeypatch, torch_ops: bool = False) -> None:
    """Make a server started on this CPU run the GPU engine's paths: the graphs `use_cuda_graphs` sets on
    CUDA, without the capture (with `torch_ops` the C step off: the torch ops, a SaShiMi's dense step in
    the graphs, as on CUDA), and the one-step loop's device sampler (RowSampler, the torch ops)."""
    import server.registry
    from server.engine import DecodeBatch

    def on(rec, settings, name):
        if torch_ops:
            rec._net_step = rec._fused = None
        rec._graphs = BucketedStep(rec, bucket_sizes(settings.max_batch_size), capture=False)
        return True

    init = DecodeBatch.__init__

    def device_sampler(self, pool, *args):
        init(self, pool, *args)
        self.device_sampler = True

    monkeypatch.setattr(server.registry, "use_cuda_graphs", on)
    monkeypatch.setattr(DecodeBatch, "__init__", device_sampler)


@pytest.mark.parametrize("arch", ["s4", "sashimi"])
def test_the_server_answers_the_same_with_the_graph_block_and_with_the_one_step_loop(
    arch, model_dirs, tmp_path, monkeypatch
):
    """Concurrent seeded requests, with token limits that end rows mid-block, stop sequences, filters: the
    engine's graph blocks (graphs without capture on this CPU) and its one-step loop with the device
    sampler (the GPU engine's two paths) answer each request identically, and the blocks did run. The
    tiny text model with its C step; a tiny SaShiMi text model with its torch ops (the dense step, as
    a CUDA device captures it: its C step switched off), its rows at the pooling phases their prompts
    leave (its head biased towards the stop sequences' bytes, so that rows end on them)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from server_support import ServerThread

    from model import save
    from server import Settings
    from server.engine import DecodeBatch

    ckpt = model_dirs["text"]
    if arch == "sashimi":
        torch.manual_seed(3)
        ckpt = tmp_path / "tiny-text"  # (the requests' model name)
        net = build(ModelConfig(**{**SASHIMI, "vocab_size": 256, "kernel": "s4d", "head_bias": True}))
        with torch.no_grad():  # the stop sequences' bytes likely, so that rows end on them
            net.head.bias[list(b"eth o,")] += 4.0
        save(net, ckpt)

    serve_as_on_a_gpu(monkeypatch, torch_ops=arch == "sashimi")
    reqs = [{"model": "tiny-text", "prompt": "to be, or not" * (1 + k % 3), "max_new_tokens": 20 + 7 * k,
             "seed": k, "temperature": [0.0, 0.8, 1.2][k % 3], "stop": [[], ["e"], ["th", "o, "]][k % 3],
             **[{}, {"top_k": 20, "top_p": 0.9}, {"repetition_penalty": 1.3}][k // 3]}
            for k in range(9)]  # fmt: skip
    # OpenAI's penalties (the counts kept on the device), sent once the first wave has left holes
    later = [{"model": "tiny-text", "prompt": "nymph", "max_tokens": 40, "seed": 20 + k, "temperature": 1.0,
              "presence_penalty": 0.5, "frequency_penalty": 0.4 * k} for k in range(3)]  # fmt: skip

    def post(c, r):
        route = "/v1/completions" if "max_tokens" in r else "/v1/generate"
        resp = c.post(route, json=r)
        assert resp.status_code == 200, resp.text
        o = resp.json()
        return (o["choices"][0]["text"], o["choices"][0]["finish_reason"]) if "choices" in o else (
            o["tokens"], o["finish_reason"])  # fmt: skip

    results = {}
    native = DecodeBatch.native
    for path in ("blocks", "one-step"):
        s = ServerThread(Settings(checkpoints=[str(ckpt)])).start()
        rec = s.state.models["tiny-text"].engine.rec
        assert isinstance(rec._graphs, BucketedStep)
        if path == "one-step":
            monkeypatch.setattr(DecodeBatch, "native", lambda self, rec: False)
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(12) as ex:
                first = [ex.submit(post, c, r) for r in reqs]
                first[0].result()  # the shortest is done: its row is a hole the joiners below fill
                second = list(ex.map(lambda r: post(c, r), later))
                results[path] = [f.result() for f in first] + second
        finally:
            monkeypatch.setattr(DecodeBatch, "native", native)
            s.stop()
        blocks_run = sum(bb.calls for bb in rec._graphs.blocks.values())
        assert (blocks_run > 0) == (path == "blocks")
    assert results["blocks"] == results["one-step"]
    assert {reason for _, reason in results["blocks"][:9]} == {"stop", "length"}
    assert all(len(text) > 0 for text, _ in results["blocks"][9:])
