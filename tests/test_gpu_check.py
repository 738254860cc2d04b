"""The one GPU call (scripts/gpu-check: the CUDA tests, then `python -m bench.gpu`), checked without a GPU.

A GPU is lent for 15 minutes, one command, rarely: the call must end within 9 minutes (the machine's start
takes the rest) with its figures written, whatever part of it fails or runs long. Here gpu-check runs in a
copy of the scripts folder with stand-ins for python (a GPU machine's answers; pytest and bench.gpu return
at once) and for `timeout` (each limit recorded); bench.gpu's sections run with stand-in measurements."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.common
from bench import gpu

ROOT = Path(__file__).resolve().parent.parent
PYTHON_ON_A_GPU = """#!/usr/bin/env bash
# python on a GPU machine: CUDA is there, the device is named; pytest and bench.gpu return at once
# (SERVER_MISSING set: an image without the server's packages, as this workplace's device image)
echo "python $*" >> "$LOG"
case "$1" in
  -c) case "$2" in
        *cuda.is_available*) exit 0 ;;
        *"import server"*) [ -z "${SERVER_MISSING:-}" ] || exit 1; exec "$REAL_PYTHON" "$@" ;;
        *) exec "$REAL_PYTHON" "$@" ;;
      esac ;;
  -) cat > /dev/null; echo "gpu-check: a stand-in GPU"; exit 0 ;;
  -m) exit 0 ;;
esac
exit 0
"""
# `timeout -k 10 LIMIT CMD`: CMD runs (at once), and the clock that `date +%s` reads moves on LIMIT + 10 s, as
# if CMD had run out its limit and its 10 s of grace (the worst case gpu-check must fit in its total)
TIMEOUT = """#!/usr/bin/env bash
echo "timeout $*" >> "$LOG"
echo $(( $(cat "$CLOCK") + $3 + 10 )) > "$CLOCK"
shift 3
exec "$@"
"""
DATE = """#!/usr/bin/env bash
cat "$CLOCK"
"""


def run_gpu_check(tmp_path: Path, *args: str, **env: str) -> tuple[list[list[str]], int]:
    """scripts/gpu-check run from a copy of the scripts folder (its results land in tmp_path/bench), with
    the stand-ins; returns the `timeout` lines' words and the seconds the stand-in clock moved on (each part
    running out its limit)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts/gpu-check", tmp_path / "scripts/gpu-check")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python", PYTHON_ON_A_GPU), ("timeout", TIMEOUT), ("date", DATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    log, clock = tmp_path / "log", tmp_path / "clock"
    clock.write_text("1000\n")
    full_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
                "REAL_PYTHON": sys.executable, "LOG": str(log), "CLOCK": str(clock), "PYTHONPATH": str(ROOT),
                **env}  # fmt: skip
    r = subprocess.run([str(tmp_path / "scripts/gpu-check"), *args], cwd=tmp_path, env=full_env,
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line.split() for line in log.read_text().splitlines() if line.startswith("timeout ")]
    return lines, int(clock.read_text()) - 1000


def limits(lines: list[list[str]]) -> tuple[int, int, float]:
    """(the tests' limit, the benchmark's limit, bench.gpu's --budget) from the `timeout` lines."""
    tests = next(w for w in lines if "pytest" in w)
    bench = next(w for w in lines if "bench.gpu" in w)
    assert tests[1:3] == bench[1:3] == ["-k", "10"]
    budget = float(bench[bench.index("--budget") + 1]) if "--budget" in bench else float("inf")
    return int(tests[3]), int(bench[3]), budget


@pytest.mark.parametrize(("args", "env"), [((), {}), (("--quick",), {}), ((), {"TOTAL_S": "400"})])
def test_the_whole_call_ends_within_its_total_with_the_benchmarks_figures_written(tmp_path, args, env):
    """With the tests and the benchmark each running out its limit and `timeout -k 10`'s 10 s of grace,
    the call ends within TOTAL_S (default 540 s: 9 of the lease's 15 minutes); bench.gpu is told to start
    no measurement in its last 60 s (--budget), so it writes its figures before its limit. (It was 240 +
    10 + 300 + 10 = 560 s, past the 9 minutes, and bench.gpu's own 240 s budget whatever was left.)"""
    total = int(env.get("TOTAL_S", 540))
    lines, took = run_gpu_check(tmp_path, *args, **env)
    tests_s, bench_s, budget = limits(lines)
    assert took == tests_s + 10 + bench_s + 10 <= total, (tests_s, bench_s)
    assert budget == bench_s - 60 and bench_s <= (120 if args else 300)
    assert bench_s - 60 >= (30 if args else 120)  # the benchmark keeps time to measure
    assert tests_s == (min(240, total - 200) if not args else 240)


