"""Raw engine decode throughput: the one-step decode loop (step → sample → bookkeeping in Python per
step) against the native decode block (K steps with sampling and stop checks in one C call), side by
side in one process, on the shipped text model (a random stand-in of the same shape if it is absent).

Each figure is the engine alone (no HTTP): n sessions submitted in a burst with a short prompt,
plain temperature sampling (seeded), consumed by a local event loop; tokens/s = generated tokens ÷
wall time of the burst (prefill of the short prompts included). The two paths alternate, `repeat`
times each, and the median is reported.

    python -m bench.decode [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import bench_main, save_figure, subplots
from bench.server import checkpoint, engine_rate
from model import load

NAME = "decode"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"batches": [1, 8, 64], "prompt": 8, "tokens": 256, "repeat": 3},
    True: {"batches": [1, 8, 64], "prompt": 8, "tokens": 64, "repeat": 3},
}
PATHS = ("one-step", "native-block")


def run(quick: bool) -> dict[str, Any]:
    from server.engine import DecodeBatch

    sz = SIZES[quick]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, what = checkpoint(False, Path(tmp))
        rec = load(ckpt).to_recurrent()
    native = DecodeBatch.native
    rows = []
    try:
        for n in sz["batches"]:
            got: dict[str, list[float]] = {p: [] for p in PATHS}
            for _ in range(sz["repeat"]):
                for path in PATHS:
                    DecodeBatch.native = native if path == "native-block" else (lambda self, rec: False)
                    got[path].append(engine_rate(rec, n, sz)["tokens_per_s"])
            row = {"batch": n, **{p: statistics.median(v) for p, v in got.items()}}
            row["speedup"] = row["native-block"] / row["one-step"]
            rows.append(row)
            print(f"batch {n:3d}: one-step {row['one-step']:9.0f} tok/s, native block "
                  f"{row['native-block']:9.0f} tok/s ({row['speedup']:.2f}x)", flush=True)  # fmt: skip
    finally:
        DecodeBatch.native = native
    return {
        "model": what,
        "threads": torch.get_num_threads(),
        "sizes": sz,
        "results": rows,
        "note": "engine alone, plain temperature sampling, paths alternated in one process; the machine "
        "may be shared (ratios are the figure to read)",
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax,) = subplots()
    rows = data["results"]
    x = range(len(rows))
    w = 0.4
    for i, path in enumerate(PATHS):
        ax.bar([k + (i - 0.5) * w for k in x], [r[path] for r in rows], w, label=path)
    ax.set_xticks(list(x), [f"batch {r['batch']}\n{r['speedup']:.2f}x" for r in rows])
    ax.set_ylabel("generated tokens/s (engine alone)")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, NAME, quick, title=f"decode: one-step loop vs native block ({data['model']})")


if __name__ == "__main__":
    bench_main(None, __doc__, NAME, run, plot)
