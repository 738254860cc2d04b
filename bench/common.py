"""Shared benchmark helpers: timing, the matmul ceiling, peak memory in fresh subprocesses, results, plots.

Every benchmark is a module `bench.NAME` with `main(argv)`; `--quick` shrinks it to smoke-test sizes and
writes to bench/results/quick/ (so a smoke run never overwrites the full results in bench/results/).
Configurations whose memory is measured run in a child process, `python -m bench.NAME --child SPEC`,
which reports its result on one marked stdout line (see `child_main` and `run_child`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from model.cauchy import keops_cache_folder

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_MARKER = "@@BENCH_RESULT@@ "
MB = 1 << 20

# the official code (bench.official) imports pykeops itself, which reads the variable: the same folder
# as model.cauchy's kernels
os.environ.setdefault("KEOPS_CACHE_FOLDER", str(keops_cache_folder()))


def load_average() -> list[float] | None:
    """The load average over 1, 5 and 15 minutes; None where the system has none to give."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


# the load average when the benchmark's process started (this import), before it measured anything: the
# machine block's `load_average_1_5_15min_before` (the one read as its results are written holds its own load)
LOAD_AT_START = load_average()


def results_dir(quick: bool) -> Path:
    """bench/results for full runs, bench/results/quick for smoke runs."""
    d = RESULTS / "quick" if quick else RESULTS
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# Timing


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


BUSY_LOOP = "while True: pass"  # a CPU-bound process's code (`beside`)


@contextlib.contextmanager
def beside(code: str | None, settle_s: float) -> Iterator[None]:
    """Run the block beside a Python process executing `code` (BUSY_LOOP: a whole core taken; None:
    nothing beside it), after waiting `settle_s` seconds (the process's start-up, or a pause before a quiet
    run). The process is killed and reaped when the block ends, however it ends."""
    hog = None if code is None else subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(settle_s)
        yield
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()


class Samples(list):
    """A list of seconds per call; `warmup_timed` is True when the only sample is the first (warm-up)
    call, kept because it alone exceeded the time budget: record it beside the figure (a JSON that says
    the warm-up is excluded is then wrong for that row)."""

    warmup_timed: bool = False


def time_samples(
    fn: Callable[[], object], warmup: int = 1, repeat: int = 5, max_seconds: float | None = None
) -> Samples:
    """Wall-clock seconds of `repeat` calls of fn after `warmup` calls (time.perf_counter).

    With `max_seconds`, stops once the timed calls have used that budget (at least one timed call);
    if the first warmup call alone exceeds the budget, that call is the single sample (a call that slow
    is dominated by the work, not by one-time costs) and the result's `warmup_timed` is True."""
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if i == 0 and max_seconds is not None and first > max_seconds:
            only = Samples([first])
            only.warmup_timed = True
            return only
    samples = Samples()
    spent = 0.0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        spent += samples[-1]
        if max_seconds is not None and spent >= max_seconds:
            break
    return samples


def timeit(
    fn: Callable[[], object], warmup: int = 1, repeat: int = 5, max_seconds: float | None = None
) -> float:
    """Median seconds per call of fn (see `time_samples`)."""
    return statistics.median(time_samples(fn, warmup, repeat, max_seconds))


async def wait_for_clients(
    ready: Callable[[], bool], tasks: Sequence[asyncio.Task], poll_s: float = 0.01
) -> None:
    """Sleep until ready() holds (the benchmark's clients all bound, or all decoding). A client task that
    ended meanwhile with an exception (it could not connect: a server gone; its session refused) raises it
    here, and tasks that all ended without making ready() hold raise RuntimeError: a wait on the clients'
    progress alone spun for ever when they had failed. The other clients are then cancelled (and the
    errors of those that failed too retrieved: none is left to be logged as never retrieved)."""
    while not ready():
        failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception()]
        if failed or (tasks and all(t.done() for t in tasks)):
            for t in tasks:
                t.cancel()
            raise failed[0] if failed else RuntimeError("every client ended before the run could start")
        await asyncio.sleep(poll_s)


def nearest_rank(xs: Sequence[float], q: float) -> float:
    """The q-quantile (0 < q ≤ 1) of xs by nearest rank: its ⌈q·n⌉-th smallest value (q·n rounded to 9
    decimals first: 0.99 × 100 is rank 99); NaN when empty. (`xs[int(q * n)]`, used before, is one rank
    higher wherever q·n is whole: the p99 of 100 samples was their maximum.)"""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(round(q * len(s), 9)))) - 1]


