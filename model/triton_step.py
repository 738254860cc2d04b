"""The diagonal SSM's recurrent step as one Triton kernel: the GPU's counterpart of the fused C step.

`DiagonalSSM.step` in torch ops is about a dozen elementwise kernels a layer, each reading and writing
(B, H, M) floats, and the caller then pads, stacks and copies the new state: some twenty passes over the
state a layer. On an H200 (2026-12-04, `bench.gpu`) the audio model's step was launch-bound at batch 1
(199 µs a CUDA-graph replay) and traffic-bound at batch 1,024 (771 steps/s, where reading and writing the
state once a step allows ~16k). This kernel reads each layer's state once and writes it once, in place
when asked:

    x₁' = p x₁ − m x₂ + b₁ u,   x₂' = m x₁ + s x₂ + b₂ u,   y = Σ (cr x₁' − ci x₂')

over the M slots of each (row, channel) (`DiagonalSSM`: a slot's real 2 × 2 block [[p, −m], [m, s]] from
`real_block_slots`). A program steps ROWS (row, channel) pairs, the slots on its other axis; slots past
the layer's own M (a layer with fewer modes than the state) are written as zeros, as `_pad` does.

The same kernel runs without a GPU in Triton's interpreter (numpy, on CPU tensors) when TRITON_INTERPRET=1
is set before triton is imported (tests/conftest.py sets it where CUDA is absent; set after, triton's own
functions fail with "Cannot call @triton.jit'd outside of the scope of a kernel"): slow (a shipped model's
load-time verification takes minutes, against seconds for the torch step), but the tests
check it there against a float64 reference (`tests/test_triton_step.py`), and CI runs them. On a GPU the
compiled kernel runs (`tests/test_cuda.py`).

Triton: https://triton-lang.org (the `triton` package; PyTorch's CUDA wheels ship it).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types

import torch

# imported by the first kernel call (`_kernel`): 0.2 s, which only a GPU (or the tests) should pay
triton = tl = None

ROWS = 16  # (row, channel) pairs a program steps: 16 × 32 slots × 2 coordinates = 4 KiB of state read


@functools.cache
def available() -> bool:
    """Whether the `triton` package is installed (the kernel can run: compiled on CUDA, interpreted on
    CPU). Looked up once a process: `diag_step` asks on every call, a layer's step."""
    return importlib.util.find_spec("triton") is not None


def wanted(device: torch.device | str) -> bool:
    """Whether a model on `device` steps its diagonal layers with this kernel by default: a CUDA device,
    triton importable, `S4_TRITON_STEP` on (`setting_on`: the server's setting, read here as the server
    reads it, so that every way of loading a model agrees), and the kernel runs there (`probe`)."""
    return torch.device(device).type == "cuda" and setting_on() and available() and probe(device) is None


FALSE, TRUE = {"0", "off", "f", "false", "n", "no"}, {"1", "on", "t", "true", "y", "yes"}  # pydantic's bools


def setting_on() -> bool:
    """`S4_TRITON_STEP` read as the server reads it (pydantic's booleans, any case; unset: on). Raises
    ValueError for another value, naming the variable."""
    raw = os.environ.get("S4_TRITON_STEP")
    value = "1" if raw is None else raw.strip().lower()
    if value not in FALSE | TRUE:
        raise ValueError(f"S4_TRITON_STEP={raw!r}: expected a boolean (1/0, true/false, on/off, yes/no)")
    return value in TRUE


@functools.cache
def _probe(device: str) -> str | None:
    if not available():
        return "the triton package is not installed"
    try:  # one slot: x = (1, 0), p = s = 0.5, m = 0, b = (1, 0), c = (1, 0), u = 2 → x₁' = 2.5, y = 2.5
        one = {"device": device, "dtype": torch.float32}
        half, zero, unit = (torch.full((1, 1), v, **one) for v in (0.5, 0.0, 1.0))
        form = types.SimpleNamespace(
            H=1, M=1, mur=half, mui=zero, mus=half, br=unit, bi=zero, cr=unit, ci=zero
        )
        x = torch.tensor([[[[1.0], [0.0]]]], **one)
        y = torch.zeros(1, 1, **one)
        diag_step(form, torch.full((1, 1), 2.0, **one), x, x, y)
        got = (float(y[0, 0]), float(x[0, 0, 0, 0]), float(x[0, 0, 1, 0]))
    except Exception as exc:  # noqa: BLE001  (a capability probe: any failure means "not here")
        first = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {first[0] if first else ''}".rstrip(": ")
    return None if got == (2.5, 2.5, 0.0) else f"one step gave y, x₁', x₂' = {got}, not (2.5, 2.5, 0.0)"


