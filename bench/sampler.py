"""The engine's per-step sampling, before and after the device sampler, side by side in one process.

  * "sample (torch ops)": `model.sampling.sample` on a non-CPU device, as the GPU engine called it per
    step until 2026-12-04: six per-row settings tensors built from Python lists and copied over, three
    host syncs to choose the optional steps, the uniforms drawn on the host and copied over.
  * "RowSampler": the settings made once while the rows last, the uniforms drawn in one host C call
    over the rows' (key, counter) arrays and copied over at once; no per-row Python and no sync in a step.
  * "uniforms in torch ops": the RowSampler's settings, but the uniforms drawn on the device by
    `philox_uniforms_torch` (Philox's ten rounds in int64 torch ops), the alternative it was measured
    against.

All three give the same tokens (tests/test_device_sampler.py). Per batch B (plain temperature-1 rows,
V = 256): µs per sampling step, median of `repeat` alternated rounds of `steps` steps, each round
synchronized at its end. On the CPU all run the torch ops (the CPU engine's C sampler is another
path, faster than any of them); on CUDA, when present, the same again. JSON + PNG in bench/results
(quick: bench/results/quick).

    python -m bench.sampler [--quick]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from bench.common import bench_main, log2_axis, save_figure, subplots
from model.sampling import (
    RowSampler,
    SamplingParams,
    _sample_torch,
    philox_uniforms_torch,
    sample_with,
    uint64_bits,
)

NAME = "sampler"
V = 256
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"batches": [1, 8, 64, 256, 1024], "steps": 50, "repeat": 7},
    True: {"batches": [1, 64], "steps": 20, "repeat": 3},  # (5 × 2 could show the opposite order)
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_step_us(fn, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return 1e6 * (time.perf_counter() - t0) / steps


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for B in sz["batches"]:
            params = [SamplingParams(temperature=1.0, seed=i) for i in range(B)]
            logits = torch.randn(B, V, generator=torch.Generator().manual_seed(B)).to(device)
            gens_a = [p.generator() for p in params]
            sampler = RowSampler(params, [p.generator() for p in params], V, device)
            keys = uint64_bits([p.seed for p in params]).to(device)
            counters = torch.zeros(B, dtype=torch.long, device=device)

            def on_device():
                u = philox_uniforms_torch(keys, counters)
                counters.add_(1)
                return sample_with(logits, sampler.rows, u)

            variants = {
                "sample (torch ops)": lambda: _sample_torch(logits, params, gens_a, None, None),
                "RowSampler": lambda: sampler(logits),
                "uniforms in torch ops": on_device,
            }
            times: dict[str, list[float]] = {k: [] for k in variants}
            for fn in variants.values():  # warm-up
                per_step_us(fn, 2, device)
            for _ in range(sz["repeat"]):
                for name, fn in variants.items():
                    times[name].append(per_step_us(fn, sz["steps"], device))
            row = {"device": device, "batch": B}
            for name, ts in times.items():
                row[name] = {"us_per_step": statistics.median(ts), "samples_us": ts}
            row["ratio_before_over_after"] = (
                row["sample (torch ops)"]["us_per_step"] / row["RowSampler"]["us_per_step"]
            )
            rows.append(row)
            before, after = row["sample (torch ops)"]["us_per_step"], row["RowSampler"]["us_per_step"]
            print(f"bench.sampler: {device} B={B}: {before:.0f} µs -> {after:.0f} µs ({before / after:.2f}x)",
                  flush=True)  # fmt: skip
    return {"sizes": sz, "vocab": V, "rows": rows}


def plot(data: dict[str, Any], quick: bool) -> None:
    devices = sorted({r["device"] for r in data["rows"]})
    fig, axes = subplots(len(devices))
    for ax, device in zip(axes, devices):
        rs = [r for r in data["rows"] if r["device"] == device]
        xs = [r["batch"] for r in rs]
        for name, style in (
            ("sample (torch ops)", "o-"),
            ("RowSampler", "s-"),
            ("uniforms in torch ops", "^:"),
        ):
            ax.plot(xs, [r[name]["us_per_step"] for r in rs], style, label=name)
        log2_axis(ax, xs)
        ax.set_yscale("log")
        ax.set_xlabel("rows (batch)")
        ax.set_ylabel("µs per sampling step")
        ax.set_title(f"sampling a step, {device}")
        ax.legend()
    save_figure(fig, NAME, quick, title="the engine's per-step sampling: before and after the device sampler")


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
