"""The C DPLR step, row-blocked: each 8 modes' parameters loaded once for up to 8 rows (ssm_step.c
dplr_channel_rows), as the diagonal step does. A row's bits must not depend on the rows beside it, and the
step must be the Woodbury solve of the S4 paper's bilinear step (Section 3.3, Appendix C.2) in float64."""

from __future__ import annotations

import os

import pytest
import torch

from model import ModelConfig, SequenceModel, fused

pytestmark = pytest.mark.skipif(fused.library() is None, reason="needs the C step (a C compiler)")


def woodbury64(x, u, p, R):
    """The exact bilinear step in float64 from the step's own float32 parameters (dBr, dBi, Dr, Di, Pr, Pi,
    Minv, Qr, Qi, cr, ci; model/recurrent.py DPLRStep): g = D⁻¹(2x + ΔB u), s = Minv · Σ (Pr gr + Pi gi),
    x' = g − x − Σⱼ Qⱼ sⱼ, y = Σ Re(c x'). x (B, H, 2, M), u (B, H) → y (B, H), x' (B, H, 2, M)."""
    dBr, dBi, Dr, Di, Pr, Pi, Minv, Qr, Qi, cr, ci = (t.double() for t in p)
    xr, xi, ud = x[:, :, 0].double(), x[:, :, 1].double(), u.double()[..., None]
    fr, fi = 2 * xr + dBr * ud, 2 * xi + dBi * ud
    gr, gi = Dr * fr - Di * fi, Dr * fi + Di * fr
    s = (Pr[None] * gr[:, None] + Pi[None] * gi[:, None]).sum(-1)  # (B, R, H)
    t = torch.einsum("hij,bjh->bih", Minv, s)  # (B, R, H)
    nr = gr - xr - (Qr[None] * t[..., None]).sum(1)
    ni = gi - xi - (Qi[None] * t[..., None]).sum(1)
    return (cr * nr - ci * ni).sum(-1), torch.stack([nr, ni], dim=2)


@pytest.mark.parametrize("M", [3, 8, 13, 32, 35])
@pytest.mark.parametrize("R", [1, 2, 4])
def test_the_c_dplr_step_is_the_woodbury_solve_in_float64_for_every_mode_count_and_rank(M, R):
    """Mode counts with and without a partial last vector, ranks 1 (compiled for it), 2 and the limit 4; in
    place and not; nothing written past a row's last mode. Rel. error ≤ 1e-5 of the float64 result."""
    lib = fused.library()
    g = torch.Generator().manual_seed(M * 10 + R)
    B, H = 3, 5
    x, u = torch.randn(B, H, 2, M, generator=g), torch.randn(B, H, generator=g)
    hm = [torch.randn(H, M, generator=g) * 0.5 for _ in range(4)]  # dBr dBi Dr Di
    low = [torch.randn(R, H, M, generator=g) * 0.3 for _ in range(2)]  # Pr Pi
    minv = torch.randn(H, R, R, generator=g) * 0.5
    q = [torch.randn(R, H, M, generator=g) * 0.3 for _ in range(2)]  # Qr Qi
    c = [torch.randn(H, M, generator=g) for _ in range(2)]
    p = (*hm, *low, minv, *q, *c)
    ptrs = fused.pointers(*p)
    want_y, want_x = woodbury64(x, u, p, R)
    for in_place in (False, True):
        buf = torch.full((B * H * 2 * M + 8,), 7.0)  # a sentinel after the state
        xo, y = buf[: B * H * 2 * M].view(B, H, 2, M), torch.empty(B, H)
        xs = xo.copy_(x) if in_place else x
        fused.dplr_step(lib, xs, xo, u, y, ptrs, R)
        assert bool((buf[-8:] == 7.0).all()), in_place
        for got, want in ((xo, want_x), (y, want_y)):
            assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5, in_place


def _stepped(rec, tokens):
    state, logits = rec.init_state(tokens.shape[0]), []
    for t in range(tokens.shape[1]):
        out, state = rec.step(tokens[:, t], state, out=state)
        logits.append(out.clone())
    return torch.stack(logits, 1), state


@pytest.mark.parametrize(
    "init,d_state,rank",
    [("legs", 64, 1), ("legs", 26, 1), ("legt", 70, 2)],  # 32 modes (official S4's N = 64), 13, 35 (a tail)
)
def test_a_dplr_rows_bits_are_the_row_alone_in_the_step_the_decode_block_and_the_stepped_prefill(
    init, d_state, rank
):
    """Every S4 layer in its DPLR form (randomly initialized: HiPPO's eigenvectors are too ill-conditioned
    to diagonalize). 8 rows per thread plus 3 (full groups of 8 sharing each vector's parameters and a
    partial one): each row's logits and state equal, bit for bit, the row stepped alone; the C prefill by
    steps (k rows together per channel) equals stepping; and both are the torch DPLR step to float32
    rounding (rel. 1e-5)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, d_state=d_state, kernel="s4", init=init,
                      rank=rank, l_max=64, d_ff=32, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    rec, ref = net.to_recurrent(), net.to_recurrent(fused_step=False)
    assert [r["form"] for r in rec.report] == ["dplr", "dplr"], rec.report
    assert rec._net_step is not None
    rows = 8 * len(os.sched_getaffinity(0)) + 3
    tokens = torch.randint(0, 32, (rows, 20), generator=torch.Generator().manual_seed(1))
    together, s_together = _stepped(rec, tokens)
    for r in (0, 7, 8, rows - 1):
        alone, s_alone = _stepped(rec, tokens[r : r + 1])
        assert torch.equal(alone, together[r : r + 1]), r
        assert torch.equal(s_alone, s_together[:, r : r + 1]), r
    _, s_pre = rec.prefill(tokens, rec.init_state(rows))  # ≤ 512 tokens: the recurrence, k rows together
    assert torch.equal(s_pre, s_together)
    want, s_want = _stepped(ref, tokens)
    assert float((together - want).norm() / want.norm()) <= 1e-5
    assert float((s_together - s_want).norm() / s_want.norm()) <= 1e-5
