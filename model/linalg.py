"""Dense linear solves for the load-time conversion and the reference code: each system of a batch alone.

torch 2.13's CPU build (LAPACK from MKL) solves a *batch* of n×n systems wrongly once `torch.set_num_threads`
has been called with 2 or more threads anywhere in the process, for n from about 150 on (measured on the
2-core Zen 3 VM, 2026-12-04): MKL prints "Parameter 6 was incorrect on entry to DLASWP" and
`torch.linalg.solve` raises "Pivots given to lu_solve must all be greater or equal to 1" (n = 160 … 256), or
never returns (n = 150: still at 200 % CPU after 10 minutes); `torch.linalg.lu_factor` and `det` return
garbage without raising. The server sets the thread count (S4_TORCH_THREADS), and so does every parallel
prefill (`RecurrentModel.prefill_threads`: 1 thread, then back), including each model's load-time
verification: so an S4 layer with d_state ≥ 160 failed to convert in any process that had loaded a model
before it. A single system is unaffected (checked up to n = 2048), and for the state sizes the shipped and
official models use (n = 64, 70 checked) the batched call gives the same bits as solving one system at a
time: on CPU `solve` does the latter, so no converted model changes.
"""

from __future__ import annotations

import torch


def solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with A X = B, as `torch.linalg.solve(A, B)` for A (*, n, n) and B (*, n, k) (batch dims
    broadcast; any float or complex dtype the two share; differentiable), each system solved alone on CPU
    (see the module docstring), batched elsewhere. Returns (*, n, k). Right-hand sides are always matrices:
    torch's batch-of-vectors form (B of shape A.shape[:-1]) is refused, write B[..., None]. Raises
    ValueError for A or B of fewer than 2 dims or that form, else as torch.linalg.solve (RuntimeError for a
    singular A or mismatched shapes)."""
    if A.dim() < 2 or B.dim() < 2 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1]):
        shapes = f"{tuple(A.shape)} and {tuple(B.shape)}"
        raise ValueError(f"solve takes A (*, n, n) and B (*, n, k) (vectors as B[..., None]), got {shapes}")
    if A.device.type != "cpu" or A.dim() == 2 and B.dim() == 2:
        return torch.linalg.solve(A, B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    As = A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:])
    Bs = B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:])
    if As.shape[0] == 0:
        return torch.linalg.solve(A, B)
    return torch.stack([torch.linalg.solve(a, b) for a, b in zip(As, Bs, strict=True)]).reshape(
        *batch, A.shape[-1], B.shape[-1]
    )
