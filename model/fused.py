"""Fused CPU step kernels (model/csrc/ssm_step.c), compiled at first use with the system C compiler
and called through ctypes (which releases the GIL). If no compiler works, `library()` returns None
and the recurrent model uses its torch ops instead (same arithmetic, more passes over memory).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from model.network import token_range_error

SOURCE = Path(__file__).parent / "csrc" / "ssm_step.c"
MAX_MODES, MAX_RANK = 1024, 4  # the DPLR step's limits (MAX_MODES, MAX_RANK in ssm_step.c)
_lib: dict[str, object] = {}
_LIB_LOCK = threading.Lock()  # one build of the library at a time in a process (`library`)
log = logging.getLogger("model.fused")
RESTYPES = {  # the library's entry points and their return types
    "diag_step": None, "dplr_step": ctypes.c_int, "net_step": ctypes.c_int, "sample_rows": ctypes.c_int,
    "sample_rows_full": ctypes.c_int, "net_block": ctypes.c_long, "philox_uniforms": None,
    "philox_blocks": None, "linear_rows": None, "sashimi_step": ctypes.c_int, "sashimi_block": ctypes.c_long,
    "linear_rows_threads": None, "net_prefill": ctypes.c_int, "ssm_prefill": ctypes.c_long,
    "ssm_prefill_width": ctypes.c_long, "linear_panel_width": ctypes.c_long, "split_step": ctypes.c_int,
    "step_split_min_weights": ctypes.c_long,
    "step_split_state": None, "decode_block_state": None, "adaptive_logprobs": ctypes.c_int,
    "adaptive_embeddings": ctypes.c_int, "logprobs_rows": None,
}  # fmt: skip
# -fno-math-errno lets the GELU / sigmoid loops call glibc's vector expf / erff (model/csrc/ssm_step.c)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
# A decode block's order (ssm_step.c `decode_block`): groups of BLOCK_SCHEDULE[0] rows of a thread's share (0:
# the share at once, every step: the order before), each taken through rounds of BLOCK_SCHEDULE[1] steps.
BLOCK_SCHEDULE = (8, 4)


def build_flags() -> tuple[str, ...]:
    """FLAGS, then the words of $S4_CFLAGS (shell-quoted, e.g. "-DS4_VW=16": the AVX-512 layout of the
    linear layers and the C prefill on any x86-64, which the tests use on machines without AVX-512;
    "-march=x86-64-v3" for a fleet's common ISA). Raises ValueError for unbalanced quotes."""
    return FLAGS + tuple(shlex.split(os.environ.get("S4_CFLAGS", "")))


def build_folder() -> Path:
    """$S4_BUILD_CACHE, else <project>/.build_cache."""
    return Path(os.environ.get("S4_BUILD_CACHE", Path(__file__).resolve().parent.parent / ".build_cache"))


def fallback_folder() -> Path:
    """Where the library is compiled when `build_folder()` cannot be written: <temp dir>/s4serve-build
    (the image's S4_BUILD_CACHE is on its cache volume; without one its read-only root leaves /tmp)."""
    return Path(tempfile.gettempdir()) / "s4serve-build"


def _folder_problem(folder: Path, name: str) -> str | None:
    """Why the library `name` cannot be loaded from `folder` (compiled there first where it is not there
    yet): a noexec mount, or a folder that cannot be made or written; None when it can. Makes the folder."""
    if on_noexec_mount(folder):
        return "is on a file system mounted noexec"
    if (folder / name).is_file():
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot be made ({exc.strerror or exc})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "cannot be written" + (" (a read-only file system)" if _mounted(folder, os.ST_RDONLY) else "")
    return None


def library_folder(name: str) -> tuple[Path | None, list[str]]:
    """The folder the library file `name` is loaded from: `build_folder()` where it can be (the library
    there, or a folder that can be written, on an exec mount), else `fallback_folder()`; None where
    neither can. And why each folder passed over could not serve, one line each ("S4_BUILD_CACHE =
    /x is on a file system mounted noexec")."""
    folder = build_folder()
    if (problem := _folder_problem(folder, name)) is None:
        return folder, []
    where = "S4_BUILD_CACHE" if "S4_BUILD_CACHE" in os.environ else "S4_BUILD_CACHE (unset: the default)"
    why = [f"{where} = {folder} {problem}"]
    try:
        fallback = fallback_folder()
    except OSError:  # tempfile found no writable temp dir (TMPDIR, /tmp, /var/tmp, the working directory)
        return None, [*why, "the fallback: no temporary folder can be written (TMPDIR, /tmp, /var/tmp)"]
    if fallback == folder:
        return None, why
    if (problem := _folder_problem(fallback, name)) is None:
        return fallback, why
    return None, [*why, f"the fallback = {fallback} {problem}"]


def compiler() -> str | None:
    """The C compiler the build uses: $CC, else cc or gcc on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def on_noexec_mount(folder: Path) -> bool:
    """True when `folder` (or, while it does not exist yet, its nearest existing parent) is on a file
    system mounted noexec: a library compiled there cannot be loaded ("failed to map segment from shared
    object"). Docker and podman mount a `--tmpfs` (and compose's `tmpfs:`) noexec unless told `exec`."""
    return _mounted(folder, os.ST_NOEXEC)


def _mounted(folder: Path, flag: int) -> bool:
    """Whether the file system of `folder` (or, while it does not exist yet, of its nearest existing
    parent) is mounted with `flag` (os.ST_NOEXEC, os.ST_RDONLY); False where statvfs cannot say."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return bool(os.statvfs(folder).f_flag & flag)
    except OSError:
        return False


def library_name(flags: Sequence[str] | None = None) -> str:
    """The library's file name for this source, `flags` (default `build_flags()`) and CPU (`build_key`).
    Raises OSError (the source unreadable) or ValueError (S4_CFLAGS with unbalanced quotes)."""
    return f"ssm_step_{build_key(SOURCE.read_bytes(), build_flags() if flags is None else flags)}.so"


def build_cache_problem() -> str | None:
    """Why the fused step could not be compiled and loaded in any folder (`library_folder`: S4_BUILD_CACHE,
    then the fallback in the temp dir, each on a noexec mount or not writable), with the fix; None when
    one can serve (or there is no C compiler, which the torch ops stand in for anyway)."""
    if compiler() is None:
        return None
    try:
        folder, why = library_folder(library_name())
    except (OSError, ValueError):
        return None  # (library() warns with the cause)
    if folder is not None:
        return None
    return (
        f"{'; '.join(why)}: the fused C step cannot be compiled and loaded, and decoding would run on torch "
        "ops, several times slower; mount it with exec (compose: tmpfs entry /tmp:exec; docker or podman "
        "run: --tmpfs /tmp:exec), or point S4_BUILD_CACHE at a writable folder on an exec mount (the "
        "image's is on its cache volume, /home/s4/.cache/s4serve)"
    )


def _cpu_flags_line() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (avx2, f16c, avx512f, avx512_bf16, …);
    empty where there is no /proc/cpuinfo."""
    line = _cpu_flags_line()
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def _cpu_signature() -> str:
    return platform.machine() + _cpu_flags_line()


def compile_library(out: Path, flags: Sequence[str] = FLAGS, source: Path | None = None) -> None:
    """Compile `source` (default csrc/ssm_step.c) with `flags` to the shared library `out` (written
    atomically: concurrent builders never load a half-written file). Raises RuntimeError without a C compiler
    ($CC, cc, gcc) and subprocess.CalledProcessError (its stderr the compiler's) when the build fails."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cc, *flags, str(source or SOURCE), "-o", str(tmp), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tmp.replace(out)


def load_library(path: Path) -> ctypes.CDLL:
    """A compiled library, its entry points' return types set (RESTYPES)."""
    lib = ctypes.CDLL(str(path))
    for name, restype in RESTYPES.items():
        getattr(lib, name).restype = restype
    return lib


def compiler_signature() -> str:
    """The C compiler `compiler()` names and the first line of its `--version` ("none" without one; the
    path alone where it does not answer): part of the build key, so a library another compiler built into a
    shared S4_BUILD_CACHE (an image with a newer gcc on the same volume) is not loaded for this one's.
    Asked once a process."""
    if "cc" not in _lib:
        cc, line = compiler(), ""
        if cc is not None:
            try:
                ask = [cc, "--version"]
                out = subprocess.run(ask, check=False, capture_output=True, text=True, timeout=30).stdout
                line = out.splitlines()[0] if out else ""
            except (OSError, subprocess.SubprocessError):
                pass
        _lib["cc"] = f"{cc}: {line}" if cc is not None else "none"
    return _lib["cc"]


def build_key(src: bytes, flags: Sequence[str]) -> str:
    """The build cache's key for a library of C source `src` compiled with `flags` by this compiler
    (`compiler_signature`) on this CPU (-march=native): 16 hex digits of a SHA-256."""
    salt = " ".join(flags) + _cpu_signature() + compiler_signature()
    return hashlib.sha256(src + salt.encode()).hexdigest()[:16]


def library():
    """The loaded ctypes library, or None (after one warning) when it cannot be built. Threads that ask at
    once share one build: the others wait for it (each compiled into the same `.{pid}.tmp` file, and a
    rename that found it gone left None as the process's library)."""
    if "lib" in _lib:
        return _lib["lib"]
    with _LIB_LOCK:
        if "lib" not in _lib:
            _lib["lib"] = _load_library()
        return _lib["lib"]


def _load_library():
    """`library()`'s build and load, in one thread at a time."""
    lib = None
    try:
        flags = build_flags()
        name = library_name(flags)
        folder, why = library_folder(name)
        if folder is None:
            raise OSError("; ".join(why))
        if why:
            log.info("%s: the fused C step is compiled and loaded in %s", "; ".join(why), folder)
        out, t0 = folder / name, time.perf_counter()
        compiled = not out.exists()
        if compiled:
            compile_library(out, flags)
        try:
            lib = load_library(out)
        except OSError as exc:  # a damaged file kept from an earlier start (a persistent folder): once more
            if compiled:
                raise
            log.warning("%s cannot be loaded (%s): compiling it again", out, exc)
            compile_library(out, flags)
            lib, compiled = load_library(out), True
        how = f"compiled in {time.perf_counter() - t0:.1f} s into" if compiled else "loaded from"
        log.info("the fused C step: %s %s", how, out)
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:
        detail = build_cache_problem() or getattr(exc, "stderr", "") or exc
        warnings.warn(f"fused CPU step unavailable ({detail}); using torch ops", RuntimeWarning, stacklevel=3)
        lib = None
    return lib


TOKEN_RANGE = -3  # ssm_step.c E_TOKEN_RANGE: a token id outside the embedding, refused before any step


def _ptrs(*tensors: torch.Tensor):
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"fused step needs contiguous float32 CPU tensors, got {t.dtype} {t.device}")
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


def pointers(*tensors: torch.Tensor) -> tuple:
    """ctypes pointers of contiguous float32 CPU tensors (keep the tensors alive while in use)."""
    return tuple(_ptrs(*tensors))


def diag_step(lib, x, xo, u, y, params: tuple) -> None:
    """The real block-diagonal step (recurrent.DiagonalSSM) of x (B, H, 2, M) → xo, u (B, H) → y (B, H),
    float32 contiguous; params: pointers(mur, mui, br, bi, cr, ci, mus), each (H, M). Raises ValueError
    for 6 params (the complex-diagonal step before the block form took no mus), and for buffers of other
    shapes than x's (xo) and (B, H) (u, y)."""
    if len(params) != 7:
        raise ValueError(
            f"diag_step takes 7 parameter pointers (mur, mui, br, bi, cr, ci, mus), got {len(params)}"
        )
    B, H, _, M = _step_shapes("diag_step", x, xo, u, y)
    lib.diag_step(ctypes.c_long(B), ctypes.c_long(H), ctypes.c_long(M), *_ptrs(x, xo, u, y), *params)


def _step_shapes(fn: str, x, xo, u, y) -> tuple[int, int, int, int]:
    """(B, H, 2, M) of an SSM step's state x; ValueError naming `fn` unless xo has x's shape and u and y are
    (B, H): the C step reads and writes them at those sizes."""
    if x.dim() != 4 or x.shape[2] != 2:
        raise ValueError(f"{fn}: x must be (B, H, 2, M), got {tuple(x.shape)}")
    B, H, _, M = x.shape
    if xo.shape != x.shape or u.shape != (B, H) or y.shape != (B, H):
        raise ValueError(f"{fn}: xo must be {tuple(x.shape)} and u and y ({B}, {H}), got {tuple(xo.shape)}, "
                         f"{tuple(u.shape)} and {tuple(y.shape)}")  # fmt: skip
    return B, H, 2, M


def dplr_step(lib, x, xo, u, y, params: tuple, rank: int) -> None:
    """params: pointers(dBr, dBi, Dr, Di, Pr, Pi, Minv, Qr, Qi, cr, ci). Raises ValueError for buffers of
    other shapes than x's (xo) and (B, H) (u, y), or over the C limits."""
    B, H, _, M = _step_shapes("dplr_step", x, xo, u, y)
    dims = (ctypes.c_long(B), ctypes.c_long(H), ctypes.c_long(M), ctypes.c_long(rank))
    if lib.dplr_step(*dims, *_ptrs(x, xo, u, y), *params) != 0:
        raise ValueError(f"fused DPLR step supports at most 1024 modes and rank 4 (got {M}, {rank})")


@dataclasses.dataclass
class BlockResult:
    """What `NetStep.block` made: `steps` run; tokens (steps, B) int64 (row r's first n_out[r] are
    its tokens, in order); n_out (B,) int64; stopped (B,) bool (a stop sequence ended the row);
    times (steps,) float64 CLOCK_MONOTONIC seconds (time.perf_counter's clock on Linux) after each
    step: when the last row that made step k had made it, and never before step k − 1's time; setup_s:
    seconds of the call before its first step that are not step time (the CUDA graphs' block: capturing
    a graph it needs; 0 here); logprobs, when the block was asked for them (`decode_block`'s logprobs):
    (chosen (steps, B) float32, top ids (steps, B, k) int64, top log-probabilities (steps, B, k) float32),
    step i of row r as `model.sampling.token_logprobs` gives them for its token (the log_softmax of the raw
    logits, the k most likely first; a row that asked for fewer than k has its first that many filled),
    the rows that did not ask for them unset."""

    steps: int
    tokens: torch.Tensor
    n_out: torch.Tensor
    stopped: torch.Tensor
    times: torch.Tensor
    setup_s: float = 0.0
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class NetLayer(ctypes.Structure):
    """One block of the whole-network step (model/csrc/ssm_step.c: NetLayer)."""

    _fields_ = [
        ("form", ctypes.c_long),  # 0: diagonal, 1: dplr
        ("rank", ctypes.c_long),
        ("ln_w", ctypes.c_void_p),
        ("ln_b", ctypes.c_void_p),
        ("d_skip", ctypes.c_void_p),
        ("out_wt", ctypes.c_void_p),
        ("out_b", ctypes.c_void_p),
        ("p", ctypes.c_void_p * 11),
        ("d_ff", ctypes.c_long),  # 0: no feed-forward block
        ("ff_ln_w", ctypes.c_void_p),
        ("ff_ln_b", ctypes.c_void_p),
        ("up_t", ctypes.c_void_p),
        ("up_b", ctypes.c_void_p),
        ("down_t", ctypes.c_void_p),
        ("down_b", ctypes.c_void_p),
        ("wfmt", ctypes.c_long),  # the format of out_wt, up_t and down_t (WEIGHT_FORMATS)
        ("norm", ctypes.c_long),  # both blocks' norm: 0 LayerNorm, 1 scalar TransposedLN (s, m: ln_w, ln_b)
    ]


class CAdaptive(ctypes.Structure):
    """ssm_step.c: struct Adaptive (the adaptive input embedding and softmax, model/adaptive.py)."""

    _fields_ = [
        ("n_in", ctypes.c_long),
        ("in_lo", ctypes.c_void_p),
        ("in_d", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("in_proj", ctypes.c_void_p),
        ("scale", ctypes.c_float),
        ("n", ctypes.c_long),
        ("lo", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("proj", ctypes.c_void_p),
        ("w", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
        ("cw", ctypes.c_void_p),
        ("cb", ctypes.c_void_p),
        ("wfmt", ctypes.c_long),
    ]


# ssm_step.c's linear weight formats (W_F32, W_BF16, W_F16): a 16-bit weight is widened exactly to float32
# as it is loaded, so the products and sums are float32 whatever the format
WEIGHT_FORMATS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def pack_linear(Wt: torch.Tensor, panel: int) -> torch.Tensor:
    """A linear layer's weight Wt (K, N), any dtype, in ssm_step.c's packed layout: 1-D, K·N elements
    of Wt's dtype, the columns in panels of `panel` (the library's `linear_panel_width()`: two vectors,
    16 floats with AVX2, 32 with AVX-512), each a row-major (K, panel) block, then the last N mod panel
    columns as one row-major (K, N mod panel) block. A register tile's weights are then one contiguous
    stream that stays in L1/L2 while the tiles of every row group use it."""
    K, N = Wt.shape
    F = N // panel
    out = torch.empty(K * N, dtype=Wt.dtype)  # written in place: no transient copies of Wt (the WikiText-103
    # recipe's adaptive softmax packs an 82 MB matrix; three copies of it raised the load's peak RSS)
    out[: F * K * panel].view(F, K, panel).copy_(Wt[:, : F * panel].unflatten(1, (F, panel)).transpose(0, 1))
    out[F * K * panel :].view(K, N - F * panel).copy_(Wt[:, F * panel :])
    return out


def linear_rows(
    lib, tiled: int, x: torch.Tensor, packed: torch.Tensor, N: int, bias: torch.Tensor
) -> torch.Tensor:
    """ssm_step.c `linear_rows` (bench.linear, the tests): x (B, K) float32 · Wt + bias (N,) float32 → (B, N)
    float32, Wt given as pack_linear(Wt (K, N), lib.linear_panel_width()) in float32, bfloat16 or float16;
    tiled = 0 runs one row at a time, 1 the row tiles (the same bits)."""
    return _linear(lib, "linear_rows", (tiled,), x, packed, N, bias, ())


def _linear(lib, fn: str, lead: tuple, x: torch.Tensor, packed: torch.Tensor, N: int, bias, tail: tuple):
    """ssm_step.c's linear entry point `fn`(*lead, format, B, K, N, x, Wt, bias, out, *tail) on x (B, K)
    float32, Wt packed (K·N elements, contiguous) and bias (N,) (else ValueError) → out (B, N) float32."""
    B, K = x.shape
    if packed.numel() != K * N or not packed.is_contiguous():
        raise ValueError(f"{fn} needs K·N = {K * N} contiguous packed weights, got {packed.numel()}")
    if bias.shape != (N,):  # (the C code reads N floats; an empty one, a NULL pointer, was taken as no bias)
        raise ValueError(f"{fn} needs a bias of ({N},), got {tuple(bias.shape)}")
    out = torch.empty(B, N)
    px, pb, po = _ptrs(x, bias, out)  # (contiguous float32 CPU tensors, or ValueError)
    dims = [ctypes.c_long(v) for v in (*lead, WEIGHT_FORMATS[packed.dtype], B, K, N)]
    getattr(lib, fn)(*dims, px, ctypes.c_void_p(packed.data_ptr()), pb, po, *(ctypes.c_long(v) for v in tail))
    return out


def linear_rows_threads(
    lib, x: torch.Tensor, packed: torch.Tensor, N: int, bias: torch.Tensor
) -> torch.Tensor:
    """ssm_step.c `linear_rows_threads`: `linear_rows`' tiles (x (B, K) float32 · Wt + bias (N,) float32 →
    (B, N) float32, Wt packed float32, bfloat16 or float16), the rows shared out over torch's thread count;
    each row's bits those of the row alone, whatever B and the thread count."""
    return _linear(lib, "linear_rows_threads", (), x, packed, N, bias, (torch.get_num_threads(),))


class _Weights:
    """A network's state dict read into C pointers: `take` records each tensor read (so a network
    with a tensor no C step reads is refused by name), and every tensor a pointer refers to is kept
    alive here (the linear layers' packed copies included; `panel`: the library's
    linear_panel_width())."""

    def __init__(self, net, panel: int) -> None:
        self.panel = panel
        self.tensors = net.state_dict(keep_vars=True)
        self.read: set[str] = set()
        self.keep: list = []

    def take(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return self.tensors[name]

    def ptr(self, t: torch.Tensor) -> int:
        t = t.detach()
        self.keep.append(t)
        return _ptrs(t)[0].value

    def param(self, name: str) -> int:
        """A float32 tensor in place; another float dtype as a float32 copy (exact for 16-bit weights)."""
        return self.ptr(self.take(name).detach().float())

    def transposed(self, name: str) -> int:
        """A linear layer's weight (out, in) as its (in, out) transpose packed (pack_linear), float32."""
        return self.transposed_as(name, WEIGHT_FORMATS[torch.float32])

    def transposed_as(self, name: str, fmt: int) -> int:
        """A linear layer's weight (out, in) as its (in, out) transpose packed (pack_linear): in the
        weights' own 16-bit dtype when `fmt` is a 16-bit WEIGHT_FORMATS code (the tensor must have that
        dtype), else float32."""
        return self.packed(self.take(name).t(), fmt, name)

    def packed(self, Wt: torch.Tensor, fmt: int, name: str) -> int:
        """Wt (K, N), a linear map x · Wt, packed (pack_linear) in format `fmt` (as `transposed_as`)."""
        t = Wt.detach()
        if fmt == WEIGHT_FORMATS[torch.float32]:
            t = t.float()
        elif WEIGHT_FORMATS.get(t.dtype) != fmt:
            raise ValueError(f"{name} is {t.dtype}, not weight format {fmt}")
        t = pack_linear(t, self.panel)
        self.keep.append(t)
        return t.data_ptr()

    def array(self, ctype, values: list) -> int:
        """A C array of `values` (ctype: ctypes.c_long, ctypes.c_void_p), kept alive here; its address."""
        arr = (ctype * max(len(values), 1))(*values)
        self.keep.append(arr)
        return ctypes.addressof(arr)

    def check_all_read(self, what: str) -> None:
        unread = sorted(set(self.tensors) - self.read)
        if unread:
            raise ValueError(f"{what} does not read {unread}")


def _norm(w: _Weights, prefix: str) -> tuple[int, int, int]:
    """The block norm whose tensors start with `prefix`, as the C NetLayer takes it: (kind, a, b) with
    kind 0 a LayerNorm and (a, b) its (weight, bias), H floats each; kind 1 the official scalar
    TransposedLN (model/norms.py) and (a, b) its (s, m), one float each. Raises ValueError for anything
    else (a LayerNorm without its bias or weight, a TransposedLN whose s or m is not one value)."""
    t = w.tensors
    weight, bias = t.get(prefix + "weight"), t.get(prefix + "bias")
    if weight is not None and bias is not None and weight.shape == bias.shape:
        return 0, w.param(prefix + "weight"), w.param(prefix + "bias")
    if all(prefix + n in t and t[prefix + n].numel() == 1 for n in ("s", "m")):
        return 1, w.param(prefix + "s"), w.param(prefix + "m")
    raise ValueError(f"{prefix}: neither a LayerNorm with weight and bias nor a scalar TransposedLN")


def fill_layer(lay: NetLayer, form, w: _Weights, s4: str, ff_norm: str | None = None, ff: str | None = None,
               wfmt: int = 0):  # fmt: skip
    """One NetLayer: the S4 block whose tensors start with `s4` (norm, layer.D, layer.out; its kernel
    is in the converted `form`, whose fused pointers it takes) and, with `ff`, the FF block after it
    (its norm's tensors start with `ff_norm`, its linears' with `ff`: up, down). Norms are LayerNorms or
    scalar TransposedLNs, the same kind in both blocks (else ValueError). `wfmt`: the linear
    weights' storage (WEIGHT_FORMATS; the other tensors are read as float32)."""
    lay.wfmt = wfmt
    lay.form = 0 if form.form == "diagonal" else 1
    lay.rank = form.Pr.shape[0] if lay.form == 1 else 0
    lay.norm, lay.ln_w, lay.ln_b = _norm(w, s4 + "norm.")
    lay.d_skip = w.param(s4 + "layer.D")
    lay.out_wt, lay.out_b = w.transposed_as(s4 + "layer.out.weight", wfmt), w.param(s4 + "layer.out.bias")
    w.read.update(n for n in w.tensors if n.startswith(s4 + "layer.kernel."))  # in the layer form
    for j, p in enumerate(form._fused_ptrs):
        lay.p[j] = p.value
    if ff is not None:  # norm, up (H, d_ff) and down (d_ff, H), transposed
        lay.d_ff = w.tensors[ff + "up.weight"].shape[0]
        ff_kind, lay.ff_ln_w, lay.ff_ln_b = _norm(w, ff_norm)
        if ff_kind != lay.norm:
            raise ValueError(f"{s4}: the S4 and FF blocks' norms differ")
        lay.up_t, lay.up_b = w.transposed_as(ff + "up.weight", wfmt), w.param(ff + "up.bias")
        lay.down_t, lay.down_b = w.transposed_as(ff + "down.weight", wfmt), w.param(ff + "down.bias")


def _adaptive(w: _Weights, net, wfmt: int) -> CAdaptive:
    """`net`'s adaptive input embedding and softmax (model/adaptive.py) as ssm_step.c's struct Adaptive: the
    embedding's tables read as float32 (in place; a copy for 16-bit weights), its projections and the
    softmax's projections, output weights and cluster entries packed in the blocks' weight format `wfmt`
    (copies: the WikiText-103 recipe's softmax, 36.9 M weights, takes 148 MB more in float32); every tensor
    marked read, tied ones (`tie_weights`, `tie_projs`) as the embedding's."""
    emb, head, V = net.embed, net.head, net.config.vocab_size
    c = CAdaptive()
    n_in = len(emb.bounds)
    c.n_in = n_in
    c.in_lo = w.array(ctypes.c_long, [lo for lo, _ in emb.bounds] + [V])
    c.in_d = w.array(ctypes.c_long, [t.weight.shape[1] for t in emb.layers])
    c.table = w.array(ctypes.c_void_p, [w.param(f"embed.layers.{i}.weight") for i in range(n_in)])
    projs = [w.transposed_as(f"embed.projs.{i}", wfmt) if len(emb.projs) else None for i in range(n_in)]
    c.in_proj = w.array(ctypes.c_void_p, projs)
    c.scale = net.config.embed_scale
    n = len(head.bounds)
    c.n = n
    c.lo = w.array(ctypes.c_long, [lo for lo, _ in head.bounds] + [V])
    c.d = w.array(ctypes.c_long, [head.shard(i)[0].shape[1] for i in range(n)])
    outs, projs = [], []
    for i in range(n):
        weight, proj = head.shard(i)
        if not head.tie_weights:
            name = f"head.weights.{i}"
        else:
            name = f"embed.layers.{i if head.div_val > 1 else 0}.weight"
        w.read.add(name)
        outs.append(w.packed(weight.t(), wfmt, name))  # W_iᵀ (d_i, n_i): the shard's logits h · W_iᵀ + b_i
        if proj is not None:  # hidden · P_i, P_i (H, d_i)
            name = f"embed.projs.{i}" if head.tie_projs[i] else f"head.projs.{i}"
            w.read.add(name)
            proj = w.packed(proj, wfmt, name)
        projs.append(proj)
    c.w, c.proj = w.array(ctypes.c_void_p, outs), w.array(ctypes.c_void_p, projs)
    c.b = w.array(ctypes.c_void_p, [w.param(f"head.biases.{i}") for i in range(n)])
    c.cb = w.param("head.cluster_bias")
    c.cw = w.transposed_as("head.cluster_weight", wfmt) if n > 1 else None
    w.read.add("head.cluster_weight")
    c.wfmt = wfmt
    return c


def _weight_format(net: torch.nn.Module, what: str) -> int:
    """The C code's format code of `net`'s weights (WEIGHT_FORMATS); ValueError naming `what` unless all
    of them share one dtype it reads."""
    dtypes = {p.dtype for p in net.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in WEIGHT_FORMATS:
        names = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_FORMATS)
        got = sorted(map(str, dtypes))
        raise ValueError(f"{what} takes {names} weights of one dtype, got {got}")
    return WEIGHT_FORMATS[dtypes.pop()]


class NetStep:
    """The whole network's recurrent step in one C call (`net_step`): embedding, every block
    (norm, SSM step, GELU(y + D u), GLU output mixing, residual; then the FF block when d_ff > 0:
    norm, up, exact GELU, down, residual), final norm and head
    (with its bias when the model has one). Norms: LayerNorms, or with norm "tln" the official scalar
    TransposedLN (blocks and final norm: official `transposed: true` imports). The embedding table is
    read pre-multiplied by embed_scale (the same float32 products as the torch forward). A model with
    `cutoffs` (the official WikiText-103 recipe's adaptive input and softmax, model/adaptive.py) has them
    computed here too (ssm_step.c struct Adaptive): its logits are the softmax's log-probabilities, each
    row's computed alone (the same bits whatever the batch around it or the threads), within float32
    rounding of the torch module's.

    Weights in float32, bfloat16 or float16: the blocks' linear weights are read in their own dtype and
    widened exactly to float32 in registers (half the bytes per step for a 16-bit model); every other
    tensor (embedding, head, norms, biases, D) as an exact float32 copy. The arithmetic is float32 in
    every case: a 16-bit model's activations are never rounded to 16 bits, unlike its torch ops (which
    round every op's output), so its logits are those of float64 arithmetic on the same 16-bit weights
    to float32 rounding.

    Built from a SequenceModel whose layers all have fused step pointers; the weights are read in
    place, the two linear layers' from transposed copies made here (the tensors must stay alive and
    unchanged: the RecurrentModel's frozen copy holds them). Raises ValueError for a model it would not
    compute exactly: a config field outside `CONFIG_FIELDS` that differs from its default, or any
    tensor of the state dict it does not read (a new bias...), so nothing can be
    silently dropped; the caller then keeps the torch ops."""

    # config fields whose every value this step computes exactly (kernel-only fields reach it through
    # the converted layer forms; dropout is inactive in the frozen eval copy; the audio codec's fields,
    # mulaw and quantization, say what the tokens mean, not how the network computes)
    CONFIG_FIELDS = frozenset({
        "vocab_size", "d_model", "n_layers", "d_state", "kernel", "init", "rank", "disc", "l_max",
        "dropout", "dt_min", "dt_max", "tie_embeddings", "cauchy_backend", "modality", "sample_rate",
        "head_bias", "embed_scale", "re_lambda_max", "dt_tied", "l_kernel", "d_ff", "norm", "mulaw",
        "quantization",
    })  # fmt: skip

    # the adaptive input embedding and softmax (model/adaptive.py: ssm_step.c's struct Adaptive)
    ADAPTIVE_FIELDS = frozenset({"cutoffs", "div_val", "tie_projs"})

    def __init__(self, lib, net, forms) -> None:
        cfg = net.config
        defaults = type(cfg)()
        allowed = self.CONFIG_FIELDS | self.ADAPTIVE_FIELDS
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if f.name not in allowed and value != getattr(defaults, f.name):
                raise ValueError(f"the whole-network step does not implement {f.name}={value!r}")
        self.lib, self.H, self.V = lib, cfg.d_model, cfg.vocab_size
        self.M = max(f.M for f in forms)  # the state's modes (layers with fewer run zero-padded)
        if len(forms) != len(net.blocks):
            raise ValueError(f"{len(forms)} layer forms for {len(net.blocks)} blocks")
        eps = {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}  # none: TransposedLNs only
        if len(eps) > 1:
            raise ValueError("every LayerNorm must share one eps")
        self.eps = ctypes.c_float(eps.pop() if eps else 0.0)
        wfmt = _weight_format(net, "the whole-network step")
        w = self._weights = _Weights(net, lib.linear_panel_width())  # keeps every tensor a pointer refers to
        self.layers = (NetLayer * len(forms))()
        for i, form in enumerate(forms):
            pre = f"blocks.{i}."
            ff = pre + "ff." if pre + "ff.up.weight" in w.tensors else None
            fill_layer(self.layers[i], form, w, pre, pre + "ff_norm.", ff, wfmt)
        lnf_kind, lnf_w, lnf_b = _norm(w, "norm.")  # the final norm: LayerNorm, or TransposedLN (norm "tln")
        self.lnf_kind = ctypes.c_long(lnf_kind)
        self.lnf_w, self.lnf_b = ctypes.c_void_p(lnf_w), ctypes.c_void_p(lnf_b)
        self.adaptive = None  # ssm_step.c's struct Adaptive (CAdaptive), for a model with cutoffs
        if cfg.cutoffs is not None:  # the adaptive input and softmax (no table, no plain head: NULL)
            self.adaptive = _adaptive(w, net, wfmt)
            self.embed = self.head = self.head_b = ctypes.c_void_p(None)
        else:
            embed = w.take("embed.weight").detach().float() * cfg.embed_scale
            self.embed = ctypes.c_void_p(w.ptr(embed))
            self.head = ctypes.c_void_p(w.transposed("head.weight"))
            self.head_b = ctypes.c_void_p(w.param("head.bias") if "head.bias" in w.tensors else None)
        w.check_all_read("the whole-network step")
        self.n_layers = len(forms)

    def splits(self, B: int) -> bool:
        """Whether a step of B rows in the calling thread runs split over the OpenMP threads by channels
        and columns (ssm_step.c `net_rows_split`: at most 7 rows, at least 2 threads in
        `torch.get_num_threads()`, a network of ≥ `step_split_min_weights` linear weights, the contention
        guard not pausing: `step_split_state`); its logits and state are bit for bit those of the single
        thread. `splits(1)` also says whether `prefill` of one row of several tokens runs split."""
        dims = [ctypes.c_long(v) for v in (B, self.H, self.V, self.n_layers)]
        return bool(self.lib.split_step(*dims, self.layers))

    def _weight_args(self) -> tuple:
        lnf = (self.lnf_kind, self.lnf_w, self.lnf_b)
        ad = ctypes.c_void_p(None if self.adaptive is None else ctypes.addressof(self.adaptive))
        return (self.embed, self.layers, *lnf, self.head, self.head_b, ad, self.eps)

    def _run(
        self, what: str, fn, dims: tuple[int, ...], tokens: torch.Tensor, *buffers: torch.Tensor | None
    ) -> None:
        """fn(dims…, tokens, the weights…, buffers…) for `net_step` and `net_prefill`; ValueError naming
        `what` on a nonzero code."""
        head = [ctypes.c_long(v) for v in dims] + [ctypes.c_void_p(tokens.data_ptr())]
        args = head + list(self._weight_args())
        rc = fn(*args, *(ctypes.c_void_p(None if t is None else t.data_ptr()) for t in buffers))
        if rc == TOKEN_RANGE:
            raise token_range_error(tokens, self.V)
        if rc != 0:
            raise ValueError(
                f"fused network {what} failed (code {rc}: > 1024 modes, rank > 4, or out of memory)"
            )

    def __call__(self, tokens: torch.Tensor, state: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """tokens (B,) int64, state and out (n_layers, B, H, 2, M) contiguous float32 (out may be
        state) → logits (B, V)."""
        tokens = tokens.contiguous().long()
        logits = torch.empty(tokens.shape[0], self.V)
        dims = (tokens.shape[0], self.H, self.V, self.n_layers, self.M)
        self._run("step", self.lib.net_step, dims, tokens, state, out, logits)
        return logits

    def prefill(self, tokens: torch.Tensor, state: torch.Tensor, logits: str = "all") -> torch.Tensor | None:
        """tokens (B, L) int64, state (n_layers, B, H, 2, M) contiguous float32, updated in place → logits
        float32 (B, L, V) of every position ("all"), (B, min(L, 1), V) of the last ("last"), or None
        ("none": the final norm and head are skipped): ssm_step.c `net_prefill`, the prompt layer by layer
        (the linear layers over all B·L positions at once), bit-identical to L calls of this step: rows
        split between the OpenMP threads, one row (B = 1) split over them by channels and columns where
        `splits(1)` says a step of one row would be (the same weight threshold and contention guard).
        Raises ValueError when the C code fails (over its mode or rank limits, out of memory)."""
        B, L = tokens.shape
        tokens = tokens.contiguous().long()
        head = {"all": 0, "last": 1, "none": 2}[logits]
        out = None if head == 2 else torch.empty(B, L if head == 0 else min(L, 1), self.V)
        if B * L:
            dims = (B, L, self.H, self.V, self.n_layers, self.M, head)
            self._run("prefill", self.lib.net_prefill, dims, tokens, state, out)
        return out

    def adaptive_logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """The adaptive softmax as this step computes it (a model with `cutoffs`): final-normed hidden states
        (P, H) float32 → log-probabilities (P, V) float32, each row's alone (tests, bench.wt103)."""
        h = hidden.float().contiguous()
        if self.adaptive is None or h.dim() != 2 or h.shape[1] != self.H:
            raise ValueError(f"adaptive_logprobs takes (P, {self.H}) hidden states of a model with cutoffs")
        out = torch.empty(h.shape[0], self.V)
        dims = [ctypes.c_long(v) for v in (h.shape[0], self.H, self.V)]
        rc = self.lib.adaptive_logprobs(ctypes.byref(self.adaptive), *dims, *_ptrs(h, out))
        if rc != 0:
            raise ValueError(f"adaptive_logprobs failed (code {rc}: out of memory)")
        return out

    def adaptive_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The adaptive input embedding as this step computes it, embed_scale applied: ids (P,) → (P, H)
        float32 (tests). Raises ValueError for an id outside the vocabulary."""
        ids = tokens.contiguous().long()
        if self.adaptive is None or ids.dim() != 1:
            raise ValueError("adaptive_embeddings takes (P,) ids of a model with cutoffs")
        out = torch.empty(ids.shape[0], self.H)
        dims = [ctypes.c_long(v) for v in (ids.shape[0], self.H)]
        rc = self.lib.adaptive_embeddings(ctypes.byref(self.adaptive), *dims, ctypes.c_void_p(ids.data_ptr()),
                                          *_ptrs(out))  # fmt: skip
        if rc == TOKEN_RANGE:
            raise token_range_error(ids, self.V)
        if rc != 0:
            raise ValueError(f"adaptive_embeddings failed (code {rc}: out of memory)")
        return out

    def block(self, K: int, state: torch.Tensor, tok: torch.Tensor, **rows) -> BlockResult:
        """Up to K decode steps of the whole batch in one C call (ssm_step.c `net_block`): step →
        sampling (the C sampler of model/sampling.py `sample`) with each row's counter-based stream →
        stop checks, per row, until the row has made limit[r] tokens or a stop sequence (over the
        tokens' low bytes) ends. state (n_layers, B, H, 2, M) float32 contiguous, updated in place;
        the other arguments: `decode_block`. Raises ValueError on bad shapes or when the C step fails."""

        def invoke(tail):  # (after decode_block's checks: K among them)
            head = [ctypes.c_long(v) for v in (K, tok.shape[0], self.H, self.V, self.n_layers, self.M)]
            return self.lib.net_block(*head, *self._weight_args(), *tail)

        return decode_block(invoke, K, self.V, state, 1, tok, **rows)


class CNetStack(ctypes.Structure):
    """ssm_step.c: NetStack (a level's blocks)."""

    _fields_ = [
        ("n", ctypes.c_long),
        ("layers", ctypes.c_void_p),
        ("off", ctypes.c_void_p),
        ("modes", ctypes.c_void_p),
    ]


class CLevel(ctypes.Structure):
    """ssm_step.c: SLevel (one SaShiMi level, or the center)."""

    _fields_ = [
        ("H", ctypes.c_long),
        ("s", ctypes.c_long),
        ("Hn", ctypes.c_long),
        ("F", ctypes.c_long),
        ("every", ctypes.c_long),
        ("dbuf", ctypes.c_long),
        ("ubuf", ctypes.c_long),
        ("blocks", CNetStack),
        ("down_t", ctypes.c_void_p),
        ("down_b", ctypes.c_void_p),
        ("up_t", ctypes.c_void_p),
        ("up_b", ctypes.c_void_p),
        ("unet", ctypes.c_long),
        ("down", CNetStack),
        ("wfmt", ctypes.c_long),  # the pool linears' weight format (WEIGHT_FORMATS)
    ]


class CSaShiMi(ctypes.Structure):
    """ssm_step.c: SNet (the whole SaShiMi network)."""

    _fields_ = [
        ("K", ctypes.c_long),
        ("V", ctypes.c_long),
        ("numel", ctypes.c_long),
        ("period", ctypes.c_long),
        ("levels", ctypes.c_void_p),
        ("embed", ctypes.c_void_p),
        ("lnf_w", ctypes.c_void_p),
        ("lnf_b", ctypes.c_void_p),
        ("head_t", ctypes.c_void_p),
        ("head_b", ctypes.c_void_p),
        ("eps", ctypes.c_float),
    ]


class SaShiMiStep:
    """SaShiMi's whole recurrent step in one C call (ssm_step.c `sashimi_step`): embedding; per level (with
    unet = true first its down blocks, each output kept as a U-Net skip) the DownPool buffer, on the
    level's last phase the DownPool linear, the coarser levels and the UpPool linear; the skip, the
    level's (S4, FF) blocks (as NetStep's: norm, SSM step, GELU(y + D u), GLU, residual; norm, up, GELU,
    down, residual) and the level's residual (unet: a down output added after each up block instead);
    final LayerNorm and head. The same arithmetic as SaShiMiRecurrent.step's torch ops (sums in another
    order: logits agree to float32 rounding), one row at a time, rows at any phases.

    Weights in float32, bfloat16 or float16, as NetStep's: the blocks' and the pools' linear weights are
    read in their own dtype and widened exactly to float32 in registers; the embedding, head, norms,
    biases and D as exact float32 copies; the arithmetic is float32 whatever the weights' dtype.

    Built from a SaShiMiRecurrent whose S4 layer forms hold fused pointers (`pad_fused_params`); the
    weights are read in place, the linear layers' from transposed copies made here. Block norms are
    LayerNorms or the official scalar TransposedLN (norm = "tln": imported official SaShiMi checkpoints).
    Raises ValueError for a network it would not compute exactly (LayerNorms with different eps, a DPLR
    layer beyond the C limits, U-Net down and up blocks of different structure, or any state-dict tensor
    it does not read), so the caller keeps the torch ops."""

    def __init__(self, lib, rec) -> None:
        net, cfg, layout = rec.net, rec.config, rec.layout
        for form in rec.forms.values():
            if form.form == "dplr" and (form.M > MAX_MODES or form.Pr.shape[0] > MAX_RANK):
                raise ValueError("a DPLR layer beyond the C step's limits (1024 modes, rank 4)")
        eps = {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)}
        if len(eps) != 1:
            raise ValueError("every LayerNorm must share one eps")
        wfmt = _weight_format(net, "the SaShiMi C step")
        self.lib, self.V, self.numel = lib, cfg.vocab_size, layout.numel
        w = self._weights = _Weights(net, lib.linear_panel_width())  # keeps what a pointer refers to

        def stack(prefix: str, blocks) -> tuple[CNetStack, int]:
            """A level's blocks as NetLayers: its (S4, FF) pairs (model.arch.sashimi.level_blocks), the FF
            block as the NetLayer's d_ff part; or its S4 blocks alone when ff = 0."""
            per = 2 if cfg.ff else 1
            pairs = [
                (f"{prefix}.{i}", f"{prefix}.{i + 1}" if cfg.ff else None) for i in range(0, len(blocks), per)
            ]
            if not all(f"{name}.layer.D" in w.tensors for name, _ in pairs):
                raise ValueError(f"{prefix}: blocks are not (S4, FF) pairs, nor S4 blocks alone")
            layers = (NetLayer * len(pairs))()
            off = (ctypes.c_long * len(pairs))()
            modes = (ctypes.c_long * len(pairs))()
            for j, (name, ff) in enumerate(pairs):
                form = rec.forms[name]
                fill_layer(layers[j], form, w, name + ".", ff and ff + ".norm.", ff and ff + ".ff.", wfmt)
                off[j], modes[j] = layout.slots[f"{name}.x"].offset, form.M
            widest = max((lay.d_ff for lay in layers), default=0)
            w.keep += [layers, off, modes]
            return CNetStack(
                len(pairs), ctypes.addressof(layers), ctypes.addressof(off), ctypes.addressof(modes)
            ), widest

        K = len(rec.pool)
        levels = (CLevel * (K + 1))()
        every = 1
        for k in range(K + 1):
            lv, H = levels[k], net.widths[k]
            prefix, blocks = ("center", net.center) if k == K else (f"up.{k}.blocks", net.up[k].blocks)
            lv.blocks, lv.F = stack(prefix, blocks)
            lv.H, lv.every = H, every
            if k < K and cfg.unet:  # up block j adds the output of down block n − 1 − j: the same structure
                down = net.down[k].blocks
                if [type(b) for b in down] != [type(b) for b in blocks]:
                    raise ValueError(f"U-Net level {k}: down and up blocks differ in structure")
                lv.unet = 1
                lv.down, F_down = stack(f"down.{k}.blocks", down)
                lv.F = max(lv.F, F_down)
            if k < K:
                lv.s, lv.Hn, lv.wfmt = rec.pool[k], net.widths[k + 1], wfmt
                lv.dbuf, lv.ubuf = (
                    layout.slots[f"down.{k}.buffer"].offset,
                    layout.slots[f"up.{k}.buffer"].offset,
                )
                lv.down_t, lv.down_b = (
                    w.transposed_as(f"down.{k}.pool.linear.weight", wfmt),
                    w.param(f"down.{k}.pool.linear.bias"),
                )
                lv.up_t, lv.up_b = (
                    w.transposed_as(f"up.{k}.pool.linear.weight", wfmt),
                    w.param(f"up.{k}.pool.linear.bias"),
                )
                every *= rec.pool[k]
        w.keep.append(levels)
        c = self.c = CSaShiMi()
        c.K, c.V, c.numel, c.period, c.levels = K, self.V, self.numel, rec.period, ctypes.addressof(levels)
        c.embed = w.ptr(w.take("embed.weight").detach().float() * cfg.embed_scale)
        c.lnf_w, c.lnf_b, c.head_t = w.param("norm.weight"), w.param("norm.bias"), w.transposed("head.weight")
        c.head_b = w.param("head.bias") if "head.bias" in w.tensors else None
        c.eps = eps.pop()
        w.check_all_read("the SaShiMi C step")

    def __call__(self, tokens: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """tokens (B,) int64, state (B, numel) float32 contiguous with valid phases (the caller checks),
        updated in place → logits (B, V)."""
        tokens = tokens.contiguous().long()
        logits = torch.empty(tokens.shape[0], self.V)
        rc = self.lib.sashimi_step(
            ctypes.byref(self.c), ctypes.c_long(tokens.shape[0]), ctypes.c_void_p(tokens.data_ptr()),
            ctypes.c_void_p(state.data_ptr()), ctypes.c_void_p(logits.data_ptr()),
        )  # fmt: skip
        if rc == TOKEN_RANGE:
            raise token_range_error(tokens, self.V)
        if rc != 0:
            raise ValueError(f"SaShiMi C step failed (code {rc}: out of memory)")
        return logits

    def block(self, K: int, state: torch.Tensor, tok: torch.Tensor, **rows) -> BlockResult:
        """Up to K decode steps in one C call (ssm_step.c `sashimi_block`); state (B, numel) float32
        contiguous, updated in place; the other arguments: `decode_block`."""

        def invoke(tail):  # (after decode_block's checks: K among them)
            return self.lib.sashimi_block(ctypes.byref(self.c), ctypes.c_long(K), ctypes.c_long(tok.shape[0]),
                                          *tail)  # fmt: skip

        return decode_block(invoke, K, self.V, state, 0, tok, **rows)


def step_split_min_weights(lib, value: int | None = None) -> int:
    """The whole-network step's split threshold (`NetStep.splits`): a step of a few rows runs split over
    the threads when the network's linear layers hold at least this many weights (default 2^18: smaller
    networks step in a few µs, less than the barriers cost). Sets it to `value` (≥ 0; 0: always split)
    when given; returns the value it had. Process-wide (the tests and `bench.split --quick` set it)."""
    if value is not None and value < 0:
        raise ValueError(f"step_split_min_weights: value must be >= 0, got {value}")
    return int(lib.step_split_min_weights(ctypes.c_long(-1 if value is None else value)))


def step_split_state(
    lib, delay_s: float | None = None, stall_s: float | None = None
) -> tuple[float, float, float]:
    """The split step's contention guard (ssm_step.c `split_record`): (the last pause, the time left before
    steps of a few rows split again (≤ 0: they split), the stall threshold before this call), in seconds.
    With `delay_s`, the next split step's last thread sleeps that long before its second barrier, as a
    descheduled thread would; with `stall_s`, a barrier wait over it is a stall (default 2e-4; the tests
    raise it to keep steps split on an oversubscribed machine). Process-wide. Raises ValueError for a
    negative, non-finite or out-of-range (over 9e9 s: past a C long of nanoseconds) delay_s or stall_s."""
    for name, v in (("delay_s", delay_s), ("stall_s", stall_s)):
        if v is not None and not 0 <= v <= 9e9:  # (NaN fails too)
            raise ValueError(f"step_split_state: {name} must be in [0, 9e9] seconds, got {v}")
    out = (ctypes.c_long * 3)()
    delay = -1 if delay_s is None else round(delay_s * 1e9)
    stall = -1 if stall_s is None else round(stall_s * 1e9)
    lib.step_split_state(ctypes.c_long(delay), ctypes.c_long(stall), out)
    return out[0] / 1e9, out[1] / 1e9, out[2] / 1e9


def decode_block_state(lib, delay_s: float | None = None, share: bool | None = None) -> tuple[int, bool]:
    """The threaded decode block's work sharing (ssm_step.c `decode_shared`): (the group rounds run by a
    thread other than the one whose share of the rows they are, since the library was loaded; whether the
    threads share the groups, before this call). With `share`, sharing is turned on (the default) or off
    (each thread keeps its fixed share of the rows: the order before, for bench.split's side-by-side
    runs); with `delay_s`, the first thread to start the next threaded block sleeps that long in its first
    round, holding its group, as a descheduled thread would (the tests). Process-wide. Raises ValueError
    for a delay_s outside [0, 9e9] seconds."""
    if delay_s is not None and not 0 <= delay_s <= 9e9:  # (NaN fails too)
        raise ValueError(f"decode_block_state: delay_s must be in [0, 9e9] seconds, got {delay_s}")
    out = (ctypes.c_long * 2)()
    delay = -1 if delay_s is None else round(delay_s * 1e9)
    lib.decode_block_state(ctypes.c_long(delay), ctypes.c_long(-1 if share is None else int(share)), out)
    return int(out[0]), bool(out[1])


MAX_BLOCK_STEPS = 1 << 16  # a decode block's K at most (its token buffer: K × rows int64)


def check_block_args(K, limit: torch.Tensor) -> None:
    """A decode block's K, an integer in [1, MAX_BLOCK_STEPS], and its rows' limits, each ≥ 0 (K = -1
    was a RuntimeError, 2**40 a terabyte allocation, 2.5 a TypeError, and a negative limit was read as 0:
    a helper's audit). Raises ValueError naming them."""
    if type(K) is not int or not 1 <= K <= MAX_BLOCK_STEPS:
        raise ValueError(f"decode block: K must be an integer in [1, {MAX_BLOCK_STEPS}], got {K!r}")
    if isinstance(limit, torch.Tensor) and limit.numel() and int(limit.min()) < 0:  # (else: decode_block's
        # own shape check names it)
        raise ValueError(f"decode block: each row's limit must be ≥ 0, got {int(limit.min())}")


def decode_block(
    invoke,
    K: int,
    V: int,
    state: torch.Tensor,
    batch_dim: int,
    tok: torch.Tensor,
    *,
    settings: RowSettings,
    counts: torch.Tensor | None,
    key: torch.Tensor,
    counter: torch.Tensor,
    limit: torch.Tensor,
    stops: list[list[bytes]],
    history: list[bytes],
    seen: torch.Tensor,
    interrupt: ctypes.c_int | None = None,
    schedule: tuple[int, int] | None = None,
    logprobs: torch.Tensor | None = None,
) -> BlockResult:
    """Check and marshal the per-row arguments of a native decode block (ssm_step.c `decode_block`), call
    `invoke(tail)` with the C arguments after the network's own (state, tok, the sampling settings, ...,
    interrupt), and collect the result.

    Every tensor is on the CPU. state: float32 contiguous, B rows along `batch_dim`, updated in place; tok
    (B,) int64 contiguous, the pending tokens, updated in place to each row's last token; settings: the
    rows' sampling settings (model.sampling.row_settings); counts (B, V) float32 contiguous or None
    (needed when settings.counted), incremented in place for every sampled token; key and counter (B,)
    int64 holding uint64 bit patterns (the stream's key and its next index; counter is advanced in place);
    limit (B,) int64 ≥ 0; stops: per row, its stop sequences (bytes); history: per row, its output bytes
    so far (only the last longest-stop − 1 are read); seen (B, V) bool, set in place for every sampled
    token; interrupt: a flag that, once set to nonzero by another thread, ends each group of rows after its
    current round of steps (each group makes at least one round; rows may then have made different numbers
    of tokens); schedule: (group_rows, group_steps), the order in which the rows are stepped (ssm_step.c
    `decode_block`: groups of group_rows rows of a thread's share, each through rounds of group_steps steps,
    the groups shared by the threads; it changes no row's tokens or state), default `BLOCK_SCHEDULE`;
    logprobs: (B,) int64, per row −1 (none) or k ≥ 0: the log-probability of each sampled token and of
    the k most likely (`BlockResult.logprobs`, from the raw logits the sampler was given; the normalizer
    summed in double: `model.sampling.token_logprobs` on the CPU runs this computation, the same bits; torch's
    ops agree within float32 rounding), None: for no row.
    Raises ValueError on bad shapes, a K or a limit out of range (`check_block_args`), or when the C step
    fails."""
    B = tok.shape[0]
    if (
        state.shape[batch_dim] != B
        or not state.is_contiguous()
        or state.dtype != torch.float32
        or seen.shape != (B, V)
        or seen.dtype != torch.bool
    ):
        raise ValueError("decode block: state, tok and seen must describe the same rows")
    for t in (tok, key, counter, limit):  # (the sampling settings' tensors: settings.check below)
        if t.shape != (B,) or t.dtype != torch.long or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"decode block: expected ({B},) {torch.long} contiguous CPU tensors")
    check_block_args(K, limit)
    if not seen.is_contiguous():
        raise ValueError("decode block: seen must be contiguous")
    for name, t in (("state", state), ("seen", seen)):  # (the C block writes through their pointers)
        if t.device.type != "cpu":
            raise ValueError(f"decode block: {name} must be on the CPU, got {t.device}")
    settings.check(B, V)
    if len(stops) != B or len(history) != B:
        raise ValueError(f"decode block: stops and history need one entry per row ({B}), got "
                         f"{len(stops)} and {len(history)}")  # fmt: skip
    bad_counts = counts is None or counts.shape != (B, V) or counts.dtype != torch.float32
    if settings.counted and (bad_counts or not counts.is_contiguous() or counts.device.type != "cpu"):
        raise ValueError(f"decode block: counts must be ({B}, {V}) float32 contiguous on the CPU")
    longest = max((len(s) for row in stops for s in row), default=0)
    keep = max(longest - 1, 0)
    first, offsets, data = [0], [0], bytearray()
    for row in stops:
        for s in row:
            data += s
            offsets.append(len(data))
        first.append(len(offsets) - 1)
    cap = keep + K
    hist = torch.zeros(B, max(cap, 1), dtype=torch.uint8)
    hist_len = torch.zeros(B, dtype=torch.long)
    for r, h in enumerate(history):
        tail = h[max(0, len(h) - keep) :]  # (all of a shorter history: a negative start kept its end only)
        if tail:
            hist[r, : len(tail)] = torch.frombuffer(bytearray(tail), dtype=torch.uint8)
        hist_len[r] = len(tail)
    first_t = torch.tensor(first, dtype=torch.long)
    off_t = torch.tensor(offsets, dtype=torch.long)
    data_t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(1, dtype=torch.uint8)
    out_tok = torch.zeros(K, B, dtype=torch.long)
    n_out, stopped = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    times = torch.zeros(K, dtype=torch.float64)
    lp_k, lp = logprob_buffers(logprobs, K, B, V)

    def p(t):
        return ctypes.c_void_p(None if t is None else t.data_ptr())

    rows = [p(state), p(tok), *settings.pointers(seen, counts)]
    rows += [p(t) for t in (key, counter, limit, first_t, off_t, data_t, hist)]
    outs = [p(t) for t in (hist_len, seen, out_tok, n_out, stopped, times)]
    outs += [p(lp_k), ctypes.c_long(0 if lp is None else lp[1].shape[2]), *map(p, lp or (None,) * 3)]
    flag = ctypes.c_void_p(None if interrupt is None else ctypes.addressof(interrupt))
    group_rows, group_steps = BLOCK_SCHEDULE if schedule is None else schedule
    if group_rows < 0 or group_steps < 1:
        raise ValueError(f"decode block: schedule {schedule} needs group_rows >= 0 and group_steps >= 1")
    order = [ctypes.c_long(group_rows), ctypes.c_long(group_steps)]
    steps = invoke([*rows, ctypes.c_long(hist.shape[1]), *outs, flag, *order])
    if steps == TOKEN_RANGE:  # a pending token of a row that steps
        raise token_range_error(torch.where(limit > 0, tok, 0), V)
    if steps < 0:
        raise ValueError(
            f"fused decode block failed (code {steps}: > 1024 modes, rank > 4, or out of memory)"
        )
    lp = None if lp is None else tuple(t[:steps] for t in lp)
    return BlockResult(int(steps), out_tok[:steps], n_out, stopped.bool(), times[:steps], logprobs=lp)


def logprob_request(logprobs: torch.Tensor | None, B: int) -> torch.Tensor | None:
    """A decode block's `logprobs` argument (the C block's and the CUDA graphs' alike) checked: (B,) int64
    on the CPU, each row −1 (none) or k ≥ 0. Returns it contiguous when a row asks, else None (None given,
    or every row −1). Raises ValueError naming logprobs otherwise."""
    if logprobs is None:
        return None
    if logprobs.shape != (B,) or logprobs.dtype != torch.long or logprobs.device.type != "cpu":
        raise ValueError(f"decode block: logprobs must be ({B},) int64 on the CPU")
    if bool((logprobs < -1).any()):
        raise ValueError("decode block: logprobs must be −1 (none) or a count ≥ 0")
    return logprobs.contiguous() if bool((logprobs >= 0).any()) else None


def logprob_buffers(logprobs: torch.Tensor | None, K: int, B: int, V: int):
    """A decode block's log-probability request → (the rows' k (B,) int64 contiguous, or None; the outputs
    (chosen (K, B) float32, ids (K, B, k) int64, values (K, B, k) float32) with k the largest asked (at
    most V), or None when no row asks). Raises ValueError as `logprob_request`."""
    logprobs = logprob_request(logprobs, B)
    if logprobs is None:
        return None, None
    kmax = min(int(logprobs.max()), V)
    out = (torch.zeros(K, B), torch.zeros(K, B, kmax, dtype=torch.long), torch.zeros(K, B, kmax))
    return logprobs, out


def philox_uniforms(lib, key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """u[i] = uniform number counter[i] of the Philox4x32-10 stream keyed by key[i] (see ssm_step.c):
    key and counter (n,) int64 contiguous CPU (uint64 bit patterns) → (n,) float32 in [0, 1). Raises
    ValueError for anything else (the C code reads n of each)."""
    n = key.shape[0] if key.dim() == 1 else -1
    for t in (key, counter):
        if t.shape != (n,) or t.dtype != torch.long or not t.is_contiguous() or t.device.type != "cpu":
            got = f"{tuple(key.shape)} {key.dtype} and {tuple(counter.shape)} {counter.dtype}"
            raise ValueError(f"philox_uniforms: key and counter must be (n,) int64 contiguous CPU, got {got}")
    u = torch.empty(n, dtype=torch.float32)
    lib.philox_uniforms(
        ctypes.c_long(n),
        ctypes.c_void_p(key.data_ptr()),
        ctypes.c_void_p(counter.data_ptr()),
        ctypes.c_void_p(u.data_ptr()),
    )
    return u


@dataclasses.dataclass
class RowSettings:
    """Per-row sampling settings for the C sampler (`sample_rows_full`, `net_block`), as the torch
    ops hold them: temperature (B,) float64; top_k (B,) int64 (0 or ≥ V: off); kind (B,) int64 (0:
    plain temperature, 1: the whole pipeline); top_p, min_p, repetition_penalty, presence_penalty,
    frequency_penalty (B,) float32; bias (B, V) float32 or None; penalized: whether `seen` takes part
    (some row's repetition penalty is not 1); counted: whether counts take part."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    kind: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    bias: torch.Tensor | None
    penalized: bool
    counted: bool

    def check(self, B: int, V: int) -> None:
        """Raise ValueError unless every per-row tensor is (B,) (bias (B, V)) of its dtype, contiguous,
        on the CPU: the C sampler reads B rows of each."""
        f32 = torch.float32
        want = {"temperature": torch.float64, "top_k": torch.long, "kind": torch.long, "top_p": f32,
                "min_p": f32, "repetition_penalty": f32, "presence_penalty": f32,
                "frequency_penalty": f32}  # fmt: skip
        for name, dtype in want.items():
            t = getattr(self, name)
            if t.shape != (B,) or t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"row settings: {name} must be ({B},) {dtype} contiguous on the CPU, got "
                                 f"{tuple(t.shape)} {t.dtype}")  # fmt: skip
        b = self.bias
        if b is not None and (b.shape != (B, V) or b.dtype != torch.float32 or not b.is_contiguous()
                              or b.device.type != "cpu"):  # fmt: skip
            raise ValueError(f"row settings: bias must be ({B}, {V}) float32 contiguous on the CPU")

    def pointers(self, seen: torch.Tensor | None, counts: torch.Tensor | None) -> list:
        def p(t):
            return ctypes.c_void_p(None if t is None else t.data_ptr())

        rows = (self.temperature, self.top_k, self.kind, self.top_p, self.min_p, self.repetition_penalty,
                self.presence_penalty, self.frequency_penalty)  # fmt: skip
        return [*(p(t) for t in rows), p(self.bias), p(seen if self.penalized else None),
                p(counts if self.counted else None)]  # fmt: skip


def sample_rows_full(lib, logits: torch.Tensor, settings: RowSettings, seen, counts, u) -> torch.Tensor:
    """The whole sampling pipeline in C (model/sampling.py's order and limits) per row: logits (B, V)
    float32, seen (B, V) bool or None, counts (B, V) float32 or None, u (B,) float32, all contiguous
    on the CPU → (B,) int64. Raises MemoryError when the C side cannot allocate its scratch."""
    B, V = logits.shape
    settings.check(B, V)
    lg, uu = _ptrs(logits, u)  # (checks them)
    if u.shape != (B,):
        raise ValueError(f"u must be ({B},), got {tuple(u.shape)}")
    for name, t, dtype, used in (("seen", seen, torch.bool, settings.penalized),
                                 ("counts", counts, torch.float32, settings.counted)):  # fmt: skip
        if used and (t is None or t.shape != (B, V) or t.dtype != dtype or not t.is_contiguous()
                     or t.device.type != "cpu"):  # fmt: skip
            raise ValueError(f"{name} must be ({B}, {V}) {dtype} contiguous on the CPU")
    out = torch.empty(B, dtype=torch.long)
    ptrs = settings.pointers(seen, counts)
    oo = ctypes.c_void_p(out.data_ptr())
    rc = lib.sample_rows_full(ctypes.c_long(B), ctypes.c_long(V), lg, *ptrs, uu, oo)
    if rc != 0:
        raise MemoryError("the C sampler could not allocate its scratch")
    return out


def logprobs_rows(lib, logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list, list]:
    """ssm_step.c `logprobs_rows`, the decode block's log-probabilities: logits (B, V) float32 contiguous
    CPU, tokens (B,) ids in [0, V), k ≥ 0 → host lists chosen (B,), top ids (B, min(k, V)) and values, most
    likely first (ties: the smaller id first). Raises ValueError for an id outside [0, V)."""
    B, V = logits.shape
    ids = tokens.to(torch.long).contiguous()
    if ids.shape != (B,) or (B and (int(ids.min()) < 0 or int(ids.max()) >= V)):
        raise ValueError(f"tokens must be ({B},) ids in [0, {V})")
    k = min(k, V)
    chosen, top_i, top_v = torch.empty(B), torch.empty(B, k, dtype=torch.long), torch.empty(B, k)
    lg, ch, tv = _ptrs(logits, chosen, top_v)
    dims = [ctypes.c_long(v) for v in (B, V)]
    lib.logprobs_rows(*dims, lg, ctypes.c_void_p(ids.data_ptr()), ctypes.c_long(k), ch,
                      ctypes.c_void_p(top_i.data_ptr()), tv)  # fmt: skip
    return chosen.tolist(), top_i.tolist(), top_v.tolist()


def sample_rows(lib, logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of softmax(logits / temperature) per row at uniforms u (argmax where the
    temperature is 0): logits (B, V) and u (B,) contiguous float32 CPU, temperature (B,) contiguous
    float64 CPU (finite, ≥ 0: SamplingParams checks it) → (B,) int64. Raises MemoryError when the C side
    cannot allocate its scratch (V floats)."""
    B, V = logits.shape
    lg, uu = _ptrs(logits, u)  # (checks them)
    if u.shape != (B,) or temperature.shape != (B,):
        shapes = f"{tuple(u.shape)}, {tuple(temperature.shape)}"
        raise ValueError(f"u and temperature must be ({B},), got {shapes}")
    if (
        temperature.dtype != torch.float64
        or not temperature.is_contiguous()
        or temperature.device.type != "cpu"
    ):
        raise ValueError(f"temperature must be contiguous float64 on the CPU, got {temperature.dtype}")
    out = torch.empty(B, dtype=torch.long)
    rc = lib.sample_rows(
        ctypes.c_long(B), ctypes.c_long(V), lg, ctypes.c_void_p(temperature.data_ptr()), uu,
        ctypes.c_void_p(out.data_ptr()),
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("the C sampler could not allocate its scratch")
    return out
