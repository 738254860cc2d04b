"""The step's linear layers at batch 1 … 256, side by side in one process: the C row loop (what the
whole-network step ran before), the C row tiles (what it runs now: 8 rows × 32 columns in registers with
AVX-512; bit-identical results), torch (`torch.addmm`: oneDNN/MKL sgemm, with 1 thread and with torch's
default threads) and numpy's OpenBLAS sgemm (scipy_openblas, held to 1 thread: OPENBLAS_NUM_THREADS is
set to 1 before numpy loads, unless already set; its default here was 2 threads). Shapes of the shipped
text model: the output linear (K = H = 256 → N = 2H = 512) and the head (256 → V = 256).

Each batch size is measured in `rounds` rounds; a round times every variant in turn (the order rotated
from round to round), so a burst of load from another process falls on all of them alike. Figures are
the median over rounds of each round's median call time (µs per call and GFLOP/s, 2·B·K·N FLOPs), with
the fastest and slowest round's figure beside it (`us_range`): on a shared machine single runs of
this benchmark differed by up to 1.5× for one variant. The C and numpy calls include their
ctypes/Python call cost (~1-3 µs), as the torch ones include theirs.

    python -m bench.linear [--quick]
"""

from __future__ import annotations

import ctypes
import os
import statistics
import time
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads OpenBLAS: one thread, as labelled

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import bench_main, log2_axis, save_figure, subplots  # noqa: E402
from model import fused  # noqa: E402

NAME = "linear"
SHAPES = {"out (256→512)": (256, 512), "head (256→256)": (256, 256)}
SIZES: dict[bool, dict[str, Any]] = {
    False: {"batches": [1, 2, 4, 8, 16, 32, 64, 256], "seconds": 0.1, "rounds": 7},
    True: {"batches": [1, 2, 4, 8, 16, 32, 64, 256], "seconds": 0.02, "rounds": 3},
}
VARIANTS = ("c-rows", "c-tiles", "torch-1thread", "torch-default", "numpy-openblas")


def _median_us(fn, seconds: float) -> float:
    for _ in range(3):
        fn()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run(quick: bool) -> dict[str, Any]:
    lib = fused.library()
    sz = SIZES[quick]
    default_threads = torch.get_num_threads()
    rows = []
    for shape, (K, N) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        W = torch.randn(N, K, generator=g) / K**0.5
        b = torch.randn(N, generator=g)
        Wt = W.t().contiguous()
        packed = fused.pack_linear(Wt, lib.linear_panel_width())  # the C step's weight layout
        Wt_np, b_np = Wt.numpy(), b.numpy()
        for B in sz["batches"]:
            x = torch.randn(B, K, generator=g)
            x_np = x.numpy()
            out = torch.empty(B, N)
            ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (x, packed, b, out)]

            def c(tiled: int) -> None:
                dims = (tiled, 0, B, K, N)  # 0: float32 weights (ssm_step.c W_F32)
                lib.linear_rows(*(ctypes.c_long(v) for v in dims), *ptrs)

            def torch_mm() -> None:
                torch.addmm(b, x, Wt, out=out)

            fns = {
                "c-rows": lambda: c(0),
                "c-tiles": lambda: c(1),
                "torch-1thread": torch_mm,
                "torch-default": torch_mm,
                "numpy-openblas": lambda: np.matmul(x_np, Wt_np) + b_np,
            }
            per_round: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for k in range(sz["rounds"]):
                for v in VARIANTS[k % len(VARIANTS) :] + VARIANTS[: k % len(VARIANTS)]:
                    torch.set_num_threads(1 if v == "torch-1thread" else default_threads)
                    per_round[v].append(_median_us(fns[v], sz["seconds"]))
            torch.set_num_threads(default_threads)
            c(0)
            ref = out.clone()
            c(1)
            assert torch.equal(out, ref), "the row tiles must give the row loop's results bit for bit"
            res = {v: statistics.median(t) for v, t in per_round.items()}
            flops = 2 * B * K * N
            row = {
                "shape": shape,
                "batch": B,
                "us": res,
                "us_range": {v: [min(t), max(t)] for v, t in per_round.items()},
                "gflops": {k: flops / v / 1e3 for k, v in res.items()},
                "gflops_range": {
                    v: [flops / max(t) / 1e3, flops / min(t) / 1e3] for v, t in per_round.items()
                },
            }
            row["fastest"] = min(res, key=res.get)
            rows.append(row)
            print(f"{shape:16s} B={B:4d} " + " ".join(f"{k} {v:8.1f}us" for k, v in res.items())
                  + f"  fastest {row['fastest']}", flush=True)  # fmt: skip
    return {"torch_default_threads": default_threads, "sizes": sz, "results": rows}


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, axes = subplots(ncols=len(SHAPES))
    for ax, shape in zip(axes, SHAPES):
        rows = [r for r in data["results"] if r["shape"] == shape]
        for v in VARIANTS:  # the median round, bars from the slowest round to the fastest
            batch, gf = [r["batch"] for r in rows], [r["gflops"][v] for r in rows]
            lo = [g - r["gflops_range"][v][0] for g, r in zip(gf, rows)]
            hi = [r["gflops_range"][v][1] - g for g, r in zip(gf, rows)]
            ax.errorbar(batch, gf, yerr=[lo, hi], marker="o", capsize=2, label=v)
        log2_axis(ax, [r["batch"] for r in rows])
        ax.set_xlabel("batch")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="step linear layers: C loops vs sgemm")


if __name__ == "__main__":
    bench_main(None, __doc__, NAME, run, plot)
