"""The recurrent (serving) form of a trained SequenceModel.

Per layer the SSM becomes x_k = Ā x_{k−1} + B̄ u_k, y_k = C̄ x_k + D u_k with Ā diagonal,
    x ← μ ⊙ x + b u,  y = 2 Re Σₘ cₘ xₘ
(conjugate pairs kept once), stepped in its real block-diagonal form (`real_block_slots`): M = N/2 slots of
2 real coordinates per channel, a complex mode's Re x and Im x or two real modes, state (B, H, 2, M)
float32. Conversion runs in float64:
  * S4 (DPLR): build the real N×N system of A = Λ − P̃·2Re(P̃ᴴ ·) (the conjugate-symmetric DPLR
    matrix), discretize (bilinear), undo the generating-function C̃ = C̄(I − Ā^L), diagonalize.
  * S4D: already diagonal; discretize.
Every layer is then *verified*: the impulse response of its float32 step, run for the trained
length, must match the float64 conv kernel. A diagonalized layer that fails (ill-conditioned
eigenvectors) falls back to the exact O(N·r) DPLR step; if that fails too, conversion raises.

Precision: conversion is float64 and states are float32 whatever the weights' dtype. In the torch ops
the rest of the network (embedding, LayerNorms, linear layers, head) runs in the weights' dtype (float32,
bfloat16, float16 or float64); each SSM step takes its input in float32 and hands its output back in that
dtype (the prefill takes and returns that dtype, computing in float32); logits come out as float32. The
whole-network C step on CPU (`fused.NetStep`: the step, the decode block and the prefill of short prompts)
computes in float32 from 16-bit weights widened exactly, so there a bfloat16 or float16 model's
activations are not rounded to 16 bits between ops; the parallel prefill of longer prompts keeps the
torch ops' rounding, and the two agree within the dtype's tolerance (tested). On a CPU without native
16-bit matmul (`native_matmul`) the torch ops too compute in float32, on a float32 copy of the 16-bit
weights (`compute_dtype`), so there every path is float32 arithmetic on the 16-bit weights. The whole
network is then verified *at that dtype*: its step and its prefill over a probe of tokens must reproduce
float64 conv-mode logits within `LOGITS_TOL[dtype]`.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import math
import numbers
import sys
import threading
import weakref
from typing import TYPE_CHECKING

import torch

from model import fused, linalg
from model import triton_step as triton_kernel
from model.cuda_graphs import GraphedModel
from model.kernel import SSMKernel, discretize
from model.layer import fft_conv
from model.network import check_token_dtype, check_token_ids, usable_device

if TYPE_CHECKING:  # (imported where used: `python -m model.form_cache` runs that module as __main__)
    from model.form_cache import FormCache

F64, C64, C128 = torch.float64, torch.complex64, torch.complex128
# prefill block T (a power of 2): per layer, float32 tables of T rows (μ^t b, c̃ μ^{t+1}, Ā^t B̄, …) and the
# (H, T, T) Toeplitz matrix of K_0..K_{T−1}: ≈ H·T·(T + 4M)·4 bytes, plus the μ^{2^k}: 16 MiB for H = 256,
# M = 34. Measured on the text model, 16k tokens, 1 thread: T = 64 (matmul) 633 ms, T = 128 (matmul)
# 984 ms, FFT 894-1068 ms.
CHUNK = 64
PREFILL_THREADS = 1  # torch threads for a prefill (bench.prefill: 2 threads stall when another process runs)
MU_POW_BITS = 48  # μ^{2^k} (k < this) are tabulated: μ^n for any n < 2^48 in float32 by n's bits
# prompts up to this long take the C step's recurrent form layer by layer (fused.NetStep.prefill), faster
# than the parallel form's FFT convolutions up to ~512 tokens on one thread (2026-11-30: 19 vs 25 ms at 256)
PREFILL_BY_STEPS_MAX_TOKENS = 512
LOGITS_KINDS = ("all", "last", "none")  # prefill(..., logits=): which positions' logits come back


def check_logits_kind(logits: str) -> None:
    """Raises ValueError unless `logits` is one of LOGITS_KINDS (the prefills' `logits` argument)."""
    if logits not in LOGITS_KINDS:
        raise ValueError(f"logits must be one of {LOGITS_KINDS}, got {logits!r}")


VERIFY_TOKENS = 256  # the network check's probe: 2 sequences of min(this, l_max) tokens
# Relative logits error ‖Δ‖/‖ref‖ allowed by the network check, per weight dtype. float32 (and float64
# weights: the SSM runs in float32): the kernel check's 1e-4 (measured 1e-7..6e-6 over 256 tokens).
# Half precision: every op rounds its output to the weights' dtype, a relative error up to the unit
# roundoff u = 2^-p (p significand bits: bfloat16 p = 8, u = 3.9e-3; float16 p = 11, u = 4.9e-4); the
# logits' own rounding alone gives u/√3 RMS and the blocks' roundings add to it, so the tolerance is 4u
# (bfloat16 1.6e-2, float16 2.0e-3). Measured: 0.76u..1.08u (the shipped models, tiny random ones); a
# state kept in bfloat16 instead of float32 gives 8.3u on the shipped text model, a lost state 26u..68u.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
LOGITS_TOL = {torch.float64: 1e-4, torch.float32: 1e-4, **{d: 4 * u for d, u in UNIT_ROUNDOFF.items()}}


def native_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `device` multiplies `dtype` matrices natively: always on CUDA and for float32 and float64;
    on CPU bfloat16 with AVX512-BF16 or AMX, float16 with AVX512-FP16 or AMX-FP16 (torch.cpu's probes
    and /proc/cpuinfo). oneDNN's own `_is_mkldnn_bf16_supported` is not used: it is true on every
    AVX-512 CPU, where bfloat16 matmuls are emulated (slower than float32)."""
    if device.type != "cpu" or dtype in (torch.float32, torch.float64):
        return True
    flags, probes = {  # /proc/cpuinfo flags, torch.cpu probes
        torch.bfloat16: ({"avx512_bf16", "amx_bf16"},
                         ("_is_avx512_bf16_supported", "_is_amx_tile_supported")),
        torch.float16: ({"avx512_fp16", "amx_fp16"}, ("_is_amx_fp16_supported",)),
    }[dtype]  # fmt: skip
    if flags & fused.cpu_flags():
        return True
    for probe in probes:
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except RuntimeError:
            pass
    return False


class VerificationError(RuntimeError):
    """The recurrent form does not reproduce the conv-mode kernel (or the network's conv-mode logits)."""


class StateRangeError(ValueError):
    """A state offered to the model (an import, a stored session) is not one the model can reach:
    a value is NaN or infinite, or exceeds the bound of `RecurrentModel.state_limit`."""


def check_batch_size(batch_size) -> None:
    """`init_state`'s argument (RecurrentModel, SaShiMiRecurrent): an int ≥ 0, not a bool (True was one
    row here, a TypeError in a SaShiMi). Raises ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 0:
        raise ValueError(f"batch_size must be an int ≥ 0, got {batch_size!r}")


def check_state_kind(state) -> None:
    """StateRangeError unless `state` is a float32 or float16 tensor (the states `step` takes): a float64
    or int64 state passed `check_state` and `step` then refused it; a list was an AttributeError."""
    if not isinstance(state, torch.Tensor) or state.dtype not in STATE_DTYPES:
        kind = f"a {state.dtype} tensor" if isinstance(state, torch.Tensor) else type(state).__name__
        raise StateRangeError(f"state must be a float32 (or float16) tensor, got {kind}")


# The dtypes a state may be stored in. float32 everywhere (conversion verifies it against the float64 conv
# mode); float16 as an opt-in for a GPU's decode batch (`GraphedModel.use_state_dtype`): the step widens
# it exactly, computes in float32 and rounds the next state to float16, so a step moves half the bytes.
# bench.state_precision measured the cost on the shipped models' held-out data (2026-12-04): +0.01 % bits
# a token (text), +0.35-0.53 % (audio).
STATE_DTYPES = (torch.float32, torch.float16)
# `GraphedModel.use_state_dtype`'s check: the mean total variation between the next-token distributions
# of a float16 state's step and the float32 step's, over its probe (4 rows, 256 random tokens). Measured
# 2026-12-06 on the shipped models: float16 0.0022 (audio-digits), 0.0052 (audio-digits-s4), 0.0083
# (text-shakespeare); a bfloat16 state 0.018, 0.046 and 0.067 (what the check is there to refuse).
STATE16_TOL = 0.015
FLOAT16_MAX = 65504.0  # float16's largest finite value: a state that could exceed it is not stored so
# How a float16 state's stored coordinate can differ from the exact update's (`DiagonalSSM.state_bound`): the
# float32 update v = μ x + b u (three roundings: ≤ √2·3·2⁻²⁴ (|μ||x| + |b||u|) < 2⁻²¹ of it, by Cauchy-Schwarz
# on the 2×2 block), then rounded to nearest float16: relative error ≤ 2⁻¹¹ in float16's normal range,
# absolute ≤ 2⁻²⁵ (half the subnormal spacing) below it. Together |x̃'| ≤ (1 + ρ)(|μ||x̃| + |b||u|) + δ per
# coordinate, with ρ = 2⁻¹¹ + 2⁻²⁰ ≥ (1 + 2⁻¹¹)(1 + 2⁻²¹) − 1 and δ = 2⁻²⁵ (√2 δ for a complex slot's |x̃|).
STATE16_ROUNDING = (2.0**-11 + 2.0**-20, 2.0**-25)
BFLOAT16_STATE = (
    "a bfloat16 state loses 0.6-2.4 bits a token on the shipped models, its 8-bit mantissa cannot follow "
    "the slowest modes' decay (bench.state_precision); float16 is the 16-bit state"
)
STATE_BOUND_SLACK = 1.01  # float32 rounding of the step and prefill stays far below 1 % of the bound


def float32_str(value: float | torch.Tensor) -> str:
    """A float32 value in the fewest significant digits, at least 6, that read back as the same float32
    (at most 9), so two different float32 values never print alike: a state value over its bound was
    written "-54.2178 ... exceeds 54.2178" with 6 digits."""
    v = torch.tensor(float(value), dtype=torch.float32)
    for digits in range(6, 10):
        text = f"{float(v):.{digits}g}"
        if torch.tensor(float(text), dtype=torch.float32) == v:
            break
    return text


REL_ERR_CHUNK = 1 << 20  # elements per pass of `_rel_err`


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ in float64, over chunks of REL_ERR_CHUNK elements: the network check's logits of the
    WikiText-103 recipe are 137 M (2 × 256 × 267,735), whose float64 copies were 1.1 GB each."""
    a, b = torch.broadcast_tensors(a, b)
    a, b = a.reshape(-1), b.reshape(-1)
    num = den = 0.0
    for i in range(0, b.numel(), REL_ERR_CHUNK):
        bb = b[i : i + REL_ERR_CHUNK].double()
        num += float((a[i : i + REL_ERR_CHUNK].double() - bb).square().sum())
        den += float(bb.square().sum())
    return num**0.5 / max(den**0.5, 1e-300)


def layernorm_output_bound(norm: torch.nn.LayerNorm) -> torch.Tensor:
    """(H,) float64: max |u_h| of a LayerNorm's output γ ⊙ x̂ + β over all inputs. A standardized
    vector of H values has |x̂_h| ≤ √(H − 1) (Samuelson's inequality; the eps only shrinks it), so
    |u_h| ≤ |γ_h| √(H − 1) + |β_h|."""
    H = norm.normalized_shape[0]
    gamma = torch.ones(H, dtype=F64) if norm.weight is None else norm.weight.detach().cpu().double().abs()
    beta = torch.zeros(H, dtype=F64) if norm.bias is None else norm.bias.detach().cpu().double().abs()
    return gamma * (H - 1) ** 0.5 + beta


def logits_report(what: str, dtype: str, stepped, prefilled, ref: torch.Tensor, tol: float) -> dict:
    """The network check's verdict: relative errors of the stepped and the prefilled logits (B, T, V)
    against the float64 conv-mode logits `ref`; VerificationError naming `what` above `tol` (a NaN
    fails too). Returns the report served in /v1/models, /readyz and /metrics."""
    errs = [_rel_err(stepped.cpu(), ref), _rel_err(prefilled.cpu(), ref)]
    T = ref.shape[1]
    if not all(e <= tol for e in errs):
        raise VerificationError(
            f"{what} does not reproduce the float64 conv-mode logits within rel. err {tol:g} over {T} tokens "
            f"(step {errs[0]:.2e}, prefill {errs[1]:.2e})"
        )
    return {"dtype": dtype, "tokens": T, "step_rel_err": errs[0], "prefill_rel_err": errs[1], "tol": tol}


_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (dtype, shape, device, SHA-256) →
_TABLES_LOCK = threading.Lock()  # a table some live form holds (`shared_table`)


def shared_table(t: torch.Tensor) -> torch.Tensor:
    """`t`, or the tensor of the same dtype, shape, device and bytes that a form built before still holds.
    A layer form's prefill tables are read-only and computed from its float64 system, so two models of
    one checkpoint (two ids, say float32 and bfloat16 weights: the SSM forms are float32 either way) hold
    one copy of them, not one each (the text-shakespeare model's: 56 MiB). Exact: only a tensor equal in
    every byte is shared (`torch.equal` besides the hash); freed with the last form that holds it."""
    raw = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    key = (t.dtype, tuple(t.shape), str(t.device), hashlib.sha256(raw).hexdigest())
    with _TABLES_LOCK:
        held = _TABLES.get(key)
        if held is not None and torch.equal(held, t):
            return held
        _TABLES[key] = t
    return t


def pad_fused_params(form, M: int) -> None:
    """Prepare a CPU layer form for the fused step: its parameters zero-padded along the mode axis to M
    modes (a model's state holds max-over-layers modes) and their C pointers. A padded mode has
    μ = b = c = 0 (diagonal) or D⁻¹ = P = Q = 0 (DPLR), so it stays 0 and adds nothing; the fused step
    then runs over the whole padded state. Also builds the C prefill's tables (`fused_prefill_tables`) and
    drops the torch prefill's (in_tab, out_tab, conv_tab, Kf: 13.5 of the text model's 16 MiB per layer),
    which they replace; where the C vector width does not divide H they stay None and the torch ops serve.
    Raises ValueError unless the parameters are float32 on CPU."""
    padded = tuple(
        p if p is getattr(form, "Minv", None) or form.M == M
        else torch.nn.functional.pad(p, (0, M - form.M)).contiguous()
        for p in form._fused_params
    )  # fmt: skip
    form._fused_params, form._fused_ptrs = padded, fused.pointers(*padded)
    tables = fused_prefill_tables(form, fused.library().ssm_prefill_width())
    form._prefill_c = None if tables is None else tuple(map(shared_table, tables))
    if form._prefill_c is not None:  # the C pass serves every prefill of this form: the torch tables go
        form.in_tab = form.out_tab = form.conv_tab = form.Kf = None


# ---------------------------------------------------------------------------------------------
# Conversion (float64)


def s4_real_system(s: dict[str, torch.Tensor], L: int):
    """Bilinear-discretized real system of a DPLR kernel, with C̄ recovered from C̃.

    State ξ = [Re x; Im x] ∈ R^N of the N/2 complex modes x. Returns Ā (H, N, N), B̄ (H, N),
    γ̄ (H, N) with y = γ̄ᵀ ξ, all float64.
    """
    Lam, P, B, C, dt = s["Lambda"], s["P"], s["B"], s["C"], s["dt"]  # float64/complex128
    H, N2 = Lam.shape
    N = 2 * N2
    eye = torch.eye(N, dtype=F64).expand(H, N, N)
    M = torch.zeros(H, N, N, dtype=F64)
    idx = torch.arange(N2)
    M[:, idx, idx] = Lam.real
    M[:, idx + N2, idx + N2] = Lam.real
    M[:, idx, idx + N2] = -Lam.imag
    M[:, idx + N2, idx] = Lam.imag
    for Pj in P:  # (H, N2): subtract P̃ · 2Re(P̃ᴴ x) = [Pr; Pi] · 2[Pr, Pi]ᵀ ξ
        col = torch.cat([Pj.real, Pj.imag], dim=-1)
        M -= 2 * col[:, :, None] * col[:, None, :]
    beta = torch.cat([B.real, B.imag], dim=-1)
    gamma_t = torch.cat([2 * C.real, -2 * C.imag], dim=-1)  # y = 2 Re(C x)
    half = dt[:, None, None] / 2 * M
    Abar = linalg.solve(eye - half, eye + half)
    Bbar = linalg.solve(eye - half, (dt[:, None] * beta)[..., None])[..., 0]
    # C̃ᵀ = C̄ᵀ (I − Ā^L)  ⇒  (I − Ā^L)ᵀ γ̄ = γ̃
    AL = torch.linalg.matrix_power(Abar, L)
    gamma = linalg.solve((eye - AL).transpose(-1, -2), gamma_t[..., None])[..., 0]
    return Abar, Bbar, gamma


def diagonalize(Abar: torch.Tensor, Bbar: torch.Tensor, gamma: torch.Tensor):
    """Eigen-decompose a real system: y = γᵀ ξ, ξ ← Ā ξ + B̄ u  →  modes (μ, b, c) with
    y = 2 Re Σ c x. Conjugate pairs are kept once; a real eigenvalue is kept with half its c.
    Returns complex128 (H, M), zero-padded where channels have fewer modes."""
    mu, W = torch.linalg.eig(Abar)  # (H, N), (H, N, N)
    b = linalg.solve(W, Bbar.to(C128)[..., None])[..., 0]
    c = (gamma.to(C128)[:, None, :] @ W)[:, 0]
    is_real = mu.imag == 0
    keep = (mu.imag > 0) | is_real
    c = torch.where(is_real, c / 2, c)
    # balance |b| = |c| per mode (the product, which is all that matters, is unchanged)
    scale = (c.abs() / b.abs().clamp(min=1e-300)).sqrt()
    scale = torch.where((b.abs() > 0) & (c.abs() > 0), scale, torch.ones_like(scale))
    b, c = b * scale, c / scale
    M = int(keep.sum(-1).max())
    out = [torch.zeros(mu.shape[0], M, dtype=C128) for _ in range(3)]
    for h in range(mu.shape[0]):
        k = keep[h].nonzero()[:, 0]
        for o, v in zip(out, (mu, b, c)):
            o[h, : len(k)] = v[h, k]
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Layer forms


def _blocks(u: torch.Tensor, T: int):
    """u (B, L, H) float32 → U (H, B·n, T) contiguous, the prompt front-padded with p zeros to n blocks
    of T (zeros ahead of the prompt add nothing to a causal convolution nor to a state from 0); n, p."""
    Bsz, L, H = u.shape
    n = -(-L // T)
    p = n * T - L
    U = u.new_empty(H, Bsz, n * T)
    U[..., :p] = 0
    U[..., p:] = u.permute(2, 0, 1)
    return U.view(H, Bsz * n, T), n, p


def _toeplitz(K: torch.Tensor) -> torch.Tensor:
    """K (H, T) → (H, T, T) with [j, t] = K_{t−j} for t ≥ j, else 0: U @ it is the causal convolution."""
    T = K.shape[-1]
    d = torch.arange(T)[None, :] - torch.arange(T)[:, None]
    return torch.where(d >= 0, K[:, d.clamp(min=0)], torch.zeros((), dtype=K.dtype))


def _block_outputs(form, U: torch.Tensor, S: torch.Tensor):
    """Per block: the causal convolution of its own T inputs with K_0..K_{T−1} plus the outputs of the
    state at its start, S (H, B·n, N) real against form.out_tab (H, N, T) → (H, B·n, T) float32.
    The convolution is a matmul with the (H, T, T) Toeplitz matrix `form.conv_tab` (measured 5× faster
    than the FFT at T = 128 on CPU, 16k tokens), or, when that is None, an FFT of the fixed size 2T with
    the kernel's transform `form.Kf` (H, T+1) cached."""
    if form.conv_tab is not None:
        return torch.baddbmm(torch.bmm(U, form.conv_tab), S, form.out_tab)
    T = U.shape[-1]
    Y = torch.fft.irfft(torch.fft.rfft(U, n=2 * T) * form.Kf[:, None], n=2 * T)[..., :T]
    return torch.baddbmm(Y, S, form.out_tab)


def _unblock(Y: torch.Tensor, Bsz: int, L: int, p: int) -> torch.Tensor:
    """(H, B·n, T) → (B, L, H), dropping the p front-padding positions."""
    H = Y.shape[0]
    return Y.reshape(H, Bsz, -1)[..., p:].permute(1, 2, 0).contiguous()


def _lanes(x: torch.Tensor, vw: int) -> torch.Tensor:
    """(H, …) → (H/vw, …, vw) contiguous: the channel's lane innermost (the fused prefill's layout)."""
    return x.reshape(x.shape[0] // vw, vw, *x.shape[1:]).movedim(1, -1).contiguous()


def fused_prefill_tables(form, vw: int) -> tuple | None:
    """The torch prefill tables of `form` in the C prefill's layout (`_fused_prefill`), the channel's lane
    innermost and the N real coordinates zero-padded to a multiple of 8: K (G, T, vw), in (G, T, Np, vw),
    out (G, Np, T, vw), and A^T (G, 2Np, vw) as one 2×2 block per slot (diagonal) or (Ā^T)ᵀ
    (G, Np, Np, vw) (DPLR), for G = H / vw channel groups; None when vw does not divide H. float32,
    ≈ H·T·2Np·4 bytes."""
    H, T, N = form.H, form.T, 2 * form.M
    if not vw or H % vw:
        return None
    pad = -N % 8
    if form.form == "diagonal":  # per slot its block A^T row by row (p, −m, m, s)
        tr = torch.nn.functional.pad(form._pow_table(T), (0, 2 * pad))
    else:
        tr = torch.nn.functional.pad(form.A_bin_t[-1], (0, pad, 0, pad))
    return (
        _lanes(form.conv_tab[:, 0, :], vw),  # K_t: row 0 of the Toeplitz matrix
        _lanes(torch.nn.functional.pad(form.in_tab, (0, pad)), vw),
        _lanes(torch.nn.functional.pad(form.out_tab, (0, 0, 0, pad)), vw),
        _lanes(tr, vw),
    )


def _fused_prefill(form, u: torch.Tensor, x0r: torch.Tensor | None, x1r: torch.Tensor | None):
    """The parallel form of `form` in one C pass on the (B, L, H) layout (model/csrc/ssm_step.c
    `ssm_prefill`: the same blocks and tables as the torch form, in float32; no transposes, no dtype
    casts, the scan fused), using the tables `pad_fused_params` built (`form._prefill_c`).

    u (B, L, H) contiguous on CPU, float32 or bfloat16 (read and written as they are; other float dtypes
    go through float32); x0r, x1r (B, H, N) float32 real coordinates (the state at the prompt's start and
    Ā^{T−p} of it, p = −L mod T; both None for a zero start) → y (B, L, H) in u's dtype (bfloat16:
    rounded to nearest even, as .to()) and the final state (B, H, N) float32 in the form's real
    coordinates. Raises ValueError for a tensor off the CPU, RuntimeError if the C call refuses."""
    if u.device.type != "cpu":
        raise ValueError(f"the C prefill runs on CPU tensors, got one on {u.device}")
    if u.dtype not in (torch.float32, torch.bfloat16):  # float16, float64: through float32
        y, xL = _fused_prefill(form, u.float(), x0r, x1r)
        return y.to(u.dtype), xL
    Bsz, L, H = u.shape
    T, N = form.T, 2 * form.M
    Np = form._prefill_c[1].shape[2]  # the tables' padded N (fused_prefill_tables)
    y = torch.empty_like(u)
    xL = torch.empty(Bsz, H, Np)

    def padded(x):
        return None if x is None else torch.nn.functional.pad(x, (0, Np - N)).contiguous()

    x0p, x1p = padded(x0r), padded(x1r)
    ptr, n = ctypes.c_void_p, ctypes.c_long
    rc = fused.library().ssm_prefill(
        n(Bsz), n(L), n(H), n(Np), n(T), n(-L % T), n(0 if form.form == "diagonal" else 1),
        n(u.dtype == torch.bfloat16), ptr(u.data_ptr()), ptr(y.data_ptr()),
        *(ptr(t.data_ptr()) for t in form._prefill_c),
        ptr(None if x0p is None else x0p.data_ptr()), ptr(None if x1p is None else x1p.data_ptr()),
        ptr(xL.data_ptr()), n(torch.get_num_threads()),
    )  # fmt: skip
    if rc:
        raise RuntimeError(f"ssm_prefill refused its arguments ({rc})")
    return y, xL[..., :N]


def real_block_slots(mu: torch.Tensor, b: torch.Tensor, c: torch.Tensor):
    """Pack a diagonal system's modes into 2-coordinate slots of real state (the real block-diagonal form,
    as in a real Schur decomposition): y = 2 Re Σₘ cₘ xₘ, xₘ ← μₘ xₘ + bₘ u, modes (H, Mc) complex128
    (zero-padded modes μ = b = c = 0). A complex mode (Im μ ≠ 0) fills a slot: its coordinates are Re x
    and Im x. A real mode (Im μ = 0) is a 1-dimensional system once b is rotated to |b| (x real; c turned
    by the same phase, so c·b, all that matters, is kept), and two of them share a slot, one coordinate each:
    a real N-dimensional system of 2·pairs + reals = N dimensions then needs exactly N/2 slots, where keeping
    each real mode as a complex one takes pairs + reals (the shipped LegS models: 32 slots, not 33-35).

    Per slot j the step is the 2×2 real block x₁ ← p x₁ − m x₂ + b₁ u, x₂ ← m x₁ + s x₂ + b₂ u,
    y += w₁ x₁ + w₂ x₂, with p = Re λ₁, s = Re λ₂, m = Im λ₁ for the slot's eigenvalues λ₁, λ₂: one
    complex mode μ gives λ₁ = λ₂ = μ (the block is the complex product; w₁ = Re 2c, w₂ = −Im 2c), two real
    ones give λ₁ = μₐ, λ₂ = μ_b (a diagonal block; w = 2c each). Its n-th power is the same block with
    λ₁ⁿ, λ₂ⁿ. Returns complex128 (H, M) λ₁, λ₂ and float64 (H, 2, M) b, w, and the bool (H, M) mask of
    complex slots; M = the most slots a channel needs, the rest zero."""
    H = mu.shape[0]
    cplx = mu.imag != 0
    real = (mu.imag == 0) & ((mu != 0) | (b * c != 0))
    rot = torch.where(b.abs() > 0, b.conj() / b.abs().clamp(min=1e-300), torch.ones_like(b))
    b_real, w_real = (b * rot).real, 2 * (c / rot).real  # a real mode rotated: b = |b|, c·b kept
    n_slots = cplx.sum(-1) + (real.sum(-1) + 1) // 2
    M = max(int(n_slots.max()), 1)
    lam1, lam2 = (torch.zeros(H, M, dtype=C128) for _ in range(2))
    bb, ww = (torch.zeros(H, 2, M, dtype=F64) for _ in range(2))
    is_cplx = torch.zeros(H, M, dtype=torch.bool)
    # a channel's complex modes fill its first slots in their order; its real modes follow, the i-th real
    # one at coordinate i % 2 of slot n + i // 2 (n: the channel's complex modes). All channels at once
    # (a loop over channels took 0.1 s a layer at H = 1,024).
    hc, mc = cplx.nonzero(as_tuple=True)
    jc = (cplx.cumsum(-1) - 1)[hc, mc]
    lam1[hc, jc] = lam2[hc, jc] = mu[hc, mc]
    bb[hc, 0, jc], bb[hc, 1, jc] = b[hc, mc].real, b[hc, mc].imag
    ww[hc, 0, jc], ww[hc, 1, jc] = (2 * c[hc, mc]).real, -(2 * c[hc, mc]).imag
    is_cplx[hc, jc] = True
    hr, mr = real.nonzero(as_tuple=True)
    i = (real.cumsum(-1) - 1)[hr, mr]
    jr, q = cplx.sum(-1)[hr] + i // 2, i % 2
    for lam, on in ((lam1, q == 0), (lam2, q == 1)):
        lam[hr[on], jr[on]] = mu[hr[on], mr[on]].real.to(C128)
    bb[hr, q, jr], ww[hr, q, jr] = b_real[hr, mr], w_real[hr, mr]
    return lam1, lam2, bb, ww, is_cplx


def float32_stable(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """complex128 `z` (|z| < 1: a stable mode) → its real and imaginary parts in float32, rounded to nearest
    unless that pair's modulus is ≥ 1; then, of each part rounded to nearest or moved one ulp toward zero,
    the pair nearest z of modulus < 1 (both moved is within |z|, so one exists). Only modes within about
    1e-7 of the unit circle are moved: every other one is rounded as `.to(torch.float32)` rounds it."""
    parts = [t.to(torch.float32) for t in (z.real, z.imag)]
    best, best_err = parts, torch.full(z.shape, math.inf, dtype=F64, device=z.device)
    for re in (parts[0], torch.nextafter(parts[0], torch.zeros_like(parts[0]))):
        for im in (parts[1], torch.nextafter(parts[1], torch.zeros_like(parts[1]))):
            w = torch.complex(re.double(), im.double())
            err = torch.where((w.abs() < 1) | (z.abs() >= 1), (w - z).abs(), math.inf)
            take = err < best_err
            best = [torch.where(take, re, best[0]), torch.where(take, im, best[1])]
            best_err = torch.where(take, err, best_err)
    return best[0], best[1]


class DiagonalSSM:
    """The diagonal SSM x ← μ ⊙ x + b u, y = 2 Re Σ c x, stepped in its real block-diagonal form
    (`real_block_slots`): state (B, H, 2, M) float32, coordinates x₁, x₂ of M slots per channel,
    x₁ ← p x₁ − m x₂ + b₁ u,  x₂ ← m x₁ + s x₂ + b₂ u,  y = Σ w₁ x₁ + w₂ x₂."""

    form = "diagonal"

    def __init__(self, mu: torch.Tensor, b: torch.Tensor, c: torch.Tensor, device):
        """mu, b, c (H, Mc) complex128: the modes (`diagonalize`, or S4D's discretized Λ, B̄, C)."""
        lam1, lam2, bb, ww, is_cplx = real_block_slots(mu, b, c)
        self.lam64 = (lam1, lam2)  # complex128 (H, M) each: the slot's eigenvalues (tables, state bound)
        self.b64, self.w64, self.is_cplx = bb, ww, is_cplx  # float64 (H, 2, M); bool (H, M)
        self.H, self.M = lam1.shape
        self.device = device
        # float32 copies for the step (plain float32 elementwise ops, or the fused C step): p, m, s of the
        # block, b₁, b₂, and cr = w₁, ci = −w₂ (so y = Σ cr x₁ − ci x₂, for a complex slot Re(2c x)). The
        # block's p, m, s are rounded so that its eigenvalues' moduli stay below 1 (`float32_stable`):
        # rounded to nearest, slow modes (|μ| = 1 − 1e-9: Re Λ·Δ = −1e-9) came out at |μ| ≥ 1 in float32
        # for 10-45 % of them, a served recurrence whose state grows without bound
        f32 = {"device": device, "dtype": torch.float32}
        (mur, mui), (mus, _) = float32_stable(lam1), float32_stable(lam2)  # (complex slot: λ₂ = λ₁)
        self.mur, self.mui, self.mus = (t.to(device).contiguous() for t in (mur, mui, mus))
        self.br, self.bi = (t.to(**f32).contiguous() for t in (bb[:, 0], bb[:, 1]))
        self.cr, self.ci = ww[:, 0].to(**f32).contiguous(), (-ww[:, 1]).to(**f32).contiguous()
        self._fused_params = (self.mur, self.mui, self.br, self.bi, self.cr, self.ci, self.mus)
        self._fused_ptrs = ()  # set by pad_fused_params when the model runs the fused CPU step
        self._prefill_c = None  # the C prefill's tables (fused_prefill_tables), set by pad_fused_params
        self._prefill_tables(device)

    def block_powers(self, t: torch.Tensor) -> torch.Tensor:
        """The slots' blocks to the powers t (T,) ≥ 0 in float64: (H, M, T, 2, 2) [[p, −m], [m, s]] of
        λ₁ᵗ, λ₂ᵗ (an empty slot's block is 0 beyond t = 0; every block⁰ = I)."""
        return self._block(*(self._powers(lam, t) for lam in self.lam64))

    @staticmethod
    def _block(P1: torch.Tensor, P2: torch.Tensor) -> torch.Tensor:
        """λ₁ⁿ, λ₂ⁿ (…) complex → the slots' blocks Aⁿ (…, 2, 2) [[p, −m], [m, s]]: p + i m = λ₁ⁿ,
        s = Re λ₂ⁿ."""
        return torch.stack([torch.stack([P1.real, -P1.imag], -1), torch.stack([P1.imag, P2.real], -1)], -2)

    @staticmethod
    def _powers(lam: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """λᵗ in float64 for integer-valued t (T,) ≥ 0 → (H, M, T) complex128 (0ᵗ = 0 for t > 0, λ⁰ = 1).
        A real λ (a real slot's) by a real power, so its imaginary part is exactly 0 (the complex log of a
        negative λ would leave ~t·1e-16 there)."""
        t = t.to(F64)
        # in polar form, |λ|ᵗ = exp(t log|λ|) and t·arg λ, by real exp, cos and sin (the same arithmetic as
        # exp(t log λ) in complex128, whose elementwise exp is some 4× slower on CPU)
        r = lam.abs()
        mag = torch.exp(torch.log(r.where(r != 0, torch.ones_like(r)))[..., None] * t)
        p = torch.polar(mag, lam.angle()[..., None] * t)
        real = torch.pow(lam.real[..., None], t).to(C128)  # 0⁰ = 1, 0ᵗ = 0 (λ = 0 is real)
        return torch.where((lam.imag == 0)[..., None], real, p)

    def _prefill_tables(self, device) -> None:
        """float64 → float32/complex64 tables for `prefill`, so the request path is float32 only. A slot's
        two coordinates interleave (x₁, x₂), N = 2M, so a (…, N) tensor views as (…, M) complex64 pairs
        (only a storage: a slot's arithmetic is its block's, `_apply_pow`). With Aᵗ the slots' blocks:
          in_tab  (H, T, N):  row j = A^{T−1−j} b        (block inputs → state at the block's end)
          out_tab (H, N, T):  column t = wᵀ A^{t+1}       (state at the block's start → output t)
          Kf (H, T+1) complex64 = rfft(K_0..K_{T−1}, 2T), K_t = wᵀ Aᵗ b;  conv_tab its Toeplitz matrix;
          pow_bin (P, 2, H, M) complex64 = λ₁^{2^k}, λ₂^{2^k}, k < P."""
        self.T = T = CHUNK
        H, M = self.H, self.M
        # Aᵗ = [[p, −m], [m, s]] (p + i m = λ₁ᵗ, s = Re λ₂ᵗ), (H, M, T+1) float64 each, applied elementwise
        t = torch.arange(T + 1, dtype=F64)
        P1, P2 = (self._powers(lam, t) for lam in self.lam64)
        p, m, s = P1.real, P1.imag, P2.real
        b1, b2, w1, w2 = (v[..., None] for v in (*self.b64.unbind(1), *self.w64.unbind(1)))  # (H, M, 1)
        Ab = torch.stack([p * b1 - m * b2, m * b1 + s * b2], -1)  # (H, M, T+1, 2): Aᵗ b
        wA = torch.stack([w1 * p + w2 * m, w2 * s - w1 * m], -1)  # (H, M, T+1, 2): wᵀ Aᵗ
        inp = Ab[:, :, :T].flip(2).permute(0, 2, 1, 3)  # (H, T, M, 2)
        self.in_tab = inp.reshape(H, T, 2 * M).to(device, torch.float32).contiguous()
        self.out_tab = (
            wA[:, :, 1:].permute(0, 1, 3, 2).reshape(H, 2 * M, T).to(device, torch.float32).contiguous()
        )
        K = (wA[:, :, :T] * self.b64.transpose(1, 2)[:, :, None]).sum((1, 3))  # (H, T)
        self.Kf = torch.fft.rfft(K, n=2 * T).to(device, C64)
        self.conv_tab = _toeplitz(K).to(device, torch.float32)
        e = torch.tensor([2.0**k for k in range(MU_POW_BITS)])
        pw = torch.stack([self._powers(lam, e) for lam in self.lam64])  # (2, H, M, P)
        pw = torch.complex(*float32_stable(pw))  # (|λ^{2^k}| < 1, as the step's μ)
        self.pow_bin = pw.permute(3, 0, 1, 2).to(device).contiguous()
        for name in ("in_tab", "out_tab", "Kf", "conv_tab", "pow_bin"):  # (one copy per process)
            setattr(self, name, shared_table(getattr(self, name)))

    def step(self, u: torch.Tensor, x: torch.Tensor):
        """u (B, H), x (B, H, 2, M) the slots' coordinates x₁, x₂ → y (B, H), x' (B, H, 2, M)."""
        xr, xi, u = x[..., 0, :], x[..., 1, :], u[..., None]
        nr = self.mur * xr - self.mui * xi + self.br * u
        ni = self.mus * xi + self.mui * xr + self.bi * u
        return (self.cr * nr - self.ci * ni).sum(-1), torch.stack([nr, ni], dim=-2)

    def step_fused(self, lib, u: torch.Tensor, x: torch.Tensor, xo: torch.Tensor, y: torch.Tensor) -> None:
        """`step` in one C pass (CPU): writes x' into xo and y into y."""
        fused.diag_step(lib, x, xo, u, y, self._fused_ptrs)

    def state_bound(self, u_max: torch.Tensor, rounding: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        """Largest |x₁|, |x₂| any input with |u_h| ≤ u_max[h] can drive the state to, from x = 0: a
        complex slot's |x| ≤ Σ_j |μ|^j |b| u_max = |b| u_max / (1 − |μ|), a real coordinate's
        |b_q| u_max / (1 − |λ_q|) (inf where |λ| ≥ 1 and b ≠ 0; 0 where b = 0).
        With `rounding` = (ρ, δ), the state stored after each step with |x̃'| ≤ (1 + ρ)(|μ||x̃| + |b||u|) + δ
        (STATE16_ROUNDING: a float16 state), every rounding taken at its worst and fed back through the
        recurrence: ((1 + ρ)|b| u_max + δ) / (1 − (1 + ρ)|μ|) (√2 δ for a complex slot; inf where
        (1 + ρ)|μ| ≥ 1). A state that starts within it stays within it: the bound is a fixed point.
        u_max (H,) float64 → (H, 2, M) float64."""
        rel, floor = rounding
        bmag = torch.where(self.is_cplx[:, None], self.b64.norm(dim=1, keepdim=True), self.b64.abs())
        amp = torch.stack([lam.abs() for lam in self.lam64], dim=1) * (1 + rel)  # (H, 2, M)
        reach = (1 + rel) * bmag * u_max[:, None, None] + torch.where(
            self.is_cplx[:, None], math.sqrt(2) * floor, floor
        )
        gain = torch.where(amp < 1, reach / (1 - amp).clamp(min=1e-300), torch.inf)
        return torch.where(bmag == 0, 0.0, gain)

    def _mu_pow(self, n: int) -> torch.Tensor:
        """λ₁ⁿ, λ₂ⁿ (2, H, M) complex64 for 0 ≤ n < 2^MU_POW_BITS: the product of the tabulated λ^{2^k} over
        n's set bits (float32 only; relative error ≤ popcount(n) roundings)."""
        if not 0 <= n < 2**MU_POW_BITS:
            raise ValueError(f"power {n} out of range [0, 2^{MU_POW_BITS})")
        out = torch.ones(2, self.H, self.M, dtype=C64, device=self.device)
        for k in range(MU_POW_BITS):
            if n >> k & 1:
                out = out * self.pow_bin[k]
        return out

    @staticmethod
    def _apply_pow(P: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The slots' blocks Aⁿ (P = `_mu_pow(n)`, (2, H, M), broadcast against x) applied to states x
        (…, M) complex64 pairs (x₁ + i x₂): (p x₁ − m x₂) + i (m x₁ + s x₂), p + i m = λ₁ⁿ, s = Re λ₂ⁿ."""
        P1, P2 = P[0], P[1]
        xr, xi = x.real, x.imag
        return torch.complex(P1.real * xr - P1.imag * xi, P1.imag * xr + P2.real * xi)

    def _pow_table(self, n: int) -> torch.Tensor:
        """Aⁿ as (H, 4M) float32, each slot's block row by row (p, −m, m, s): the C prefill's scan table."""
        return self._block(*self._mu_pow(n)).reshape(self.H, 4 * self.M)

    def prefill(self, u: torch.Tensor, x0: torch.Tensor, x0_is_zero: bool = False):
        """u (B, L, H) (any float dtype; the arithmetic is float32), x0 (B, H, M) complex64 pairs x₁ + i x₂
        → y (B, L, H) in u's dtype, x_L (B, H, M) complex64 pairs; parallel in L, no float64 work, memory
        O(B·H·L + H·M·CHUNK). On CPU with the C step built (`pad_fused_params`) it runs `_fused_prefill`:
        the same blocks in one C pass on the (B, L, H) layout; otherwise the torch ops below. An empty
        prompt or batch (L = 0 or B = 0) returns an empty y and x0. Raises RuntimeError if the C pass
        refuses its arguments (it does not for any shape this method passes).

        The prompt is front-padded to n blocks of T = CHUNK. Per block (all at once): y = the block's own
        inputs convolved with K_0..K_{T−1} (FFT of size 2T, kernel transform cached) + wᵀ A^{t+1} times
        the state at the block's start (one matmul); the blocks' state increments Σ_j A^{T−1−j} b u_j are
        one matmul too; only the n-step scan x ← A^T x + z is sequential (elementwise)."""
        Bsz, L, H = u.shape
        T, M = self.T, self.M
        if L == 0 or Bsz == 0:
            return u.new_empty(Bsz, L, H), x0.clone()
        if self._prefill_c is not None:
            x0r = x1r = None
            if not x0_is_zero:
                x0r = torch.view_as_real(x0).reshape(Bsz, H, 2 * M)
                x1r = torch.view_as_real(self._apply_pow(self._mu_pow(T - (-L % T)), x0)).reshape(
                    Bsz, H, 2 * M
                )
            y, xL = _fused_prefill(self, u.contiguous(), x0r, x1r)
            return y, torch.view_as_complex(xL.reshape(Bsz, H, M, 2).contiguous())
        dtype, u = u.dtype, u.float()
        U, n, p = _blocks(u, T)
        Z = torch.view_as_complex(torch.bmm(U, self.in_tab).view(H, Bsz, n, M, 2))
        S = torch.empty(H, Bsz, n + 1, M, dtype=C64, device=u.device)  # state at each block's start
        S[:, :, 0] = 0  # block 0's x0 terms are added below (block 0 is the partial one)
        x = Z[:, :, 0]
        if not x0_is_zero:
            x = x + self._apply_pow(self._mu_pow(T - p)[:, :, None], x0.transpose(0, 1))
        S[:, :, 1] = x
        AT = self._mu_pow(T)[:, :, None] if n > 1 else None
        for c in range(1, n):
            x = S[:, :, c + 1] = Z[:, :, c] + self._apply_pow(AT, x)
        Sr = torch.view_as_real(S[:, :, :n]).reshape(H, Bsz * n, 2 * M)
        Y = _block_outputs(self, U, Sr)
        if not x0_is_zero:  # block 0: wᵀ A^{t+1} x0 at the prompt's positions t < T − p
            x0r = torch.view_as_real(x0.transpose(0, 1)).reshape(H, Bsz, 2 * M)
            Y.view(H, Bsz, n, T)[:, :, 0, p:] += torch.bmm(x0r, self.out_tab[..., : T - p])
        return _unblock(Y, Bsz, L, p).to(dtype), S[:, :, n].transpose(0, 1)


class DPLRStep:
    """The exact bilinear step of A = Λ − P̃·2Re(P̃ᴴ ·) on N/2 complex modes, O(N·r) per channel:
    (I − Δ/2·A) x' = (I + Δ/2·A) x + Δ B̃ u, solved by Woodbury (an r×r real system).

    Prefill uses the same system in real coordinates ξ = [Re x; Im x] (Ā, B̄, γ̄ from
    `s4_real_system`), in chunks of T steps: tabulated Ā^t B̄ and (Āᵀ)^{t+1} γ̄ for t < T carry the
    inputs into the state and the state into the outputs; only L/T chunk steps are sequential."""

    form = "dplr"

    def __init__(self, s: dict[str, torch.Tensor], Abar, Bbar, gamma, device):
        Lam, P, B, dt = s["Lambda"], s["P"], s["B"], s["dt"]  # complex128 / float64
        H, N2 = Lam.shape
        h = (dt[:, None] / 2).to(C128)
        Dinv = 1 / (1 - h * Lam)  # (H, N2)
        G = torch.einsum("ihn,hn,jhn->hij", P.conj(), Dinv, P).real  # Re(P̃ᴴ D⁻¹ P̃) (H, r, r)
        Minv = torch.linalg.inv(torch.eye(P.shape[0], dtype=F64) + dt[:, None, None] * G)
        to = dict(device=device)
        self.Minv = Minv.to(**to, dtype=torch.float32).contiguous()  # inv() of a batch is column-major
        dtB = (dt[:, None] * B).to(**to, dtype=C64)
        self.c2 = torch.complex(gamma[:, :N2], -gamma[:, N2:]).to(**to, dtype=C64)  # 2 C̄
        # real-pair step: x' = (I − hA)⁻¹(2x + ΔB u) − x, with (I − hA)⁻¹f = D⁻¹f − Q s,
        # s = M⁻¹ 2Re(P̃ᴴ D⁻¹ f), Q = h D⁻¹ P̃
        Q = (h * Dinv)[None] * P  # (r, H, N2)
        f32 = dict(device=device, dtype=torch.float32)
        self.dBr, self.dBi = dtB.real.contiguous(), dtB.imag.contiguous()
        self.Dr, self.Di = Dinv.real.to(**f32).contiguous(), Dinv.imag.to(**f32).contiguous()
        self.Pr, self.Pi = (2 * P.real).to(**f32).contiguous(), (2 * P.imag).to(**f32).contiguous()
        self.Qr, self.Qi = Q.real.to(**f32).contiguous(), Q.imag.to(**f32).contiguous()
        self.cr, self.ci = self.c2.real.contiguous(), self.c2.imag.contiguous()
        self._fused_params = (self.dBr, self.dBi, self.Dr, self.Di, self.Pr, self.Pi, self.Minv, self.Qr,
                              self.Qi, self.cr, self.ci)  # fmt: skip
        # raw pointers for the fused step (pad_fused_params); the tensors stay alive in this object
        self._fused_ptrs = ()
        self._prefill_c = None  # the C prefill's tables (fused_prefill_tables), set by pad_fused_params
        self.H, self.M, self.device = H, N2, device
        # real-coordinate tables for the blocked prefill (float64 → float32: the request path is float32)
        self.Abar64, self.Bbar64 = Abar, Bbar  # for the state bound
        self.T = CHUNK  # a power of 2: Ā^T is the last of the Ā^{2^k} below
        kry, obs, v, g = [], [], Bbar, gamma
        for _ in range(self.T):
            kry.append(v)
            g = (Abar.transpose(-1, -2) @ g[..., None])[..., 0]
            obs.append(g)
            v = (Abar @ v[..., None])[..., 0]
        kry64 = torch.stack(kry, dim=1)  # (H, T, N): Ā^t B̄
        f32 = dict(device=device, dtype=torch.float32)
        self.in_tab = kry64.flip(1).to(**f32).contiguous()  # row j: Ā^{T−1−j} B̄
        self.out_tab = torch.stack(obs, 2).to(**f32).contiguous()  # (H, N, T), column t: (Āᵀ)^{t+1} γ̄
        K = torch.einsum("htn,hn->ht", kry64, gamma)
        self.Kf = torch.fft.rfft(K, n=2 * self.T).to(device, C64)
        self.conv_tab = _toeplitz(K).to(**f32)
        # (Ā^{2^k})ᵀ for 2^k ≤ T: Ā^r ξ for any r ≤ T by r's bits
        pows, A = [], Abar
        for _ in range(self.T.bit_length()):
            pows.append(A.transpose(-1, -2).to(**f32).contiguous())
            A = A @ A
        self.A_bin_t = [shared_table(t) for t in pows]
        for name in ("in_tab", "out_tab", "Kf", "conv_tab"):  # (one copy per process: `shared_table`)
            setattr(self, name, shared_table(getattr(self, name)))

    def step(self, u: torch.Tensor, x: torch.Tensor):
        """u (B, H), x (B, H, 2, N2) real/imaginary parts → y (B, H), x'."""
        xr, xi, u = x[..., 0, :], x[..., 1, :], u[..., None]
        fr, fi = 2 * xr + self.dBr * u, 2 * xi + self.dBi * u
        gr, gi = self.Dr * fr - self.Di * fi, self.Dr * fi + self.Di * fr
        nr, ni = gr - xr, gi - xi
        s = (self.Pr * gr[:, None] + self.Pi * gi[:, None]).sum(-1)  # (B, r, H): 2Re(P̃ᴴ D⁻¹ f)
        s = torch.einsum("hij,bjh->bih", self.Minv, s)[..., None]
        nr = nr - (self.Qr * s).sum(1)
        ni = ni - (self.Qi * s).sum(1)
        return (self.cr * nr - self.ci * ni).sum(-1), torch.stack([nr, ni], dim=-2)

    def state_bound(self, u_max: torch.Tensor, rounding: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
        """Largest |Re x|, |Im x| any input with |u_h| ≤ u_max[h] can drive the state to, from ξ = 0:
        with Ā = W diag(λ) W⁻¹, ξ_n = Σ_j Σ_m W_nm λ_m^j (W⁻¹B̄)_m u ⇒
        |ξ_n| ≤ u_max Σ_m |W_nm| |(W⁻¹B̄)_m| / (1 − |λ_m|) (triangle inequality; inf if some |λ_m| ≥ 1).
        A `rounding` other than (0, 0) (a state rounded after every step, `DiagonalSSM.state_bound`) gives
        inf wherever the bound is not 0: W couples the coordinates' roundings, and no bound is derived.
        u_max (H,) float64 → (H, 2, N/2) float64."""
        lam, W = torch.linalg.eig(self.Abar64)  # (H, N), (H, N, N)
        bt = linalg.solve(W, self.Bbar64.to(C128)[..., None])[..., 0].abs()  # (H, N)
        amp = lam.abs()
        gain = torch.where(amp < 1, bt / (1 - amp).clamp(min=1e-300), torch.inf)
        gain = torch.where(bt == 0, 0.0, gain)
        terms = torch.where(W.abs() == 0, 0.0, W.abs() * gain[:, None, :])  # (H, N, N), no 0·inf
        bound = terms.sum(-1)
        bound = torch.where(bound == 0, 0.0, bound * u_max[:, None])  # (H, N)
        if rounding != (0.0, 0.0):
            bound = torch.where(bound == 0, 0.0, torch.inf)
        return bound.unflatten(-1, (2, self.M))

    def step_fused(self, lib, u: torch.Tensor, x: torch.Tensor, xo: torch.Tensor, y: torch.Tensor) -> None:
        fused.dplr_step(lib, x, xo, u, y, self._fused_ptrs, self.Pr.shape[0])

    def _advance(self, xi: torch.Tensor, r: int) -> torch.Tensor:
        """Ā^r ξ for ξ (H, B, N) float32 and 0 ≤ r ≤ T, by the tabulated Ā^{2^k} (float32)."""
        for k, At in enumerate(self.A_bin_t):
            if r >> k & 1:
                xi = torch.bmm(xi, At)
        return xi

    def prefill(self, u: torch.Tensor, x0: torch.Tensor, x0_is_zero: bool = False):
        """u (B, L, H) (any float dtype; float32 arithmetic), x0 (B, H, N/2) complex64 → y (B, L, H) in u's
        dtype, x_L (B, H, N/2) complex64; as `DiagonalSSM.prefill` (the C pass included) in the real
        coordinates ξ = [Re x; Im x]: blocks of T, the scan ξ ← Ā^T ξ + z (one batched matvec per block)."""
        Bsz, L, H = u.shape
        T, N = self.T, 2 * self.M
        if L == 0 or Bsz == 0:
            return u.new_empty(Bsz, L, H), x0.clone()
        x0r = None if x0_is_zero else torch.cat([x0.real, x0.imag], dim=-1).transpose(0, 1)  # (H, B, N)
        if self._prefill_c is not None:
            x1r = None if x0r is None else self._advance(x0r.contiguous(), T - (-L % T)).transpose(0, 1)
            y, xi = _fused_prefill(self, u.contiguous(), None if x0r is None else x0r.transpose(0, 1), x1r)
            return y, torch.complex(xi[..., : self.M], xi[..., self.M :])
        dtype, u = u.dtype, u.float()
        U, n, p = _blocks(u, T)
        Z = torch.bmm(U, self.in_tab).view(H, Bsz, n, N)
        S = torch.empty(H, Bsz, n + 1, N, device=u.device)
        S[:, :, 0] = 0
        x = Z[:, :, 0]
        if x0r is not None:
            x = x + self._advance(x0r, T - p)
        S[:, :, 1] = x
        AT = self.A_bin_t[-1] if n > 1 else None  # (Ā^T)ᵀ, T = 2^k
        for c in range(1, n):
            x = torch.baddbmm(Z[:, :, c], x, AT, out=S[:, :, c + 1])
        Y = _block_outputs(self, U, S[:, :, :n].reshape(H, Bsz * n, N))
        if x0r is not None:
            Y.view(H, Bsz, n, T)[:, :, 0, p:] += torch.bmm(x0r, self.out_tab[..., : T - p])
        xi = S[:, :, n].transpose(0, 1)
        return _unblock(Y, Bsz, L, p).to(dtype), torch.complex(xi[..., : self.M], xi[..., self.M :])


def impulse_response(form, L: int) -> torch.Tensor:
    """Run the float32 step on a unit impulse for L steps → the recurrent kernel (H, L).

    On the CPU, denormal floats are flushed to zero while it runs (`torch.set_flush_denormal`, this
    thread; off again after): with no input after the first step the state decays through them (|λ|^t
    below 1.2e-38), where x86 arithmetic is several times slower (one S4-LegS layer of the official
    WikiText-103 recipe, H 1,024 over 8,192 steps: 9.1 s, 1.3 s flushed); the response changes by some
    1e-35 of the kernel's scale, which the verification compares to 1e-4."""
    H, dev = form.H, form.cr.device
    x = torch.zeros(1, H, 2, form.M, device=dev)
    u = torch.ones(1, H, device=dev)
    out = []
    flushed = dev.type == "cpu" and torch.set_flush_denormal(True)
    try:
        for _ in range(L):
            y, x = form.step(u, x)
            out.append(y[0])
            u = torch.zeros_like(u)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    return torch.stack(out, dim=1)


def convert_kernel(kernel: SSMKernel, device, tol: float, verify_len: int | None = None,
                   cache: FormCache | None = None):  # fmt: skip
    """Convert one trained SSMKernel to a verified step form; returns (form, report, K): report
    {"form", "rel_err", "modes", "cached"}, K (H, min(kernel.L, VERIFY_TOKENS)) float64 the conv kernel's
    first taps (the network check's reference; the form was verified against the whole kernel over its
    first `verify_len` taps, default kernel.L). With `cache`, a layer converted before with the same SSM
    parameters and settings is read from it (`model.form_cache`: its form rebuilt from the stored modes,
    the check's result and K as stored), and a new conversion is written to it. Raises VerificationError
    when no form passes (non-finite parameters, or every form's error above `tol`), never another error."""
    L = min(verify_len, kernel.L) if verify_len else kernel.L  # (a layer has kernel.L taps)
    s = {k: v.detach().cpu() for k, v in kernel.ssm(F64).items()}
    bad = [k for k, v in s.items() if not bool(v.isfinite().all())]
    if bad:
        raise VerificationError(f"non-finite SSM parameters: {', '.join(bad)}")
    taps = min(kernel.L, VERIFY_TOKENS)
    key = None
    if cache is not None:
        from model.form_cache import layer_key  # noqa: PLC0415

        key = layer_key(kernel, s, device, tol, L)
        made = cache.read(key, functools.partial(_cached_form, kernel, s, device, taps, tol, L))
        if made is not None:
            return made
    with torch.no_grad():
        K_full = kernel(kernel.L, dtype=F64, backend="torch").detach().cpu()  # float64 reference
        K_conv = K_full[:, :L]
        if not bool(K_conv.isfinite().all()):
            raise VerificationError(f"the float64 conv kernel over L={L} is not finite")
        if kernel.kind == "s4":
            real = functools.cache(lambda: s4_real_system(s, kernel.L))
            tries = [("diagonal", lambda: diagonalize(*real())), ("dplr", real)]
        else:
            mu, Bbar = s4d_modes(s, kernel.disc)
            tries = [("diagonal", lambda: (mu, Bbar, s["C"]))]
        errors = []
        for name, system in tries:
            try:  # e.g. eigenvectors too ill-conditioned to solve with: the next form
                args = system()
                form = _make_form(name, s, args, device)
            except (RuntimeError, ValueError) as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            err = _rel_err(impulse_response(form, L).cpu(), K_conv)
            errors.append(f"{name}: {err:.2e}")
            if err <= tol:
                K = K_full[:, :taps].clone()  # (not a view: the whole kernel is freed)
                report = {"form": form.form, "rel_err": err, "modes": form.M}
                if cache is not None:
                    # (safetensors has no complex128: the modes as float64 (H, M, 2) real pairs)
                    modes = zip(("mu", "b", "c"), args, strict=True)
                    stored = {k: torch.view_as_real(v) for k, v in modes} if name == "diagonal" else {}
                    cache.write(key, name, report, {"K": K, **stored})
                return form, {**report, "cached": False}, K
    raise VerificationError(
        f"recurrent form does not reproduce the conv kernel within rel. err {tol:g} over L={L} "
        f"({', '.join(errors)})"
    )


def s4d_modes(s: dict[str, torch.Tensor], disc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An S4D layer's discretized modes μ, B̄ (H, N/2) complex128 from its `ssm(float64)` (Δ tied or
    untied)."""
    Lam, dt = s["Lambda"], s["dt"] if s["dt"].dim() == 2 else s["dt"][:, None]  # Δ untied: (H, N2)
    return discretize(Lam * dt, s["B"] * dt, disc)


def dense_taps(kernel: SSMKernel, s: dict[str, torch.Tensor], n: int, real: tuple | None = None):
    """A layer's kernel K_0 … K_{n−1} (H, n) float64 by brute force from its parameters `s` (its
    `ssm(float64)`), without the Cauchy kernel: S4, γ̄ᵀ Āᵗ B̄ by dense matrix products of its real
    system (`s4_real_system`, or `real` when already made); S4D, 2 Re Σ C B̄ μᵗ. Within 4e-14 of the
    Cauchy kernel's taps in float64 (S4 legs, legt, fout; S4D lin, inv).

    The S4 taps by blocks of b = 2^⌈log₂√n⌉: V = [B̄, ĀB̄, …, Ā^{b−1}B̄] by doubling (V ← [V, Ā^k V],
    Ā^{2k} = (Ā^k)², in batched matmuls), the rows γ̄ᵀ Ā^{bq} for q < ⌈n/b⌉ by vector-matrix products
    with Ā^b, and K_{bq+r} = (γ̄ᵀ Ā^{bq}) (Ā^r B̄): about 2√n passes over the (H, N, N) matrices instead
    of n matrix-vector products (a layer of the WikiText-103 recipe, H 1,024, N 64, 256 taps: 0.26 s →
    0.05–0.09 s)."""
    if kernel.kind == "s4":
        Abar, Bbar, gamma = real if real is not None else s4_real_system(s, kernel.L)
        V, P = Bbar[..., None], Abar  # (H, N, k): Āʲ B̄ for j < k; P = Ā^k
        while V.shape[-1] ** 2 < n:
            V, P = torch.cat([V, P @ V], -1), P @ P
        rows = [gamma]  # γ̄ᵀ Ā^{bq}
        while len(rows) * V.shape[-1] < n:
            rows.append((rows[-1][:, None, :] @ P)[:, 0])
        return (torch.stack(rows, 1) @ V).flatten(1)[:, :n]
    mu, Bbar = s4d_modes(s, kernel.disc)
    return 2 * ((s["C"] * Bbar)[..., None] * mu[..., None] ** torch.arange(n, dtype=F64)).sum(1).real


# A cache entry's kernel taps against `dense_taps` of the live weights (relative). The two are independent
# float64 computations, and the Cauchy kernel loses digits as Δ → 0: 1e-14 at the default Δ ≥ 1e-3, but
# 3e-10 (fout) at Δ ∈ [1e-5, 1e-4] and 1.6e-8 at Δ ∈ [1e-6, 1e-5] (fout; legs, legt 8e-11). 1e-9 made such a
# model miss at every start. 1e-6 still refuses any entry not converted from these weights (those are
# O(1) off) and is 100× below the conversion's own tolerance (1e-4), against which the network check then
# runs with these taps.
CACHED_TAPS_TOL = 1e-6


def _real(x) -> bool:
    """Whether `x` (a value read from JSON) is a finite real number (not a bool)."""
    return type(x) in (int, float) and math.isfinite(x)


def _make_form(name: str, s: dict[str, torch.Tensor], args: tuple, device):
    """A step form from its float64 system: "diagonal" (μ, b, c) or "dplr" (Ā, B̄, γ̄ of `s4_real_system`)."""
    return DiagonalSSM(*args, device) if name == "diagonal" else DPLRStep(s, *args, device)


def _cached_form(kernel: SSMKernel, s: dict[str, torch.Tensor], device, taps: int, tol: float, L: int,
                 name: str, report: dict, tensors: dict[str, torch.Tensor]):  # fmt: skip
    """(form, report, K) from a cache entry, checked against the layer: its shapes, its kernel taps (the
    network check's reference) against `dense_taps` of the live parameters, within CACHED_TAPS_TOL, and
    for a diagonal form, made from the stored modes, the impulse response of its float32 step against
    those taps over the first min(taps, L) steps, within the conversion's `tol` (stored modes moved by
    1e-4 rad in phase made a layer 6e-4 to 1.6e-3 off, which the network check's 256 tokens passed).
    Raises ValueError or KeyError for an entry that does not fit, RuntimeError from the float64 system."""
    H = s["Lambda"].shape[0]
    K = tensors["K"]
    if K.dtype != F64 or tuple(K.shape) != (H, taps) or not bool(K.isfinite().all()):
        raise ValueError(f"its kernel taps are {K.dtype}{list(K.shape)}, the layer needs "
                         f"float64[{H}, {taps}]")  # fmt: skip
    real = s4_real_system(s, kernel.L) if kernel.kind == "s4" else None
    if not (err := _rel_err(K, dense_taps(kernel, s, taps, real))) <= CACHED_TAPS_TOL:
        raise ValueError(f"its kernel taps are {err:.1e} (relative) from the layer's own, by dense powers of "
                         f"its state matrix (allowed {CACHED_TAPS_TOL:g})")  # fmt: skip
    if name == "diagonal":
        pairs = [tensors[k] for k in ("mu", "b", "c")]
        shapes = {(a.dtype, tuple(a.shape)) for a in pairs}
        a = pairs[0]
        if len(shapes) != 1 or a.dtype != F64 or a.dim() != 3 or a.shape[0] != H or a.shape[2] != 2:
            raise ValueError(f"its modes are {sorted(map(str, shapes))}, not float64 ({H}, M, 2) each")
        args = tuple(torch.view_as_complex(a) for a in pairs)
        if not all(bool(a.isfinite().all()) for a in args):
            raise ValueError("its modes are not finite")
    elif name == "dplr" and kernel.kind == "s4":
        args = real
    else:
        raise ValueError(f"form {name!r} is not one a {kernel.kind} layer converts to")
    form = _make_form(name, s, args, device)
    if form.form != report.get("form"):
        raise ValueError(f"its report names form {report.get('form')!r}, the entry {name!r}")
    # (the report is metadata, not under the checksum: only what `convert_kernel` writes, checked, is used;
    # one without rel_err failed the server's load, one with a "layer" renamed that layer)
    rel, modes = report.get("rel_err"), report.get("modes")
    if set(report) != {"form", "rel_err", "modes"} or not _real(rel) or not 0 <= rel <= tol:
        raise ValueError(f"its report is not the converter's (form, modes and a rel_err within {tol:g})")
    if type(modes) is not int or modes != form.M:
        raise ValueError(f"its report gives {str(modes)[:20]!r} modes, its form has {form.M}")
    n = min(taps, L)  # (a DPLR form is made from the live parameters by the code verified: not checked)
    if name == "diagonal" and not (err := _rel_err(impulse_response(form, n).cpu(), K[:, :n])) <= tol:
        raise ValueError(f"the impulse response of its form is {err:.1e} (relative) from its taps over {n} "
                         f"steps (allowed {tol:g})")  # fmt: skip
    return form, {**report, "cached": True}, K


# ---------------------------------------------------------------------------------------------


def check_step_inputs(
    tokens: torch.Tensor, ndim: int, state: torch.Tensor, want: tuple[int, ...], device_type: str
) -> None:
    """The recurrent forms' input contract (RecurrentModel, SaShiMiRecurrent): `ndim`-dimensional tokens
    (integer ids as `check_token_dtype` returns them), a state of shape `want` in one of `STATE_DTYPES`
    (float32; float16, a state stored at 16 bits: `GraphedModel.use_state_dtype`), both on the model's
    device type. Raises ValueError naming what is wrong (the ids' range is checked where they are
    embedded; a bfloat16 state is refused saying why)."""
    if tokens.dim() != ndim:
        raise ValueError(f"tokens must have {ndim} dims, got shape {tuple(tokens.shape)}")
    if not isinstance(state, torch.Tensor):
        raise ValueError(f"state must be a float32 tensor, got {type(state).__name__}")
    if tuple(state.shape) != want or state.dtype not in STATE_DTYPES:
        why = f" ({BFLOAT16_STATE})" if state.dtype == torch.bfloat16 else ""
        raise ValueError(f"state has shape {tuple(state.shape)} {state.dtype}, expected {want} float32 (or "
                         f"float16){why}")  # fmt: skip
    if tokens.device.type != device_type or state.device.type != device_type:
        raise ValueError(f"tokens ({tokens.device}) and state ({state.device}) must be on the model's "
                         f"device ({device_type})")  # fmt: skip


def check_block_tokens(tokens: torch.Tensor) -> None:
    """A decode block's pending tokens: an int64 tensor of ids, which the block updates in place to each
    row's last token (`RecurrentModel.decode_block`). Another integer dtype was converted to an int64 copy,
    which the block updated instead: the caller's tokens came back unchanged, and its next block fed every
    row its old pending token again. Raises ValueError otherwise (`check_token_dtype`'s for a float, bool
    or non-tensor)."""
    check_token_dtype(tokens)
    if tokens.dtype != torch.int64:
        raise ValueError(f"decode_block updates tokens in place: they must be int64, got {tokens.dtype}")


def check_native_block_state(state: torch.Tensor) -> None:
    """The C decode block's state must be float32 (it steps it in place in C); ValueError otherwise."""
    if state.dtype != torch.float32:
        raise ValueError(f"the native decode block steps float32 states, got {state.dtype}: a float16 state "
                         "steps through `step` or the CUDA graphs' decode blocks")  # fmt: skip


def form_device(net: torch.nn.Module, device, tol: float, logits_tol: float | None,
                verify_len: int | None = None) -> torch.device:  # fmt: skip
    """A recurrent form's arguments checked before any work (RecurrentModel, SaShiMiRecurrent): the device
    (`usable_device`; None: the weights' own), its tolerances, each a finite relative error > 0 (a NaN
    or negative `tol` failed every layer's verification, read as a model that does not convert; True was
    taken as 1.0), and `verify_len`, None or an integer in [1, l_max] (-5, 3.5, l_max + 1 failed deep in
    the check; 10**9 ran a Python loop of as many steps). Raises ValueError naming the argument."""
    for name, value in (("tol", tol), ("logits_tol", logits_tol)):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value < float("inf")
        if value is not None and not ok:
            raise ValueError(f"{name} must be a finite relative error > 0, got {value!r}")
    l_max = net.config.l_max
    if verify_len is not None and not (type(verify_len) is int and 1 <= verify_len <= l_max):
        raise ValueError(f"verify_len must be null or an integer in [1, l_max = {l_max}], got {verify_len!r}")
    return usable_device(device) if device is not None else next(net.parameters()).device


def named_dtype(dtype):
    """`dtype` with a name ("bfloat16", "torch.float16") read as the torch.dtype it names; anything else
    (a torch.dtype, None, an unknown name) as it is, for the caller's own check to name."""
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        return named if isinstance(named, torch.dtype) else dtype
    return dtype


def served_dtype(net: torch.nn.Module, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a recurrent form serves `net`'s weights in: `dtype`, or the weights' own (one for all of
    them); ValueError for weights of mixed dtypes or a dtype without a verification tolerance
    (`LOGITS_TOL`: float64, float32, bfloat16, float16). `dtype` may be named ("bfloat16")."""
    dtypes = {p.dtype for p in net.parameters()}
    if len(dtypes) != 1:
        raise ValueError(f"the weights must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = named_dtype(dtype) or dtypes.pop()
    if dtype not in LOGITS_TOL:
        names = ", ".join(str(d).removeprefix("torch.") for d in LOGITS_TOL)
        raise ValueError(f"weights dtype must be one of {names}, got {dtype}")
    return dtype


BASIS_STEPS = 1 << 20  # of the largest entry: how finely `state_basis` reads a diagonal form's modes


def state_basis(layers: list) -> str:
    """A digest (16 hex digits of SHA-256) of what the coordinates of a state stepped by `layers` mean:
    each layer's form ("diagonal", "dplr": which one passed the conversion's tolerance,
    S4_VERIFY_TOLERANCE), and a diagonal form's slot eigenvalues and input vector (`lam64`, `b64`), each
    read to 2^-20 of its largest entry. An S4 layer's diagonal form comes from an eigendecomposition,
    whose eigenvector order and phase are LAPACK's choice: a torch or LAPACK build other than the one
    that made a state may put its modes in another order or phase, a state of the same shape that it
    would read in another basis. A DPLR form's coordinates are the official parameters' (no
    decomposition): its name alone. The same checkpoint converted alike (every dtype twin: the
    conversion is float64 whatever the weights' dtype) has one basis."""
    h = hashlib.sha256()
    for form in layers:
        h.update(form.form.encode() + b"|")
        if form.form != "diagonal":
            continue
        for t in (*form.lam64, form.b64):
            x = (torch.view_as_real(t) if t.is_complex() else t).detach().cpu().double()
            top = float(x.abs().max()) if x.numel() else 0.0
            q = torch.round(x / (top or 1.0) * BASIS_STEPS).to(torch.int64)
            h.update(repr(tuple(q.shape)).encode() + q.numpy().tobytes())
    return h.hexdigest()[:16]


class RecurrentModel(GraphedModel):
    """Frozen recurrent form of a SequenceModel: init_state, parallel prefill, batched step.

    State: float32 tensor (n_layers, B, H, 2, M), the two real coordinates of M slots per channel
    (a complex mode's real and imaginary parts, or two real modes: `real_block_slots`); constant size
    whatever the context length. `step` and `prefill` return a new state and leave the one passed in
    untouched, unless `step(..., out=state)` asks for an in-place update. Logits are float32 whatever the
    weights' dtype. `step` and `prefill` also take a state stored in float16 (half the bytes; each step
    computes in float32 from its widening and rounds the next state): `use_state_dtype` checks it against
    the float32 step and makes it the decode batch's (the CUDA graphs' buffers, the server's).

    Args: `tol` the per-layer kernel tolerance (relative error of the float32 step's impulse response
    against the float64 kernel over `verify_len`, default the trained length); `dtype` the weights'
    dtype to serve in (default: the net's own, which must be one dtype of `LOGITS_TOL`): the net's
    weights are cast to it *after* the float64 conversion; `logits_tol` the network check's tolerance
    (default `LOGITS_TOL[dtype]`); `fused_step`/`fused_network` allow the C step on CPU (not for
    float64 weights for the whole-network one); `triton_step` steps the diagonal layers with the Triton
    kernel (`model/triton_step.py`) where the C step does not run: None (default) on a CUDA device when
    `S4_TRITON_STEP` is on and the kernel runs there (`triton_step.wanted`: triton installed, one launch
    probed), True also on CPU under Triton's interpreter (tests); a model without a diagonal layer has
    nothing for it and keeps the torch step (`triton_step_active` says which); `cache` a
    `model.form_cache.FormCache` the layers' verified forms are read from and written to (None: none).
    After conversion `report` holds one dict per layer (form, rel_err, modes, cached: whether it came from
    `cache`) and `verification` the network check, run whatever the cache held: dtype, tokens,
    step_rel_err, prefill_rel_err, tol.

    Raises VerificationError when a layer or the network fails its check (the message names the layer
    or the dtype and the errors), ValueError for weights of mixed or unsupported dtypes.
    """

    batch_dim = 1  # the batch's dim in a state (the server's slot pool indexes rows there)

    def __init__(
        self,
        net,
        tol: float = 1e-4,
        verify_len: int | None = None,
        device=None,
        fused_step=True,
        fused_network=True,
        dtype: torch.dtype | None = None,
        logits_tol: float | None = None,
        triton_step: bool | None = None,
        cache: FormCache | None = None,
    ):
        device = form_device(net, device, tol, logits_tol, verify_len)
        self.dtype = dtype = served_dtype(net, dtype)
        self.net = copy.deepcopy(net).to(device).eval().requires_grad_(False)
        self.config = net.config
        self.device = device
        self._device_type = torch.device(device).type  # (checked per call: a cached string)
        self.layers, self.report, kernels64 = [], [], []
        for i, kernel in enumerate(self.net.kernels()):
            try:
                form, rep, K = convert_kernel(kernel, device, tol, verify_len, cache)
            except VerificationError as exc:
                raise VerificationError(f"layer {i}: {exc}") from None
            self.layers.append(form)
            self.report.append({"layer": i, **rep})
            kernels64.append(K)
        self.net.to(dtype)  # after the float64 conversion; the SSM forms stay float32
        # The torch ops (the parallel prefill; batches beyond the C step) compute in compute_dtype: the
        # weights' own where the device multiplies it natively, else float32 on a copy of the weights
        # widened exactly (a CPU without AVX512-BF16 / AVX512-FP16 / AMX runs oneDNN's 16-bit matmuls
        # ~60x slower than sgemm: a bfloat16 prefill of 2,048 tokens took 5.7x float32's on such a CPU)
        self.compute_dtype = dtype if native_matmul(dtype, device) else torch.float32
        self._net_ops = self.net if self.compute_dtype == dtype else copy.deepcopy(self.net).float()
        self.M = max(f.M for f in self.layers)
        self.H = self.config.d_model
        # On CPU, one fused C pass per layer (model/fused.py) when it builds and the C step's limits
        # allow (a DPLR layer: at most MAX_MODES modes, the padded state's, and rank MAX_RANK).
        lib = fused.library() if (fused_step and device.type == "cpu") else None
        dplr = [f for f in self.layers if f.form == "dplr"]
        if dplr and (self.M > fused.MAX_MODES or max(f.Pr.shape[0] for f in dplr) > fused.MAX_RANK):
            lib = None
        if lib is not None:  # layers with fewer modes than the state run the fused step zero-padded
            for form in self.layers:
                pad_fused_params(form, self.M)
        self._fused = lib
        # Small batches: the whole network's step in one C call (model/fused.py: NetStep), for float32,
        # bfloat16 and float16 weights (computing in float32); larger batches (and float64 weights) run
        # the torch ops around the fused SSM steps.
        # A model with an adaptive input and softmax (the official WikiText-103 recipe's) computes them
        # there too (ssm_step.c struct Adaptive): each row's log-probabilities alone, so they are batch
        # invariant, and the native decode block samples from them.
        self._net_step = None
        if self._fused is not None and fused_network and dtype in fused.WEIGHT_FORMATS:
            try:
                self._net_step = fused.NetStep(self._fused, self.net, self.layers)
            except ValueError:  # something the C step does not compute (it names it): keep the torch ops
                pass
        # the diagonal layers' step as one Triton kernel each (the torch step's path: CUDA, or tests)
        diagonal = any(f.form == "diagonal" for f in self.layers)
        self._triton = triton_kernel.resolve(triton_step, device) and diagonal
        self._state_bound: torch.Tensor | None = None
        self._state16_bound: torch.Tensor | None = None
        self._state_limit: torch.Tensor | None = None
        self._graphs = None  # model.cuda_graphs.BucketedStep, set by use_cuda_graphs
        self._compiled_step = None  # torch.compile of _step_torch, set by compile_step
        # Every batch steps in C (fused.NetStep), which computes each row alone: a row's logits are then the
        # same bits whatever else is batched with it. The torch ops around the fused SSM steps (sgemm) agree
        # only to float32 rounding (5e-5 of the text model's logits at 300 rows), and a 16-bit model's
        # round every activation to 16 bits where the CPU multiplies them natively (1.9e-3). Until
        # 2026-12-04 float32 batches over 256 rows took them (bench.big_batch: the decode block is
        # 1.4-1.5x their step + sampling there, their step alone 1.1x the C step). Setting this lower
        # (tests, benchmarks) sends larger batches to the torch ops.
        self.net_step_max_batch = sys.maxsize
        self.prefill_by_steps_max_tokens = PREFILL_BY_STEPS_MAX_TOKENS
        self.prefill_threads = PREFILL_THREADS  # None or 0: the calling thread's torch setting
        tol_net = LOGITS_TOL[dtype] if logits_tol is None else logits_tol
        self.verification = self._verify_network(net, kernels64, tol_net)

    def _verify_network(self, net, kernels64: list[torch.Tensor], tol: float) -> dict:
        """Step and prefill 2 probe sequences of T tokens (fixed seed) at the serving dtype and device, and
        compare their logits with the conv mode of `net` in float64 (the float64 kernels K, on CPU):
          prefilled: the parallel prefill of the first T/2 tokens from the zero state, then of the rest from
            the state it left;
          stepped: the first T/2 tokens stepped from the zero state, and, in the same batch of 4 rows, the
            rest stepped from the state that first prefill left (a prompt's prefill handing over to
            decoding, as the server runs them). T/2 sequential steps: a network whose step is bound by
            reading its weights (the WikiText-103 recipe's, 60 ms at batch 2 or 4) checks in half the time
            of stepping all T from zero, which its layers' own checks over their trained length L cover."""
        T = min(VERIFY_TOKENS, self.config.l_max)  # l_max is even: two halves
        h = T // 2
        tokens = torch.randint(0, self.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
        ref_net = copy.deepcopy(net).to("cpu", F64).eval()
        with torch.no_grad():  # a layer's kernel shorter than T (its own l_kernel): K̄ at length T
            Ks = [K[:, :T] if K.shape[1] >= T else k(T, dtype=F64, backend="torch")
                  for K, k in zip(kernels64, ref_net.kernels(), strict=True)]  # fmt: skip
            convs = [lambda u, K=K: fft_conv(u.transpose(1, 2), K).transpose(1, 2) for K in Ks]
            ref = ref_net(tokens, ssms=convs)
        del ref_net
        tok = tokens.to(self.device)
        by_steps, self.prefill_by_steps_max_tokens = self.prefill_by_steps_max_tokens, 0
        try:  # the parallel prefill from a zero state, then from the state it left
            first, mid = self.prefill(tok[:, :h], self.init_state(2))
            second, _ = self.prefill(tok[:, h:], mid)
        finally:
            self.prefill_by_steps_max_tokens = by_steps
        state = torch.cat([self.init_state(2), mid], dim=self.batch_dim)  # rows 0, 1 from zero; 2, 3 from mid
        rows, out = torch.cat([tok[:, :h], tok[:, h:]]), []
        for t in range(h):
            logits, state = self.step(rows[:, t], state)
            out.append(logits)
        both = torch.stack(out, 1)  # (4, T/2, V)
        stepped = torch.cat([both[:2], both[2:]], 1)
        name = str(self.dtype).removeprefix("torch.")
        prefilled = torch.cat([first, second], 1)
        return logits_report(f"the recurrent network in {name}", name, stepped, prefilled, ref, tol)

    @property
    def state_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's state (`state_shape`, float32), whatever its context length."""
        return len(self.layers) * self.H * self.M * 2 * 4

    @property
    def state_shape(self) -> tuple[int, ...]:
        """One sequence's state: (n_layers, H, 2, M) float32 (the batch adds dim `batch_dim` = 1)."""
        return (len(self.layers), self.H, 2, self.M)

    @functools.cached_property
    def basis(self) -> str:
        """What a state's coordinates mean, as 16 hex digits (`state_basis`): a state is read right only by
        a model whose basis is the same (the server's exports and stored sessions carry it)."""
        return state_basis(self.layers)

    def ssm_input_bound(self, i: int) -> torch.Tensor:
        """(H,) float64: max |u_h| of layer i's SSM input over all inputs: its block is pre-norm, so
        the input is a LayerNorm's output (`layernorm_output_bound`); inf where it is not one."""
        norm = getattr(self.net.blocks[i], "norm", None)
        if not isinstance(norm, torch.nn.LayerNorm):
            return torch.full((self.H,), torch.inf, dtype=F64)
        return layernorm_output_bound(norm)

    def state_bound(self) -> torch.Tensor:
        """(n_layers, H, 2, M) float64: the largest |value| each state entry can take when the model
        runs from the zero state on any tokens (per layer: the SSM input bound × the ℓ1 norm of the
        state's impulse response; padded modes are 0). Computed once, in float64, on the CPU."""
        if self._state_bound is None:
            parts = []
            for i, form in enumerate(self.layers):
                b = form.state_bound(self.ssm_input_bound(i))
                parts.append(torch.nn.functional.pad(b, (0, self.M - b.shape[-1])))
            self._state_bound = torch.stack(parts)
        return self._state_bound

    def state16_bound(self) -> torch.Tensor:
        """(n_layers, H, 2, M) float64: `state_bound` for a state stored in float16 (a decode batch after
        `use_state_dtype(float16)`): each step's rounding (STATE16_ROUNDING) at its worst, fed back through
        each mode's recurrence (`DiagonalSSM.state_bound`; inf for a DPLR layer's nonzero entries, where
        none is derived), for an SSM input up to its bound × STATE_BOUND_SLACK (the LayerNorm's output as
        computed may pass the exact bound by its own rounding: float32's, or ≤ 2⁻⁸ of it in a bfloat16
        model), and at least a float32 state's limit (`state_bound` × STATE_BOUND_SLACK, a session's state
        joining the batch) rounded up by ρ. Computed once, in float64, on the CPU."""
        if self._state16_bound is None:
            rel, floor = STATE16_ROUNDING
            parts = []
            for i, form in enumerate(self.layers):  # (the input's own rounding within the slack, below)
                b = form.state_bound(self.ssm_input_bound(i) * STATE_BOUND_SLACK, STATE16_ROUNDING)
                parts.append(torch.nn.functional.pad(b, (0, self.M - b.shape[-1])))
            plain = self.state_bound()
            joined = torch.where(plain == 0, 0.0, plain * STATE_BOUND_SLACK * (1 + rel) + floor)
            self._state16_bound = torch.maximum(torch.stack(parts), joined)
        return self._state16_bound

    def state_limit(self) -> torch.Tensor:
        """(n_layers, H, 2, M) float64: the largest |value| `check_state` lets a state hold: what a float32
        state reaches (`state_bound` × STATE_BOUND_SLACK, the float32 step's and prefill's rounding) or,
        where it is derived, a float16 state (`state16_bound`): a session decoded with S4_STATE_DTYPE=float16
        is stored and restored on any server of the model. Computed once."""
        if self._state_limit is None:  # (a finite float16 bound is at least the float32 limit: its `joined`)
            b16 = self.state16_bound()
            self._state_limit = torch.where(torch.isfinite(b16), b16, self.state_bound() * STATE_BOUND_SLACK)
        return self._state_limit

    def check_state(self, state: torch.Tensor) -> None:
        """Raise StateRangeError unless state (n_layers, B, H, 2, M) float32 (or float16) is one the model can
        produce: every value finite and within `state_limit()` (`state_bound()` × STATE_BOUND_SLACK, or
        `state16_bound()` where derived). Checks each row on its own; the message names the first offending
        entry."""
        check_state_kind(state)
        want = (len(self.layers), self.H, 2, self.M)
        if state.dim() != 5 or tuple(state.shape[:1] + state.shape[2:]) != want:
            raise StateRangeError(f"state has shape {tuple(state.shape)}, expected (n_layers, B, H, 2, M) = "
                                  f"({want[0]}, B, {want[1]}, {want[2]}, {want[3]})")  # fmt: skip
        x = state.detach().cpu()
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            idx = bad.nonzero()[0].tolist()
            raise StateRangeError(
                f"state holds {int(bad.sum())} NaN or infinite values "
                f"(first at layer {idx[0]}, row {idx[1]}, channel {idx[2]})"
            )
        limit = self.state_limit().float()[:, None]  # (n_layers, 1, H, 2, M)
        over = x.abs() > limit
        if bool(over.any()):
            i, r, h, part, m = over.nonzero()[0].tolist()
            raise StateRangeError(
                f"state value {float32_str(x[i, r, h, part, m])} at layer {i}, row {r}, channel {h}, "
                f"mode {m} exceeds {float32_str(limit[i, 0, h, part, m])}, the largest this model can reach"
            )

    def init_state(self, batch_size: int) -> torch.Tensor:
        """The zero state of `batch_size` sequences: float32 (n_layers, B, H, 2, M) on the model's device,
        the two real coordinates of M slots per channel: a diagonal layer's complex mode (its real and
        imaginary parts; its conjugate is implied) or two of its real modes (`real_block_slots`), so an
        N-dimensional real system takes M = N/2 slots; a DPLR layer's N/2 complex modes; a layer with
        fewer slots than the widest is zero-padded. Its size does not depend on the context length."""
        check_batch_size(batch_size)
        return torch.zeros(len(self.layers), batch_size, self.H, 2, self.M, device=self.device)

    def _check(self, tokens: torch.Tensor, state: torch.Tensor, ndim: int) -> torch.Tensor:
        """`check_step_inputs` for this model's state shape: the tokens as ids (int64 or int32)."""
        tokens = check_token_dtype(tokens)
        want = (len(self.layers), tokens.shape[0] if tokens.dim() else 0, self.H, 2, self.M)
        check_step_inputs(tokens, ndim, state, want, self._device_type)
        return tokens

    def _pad(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Zero-pad the mode axis of one layer's state up to M (layers may keep fewer modes)."""
        missing = self.M - x.shape[dim]
        if not missing:
            return x
        shape = list(x.shape)
        shape[dim] = missing
        return torch.cat([x, x.new_zeros(shape)], dim=dim)

    def _run(self, tokens: torch.Tensor, layer_ssm, any_dtype: bool = False, logits: str = "all"):
        """The network with layer i's SSM replaced by layer_ssm(i, form, u) → y; the SSM gets u in
        float32 and its y goes back in the weights' dtype (any_dtype: layer_ssm takes u in the weights'
        dtype and returns y in it, computing in float32 itself); float32 logits of the positions
        `logits` names (SequenceModel.forward), or None."""

        def ssm(i, form, u):
            return layer_ssm(i, form, u) if any_dtype else layer_ssm(i, form, u.float()).to(u.dtype)

        ssms = [functools.partial(ssm, i, form) for i, form in enumerate(self.layers)]
        out = self._net_ops(tokens, ssms=ssms, logits=logits)
        return None if out is None else out.float()

    def _step_fused(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None):
        state = state.contiguous()
        new = torch.empty_like(state) if out is None else out

        def layer_ssm(i, form, u):
            u = u.contiguous()
            y = torch.empty_like(u)
            form.step_fused(self._fused, u, state[i], new[i], y)
            return y

        return self._run(tokens, layer_ssm), new

    def _step_triton(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None):
        """The torch step with each diagonal layer's SSM one Triton kernel that writes its next state
        straight into `out` (or a new tensor): no padding, stacking or copying of the state. A DPLR layer
        takes its torch step."""
        new = torch.empty_like(state) if out is None else out

        def layer_ssm(i, form, u):
            if form.form != "diagonal":  # (a float16 state widened for it; the copy rounds it back)
                y, x = form.step(u, state[i, ..., : form.M].float())
                new[i].copy_(self._pad(x, 3))
                return y
            y = torch.empty_like(u)
            triton_kernel.diag_step(form, u, state[i], new[i], y)
            return y

        return self._run(tokens, layer_ssm), new

    def _step_torch(self, tokens: torch.Tensor, state: torch.Tensor):
        new = []

        def layer_ssm(i, form, u):
            y, x = form.step(u, state[i, ..., : form.M])
            new.append(self._pad(x, 3))
            return y

        return self._run(tokens, layer_ssm), torch.stack(new)

    def compile_step(self, on: bool = True) -> None:
        """Run the torch step (`_step_torch`, the path a CUDA device takes) through `torch.compile`
        (Inductor; dynamic batch size: one compile for batch 1, one for the rest), or go back to the
        plain ops (`on` False). Its elementwise ops are fused into a few kernels, where the plain step
        launches hundreds (launch-bound on a GPU: 199 µs a graph replay at batch 1 on an H200,
        2026-12-04). Compiles lazily, at the first step of each kind; call it before `use_cuda_graphs`,
        whose warm-up runs then compile before the capture. The C steps on CPU are not affected."""
        self._compiled_step = torch.compile(self._step_torch, dynamic=True) if on else None
        self._recapture()

    def use_triton_step(self, on: bool = True) -> None:
        """Step the diagonal layers with the Triton kernel (`model/triton_step.py`; on, where the C step
        does not run: CUDA, or CPU under Triton's interpreter) or with torch ops (off). The CUDA graphs, if
        captured, are captured again. The kernel is on by default on CUDA (`S4_TRITON_STEP`); benchmarks
        measure both. A model without a diagonal layer keeps the torch step (`triton_step_active` stays
        False). Raises ValueError for on where the kernel does not run (`triton_step.probe`)."""
        if on:
            triton_kernel.require(self.device, "use_triton_step(True)")
        self._triton = bool(on) and any(f.form == "diagonal" for f in self.layers)
        self._recapture()

    @property
    def triton_step_active(self) -> bool:
        """Whether the step runs the Triton kernel for the diagonal layers (`triton_step`,
        `use_triton_step`; False for a model without a diagonal layer)."""
        return self._triton

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None = None):
        """tokens (B,) integer ids in 0 … V − 1 (int64; any integer dtype), state (n_layers, B, H, 2, M)
        float32 → logits (B, V) float32 and the next state: a new tensor, or written into `out` (which
        may be `state` itself: an in-place update that allocates nothing). A float16 state (stored at 16
        bits, `use_state_dtype`) is stepped in float32 from its exact widening and the next state rounded
        to float16 (the Triton kernel reads and writes it so; the other steps widen, step and round); out
        has the state's dtype and device. With `use_cuda_graphs`, a batch within the largest bucket replays
        its bucket's graph (a state of the graphs' `state_dtype`; another steps eagerly). Raises ValueError
        for a wrong shape, dtype or device, or an id outside the vocabulary (naming it; the state is then
        unchanged)."""
        tokens = self._check(tokens, state, 1)
        if out is not None and (out.shape != state.shape or out.dtype != state.dtype):
            raise ValueError(f"out has shape {tuple(out.shape)} {out.dtype}, expected {tuple(state.shape)} "
                             f"{state.dtype}")  # fmt: skip
        if out is not None and out.device != state.device:  # (the C step would write through its pointer)
            raise ValueError(f"out is on {out.device}, expected the state's device ({state.device})")
        if self._graphs is not None:
            check_token_ids(tokens, self.config.vocab_size)
            return self._graphs(tokens, state, out)
        return self._step_eager(tokens, state, out)

    def _step_eager(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor | None,
                    ids_checked: bool = False):  # fmt: skip
        """`step` without the shape checks, as plain torch ops (or the C step on CPU). The torch paths
        check the ids (a host sync on CUDA) unless `ids_checked`: the CUDA graphs' capture and replay,
        whose ids `step` checked before copying them in, must not synchronize."""
        contiguous_out = out is None or out.is_contiguous()
        if state.dtype != torch.float32:  # a state stored at 16 bits (`use_state_dtype`; the C steps only
            # ever see float32): the Triton kernel reads and writes it where it is the float32 state's path
            if state.dtype == torch.float16 and self._triton_path(state, contiguous_out):
                if not ids_checked:
                    check_token_ids(tokens, self.config.vocab_size)
                return self._step_triton(tokens, state, out)  # (the kernel reads and writes it as it is)
            return self._half_step(tokens, state, out, ids_checked)
        if self._net_step is not None and contiguous_out and tokens.shape[0] <= self.net_step_max_batch:
            state = state.contiguous()
            new = torch.empty_like(state) if out is None else out
            return self._net_step(tokens, state, new), new  # (the C step checks the ids)
        if not ids_checked:
            check_token_ids(tokens, self.config.vocab_size)
        if self._fused is not None and contiguous_out:
            return self._step_fused(tokens, state, out)
        if self._triton_path(state, contiguous_out):
            return self._step_triton(tokens, state, out)
        logits, new = (self._compiled_step or self._step_torch)(tokens, state)
        return logits, new if out is None else out.copy_(new)

    @property
    def _triton_steps(self) -> bool:
        """Whether the step's diagonal layers take the Triton kernel: on, no C SSM step, no compiled step."""
        return self._triton and self._fused is None and self._compiled_step is None

    def _triton_path(self, state: torch.Tensor, contiguous_out: bool) -> bool:
        """Whether `_step_eager` steps this state with the Triton kernel (`_triton_steps`, unit stride on
        the slots, a contiguous `out`)."""
        return self._triton_steps and state.stride(-1) == 1 and contiguous_out

    @property
    def state16_native(self) -> bool:
        """Whether a float16 state is read and written at 16 bits by the step itself: every layer diagonal
        and stepped by the Triton kernel (not compiled). Elsewhere (a DPLR layer, the torch or C step)
        it is widened, stepped and rounded around the float32 step: the same definition, more bytes."""
        return self._triton_steps and all(f.form == "diagonal" for f in self.layers)

    def decode_block_ready(self, batch: int) -> bool:
        """Whether `decode_block` serves a batch of this many rows: with CUDA graphs (`use_cuda_graphs`),
        a batch within the largest bucket; else the whole-network C step (CPU, float32, bfloat16 or
        float16 weights, at most `net_step_max_batch` rows), for float32 states only (`state_dtype`: a
        float16 decode batch steps one step at a time there)."""
        if self._graphs is not None:
            return 1 <= batch <= self._graphs.buckets[-1]
        f32 = self.state_dtype == torch.float32
        return self._net_step is not None and batch <= self.net_step_max_batch and f32

    @torch.inference_mode()
    def decode_block(self, K: int, state: torch.Tensor, tokens: torch.Tensor, **rows) -> fused.BlockResult:
        """Up to K steps with sampling and stop checks in one call, the state (n_layers, B, H, 2, M) and the
        pending tokens (B,) int64 updated in place: see fused.NetStep.block for the per-row arguments and the
        result. On CPU one C call (`fused.NetStep.block`); with CUDA graphs the bucket's decode-block graphs
        (`model.cuda_graphs.BucketedStep.decode_block`: stop sequences checked after the block, a row that met
        one stepped again to it). Each row's tokens, state and seen set are exactly those of stepping it with
        `step` and `model.sampling.sample` (its settings, its CounterRNG): alone, on CPU; in its batch (the
        one-step path through the same bucket, whose matmuls round alike), with the graphs. Raises ValueError
        when `decode_block_ready` is false or on bad arguments (tokens not int64 among them:
        `check_block_tokens`)."""
        check_block_tokens(tokens)
        B = tokens.shape[0]
        if self._graphs is not None:
            if not self.decode_block_ready(B):
                most = self._graphs.buckets[-1]
                raise ValueError(f"the graphs' decode block holds 1 … {most} rows, got {B}")
            tokens = self._check(tokens, state, 1)
            return self._graphs.decode_block(K, state, tokens, **rows)
        if not self.decode_block_ready(B):
            raise ValueError("the native decode block needs the whole-network C step (CPU, not float64)")
        tokens = self._check(tokens, state, 1)
        check_native_block_state(state)
        return self._net_step.block(K, state, tokens, **rows)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, state: torch.Tensor, logits: str = "all"):
        """tokens (B, L) integer ids in 0 … V − 1 → logits and the state after the last token, parallel
        over L (state as `step`'s, not modified; a float16 state is prefilled from its exact widening and
        the state after the prompt rounded to float16). `logits`: "all"
        (B, L, V) float32, "last" (B, min(L, 1), V) (the next token's), or "none" (None: the head is not
        run; a server ingesting a prompt needs only the state).
        On CPU, with the whole-network C step, a prompt of at most `prefill_by_steps_max_tokens`
        tokens takes its recurrent form layer by layer instead, `fused.NetStep.prefill`: faster there,
        and bit-identical to stepping it, its rows split between the calling thread's OpenMP threads (one
        row's prompt split over them by channels and columns, as `step` splits a few rows); the two forms
        agree to float32 rounding. The parallel form runs with
        `prefill_threads` torch threads in the calling thread (restored after), the SSMs in float32, in
        blocks of CHUNK tokens (`DiagonalSSM.prefill`). Raises ValueError for bad shapes or dtypes, an id
        outside the vocabulary or an unknown `logits`."""
        tokens = self._check(tokens, state, 2)
        check_logits_kind(logits)
        if state.dtype == torch.float16:  # a state stored at 16 bits
            return self._half_prefill(tokens, state, logits)
        B, L = tokens.shape
        if (
            self._net_step is not None
            and B <= self.net_step_max_batch
            and L <= self.prefill_by_steps_max_tokens
        ):
            # a short prompt: the recurrent form layer by layer in C (fused.NetStep.prefill: bit-identical
            # to L steps) costs less than the parallel form's fixed cost
            new = state.contiguous().clone()
            return self._net_step.prefill(tokens, new, logits), new  # (the C prefill checks the ids)
        check_token_ids(tokens, self.config.vocab_size)
        threads = torch.get_num_threads()  # a per-thread setting (OpenMP): other threads keep theirs
        if self.prefill_threads and self.prefill_threads != threads:
            torch.set_num_threads(self.prefill_threads)
        try:
            return self._prefill(tokens, state, logits)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def _prefill(self, tokens: torch.Tensor, state: torch.Tensor, logits: str = "all"):
        # Skipping the x0 terms is exact when every row's x0 is 0 (they would add exact zeros), so this
        # switch cannot change any row's result, whatever another row holds (NaN ≠ 0: no skip).
        x0_is_zero = bool((state == 0).all())
        new = []

        def layer_ssm(i, form, u):
            x0 = torch.complex(state[i, :, :, 0, : form.M], state[i, :, :, 1, : form.M])
            y, xL = form.prefill(u, x0, x0_is_zero)
            new.append(self._pad(torch.stack([xL.real, xL.imag], dim=-2), 3))
            return y

        return self._run(tokens, layer_ssm, any_dtype=True, logits=logits), torch.stack(new)