def matmul_gflops_by_size(sizes: Sequence[int] = (1024, 2048), repeat: int = 5) -> dict[str, float]:
    """Best fp32 torch.mm GFLOP/s (2n³ flops per n×n product) per size over `repeat` calls."""
    out: dict[str, float] = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        best = min(time_samples(lambda: torch.mm(a, b), warmup=2, repeat=repeat))
        out[f"n={n}"] = 2 * n**3 / best / 1e9
    return out


def copy_gbps_by_size(mib: Sequence[int] = (4, 16, 64, 256), repeat: int = 10) -> dict[str, float]:
    """Best memory bandwidth of an fp32 `Tensor.copy_` per buffer size in GB/s, counting the bytes read
    and written (2 × size): sizes that fit the last-level cache measure it, larger ones DRAM."""
    out: dict[str, float] = {}
    for m in mib:
        a = torch.randn(m * 2**20 // 4)
        b = torch.empty_like(a)
        best = min(time_samples(lambda: b.copy_(a), warmup=2, repeat=repeat))  # noqa: B023
        out[f"{m} MiB"] = 2 * a.numel() * 4 / best / 1e9
    return out


def measure_matmul_gflops(sizes: Sequence[int] = (1024, 2048), repeat: int = 5) -> float:
    """The machine's fp32 matmul ceiling in GFLOP/s: the best torch.mm rate over sizes and repeats."""
    return max(matmul_gflops_by_size(sizes, repeat).values())


# ---------------------------------------------------------------------------------------------
# Memory (Linux: /proc; falls back to ru_maxrss deltas elsewhere)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (VmHWM and ru_maxrss); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """RSS high-water mark of this process since start or the last `reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss_bytes()


class PeakMemory:
    """Context manager: peak RSS of the enclosed work above the RSS right before it.

    The high-water mark is reset on entry where the kernel allows it (Linux ≥ 4.0), so memory held
    earlier in the process (imports, model construction) does not mask the work's own peak; otherwise
    the delta is ru_maxrss(after) − ru_maxrss(before), which can underestimate."""

    def __enter__(self) -> PeakMemory:
        self.baseline = rss_bytes()
        self.exact = reset_peak_rss()
        self._before = self.baseline if self.exact else _ru_maxrss_bytes()
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_bytes = max(0, peak_rss_bytes() - self._before)

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_rss_delta_bytes": self.peak_bytes,
            "peak_rss_delta_mb": self.peak_bytes / MB,
            "baseline_rss_mb": self.baseline / MB,
            "memory_method": "VmHWM after clear_refs reset" if self.exact else "ru_maxrss delta",
        }


# ---------------------------------------------------------------------------------------------
# Child processes: one configuration per fresh interpreter