def test_the_wheels_installed_for_the_call_are_removed_after_it(tmp_path):
    """Where the image lacks the server's packages, gpu-check installs WHEELS into a temporary folder of
    its own (pip --target) for the call; that folder was never removed: every call left one behind, with
    the web stack in it. It is removed when the call ends."""
    wheels, scratch = tmp_path / "wheels", tmp_path / "scratch"
    wheels.mkdir()
    scratch.mkdir()
    (wheels / "fastapi-0.165.0-py3-none-any.whl").write_bytes(b"")
    run_gpu_check(tmp_path, "--quick", WHEELS=str(wheels), TMPDIR=str(scratch), SERVER_MISSING="1")
    installs = [line for line in (tmp_path / "log").read_text().splitlines() if "-m pip install" in line]
    assert len(installs) == 1 and f"--target {scratch}/" in installs[0], installs  # the call's own folder
    assert list(scratch.iterdir()) == []


def test_gpu_check_refuses_a_time_limit_that_is_not_a_whole_number_of_seconds(tmp_path):
    env = {**os.environ, "TOTAL_S": "9m"}
    r = subprocess.run([str(ROOT / "scripts/gpu-check")], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, env=env, check=False)  # fmt: skip
    assert r.returncode == 2 and "TOTAL_S must be a whole number of seconds" in r.stderr, r.stderr


def test_gpu_check_quick_without_cuda_exits_with_one_clear_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    r = subprocess.run([str(ROOT / "scripts/gpu-check"), "--quick"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)  # fmt: skip
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device"), lines


class Tiny:
    """What bench.gpu's audio section reads of a model (stand-in measurements need no more)."""

    device = torch.device("cpu")
    layers = ()
    state_bytes_per_sequence = 1000

    def use_cuda_graphs(self, buckets):
        return None

    def use_state_dtype(self, dtype):
        return {}

    def decode_block_ready(self, batch):
        return True


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """bench.gpu with its results in tmp_path, the audio model a stand-in, its rows instant."""
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu, "ERRORS", [])
    monkeypatch.setattr(gpu, "load_rec", lambda kind, device, dtype, tmp: (Tiny(), {"model": "stand-in"}))
    monkeypatch.setattr(gpu, "copy_bandwidth", lambda device, seconds: 1e12)
    monkeypatch.setattr(gpu, "plot", lambda data, quick: None)

    def row(rec, B, graphs, triton, engine_ok, seconds):
        if B == 8:
            raise RuntimeError("planted: CUDA error: an illegal memory access was encountered")
        return {"graphs": graphs, "triton": triton, "batch": B, "step_steps_per_s": 2e4, "step_rtf": 1.25}

    monkeypatch.setattr(gpu, "audio_row", row)
    return tmp_path


def test_a_failed_measurement_is_recorded_and_the_others_still_run(stand_ins, monkeypatch):
    """One batch size's measurement raising (batch 8 here) and the SaShiMi rows raising were the end of the
    whole audio section: its other rows, the bandwidth bound and the real-time counts were lost. Now each
    is recorded in the section's "errors" (and the exit status) and the rest is measured."""

    def sashimi_fails(*args, **kwargs):
        raise RuntimeError("planted: the SaShiMi's conversion failed")

    monkeypatch.setattr(gpu, "sashimi_rows", sashimi_fails)
    out = gpu.bench_audio(gpu.SIZES[True], "cpu", gpu.Budget(60), stand_ins)
    assert [r["batch"] for r in out["rows"]] == [1, 64, 512] * 2  # (float32, float16 states)
    assert sum("batch 8: RuntimeError: planted" in e for e in out["errors"]) == 2
    assert "planted: the SaShiMi's conversion failed" in out["sashimi"]["errors"][0]
    assert out["bandwidth_bound_streams"] == 1e12 / (2 * 1000 * gpu.RATE)
    assert out["streams_at_real_time_step_graphs_off"] == 512 and len(gpu.ERRORS) == 3


