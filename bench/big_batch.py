"""Batches past 256 rows on CPU, float32: the whole-network C step against the per-layer torch-ops step
(sgemm around the fused SSM steps) that such batches took before, side by side in one process, on the
shipped float32 checkpoints.

Until 2026-12-04 a float32 model stepped batches of up to 256 rows (`NET_STEP_MAX_BATCH`) in C and larger
ones with the torch ops, which agree with the C step only to float32 rounding: a row's logits then
depended on how many rows were stepped beside it (5e-5 on the text model at 300 rows), so with
`S4_MAX_BATCH_SIZE` over 256 a seed's tokens could change with the load. The C step computes each row
alone, so it now takes every batch. This benchmark is the measurement behind that:

- **step**: `rec.step(tokens, state, out=state)` tokens/s with the C step (`c`) and with the torch ops
  (`torch-ops`, `rec.net_step_max_batch = 0`), alternated for `rounds` rounds (the order swapped each
  round); the median round and the range;
- **decode**: what the engine runs per token at that batch: the native decode block (C step, sampling and
  stop checks in one call; `c-block`) against the torch-ops step followed by `model.sampling.sample`
  (`torch-ops+sample`, the engine's loop for batches past 256 before);
- **same row**: row 0's logits over `check_steps` steps alone (batch 1) and in the batch, max |Δ|, for
  each step (0 is bit for bit).

    python -m bench.big_batch [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import ROOT, bench_main, log2_axis, plain_block, save_figure, step_rate, subplots
from model import ModelConfig, SequenceModel, load
from model.sampling import SamplingParams, sample

NAME = "big_batch"
SIZES: dict[bool, dict[str, Any]] = {
    False: {
        "checkpoints": ["checkpoints/text-shakespeare", "checkpoints/audio-digits-s4"],
        "batches": [128, 256, 512, 1024],
        "steps": 16,
        "rounds": 5,
        "check_steps": 16,
    },
    True: {"checkpoints": [], "batches": [8, 300], "steps": 2, "rounds": 2, "check_steps": 4},
}
STEPS = ("c", "torch-ops")
DECODES = ("c-block", "torch-ops+sample")


def _tiny():
    """The quick run's model: a small untrained float32 S4D + FF network."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, d_state=16, l_max=128, kernel="s4d", d_ff=64,
                      cauchy_backend="torch")  # fmt: skip
    return "tiny", SequenceModel(cfg).eval().to_recurrent()


def _models(quick: bool):
    if quick:
        yield _tiny()
        return
    for path in SIZES[quick]["checkpoints"]:
        yield Path(path).name, load(ROOT / path).to_recurrent()


def _time_steps(rec, B: int, steps: int, c: bool) -> float:
    """tokens/s of `steps` in-place steps of B rows, the C step or the torch ops."""
    rec.net_step_max_batch = sys.maxsize if c else 0
    return step_rate(rec, B, steps)


def _time_decode(rec, B: int, steps: int, block: bool) -> float:
    """tokens/s of `steps` decode steps with sampling (temperature 1, a seed a row)."""
    V = rec.config.vocab_size
    params = [SamplingParams(temperature=1.0, seed=r) for r in range(B)]
    state, tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
    if block:
        rec.net_step_max_batch = sys.maxsize
        t0 = time.perf_counter()
        plain_block(rec, steps, state, tok)
        return B * steps / (time.perf_counter() - t0)
    seen = torch.zeros(B, V, dtype=torch.bool)
    rec.net_step_max_batch = 0
    gens = [p.generator() for p in params]
    logits, _ = rec.step(tok, state, out=state)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = sample(logits, params, gens, seen)
        logits, _ = rec.step(tok, state, out=state)
    return B * steps / (time.perf_counter() - t0)


def _same_row(rec, B: int, steps: int, c: bool) -> float:
    """max |Δ| of row 0's logits over `steps` steps, alone against in a batch of B."""
    rec.net_step_max_batch = sys.maxsize if c else 0
    V = rec.config.vocab_size
    tokens = torch.randint(0, V, (steps, B), generator=torch.Generator().manual_seed(7))
    s1, sB, worst = rec.init_state(1), rec.init_state(B), 0.0
    for t in range(steps):
        l1, _ = rec.step(tokens[t, :1], s1, out=s1)
        lB, _ = rec.step(tokens[t], sB, out=sB)
        worst = max(worst, float((l1[0] - lB[0]).abs().max()))
    return worst


def _summary(per_round: dict[str, list[float]]) -> dict[str, Any]:
    return {
        "tokens_per_s": {k: statistics.median(v) for k, v in per_round.items()},
        "range": {k: [min(v), max(v)] for k, v in per_round.items()},
    }


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "sizes": sz, "models": {}}
    for name, rec in _models(quick):
        rows = []
        for B in sz["batches"]:
            steps: dict[str, list[float]] = {k: [] for k in STEPS}
            decodes: dict[str, list[float]] = {k: [] for k in DECODES}
            for k in range(sz["rounds"]):
                order = (0, 1) if k % 2 == 0 else (1, 0)
                for i in order:
                    steps[STEPS[i]].append(_time_steps(rec, B, sz["steps"], c=i == 0))
                for i in order:
                    decodes[DECODES[i]].append(_time_decode(rec, B, sz["steps"], block=i == 0))
            row = {"batch": B, "step": _summary(steps), "decode": _summary(decodes)}
            row["same_row_max_abs_diff"] = {
                k: _same_row(rec, B, sz["check_steps"], c=k == "c") for k in STEPS
            }
            s, d = row["step"]["tokens_per_s"], row["decode"]["tokens_per_s"]
            row["step_ratio"] = s["c"] / s["torch-ops"]
            row["decode_ratio"] = d["c-block"] / d["torch-ops+sample"]
            rows.append(row)
            print(f"{name} B={B:5d} step c {s['c']:9.0f} torch-ops {s['torch-ops']:9.0f} tok/s "
                  f"({row['step_ratio']:.2f}x); decode c-block {d['c-block']:9.0f} torch-ops+sample "
                  f"{d['torch-ops+sample']:9.0f} ({row['decode_ratio']:.2f}x); row 0 alone vs in the batch: "
                  f"{row['same_row_max_abs_diff']}", flush=True)  # fmt: skip
        rec.net_step_max_batch = sys.maxsize
        out["models"][name] = rows
    return out


def plot(data: dict[str, Any], quick: bool) -> None:
    models = data["models"]
    fig, axes = subplots(ncols=max(len(models), 1))
    for ax, (name, rows) in zip(axes, models.items()):
        batches = [r["batch"] for r in rows]
        for part, kinds in (("step", STEPS), ("decode", DECODES)):
            for k in kinds:
                med = [r[part]["tokens_per_s"][k] for r in rows]
                lo = [m - r[part]["range"][k][0] for m, r in zip(med, rows)]
                hi = [r[part]["range"][k][1] - m for m, r in zip(med, rows)]
                ax.errorbar(batches, med, yerr=[lo, hi], marker="o", capsize=2, label=f"{part}: {k}")
        log2_axis(ax, batches)
        ax.set_xlabel("batch (rows)")
        ax.set_ylabel("tokens/s")
        ax.set_title(name)
        ax.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="float32 batches past 256 rows: the C step vs the torch ops")


def main(argv=None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
