"""scripts/sanitize-c (`make sanitize`): the fused C library's tests under AddressSanitizer and UBSan. It must
catch a real out-of-bounds read in the library (not only run clean), and refuse bad arguments by name.
Needs gcc's libasan and libubsan (Debian's gcc brings them: libgcc-12-dev, as in CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "sanitize-c"

# A test file for the script: one call of the library as the project makes it, then one that reads a bias
# of 16 floats as 64 (through ctypes, past fused.py's shape check): the second must abort with ASan's report.
PROBE = """
import ctypes
import torch
from model import fused

def _call(bias):
    lib = fused.library()
    x, Wt = torch.randn(3, 32), torch.randn(32, 64)
    packed, out = fused.pack_linear(Wt, lib.linear_panel_width()), torch.empty(3, 64)
    dims = [ctypes.c_long(v) for v in (1, 0, 3, 32, 64)]
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (x, packed, bias, out)]
    lib.linear_rows(*dims, *ptrs)
    return float((out.double() - (x.double() @ Wt.double() + bias[:64].double())).abs().max())

def test_clean():
    assert _call(torch.randn(64)) < 1e-4

def test_overflow():
    _call(torch.randn(16))
"""


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    # this Python, and this checkout's model whatever the venv's install points at; not the suite's own
    # S4_CFLAGS (e.g. the other vector width's pass): they are not the subject
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    env.pop("S4_CFLAGS", None)
    cmd = [str(SCRIPT), *args]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_sanitize_c_reports_an_out_of_bounds_read_and_passes_a_clean_call(tmp_path):
    probe = tmp_path / "probe_test.py"
    probe.write_text(PROBE)
    clean = _run("--", f"{probe}::test_clean")
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    assert "1 passed" in clean.stdout and "sanitize-c: clean" in clean.stdout
    assert "-fsanitize=address,undefined" in clean.stdout  # the build it ran on
    caught = _run("--", f"{probe}::test_overflow")
    report = caught.stdout + caught.stderr
    assert caught.returncode == 1, report[-3000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, report[-3000:]
    assert "linear_rows" in report  # the report's stack: the library's entry point
    assert "sanitize-c: FAILED" in caught.stdout


def test_sanitize_c_refuses_bad_arguments_by_name():
    """A last `--width` or `--server` without its value was `shift 2` past the arguments, which shifts
    nothing: the loop read the same option forever (a busy loop; the run hit its timeout). An empty value
    (`--width ""`) went as no option at all."""
    refusals = ((["--width", "12"], "--width must be 8 or 16"), (["--server", "x"], "--server needs a port"),
                (["--bogus"], "usage: scripts/sanitize-c"), (["--width"], "--width must be 8 or 16"),
                (["--server"], "--server needs a port"), (["--width", ""], "--width must be 8 or 16"),
                (["--server", ""], "--server needs a port"),
                (["--width", "8", "--server"], "--server needs a port"))  # fmt: skip
    for args, named in refusals:
        run = _run(*args, timeout=60)
        assert run.returncode == 2 and named in run.stderr, (args, run.stderr)
