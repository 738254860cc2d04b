"""Cauchy kernel Σₙ vₙ/(z_l − wₙ) (and the Vandermonde sum used by S4D), with two backends.

Both kernels are the O(N·L) hot spots of conv-mode training. `keops` (pykeops) never materializes
the (L, N) matrix and runs on CPU (compiled with g++) or CUDA, chosen from the tensors' device;
`torch` is the reference, chunked over L and recomputed in backward so memory stays bounded.
The dispatcher `cauchy(..., backend="auto")` uses keops when it imports and compiles, otherwise it
falls back to torch with one warning.

With conjugate symmetry (conj=True) each mode also stands for its conjugate:
    vₙ/(z − wₙ) + v̄ₙ/(z − w̄ₙ) = (2 Re(vₙ) z − 2 Re(vₙ w̄ₙ)) / (z² − 2 Re(wₙ) z + |wₙ|²).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

BACKENDS = ("auto", "keops", "torch")
# Upper bound on the elements of one (batch, chunk, N) intermediate in the torch backend.
_TORCH_CHUNK_ELEMS = 1 << 22

_keops_state: dict[str, object] = {"ok": None, "why": None}


def keops_cache_folder() -> Path:
    """Where KeOps writes compiled kernels: $KEOPS_CACHE_FOLDER, else <project>/.keops_cache."""
    default = Path(__file__).resolve().parent.parent / ".keops_cache"
    return Path(os.environ.get("KEOPS_CACHE_FOLDER", default))


def _import_keops():
    folder = keops_cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    import pykeops  # noqa: PLC0415  (optional dependency)

    pykeops.set_verbose(False)
    pykeops.set_build_folder(str(folder))
    from pykeops.torch import LazyTensor  # noqa: PLC0415

    return LazyTensor


def keops_available() -> bool:
    """True when pykeops imports and compiles a tiny Cauchy kernel (checked once per process)."""
    if _keops_state["ok"] is None:
        try:
            z = torch.tensor([0.5 + 1.0j], dtype=torch.complex64)
            w = torch.tensor([-0.5 + 0.25j], dtype=torch.complex64)
            v = torch.tensor([1.0 + 0.0j], dtype=torch.complex64)
            got = cauchy_keops(v, z, w, conj=True)
            want = cauchy_torch(v, z, w, conj=True)
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                raise RuntimeError(f"self-test mismatch: {got} vs {want}")
            _keops_state["ok"] = True
        except Exception as exc:  # missing package, no compiler, broken CUDA...
            _keops_state["ok"], _keops_state["why"] = False, f"{type(exc).__name__}: {exc}"
    return bool(_keops_state["ok"])


def _keops_backend(t: torch.Tensor) -> str:
    # pykeops' "auto" may pick the GPU code path even for CPU tensors (the nvrtc KeyError in the
    # official S4 code); always name the backend that matches where the data lives.
    return "GPU" if t.is_cuda else "CPU"


def _pick(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if keops_available():
            return "keops"
        if not _keops_state.get("warned"):
            warnings.warn(
                f"pykeops unavailable ({_keops_state['why']}); using the torch Cauchy kernel "
                "(same results, more memory traffic)",
                RuntimeWarning,
                stacklevel=3,
            )
            _keops_state["warned"] = True
        return "torch"
    return backend


# ----------------------------------------------------------------------------------------------
# Cauchy: out[..., l] = Σₙ v[..., n] / (z[..., l] − w[..., n])   (+ conjugate terms)
# v (*batch, N), w (*batch', N), z (*batch'', L): batch shapes broadcast.


def _cauchy_block(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool) -> torch.Tensor:
    """One chunk of L: the (L, N) Cauchy matrix R = 1/(z − w) is built once and applied to every
    leading slice of v by a batched matmul (S4 needs (1+r)² vectors against the same R)."""
    bR = torch.broadcast_shapes(z.shape[:-1], w.shape[:-1])
    full = torch.broadcast_shapes(v.shape[:-1], bR)
    bR, extra = full[len(full) - len(bR) :], full[: len(full) - len(bR)]
    R = 1 / (z[..., :, None] - w[..., None, :])  # (*bR, L, N)
    if conj:
        R = torch.cat([R, 1 / (z[..., :, None] - w.conj()[..., None, :])], dim=-1)
        v = torch.cat([v, v.conj()], dim=-1)
    L, N = R.shape[-2:]
    P, E = torch.Size(bR).numel(), torch.Size(extra).numel()
    R = R.expand(*bR, L, N).reshape(P, L, N)
    v = v.expand(*full, N).reshape(E, P, N).permute(1, 2, 0)  # (P, N, E)
    out = torch.bmm(R, v.to(R.dtype))  # (P, L, E)
    return out.permute(2, 0, 1).reshape(*extra, *bR, L)


def cauchy_torch(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool = True) -> torch.Tensor:
    """Reference backend: exact torch ops, chunked over L (recomputed in backward)."""
    batch = torch.broadcast_shapes(z.shape[:-1], w.shape[:-1])
    per_l = max(1, 2 * w.shape[-1] * int(torch.Size(batch).numel()))
    chunk = max(1, _TORCH_CHUNK_ELEMS // per_l)
    L = z.shape[-1]
    if chunk >= L:
        return _cauchy_block(v, z, w, conj)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (v, z, w))
    outs = []
    for s in range(0, L, chunk):
        zc = z[..., s : s + chunk]
        if needs_grad:
            outs.append(checkpoint(_cauchy_block, v, zc, w, conj, use_reentrant=False))
        else:
            outs.append(_cauchy_block(v, zc, w, conj))
    return torch.cat(outs, dim=-1)


def cauchy_keops(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool = True) -> torch.Tensor:
    """pykeops backend, written in real arithmetic so that autograd works on CPU and CUDA."""
    LazyTensor = _import_keops()
    batch = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1], z.shape[:-1])
    v, w, z = (t.expand(*batch, t.shape[-1]) for t in (v, w, z))
    real = v.real.dtype

    def i_var(x):  # (*batch, L) -> (*batch, L, 1, 1)
        return LazyTensor(x.to(real).contiguous()[..., :, None, None])

    def j_var(x):  # (*batch, N) -> (*batch, 1, N, 1)
        return LazyTensor(x.to(real).contiguous()[..., None, :, None])

    zr, zi = i_var(z.real), i_var(z.imag)
    wr, wi = j_var(w.real), j_var(w.imag)
    if conj:
        num_r = j_var(2 * v.real) * zr - j_var(2 * (v.real * w.real + v.imag * w.imag))
        num_i = j_var(2 * v.real) * zi
        den_r = i_var(z.real.square() - z.imag.square()) - 2 * wr * zr + j_var(w.abs().square())
        den_i = (zr - wr) * zi * 2
    else:
        num_r, num_i = j_var(v.real), j_var(v.imag)
        den_r, den_i = zr - wr, zi - wi
    den = den_r * den_r + den_i * den_i
    out_r = (num_r * den_r + num_i * den_i) / den
    out_i = (num_i * den_r - num_r * den_i) / den
    out = out_r.concat(out_i).sum(dim=len(batch) + 1, backend=_keops_backend(z))
    return torch.complex(out[..., 0], out[..., 1])


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool = True, backend: str = "auto"):
    """Σₙ v[..., n] / (z[..., l] − w[..., n]) (+ conjugate pairs when conj=True) → (..., L)."""
    if _pick(backend) == "keops":
        return cauchy_keops(v, z, w, conj)
    return cauchy_torch(v, z, w, conj)


# ----------------------------------------------------------------------------------------------
# Vandermonde (S4D): out[..., l] = 2 Re Σₙ v[..., n] exp(l · x[..., n]),  l = 0..L-1


def _vandermonde_block(v: torch.Tensor, x: torch.Tensor, ell: torch.Tensor) -> torch.Tensor:
    return 2 * (v.unsqueeze(-1) * torch.exp(x.unsqueeze(-1) * ell)).real.sum(-2)


def vandermonde_torch(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    batch = torch.broadcast_shapes(v.shape[:-1], x.shape[:-1])
    per_l = max(1, v.shape[-1] * int(torch.Size(batch).numel()))
    chunk = max(1, _TORCH_CHUNK_ELEMS // per_l)
    ell = torch.arange(L, device=x.device, dtype=x.real.dtype)
    needs_grad = torch.is_grad_enabled() and (v.requires_grad or x.requires_grad)
    outs = []
    for s in range(0, L, chunk):
        e = ell[s : s + chunk]
        if needs_grad and chunk < L:
            outs.append(checkpoint(_vandermonde_block, v, x, e, use_reentrant=False))
        else:
            outs.append(_vandermonde_block(v, x, e))
    return torch.cat(outs, dim=-1)


def vandermonde_keops(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    LazyTensor = _import_keops()
    batch = torch.broadcast_shapes(v.shape[:-1], x.shape[:-1])
    v, x = v.expand(*batch, v.shape[-1]), x.expand(*batch, x.shape[-1])
    real = v.real.dtype
    ell = torch.arange(L, device=x.device, dtype=real).expand(*batch, L)
    li = LazyTensor(ell.contiguous()[..., :, None, None])

    def j_var(t):
        return LazyTensor(t.to(real).contiguous()[..., None, :, None])

    xr, xi, vr, vi = j_var(x.real), j_var(x.imag), j_var(2 * v.real), j_var(2 * v.imag)
    phase = li * xi
    term = (li * xr).exp() * (vr * phase.cos() - vi * phase.sin())
    return term.sum(dim=len(batch) + 1, backend=_keops_backend(x)).squeeze(-1)


def vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, backend: str = "auto") -> torch.Tensor:
    """2 Re Σₙ v[..., n] exp(l x[..., n]) for l = 0..L-1 → (..., L) real."""
    if _pick(backend) == "keops":
        return vandermonde_keops(v, x, L)
    return vandermonde_torch(v, x, L)
