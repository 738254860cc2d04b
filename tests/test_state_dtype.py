"""A state stored in float16 (`GraphedModel.use_state_dtype`, S4_STATE_DTYPE), on every path that steps one.

The definition: a step of a float16 state is the float32 step of its exact widening, the next state rounded
to nearest even (`Tensor.to(torch.float16)`); prefill likewise. Checked bit for bit against that definition
(the same model's float32 step, then rounding) on each path: the C steps (CPU: widened around them), the
torch ops, the Triton kernel (which reads and writes the 16-bit state itself: here in Triton's interpreter,
on a GPU compiled, marked `triton`), a SaShiMi (its phase counter exact), the CUDA graphs' buckets, resident
batch and decode blocks (capture off: the ops a GPU captures), the engine's decode batch and its rollback
re-steps. The served path equals `bench.state_precision`'s emulation, whose bits-per-token figures the docs
quote, exactly. The load-time check passes float16 and fails a bfloat16 state on the shipped
audio-digits-s4 (so it can fail); the refusals name what is wrong; the server's setting is read, and
ignored on CPU with a log line. The float16 bound (`state16_bound`, every rounding at its worst) is the
fixed point of its worst-case recurrence, holds a float16 state driven at its worst, and decides where
float16 applies (`proven`); the tiny DPLR and SaShiMi models here have none, so the tests of the step's
definition apply it with `proven=False`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_graph_block import PLAIN, blocks, one_step, row, serve_as_on_a_gpu, start
from test_triton_step import SMALL, _form, _mixed, compiled_in_a_subprocess

from model import ModelConfig, SequenceModel, VerificationError, build, load, triton_step
from model.cuda_graphs import BucketedStep, bucket_sizes

ROOT = Path(__file__).resolve().parents[1]
F16 = torch.float16
TINY = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, l_max=128, cauchy_backend="torch")
V = TINY["vocab_size"]
SASHIMI = {**TINY, "arch": "sashimi", "n_layers": 1, "pool": [2, 4], "kernel": "s4d", "init": "legs"}
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton kernel's tensors


def form_of(kind: str):
    """A tiny model's recurrent form on one path: "c" the C steps, "torch" the torch ops, "triton" the
    Triton kernel for its diagonal layers (an S4D model; the interpreter on CPU), "sashimi" a tiny
    SaShiMi's torch ops (period 8), "mixed" the Triton kernel with layer 0 a DPLR step (widened and rounded
    around its torch step)."""
    torch.manual_seed(0)
    if kind == "mixed":
        s4d = SequenceModel(ModelConfig(**{**SMALL, "n_layers": 3}, kernel="s4d"))
        return _mixed(s4d, SequenceModel(ModelConfig(**SMALL, kernel="s4")), triton_step=True)
    if kind == "sashimi":
        return build(ModelConfig(**SASHIMI)).to_recurrent(fused_step=False, fused_network=False)
    net = SequenceModel(ModelConfig(**TINY, kernel="s4d" if kind == "triton" else "s4"))
    if kind == "triton":
        return net.to_recurrent(device=DEV, fused_step=False, triton_step=True)
    return net.to_recurrent(fused_step=kind == "c", fused_network=kind == "c")


PATHS = ["c", "torch", *(pytest.param(k, marks=pytest.mark.triton) for k in ("triton", "mixed")), "sashimi"]


@pytest.fixture(scope="module", params=PATHS)
def rec(request):
    return form_of(request.param)


def defined_step(rec, tok, state16):
    """The definition: the float32 step of the widened state, the next state rounded to float16."""
    logits, new = rec.step(tok, state16.float())
    return logits, new.to(F16)


def test_a_float16_state_steps_as_its_float32_widening_rounded_bit_for_bit(rec):
    """30 steps of 4 rows (at different points of their sequences; a SaShiMi's at different pooling
    phases), out=None and in place, against `defined_step`: the same logits and states, bit for bit.
    The state passed in is untouched with out=None; a SaShiMi's phase counter stays an exact integer."""
    state, tok, _ = start(rec, 4)
    mine = state.to(F16)
    ref, kept = mine.clone(), mine.clone()
    logits, new = rec.step(tok, mine)
    assert new.dtype == F16 and torch.equal(mine, kept)  # (out=None: a new tensor)
    n = rec.config.vocab_size
    g = torch.Generator().manual_seed(3)
    for t in range(30):
        la, same = rec.step(tok, mine, out=mine)
        lb, ref = defined_step(rec, tok, ref)
        assert same is mine and torch.equal(la, lb) and torch.equal(mine, ref), f"step {t}"
        tok = torch.randint(0, n, (4,), generator=g).to(rec.device)
    kept = mine.clone()
    with pytest.raises(ValueError, match=str(n)):  # an id outside the vocabulary: refused, nothing changed
        rec.step(torch.full((4,), n, device=rec.device), mine, out=mine)
    assert torch.equal(mine, kept)
    if hasattr(rec, "layout"):
        assert rec.phases(mine).tolist() == [(9 + r + 30) % rec.period for r in range(4)]


