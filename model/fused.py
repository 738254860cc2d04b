"""Fused CPU step kernels (model/csrc/ssm_step.c), compiled at first use with the system C compiler
and called through ctypes (which releases the GIL). If no compiler works, `library()` returns None
and the recurrent model uses its torch ops instead (same arithmetic, more passes over memory).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "ssm_step.c"
_lib: dict[str, object] = {}


def build_folder() -> Path:
    """$S4_BUILD_CACHE, else <project>/.build_cache."""
    return Path(os.environ.get("S4_BUILD_CACHE", Path(__file__).resolve().parent.parent / ".build_cache"))


def _cpu_signature() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def library():
    """The loaded ctypes library, or None (after one warning) when it cannot be built."""
    if "lib" in _lib:
        return _lib["lib"]
    lib = None
    try:
        src = SOURCE.read_bytes()
        key = hashlib.sha256(src + _cpu_signature().encode()).hexdigest()[:16]
        out = build_folder() / f"ssm_step_{key}.so"
        if not out.exists():
            cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if cc is None:
                raise RuntimeError("no C compiler (cc/gcc) found")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            tmp.replace(out)  # atomic: concurrent builders never load a half-written file
        lib = ctypes.CDLL(str(out))
        for name in ("diag_step", "dplr_step"):
            getattr(lib, name).restype = ctypes.c_int if name == "dplr_step" else None
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"fused CPU step unavailable ({detail}); using torch ops", RuntimeWarning, stacklevel=2)
        lib = None
    _lib["lib"] = lib
    return lib


def _ptrs(*tensors: torch.Tensor):
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"fused step needs contiguous float32 CPU tensors, got {t.dtype} {t.device}")
    return [ctypes.c_void_p(t.data_ptr()) for t in tensors]


def pointers(*tensors: torch.Tensor) -> tuple:
    """ctypes pointers of contiguous float32 CPU tensors (keep the tensors alive while in use)."""
    return tuple(_ptrs(*tensors))


def diag_step(lib, x, xo, u, y, params: tuple) -> None:
    """params: pointers(mur, mui, br, bi, cr, ci)."""
    B, H, _, M = x.shape
    lib.diag_step(ctypes.c_long(B), ctypes.c_long(H), ctypes.c_long(M), *_ptrs(x, xo, u, y), *params)


def dplr_step(lib, x, xo, u, y, params: tuple, rank: int) -> None:
    """params: pointers(dBr, dBi, Dr, Di, Pr, Pi, Minv, Qr, Qi, cr, ci)."""
    B, H, _, M = x.shape
    dims = (ctypes.c_long(B), ctypes.c_long(H), ctypes.c_long(M), ctypes.c_long(rank))
    if lib.dplr_step(*dims, *_ptrs(x, xo, u, y), *params) != 0:
        raise ValueError(f"fused DPLR step supports at most 1024 modes and rank 4 (got {M}, {rank})")
