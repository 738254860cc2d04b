"""Raw engine decode throughput: the one-step decode loop (step → sample → bookkeeping in Python per
step) against the native decode block (K steps with sampling and stop checks in one C call), side by
side in one process, on the shipped text model (a random stand-in of the same shape if it is absent).

Two figures per batch size. "loop": the decode loop alone, in this thread (per step: `rec.step` +
`sample` + the seen update + one host copy, against blocks of 8 steps of `rec.decode_block`), best of
`repeat` alternated runs (the least disturbed by other processes). "engine": the engine alone (no
HTTP): n sessions submitted in a burst with a short prompt,
plain temperature sampling (seeded), consumed by a local event loop; tokens/s = generated tokens ÷
wall time of the burst (prefill of the short prompts included). The two paths alternate, `repeat`
times each; the median and the best (least disturbed by other processes) are reported. "with logprobs":
the engine again with one of the n sessions asking for log-probabilities (logprobs=5): the native block
reports them since 2026-12-04 (session 34); before, that one row sent the whole batch to the one-step
loop, which is the other path measured.

    python -m bench.decode [--quick]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import bench_main, save_figure, subplots
from bench.server import checkpoint, engine_rate
from model import load

NAME = "decode"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {
        "batches": [1, 8, 64],
        "prompt": 8,
        "tokens": 256,
        "repeat": 3,
        "loop_steps": 64,
        "loop_repeat": 5,
    },
    True: {"batches": [1, 8, 64], "prompt": 8, "tokens": 64, "repeat": 3, "loop_steps": 32, "loop_repeat": 5},
}
PATHS = ("one-step", "native-block")


class Rows:
    """B rows decoding at temperature 1 (seeded per row) from the zero state: their sampling settings,
    counter-based generators, state, pending tokens and seen set, advanced by `one_step` or `blocks`."""

    def __init__(self, rec, B: int) -> None:
        from model.sampling import SamplingParams

        self.rec, self.B, self.V = rec, B, rec.config.vocab_size
        self.params = [SamplingParams(seed=k) for k in range(B)]
        self.gens = [p.generator() for p in self.params]
        self.state, self.tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
        self.seen = torch.zeros(B, self.V, dtype=torch.bool)

    def one_step(self, steps: int) -> None:
        """The engine's one-step loop: `rec.step`, `sample`, the seen update, the host copy, per token."""
        from model.sampling import sample

        for _ in range(steps):
            logits, _ = self.rec.step(self.tok, self.state, out=self.state)
            self.tok = sample(logits, self.params, self.gens)
            self.seen[torch.arange(self.B), self.tok] = True
            self.tok.tolist()

    def blocks(self, steps: int, k: int) -> None:
        """Native decode blocks of k steps (`rec.decode_block`: sampling in C) until `steps` are made."""
        from model.sampling import row_settings, uint64_bits

        done = 0
        while done < steps:
            res = self.rec.decode_block(
                min(k, steps - done), self.state, self.tok, settings=row_settings(self.params, self.V),
                counts=None, key=uint64_bits([g.key for g in self.gens]),
                counter=uint64_bits([g.counter for g in self.gens]), limit=torch.full((self.B,), 10**9),
                stops=[[]] * self.B, history=[b""] * self.B, seen=self.seen,
            )  # fmt: skip
            for g in self.gens:
                g.counter += res.steps
            res.tokens.t().tolist()
            done += res.steps


def loop_rate(rec, B: int, steps: int, repeat: int) -> dict[str, float]:
    """Tokens/s of the bare decode loop at batch B: one step at a time vs native blocks of 8 steps."""
    rows = Rows(rec, B)
    best = {"one-step": 0.0, "native-block": 0.0}
    for _ in range(repeat):
        paths = (("one-step", lambda: rows.one_step(steps)), ("native-block", lambda: rows.blocks(steps, 8)))
        for name, fn in paths:
            t0 = time.perf_counter()
            fn()
            best[name] = max(best[name], B * steps / (time.perf_counter() - t0))
    return best


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
            loop = loop_rate(rec, n, sz["loop_steps"], sz["loop_repeat"])
            row = {"batch": n, **{p: statistics.median(v) for p, v in got.items()}, "loop": loop}
            row["loop_speedup"] = loop["native-block"] / loop["one-step"]
            row["speedup"] = row["native-block"] / row["one-step"]
            row["best"] = {p: max(v) for p, v in got.items()}  # least disturbed by other processes
            row["best_speedup"] = row["best"]["native-block"] / row["best"]["one-step"]
            row["runs"] = got
            lp: dict[str, list[float]] = {p: [] for p in PATHS}  # one of the n rows asks for logprobs
            for _ in range(sz["repeat"]):
                for path in PATHS:
                    DecodeBatch.native = native if path == "native-block" else (lambda self, rec: False)
                    lp[path].append(engine_rate(rec, n, sz, logprobs_rows=1)["tokens_per_s"])
            wl = row["with_logprobs"] = {p: statistics.median(v) for p, v in lp.items()}
            wl["speedup"] = wl["native-block"] / wl["one-step"]
            rows.append(row)
            print(f"batch {n:3d}: one-step {row['one-step']:9.0f} tok/s, native block "
                  f"{row['native-block']:9.0f} tok/s ({row['speedup']:.2f}x); best of {sz['repeat']}: "
                  f"{row['best']['one-step']:.0f} vs {row['best']['native-block']:.0f} "
                  f"({row['best_speedup']:.2f}x); loop alone, best of {sz['loop_repeat']}: "
                  f"{loop['one-step']:.0f} vs {loop['native-block']:.0f} ({row['loop_speedup']:.2f}x); "
                  f"one row with logprobs: {row['with_logprobs']['one-step']:.0f} vs "
                  f"{row['with_logprobs']['native-block']:.0f} ({row['with_logprobs']['speedup']:.2f}x)",
                  flush=True)  # fmt: skip
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
    fig, axes = subplots(ncols=2)
    rows = data["results"]
    x = range(len(rows))
    w = 0.4
    for ax, what in zip(axes, ("engine", "loop")):
        for i, path in enumerate(PATHS):
            vals = [r[path] if what == "engine" else r["loop"][path] for r in rows]
            ax.bar([k + (i - 0.5) * w for k in x], vals, w, label=path)
        ratio = "speedup" if what == "engine" else "loop_speedup"
        ax.set_xticks(list(x), [f"batch {r['batch']}\n{r[ratio]:.2f}x" for r in rows])
        ax.set_ylabel(f"generated tokens/s ({what}{' median' if what == 'engine' else ' best'})")
        ax.set_yscale("log")
        ax.legend()
    save_figure(fig, NAME, quick, title=f"decode: one-step loop vs native block ({data['model']})")


if __name__ == "__main__":
    bench_main(None, __doc__, NAME, run, plot)
