"""Reduced-precision weights (issue #16, kind 4): conversion in float64, states in float32, the rest of
the network in the weights' dtype, verified at that dtype within LOGITS_TOL (4u: u = 2^-8 for
bfloat16, 2^-11 for float16) of float64 conv mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import devices
from test_conversion_coverage import conv_reference

from model import ModelConfig, SequenceModel, VerificationError, load
from model.recurrent import LOGITS_TOL, UNIT_ROUNDOFF

HALF = [torch.bfloat16, torch.float16]
SHIPPED_TEXT = Path(__file__).resolve().parent.parent / "checkpoints" / "text-shakespeare"
SHIPPED_AUDIO = SHIPPED_TEXT.parent / "audio-digits-s4"  # isotropic: SaShiMi serves float32 only
TEXT = (
    b"ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n"
    b"Arise, fair sun, and kill the envious moon, who is already sick and pale with grief.\n"
) * 2


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm())


def tiny(kernel: str = "s4", init: str = "legs", d_ff: int = 0) -> SequenceModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, d_state=16, kernel=kernel, init=init, l_max=256,
                      d_ff=d_ff, cauchy_backend="torch")  # fmt: skip
    return SequenceModel(cfg).eval()


def step_all(rec, tokens, state, fault=None):
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        if fault is not None:
            state = fault(state)
        outs.append(logits)
    return torch.stack(outs, 1), state


def test_tolerances_follow_the_significand():
    assert UNIT_ROUNDOFF == {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
    for dtype, u in UNIT_ROUNDOFF.items():
        assert u == torch.finfo(dtype).eps / 2  # eps = 2^(1-p), p = 8 (bf16) or 11 (fp16) significand bits
        assert LOGITS_TOL[dtype] == 4 * u
    assert LOGITS_TOL[torch.float32] == 1e-4


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kernel,init,d_ff", [("s4", "legs", 0), ("s4", "legt", 0), ("s4d", "diag-lin", 64)])
def test_half_precision_net_steps_and_prefills_within_4u_of_the_float32_model(
    kernel, init, d_ff, dtype, device
):
    """The issue's input: net.to(bfloat16).to_recurrent() verified, then prefill raised 'Unsupported dtype
    BFloat16' and step the fused-step error. Now both run, states stay float32, logits come out as
    float32 within 4u of the float32 model's float64 conv mode, and they are not the float32 ones (the
    half-precision weights are really used)."""
    net = tiny(kernel, init, d_ff)
    tokens = torch.randint(0, 64, (3, 256), generator=torch.Generator().manual_seed(1))
    want = conv_reference(net, tokens)
    tol, u = LOGITS_TOL[dtype], UNIT_ROUNDOFF[dtype]
    rec32 = net.to(device).to_recurrent()
    rec = net.to(dtype).to_recurrent()
    net.float()
    assert rec.dtype == dtype and rec.verification["dtype"] == str(dtype).removeprefix("torch.")
    assert rec.verification["step_rel_err"] <= tol and rec.verification["prefill_rel_err"] <= tol
    assert all(p.dtype == dtype for p in rec.net.parameters())
    tok = tokens.to(device)
    stepped, s_step = step_all(rec, tok, rec.init_state(3))
    rec.prefill_by_steps_max_tokens = 0
    first, s = rec.prefill(tok[:, :100], rec.init_state(3))
    second, s_pref = rec.prefill(tok[:, 100:], s)
    prefilled = torch.cat([first, second], 1)
    for got, state in ((stepped, s_step), (prefilled, s_pref)):
        assert got.dtype == torch.float32 and state.dtype == torch.float32 and state.device.type == device
        assert 0.05 * u <= rel(got, want) <= tol, f"{rel(got, want):.2e} ({rel(got, want) / u:.2f}u)"
    assert rel(s_pref, s_step) <= tol
    stepped32, _ = step_all(rec32, tok, rec32.init_state(3))
    assert rel(stepped32, want) <= 1e-4 and rel(stepped, stepped32) >= 0.05 * u
    lost_state, _ = step_all(rec, tok, rec.init_state(3), fault=torch.zeros_like)  # the tolerance sees it
    assert rel(lost_state, want) > 2 * tol
    # to_recurrent(dtype=...) from the float32 net: the SSM converted from the float32 parameters
    rec_cast = net.to(device).to_recurrent(dtype=dtype)
    assert rec_cast.dtype == dtype and rel(step_all(rec_cast, tok, rec_cast.init_state(3))[0], want) <= tol


def test_the_bfloat16_tolerance_rejects_a_bfloat16_state_and_a_lost_state():
    """Not vacuous: on the shipped audio-digits-s4 model (long memory: 1 s clips at 8 kHz), over 512
    samples of a real test clip, the honest bfloat16 step is 0.85u from float64 conv mode, while the
    same step with its state rounded to bfloat16 after every sample (the fault that float32 states
    prevent) is 26u from it, and one that loses its state 113u. How much a bfloat16 state costs depends
    on the model: the shipped text model (FF blocks since issue 15) measures 0.59u, 2.7u and 61u over
    this file's 256-byte text, so there the 4u check catches a lost state but not a bfloat16 one;
    states stay float32 by construction. (Random tiny models barely use their state: < 0.05u.)"""
    from model.data import Dataset

    assert SHIPPED_AUDIO.is_dir(), "checkpoints/audio-digits-s4 is part of the repository"
    net = load(SHIPPED_AUDIO)
    clips = Dataset(SHIPPED_AUDIO / "eval_slice").split("test")
    tokens = torch.from_numpy(clips[:2, 2800:3312].astype("int64"))  # the words' middle, two voices
    want = conv_reference(net, tokens)
    rec = net.to_recurrent(dtype=torch.bfloat16)
    tol = LOGITS_TOL[torch.bfloat16]
    honest, _ = step_all(rec, tokens, rec.init_state(2))
    bf16_state, _ = step_all(rec, tokens, rec.init_state(2), fault=lambda s: s.bfloat16().float())
    lost_state, _ = step_all(rec, tokens, rec.init_state(2), fault=torch.zeros_like)
    assert rel(honest, want) <= tol / 4
    assert 4 * tol < rel(bf16_state, want) < rel(lost_state, want)
    assert rel(lost_state, want) > 10 * tol
    # the text model: a lost state is caught, a bfloat16 one is within the tolerance (measured above)
    net = load(SHIPPED_TEXT)
    tokens = torch.stack([torch.tensor(list(TEXT[:256])), torch.tensor(list(TEXT[40:296]))])
    want = conv_reference(net, tokens)
    rec = net.to_recurrent(dtype=torch.bfloat16)
    assert rel(step_all(rec, tokens, rec.init_state(2))[0], want) <= tol / 4
    assert rel(step_all(rec, tokens, rec.init_state(2), fault=torch.zeros_like)[0], want) > 10 * tol


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_conv_mode_runs_in_half_precision(dtype):
    net = tiny()
    tokens = torch.randint(0, 64, (2, 200), generator=torch.Generator().manual_seed(2))
    want = conv_reference(net, tokens)
    with torch.no_grad():
        got = net.to(dtype)(tokens)
    assert got.dtype == dtype and rel(got, want) <= LOGITS_TOL[dtype]


def test_a_network_that_misses_the_tolerance_at_its_dtype_is_refused_with_the_dtype_and_errors():
    net = tiny()
    want = r"network in bfloat16 .* within rel\. err 0\.001 over 256 tokens \(step \d\.\d\de-0\d, prefill "
    with pytest.raises(VerificationError, match=want):
        net.to_recurrent(dtype=torch.bfloat16, logits_tol=1e-3)


def test_unsupported_and_mixed_dtypes_are_refused_at_conversion():
    net = tiny()
    with pytest.raises(ValueError, match="weights dtype must be one of float64, float32, bfloat16, float16"):
        net.to_recurrent(dtype=torch.float8_e4m3fn)
    net.head.to(torch.bfloat16)
    with pytest.raises(ValueError, match="the weights must share one dtype"):
        net.to_recurrent()
