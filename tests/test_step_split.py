"""A step of a few rows split over the OpenMP threads by channels and columns (model/csrc/ssm_step.c
`net_rows_split`, `decode_split`): its logits, states and sampled tokens are bit for bit those of one
thread, for every layer kind, norm, weight dtype and shape (widths that are not multiples of the vector or
the split alignment, three threads, an empty part), through `step` and the native decode block (rows that
stop mid-block, a stall handing the block to one thread); the split is taken where it should be; and the
contention guard pauses splitting once stalled barriers pile up (not for a rare one), doubling the pause,
then splits again."""

from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch
from numerics import scramble_transposed_lns

from model import ModelConfig, SequenceModel, build, fused
from model.sampling import SamplingParams, row_settings, uint64_bits

# H = 136: the threads' channel cut (a multiple of 64) leaves the GLU's gate half starting at 200, not a
# multiple of the vector width; V = 130 and d_ff = 200 cut unevenly; three threads get an empty part of H
BASE = dict(vocab_size=130, d_model=136, n_layers=2, d_state=16, l_max=64, cauchy_backend="torch")
VARIANTS = {
    "s4d-ff": dict(kernel="s4d", d_ff=200),
    "s4-dplr": dict(kernel="s4"),
    "s4-tln-ff": dict(kernel="s4", norm="tln", d_ff=64),
    "s4d-ff-bfloat16": dict(kernel="s4d", d_ff=200),
    "s4d-head-bias-float16": dict(kernel="s4d", head_bias=True),
}


@pytest.fixture(scope="module")
def lib():
    lib = fused.library()
    assert lib is not None, "the fused C library did not build"
    return lib


@pytest.fixture(autouse=True)
def _threads_and_thresholds(lib):
    """Every test forces the split on these small models, with no stalls (three threads on two cores stall
    at every barrier: the guard would step them in one thread) unless it says otherwise; threads and
    thresholds are restored after."""
    threads = torch.get_num_threads()
    old = fused.step_split_min_weights(lib, 0)
    old_stall = fused.step_split_state(lib, stall_s=1e6)[2]
    yield
    fused.step_split_min_weights(lib, old)
    fused.step_split_state(lib, stall_s=old_stall)
    torch.set_num_threads(threads)


def _wait_out_the_guard(lib) -> None:
    """Sleep until the guard has not paused for over its 1 s maximum (a stall then starts from 10 ms)."""
    left = fused.step_split_state(lib)[1]
    if left > -1.05:
        time.sleep(left + 1.05)


# The guard's own tests (marked `alone`) stage a stall (`step_split_state(lib, delay_s)`: a thread held that
# long at a barrier) and read what the guard made of it. A loaded machine's barriers stall too (a thread
# descheduled for a time slice): with 3 CPU-bound processes beside them, the guard paused where only a short
# staged stall came, or doubled a 10 ms pause to 20 or 40 ms, and the tests failed on a right guard.
# - Where a test counts a stall of over the 20 ms the guard pauses at, the threshold is raised to STALL_S and
#   the staged stall is STAGED_S: only a wait of over 100 ms is a stall then (no time slice is that long; the
#   staged one is, and its 120 ms weigh as any 30 ms past 20 ms do: the pause does not depend on the debt's
#   size).
# - Where a test needs the default threshold (a short stall, or a wait that is no stall, must not pause),
#   the trial is run again, up to TRIES times, until the machine's own stalls did not pile up past 20 ms
#   beside it (each trial asserts the same: a guard that pauses on the short stall fails every one).
STALL_S, STAGED_S = 0.1, 0.12
TRIES = 20


@pytest.fixture(scope="module", params=list(VARIANTS))
def rec(request):
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**BASE, **VARIANTS[request.param]))
    if "tln" in request.param:
        assert scramble_transposed_lns(net) > 0
    dtype = next((getattr(torch, d) for d in ("bfloat16", "float16") if request.param.endswith(d)), None)
    rec = net.to_recurrent(dtype=dtype)
    assert rec._net_step is not None
    return rec