def test_a_float16_prefill_is_the_widened_prefill_rounded(rec):
    state, _, _ = start(rec, 3)
    n = rec.config.vocab_size
    tokens = torch.randint(0, n, (3, 21), generator=torch.Generator().manual_seed(5)).to(rec.device)
    la, sa = rec.prefill(tokens, state.to(F16))
    lb, sb = rec.prefill(tokens, state.to(F16).float())
    assert sa.dtype == F16 and torch.equal(la, lb) and torch.equal(sa, sb.to(F16))


@pytest.mark.triton
def test_the_kernel_reads_and_writes_a_float16_state_as_the_float32_kernel_on_its_widening():
    """`diag_step` on float16 x, xo: the float32 kernel's result on x widened, rounded to nearest even, bit
    for bit (y too), out of place and in place, with more slots than the layer's (written as 0)."""
    form = _form(H=8)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 8, 2, form.M + 3, generator=g) * 30).to(F16).to(DEV)
    x[..., form.M :] = 7  # (slots past the layer's: written as 0)
    u = torch.randn(5, 8, generator=g).to(DEV)
    y32, x32 = torch.empty_like(u), torch.empty(x.shape, device=DEV)
    triton_step.diag_step(form, u, x.float(), x32, y32)
    y16, x16 = torch.empty_like(u), torch.empty_like(x)
    triton_step.diag_step(form, u, x, x16, y16)
    assert x16.dtype == F16 and torch.equal(x16, x32.to(F16)) and torch.equal(y16, y32)
    assert bool((x16[..., form.M :] == 0).all())
    triton_step.diag_step(form, u, x, x, y16)  # in place
    assert torch.equal(x, x32.to(F16))
    with pytest.raises(ValueError, match="must both be float32 or both float16"):
        triton_step.diag_step(form, u, x, x32, y16)
    with pytest.raises(ValueError, match="must both be float32 or both float16"):
        triton_step.diag_step(form, u, x.bfloat16(), x.bfloat16(), y16)


@pytest.mark.triton
def test_the_kernel_for_a_float16_state_compiles_with_16_bit_loads_and_stores_rounding_to_nearest_even(
    tmp_path,
):
    """The compiled path (what a GPU runs; the interpreter above runs numpy): Triton lowers the kernel with
    float16 x and xo pointers to PTX and ptxas assembles it for sm_90 (the H100/H200), in a subprocess
    without TRITON_INTERPRET. The state is loaded and stored 16 bits at a time (ld/st.global.b16), widened
    by cvt.f32.f16 (exact) and rounded by cvt.rn.f16.f32 (to nearest even, as `Tensor.to(float16)`)."""
    script = """
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import model.triton_step as ts
fn = ts._kernel()
sig = {n: "*u8" if n == "k_ptr" else "*fp16" if n in ("x_ptr", "xo_ptr") else "*fp32" if n.endswith("_ptr")
       else "i32" for n in fn.arg_names}
sig.update(ROWS="constexpr", BLOCK_M="constexpr", MASKED="constexpr")
k = triton.compile(ASTSource(fn, sig, constexprs={"ROWS": ts.ROWS, "BLOCK_M": 32, "MASKED": False}),
                   target=GPUTarget("cuda", 90, 32))
ptx = k.asm["ptx"]
print(json.dumps({"cubin": len(k.asm["cubin"]), "sm_90": "sm_90" in ptx,
                  "ops": sorted(set(re.findall(r"(?:cvt|ld\\.global|st\\.global)\\.[a-z0-9.]+", ptx)))}))
"""
    out = compiled_in_a_subprocess(script, tmp_path)
    assert out["cubin"] > 1000 and out["sm_90"], out
    assert {"ld.global.b16", "st.global.b16", "cvt.f32.f16", "cvt.rn.f16.f32"} <= set(out["ops"]), out