def resolve(asked: bool | None, device: torch.device | str) -> bool:
    """A model's `triton_step` argument → whether it steps with the kernel: None (the default) →
    `wanted(device)`; True → True, where the kernel runs (else ValueError, `require`: asked for
    explicitly, a kernel that does not run here is an error, said at once); False → False."""
    if asked is None:
        return wanted(device)
    if asked:
        require(device, "triton_step=True")
    return bool(asked)


def require(device: torch.device | str, what: str) -> None:
    """Raise ValueError naming `what` (the argument that asked for the kernel) and why, unless the kernel
    runs on `device` (`probe`)."""
    why = probe(device)
    if why is not None:
        raise ValueError(f"{what}: the Triton kernel does not run on {torch.device(device)}: {why}")


def probe(device: torch.device | str) -> str | None:
    """Run the kernel once on `device` (one row, one channel, one slot) and check its result: None when
    it runs and is right, else why not, in one line (the package missing; CUDA tensors without a GPU; a
    compile failure, e.g. no C compiler for Triton's launcher). Once per device and process (cached)."""
    return _probe(str(torch.device(device)))


def _diag_step(x_ptr, xo_ptr, u_ptr, y_ptr, p_ptr, m_ptr, s_ptr, b1_ptr, b2_ptr, cr_ptr, ci_ptr, k_ptr,
               n_pairs, H, M, M_state, sx_b, sx_h, sx_c, so_b, so_h, so_c, su_b, su_h, sy_b, sy_h,
               ROWS: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One program: (row, channel) pairs pid·ROWS … +ROWS, every slot of each (see the module docstring).
    Pointers: x, xo (B, H, 2, M_state) float32 or float16 (a 16-bit state: read widened exactly, the
    arithmetic float32, the next state rounded to nearest even as it is stored) with strides
    (sx_b, sx_h, sx_c, 1) and (so_*), u, y (B, H) float32; the parameters (H, M) float32 contiguous;
    with MASKED, k (B,) uint8: rows with k = 0 are neither read nor written (their y is 0). Loads
    everything it reads before it stores, and no two programs touch one pair: x and xo may be the same
    tensor."""
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat pair index b·H + h
    rmask = r < n_pairs
    b = r // H
    h = r % H
    smask = rmask  # the pairs whose state steps
    if MASKED:
        smask = rmask & (tl.load(k_ptr + b, mask=rmask, other=0) != 0)
    j = tl.arange(0, BLOCK_M)  # (BLOCK_M,) slot
    lm = smask[:, None] & (j < M)[None, :]  # the layer's own slots
    sm = smask[:, None] & (j < M_state)[None, :]  # every slot of the state (the rest written as 0)
    xo_ = (b * sx_b + h * sx_h)[:, None] + j[None, :]
    x1 = tl.load(x_ptr + xo_, mask=lm, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo_ + sx_c, mask=lm, other=0.0).to(tl.float32)
    po = (h * M)[:, None] + j[None, :]
    p = tl.load(p_ptr + po, mask=lm, other=0.0)
    m = tl.load(m_ptr + po, mask=lm, other=0.0)
    s = tl.load(s_ptr + po, mask=lm, other=0.0)
    b1 = tl.load(b1_ptr + po, mask=lm, other=0.0)
    b2 = tl.load(b2_ptr + po, mask=lm, other=0.0)
    cr = tl.load(cr_ptr + po, mask=lm, other=0.0)
    ci = tl.load(ci_ptr + po, mask=lm, other=0.0)
    u = tl.load(u_ptr + b * su_b + h * su_h, mask=smask, other=0.0)[:, None]
    n1 = p * x1 - m * x2 + b1 * u
    n2 = s * x2 + m * x1 + b2 * u
    y = tl.sum(cr * n1 - ci * n2, axis=1)
    oo = (b * so_b + h * so_h)[:, None] + j[None, :]
    tl.store(xo_ptr + oo, n1.to(xo_ptr.dtype.element_ty), mask=sm)
    tl.store(xo_ptr + oo + so_c, n2.to(xo_ptr.dtype.element_ty), mask=sm)
    tl.store(y_ptr + b * sy_b + h * sy_h, y, mask=rmask)


@functools.cache
def _kernel():
    """The kernel: compiled for CUDA by triton.jit, or Triton's interpreter when TRITON_INTERPRET=1 was
    set before triton was imported (its own library functions, tl.sum among them, are made then). Imports
    triton (module globals: the kernel's body reads `tl` from them when it is compiled)."""
    global triton, tl  # noqa: PLW0603
    import triton as triton_mod  # noqa: PLC0415
    import triton.language as tl_mod  # noqa: PLC0415

    triton, tl = triton_mod, tl_mod
    return triton.jit(_diag_step)


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (CPU tensors only): TRITON_INTERPRET as triton itself
    reads it (`triton.knobs`: 1, true, on, y or yes in any case; 0, off, false or any other value is the
    compiler; a triton without knobs, before 3.4: 1 alone), set before triton is imported. Imports triton
    (what `diag_step` does next anyway). (Read here as "anything but empty or 0", TRITON_INTERPRET=off or
    false was the interpreter on this side and the compiler on triton's: CUDA tensors were refused, so the
    probe turned the kernel off on a GPU, and CPU tensors reached the compiled kernel.)"""
    if not available():
        return False
    try:
        from triton import knobs  # noqa: PLC0415
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def diag_step(form, u: torch.Tensor, x: torch.Tensor, xo: torch.Tensor, y: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:  # fmt: skip
    """One step of a `DiagonalSSM` (`form`: its float32 mur, mui, mus, br, bi, cr, ci, each (H, M) and
    contiguous: p, m, s, b₁, b₂, cr, ci above) for a batch.

    u (B, H) float32, the SSM's input; x (B, H, 2, M_state) float32 the slots' coordinates x₁, x₂,
    M_state ≥ form.M (slots past form.M are read as 0 and written as 0), any batch stride, unit stride
    on the slots; writes the next state into xo (x's shape; may be x itself) and the output into y (B, H)
    float32. x and xo may instead both be float16 (a state stored at 16 bits, `use_state_dtype`): read
    widened exactly, stepped in float32 and rounded to nearest even as stored, so the result is the
    float32 kernel's on x widened, then rounded (half the state's bytes moved).
    `rows` (B,) bool (SaShiMi's dense step: the rows that step this layer): the other rows'
    x and xo are neither read nor written (xo keeps what it held) and their y is 0. CUDA tensors run
    the compiled kernel, CPU tensors Triton's interpreter. Raises ValueError for a shape, dtype, device
    or layout it does not take, or a bad `rows`; RuntimeError when triton is not installed."""
    if not available():
        raise RuntimeError("the Triton step needs the triton package (pip install triton)")
    B, H, two, Ms = x.shape
    M = form.M
    if two != 2 or H != form.H or Ms < M or xo.shape != x.shape or u.shape != (B, H) or y.shape != (B, H):
        raise ValueError(
            f"x {tuple(x.shape)}, xo {tuple(xo.shape)}, u {tuple(u.shape)}, y {tuple(y.shape)}: expected "
            f"x and xo (B, {form.H}, 2, ≥ {M}), u and y (B, {form.H})"
        )
    params = (form.mur, form.mui, form.mus, form.br, form.bi, form.cr, form.ci)  # (H, M) each
    ts = (x, xo, u, y, *params)
    if len({t.device for t in ts}) != 1 or any(t.dtype != torch.float32 for t in (u, y, *params)):
        raise ValueError("the Triton step takes float32 tensors on one device")
    if x.dtype not in (torch.float32, torch.float16) or xo.dtype != x.dtype:
        raise ValueError(f"the Triton step's state x and xo must both be float32 or both float16, got "
                         f"{x.dtype} and {xo.dtype}")  # fmt: skip
    if rows is not None and (rows.shape != (B,) or rows.dtype != torch.bool or rows.device != x.device
                             or rows.stride(0) != 1):  # fmt: skip
        raise ValueError(f"rows must be ({B},) bool on {x.device}, unit stride")
    if x.stride(3) != 1 or xo.stride(3) != 1:
        raise ValueError("x and xo need unit stride on the slots")
    if (x.device.type == "cuda") == interpreting():
        interp = os.environ.get("TRITON_INTERPRET", "unset")
        raise ValueError(
            f"tensors on {x.device.type} with TRITON_INTERPRET {interp}: "
            "the compiled kernel takes CUDA tensors, the interpreter (TRITON_INTERPRET=1 before triton is "
            "imported) CPU tensors"
        )
    if not B:
        return
    kernel = _kernel()
    block_m = triton.next_power_of_2(Ms)
    grid = (triton.cdiv(B * H, ROWS),)
    kernel[grid](
        x, xo, u, y, *params, x if rows is None else rows.view(torch.uint8), B * H, H, M, Ms,
        *x.stride()[:3], *xo.stride()[:3], *u.stride(), *y.stride(),
        ROWS=ROWS, BLOCK_M=block_m, MASKED=rows is not None, enable_fp_fusion=True,
    )  # fmt: skip
