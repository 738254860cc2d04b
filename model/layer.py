"""The S4 layer: H independent SSMs applied by causal FFT convolution, D skip, GELU, GLU mixing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.kernel import SSMKernel


def fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Causal convolution y_t = Σ_{j≤t} K_j u_{t−j}: u (B, H, L), K (H, L) → (B, H, L), in u's dtype
    (half precision is transformed in float32: torch has no bfloat16 FFT, nor a float16 one on CPU)."""
    if u.dtype in (torch.float16, torch.bfloat16):
        return fft_conv(u.float(), K.float()).to(u.dtype)
    L = u.shape[-1]
    n = 2 * L  # zero-pad so the circular convolution is linear
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L]


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
        return fft_conv(u.transpose(1, 2), K.to(u.dtype)).transpose(1, 2)

    def mix(self, y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """D skip, activation, dropout and GLU output mixing; pointwise in time (any leading shape)."""
        y = self.dropout(F.gelu(y + self.D * u))
        return F.glu(self.out(y), dim=-1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.mix(self.ssm(u), u)
