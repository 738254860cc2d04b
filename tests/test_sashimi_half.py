"""SaShiMi with 16-bit weights (S4_DTYPE=bfloat16 / float16), the isotropic model's policy
(model/recurrent.py, tests/test_recurrent_dtype.py, tests/test_net_step_half.py): conversion in float64
from the float32 kernel parameters, the state row float32 (SSM states, pool buffers, phase), the
whole-network C step reading the blocks' and pools' linear weights in their 16-bit dtype and computing in
float32, the torch ops (the prefill; a step without the C step) in the dtype where the CPU multiplies it
natively, else in float32 on the widened weights; verified at the dtype within LOGITS_TOL (4u: u = 2^-8
for bfloat16, 2^-11 for float16) of float64 conv mode.

References are independent float64 conv mode (test_sashimi.reference_logits: dense powers of each S4
layer's real system): on the float32 weights (what serving in 16 bits costs, ~0.6u-1.4u measured on
these tiny models) and on the same weights rounded to the dtype (what the arithmetic adds: float32
rounding for the C step, ≤ 2e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import devices
from test_sashimi import reference_logits

from model import ModelConfig, VerificationError, build, fused, recurrent
from model.recurrent import LOGITS_TOL, UNIT_ROUNDOFF

HALF = [torch.bfloat16, torch.float16]
V, L = 32, 128
# the pools, kernels, norms and U-Net: every combination the C step and the torch ops branch on
VARIANTS = {
    "pool44-s4-layer": dict(pool=[4, 4], kernel="s4", norm="layer"),
    "pool2-s4d-tln-unet": dict(pool=[2], kernel="s4d", norm="tln", unet=True),
    "pool44-s4d-tln": dict(pool=[4, 4], kernel="s4d", norm="tln"),
    "pool2-s4-layer-unet": dict(pool=[2], kernel="s4", norm="layer", unet=True),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (tests/conftest.py)


def make(**kw):
    """A tiny SaShiMi (H = 16, one (S4, FF) pair per level, ff = 2: FF width 32), trained length L."""
    torch.manual_seed(0)
    args = dict(
        arch="sashimi", vocab_size=V, d_model=16, n_layers=1, d_state=16, l_max=L, cauchy_backend="torch"
    )
    return build(ModelConfig(**{**args, **kw})).eval()


def rounded(net, dtype: torch.dtype):
    """The net with every weight outside the SSM kernels rounded to `dtype` (kept in float32): what a
    16-bit model serves (its SSM is converted from the float32 kernel parameters, before the cast)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".kernel." not in name:
                p.copy_(p.to(dtype).float())
    return net


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def step_all(rec, tokens, state):
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


