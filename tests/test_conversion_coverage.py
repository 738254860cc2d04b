"""Every SSM configuration ModelConfig allows converts to a verified recurrent form, or raises
VerificationError, on CPU and on CUDA when present (issue #16, kind 3).

The grid: kernel s4 × init (legs, legt, lagt, fout) × rank (1, 2) × disc (default, bilinear), and s4d ×
init (legs, diag-lin, diag-inv) × disc (default, zoh, bilinear) (S4D has no low-rank term: its rank is
only range-checked), each at d_state 2 (one conjugate pair), 16 and 64 (the shipped size, where LegS's
eigenvectors are too ill-conditioned for the diagonal form and the DPLR step takes over); plus, at
d_state 16, the fields official checkpoints bring: no bound on Re Λ (re_lambda_max None: the skew
measures' Re Λ = 0), one Δ per mode (s4d dt_tied False) and per-layer kernel lengths (l_kernel, odd
and shorter than the probe too). At initialization every one of them verifies at the default tolerance
(none raises VerificationError: the diagonal form or the exact DPLR fallback reproduces the float64
kernel to ≤ 1.8e-6 here, and to ≤ 1.6e-5 at d_state 128 and 256 with L = 1024), and every one raises
VerificationError, and nothing else, when the tolerance cannot be met (1e-12), which builds every
fallback form.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import devices

from model import ModelConfig, SequenceModel, VerificationError
from model.hippo import MEASURES
from model.kernel import S4D_INITS
from model.layer import fft_conv
from model.recurrent import DiagonalSSM, DPLRStep

L = 64  # trained length and probe length: small, the grid is large
D_STATES = (2, 16, 64)
GRID = [
    ("s4", i, r, d, n, ())
    for i, r, d, n in itertools.product(MEASURES, (1, 2), (None, "bilinear"), D_STATES)
    if (i, r) != ("legt", 1)  # refused by the config: legt's low-rank correction has 2 columns
]
GRID += [
    ("s4d", i, 1, d, n, ()) for i, d, n in itertools.product(S4D_INITS, (None, "zoh", "bilinear"), D_STATES)
]
GRID += [("s4", i, 2 if i == "legt" else 1, None, 16, (("re_lambda_max", None),)) for i in MEASURES]
GRID += [("s4d", i, 1, None, 16, (("re_lambda_max", None),)) for i in S4D_INITS]
GRID += [
    ("s4d", i, 1, d, 16, (("dt_tied", False),)) for i, d in itertools.product(S4D_INITS, ("zoh", "bilinear"))
]
GRID += [
    (k, i, 1, None, 16, (("l_kernel", [33, 64]),))
    for k, i in (("s4", "legs"), ("s4", "fout"), ("s4d", "diag-lin"))
]
# Which combinations raise VerificationError at the default tolerance (1e-4), and why: none at init.
REFUSED: set[str] = set()  # case ids
# float32 recurrent form vs float64 conv mode, as in tests/test_recurrent.py
LOGITS_REL_TOL, LOGP_TOL = 1e-4, 1e-3


def make(kernel, init, rank, disc, d_state, extra=()) -> SequenceModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=4, n_layers=2, d_state=d_state, kernel=kernel, init=init,
                      rank=rank, disc=disc, l_max=L, cauchy_backend="torch", **dict(extra))  # fmt: skip
    return SequenceModel(cfg).eval()


def conv_reference(net: SequenceModel, tokens: torch.Tensor) -> torch.Tensor:
    """Conv-mode logits in float64 throughout: the kernels computed in float64 (torch Cauchy), the
    network in float64 on CPU."""
    ref = SequenceModel(net.config)
    ref.load_state_dict(net.state_dict())
    ref = ref.double().eval()
    with torch.no_grad():
        Ks = [k(tokens.shape[1], dtype=torch.float64, backend="torch") for k in ref.kernels()]
        ssms = [lambda u, K=K: fft_conv(u.transpose(1, 2), K).transpose(1, 2) for K in Ks]
        return ref(tokens.cpu(), ssms=ssms)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got, want = got.double().cpu(), want.double().cpu()
    rel = float((got - want).norm() / want.norm())
    lp = float((got.log_softmax(-1) - want.log_softmax(-1)).abs().max())
    assert rel <= LOGITS_REL_TOL and lp <= LOGP_TOL, f"{what}: ‖Δ‖/‖ref‖ {rel:.2e}, max |Δ log p| {lp:.2e}"


def case_id(case) -> str:
    kernel, init, rank, disc, d_state, extra = case
    return "-".join([kernel, init, f"r{rank}", str(disc), f"N{d_state}"] + [f"{k}={v}" for k, v in extra])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_every_ssm_configuration_converts_and_reproduces_conv_mode_or_raises_verification_error(case, device):
    net = make(*case).to(device)
    tokens = torch.randint(0, 16, (2, L), generator=torch.Generator().manual_seed(1)).to(device)
    want = conv_reference(net, tokens)
    combo = case_id(case)
    recs = {}
    for fused_step in (True, False):  # fused_step=False builds no C pointers at all
        try:
            recs[fused_step] = net.to_recurrent(fused_step=fused_step)
        except VerificationError:
            assert combo in REFUSED, f"{combo} raised VerificationError"
            return
    assert combo not in REFUSED, f"{combo} verified: take it off REFUSED"
    for fused_step, rec in recs.items():
        assert all(r["rel_err"] <= 1e-4 for r in rec.report)
        assert all(isinstance(f, DiagonalSSM | DPLRStep) for f in rec.layers)
        assert rec.verification["step_rel_err"] <= 1e-4 and rec.verification["prefill_rel_err"] <= 1e-4
        state, outs = rec.init_state(2), []
        for t in range(L):
            logits, state = rec.step(tokens[:, t], state)
            outs.append(logits)
        assert_logits_close(torch.stack(outs, 1), want, f"step (fused_step={fused_step})")
        rec.prefill_by_steps_max_tokens = 0  # the parallel form, from a zero then from a nonzero state
        first, s = rec.prefill(tokens[:, : L // 2], rec.init_state(2))
        second, s = rec.prefill(tokens[:, L // 2 :], s)
        assert_logits_close(torch.cat([first, second], 1), want, f"prefill (fused_step={fused_step})")
        assert s.dtype == torch.float32 and float((s - state).norm() / state.norm()) <= 1e-4
    with pytest.raises(VerificationError, match=r"layer 0: .*rel\. err 1e-12"):
        net.to_recurrent(tol=1e-12)  # every form is built and refused: no other error on the way


@pytest.mark.parametrize("fused_step", [True, False])
def test_the_issue_input_converts_with_and_without_the_fused_step(fused_step):
    """s4/legt (rank 2) raised 'fused step needs contiguous float32 CPU tensors' even with
    fused_step=False: the DPLR fallback's M⁻¹ came from torch.linalg.inv column-major, and every form
    built its C pointers whether the fused step was wanted or not."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, d_state=16, kernel="s4", init="legt", l_max=256,
                      cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    rec = net.to_recurrent(fused_step=fused_step)
    assert [r["form"] for r in rec.report] == ["dplr", "dplr"] and rec.layers[0].Minv.shape == (32, 2, 2)
    assert rec.layers[0].Minv.is_contiguous()
    assert (rec._fused is not None) == fused_step
    assert all(bool(f._fused_ptrs) == fused_step for f in rec.layers)  # fused_step=False: no C pointers
    tokens = torch.randint(0, 64, (2, 256), generator=torch.Generator().manual_seed(1))
    state, outs = rec.init_state(2), []
    for t in range(256):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    assert_logits_close(torch.stack(outs, 1), conv_reference(net, tokens), "step")


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(kernel="s4", rank=0), "rank must be 1 or 2"),
        (dict(kernel="s4", rank=3), "rank must be 1 or 2"),  # raised inside the kernel's Woodbury before
        (dict(kernel="s4d", rank=0), "rank must be an integer ≥ 1, got 0"),
        (dict(kernel="s4", init="legt", rank=1), "rank must be 2 for init 'legt'"),
        (dict(kernel="s4", disc="zoh"), "disc for kernel 's4'"),
        (dict(kernel="s4d", disc="euler"), "disc for kernel 's4d'"),  # built, then failed at conversion
    ],
)
def test_configurations_without_a_kernel_are_refused_by_the_config(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(d_state=8, l_max=64, **fields)


def test_non_finite_ssm_parameters_raise_verification_error():
    net = make("s4", "legs", 1, None, 16)
    with torch.no_grad():
        net.blocks[1].layer.kernel.log_dt[0] = float("nan")
    with pytest.raises(VerificationError, match="layer 1: non-finite SSM parameters: Lambda|layer 1: .*dt"):
        net.to_recurrent()


def test_non_finite_weights_outside_the_ssm_fail_the_network_check():
    net = make("s4d", "diag-lin", 1, None, 16)
    with torch.no_grad():
        net.head.weight[3, 0] = float("inf")
    with pytest.raises(VerificationError, match="in float32 does not reproduce the float64 conv-mode logits"):
        net.to_recurrent()


def test_a_dplr_state_over_the_c_step_limits_runs_the_torch_step(monkeypatch):
    """The C DPLR step handles at most 1024 modes (a model of d_state > 2048); a larger state must not
    convert and then fail at its first step: it runs the torch step (here the limit is lowered to 4)."""
    from model import fused

    net = make("s4", "legs", 1, None, 64)
    tokens = torch.randint(0, 16, (2, L), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fused, "MAX_MODES", 4)
    rec = net.to_recurrent()
    assert {f.form for f in rec.layers} == {"dplr"} and rec.M == 32
    assert rec._fused is None and rec._net_step is None
    state, outs = rec.init_state(2), []
    for t in range(L):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    assert_logits_close(torch.stack(outs, 1), conv_reference(net, tokens), "torch step")