def test_what_a_float16_state_cannot_take_is_refused_by_name():
    rec = form_of("c")
    state, tok, seen = start(rec, 2)
    with pytest.raises(ValueError, match="bfloat16 state loses 0.6-2.4 bits"):
        rec.step(tok, state.bfloat16())
    with pytest.raises(ValueError, match="expected .* float32 \\(or float16\\)"):
        rec.step(tok, state.double())
    with pytest.raises(ValueError, match="out has shape"):  # out in another dtype than the state
        rec.step(tok, state.to(F16), out=state.clone())
    with pytest.raises(ValueError, match="native decode block steps float32 states"):
        rec.decode_block(2, state.to(F16), tok, settings=None, counts=None, key=None, counter=None,
                         limit=None, stops=[], history=[], seen=seen)  # fmt: skip
    with pytest.raises(ValueError, match="state dtype must be one of float32, float16, got torch.bfloat16"):
        rec.use_state_dtype("bfloat16")
    with pytest.raises(ValueError, match="16-bit state"):
        rec.check_state_dtype(torch.float32)
    sashimi = form_of("sashimi")
    sashimi.period = 2049  # (its last phase, 2,048, is float16's last exact integer step: allowed)
    assert sashimi._state16_problem() is None
    sashimi.period = 2050  # (pooling factors that multiply past that)
    with pytest.raises(ValueError, match="phase counter runs to prod\\(pool\\) − 1 = 2049"):
        sashimi.use_state_dtype(F16)
    assert sashimi.state_dtype == torch.float32


@pytest.fixture(scope="module")
def audio():
    """The shipped audio-digits-s4 (the model of the GPU streams goal) on this machine's step."""
    return load(ROOT / "checkpoints/audio-digits-s4").to_recurrent()


def test_the_load_check_passes_a_float16_state_and_fails_a_bfloat16_one(audio, monkeypatch):
    """`check_state_dtype` on the shipped audio-digits-s4: float16 within STATE16_TOL (the mean total
    variation of its next-token distributions from the float32 step's), bfloat16 above it (the check can
    fail); `use_state_dtype` then raises VerificationError when the check fails, the model keeping float32."""
    from model import recurrent

    f16 = audio.check_state_dtype(F16)
    bf16 = audio.check_state_dtype(torch.bfloat16)
    assert f16["tv_mean"] <= recurrent.STATE16_TOL < bf16["tv_mean"], (f16, bf16)
    assert f16["bound_over"] == 0 and f16["state_max_abs"] < f16["state_bound_max"] < recurrent.FLOAT16_MAX
    assert audio.use_state_dtype("float16") == audio.state_dtype_check and audio.state_dtype == F16
    assert audio.use_state_dtype(torch.float32) == {} and audio.state_dtype == torch.float32
    monkeypatch.setattr(recurrent, "STATE16_TOL", f16["tv_mean"] / 2)
    with pytest.raises(VerificationError, match="mean total variation; at most"):
        audio.use_state_dtype(F16)
    assert audio.state_dtype == torch.float32


def test_the_float16_bound_is_the_fixed_point_of_every_rounding_at_its_worst():
    """`DiagonalSSM.state_bound` with STATE16_ROUNDING (ρ, δ): the limit of the worst-case recurrence
    m ← (1 + ρ)(|μ| m + |b| u) + δ (√2 δ for a complex slot), iterated in float64 from 0, per coordinate;
    (0, 0) gives the float32 bound; a mode with (1 + ρ)|μ| ≥ 1, finite without rounding, has none (inf);
    a DPLR form derives none (inf wherever its bound is not 0)."""
    from numerics import real_system_with_eigenvalues

    from model.recurrent import STATE16_ROUNDING, DiagonalSSM, diagonalize

    rho, delta = STATE16_ROUNDING
    slow = 1 - 2.0**-12  # (1 + ρ)·slow > 1: the roundings alone could grow it
    Abar, Bbar, gamma = real_system_with_eigenvalues(3, [(0.99, 0.3), (slow, 2.0)], [0.95, -0.5], seed=3)
    form = DiagonalSSM(*diagonalize(Abar, Bbar, gamma), torch.device("cpu"))
    u = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    plain, b16 = form.state_bound(u), form.state_bound(u, STATE16_ROUNDING)
    amp = torch.stack([lam.abs() for lam in form.lam64], dim=1)
    bmag = torch.where(form.is_cplx[:, None], form.b64.norm(dim=1, keepdim=True), form.b64.abs())
    floor = torch.where(form.is_cplx[:, None], 2**0.5 * delta, delta).expand_as(amp)
    m = torch.zeros_like(amp)
    for _ in range(5_000):  # (the fastest of the finite modes converges to 1e-12 in ~2,600)
        m = (1 + rho) * (amp * m + bmag * u[:, None, None]) + floor
    stuck = (1 + rho) * amp >= 1
    assert (
        bool(stuck.any()) and bool(torch.isinf(b16[stuck]).all()) and bool(torch.isfinite(plain[stuck]).all())
    )
    torch.testing.assert_close(b16[~stuck], m[~stuck], rtol=1e-9, atol=0)
    assert bool((b16[~stuck] > plain[~stuck] * (1 + rho)).all())  # every rounding costs something
    torch.testing.assert_close(
        form.state_bound(u, (0.0, 0.0)), (bmag / (1 - amp)) * u[:, None, None], rtol=1e-12, atol=0
    )
    dplr = form_of("c").layers[0]
    assert dplr.form == "dplr"
    ones = torch.ones(dplr.H, dtype=torch.float64)
    d32, d16 = dplr.state_bound(ones), dplr.state_bound(ones, STATE16_ROUNDING)
    assert (
        bool(torch.isfinite(d32).all())
        and bool(torch.isinf(d16[d32 > 0]).all())
        and bool((d16[d32 == 0] == 0).all())
    )


