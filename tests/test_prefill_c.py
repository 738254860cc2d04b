"""The C prefill pass (model.recurrent `_fused_prefill`, model/csrc/ssm_step.c `ssm_prefill`) against the
torch ops of the same blocked form, layer by layer: float32 and bfloat16 inputs, 1–3 rows, lengths around
the block boundaries, zero and nonzero starting states, diagonal and DPLR layers; its bfloat16 outputs
rounded exactly as torch rounds; the torch path where the C vector width does not divide H.
(Against stepping, through whole networks: tests/test_prefill_blocks.py.)"""

import pytest
import torch

from model import fused
from model.network import ModelConfig, SequenceModel
from model.recurrent import CHUNK, DiagonalSSM, DPLRStep, pad_fused_params
from tests.test_recurrent import make, step_all

LENGTHS = [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 4 * CHUNK + 3, 9 * CHUNK]
# float32, different summation orders: measured ≤ 1e-6 relative on these layers and the shipped text model
TOL = 1e-5


@pytest.fixture(scope="module", params=[("s4d", "diag-inv", DiagonalSSM), ("s4", "legs", DPLRStep)],
                ids=["diagonal", "dplr"])  # fmt: skip
def pair(request):
    """A layer of one net converted with the C step (its prefill the C pass; the torch tables dropped) and
    without it (the torch ops)."""
    kernel, init, cls = request.param
    torch.manual_seed(0)
    net = make(kernel, init, l_max=1024).eval()
    f, t = net.to_recurrent().layers[0], net.to_recurrent(fused_step=False).layers[0]
    assert type(f) is cls and f._prefill_c is not None and f.in_tab is None and f.conv_tab is None
    assert type(t) is cls and t._prefill_c is None
    return f, t


@pytest.fixture(scope="module")
def form(pair):
    return pair[0]


def _both(pair, u, x0, zero):
    return pair[0].prefill(u, x0, zero), pair[1].prefill(u, x0, zero)


def _rel(a, b):
    return float((a - b).abs().norm() / b.abs().norm().clamp(min=1e-30))


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("start", ["zero", "nonzero"])
def test_c_prefill_matches_torch_ops(pair, L, B, start):
    form = pair[0]
    g = torch.Generator().manual_seed(L * 10 + B)
    u = torch.randn(B, L, form.H, generator=g)
    x0 = torch.zeros(B, form.H, form.M, dtype=torch.complex64)
    if start == "nonzero":
        x0 = torch.randn(B, form.H, form.M, dtype=torch.complex64, generator=g)
    (y, xL), (y_ref, xL_ref) = _both(pair, u, x0, start == "zero")
    assert y.dtype == torch.float32 and y.shape == (B, L, form.H) and xL.shape == xL_ref.shape
    assert _rel(y, y_ref) <= TOL and _rel(xL, xL_ref) <= TOL


@pytest.mark.parametrize("c", [True, False], ids=["c", "torch"])
def test_an_empty_prompt_leaves_the_state_and_no_rows_is_empty(pair, c):
    form = pair[0] if c else pair[1]
    x0 = torch.randn(2, form.H, form.M, dtype=torch.complex64)
    y, xL = form.prefill(torch.zeros(2, 0, form.H), x0, False)
    assert y.shape == (2, 0, form.H) and torch.equal(xL, x0)
    y, xL = form.prefill(torch.zeros(0, 5, form.H), x0[:0], False)  # no rows
    assert y.shape == (0, 5, form.H) and xL.shape == (0, form.H, form.M)


@pytest.mark.parametrize("L", [CHUNK + 1, 5 * CHUNK - 2])
def test_c_prefill_bfloat16_is_its_float32_result_rounded(pair, L):
    form = pair[0]
    """bfloat16 in and out: read exactly, computed in float32 as for float32 input, rounded once by torch's
    rule: bit-identical to the float32 pass on the same values followed by .to(torch.bfloat16)."""
    g = torch.Generator().manual_seed(L)
    u = torch.randn(2, L, form.H, generator=g).to(torch.bfloat16)
    x0 = torch.randn(2, form.H, form.M, dtype=torch.complex64, generator=g)
    y16, x16 = form.prefill(u, x0, False)
    y32, x32 = form.prefill(u.float(), x0, False)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16.view(torch.int16), y32.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(x16, x32)
    # and within bfloat16 rounding of the torch ops (which compute on u.float() and round the same way)
    y_ref, _ = pair[1].prefill(u, x0, False)
    assert _rel(y16.float(), y_ref.float()) <= 2.0**-8


def _gain_form(H: int, gain: float) -> DiagonalSSM:
    """A diagonal layer with μ = 0 and 2 Re(b c) = gain: y_t = gain · u_t exactly (K_0 = gain, every other
    term 0), so its float32 outputs are known before rounding."""
    mu = torch.zeros(H, 1, dtype=torch.complex128)
    b = torch.ones(H, 1, dtype=torch.complex128)
    f = DiagonalSSM(mu, b, torch.full((H, 1), gain / 2, dtype=torch.complex128), torch.device("cpu"))
    pad_fused_params(f, 1)
    assert f._prefill_c is not None
    return f


