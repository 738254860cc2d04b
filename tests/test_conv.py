"""The causal FFT convolution of conv mode (model.layer.fft_conv, hand-written backward) against the
defining sum y_t = Σ_{j≤t} K_j u_{t−j} in float64: values and both gradients, for every broadcast
shape the layers use; and a float64 S4 layer's gradients against autograd through plain torch.fft."""

import pytest
import torch

from model.layer import S4Layer, fft_conv


def direct_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The defining sum, O(L²), differentiable by autograd."""
    L = u.shape[-1]
    terms = [(K[..., : t + 1].flip(-1) * u[..., : t + 1]).sum(-1) for t in range(L)]
    return torch.stack(terms, dim=-1)


def autograd_fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The previous fft_conv: the same FFTs with autograd's backward."""
    L = u.shape[-1]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]


@pytest.mark.parametrize(
    "u_shape, K_shape",
    [((2, 3, 17), (3, 17)), ((3, 16), (3, 16)), ((2, 3, 8), (2, 3, 8)), ((3, 9), (2, 3, 9))],
)
def test_fft_conv_values_and_gradients_equal_the_defining_sum(u_shape, K_shape):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(u_shape, dtype=torch.float64, generator=g).requires_grad_()
    K = torch.randn(K_shape, dtype=torch.float64, generator=g).requires_grad_()
    y, ref = fft_conv(u, K), direct_conv(u, K)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((y * weight).sum(), [u, K])
    want = torch.autograd.grad((ref * weight).sum(), [u, K])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fft_conv, (u, K))


def test_s4_layer_gradients_equal_the_autograd_fft_path(monkeypatch):
    """A float64 S4 layer (FFT conv + torch Cauchy kernel): every parameter's gradient equals the one
    through the previous implementations (autograd FFT conv, two-term autograd Cauchy) to 1e-10."""
    import model.cauchy as cy
    from model import layer

    torch.manual_seed(0)
    net = S4Layer(16, 8, 64, backend="torch").double()
    u = torch.randn(2, 64, 16, dtype=torch.float64)
    weight = torch.randn(2, 64, 16, dtype=torch.float64)

    def grads():
        net.zero_grad(set_to_none=True)
        (net(u) * weight).sum().backward()
        return {n: p.grad.clone() for n, p in net.named_parameters()}

    new = grads()
    monkeypatch.setattr(layer, "fft_conv", autograd_fft_conv)
    monkeypatch.setattr(cy, "cauchy_torch", cy.cauchy_torch_autograd)
    old = grads()
    assert new.keys() == old.keys()
    for name in new:
        scale = float(old[name].abs().max())
        assert float((new[name] - old[name]).abs().max()) <= 1e-10 * max(scale, 1.0), name
