"""Cauchy kernel Σₙ vₙ/(z_l − wₙ) (and the Vandermonde sum used by S4D), with two backends.

Both kernels are the O(N·L) hot spots of conv-mode training. `keops` (pykeops) never materializes
the (L, N) matrix and runs on CPU (compiled with g++) or CUDA, chosen from the tensors' device;
`torch` is the reference, chunked over L and recomputed in backward so memory stays bounded.
The dispatcher `cauchy(..., backend="auto")` uses keops when it imports and compiles for the device the
tensors are on (checked once per device type: a machine whose g++ builds the CPU kernels may still lack
what KeOps' CUDA build needs), otherwise it falls back to torch with one warning per device type.

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

# per device type ("cpu", "cuda"): {"ok": None until checked, then bool; "why": the failure; "warned"}
_keops_state: dict[str, dict[str, object]] = {}


def keops_cache_folder() -> Path:
    """Where KeOps writes compiled kernels: $KEOPS_CACHE_FOLDER, else <project>/.keops_cache."""
    default = Path(__file__).resolve().parent.parent / ".keops_cache"
    return Path(os.environ.get("KEOPS_CACHE_FOLDER", default))


def _import_keops():
    folder = keops_cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    # keopscore prints "[KeOps] Warning : CUDA libraries not found or could not be loaded; Switching to CPU
    # only." to stdout at import on every machine without CUDA, where nothing is wrong; KEOPS_VERBOSE=0
    # (read once, at that import) keeps it quiet unless the user set it. A failing KeOps is reported by
    # `keops_available`'s reason in the fallback's warning instead.
    os.environ.setdefault("KEOPS_VERBOSE", "0")
    import pykeops  # noqa: PLC0415  (optional dependency)

    pykeops.set_verbose(False)
    pykeops.set_build_folder(str(folder))
    from pykeops.torch import LazyTensor  # noqa: PLC0415

    return LazyTensor


def _device_state(device: torch.device | str) -> dict[str, object]:
    return _keops_state.setdefault(torch.device(device).type, {"ok": None, "why": None})


def keops_available(device: torch.device | str = "cpu") -> bool:
    """True when pykeops imports and compiles a tiny Cauchy kernel for `device`'s type (CPU: KeOps' g++
    build; CUDA: its nvrtc build), and that kernel agrees with the torch one there. Checked once per
    process and device type; the reason for a False is kept for the fallback's warning."""
    state = _device_state(device)
    if state["ok"] is None and torch.device(device).type not in ("cpu", "cuda"):  # (mps, meta, ...)
        state["ok"], state["why"] = False, "KeOps runs on CPU and CUDA tensors only"  # (others: a crash)
    if state["ok"] is None:
        try:
            z = torch.tensor([0.5 + 1.0j], dtype=torch.complex64, device=device)
            w = torch.tensor([-0.5 + 0.25j], dtype=torch.complex64, device=device)
            v = torch.tensor([1.0 + 0.0j], dtype=torch.complex64, device=device)
            got = cauchy_keops(v, z, w, conj=True).cpu()
            want = cauchy_torch(v, z, w, conj=True).cpu()
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                raise RuntimeError(f"self-test mismatch: {got} vs {want}")
            state["ok"] = True
        except Exception as exc:  # missing package, no compiler, broken CUDA, a device KeOps has no build for
            state["ok"], state["why"] = False, f"{type(exc).__name__}: {exc}"
    return bool(state["ok"])


def _keops_backend(t: torch.Tensor) -> str:
    # pykeops' "auto" may pick the GPU code path even for CPU tensors (the nvrtc KeyError in the
    # official S4 code); always name the backend that matches where the data lives.
    return "GPU" if t.is_cuda else "CPU"