def test_c_prefill_bfloat16_rounding_is_torchs():
    """Round to nearest even, ties included (u · 1.5 has 9 significant bits: half of them are ties),
    overflow to inf, subnormals, ±inf, against torch's .to(), bit for bit; NaN stays NaN."""
    H = fused.library().ssm_prefill_width() * 2
    f = _gain_form(H, 1.5)
    vals = torch.cat([torch.randn(4 * CHUNK * H), torch.tensor([3.3e38, -3.3e38, 1e-40, -2e-39, 2.0**-133])])
    u = torch.nn.functional.pad(vals, (0, -len(vals) % H)).to(torch.bfloat16).view(1, -1, H)
    y, _ = f.prefill(u, torch.zeros(1, H, 1, dtype=torch.complex64), True)
    want = (u.float() * 1.5).to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    assert int(((u.float() * 1.5).to(torch.bfloat16).float() != u.float() * 1.5).sum()) > 1000  # rounded
    for special in (float("nan"), float("inf"), -float("inf")):  # last position only: 0 · inf is NaN
        u2 = u.clone()
        u2[0, -1, 3] = special
        y2, _ = f.prefill(u2, torch.zeros(1, H, 1, dtype=torch.complex64), True)
        want2 = (u2.float() * 1.5).to(torch.bfloat16)
        nan = want2.isnan()  # NaN's bits are not specified (torch's vector path keeps the payload): any NaN
        assert torch.equal(y2.isnan(), nan), special
        assert torch.equal(y2.view(torch.int16)[~nan], want2.view(torch.int16)[~nan]), special


def test_torch_ops_where_the_vector_width_does_not_divide_H():
    vw = fused.library().ssm_prefill_width()
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=32, d_model=vw // 2 * 3, n_layers=2, d_state=32, kernel="s4d", init="legs",
                      l_max=256, d_ff=64, cauchy_backend="torch")  # fmt: skip
    rec = SequenceModel(cfg).eval().to_recurrent()
    assert all(f._prefill_c is None for f in rec.layers)
    rec.prefill_by_steps_max_tokens = 0
    tokens = torch.randint(0, 32, (2, 2 * CHUNK + 5))
    got, got_state = rec.prefill(tokens, rec.init_state(2))
    want, want_state = step_all(rec, tokens, rec.init_state(2))
    assert _rel(got, want) <= 1e-4 and _rel(got_state, want_state) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_go_through_float32(form, dtype):
    """The torch tables are gone once the C tables exist, so every dtype takes the C pass: float16 and
    float64 inputs as float32, the output cast back (bit for bit that)."""
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, CHUNK + 9, form.H, generator=g).to(dtype)
    x0 = torch.randn(2, form.H, form.M, dtype=torch.complex64, generator=g)
    y, xL = form.prefill(u, x0, False)
    y32, x32 = form.prefill(u.float(), x0, False)
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype)) and torch.equal(xL, x32)


@pytest.mark.parametrize("c", [True, False], ids=["c", "torch"])
def test_a_prefill_from_a_nonzero_state_with_real_mode_slots_matches_a_float64_recurrence(c):
    """Real modes share a slot, one coordinate each (λ₁ ≠ λ₂: `real_block_slots`), and a prefill from a
    nonzero state applies the slot's block power to it (`_apply_pow`, whose second coordinate goes by λ₂).
    The layers above have complex slots only (λ₂ = λ₁), and their C pass is compared with the torch ops,
    which share `_apply_pow`: with λ₁ in place of λ₂ there, every test above passed. Here a layer of 2
    complex and 3 real modes prefills a prompt in two parts (the second from the state the first left), on
    either path, against the modes' recurrence x ← μ x + b u, y = 2 Re Σ c x in float64: within 1e-6
    (float32 blocks of 64 terms; measured ≤ 1e-7)."""
    H = fused.library().ssm_prefill_width() * 2
    g = torch.Generator().manual_seed(3)
    cplx = 0.95 * torch.exp(1j * torch.rand(H, 2, generator=g, dtype=torch.float64) * 3)
    real = torch.tensor([0.9, -0.7, 0.5], dtype=torch.float64).expand(H, 3)
    mu = torch.cat([cplx, real.to(torch.complex128)], 1)
    b = torch.randn(H, 5, generator=g, dtype=torch.complex128)
    cc = torch.randn(H, 5, generator=g, dtype=torch.complex128)
    f = DiagonalSSM(mu, b, cc, torch.device("cpu"))
    assert f.M == 4 and not bool(f.is_cplx[:, 3].any())  # 2 complex slots, 2 slots for the 3 real modes
    if c:
        pad_fused_params(f, f.M)
    assert (f._prefill_c is not None) == c
    L0, L = CHUNK + 5, 2 * CHUNK + 7
    u = torch.randn(2, L0 + L, H, generator=g)
    y0, x = f.prefill(u[:, :L0], torch.zeros(2, H, f.M, dtype=torch.complex64), True)
    y1, _ = f.prefill(u[:, L0:], x, False)
    xs, want = torch.zeros(2, H, 5, dtype=torch.complex128), []
    for t in range(L0 + L):
        xs = mu * xs + b * u[:, t, :, None].double()
        want.append(2 * (cc * xs).sum(-1).real)
    want = torch.stack(want, 1)
    assert _rel(y0, want[:, :L0]) <= 1e-6 and _rel(y1, want[:, L0:]) <= 1e-6
