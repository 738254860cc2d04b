"""S4 vs the Transformer baseline on the Shakespeare plays: the learning-rate / architecture sweeps
(chosen on validation), the nanoGPT "baby GPT" check, and both final runs' validation curves against
training tokens and against wall time, in one plot.

It reads finished training runs (each a `python -m model.train` or `python -m bench.baselines.transformer`
output folder with config.json, log.jsonl and metrics.json); it trains nothing. The runs and their
exact commands are listed in checkpoints/text-shakespeare/README.md.

    python -m bench.text_baseline --s4 runs/text-shakespeare --transformer runs/transformer-shakespeare \
        --sweep 'runs/pilot-*' --nanogpt runs/nanogpt-baby

Writes bench/results/text_baseline.json and .png.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path
from typing import Any

from bench.common import save_figure, subplots, write_results

NAME = "text_baseline"


def read_run(path: str | Path) -> dict[str, Any]:
    """One training run: its config, the periodic validation curve and the final metrics.

    Returns {"path", "config", "tokens_per_step", "num_params", "curve": [{step, tokens, wall_s,
    val_bits_per_token}], "final": metrics.json or None}. Wall time at an evaluation is the training
    time logged at or before that step (evaluation time excluded), counted across resumes: a log
    whose elapsed_s restarts from 0 after a resume (logs before the trainer logged the cumulative
    time) continues from the last time logged before it.

    Raises FileNotFoundError when config.json or log.jsonl is missing."""
    p = Path(path)
    cfg = json.loads((p / "config.json").read_text())
    data = cfg.get("data", {})
    tps = int(data.get("batch_size", 16)) * int(data.get("seq_len", 1024))
    wall: dict[int, float] = {}
    curve = []
    offset = last = 0.0
    for line in (p / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "elapsed_s" in rec:
            if rec["elapsed_s"] + offset < last:  # a resume that restarted the clock
                offset = last
            last = wall[rec["step"]] = rec["elapsed_s"] + offset
        if "val" in rec:
            step = rec["step"]
            done = [s for s in wall if s <= step]
            curve.append({
                "step": step,
                "tokens": step * tps,
                "wall_s": wall[max(done)] if done else None,
                "val_bits_per_token": rec["val"]["bits_per_token"],
            })  # fmt: skip
    final = json.loads((p / "metrics.json").read_text()) if (p / "metrics.json").is_file() else None
    return {
        "path": str(p),
        "config": cfg,
        "tokens_per_step": tps,
        "num_params": final.get("num_params") if final else None,
        "curve": curve,
        "final": final,
    }


def sweep_row(run: dict[str, Any]) -> dict[str, Any]:
    """A sweep run in one row: what differs (model fields, lr, warmup, batch) and its last validation."""
    m, t, d = run["config"].get("model", {}), run["config"].get("train", {}), run["config"].get("data", {})
    last = run["curve"][-1] if run["curve"] else {}
    return {
        "run": Path(run["path"]).name,
        "model": m,
        "lr": t.get("lr"),
        "warmup": t.get("warmup"),
        "steps": t.get("steps"),
        "batch": f"{d.get('batch_size')}x{d.get('seq_len')}",
        "tokens": last.get("tokens"),
        "val_bits_per_byte": last.get("val_bits_per_token"),
    }


def plot(s4: dict, tf: dict, quick: bool = False) -> None:
    fig, (ax_tok, ax_wall) = subplots(2, width=6.0, height=4.2)
    for run, label, color in ((s4, "S4", "tab:blue"), (tf, "Transformer", "tab:orange")):
        c = run["curve"]
        ax_tok.plot([r["tokens"] / 1e6 for r in c], [r["val_bits_per_token"] for r in c], "o-", c=color,
                    label=f"{label} ({run['num_params']:,} params)")  # fmt: skip
        ax_wall.plot([r["wall_s"] / 60 for r in c if r["wall_s"] is not None],
                     [r["val_bits_per_token"] for r in c if r["wall_s"] is not None], "o-", c=color,
                     label=label)  # fmt: skip
    ax_tok.set_xlabel("training tokens (millions)")
    ax_wall.set_xlabel("training wall time on this CPU (minutes, 1 thread)")
    for ax in (ax_tok, ax_wall):
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, NAME, quick, title="Shakespeare plays: S4 vs Transformer (same data and token budget)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.text_baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--s4", required=True, help="the final S4 run folder")
    ap.add_argument("--transformer", required=True, help="the final Transformer run folder")
    ap.add_argument("--sweep", nargs="*", default=[], help="sweep run folders (globs allowed)")
    ap.add_argument("--nanogpt", help="the nanoGPT baby-GPT check run folder")
    args = ap.parse_args(argv)
    how = "runs/ is not in the repository: bench/baselines/shakespeare-sweep.sh makes the runs"

    def finished(flag: str, folder: str) -> None:
        missing = [f for f in ("config.json", "log.jsonl") if not (Path(folder) / f).is_file()]
        if missing:
            ap.error(f"argument {flag}: {folder} is not a training run (no {' or '.join(missing)}); {how}")

    finished("--s4", args.s4)
    finished("--transformer", args.transformer)
    if args.nanogpt:
        finished("--nanogpt", args.nanogpt)
    for pat in args.sweep:
        if not glob.glob(pat):
            ap.error(f"argument --sweep: {pat!r} matches no run folder; {how}")
        for p in sorted(glob.glob(pat)):
            finished("--sweep", p)
    s4, tf = read_run(args.s4), read_run(args.transformer)
    sweep = [sweep_row(read_run(p)) for pat in args.sweep for p in sorted(glob.glob(pat))]
    out: dict[str, Any] = {
        "description": "validation bits/byte (held-out plays) vs training tokens and wall time; final "
        "val/test over the whole splits; sweeps chosen on validation only",
        "final": {},
        "sweep": sweep,
    }
    for key, run in (("s4", s4), ("transformer", tf)):
        f = run["final"] or {}
        out["final"][key] = {
            "path": run["path"],
            "num_params": run["num_params"],
            "tokens_seen": f.get("tokens_seen"),
            "train_wall_s": f.get("train_wall_s"),
            "val_bits_per_byte": (f.get("val") or {}).get("bits_per_token"),
            "test_bits_per_byte": (f.get("test") or {}).get("bits_per_token"),
            "curve": run["curve"],
            "model": run["config"].get("model"),
            "train": run["config"].get("train"),
            "data": run["config"].get("data"),
        }
    if args.nanogpt:
        ng = read_run(args.nanogpt)
        v = (ng["final"] or {}).get("val") or {}
        out["nanogpt_check"] = {
            "path": ng["path"],
            "num_params": ng["num_params"],
            "val_nats_per_byte": v.get("nll_nats"),
            "val_bits_per_byte": v.get("bits_per_token"),
            "nanogpt_reference_nats_per_char": 1.88,
            "nanogpt_reference_bits_per_char": 1.88 / math.log(2),
            "curve": ng["curve"],
        }
    write_results(NAME, out)
    plot(s4, tf)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in out["final"].items()},
                     indent=1))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