def stopped_run(results: Path) -> None:
    """bench.gpu --device-cpu --quick with the audio section's stand-ins, results in `results`, the process
    sent SIGTERM (gpu-check's `timeout`) while its second measurement runs, and again while it draws its
    figure; the step and TTFT sections stand-ins that say on stdout that they started. (Run in a
    subprocess: the old bench.gpu died of it.)"""
    bench.common.RESULTS = results
    gpu.load_rec = lambda kind, device, dtype, tmp: (Tiny(), {"model": "stand-in"})
    measured = []

    def row_then_stopped(rec, B, graphs, triton, engine_ok, seconds):
        if measured:
            os.kill(os.getpid(), signal.SIGTERM)
        measured.append(B)
        return {"graphs": graphs, "triton": triton, "batch": B, "step_steps_per_s": 2e4}

    gpu.audio_row = row_then_stopped
    real_plot = gpu.plot

    def plot_while_terminated(data, quick):  # (`timeout` signalling again while the figure is drawn)
        os.kill(os.getpid(), signal.SIGTERM)
        real_plot(data, quick)

    gpu.plot = plot_while_terminated
    for name in ("bench_step", "bench_ttft"):
        setattr(gpu, name, lambda *a, _name=name: print(f"started {_name}") or {"rows": []})
    before = signal.getsignal(signal.SIGTERM)
    try:
        gpu.main(["--device-cpu", "--quick"])
    finally:
        print("handler restored" if signal.getsignal(signal.SIGTERM) is before else "handler left set")


