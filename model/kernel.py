"""SSM convolution kernels K̄ ∈ R^{H×L}: S4 (DPLR, Algorithm 1 of the S4 paper: Gu, Goel, Ré,
"Efficiently Modeling Long Sequences with Structured State Spaces", ICLR 2022) and S4D (diagonal: Gu,
Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State Space Models", NeurIPS
2022).

Each equation is a small function; the modules only own parameters and call them. Computing a
kernel never modifies a parameter (the trained C̃ is converted to C̄ only by recurrent.py, on copies).

Shapes: H channels, N2 = N/2 complex modes (conjugate symmetry: each mode stands for a pair), r rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import torch
from torch import nn

from model import linalg
from model.cauchy import cauchy, vandermonde
from model.hippo import MEASURES, dplr

S4_INITS = MEASURES  # legs (default), legt, lagt, fout
S4D_INITS = ("legs", "diag-lin", "diag-inv")
# Our trainer keeps Re(Λ) ≤ RE_LAMBDA_MAX (the default of SSMKernel's re_lambda_max; None: no clamp, as
# for imported official checkpoints, whose Λ must be used exactly). Measures whose normal part is skew
# (legt, lagt, fout) have Re(Λ) = 0; their damping comes from the low-rank term, and in float32 the
# Woodbury step then cancels badly near resonant frequencies: measured for fout (N=64, L=1024,
# dt ∈ [1e-3, 1e-1]) the float32 kernel error vs float64 is up to 6e-4 with a bound of -1e-4, 8e-5 with
# -1e-3 and 5e-5 with -1e-2. -1e-2 adds a memory decay e^{-0.01 t} (100 windows), negligible for modelling.
RE_LAMBDA_MAX = -1e-2


# ---------------------------------------------------------------------------------------------
# Discretization (diagonal parts): x_k = μ x_{k-1} + B̄ u_k


def discretize_bilinear(dtA: torch.Tensor, dtB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ = (1 + ΔΛ/2)/(1 − ΔΛ/2), B̄ = ΔB/(1 − ΔΛ/2) (inputs are ΔΛ and ΔB, complex tensors of any one
    shape, or broadcastable; outputs of their dtype): the bilinear (Tustin) transform, S4 paper eq. (3)."""
    denom = 1 - dtA / 2
    return (1 + dtA / 2) / denom, dtB / denom