def test_a_float16_state_driven_at_its_worst_stays_within_its_bound(audio):
    """The shipped audio-digits-s4's layer 0, its float16 state stepped as defined (float32 step of the
    widening, rounded to nearest even) for 4,000 steps at |u| = the SSM input bound, each channel's signs
    those that drive its slowest mode's coordinate 1 to its ℓ1 gain at the last step: every entry stays
    within `state16_bound` at every step, and the driven coordinates reach at least 0.25 of the float32
    bound (the drive works: 0.30 of it at least, median 0.61, 2026-12-06; some entry passed the float32
    bound itself by 0.03 %, within 1 % of its float16 bound). The model's float16 bound is under float16's
    65,504 (so the server applies the setting, proven) and at least the float32 limit."""
    from model.recurrent import FLOAT16_MAX, STATE_BOUND_SLACK

    form, T = audio.layers[0], 4_000
    U = audio.ssm_input_bound(0)
    b16, plain = audio.state16_bound(), audio.state_bound()
    assert float(b16.max()) < FLOAT16_MAX and bool((b16 >= plain * STATE_BOUND_SLACK).all())
    amp = form.lam64[0].abs()  # (H, M): coordinate 1's eigenvalue
    slot = torch.where(form.b64[:, 0].abs() > 0, amp, -1.0).argmax(-1)  # (H,) each channel's slowest
    H = form.H
    A = form.block_powers(torch.arange(T - 1, -1, -1, dtype=torch.float64))[
        torch.arange(H), slot
    ]  # (H, T, 2, 2)
    b = form.b64[torch.arange(H), :, slot]  # (H, 2)
    signs = torch.sign((A @ b[:, None, :, None])[..., 0, 0])  # (H, T)
    x = torch.zeros(1, H, 2, form.M, dtype=F16)
    limit = b16[0].double()
    worst = 0.0
    for t in range(T):
        _, new = form.step((signs[:, t] * U).float()[None], x.float())
        x = new.to(F16)
        worst = max(worst, float((x[0].double().abs() / limit.clamp_min(1e-300)).max()))
    assert worst <= 1.0, worst
    reached = x[0, torch.arange(H), 0, slot].double().abs()
    assert bool((reached >= 0.25 * plain[0, torch.arange(H), 0, slot]).all()), (
        reached / plain[0, torch.arange(H), 0, slot]
    )


def test_float16_is_applied_only_where_its_bound_is_proven_unless_asked(audio):
    """`use_state_dtype(float16)` refuses a model whose float16 bound passes 65,504 (a DPLR layer has
    none: inf), naming the count and the bound, the model keeping float32; `proven=False` applies it on
    the probe alone. `check_state` admits a state within the float16 bound past the float32 limit, whatever
    the model's state dtype (a session decoded in float16 restores on any server of the model), and
    refuses one past it; where none is derived (DPLR), the float32 limit stays."""
    from model.recurrent import FLOAT16_MAX, STATE_BOUND_SLACK, StateRangeError

    dplr = form_of("c")
    with pytest.raises(
        ValueError, match=r"not proven .*: \d+ entries have no float16 bound \(a mode too slow"
    ):
        dplr.use_state_dtype(F16)
    # an S4D model with dt = 1e-4: |λ| = exp(-0.5e-4), too slow for float16's rounding (1 + 2⁻¹¹ past 1)
    slow = SequenceModel(ModelConfig(**TINY, kernel="s4d", dt_min=1e-4, dt_max=1e-4)).to_recurrent()
    assert all(f.form == "diagonal" for f in slow.layers)
    assert bool(torch.isinf(slow.state16_bound()).any()) and bool(torch.isfinite(slow.state_bound()).all())
    with pytest.raises(ValueError, match=r"entries have no float16 bound \(a mode too slow") as err:
        slow.use_state_dtype(F16)
    assert "may reach past" not in str(err.value) and slow.state_dtype == torch.float32
    fast = SequenceModel(ModelConfig(**TINY, kernel="s4d")).to_recurrent()  # a finite bound, made too large
    fast.ssm_input_bound = lambda i: torch.full((fast.H,), 1e6, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"\d+ entries may reach past float16's 65504 \(the largest \d"
    ) as err:
        fast.use_state_dtype(F16)
    assert "no float16 bound" not in str(err.value) and fast.state_dtype == torch.float32
    assert dplr.state_dtype == torch.float32
    assert dplr.use_state_dtype(F16, proven=False)["bound_over"] > 0 and dplr.state_dtype == F16
    dplr.use_state_dtype("float32")
    assert torch.equal(dplr.state_limit(), dplr.state_bound() * STATE_BOUND_SLACK)
    b16, plain = audio.state16_bound(), audio.state_bound() * STATE_BOUND_SLACK
    assert torch.equal(audio.state_limit(), b16) and float(b16.max()) < FLOAT16_MAX
    i = (b16 / plain.clamp_min(1e-300)).flatten().argmax()
    idx = [int(k) for k in torch.unravel_index(i, b16.shape)]
    assert float(b16.flatten()[i]) > float(plain.flatten()[i]) * 1.5
    x = audio.init_state(1)
    for dtype in (torch.float32, F16):
        audio.use_state_dtype(dtype)
        try:
            x[idx[0], 0, idx[1], idx[2], idx[3]] = float(plain.flatten()[i]) * 1.2  # past the float32 limit
            audio.check_state(x)
            x[idx[0], 0, idx[1], idx[2], idx[3]] = float(b16.flatten()[i]) * 1.001
            with pytest.raises(StateRangeError, match="exceeds"):
                audio.check_state(x)
        finally:
            audio.use_state_dtype("float32")


