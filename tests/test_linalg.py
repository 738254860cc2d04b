"""model.linalg.solve and every batched dense solve of the conversion: right for large states after
`torch.set_num_threads`, and the same bits as before for the state sizes models use.

torch 2.13's CPU build (MKL) solves a batch of n×n systems wrongly once the thread count has been set to 2
or more in the process (n ≳ 150: it raises "Pivots given to lu_solve must all be greater or equal to 1"
for n = 160 … 256, and never returns for n = 150, which is why these tests use n = 256). The server sets
it, and so does every model's load-time verification (the parallel prefill runs on 1 thread, then sets
it back): an S4 layer with d_state ≥ 160 failed to convert in a process that had loaded any model before.
"""

from __future__ import annotations

import pytest
import torch

from model import ModelConfig, SequenceModel, linalg
from model.kernel import SSMKernel, c_tilde_for_length

F64, C128 = torch.float64, torch.complex128


@pytest.fixture
def threads_set():
    """The process after `torch.set_num_threads` with at least 2 threads (the state every server and every
    loaded model leaves it in), the count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, 2))
    yield
    torch.set_num_threads(before)


def _systems(H, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(H, n, n, generator=g, dtype=F64) + n**0.5 * torch.eye(n, dtype=F64)
    B = torch.randn(H, n, k, generator=g, dtype=F64)
    if dtype == C128:
        A = torch.complex(A, torch.randn(H, n, n, generator=g, dtype=F64))
        B = B.to(C128)
    return A, B


@pytest.mark.parametrize("dtype", [F64, C128])
@pytest.mark.parametrize("n", [16, 64, 70])
def test_solve_gives_the_batched_calls_bits_for_the_state_sizes_models_use(n, dtype):
    """n ≤ 70 (the shipped and official models' real state sizes, 64): one system at a time is bit for bit
    torch's batched solve, with one right-hand side or n of them, and with A broadcast over the batch, so no
    converted model changes."""
    A, B = _systems(12, n, 1, dtype)
    assert torch.equal(linalg.solve(A, B), torch.linalg.solve(A, B))
    A, B = _systems(12, n, n, dtype, seed=1)
    assert torch.equal(linalg.solve(A, B), torch.linalg.solve(A, B))
    assert torch.equal(linalg.solve(A[0], B), torch.linalg.solve(A[0], B))  # A broadcast
    assert torch.equal(linalg.solve(A[:1], B[0]), torch.linalg.solve(A[:1], B[0]))


@pytest.mark.parametrize("dtype", [F64, C128])
def test_solve_is_right_for_a_batch_of_large_systems_after_the_thread_count_was_set(threads_set, dtype):
    """n = 256, 8 systems: the residual max |A X − B| ≤ 1e-10 max |B| (LU's backward error, n·ε·|A||X| with
    |X| up to ~30 here, is ~1e-12; a wrong pivot leaves O(1). torch's batched solve raises here)."""
    A, B = _systems(8, 256, 3, dtype)
    X = linalg.solve(A, B)
    assert X.shape == (8, 256, 3) and X.dtype == dtype
    assert float((A @ X - B).abs().max() / B.abs().max()) <= 1e-10


def test_solve_is_differentiable_as_torchs_and_refuses_vector_right_hand_sides():
    A, B = _systems(5, 6, 2, F64)
    A.requires_grad_(True)
    B.requires_grad_(True)
    linalg.solve(A, B).square().sum().backward()
    ga, gb = A.grad.clone(), B.grad.clone()
    A.grad = B.grad = None
    torch.linalg.solve(A, B).square().sum().backward()
    torch.testing.assert_close(ga, A.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, B.grad, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"got \(5, 6, 6\) and \(6,\)"):
        linalg.solve(A, B[0, :, 0])
    with pytest.raises(ValueError, match=r"vectors as B\[\.\.\., None\]\), got \(5, 6, 6\) and \(5, 6\)"):
        linalg.solve(A, B[..., 0])  # torch's batch-of-vectors form


def test_an_s4_layer_with_a_large_state_converts_after_the_thread_count_was_set(threads_set):
    """The user's case: a model loaded (any: its verification sets the thread count), then an S4 model with
    d_state = 256. It converts (s4_real_system, diagonalize), verifies against its conv mode, and its state
    bound (eig + solve) is computed."""
    torch.manual_seed(0)
    SequenceModel(ModelConfig(vocab_size=16, d_model=8, n_layers=1, d_state=16, kernel="s4", l_max=32,
                              cauchy_backend="torch")).eval().to_recurrent()  # fmt: skip
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, d_model=8, n_layers=1, d_state=256, kernel="s4", init="legs", l_max=64,
                      cauchy_backend="torch")  # fmt: skip
    rec = SequenceModel(cfg).eval().to_recurrent()
    v = rec.verification
    assert max(v["step_rel_err"], v["prefill_rel_err"]) <= v["tol"], v
    bound = rec.state_bound()
    assert bound.shape == (1, 8, 2, rec.M) and not bool(bound.isnan().any())


def test_c_tilde_for_length_round_trips_a_large_state_after_the_thread_count_was_set(threads_set):
    """C̃ tied to length L, moved to length L and back (the official import's kernel-length change, N = 256):
    the same C̃ within float64 rounding."""
    torch.manual_seed(0)
    with torch.no_grad():
        s = SSMKernel(8, 256, 64, kind="s4", backend="torch").ssm(F64)
    C = c_tilde_for_length(s["Lambda"], s["P"], s["C"], s["dt"], 64, 128)
    back = c_tilde_for_length(s["Lambda"], s["P"], C, s["dt"], 128, 64)
    assert float((back - s["C"]).abs().max() / s["C"].abs().max()) <= 1e-9


def test_the_kernel_benchmarks_dense_reference_takes_a_large_state_after_setting_threads(threads_set):
    from bench.kernel import dense_matches_s4

    assert dense_matches_s4(H=8, N=256, L=256) <= 1e-8


def test_the_server_loads_an_s4_checkpoint_with_a_large_state_after_another_with_threads_set(tmp_path):
    """The server's path: S4_TORCH_THREADS = 2 and two checkpoints, a small model, then an S4 model with
    d_state = 256. Both load and verify; before, the second was refused ("Pivots given to lu_solve…")."""
    from model import save
    from server import Settings
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    dirs = []
    for name, n in (("small", 16), ("wide-state", 256)):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, d_model=8, n_layers=1, d_state=n, kernel="s4", l_max=64,
                          cauchy_backend="torch")  # fmt: skip
        dirs.append(str(save(SequenceModel(cfg).eval(), tmp_path / name)))
    before = torch.get_num_threads()
    try:
        models, failed = load_models(Settings(checkpoints=dirs, torch_threads=2), SessionTable(), Metrics())
    finally:
        torch.set_num_threads(before)
    assert failed == {} and sorted(models) == ["small", "wide-state"], failed
    assert models["wide-state"].config.d_state == 256