def test_bench_gpu_stopped_from_outside_writes_what_it_measured(tmp_path):
    """SIGTERM (gpu-check's `timeout`) during the audio section ended the process: nothing of that section
    was written. Now the section's rows so far are written, marked stopped, no later section starts, and
    the exit status (1) and its last line say so; the figure is drawn from what there is (a second SIGTERM
    while it is drawn is ignored: the measurements have ended)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
            f"import test_gpu_check as t; t.stopped_run(t.Path({str(tmp_path)!r}))")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)  # fmt: skip
    assert r.returncode == 1 and "audio: Stopped: stopped from outside" in r.stderr, (r.returncode, r.stderr)
    data = json.loads((tmp_path / "quick/gpu-cpu.json").read_text())
    assert [row["batch"] for row in data["audio"]["rows"]] == [1] and "from outside" in data["stopped"]
    assert "started" not in r.stdout and "step" not in data and "handler restored" in r.stdout
    assert (tmp_path / "quick/gpu-cpu.png").stat().st_size > 0  # (plotted without the sections not run)


def test_bench_gpu_takes_a_budget_and_refuses_a_bad_one(stand_ins, monkeypatch, capsys):
    """--budget S (what gpu-check's limit leaves): the run's budget, in the JSON; not a positive number:
    refused by name, nothing run."""
    for name in ("bench_audio", "bench_step", "bench_ttft"):
        monkeypatch.setattr(gpu, name, lambda sz, device, budget, tmp: {"rows": [], "budget": budget.seconds})
    gpu.main(["--device-cpu", "--quick", "--budget", "37"])
    data = json.loads((stand_ins / "quick/gpu-cpu.json").read_text())
    assert data["budget_s"] == 37 and data["audio"]["budget"] == 37
    for bad in ("0", "-5", "inf", "nan"):
        with pytest.raises(SystemExit, match="--budget must be a number of seconds > 0"):
            gpu.main(["--device-cpu", "--quick", "--budget", bad])


def test_where_the_triton_kernel_does_not_run_the_benchmark_measures_the_torch_ops(stand_ins, monkeypatch):
    """On a GPU whose Triton cannot run the kernel (no C compiler for its launcher, say), bench.gpu asked
    for it anyway (`use_triton_step(True)`, which refuses there) and the whole audio section ended. Now
    the kernel's probe decides: the torch ops are measured, and why the kernel's rows are missing is said."""
    from types import SimpleNamespace

    from model import triton_step

    class OnAGpu(Tiny):
        device = torch.device("cuda")
        layers = (SimpleNamespace(form="diagonal"),)

        def use_triton_step(self, on):
            if on:
                raise ValueError("use_triton_step(True): the Triton kernel does not run on cuda")

    monkeypatch.setattr(gpu, "load_rec", lambda kind, device, dtype, tmp: (OnAGpu(), {"model": "stand-in"}))
    monkeypatch.setattr(gpu, "audio_row", lambda rec, B, graphs, triton, engine_ok, seconds: {
        "graphs": graphs, "triton": triton, "batch": B, "step_rtf": 1.25})  # fmt: skip
    monkeypatch.setattr(gpu, "sashimi_rows", lambda *a, **k: {})
    monkeypatch.setattr(triton_step, "probe", lambda device: "RuntimeError: Failed to find C compiler")
    out = gpu.bench_audio(gpu.SIZES[True], "cpu", gpu.Budget(60), stand_ins)
    assert {r["triton"] for r in out["rows"]} == {False} and len(out["rows"]) == 8  # float32 and float16
    assert any("the kernel does not run on cuda: RuntimeError: Failed to find C compiler" in s
               for s in out["skipped"])  # fmt: skip
    monkeypatch.setattr(triton_step, "probe", lambda device: None)
    assert gpu.triton_ok(OnAGpu()) and not gpu.triton_ok(Tiny())


def test_the_compiled_steps_cuda_test_is_the_last_gpu_check_runs_of_test_cuda():
    """test_cuda.py runs on one pytest worker within gpu-check's tests' limit (240 s), in file order. The
    compiled step's test (S4_COMPILE_STEP, off by default: two Inductor compiles a kernel, the slowest) sat
    before the Triton step's, SaShiMi's graphs' and the decode blocks' tests, none of which has run on a GPU
    yet: a limit reached there would cut those. Now it is collected last."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "-m", "cuda or triton", "tests/test_cuda.py"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    ids = [line for line in r.stdout.splitlines() if line.startswith("tests/test_cuda.py::")]
    compiled = [i for i, name in enumerate(ids) if "test_the_compiled_step" in name]
    assert len(ids) > 30 and compiled == [len(ids) - 2, len(ids) - 1], r.stdout[-2000:]


def test_the_capture_a_server_makes_is_timed_with_the_servers_step(stand_ins, monkeypatch):
    """The audio section times what a server's load captures (the step's graphs and the block graphs) last.
    Its variants end with the torch ops, so that capture was of the torch step where a server (S4_TRITON_STEP
    on) captures the Triton kernel's. Now it switches the kernel back on first, and says which it timed."""
    from types import SimpleNamespace

    from model import triton_step

    captures = []

    class OnAGpu(Tiny):
        device = torch.device("cuda")
        layers = (SimpleNamespace(form="diagonal"),)
        triton = None

        def use_triton_step(self, on):
            self.triton = on

        def use_cuda_graphs(self, buckets, blocks=True):
            if buckets is not None:
                captures.append((self.triton, blocks))
            return 1.5 if buckets is not None else 0.0

    monkeypatch.setattr(gpu, "load_rec", lambda kind, device, dtype, tmp: (OnAGpu(), {"model": "stand-in"}))
    monkeypatch.setattr(gpu, "audio_row", lambda rec, B, graphs, triton, engine_ok, seconds: {
        "graphs": graphs, "triton": triton, "batch": B, "step_rtf": 1.25})  # fmt: skip
    monkeypatch.setattr(gpu, "sashimi_rows", lambda *a, **k: {})
    monkeypatch.setattr(triton_step, "probe", lambda device: None)
    out = gpu.bench_audio(gpu.SIZES[True], "cuda", gpu.Budget(60), stand_ins)
    assert captures[-1] == (True, True) and out["model"]["capture_s_with_blocks"] == 1.5
    assert out["model"]["capture_with_blocks_triton"] is True
    assert [t for t, blocks in captures[:-1]] == [True, True, False]  # (the variants': graphs on)
