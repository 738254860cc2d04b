"""HiPPO transition matrices and their normal-plus-low-rank (NPLR / DPLR) form, in float64.

Convention: the continuous-time system is x'(t) = A x(t) + B u(t), so A is the *negated* HiPPO
operator of the HiPPO paper. Every measure here satisfies A + P Pᵀ = d·I + S with S skew-symmetric,
so A = V diag(Λ) Vᴴ − P Pᵀ with V unitary and Λ = d + i·ω (S4 paper, Theorem 1).
"""

from __future__ import annotations

import math

import torch

MEASURES = ("legs", "legt", "lagt", "fout")
_F64 = torch.float64


def transition(measure: str, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense HiPPO (A, B) for `measure`: A (N, N) and B (N,), float64.

    legs, legt, lagt: the HiPPO paper's operators (Gu, Dao, Ermon, Rudra, Ré, "HiPPO: Recurrent Memory with
    Optimal Polynomial Projections", NeurIPS 2020), negated and scaled as state-spaces/s4's
    src/models/hippo/hippo.py `transition` (legt on a window of length 2, ×1/2; lagt shifted by I/2).
    fout: a translated Fourier basis (1, cos 2πkt, sin 2πkt, … on a unit window) in the form A = J − BBᵀ/2
    of "How to Train Your HiPPO" (Gu, Johnson, Timalsina, Rudra, Ré, ICLR 2023), as written here; it is
    not state-spaces/s4's transition('fourier') (their eigenvalues differ): an imported model's Λ, P, B
    are mapped as trained, so only models initialized here use this one. Raises ValueError for another
    measure."""
    n = torch.arange(N, dtype=_F64)
    r = (2 * n + 1).sqrt()
    row, col = n[:, None], n[None, :]
    if measure == "legs":
        # A_nk = -sqrt(2n+1)sqrt(2k+1) for n > k, -(n+1) for n = k, 0 above; B_n = sqrt(2n+1)
        A = -torch.where(row > col, r[:, None] * r[None, :], torch.zeros(()))
        A = A - torch.diag(n + 1)
        B = r.clone()
    elif measure == "legt":
        # Scaled LegT (window length 2): A_nk = -1/2 sqrt(2n+1)sqrt(2k+1) * (1 if n >= k else (-1)^(n-k))
        sign = torch.where(row >= col, torch.ones(()), (-1.0) ** (row - col))
        A = -0.5 * r[:, None] * r[None, :] * sign
        B = 0.5 * r
    elif measure == "lagt":
        # Laguerre (generalized, alpha = 0, shifted by I/2): A = I/2 - tril(1), B = 1
        A = 0.5 * torch.eye(N, dtype=_F64) - torch.tril(torch.ones(N, N, dtype=_F64))
        B = torch.ones(N, dtype=_F64)
    elif measure == "fout":
        # Translated Fourier on a unit window: basis 1, cos(2πkt), sin(2πkt), ...
        # A = J - B Bᵀ / 2 with J the skew rotation generator, B = (2, 2√2, 0, 2√2, 0, ...)
        B = torch.zeros(N, dtype=_F64)
        B[0] = 2.0
        B[1::2] = 2.0 * math.sqrt(2.0)
        J = torch.zeros(N, N, dtype=_F64)
        for k in range(1, (N - 1) // 2 + 1):  # pair (cos_k, sin_k) at indices (2k-1, 2k)
            c, s = 2 * k - 1, 2 * k
            J[s, c] = 2 * math.pi * k
            J[c, s] = -2 * math.pi * k
        A = J - 0.5 * B[:, None] * B[None, :]
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; expected one of {MEASURES}")
    return A, B


def rank_correction(measure: str, N: int, rank: int = 1) -> torch.Tensor:
    """Low-rank P (N, rank), float64, with A + P Pᵀ normal (its symmetric part a multiple of I): the
    values of state-spaces/s4's `rank_correction`. Raises ValueError for another measure, or a rank below
    the measure's (legt needs 2)."""
    n = torch.arange(N, dtype=_F64)
    if measure == "legs":
        P = (n + 0.5).sqrt()[:, None]
    elif measure == "legt":
        r = (n + 0.5).sqrt()  # sqrt(0.5) * sqrt(2n+1)
        P = torch.stack([r * (n % 2 == 0), r * (n % 2 == 1)], dim=-1)
    elif measure == "lagt":
        P = torch.full((N, 1), math.sqrt(0.5), dtype=_F64)
    elif measure == "fout":
        _, B = transition("fout", N)
        P = (B / math.sqrt(2.0))[:, None]
    else:
        raise ValueError(f"unknown HiPPO measure {measure!r}; expected one of {MEASURES}")
    if rank < P.shape[1]:
        raise ValueError(f"measure {measure!r} needs rank >= {P.shape[1]}, got {rank}")
    return torch.cat([P, torch.zeros(N, rank - P.shape[1], dtype=_F64)], dim=1)


def _conjugate_paired_eigvecs(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decompose a real skew-symmetric S = V diag(iω) Vᴴ with V unitary and columns in
    conjugate pairs: the first N/2 columns have ω ≥ 0, the last N/2 are their conjugates."""
    N = S.shape[0]
    if N % 2:
        raise ValueError(f"state size N must be even for conjugate symmetry, got {N}")
    # -iS is Hermitian and purely imaginary, so eigenvectors of -ω are the conjugates of those of ω.
    w, V = torch.linalg.eigh(-1j * S.to(torch.complex128))
    tol = 1e-9 * max(1.0, float(w.abs().max()))
    pos = w > tol
    V_pos, w_pos = V[:, pos], w[pos]
    n_zero = N - 2 * int(pos.sum())
    if n_zero:
        # The null space of a real matrix has a real orthonormal basis q_1..q_2m; pair it as
        # (q_2j ± i q_2j+1)/√2 so it too splits into conjugate halves.
        U, sv, _ = torch.linalg.svd(S)
        Q = U[:, N - n_zero :]
        if sv[N - n_zero :].max() > 1e-8 * max(1.0, float(sv[0])) or n_zero % 2:
            raise ValueError("skew-symmetric part has an odd or ill-defined null space")
        Z = (Q[:, 0::2] + 1j * Q[:, 1::2]) / math.sqrt(2.0)
        V_pos = torch.cat([V_pos, Z.to(V.dtype)], dim=1)
        w_pos = torch.cat([w_pos, torch.zeros(n_zero // 2, dtype=w.dtype)])
    order = torch.argsort(w_pos)
    V_half, w_half = V_pos[:, order], w_pos[order]
    return torch.cat([V_half, V_half.conj()], dim=1), torch.cat([w_half, -w_half])


def nplr(measure: str, N: int, rank: int = 1):
    """NPLR form of HiPPO: (Λ, P, B, V) with A = V diag(Λ) Vᴴ − P Pᵀ, all float64/complex128.

    Λ (N,) complex, P (N, rank) real, B (N,) real, V (N, N) unitary. Columns N/2.. of V and entries
    N/2.. of Λ are the conjugates of the first N/2 (conjugate symmetry). S4 paper, Theorem 1 (Gu, Goel,
    Ré, ICLR 2022). Raises ValueError for another measure, a rank below its own or an odd N.
    """
    A, B = transition(measure, N)
    P = rank_correction(measure, N, rank)
    S = A + P @ P.T
    d = S.diagonal().mean()
    skew = S - d * torch.eye(N, dtype=_F64)
    if (skew + skew.T).abs().max() > 1e-9 * max(1.0, float(S.abs().max())):
        raise AssertionError(f"{measure}: A + PPᵀ is not (scalar + skew); rank correction is wrong")
    V, w = _conjugate_paired_eigvecs(skew)
    Lambda = d.to(torch.complex128) + 1j * w
    return Lambda, P, B, V


def dplr(measure: str, N: int, rank: int = 1):
    """Half-size diagonal-plus-low-rank form used by the S4 kernel (conjugate symmetry):
    Λ (N/2,), P̃ = V_hᴴ P (rank, N/2), B̃ = V_hᴴ B (N/2,), V_h (N, N/2), all complex128. Raises ValueError
    as `nplr`."""
    Lambda, P, B, V = nplr(measure, N, rank)
    Vh = V[:, : N // 2]
    Pc, Bc = P.to(torch.complex128), B.to(torch.complex128)
    return Lambda[: N // 2], (Vh.conj().T @ Pc).T, Vh.conj().T @ Bc, Vh
