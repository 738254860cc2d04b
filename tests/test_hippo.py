"""HiPPO matrices against their element-wise closed forms; NPLR / DPLR identities in float64."""

import math

import pytest
import torch

from model.hippo import MEASURES, dplr, nplr, rank_correction, transition


def closed_form(measure: str, N: int):
    """Element-wise definitions, written independently of model/hippo.py."""
    A = torch.zeros(N, N, dtype=torch.float64)
    B = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        for k in range(N):
            if measure == "legs":
                A[n, k] = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0.0)
            elif measure == "legt":
                s = 1.0 if n >= k else (-1.0) ** (n - k)
                A[n, k] = -0.5 * math.sqrt((2 * n + 1) * (2 * k + 1)) * s
            elif measure == "lagt":
                A[n, k] = (0.5 if n == k else 0.0) - (1.0 if n >= k else 0.0)
        if measure == "legs":
            B[n] = math.sqrt(2 * n + 1)
        elif measure == "legt":
            B[n] = 0.5 * math.sqrt(2 * n + 1)
        elif measure == "lagt":
            B[n] = 1.0
    if measure == "fout":
        # basis 1, cos 2πt, sin 2πt, cos 4πt, ...: B = (2, 2√2, 0, 2√2, 0, ...),
        # A = −B Bᵀ/2 + rotation generator ±2πk on each (cos_k, sin_k) pair
        for n in range(N):
            B[n] = 2.0 if n == 0 else (2 * math.sqrt(2) if n % 2 == 1 else 0.0)
        for n in range(N):
            for k in range(N):
                A[n, k] = -B[n] * B[k] / 2
        for f in range(1, (N - 1) // 2 + 1):
            A[2 * f, 2 * f - 1] += 2 * math.pi * f
            A[2 * f - 1, 2 * f] -= 2 * math.pi * f
    return A, B


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [1, 2, 7, 16])
def test_transition_matches_closed_form(measure, N):
    A, B = transition(measure, N)
    A_ref, B_ref = closed_form(measure, N)
    assert A.dtype == B.dtype == torch.float64
    torch.testing.assert_close(A, A_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(B, B_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [2, 8, 64, 256])
def test_nplr_identity_float64(measure, N):
    rank = 2 if measure == "legt" else 1
    A, _ = transition(measure, N)
    Lambda, P, B, V = nplr(measure, N, rank)
    eye = torch.eye(N, dtype=torch.complex128)
    assert (V.conj().T @ V - eye).abs().max() < 1e-10  # V unitary
    recon = V @ torch.diag(Lambda) @ V.conj().T - P.to(torch.complex128) @ P.T.to(torch.complex128)
    assert (recon - A).abs().max() / A.abs().max() < 1e-10
    # conjugate symmetry: second half is the conjugate of the first
    h = N // 2
    torch.testing.assert_close(Lambda[h:], Lambda[:h].conj())
    torch.testing.assert_close(V[:, h:], V[:, :h].conj())


def test_nplr_normal_part_eigenvalues():
    Lambda, *_ = nplr("legs", 64)
    assert torch.allclose(Lambda.real, torch.full((64,), -0.5, dtype=torch.float64), atol=1e-10)
    for m in ("legt", "lagt", "fout"):
        Lambda, *_ = nplr(m, 32, 2 if m == "legt" else 1)
        assert Lambda.real.abs().max() < 1e-10  # A + PPᵀ is skew for these measures


@pytest.mark.parametrize("measure", MEASURES)
def test_dplr_half_form_reproduces_real_matrix(measure):
    """A = 2 Re(V_h diag(Λ) V_hᴴ) − PPᵀ with only N/2 modes kept, and P̃ = V_hᴴP, B̃ = V_hᴴB."""
    N, rank = 32, (2 if measure == "legt" else 1)
    A, B = transition(measure, N)
    Lam, Pt, Bt, Vh = dplr(measure, N, rank)
    P = rank_correction(measure, N, rank)
    recon = 2 * (Vh @ torch.diag(Lam) @ Vh.conj().T).real - P @ P.T
    assert (recon - A).abs().max() / A.abs().max() < 1e-10
    torch.testing.assert_close(2 * (Vh @ Bt).real, B)  # B = 2 Re(V_h B̃)
    torch.testing.assert_close(Pt, (Vh.conj().T @ P.to(torch.complex128)).T)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown HiPPO measure"):
        transition("legx", 4)
    with pytest.raises(ValueError, match="even"):
        nplr("legs", 5)
    with pytest.raises(ValueError, match="rank"):
        nplr("legt", 8, rank=1)