def _steps(rec, B: int, threads: int, n: int = 6, in_place: bool = True):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(B)
    tok = torch.randint(0, BASE["vocab_size"], (n, B), generator=g)
    state = rec.init_state(B)
    logits = []
    for i in range(n):
        out, state = rec.step(tok[i], state, out=state if in_place else None)
        logits.append(out.clone())
    return torch.stack(logits), state.clone()


@pytest.mark.parametrize("B", [1, 2, 5, 7])
def test_a_split_step_is_bit_for_bit_the_single_threads(lib, rec, B):
    _wait_out_the_guard(lib)
    torch.set_num_threads(1)
    assert not rec._net_step.splits(B)
    want = _steps(rec, B, 1)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        assert rec._net_step.splits(B), (threads, B)
        for in_place in (True, False):
            got = _steps(rec, B, threads, in_place=in_place)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (threads, in_place)


def _block(rec, B: int, threads: int, K: int = 12, stall_at_start: float = 0.0):
    """One native decode block of B rows with different limits and a stop sequence (rows leave mid-block)."""
    torch.set_num_threads(threads)
    V = BASE["vocab_size"]
    params = [SamplingParams(temperature=0.9, top_k=20 if r % 2 else 0, seed=7 + r) for r in range(B)]
    settings = row_settings(params, V)
    state = rec.init_state(B)
    _, x = rec.prefill(torch.arange(B * 5).reshape(B, 5) % V, rec.init_state(B))
    state.copy_(x)
    tok = torch.arange(B, dtype=torch.long) + 3
    limit = torch.tensor([K - (r % 3) * 4 for r in range(B)])
    if stall_at_start:
        fused.step_split_state(fused.library(), stall_at_start)
    res = rec.decode_block(
        K, state, tok, settings=settings, counts=None, key=uint64_bits([11 + r for r in range(B)]),
        counter=torch.zeros(B, dtype=torch.long), limit=limit, stops=[[b"\x05"]] * B,
        history=[b""] * B, seen=torch.zeros(B, V, dtype=torch.bool),
    )  # fmt: skip
    return res, state, tok


@pytest.mark.parametrize("B", [1, 3, 7])
def test_a_split_decode_block_gives_the_single_threads_tokens_and_states(lib, rec, B):
    _wait_out_the_guard(lib)
    want = _block(rec, B, 1)
    assert B == 1 or want[0].n_out.min() < want[0].n_out.max()  # rows left the block at different steps
    torch.set_num_threads(2)
    assert rec._net_step.splits(B)
    for threads in (2, 3):
        got = _block(rec, B, threads)
        assert got[0].steps == want[0].steps
        for a, b in zip((got[0].tokens, got[0].n_out, got[0].stopped, got[1], got[2]),
                        (want[0].tokens, want[0].n_out, want[0].stopped, want[1], want[2])):  # fmt: skip
            assert torch.equal(a, b), threads


def test_a_stall_mid_block_hands_the_rest_to_one_thread_with_the_same_results(lib, rec):
    fused.step_split_state(lib, stall_s=2e-4)  # the default
    _wait_out_the_guard(lib)
    want = _block(rec, 3, 1)
    t0 = time.monotonic()
    got = _block(rec, 3, 2, stall_at_start=0.03)  # the helper thread sleeps 30 ms in the first step
    elapsed = time.monotonic() - t0
    pause, left, _ = fused.step_split_state(lib)
    # the stall paused splitting during this block: for 10 ms, or (a busy machine's own stalls piling up past
    # 20 ms again once that pause was over, as on CI with two test workers) a doubling of it
    assert any(pause == pytest.approx(0.010 * 2**k) for k in range(7)), pause
    assert -elapsed - 0.001 <= left <= pause, (left, elapsed)
    assert got[0].steps == want[0].steps
    for a, b in zip((got[0].tokens, got[0].n_out, got[1], got[2]),
                    (want[0].tokens, want[0].n_out, want[1], want[2])):  # fmt: skip
        assert torch.equal(a, b)