def test_the_served_float16_state_is_bench_state_precisions_emulation_exactly(audio):
    """bench.state_precision measured a float16 state by rounding a float32 state after every step; the
    served float16 state gives the same log-probabilities, bit for bit (so its figures are the served
    path's)."""
    from bench.state_precision import eval_batch, teacher_forced

    x, y = eval_batch(ROOT / "checkpoints/audio-digits-s4", {"rows": 2, "tokens": 300})
    want = teacher_forced(audio, x, y, F16)
    state, got = audio.init_state(2).to(F16), []
    for t in range(x.shape[1]):
        logits, state = audio.step(x[:, t].contiguous(), state, out=state)
        got.append(torch.log_softmax(logits.double(), -1))
    assert torch.equal(torch.stack(got, 1), want["logp"])


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=pytest.mark.triton), "sashimi"])
def test_the_graphs_buffers_take_the_state_dtype_and_step_it_as_defined(kind):
    """With a float16 state dtype the buckets' buffers are float16: a resident batch steps in place as the
    definition (the float32 step of the widened rows through the same bucket size, float32 buffers of their
    own: the same matmul shapes, so bit for bit on a GPU too; then rounded), with no copies; a copied
    float16 batch likewise; and a float32 batch runs the eager float32 step (not rounded through the
    buffers)."""
    rec = form_of(kind)
    ref_graphs = BucketedStep(rec, bucket_sizes(8), capture=False)  # (made while the state dtype is float32)

    def defined(tok, x16):
        logits, new = ref_graphs(tok, x16.float())
        return logits, new.to(F16)

    rec.use_state_dtype(F16, proven=False)
    rec._graphs = BucketedStep(rec, bucket_sizes(8), capture=False)
    try:
        state, tok, _ = start(rec, 3)
        view = rec.resident_state(state.to(F16))
        assert view.dtype == F16 and rec._graphs.buffers[4].state.dtype == F16
        assert ref_graphs.state_dtype == torch.float32
        ref = state.to(F16)
        for _ in range(5):
            la, _ = rec.step(tok, view, out=view)
            lb, ref = defined(tok, ref)
            assert torch.equal(la, lb) and torch.equal(view, ref)
        assert rec._graphs.copied_calls == 0 and ref_graphs.copied_calls == 5
        rec._graphs.release()
        before = view.clone()
        _, got = rec.step(tok, before.clone())  # (copied through the buffer, which `view` shares)
        assert torch.equal(got, defined(tok, before)[1]) and rec._graphs.copied_calls == 1
        eager = rec._graphs.eager_calls
        l32, s32 = rec.step(tok, state)
        assert s32.dtype == torch.float32 and rec._graphs.eager_calls == eager + 1
        assert torch.equal(s32, rec._step_eager(tok, state, None, ids_checked=True)[1])  # (step checked them)
        with pytest.raises(ValueError, match="expected .* float16 \\(the state dtype"):
            rec.resident_state(state)
    finally:
        rec._graphs = None