def tokens_(B: int = 3, T: int = L, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_16_bit_sashimi_steps_and_prefills_within_4u_of_float64_conv_mode(variant, dtype, device):
    """Verified at its dtype (the report names it); the weights are 16-bit, the state float32, the
    logits float32; the step (the C step on CPU, the torch ops on CUDA) and the parallel prefill (split
    mid-block, rows continuing from the state it left) are within 4u of float64 conv mode on the
    float32 weights, and at least 0.05u from it (the 16-bit weights are really used: the float32 model
    is ~1e-6 away); the prefill's state is the stepped one within the tolerance."""
    net = make(**VARIANTS[variant])
    tok = tokens_()
    want = reference_logits(net, tok)
    tol, u = LOGITS_TOL[dtype], UNIT_ROUNDOFF[dtype]
    rec = net.to_recurrent(dtype=dtype, device=device)
    name = str(dtype).removeprefix("torch.")
    v = rec.verification
    assert rec.dtype == dtype and v["dtype"] == name and v["tol"] == tol
    assert v["step_rel_err"] <= tol and v["prefill_rel_err"] <= tol
    assert all(p.dtype == dtype for p in rec.net.parameters())
    assert (rec._net_step is not None and rec.decode_block_ready(3)) == (device == "cpu")  # CUDA: torch ops
    tok = tok.to(device)
    stepped, s_step = step_all(rec, tok, rec.init_state(3))
    first, s = rec.prefill(tok[:, :37], rec.init_state(3))
    second, s_pref = rec.prefill(tok[:, 37:], s)
    prefilled = torch.cat([first, second], 1)
    for got, state in ((stepped, s_step), (prefilled, s_pref)):
        assert got.dtype == torch.float32 and state.dtype == torch.float32 and state.device.type == device
        assert state.shape == (3, rec.layout.numel)
        assert 0.05 * u <= rel(got, want) <= tol, f"{rel(got, want) / u:.2f}u"
    assert rel(s_pref, s_step) <= tol
    assert torch.equal(rec.phases(s_pref), rec.phases(s_step))
    rec.check_state(s_pref)  # a 16-bit model's states are within the float32 bounds of its weights
    rec.check_state(s_step)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", ["pool44-s4-layer", "pool2-s4d-tln-unet"])
def test_the_16_bit_sashimi_c_step_is_float64_arithmetic_on_the_16_bit_weights(variant, dtype):
    """The C step against float64 conv mode on the same rounded weights: float32 rounding (≤ 2e-5), far
    inside 4u. Its blocks' and pools' linear weights are kept as 16-bit copies (half the bytes), the
    rest float32. Rows at different pooling phases (prompts of 0..period−1 tokens, then one batch) each
    give, bit for bit, the row stepped alone."""
    net = make(**VARIANTS[variant])
    tok = tokens_(seed=2, T=64)
    want = reference_logits(rounded(net, dtype), tok)
    rec = net.to_recurrent(dtype=dtype)
    stepped, _ = step_all(rec, tok, rec.init_state(3))
    assert rel(stepped, want) <= 2e-5, f"{rel(stepped, want):.2e}"
    kept = rec._net_step._weights.keep
    sixteen = [t for t in kept if isinstance(t, torch.Tensor) and t.dtype == dtype]
    levels = len(rec.pool) + 1
    blocks_per_level = 2 if rec.config.unet else 1  # S4 + FF pairs per level (the center has one)
    pairs = levels + (levels - 1) * (blocks_per_level - 1)
    assert len(sixteen) == 3 * pairs + 2 * len(rec.pool)  # out, up, down per pair; each pool's two linears
    assert all(t.dtype in (dtype, torch.float32) for t in kept if isinstance(t, torch.Tensor))
    # rows at every phase of the period, in one batch and alone
    P = rec.period
    heads = [torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n)) for n in range(P)]
    states = [rec.prefill(h, rec.init_state(1))[1] if h.shape[1] else rec.init_state(1) for h in heads]
    batch = torch.cat(states)
    assert sorted(rec.phases(batch).tolist()) == list(range(P))
    cont = tokens_(B=P, T=2 * P + 1, seed=3)
    together, _ = step_all(rec, cont, batch)
    for r in range(P):
        alone, _ = step_all(rec, cont[r : r + 1], states[r])
        assert torch.equal(together[r : r + 1], alone), r


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_torch_ops_compute_in_float32_where_the_cpu_has_no_16_bit_matmul(monkeypatch, dtype):
    """The prefill (SaShiMi's has no C form) and the torch-op step (no C step built; with the per-layer
    fused SSM steps, or none: a CUDA device's path) of a 16-bit model:
    on a CPU without native 16-bit matmul they run a float32 copy of the 16-bit weights, float64
    arithmetic on those weights to float32 rounding (≤ 2e-5); where the CPU has it, in the dtype itself,
    ≥ 20x further and within 4u. Both CPUs are simulated here, so the test holds on either. Rows at
    different phases in one prefill (grouped by phase) give each row's own prefill within the
    tolerance."""
    net = make(**VARIANTS["pool44-s4d-tln"])
    tok = tokens_(seed=4, T=96)
    want = reference_logits(rounded(net, dtype), tok)
    errs = {}
    for native in (False, True):
        monkeypatch.setattr(recurrent, "native_matmul", lambda d, dev, native=native: native)
        rec = net.to_recurrent(dtype=dtype)
        assert rec.compute_dtype == (dtype if native else torch.float32)
        assert all(p.dtype == rec.compute_dtype for p in rec._net_ops.parameters())
        assert all(p.dtype == dtype for p in rec.net.parameters())  # the served weights stay 16-bit
        first, s = rec.prefill(tok[:, :41], rec.init_state(3))
        second, _ = rec.prefill(tok[:, 41:], s)
        rec._net_step = None  # the torch ops around the per-layer fused SSM steps
        stepped, _ = step_all(rec, tok, rec.init_state(3))
        rec._fused = None  # the torch ops throughout (a CUDA device's path)
        torch_only, _ = step_all(rec, tok, rec.init_state(3))
        errs[native] = (rel(torch.cat([first, second], 1), want), rel(stepped, want), rel(torch_only, want))
        # rows at phases 3, 0 and 7 prefilled together, each against itself alone
        starts = [rec.prefill(tok[r : r + 1, :n], rec.init_state(1))[1] for r, n in enumerate((3, 16, 7))]
        mixed, s_mixed = rec.prefill(tok[:, 50:70], torch.cat(starts))
        for r in range(3):
            alone, s_alone = rec.prefill(tok[r : r + 1, 50:70], starts[r])
            assert rel(mixed[r : r + 1], alone) <= LOGITS_TOL[dtype] / 4
            assert rel(s_mixed[r : r + 1], s_alone) <= LOGITS_TOL[dtype] / 4
    assert max(errs[False]) <= 2e-5, errs
    assert all(20 * max(errs[False]) <= e <= LOGITS_TOL[dtype] for e in errs[True]), errs


def test_a_16_bit_sashimi_that_misses_the_tolerance_is_refused_with_the_dtype_and_errors():
    want = r"SaShiMi network in bfloat16 .* within rel\. err 0\.0001 over 128 tokens \(step \d\.\d\de-0\d, "
    with pytest.raises(VerificationError, match=want):
        make().to_recurrent(dtype=torch.bfloat16, logits_tol=1e-4)


def test_unsupported_and_mixed_dtypes_are_refused_and_float64_keeps_the_torch_ops():
    net = make(kernel="s4d")
    with pytest.raises(ValueError, match="weights dtype must be one of float64, float32, bfloat16, float16"):
        net.to_recurrent(dtype=torch.float8_e4m3fn)
    rec64 = net.to_recurrent(dtype=torch.float64)  # the C step would round float64 weights: torch ops
    assert rec64._net_step is None and rec64.verification["step_rel_err"] <= 1e-4
    with pytest.raises(ValueError, match="the SaShiMi C step takes float32, bfloat16, float16 weights"):
        fused.SaShiMiStep(fused.library(), rec64)
    net.head.to(torch.bfloat16)
    with pytest.raises(ValueError, match="the weights must share one dtype"):
        net.to_recurrent()