@pytest.mark.alone
def test_the_guard_pauses_once_stalls_pile_up_doubles_the_pause_then_splits_again(lib):
    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(**BASE, kernel="s4d")).to_recurrent()
    torch.set_num_threads(2)
    fused.step_split_state(lib, stall_s=2e-4)  # the default
    _wait_out_the_guard(lib)
    assert rec._net_step.splits(1)
    want = _steps(rec, 1, 2, n=3)
    tok = torch.tensor([5])
    for _ in range(TRIES):  # (the busy machine's own stalls piling up past 20 ms with it: try again)
        _wait_out_the_guard(lib)
        time.sleep(0.3)  # any earlier stalls' debt decays
        before = fused.step_split_state(lib, 0.003)[0]  # a rare 3 ms stall (a vCPU preempted) pauses nothing
        rec.step(tok, rec.init_state(1))
        pause, left, _ = fused.step_split_state(lib)
        if pause == before and left < 0 and rec._net_step.splits(1):
            break
    assert pause == before and left < 0 and rec._net_step.splits(1)
    # the stalls that pause, over a threshold no time slice of the machine's own reaches (STALL_S)
    fused.step_split_state(lib, stall_s=STALL_S)
    _wait_out_the_guard(lib)
    fused.step_split_state(lib, STAGED_S)  # the next split step's helper stalls 120 ms: past 20 ms of stalls
    rec.step(tok, rec.init_state(1))
    pause, left, _ = fused.step_split_state(lib)
    assert pause == pytest.approx(0.010) and left <= 0.010
    assert torch.equal(_steps(rec, 1, 2, n=3)[0], want[0])  # paused or not, the same bits
    time.sleep(max(left, 0) + 0.002)
    assert rec._net_step.splits(1)  # the pause is over
    fused.step_split_state(lib, STAGED_S)
    rec.step(tok, rec.init_state(1))
    pause, left, _ = fused.step_split_state(lib)
    assert pause == pytest.approx(0.020) and left <= 0.020  # a stall soon after the last pause: doubled
    for _ in range(8):  # the pause doubles up to 1 s
        time.sleep(max(left, 0) + 0.002)
        fused.step_split_state(lib, STAGED_S)
        rec.step(tok, rec.init_state(1))
        pause, left, _ = fused.step_split_state(lib)
    assert pause == pytest.approx(1.0)
    time.sleep(max(left, 0) + 1.05)  # split (or idle) for over the maximum since: the next stall starts over
    fused.step_split_state(lib, STAGED_S)
    rec.step(tok, rec.init_state(1))
    assert fused.step_split_state(lib)[0] == pytest.approx(0.010)


def test_which_steps_split_by_default(lib):
    fused.step_split_min_weights(lib, 1 << 18)  # the default
    assert fused.step_split_min_weights(lib) == 1 << 18
    torch.manual_seed(0)
    # text-shakespeare's width and FF blocks (2 of its 4 layers): 0.85 M linear weights
    big = SequenceModel(ModelConfig(vocab_size=256, d_model=256, n_layers=2, d_state=8, l_max=32, d_ff=512,
                                    kernel="s4d", cauchy_backend="torch")).to_recurrent()  # fmt: skip
    small = SequenceModel(ModelConfig(**BASE, kernel="s4d")).to_recurrent()  # 55 k: a few µs a step
    _wait_out_the_guard(lib)
    torch.set_num_threads(2)
    assert [big._net_step.splits(B) for B in (1, 4, 7, 8, 64)] == [True, True, True, False, False]
    assert not small._net_step.splits(1)
    torch.set_num_threads(1)
    assert not big._net_step.splits(1)
    with pytest.raises(ValueError, match="must be >= 0"):
        fused.step_split_min_weights(lib, -1)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), 1e10])
def test_a_bad_guard_setting_is_refused_not_wrapped(lib, bad):
    """A negative delay or threshold was silently ignored (the C side's 'leave it'), one past a C long of
    nanoseconds wrapped around (1e10 s: a negative threshold, ignored too)."""
    old = fused.step_split_state(lib)[2]
    for kw in ("delay_s", "stall_s"):
        with pytest.raises(ValueError, match=kw):
            fused.step_split_state(lib, **{kw: bad})
    assert fused.step_split_state(lib)[2] == old


