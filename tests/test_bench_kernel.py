"""bench.kernel: what its rows time."""

from __future__ import annotations

import torch

from bench.kernel import _work
from model.kernel import SSMKernel


def test_the_s4_forward_rows_time_the_float32_kernel_the_fwd_bwd_rows_and_the_dense_baseline_compute():
    """The 'fwd' rows (no gradient) compute S4's kernel in float32, as the fwd+bwd rows and the dense
    baseline do (the plot says fp32): the very kernel the training path (gradients on) gives, bit for bit.
    Before, SSMKernel.forward's float64 no-grad path (3d57c1e) was timed, whose kernel differs by rounding."""
    H, N, L = 4, 16, 64
    K = _work("s4-torch", "fwd", H, N, L)()
    torch.manual_seed(0)
    k = SSMKernel(H, N, L, kind="s4", backend="torch")
    assert torch.is_grad_enabled()
    want = k(L).detach()
    assert K.dtype == want.dtype == torch.float32
    assert torch.equal(K, want)