@pytest.mark.parametrize("kind", ["torch", "sashimi"])
def test_a_decode_block_of_float16_states_gives_the_one_step_paths_tokens_and_states(kind):
    """The graphs' decode block (capture off) on a float16 batch against the one-step path of the same
    float16 batch (`step` through the same buckets + `RowSampler`): each row's tokens, state and seen set
    bit for bit; a float32 state is refused there, naming the state dtype."""
    rec = form_of(kind)
    rec.use_state_dtype(F16, proven=False)
    rec._graphs = BucketedStep(rec, bucket_sizes(8), capture=False)
    try:
        state, tok, seen = start(rec, len(PLAIN))
        state = state.to(F16)
        limits = [30, 12, 30, 0, 25]
        ref = one_step(rec, state, tok, seen, PLAIN, limits)
        toks, new_state, new_seen, _ = blocks(rec, state, tok, seen, PLAIN, limits, 7)
        assert new_state.dtype == F16
        for r in range(len(PLAIN)):
            assert toks[r] == ref[r][0] and torch.equal(row(rec, new_state, r), ref[r][1]), f"row {r}"
            assert torch.equal(new_seen[r], ref[r][2])
        with pytest.raises(ValueError, match="state must be .* float16"):
            blocks(rec, state.float(), tok, seen, PLAIN, limits, 7)
    finally:
        rec._graphs = None


def test_without_graphs_a_float16_batch_steps_one_step_at_a_time_and_only_the_triton_step_is_native():
    """The C decode block takes float32 states only: with a float16 state dtype and no graphs,
    `decode_block_ready` says no, so the engine's batch is not `native` and steps one step at a time (as
    defined). `state16_native`: only a model whose layers all step with the Triton kernel reads and writes
    the 16-bit state itself (the server applies the setting to those alone)."""
    from bench.gpu import decode_batch

    rec = form_of("c")
    assert rec.decode_block_ready(3) and not rec.state16_native
    rec.use_state_dtype(F16, proven=False)
    assert not rec.decode_block_ready(3)
    batch = decode_batch(rec, 3)
    batch.tok.fill_(3)
    assert batch.state.dtype == F16 and not batch.native(rec)
    ref = batch.state.clone()
    tokens = batch.tok.clone()
    batch.step(rec)
    assert torch.equal(batch.state, defined_step(rec, tokens, ref)[1])
    rec.use_state_dtype("float32")
    assert rec.decode_block_ready(3)
    assert not form_of("sashimi").state16_native and not form_of("torch").state16_native


@pytest.mark.triton
def test_state16_native_is_the_triton_step_of_all_diagonal_layers():
    assert form_of("triton").state16_native and not form_of("mixed").state16_native


def test_the_registry_applies_the_setting_only_where_the_step_reads_16_bits(caplog):
    """On a CUDA device: a model without a 16-bit step is warned about and keeps float32; one whose check
    fails, or whose float16 bound is not proven, is logged as an error and keeps float32; one that passes
    is logged with its check's figures and its float16 bound."""
    from types import SimpleNamespace

    from server.config import Settings
    from server.registry import use_state_dtype

    settings = Settings(state_dtype="float16")
    cuda = torch.device("cuda")
    report = {"dtype": "float16", "tv_mean": 0.004, "rows": 4, "steps": 256, "tol": 0.015,
              "state_max_abs": 120.0, "bound_over": 0, "state_bound_max": 3800.0}  # fmt: skip

    def failing(dtype):
        raise VerificationError("the step with a float16 state differs")

    def unproven(dtype):  # (what `use_state_dtype` raises for a bound past float16's range)
        raise ValueError("a float16 state is not proven to hold this model's state: 3 of its entries")

    with caplog.at_level(logging.INFO, logger="server.models"):
        assert not use_state_dtype(SimpleNamespace(device=cuda, state16_native=False), settings, "dplr")
        assert not use_state_dtype(SimpleNamespace(device=cuda, state16_native=True,
                                                   use_state_dtype=failing), settings, "bad")  # fmt: skip
        assert not use_state_dtype(SimpleNamespace(device=cuda, state16_native=True,
                                                   use_state_dtype=unproven), settings, "loose")  # fmt: skip
        assert use_state_dtype(SimpleNamespace(device=cuda, state16_native=True,
                                               use_state_dtype=lambda d: report), settings, "ok")  # fmt: skip
        assert not use_state_dtype(SimpleNamespace(device=cuda), Settings(), "default")  # float32: nothing
    lines = {r.getMessage().split(":")[0]: (r.levelname, r.getMessage()) for r in caplog.records}
    assert lines["model dplr"][0] == "WARNING" and "has no 16-bit path" in lines["model dplr"][1]
    assert lines["model bad"][0] == "ERROR" and "differs); its states stay float32" in lines["model bad"][1]
    assert lines["model loose"][0] == "ERROR" and "not proven" in lines["model loose"][1]
    assert "its states stay float32" in lines["model loose"][1]
    assert lines["model ok"][0] == "INFO" and "next-token distributions 4.0e-03" in lines["model ok"][1]
    assert "at most 3800 on any input (every rounding included" in lines["model ok"][1]
    assert "model default" not in lines