@pytest.mark.alone
def test_a_stall_that_several_threads_wait_out_counts_once(lib):
    """One descheduled thread holds every other thread of the team at the barrier: the stall is its time
    once (the longest wait), not once per waiting thread (three threads made an 11 ms stall 22 ms of debt,
    past the 20 ms that pauses: a single vCPU preemption paused splitting on a machine of 3+ cores)."""
    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(**BASE, kernel="s4d")).to_recurrent()
    torch.set_num_threads(3)
    fused.step_split_state(lib, stall_s=8e-3)  # the oversubscribed threads' own waits stay below it
    for _ in range(TRIES):  # (a second stall of the busy machine's own in the same step: try again)
        _wait_out_the_guard(lib)
        time.sleep(0.3)  # any earlier stalls' debt decays
        assert rec._net_step.splits(1)
        before, left_before, _ = fused.step_split_state(lib, 0.011)  # the last thread sleeps 11 ms: both
        rec.step(torch.tensor([5]), rec.init_state(1))  # others wait it out
        pause, left, _ = fused.step_split_state(lib)
        if pause == before and left < left_before <= -1:  # no new pause (one sets the time left to ≥ 0)
            break
    assert pause == before and left < left_before <= -1


@pytest.mark.alone
def test_the_first_threads_sampling_in_a_split_decode_block_is_no_stall(lib):
    """Between two steps of a split decode block the first thread samples while the others wait for it at
    the barrier: that wait is the sampling's time (milliseconds with a large vocabulary and top-p), no
    descheduled thread, and must not pause splitting."""
    V = 100000  # its top-p sampling: ~25 ms a step on the Xeon VM, 1.9 ms on the AMD EPYC VM of 2026-12-07
    B = 7  # the most rows a step splits (ssm_step.c SPLIT_MAX_ROWS): the first thread samples them all
    torch.manual_seed(0)
    rec = SequenceModel(ModelConfig(vocab_size=V, d_model=64, n_layers=1, d_state=8, l_max=32, kernel="s4d",
                                    cauchy_backend="torch")).to_recurrent()  # fmt: skip
    K = 8
    settings = row_settings([SamplingParams(temperature=1.0, top_p=0.9, seed=1 + r) for r in range(B)], V)

    def block(threads: int):
        torch.set_num_threads(threads)
        res = rec.decode_block(
            K, rec.init_state(B), torch.arange(B) + 3, settings=settings, counts=None,
            key=uint64_bits(list(range(1, B + 1))), counter=torch.zeros(B, dtype=torch.long),
            limit=torch.full((B,), K), stops=[[]] * B, history=[b""] * B,
            seen=torch.zeros(B, V, dtype=torch.bool),
        )  # fmt: skip
        assert res.steps == K
        return res

    # The stall threshold: half the sampling's own time a step (a step of the block in one thread, the
    # shortest: a step the machine stalled only takes longer). The others' wait for the first thread's
    # sampling of the B rows is then a stall at every step were it not told apart (K of them: far past the
    # 20 ms that pause), while the machine's own barrier waits count only past it too. (With one row and a
    # threshold of 2 ms, the sampling's 1.9 ms a step on this VM was no stall even if counted, and a
    # CPU-bound process beside the test stalled the block's barriers past 20 ms: 3 `yes` on 2 cores failed
    # a right guard.)
    sampling_s = float(block(1).times.diff().min())
    assert K * sampling_s > 0.05, sampling_s  # (counted, the sampling's waits would pause the split)
    fused.step_split_state(lib, stall_s=max(2e-3, sampling_s / 2))
    for _ in range(TRIES):  # (the busy machine's own stalls piling up past 20 ms in one block: try again)
        _wait_out_the_guard(lib)
        time.sleep(0.3)  # any earlier stalls' debt decays
        torch.set_num_threads(2)
        assert rec._net_step.splits(B)
        before, left_before, _ = fused.step_split_state(lib)
        block(2)
        pause, left, _ = fused.step_split_state(lib)
        if pause == before and left < left_before <= -1:  # no new pause
            break
    assert pause == before and left < left_before <= -1


