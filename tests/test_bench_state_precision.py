"""bench.state_precision: the 16-bit state emulation, the Hankel singular values against a dense
float64 reference, and a quick run of the whole benchmark."""

import json

import numpy as np
import pytest
import torch

from bench import state_precision as sp


def dense_hsv(lam: np.ndarray, b: np.ndarray, c: np.ndarray, T: int = 4000) -> np.ndarray:
    """The reference: singular values of the Hankel matrix of the impulse response h_t = c λ^t b
    (t ≥ 0), built densely in float64 (the modes decay well within T)."""
    h = (c[:, None] * lam[:, None] ** np.arange(2 * T) * b[:, None]).sum(0).real
    idx = np.arange(T)
    return np.linalg.svd(h[idx[:, None] + idx[None, :]], compute_uv=False)


def test_hankel_singular_values_match_the_dense_hankel_matrix():
    rng = np.random.default_rng(0)
    M = 6  # conjugate pairs, so the system is real
    r = rng.uniform(0.5, 0.99, M)
    lam1 = r * np.exp(1j * rng.uniform(0.1, 3.0, M))
    b1 = rng.normal(size=M) + 1j * rng.normal(size=M)
    c1 = rng.normal(size=M) + 1j * rng.normal(size=M)
    lam, b, c = (np.concatenate([v, v.conj()]) for v in (lam1, b1, c1))
    got = sp.hankel_singular_values(lam, b, c)
    want = dense_hsv(lam, b, c)[: 2 * M]
    assert got.shape == (2 * M,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9 * want[0])  # measured ≤ 1e-9 relative


def test_orders_of_a_system_with_one_dominant_mode():
    """A form whose channel 0 has one mode far above the others: the order for ε = 1e-2 is that pair."""

    class Form:
        H, M, form = 1, 3, "diagonal"
        lam64 = [torch.tensor([[0.9 + 0.1j, 0.3 + 0.0j, 0.2 + 0.1j]], dtype=torch.complex128),
                 torch.tensor([[0j, 0.1 + 0j, 0j]], dtype=torch.complex128)]  # fmt: skip
        b64 = torch.tensor([[[1.0, 1e-4, 1e-4], [0.5, 1e-4, 1e-4]]], dtype=torch.float64)
        w64 = torch.tensor([[[1.0, 1e-4, 1e-4], [0.5, 1e-4, 1e-4]]], dtype=torch.float64)
        is_cplx = torch.tensor([[True, False, True]])

    o = sp.orders(Form)
    assert o["coordinates"] == 6
    assert o["0.01"] == {"mean": 2.0, "max": 2}  # λ, λ̄ of slot 0; the rest's σ ~ 1e-8
    assert o["0.0001"]["max"] == 2


def test_decay_margins_count_each_mode_once():
    """A complex slot (one pair) with 1 − |λ| = 1e-3 (below bfloat16's half ulp 2⁻⁹, above float16's 2⁻¹¹),
    a real slot with modes 0.9999 (below both) and 0.5: shares 2/3 and 1/3, the smallest gap 1e-4."""

    class Form:
        lam64 = [torch.tensor([[0.999 + 0j, 0.9999 + 0j]], dtype=torch.complex128),
                 torch.tensor([[0.7 + 0j, 0.5 + 0j]], dtype=torch.complex128)]  # fmt: skip
        is_cplx = torch.tensor([[True, False]])

    d = sp.decay_margins([("0", Form)])
    assert d["modes"] == 3
    assert d["share_below_half_ulp_bfloat16"] == pytest.approx(2 / 3)
    assert d["share_below_half_ulp_float16"] == pytest.approx(1 / 3)
    assert d["min_1_minus_abs_lambda"] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["audio-digits-s4", "audio-digits"])
def test_complex_modes_reproduce_the_forms_kernel(name):
    from model import load

    rec = load(sp.ROOT / "checkpoints" / name).to_recurrent()
    forms = sp.diagonal_forms(rec)
    assert len(forms) == (4 if name == "audio-digits-s4" else 12)
    assert max(sp.check_modes(f, T=32) for _, f in forms[:2]) <= 1e-9  # measured ~1e-15


def test_a_16_bit_state_is_rounded_between_steps_and_the_phase_kept():
    """float32 vs a float16 state on a SaShiMi: the runs differ (the rounding happens), the phase counter
    is never rounded (its rows stay at one phase: rec.phases would raise otherwise), and bfloat16 rounds
    coarser than float16."""
    from model import load

    rec = load(sp.ROOT / "checkpoints" / "audio-digits").to_recurrent()
    parts = sp.stored_parts(rec)
    phase = rec.layout.slots["phase"]
    assert parts == [(0, phase.offset), (phase.offset + 1, rec.layout.numel)]
    x, y = sp.eval_batch(sp.ROOT / "checkpoints" / "audio-digits", {"rows": 2, "tokens": 1000})
    runs = {k: sp.teacher_forced(rec, x, y, d) for k, d in sp.DTYPES.items()}
    assert x.shape == (2, 1000) and runs["float32"]["logp"].shape == (2, 1000, 256)
    f16 = sp.compare(runs["float16"]["logp"], runs["float32"]["logp"])
    bf16 = sp.compare(runs["bfloat16"]["logp"], runs["float32"]["logp"])
    assert 0 < f16["tv_mean"] < bf16["tv_mean"]
    assert sp.compare(runs["float32"]["logp"], runs["float32"]["logp"])["tv_max"] == 0


def test_quick_run_writes_every_model_dtype_and_layer(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "ROOT", tmp_path)  # results/quick under tmp
    monkeypatch.setattr(common, "results_dir", lambda quick: tmp_path)
    sp.main(["--quick"])
    data = json.loads((tmp_path / "state_precision.json").read_text())
    assert [r["model"] for r in data["models"]] == list(sp.MODELS)
    for r in data["models"]:
        assert set(r["dtypes"]) == set(sp.DTYPES) and r["dtypes"]["float32"]["delta_bits"] == 0
        assert r["modes_check_rel_err"] <= 1e-9
        assert r["decay"]["share_below_half_ulp_float16"] == 0 < r["decay"]["share_below_half_ulp_bfloat16"]
        (o,) = r["balanced_truncation"].values()
        assert 1 <= o["0.01"]["mean"] <= o["0.0001"]["mean"] <= o["coordinates"] == 64
        assert r["state_bytes"]["16-bit"] < r["state_bytes"]["float32"]
    s4 = data["models"][1]
    assert s4["state_bytes"] == {"float32": 131_072, "16-bit": 65_536}  # README: 131,072 bytes a stream
    assert s4["streams_bound_16khz"]["16-bit"] == pytest.approx(2 * s4["streams_bound_16khz"]["float32"])
    assert (tmp_path / "state_precision.png").stat().st_size > 10_000