def test_the_engines_decode_batch_keeps_float16_rows_and_the_pool_float32():
    """DecodeBatch with a float16 state dtype: joining rows are rounded from the pool's float32 rows, the
    batch steps resident in the float16 buffers (the same tokens as without the graphs), leaving rows widen
    back into the pool exactly, and a rollback's re-steps round at every step as the decode did."""
    from bench.gpu import decode_batch

    rec = form_of("torch")
    rec.use_state_dtype(F16, proven=False)

    def run(graphs: bool):
        rec._graphs = BucketedStep(rec, bucket_sizes(8), capture=False) if graphs else None
        try:
            batch = decode_batch(rec, 3)
            batch.tok.fill_(3)  # (decode_batch's pending token 128 is past this model's 64 ids)
            assert batch.state.dtype == F16 and batch.pool.state.dtype == torch.float32
            made = [batch.step(rec) for _ in range(6)]
            rows, gone = batch.state.clone(), batch.rows[1]
            batch.leave([gone])
            return made, rows, batch.pool.row(gone.session.slot).clone()
        finally:
            rec._graphs = None

    a, rows_a, slot_a = run(True)
    b, rows_b, slot_b = run(False)
    assert a == b and torch.equal(rows_a, rows_b)
    assert slot_a.dtype == torch.float32 and torch.equal(slot_a, rows_a.select(1, 1).float())


@pytest.mark.parametrize("dtype", [torch.float32, F16])
def test_rows_move_between_pool_and_batch_alike_by_row_copies_and_by_index_kernels(dtype):
    """DecodeBatch moves rows to and from the pool by one copy each on CPU and by index kernels on a GPU
    (`row_copies`); the index path, run here on CPU, gives the same batch and pool bit for bit: rows
    growing the batch (cat), leaving (put_rows: a float16 row widened exactly), and a joiner filling the
    hole (index_copy_: rounded)."""
    from bench.gpu import decode_batch
    from model.sampling import SamplingParams
    from server.engine import Job
    from server.sessions import SessionRecord

    rec = form_of("torch")
    rec.use_state_dtype(dtype, proven=False)

    def run(row_copies: bool):
        batch = decode_batch(rec, 3)
        batch.row_copies = row_copies
        batch.tok.fill_(3)
        for _ in range(4):
            batch.step(rec)
        gone = batch.rows[1]
        batch.leave([gone])
        left = batch.pool.row(gone.session.slot).clone()
        batch.pool.row(gone.session.slot).mul_(1.0 + 2.0**-15)  # (a float32 row float16 must round)
        p = SamplingParams(temperature=1.0, seed=9)
        session = SessionRecord(id="x", model="bench", slot=gone.session.slot, pending=5)
        batch.join([Job(session, [], params=p, generator=p.generator())])
        batch.step(rec)
        return left, batch.state.clone(), batch.pool.state.clone(), batch.seen.clone()

    a, b = run(True), run(False)
    assert a[1].dtype == dtype and a[0].dtype == torch.float32
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_the_engine_re_steps_a_taken_back_turn_in_the_decode_batchs_state_dtype():
    """`_prefill_run` of a rollback (`job.ended`): the tokens are stepped with the state in the decode
    batch's dtype, so a float16 batch's re-steps round at every step, as its decode did."""
    from bench.gpu import decode_batch

    rec = form_of("torch")
    rec.use_state_dtype(F16, proven=False)
    batch = decode_batch(rec, 1)
    start_row = batch.pool.row(batch.rows[0].session.slot).clone()
    steps = []
    real = rec.step
    rec.step = lambda tok, x, out=None: steps.append(x.dtype) or real(tok, x, out=out)
    try:
        from server.engine import Engine

        metrics = type("M", (), {"prefill_tokens": _Count()})()
        fake = type("E", (), {"batch": batch, "pool": batch.pool, "rec": rec, "prefix_cache": None,
                              "_prefilling": [], "metrics": metrics})()  # fmt: skip
        job = batch.rows[0]
        job.ended, job.ingest, job.offset, job.targets = True, [5, 6, 7], 0, []
        fake._prefilling.append(job)
        fake._ingested = lambda j: None
        Engine._prefill_run(fake, [(job, [5, 6, 7])])
    finally:
        del rec.step
    assert steps == [F16] * 3
    x = start_row[:, None].to(F16)
    for t in (5, 6, 7):
        _, x = real(torch.tensor([t]), x)
    assert torch.equal(batch.pool.row(job.session.slot), x[:, 0].float())


class _Count:
    def inc(self, n):
        self.n = n