def discretize_zoh(dtA: torch.Tensor, dtB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """μ = exp(ΔΛ), B̄ = (exp(ΔΛ) − 1)/(ΔΛ) · ΔB (zero-order hold; S4D paper, section 2; inputs ΔΛ and ΔB,
    complex tensors of any one shape, or broadcastable; outputs of their dtype)."""
    mu = torch.exp(dtA)
    # (exp(ΔΛ) − 1)/(ΔΛ) by expm1, 1 at ΔΛ = 0: (μ − 1)/ΔΛ cancelled in float32 (a kernel 1.7e-2 off at
    # Δ = 1e-6, 0.37 at 1e-8) and was 0/0, a NaN kernel row, where ΔΛ rounds to 0 (a helper's audit)
    zero = dtA == 0
    safe = torch.where(zero, torch.ones_like(dtA), dtA)  # (no 0/0 in the unused branch: its gradient)
    phi = torch.where(zero, torch.ones_like(dtA), torch.expm1(safe) / safe)
    return mu, phi * dtB


# ---------------------------------------------------------------------------------------------
# S4: Algorithm 1 (truncated generating function at roots of unity + Cauchy + Woodbury + iFFT)


def woodbury(k: torch.Tensor, rank: int) -> torch.Tensor:
    """k00 − k01 (I + k11)⁻¹ k10 for the stacked Cauchy sums k ((1+r)², ...) ordered row-major
    over (left ∈ [C̃, P̄₁..P̄ᵣ]) × (right ∈ [B, P₁..Pᵣ]): the Woodbury identity of the S4 paper's
    Algorithm 1 (step 3), for rank r 1 or 2. Raises ValueError for another rank."""
    if rank == 1:  # unbind: its backward is one stack, where each index's would zero-fill all of k
        k00, k01, k10, k11 = k.unbind(0)
        return k00 - k01 * k10 / (1 + k11)
    k = k.unflatten(0, (rank + 1, rank + 1))
    k00, k01, k10, k11 = k[0, 0], k[0, 1:], k[1:, 0], k[1:, 1:]
    if rank == 2:
        a, b, c, d = 1 + k11[0, 0], k11[0, 1], k11[1, 0], 1 + k11[1, 1]
        det = a * d - b * c
        x0 = (d * k10[0] - b * k10[1]) / det  # (I + k11)⁻¹ k10, explicitly
        x1 = (a * k10[1] - c * k10[0]) / det
        return k00 - (k01[0] * x0 + k01[1] * x1)
    raise ValueError(f"Woodbury is implemented for rank 1 and 2, got {rank}")


def s4_kernel(
    Lambda: torch.Tensor,  # (H, N2) complex, Re < 0
    P: torch.Tensor,  # (r, H, N2) complex
    B: torch.Tensor,  # (H, N2) complex
    C: torch.Tensor,  # (H, N2) complex: C̃ = C̄ (I − Ā^L), the generating-function C
    dt: torch.Tensor,  # (H,) real
    L: int,
    backend: str = "auto",
) -> torch.Tensor:
    """K̄ (H, L) of the bilinear-discretized DPLR SSM A = Λ − P Pᴴ (S4 paper, Algorithm 1), real, of dt's
    dtype (the inputs complex of the matching precision; shapes as annotated). Raises ValueError for an
    odd L or a rank other than 1 or 2."""
    if L % 2:
        raise ValueError(f"S4 kernel length must be even, got {L}")
    rank = P.shape[0]
    real = dt.dtype
    cplx = Lambda.dtype
    # Roots of unity z_l = exp(-2πi l / L), l = 0..L/2-1 (the real kernel's rfft bins; Nyquist below).
    theta = torch.arange(L // 2, device=dt.device, dtype=real) * (2 * math.pi / L)
    z = torch.polar(torch.ones_like(theta), -theta).to(cplx)
    g = (2 / dt[:, None]) * (1 - z) / (1 + z)  # (H, L/2) bilinear frequency map
    c = 2 / (1 + z)  # (L/2,)
    left = torch.cat([C[None], P.conj()], dim=0)  # (1+r, H, N2)
    right = torch.cat([B[None], P], dim=0)
    v = (left[:, None] * right[None, :]).flatten(0, 1)  # ((1+r)², H, N2)
    k = cauchy(v, g, Lambda, conj=True, backend=backend)  # ((1+r)², H, L/2)
    khat = c * woodbury(k, rank)  # (H, L/2)
    # At z = −1, c(z)(g(z) − A)⁻¹ → Δ/2 · I, so K̂(−1) = Δ · Re Σₙ C̃ₙBₙ (pairs included).
    nyquist = (dt * (C * B).sum(-1).real).to(cplx)[:, None]
    return torch.fft.irfft(torch.cat([khat, nyquist], dim=-1), n=L)  # (H, L)


def dplr_real_matrix(Lambda: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """The real (H, N, N) matrix of A = Λ − P̃·2Re(P̃ᴴ ·) on the state ξ = [Re x; Im x] of the N/2
    stored modes x (the conjugate-symmetric DPLR matrix; Λ (H, N2), P (r, H, N2))."""
    H, N2 = Lambda.shape
    M = torch.zeros(H, 2 * N2, 2 * N2, dtype=Lambda.real.dtype, device=Lambda.device)
    idx = torch.arange(N2, device=Lambda.device)
    M[:, idx, idx] = Lambda.real
    M[:, idx + N2, idx + N2] = Lambda.real
    M[:, idx, idx + N2] = -Lambda.imag
    M[:, idx + N2, idx] = Lambda.imag
    for Pj in P:
        col = torch.cat([Pj.real, Pj.imag], dim=-1)
        M = M - 2 * col[:, :, None] * col[:, None, :]
    return M


def c_tilde_for_length(
    Lambda: torch.Tensor, P: torch.Tensor, C: torch.Tensor, dt: torch.Tensor, L_from: int, L_to: int
) -> torch.Tensor:
    """C̃' = C̄(I − Ā^{L_to}) from C̃ = C̄(I − Ā^{L_from}) (H, N2) for the bilinear DPLR SSM (S4 paper
    §3.3: C̃ is tied to the generating function's length; the official code doubles it in place by
    C̃(I + Ā^L)). Computed in real coordinates on the same dtype as the inputs (use float64);
    differentiable. L_from = 0: C is C̄. y = 2 Re(C x) reads γ = [2 Re C; −2 Im C] on ξ = [Re x; Im x]."""
    H, N2 = Lambda.shape
    A = dplr_real_matrix(Lambda, P)
    eye = torch.eye(2 * N2, dtype=A.dtype, device=A.device).expand_as(A)
    half = dt[:, None, None] / 2 * A
    Abar = linalg.solve(eye - half, eye + half)
    gamma = torch.cat([2 * C.real, -2 * C.imag], dim=-1)[..., None]  # (H, N, 1)
    if L_from == 0:  # C is C̄ itself (an official layer never run: its l_kernel buffer is 0)
        gamma_bar = gamma
    else:
        gamma_bar = linalg.solve((eye - torch.linalg.matrix_power(Abar, L_from)).mT, gamma)
    gamma_new = ((eye - torch.linalg.matrix_power(Abar, L_to)).mT @ gamma_bar)[..., 0]
    return torch.complex(gamma_new[..., :N2], -gamma_new[..., N2:]) / 2


# ---------------------------------------------------------------------------------------------
# S4D: Vandermonde


def s4d_kernel(
    Lambda: torch.Tensor,  # (H, N2) complex
    B: torch.Tensor,  # (H, N2) complex
    C: torch.Tensor,  # (H, N2) complex
    dt: torch.Tensor,  # (H,) real, or (H, N2): one Δ per mode (untied)
    L: int,
    disc: str = "zoh",
    backend: str = "auto",
) -> torch.Tensor:
    """K̄_l = 2 Re Σₙ Cₙ B̄ₙ μₙˡ (H, L), real of the inputs' precision, for the diagonal SSM, ZOH or bilinear
    (S4D paper: the Vandermonde kernel). Raises ValueError for another `disc`."""
    dt = dt[:, None] if dt.dim() == 1 else dt  # (H, 1) or (H, N2)
    dtA = Lambda * dt
    _, Bbar = discretize(dtA, B * dt, disc)
    # log μ: ΔΛ (ZOH), or 2 atanh(ΔΛ/2) = log((1 + ΔΛ/2)/(1 − ΔΛ/2)) (bilinear), not log of the rounded μ,
    # whose error grew with l (2.2e-4 at N = 256, L = 4096 in float32)
    if disc == "zoh":
        log_mu = dtA
    else:
        # μ = 0 where ΔΛ = −2 (a real mode at Δ·|Re Λ| = 2: S4D-Lin's mode 0 at Δ = 4): log μ = −inf made
        # every tap NaN (0·−inf at l = 0, a NaN phase after). −1e4 gives μˡ = 1 at l = 0 and 0 after, in
        # float32 too; the other branch sees 0, so no inf reaches the gradient (as discretize_zoh's expm1)
        empty = dtA == -2
        safe = torch.where(empty, torch.zeros_like(dtA), dtA)
        log_mu = torch.where(empty, torch.full_like(dtA, -1e4), 2 * torch.atanh(safe / 2))
    return vandermonde(C * Bbar, log_mu, L, backend=backend)


def discretize(dtA, dtB, disc: str):
    """(μ, B̄) by `disc`, "zoh" or "bilinear"; raises ValueError for another."""
    if disc == "zoh":
        return discretize_zoh(dtA, dtB)
    if disc == "bilinear":
        return discretize_bilinear(dtA, dtB)
    raise ValueError(f"unknown discretization {disc!r}; expected 'zoh' or 'bilinear'")


# ---------------------------------------------------------------------------------------------
# Parameter initialization


def init_dt(H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, generator=None, modes: int = 0):
    """log Δ ~ U[log dt_min, log dt_max] per channel (H,), or per channel and mode (H, modes) if modes;
    float64, Δ in sampling steps (the S4 paper's initialization, section 4; S4D paper, section 4)."""
    u = torch.rand(*((H, modes) if modes else (H,)), dtype=torch.float64, generator=generator)
    return math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))


@functools.lru_cache(maxsize=8)
def _hippo_dplr(measure: str, N: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`hippo.dplr`'s (Λ, P̃, B̃) of one measure, size and rank, computed once per process: every S4 layer
    starts from it, and its N × N float64 eigendecomposition takes seconds at large N (2 s at N = 2,048, 15
    s at 4,096): a config.json of 1,024 such layers beside a small weights file kept `model.load` at it for
    hours before the sizes were compared (a helper's audit). Callers copy before they change anything."""
    Lambda, P, B, _ = dplr(measure, N, rank)
    return Lambda, P, B


def init_ssm(init: str, H: int, N: int, rank: int, generator=None):
    """(Λ, P, B, C) in complex128: Λ (H, N2), P (r, H, N2), B (H, N2), C (H, N2). `init`: a HiPPO measure
    (hippo.dplr, S4), "diag-lin" or "diag-inv" (the S4D paper's S4D-Lin and S4D-Inv, section 4.1); C is
    complex normal of unit variance. Raises ValueError for another init, or a rank below the measure's."""
    N2 = N // 2
    if init in MEASURES:
        Lambda, P, B = _hippo_dplr(init, N, rank)
    elif init == "diag-lin":  # S4D-Lin: λₙ = −1/2 + iπn
        n = torch.arange(N2, dtype=torch.float64)
        Lambda, B = torch.complex(-0.5 * torch.ones(N2, dtype=torch.float64), math.pi * n), torch.ones(N2)
        P = torch.zeros(rank, N2)
    elif init == "diag-inv":  # S4D-Inv: λₙ = −1/2 + i N/π (N/(2n+1) − 1)
        n = torch.arange(N2, dtype=torch.float64)
        imag = N / math.pi * (N / (2 * n + 1) - 1)
        Lambda, B = torch.complex(-0.5 * torch.ones(N2, dtype=torch.float64), imag), torch.ones(N2)
        P = torch.zeros(rank, N2)
    else:
        raise ValueError(f"unknown init {init!r}")
    c128 = torch.complex128
    Lambda = Lambda.to(c128).expand(H, N2).clone()
    P = P.to(c128)[:, None, :].expand(rank, H, N2).clone()
    B = B.to(c128).expand(H, N2).clone()
    # C ~ complex normal with unit variance (each part variance 1/2)
    C = torch.complex(
        torch.randn(H, N2, dtype=torch.float64, generator=generator),
        torch.randn(H, N2, dtype=torch.float64, generator=generator),
    ) * math.sqrt(0.5)
    return Lambda, P, B, C


def _real(z: torch.Tensor) -> nn.Parameter:
    """Complex tensor → float32 parameter with a trailing (re, im) axis (optimizer/safetensors friendly)."""
    return nn.Parameter(torch.view_as_real(z.to(torch.complex64)).clone())


_TRAINING_ARITHMETIC = contextvars.ContextVar("s4_kernel_training_arithmetic", default=False)


@contextlib.contextmanager
def training_arithmetic():
    """Within it, `SSMKernel.forward` computes in the `dtype` asked for even where no gradient is wanted,
    as training computes it, instead of in float64 rounded once (its default without gradients, for the
    conversion checks). A training run's validation (model/train.py `evaluate`) runs in it: there float64
    bought nothing a loss shows (its kernels differ from float32's by ~1e-5 of the kernel at most) and cost
    an S4 (DPLR) model's validation about twice the time (text-shakespeare's shape with S4 layers, H 256,
    N 64, L 1024: the 4 kernels of a forward 0.25 s in float32, 0.53 s in float64). A context variable:
    it holds for this thread (and asyncio task) only."""
    token = _TRAINING_ARITHMETIC.set(True)
    try:
        yield
    finally:
        _TRAINING_ARITHMETIC.reset(token)


class SSMKernel(nn.Module):
    """Parameters of H independent SSMs and the kernel they define.

    kind="s4":  DPLR A = Λ − P Pᴴ, bilinear, C is the generating-function C̃ (S4 paper §3.3).
    kind="s4d": diagonal A = Λ, ZOH or bilinear, C is C̄ directly; Δ may be untied (one per mode).
    """

    SSM_PARAMS = ("log_dt", "log_neg_re", "im", "P", "B")  # own lr, no weight decay

    def __init__(
        self,
        H: int,
        N: int,
        L: int,  # the kernel length: S4's C̃ is for the generating function of this length (l_kernel)
        kind: str = "s4",
        init: str = "legs",
        rank: int = 1,
        disc: str | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        backend: str = "auto",
        re_lambda_max: float | None = RE_LAMBDA_MAX,
        dt_tied: bool = True,
    ):
        super().__init__()
        if re_lambda_max is not None and not (-math.inf < re_lambda_max < 0):
            raise ValueError(f"re_lambda_max must be None or a negative number, got {re_lambda_max}")
        if N % 2:
            raise ValueError(f"d_state must be even (conjugate pairs), got {N}")
        if kind == "s4":
            if init not in S4_INITS:
                raise ValueError(f"s4 kernel init must be one of {S4_INITS}, got {init!r}")
            disc = disc or "bilinear"
            if disc != "bilinear":
                raise ValueError("the S4 (DPLR) kernel uses the bilinear discretization")
            rank = max(rank, 2 if init == "legt" else 1)
            if not dt_tied:
                raise ValueError("untied Δ (dt_tied=False) is supported for the S4D kernel only")
        elif kind == "s4d":
            if init not in S4D_INITS:
                raise ValueError(f"s4d kernel init must be one of {S4D_INITS}, got {init!r}")
            disc = disc or "zoh"
        else:
            raise ValueError(f"unknown kernel {kind!r}; expected 's4' or 's4d'")
        self.H, self.N, self.L, self.kind, self.disc, self.rank = H, N, L, kind, disc, rank
        self.backend, self.re_lambda_max = backend, re_lambda_max
        # S4D has no low-rank term: its (unused) rank builds no P (rank 2**14 at H 128, N 64 allocated 1.3 GB,
        # 2**40 failed; no random draw depends on it, so a seed gives the same weights at any rank)
        Lambda, P, B, C = init_ssm(init, H, N, rank if kind == "s4" else 1)
        # log Δ: (H,), or (H, N2) untied (S4D: one Δ per mode, as the official dt_tie=False)
        self.log_dt = nn.Parameter(init_dt(H, dt_min, dt_max, modes=0 if dt_tied else N // 2).float())
        # −Re Λ = exp(log_neg_re) > 0 holds any Re Λ < 0; skew measures (Re Λ = 0) start at the clamp,
        # or without one at 1e-4 (the official inv_transform's floor)
        floor = 1e-4 if re_lambda_max is None else -re_lambda_max
        self.log_neg_re = nn.Parameter(torch.log((-Lambda.real).clamp(min=floor)).float())
        self.im = nn.Parameter(Lambda.imag.float())
        self.B = _real(B)
        self.C = _real(C)
        if kind == "s4":
            self.P = _real(P)

    def ssm(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The SSM (differentiable, never in-place): Λ, B, C (H, N2) and, for S4, P (r, H, N2), complex of
        `dtype`'s precision; dt (H,), or (H, N2) untied, real of `dtype`."""
        real = dtype
        neg_re = torch.exp(self.log_neg_re.to(real))
        re = -(neg_re if self.re_lambda_max is None else neg_re.clamp(min=-self.re_lambda_max))
        out = {
            "Lambda": torch.complex(re, self.im.to(real)),
            "B": torch.view_as_complex(self.B.to(real)),
            "C": torch.view_as_complex(self.C.to(real)),
            "dt": torch.exp(self.log_dt.to(real)),
        }
        if self.kind == "s4":
            out["P"] = torch.view_as_complex(self.P.to(real))
        return out

    def forward(
        self, L: int | None = None, dtype: torch.dtype = torch.float32, backend: str | None = None
    ) -> torch.Tensor:
        """K̄ (H, L) at any length L ≥ 1 (default: the kernel length self.L), so conv mode equals the
        recurrence at any length.

        S4: C is C̃ for the generating function of length self.L (a layer's own l_kernel, odd allowed).
        When self.L is even and L ≤ self.L (L odd too) the kernel is computed at self.L and truncated (the
        training path, fast and differentiable); otherwise (L > self.L, or an odd self.L) C̃ is first
        rewritten for the even length L' = max(L, self.L) rounded up to even (float64,
        `c_tilde_for_length`) and the kernel computed at L'. Returns real (H, L) of `dtype` (computed in
        float64 and rounded once when no gradient is wanted: torch.is_grad_enabled() false, outside
        `training_arithmetic()`). Raises ValueError for L < 1."""
        L = self.L if L is None else L
        if L < 1:
            raise ValueError(f"kernel length must be positive, got {L}")
        backend = backend or self.backend
        # Without gradients (conversion checks, evaluation) in float64, rounded once; with gradients
        # (training) in `dtype`, as the official code trains. In float32, S4D: the phase l·Im log μ and
        # Im log μ itself carry a relative error of 6e-8, so a mode turning fast (S4D-LegS: |Im Λ| up to
        # 1,303 at N = 64) drifts l times that (5.9e-5 of the kernel at l = 384); S4: near Re Λ = 0 (a skew
        # measure, legt, lagt, fout, at version 3's real_tolerance 1e-3) the Woodbury step cancels the
        # Cauchy sums' rounding into the kernel (a version-3 legt layer's: 1.2e-4 of it at l = 32).
        # (A training run's validation keeps `dtype`: `training_arithmetic`.)
        exact = dtype != torch.float64 and not torch.is_grad_enabled() and not _TRAINING_ARITHMETIC.get()
        work = torch.float64 if exact else dtype
        s = self.ssm(work)
        if self.kind == "s4d":
            return s4d_kernel(s["Lambda"], s["B"], s["C"], s["dt"], L, self.disc, backend).to(dtype)
        C, Lc = s["C"], self.L
        if L > self.L or self.L % 2:
            Lc = max(L, self.L) + max(L, self.L) % 2
            s64 = s if work == torch.float64 else self.ssm(torch.float64)
            C = c_tilde_for_length(s64["Lambda"], s64["P"], s64["C"], s64["dt"], self.L, Lc).to(C.dtype)
        K = s4_kernel(s["Lambda"], s["P"], s["B"], C, s["dt"], Lc, backend)
        return K[:, :L].to(dtype)