def _pick(backend: str, device: torch.device | str = "cpu") -> str:
    """The backend to run for tensors on `device`: "auto" is keops where it works on that device type."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        if keops_available(device):
            return "keops"
        state = _device_state(device)
        if not state.get("warned"):
            warnings.warn(
                f"pykeops unavailable on {torch.device(device).type} ({state['why']}); using the torch "
                "Cauchy kernel (same results, more memory traffic)",
                RuntimeWarning,
                stacklevel=3,
            )
            state["warned"] = True
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


def _pair_reciprocal(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """R[p, l, n] = 1 / ((z[p, l] − w[p, n]) (z[p, l] − w̄[p, n])) (P, l, N), as a product of the two
    differences: the expanded z² − 2 Re(w) z + |w|² cancels badly near a pole in float32."""
    zc, wc = z[:, :, None], w[:, None, :]
    return (zc - wc).mul_(zc - wc.conj()).reciprocal_()  # in place: a third less time than out of place


class _CauchyPairs(torch.autograd.Function):
    """S[e, p, l] = Σₙ c[e, p, n] R[p, l, n] for real c (E, P, N), z (P, L), w (P, N), R as in
    `_pair_reciprocal`; chunked over L, R rebuilt in backward so memory stays bounded.

    R depends on w only through p = 2 Re w and q = |w|² (R = 1/(z² − p z + q)), so w enters as a value
    and its gradient flows through the inputs p and q (P, N), computed from w by the caller. Gradients
    (conjugate Wirtinger, PyTorch's convention), with M' = R² · Σₑ conj(g[e]) c[e]:
        ∂/∂c = Re Σₗ conj(g) R,   ∂/∂q = −Re Σₗ M',   ∂/∂p = Re Σₗ z M',
        ∂/∂z = −conj(Σₙ (2z − pₙ) M')."""

    @staticmethod
    def forward(ctx, c, z, w, p, q, chunk: int):
        ctx.save_for_backward(c, z, w, p)
        ctx.chunk = chunk
        cc = c.permute(1, 2, 0).to(z.dtype)  # (P, N, E)
        L = z.shape[-1]
        out = torch.cat(
            [torch.bmm(_pair_reciprocal(z[:, s : s + chunk], w), cc) for s in range(0, L, chunk)], dim=1
        )  # (P, L, E)
        return out.permute(2, 0, 1)  # (E, P, L)

    @staticmethod
    def backward(ctx, g):
        c, z, w, p = ctx.saved_tensors
        chunk, L = ctx.chunk, z.shape[-1]
        need_c, need_z, _, need_p, need_q, _ = ctx.needs_input_grad
        g_bar = g.conj().permute(1, 2, 0)  # (P, L, E)
        cP = c.transpose(0, 1).to(z.dtype)  # (P, E, N)
        ones_p = torch.stack([torch.ones_like(p), p], dim=-1).to(z.dtype)  # (P, N, 2)
        grad_c = torch.zeros(c.shape[1], c.shape[0], c.shape[2], dtype=z.dtype, device=z.device)
        grad_p = torch.zeros_like(p, dtype=z.dtype)
        grad_q = torch.zeros_like(p, dtype=z.dtype)
        grad_z = torch.empty_like(z) if need_z else None
        for s in range(0, L, chunk):
            zc, gc = z[:, s : s + chunk], g_bar[:, s : s + chunk]  # (P, l), (P, l, E)
            R = _pair_reciprocal(zc, w)  # (P, l, N)
            if need_c:
                grad_c += torch.bmm(gc.transpose(1, 2), R)  # (P, E, N); Re taken below
            if need_z or need_p or need_q:
                M = torch.bmm(gc, cP).mul_(R.square_())  # M' (P, l, N)
                if need_q:
                    grad_q -= M.sum(1)
                if need_p:
                    grad_p += torch.bmm(zc[:, None, :], M)[:, 0]
                if need_z:
                    t = torch.bmm(M, ones_p)  # (P, l, 2): Σₙ M', Σₙ pₙ M'
                    grad_z[:, s : s + chunk] = (t[..., 1] - 2 * zc * t[..., 0]).conj()
        return (
            grad_c.real.transpose(0, 1) if need_c else None,
            grad_z,
            None,
            grad_p.real if need_p else None,
            grad_q.real if need_q else None,
            None,
        )


def _cauchy_conj_pairs(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σₙ vₙ/(z − wₙ) + v̄ₙ/(z − w̄ₙ) = Σₙ (2 Re(vₙ) z − 2 Re(vₙ w̄ₙ)) / ((z − wₙ)(z − w̄ₙ)):
    one reciprocal per (l, n) instead of two, shared by every leading slice of v."""
    bR = torch.broadcast_shapes(z.shape[:-1], w.shape[:-1])
    full = torch.broadcast_shapes(v.shape[:-1], bR)
    bR, extra = full[len(full) - len(bR) :], full[: len(full) - len(bR)]
    N, L = w.shape[-1], z.shape[-1]
    P, E = torch.Size(bR).numel(), torch.Size(extra).numel()
    zP = z.expand(*bR, L).reshape(P, L)
    wP = w.expand(*bR, N).reshape(P, N)
    vP = v.expand(*full, N).reshape(E, P, N)
    c = torch.cat([2 * vP.real, 2 * (vP * wP.conj()).real], dim=0)  # (2E, P, N) real
    p, q = 2 * wP.real, wP.real.square() + wP.imag.square()
    chunk = max(1, _TORCH_CHUNK_ELEMS // max(1, N * P))
    S = _CauchyPairs.apply(c, zP, wP.detach(), p, q, chunk)  # (2E, P, L)
    S_a, S_b = S.unflatten(0, (2, E)).unbind(0)  # (E, P, L) each; unbind's backward is one stack
    out = zP * S_a - S_b
    return out.reshape(*extra, *bR, L)


def cauchy_torch(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool = True) -> torch.Tensor:
    """Reference backend: exact torch ops, chunked over L. With conj=True the conjugate pairs are
    summed as one fraction with a hand-written backward (`_cauchy_conj_pairs`; 3–4× faster forward +
    backward than autograd through the two terms on CPU, bench.train); conj=False: autograd."""
    if conj:
        return _cauchy_conj_pairs(v, z, w)
    return cauchy_torch_autograd(v, z, w, conj)


def cauchy_torch_autograd(
    v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, conj: bool = True
) -> torch.Tensor:
    """Both terms built explicitly, autograd backward, chunked over L and recomputed in backward
    (checkpointing); the conj=False path, and with conj=True the reference the faster path is tested
    and benchmarked against."""
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
    if _pick(backend, z.device) == "keops":
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
    if _pick(backend, x.device) == "keops":
        return vandermonde_keops(v, x, L)
    return vandermonde_torch(v, x, L)