def test_the_server_setting_is_read_refused_by_name_and_ignored_on_cpu(monkeypatch, caplog):
    from server.config import Settings
    from server.registry import use_state_dtype

    monkeypatch.setenv("S4_STATE_DTYPE", "float16")
    settings = Settings()
    assert settings.state_dtype == "float16" and Settings(state_dtype="float32").state_dtype == "float32"
    rec = form_of("c")
    with caplog.at_level(logging.INFO, logger="server.models"):
        assert use_state_dtype(rec, settings, "tiny") is False
    assert "S4_STATE_DTYPE=float16 ignored on CPU (the C step keeps float32 states)" in caplog.text
    assert rec.state_dtype == torch.float32
    monkeypatch.setenv("S4_STATE_DTYPE", "bfloat16")
    with pytest.raises(Exception, match="state_dtype"):
        Settings()


def test_a_float16_server_answers_alike_through_blocks_and_one_steps_and_its_sessions_carry_over(
    model_dirs, monkeypatch
):
    """The server as S4_STATE_DTYPE=float16 runs it on a GPU, on this CPU: the setting applied (its check
    passed), the graphs uncaptured (float16 buffers), and the GPU engine's two paths, the graph blocks and
    the one-step loop with the device sampler. Concurrent seeded requests (stops, filters, a penalty)
    answer identically on both paths; /v1/models reports float16 and its check. A session continues after
    export and import, and after a fork, exactly as the original: the pool keeps float32 rows holding
    float16 values, so rejoining the batch rounds nothing."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    from server_support import ServerThread

    import server.registry
    from model import recurrent
    from server import Settings
    from server.engine import DecodeBatch

    def state16(rec, settings, name):  # what the registry does on CUDA for a model with a 16-bit step
        return bool(rec.use_state_dtype("float16", proven=False))

    monkeypatch.setattr(server.registry, "use_state_dtype", state16)
    serve_as_on_a_gpu(monkeypatch)  # (the graphs made after the setting: float16 buffers)
    reqs = [{"model": "tiny-text", "prompt": "to be, or not" * (1 + k % 3), "max_new_tokens": 15 + 9 * k,
             "seed": k, "temperature": [0.0, 0.8, 1.2][k % 3], "stop": [[], ["e"], ["th"]][k % 3],
             **[{}, {"top_k": 20, "top_p": 0.9}, {"repetition_penalty": 1.3}][k // 2 % 3]}
            for k in range(6)]  # fmt: skip

    def post(c, r):
        resp = c.post("/v1/generate", json=r)
        assert resp.status_code == 200, resp.text
        return resp.json()["tokens"], resp.json()["finish_reason"]

    def turn(c, sid, seed):
        r = c.post("/v1/generate", json={"model": "tiny-text", "session_id": sid, "max_new_tokens": 12,
                                         "seed": seed, "temperature": 1.0})  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    results = {}
    native = DecodeBatch.native
    for path in ("blocks", "one-step"):
        s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
        engine = s.state.models["tiny-text"].engine
        assert engine.rec.state_dtype == F16 and engine.batch.state.dtype == F16
        assert engine.rec._graphs.state_dtype == F16 and engine.pool.state.dtype == torch.float32
        if path == "one-step":
            monkeypatch.setattr(DecodeBatch, "native", lambda self, rec: False)
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c, ThreadPoolExecutor(6) as ex:
                info = c.get("/v1/models").json()["data"][0]
                check = info["verification"]["state_dtype_check"]
                assert info["state_dtype"] == "float16" and check["tv_mean"] <= recurrent.STATE16_TOL
                families = text_string_to_metric_families(c.get("/metrics").text)
                gauge = [(x.labels["model"], x.value) for f in families for x in f.samples
                         if x.name == "s4_verification_relative_error_ratio"
                         and x.labels["check"] == "state_float16"]  # fmt: skip
                assert gauge == [("tiny-text", check["logits_rel_err"])]
                results[path] = list(ex.map(lambda r: post(c, r), reqs))
                sid = c.post("/v1/sessions", json={"model": "tiny-text", "prompt": "the slings"}).json()
                sid = sid["session_id"]
                turn(c, sid, 1)
                blob = c.get(f"/v1/sessions/{sid}/export").content
                imported = c.post("/v1/sessions/import", content=blob).json()["session_id"]
                fork = c.post(f"/v1/sessions/{sid}/fork").json()["session_id"]
                after = [turn(c, x, 2) for x in (sid, imported, fork)]
                assert after[0] == after[1] == after[2] and len(after[0]) == 12
        finally:
            monkeypatch.setattr(DecodeBatch, "native", native)
            s.stop()
        blocks_run = sum(bb.calls for bb in engine.rec._graphs.blocks.values())
        assert (blocks_run > 0) == (path == "blocks")
    assert results["blocks"] == results["one-step"]
    assert {reason for _, reason in results["blocks"]} == {"stop", "length"}