def _interrupted_block(rec, B: int, threads: int, schedule, stall_at_start: float = 0.0):
    """A decode block of B rows whose interrupt flag is set before the call, under `schedule`."""
    torch.set_num_threads(threads)
    V = BASE["vocab_size"]
    params = [SamplingParams(temperature=0.9, seed=7 + r) for r in range(B)]
    state, tok = rec.init_state(B), torch.arange(B) + 3
    if stall_at_start:
        fused.step_split_state(fused.library(), stall_at_start)
    res = rec.decode_block(
        16, state, tok, settings=row_settings(params, V), counts=None,
        key=uint64_bits([11 + r for r in range(B)]), counter=torch.zeros(B, dtype=torch.long),
        limit=torch.full((B,), 40), stops=[[]] * B, history=[b""] * B,
        seen=torch.zeros(B, V, dtype=torch.bool), interrupt=ctypes.c_int(1), schedule=schedule,
    )  # fmt: skip
    return res, state, tok


@pytest.mark.parametrize("schedule", [(2, 3), (1, 5), (0, 1), (8, 4)])
def test_an_interrupted_split_block_makes_the_single_threads_round(lib, rec, schedule):
    """The interrupt ends a block after its first round, group_steps steps when the schedule takes the rows
    in more than one group: split (every step over the threads) as in one thread (it ended after one step)."""
    _wait_out_the_guard(lib)
    want = _interrupted_block(rec, 5, 1, schedule)
    assert want[0].steps == (schedule[1] if 0 < schedule[0] < 5 else 1)
    torch.set_num_threads(2)
    assert rec._net_step.splits(5)
    got = _interrupted_block(rec, 5, 2, schedule)
    assert got[0].steps == want[0].steps and torch.equal(got[0].n_out, want[0].n_out)
    assert torch.equal(got[0].tokens, want[0].tokens)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.alone
def test_a_block_handed_to_one_thread_mid_round_finishes_the_round(lib, rec):
    """A stall in the first step pauses the split: the rest of the block runs in one thread from step 1, and
    an interrupt still ends it after the first round (3 steps), not at once (its first round started at 1)."""
    fused.step_split_state(lib, stall_s=STALL_S)  # (the machine's own stalls are under it)
    _wait_out_the_guard(lib)
    want = _interrupted_block(rec, 5, 1, (2, 3))
    t0 = time.monotonic()
    got = _interrupted_block(rec, 5, 2, (2, 3), stall_at_start=STAGED_S)
    pause, left, _ = fused.step_split_state(lib)
    # it paused during this block: the guard's resume time (the C side's CLOCK_MONOTONIC, as Python's) is
    # after the block began (the guard was waited out > 1 s before), for the first pause's 10 ms (with the
    # default threshold a loaded machine's own stall on top of the staged one doubled it: CI, 2026-12-04)
    assert time.monotonic() + left > t0 and pause == pytest.approx(0.010)
    assert got[0].steps == want[0].steps == 3 and torch.equal(got[0].n_out, want[0].n_out)
    assert torch.equal(got[0].tokens, want[0].tokens)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


# More shapes: H = 65 (the second thread's channels: one), V = 5 (the first thread's head columns: none),
# tied embeddings with a head bias, a rank-2 DPLR layer (legt), and H·M ≥ 65536 (one thread steps the SSM
# channels in its own `omp for` loop, ssm_step.c `split_channels`)
MORE = {
    "h65-v5-tied-bias": dict(d_model=65, vocab_size=5, d_state=8, kernel="s4d", tie_embeddings=True,
                             head_bias=True, d_ff=33),
    "dplr-legt-rank2": dict(d_model=100, vocab_size=77, d_state=8, kernel="s4", init="legt"),
    "wide-state": dict(d_model=256, vocab_size=50, d_state=512, kernel="s4d", d_ff=96),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MORE))
