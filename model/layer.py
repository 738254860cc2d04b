"""The S4 layer: H independent SSMs applied by causal FFT convolution, D skip, GELU, GLU mixing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.kernel import SSMKernel


class _CausalFFTConv(torch.autograd.Function):
    """y = irfft(rfft(u, 2L) · rfft(K, 2L))[:L] along the last axis, with a hand-written backward.

    Both gradients are correlations, exact with the same zero padding (K_j and u_j vanish for j ≥ L):
        ∂u_s = Σ_{t≥s} ∂y_t K_{t−s} = irfft(rfft(∂y, 2L) · conj(rfft(K, 2L)))[:L]
        ∂K_j = Σ_{t≥j} ∂y_t u_{t−j} = irfft(rfft(∂y, 2L) · conj(rfft(u, 2L)))[:L]   (summed over batch)
    One real FFT of ∂y and one inverse per input, where autograd's rfft backward takes a full complex FFT."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        L = u.shape[-1]
        n = 2 * L  # zero-pad so the circular convolution is linear
        U, Kf = torch.fft.rfft(u, n=n), torch.fft.rfft(K, n=n)
        ctx.save_for_backward(U, Kf)
        ctx.shapes = (u.shape, K.shape)
        return torch.fft.irfft(U * Kf, n=n)[..., :L]

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        U, Kf = ctx.saved_tensors
        u_shape, K_shape = ctx.shapes
        L = gy.shape[-1]
        G = torch.fft.rfft(gy, n=2 * L)
        gu = gK = None
        if ctx.needs_input_grad[0]:
            gu = torch.fft.irfft(G * Kf.conj(), n=2 * L)[..., :L].sum_to_size(u_shape)
        if ctx.needs_input_grad[1]:
            # reduce broadcast (batch) axes in the frequency domain: one small inverse FFT
            gK = torch.fft.irfft((G * U.conj()).sum_to_size(*K_shape[:-1], G.shape[-1]), n=2 * L)[..., :L]
        return gu, gK


def fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution y_t = Σ_{j≤t} K_j u_{t−j}: u (B, H, L), K (H, L) → (B, H, L), along the last
    axis (any broadcastable leading shapes), by FFT of size 2L (no wrap-around). The result has the
    promoted dtype of u and K (S4Layer casts K to u's first), but a 16-bit u gives u's dtype: half
    precision is transformed in float32, torch having no bfloat16 FFT, nor a float16 one on CPU."""
    if u.dtype in (torch.float16, torch.bfloat16):
        return fft_conv(u.float(), K.float()).to(u.dtype)
    return _CausalFFTConv.apply(u, K)


class S4Layer(nn.Module):
    """y = GLU(W · dropout(GELU(K̄ ∗ u + D u))): (B, L, H) → (B, L, H).

    `ssm` (the convolution) and `mix` (everything after it) are separate so the recurrent form can
    replace the convolution by a step or a prefill while reusing the very same mixing weights.
    """

    def __init__(self, d_model: int, d_state: int, l_kernel: int, dropout: float = 0.0, **kernel_args):
        super().__init__()
        self.kernel = SSMKernel(d_model, d_state, l_kernel, **kernel_args)  # any input length works
        self.D = nn.Parameter(torch.randn(d_model))
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, 2 * d_model)

    def ssm(self, u: torch.Tensor) -> torch.Tensor:
        """The SSM part without the skip: (B, L, H) → (B, L, H)."""
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32  # float64 for references
        K = self.kernel(u.shape[1], dtype=dtype)  # (H, L), any L
        # contiguous (B, L, H): the pointwise ops after it (D skip, GELU and their backward) are several times
        # slower on the transposed strides
        return fft_conv(u.transpose(1, 2), K.to(u.dtype)).transpose(1, 2).contiguous()

    def mix(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """D skip, activation, dropout and GLU output mixing; pointwise in time (any leading shape)."""
        y = self.dropout(F.gelu(y + self.D * u))
        return F.glu(self.out(y), dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.mix(self.ssm(u), u)
