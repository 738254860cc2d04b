"""Block norms: LayerNorm, and the official S4 repo's scalar TransposedLN (which imports need)."""

from __future__ import annotations

import torch
from torch import nn


class TransposedLN(nn.Module):
    """y = s · (x − μ + m) / σ over the channel axis (the last), with scalar parameters m (init 0)
    and s (init 1); μ and σ are the mean and the population standard deviation (no ε) of each
    position's channels. (…, H) → (…, H), any float dtype.

    Source: state-spaces/s4, src/models/nn/normalization.py, TransposedLN(scalar=True), the norm of
    every residual block of official models trained with `transposed: true` (SaShiMi's included)."""

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.zeros(1))
        self.s = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sigma, mu = torch.std_mean(x, dim=-1, correction=0, keepdim=True)
        return self.s / sigma * (x - mu + self.m)


def make_norm(kind: str, d: int) -> nn.Module:
    """ "layer" → nn.LayerNorm(d) (ε 1e-5); "tln" → TransposedLN(). Raises ValueError otherwise."""
    if kind == "layer":
        return nn.LayerNorm(d)
    if kind == "tln":
        return TransposedLN()
    raise ValueError(f"norm must be 'layer' or 'tln', got {kind!r}")