def test_more_shapes_split_bit_for_bit(lib, name):
    torch.manual_seed(0)
    cfg = dict(n_layers=2, l_max=32, cauchy_backend="torch", **MORE[name])
    rec = SequenceModel(ModelConfig(**cfg)).to_recurrent()
    assert rec._net_step is not None
    _wait_out_the_guard(lib)
    V = cfg["vocab_size"]
    for B in (1, 4, 7):
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(B)
        tok = torch.randint(0, V, (3, B), generator=g)
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert rec._net_step.splits(B) == (threads > 1)
            state, logits = rec.init_state(B), []
            for i in range(3):
                out, state = rec.step(tok[i], state, out=state)
                logits.append(out.clone())
            runs.append((torch.stack(logits), state.clone()))
        for got in runs[1:]:
            assert torch.equal(got[0], runs[0][0]) and torch.equal(got[1], runs[0][1]), (name, B)


def test_two_python_threads_stepping_split_at_once_get_their_own_bits(lib, rec):
    """Two parallel regions at once (two Python threads, each its own team and barrier): no deadlock, and
    every step bit for bit the single thread's."""
    want = {B: _steps(rec, B, 1, n=8) for B in (1, 3)}
    got, errors = {}, []
    _wait_out_the_guard(lib)  # a pause an earlier test left (none starts here: the stall threshold is 1e6 s)

    def run(B: int, i: int) -> None:
        try:
            assert rec._net_step.splits(B)
            got[B, i] = _steps(rec, B, 2, n=8)
        except Exception as e:  # (reported below)
            errors.append(e)

    torch.set_num_threads(2)
    threads = [threading.Thread(target=run, args=(B, i)) for i in range(2) for B in (1, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors and len(got) == 4
    for (B, _), (logits, state) in got.items():
        assert torch.equal(logits, want[B][0]) and torch.equal(state, want[B][1])


def _prefill(rec, tokens: torch.Tensor, threads: int, logits: str, x0: torch.Tensor):
    """The C prefill (fused.NetStep.prefill) of `tokens` (B, L) from state x0 with `threads` threads."""
    torch.set_num_threads(threads)
    state = x0.clone()
    return rec._net_step.prefill(tokens, state, logits), state


@pytest.mark.parametrize("L", [2, 5, 70])
def test_a_split_prefill_of_one_row_is_bit_for_bit_the_single_threads_and_the_steps(lib, rec, L):
    """One row's prompt split over the threads by channels and columns (ssm_step.c `net_rows_split`, L > 1):
    the logits of every position, of the last, or none, and the state, bit for bit one thread's and those
    of stepping the prompt token by token (from a nonzero state)."""
    _wait_out_the_guard(lib)
    g = torch.Generator().manual_seed(L)
    tokens = torch.randint(0, BASE["vocab_size"], (1, L), generator=g)
    x0 = (torch.randn(rec.init_state(1).shape, generator=g) * 0.1).to(rec.init_state(1).dtype)
    torch.set_num_threads(1)
    state, steps = x0.clone(), []
    for i in range(L):
        out, state = rec.step(tokens[:, i], state, out=state)
        steps.append(out.clone())
    steps = torch.stack(steps, dim=1)  # (1, L, V)
    for head in ("all", "last", "none"):
        want = _prefill(rec, tokens, 1, head, x0)
        assert torch.equal(want[1], state)
        expect = steps if head == "all" else steps[:, -1:]
        assert want[0] is None if head == "none" else torch.equal(want[0], expect)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert rec._net_step.splits(1)
            got = _prefill(rec, tokens, threads, head, x0)
            assert torch.equal(got[1], want[1]), (head, threads)
            assert got[0] is None if head == "none" else torch.equal(got[0], want[0]), (head, threads)


@pytest.mark.alone
def test_a_split_prefill_feeds_the_guard_and_runs_in_one_thread_while_paused(lib, rec):
    """A stalled barrier in a split prefill counts toward the contention guard as a step's does (a stall
    past 20 ms pauses splitting for 10 ms), and a prefill while paused runs in one thread: the same bits."""
    fused.step_split_state(lib, stall_s=STALL_S)  # (the machine's own stalls are under it)
    _wait_out_the_guard(lib)
    tokens = torch.arange(40).reshape(1, 40) % BASE["vocab_size"]
    x0 = rec.init_state(1)
    want = _prefill(rec, tokens, 1, "all", x0)
    torch.set_num_threads(2)
    for _ in range(TRIES):  # the 10 ms pause must still run when checked: a test descheduled past it retries
        _wait_out_the_guard(lib)
        fused.step_split_state(lib, STAGED_S)  # the split's last thread sleeps before its second barrier
        got = _prefill(rec, tokens, 2, "all", x0)
        pause, left, _ = fused.step_split_state(lib)
        assert pause == pytest.approx(0.010) and left <= 0.010  # (so this prefill was split)
        if left > 0 and not rec._net_step.splits(1):
            paused = _prefill(rec, tokens, 2, "all", x0)
            break
    else:
        pytest.fail(f"the 10 ms pause was over before it was checked, {TRIES} times in a row: too busy")
    for run in (got, paused):
        assert torch.equal(run[0], want[0]) and torch.equal(run[1], want[1])


def test_a_prefill_of_several_rows_still_gives_each_thread_rows_of_its_own(lib, rec):
    """Two rows or more: each thread takes whole rows (no barrier, no stall to record, ssm_step.c
    `prefill_rows`), with each row's bits those of the row prefilled alone."""
    fused.step_split_state(lib, stall_s=2e-4)
    _wait_out_the_guard(lib)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, BASE["vocab_size"], (3, 9), generator=g)
    before = fused.step_split_state(lib, 0.03)[0]  # would stall a split team's barrier: none runs
    both = _prefill(rec, tokens, 2, "last", rec.init_state(3))
    pause, left, _ = fused.step_split_state(lib, 0)
    assert pause == before and left < 0
    for r in range(3):
        alone = _prefill(rec, tokens[r : r + 1], 2, "last", rec.init_state(1))
        assert torch.equal(alone[0], both[0][r : r + 1])
        assert torch.equal(alone[1], both[1][:, r : r + 1])


@pytest.mark.alone
@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_a_batch_split_by_rows_feeds_the_guard_and_steps_in_one_thread_while_it_pauses(lib, arch):
    """A batch of 8 rows or more (4 for SaShiMi) steps each thread's rows alone, and the step ends when its
    last thread does: a thread held 30 ms (a stand-in for one descheduled by a CPU-bound process beside
    it) is a stall the guard records, and past its 20 ms the split pauses (10 ms), the batch then stepping
    in the calling thread, the same bits. (Without it a busy loop beside the 2-thread step of 16 rows of
    text-shakespeare made it 7.5x slower than one thread: a fresh-user trial.) A short imbalance pauses
    nothing."""
    torch.manual_seed(0)
    extra = {"arch": "sashimi", "pool": [4, 4], "d_ff": 0} if arch == "sashimi" else {"kernel": "s4d"}
    rec = build(ModelConfig(**BASE, **extra)).to_recurrent()
    torch.set_num_threads(2)
    B = 16
    tokens = torch.randint(0, BASE["vocab_size"], (B,))
    want = rec.step(tokens, rec.init_state(B))
    fused.step_split_state(lib, stall_s=2e-4)  # the default
    for _ in range(TRIES):  # (the busy machine's own stalls piling up past 20 ms with it: try again)
        _wait_out_the_guard(lib)
        time.sleep(0.3)  # any earlier stalls' debt decays
        before = fused.step_split_state(lib, 0.003)[0]  # a rare 3 ms stall: no pause
        rec.step(tokens, rec.init_state(B))
        pause, left, _ = fused.step_split_state(lib)
        if pause == before and left < 0:
            break
    assert pause == before and left < 0
    fused.step_split_state(lib, stall_s=STALL_S)  # (the machine's own stalls are under it)
    for _ in range(TRIES):  # the 10 ms pause must still run when checked: a test descheduled past it retries
        _wait_out_the_guard(lib)
        fused.step_split_state(lib, STAGED_S)  # the next batch step's last thread ends 120 ms late
        got = rec.step(tokens, rec.init_state(B))
        pause, left, _ = fused.step_split_state(lib)
        assert pause == pytest.approx(0.010) and left <= 0.010
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        if left > 0:
            got = rec.step(tokens, rec.init_state(B))  # paused: in the calling thread, the same bits
            break
    else:
        pytest.fail(f"the 10 ms pause was over before it was checked, {TRIES} times in a row: too busy")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