def child_main(argv: Sequence[str] | None, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If argv is `--child SPEC_JSON`, run handler(spec), print its result on the marker line, return
    True; otherwise return False (the caller goes on with its normal CLI)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--child":
        return False
    spec = json.loads(argv[1])
    result = handler(spec)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return True


def run_child(module: str, spec: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run `python -m module --child SPEC` in a fresh interpreter and return its result dict.

    On failure (non-zero exit, timeout, no result line) returns {"error": ...} instead of raising, so
    one broken configuration does not lose a whole benchmark."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}


def peak_rss_of(module: str, spec: dict[str, Any], timeout: float = 600.0) -> float | None:
    """Peak RSS delta (MiB) of one configuration, run in a fresh subprocess; the module's child
    handler must wrap its work in `PeakMemory` and return `PeakMemory.as_dict()` entries."""
    result = run_child(module, spec, timeout)
    return result.get("peak_rss_delta_mb")


# ---------------------------------------------------------------------------------------------
# Results


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def small_matmul_us(n: int = 64, calls: int = 200) -> float:
    """Median µs of an n×n torch.mm on one torch thread: a contention probe, 13–15 µs on a free core of
    the 2-core AVX2 VM (2026-12-01), more when another process takes the core. One thread since
    2026-12-01: on torch's two threads under OMP_WAIT_POLICY=PASSIVE (the benchmarks' setting) it timed
    the second thread's wake-up instead, 210–266 µs on the same free machine (20 µs with ACTIVE), so
    results/*.json written before then hold a two-thread figure."""
    a = torch.randn(n, n)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timeit(lambda: torch.mm(a, a), warmup=10, repeat=calls) * 1e6
    finally:
        torch.set_num_threads(threads)


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_isa() -> list[str]:
    """The vector extensions of ISA_FLAGS this CPU reports (/proc/cpuinfo): the C step's vector width
    (AVX-512 or AVX2) and whether 16-bit matmuls are native depend on them; [] where unknown."""
    from model.fused import cpu_flags  # noqa: PLC0415

    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


RESULT_FOLDERS_EXCLUDED = (":(exclude)bench/results", ":(exclude)loadtest/results")


def machine_info() -> dict[str, Any]:
    """The machine, the versions and the checkout a figure was taken on: `git_commit`, and whether the
    tracked files differ from it (`tree_modified`: anywhere but the results folders; `model_dir_modified`:
    model/ only, tracked or not, the older field); the load average (1, 5, 15 min) when the process started,
    before the benchmark ran (`load_average_1_5_15min_before`), and now (`load_average_1_5_15min`: after
    the run, its own load included)."""
    try:  # the version without importing pykeops (which probes for CUDA)
        keops_version: str | None = importlib.metadata.version("pykeops")
    except importlib.metadata.PackageNotFoundError:
        keops_version = None
    dirty = _git("status", "--porcelain", "--", "model")
    # any tracked file changed since the commit (model/ is not the only code a figure depends on:
    # server/, bench/ itself), the results folders aside (a run of several benchmarks writes them)
    tree = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *RESULT_FOLDERS_EXCLUDED)
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "isa": cpu_isa(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1_5_15min_before": LOAD_AT_START,
        "load_average_1_5_15min": load_average(),
        "small_matmul_us": small_matmul_us(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pykeops": keops_version,
        "git_commit": _git("rev-parse", "HEAD"),
        "model_dir_modified": bool(dirty) if dirty is not None else None,
        "tree_modified": bool(tree) if tree is not None else None,
    }


def _shown(path: Path) -> Path:
    """`path` relative to the checkout when inside it (a test's results folder is elsewhere)."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _write_json(path: Path, name: str, data: dict[str, Any], quick: bool, **marks: Any) -> dict[str, Any]:
    """Write `data` to `path` with the benchmark's name, `quick`, `marks` and machine info; returns it."""
    payload = {"benchmark": name, "quick": quick, **marks, "machine": machine_info(), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def write_results(name: str, data: dict[str, Any], quick: bool = False) -> dict[str, Any]:
    """Write results/NAME.json (results/quick/NAME.json for --quick) with machine info added;
    returns what was written."""
    path = results_dir(quick) / f"{name}.json"
    payload = _write_json(path, name, data, quick)
    print(f"wrote {_shown(path)}")
    return payload


def write_failed(name: str, data: dict[str, Any], quick: bool = False) -> Path:
    """Write a failed run's data to results/failed/NAME.json (results/quick/failed/ for --quick; not
    tracked by git), to be looked at without replacing the results a run that worked wrote; returns
    the path."""
    d = results_dir(quick) / "failed"
    d.mkdir(exist_ok=True)
    _write_json(d / f"{name}.json", name, data, quick, failed=True)
    return d / f"{name}.json"


def read_results(name: str, quick: bool = False) -> dict[str, Any] | None:
    path = results_dir(quick) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Plotting


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use (child processes never plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(ncols: int = 1, width: float = 6.0, height: float = 4.5) -> tuple[Any, list[Any]]:
    fig, axes = _pyplot().subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, name: str, quick: bool = False, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = results_dir(quick) / f"{name}.png"
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    print(f"wrote {_shown(path)}")
    return path


def log2_axis(ax: Any, values: Sequence[float], axis: str = "x") -> None:
    """Log-2 scale with the given values as plain tick labels."""
    set_scale, set_ticks = (ax.set_xscale, ax.set_xticks) if axis == "x" else (ax.set_yscale, ax.set_yticks)
    set_scale("log", base=2)
    set_ticks(list(values), [str(v) for v in values])


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number for tables: 3 significant digits, '—' for missing."""
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


# ---------------------------------------------------------------------------------------------
# Command line


def step_rate(rec, B: int, steps: int) -> float:
    """tokens/s of `steps` in-place `rec.step` calls of B rows (fixed random tokens, seeded by B; one warm-up
    step first)."""
    gen = torch.Generator().manual_seed(B)
    tokens = torch.randint(0, rec.config.vocab_size, (steps + 1, B), generator=gen)
    state = rec.init_state(B)
    rec.step(tokens[0], state, out=state)  # warm
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        rec.step(tokens[t], state, out=state)
    return B * steps / (time.perf_counter() - t0)


def plain_block(rec, K: int, state: torch.Tensor, tok: torch.Tensor, schedule=None):
    """`rec.decode_block` of K steps for B = len(tok) rows with plain seeded sampling: temperature 1, row r's
    seed r, no penalties, no stop sequences, each row's limit K (bench.step, bench.big_batch, bench.c_ab and
    the tests time or compare this call). `state` and `tok` are updated in place; `schedule`: the block's row
    order (None: fused.BLOCK_SCHEDULE). Returns the fused.BlockResult; raises RuntimeError when the block made
    fewer than K steps."""
    from model.sampling import SamplingParams, row_settings, uint64_bits

    B, V = tok.shape[0], rec.config.vocab_size
    params = [SamplingParams(temperature=1.0, seed=r) for r in range(B)]
    extra = {} if schedule is None else {"schedule": schedule}
    res = rec.decode_block(
        K, state, tok, settings=row_settings(params, V), counts=None, key=uint64_bits(list(range(B))),
        counter=torch.zeros(B, dtype=torch.long), limit=torch.full((B,), K), stops=[[]] * B,
        history=[b""] * B, seen=torch.zeros(B, V, dtype=torch.bool), **extra,
    )  # fmt: skip
    if res.steps != K:
        raise RuntimeError(f"decode block made {res.steps} of {K} steps")
    return res


def ranged(kind: type, lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: a `kind` (int or float) number in [lo, hi] ((lo, hi] with lo_open; no upper
    bound without hi, but finite: inf and nan are refused), so that a bad value is an argparse error
    naming its option (exit 2)."""

    def parse(text: str) -> Any:
        try:
            x = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        low_ok = x > lo if lo_open else x >= lo  # (NaN fails it)
        if not low_ok or not math.isfinite(x) or (hi is not None and not x <= hi):
            bound = f"{'>' if lo_open else '≥'} {lo:g}" + (" and finite" if hi is None else f" and ≤ {hi:g}")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return x

    return parse


def bench_main(
    argv: Sequence[str] | None,
    doc: str | None,
    name: str,
    run: Callable[[bool], dict[str, Any]],
    plot: Callable[[dict[str, Any], bool], None],
    child: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    configure: Callable[[argparse.Namespace], bool] | None = None,
    prog: str | None = None,
) -> None:
    """The CLI shared by the benchmarks: `[--quick] [--replot]`, or `--child SPEC` for a child process.
    A run whose data lists `errors` (configurations that failed) goes to results/failed/NAME.json, not
    over the results, and exits non-zero naming the first.
    `arguments(parser)` adds a benchmark's own options (so --help lists them); `configure(args)` reads them
    before a run and returns False to skip it (having said why). `name` names the results (NAME.json);
    `prog` the command in --help when it differs (default python -m bench.NAME)."""
    if child is not None and child_main(argv, child):
        return
    parser = argparse.ArgumentParser(
        prog=prog or f"python -m bench.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), to results/quick/")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the existing JSON only")
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args(argv)
    if not args.replot and configure is not None and not configure(args):
        return
    if args.replot:
        data = read_results(name, args.quick)
        if data is None:
            parser.error(f"no {results_dir(args.quick) / name}.json to replot")
    else:
        data = run(args.quick)
        if data.get("errors"):  # configurations that failed: kept to be looked at, never over the results
            path, errors = write_failed(name, data, args.quick), data["errors"]
            raise SystemExit(f"bench.{name}: {len(errors)} configuration(s) failed; the first: {errors[0]} "
                             f"(the run is in {_shown(path)}, not in the results)")  # fmt: skip
        data = write_results(name, data, args.quick)
    plot(data, args.quick)
