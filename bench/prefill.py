"""Prompt ingestion (prefill) of the shipped text model: this tree against a baseline revision, side by side.

One process, one converted model per implementation; for each (length, batch) the implementations
alternate `--reps` times (this machine is shared and noisy: medians of interleaved samples):
  * warm: a prefill at a length already seen (after one warm-up call);
  * cold: the first prefill at a length never seen before (per sample the next length above L that no
    prefill of this process has had, whatever the order of the lengths; the baseline's lazily grown
    kernel cache is emptied first, which is its state at a new maximum length);
  * stepping: the same prompt one token at a time through `step` (the same code in both trees).
The baseline is `model/recurrent.py` at BASELINE_REV (the parent of the blocked prefill), read with
`git show` and imported beside this tree's; it is skipped when git or that revision is unavailable.

Run (each configuration ~10-60 s on a 2-core CPU; `--append` adds rows to the JSON; each row's "run"
indexes "machine_by_run", the machine of the run that measured it; --contention, --crossover and
--vs-transformer keep theirs in their section; the top-level "machine" is the last write's):
    nice -n 10 python -m bench.prefill --lengths 256 2048 --batches 1 8 --reps 3
    nice -n 10 python -m bench.prefill --lengths 16384 --batches 1 --reps 2 --append
    nice -n 10 python -m bench.prefill --lengths 16384 --batches 8 --reps 2 --no-baseline --append
    nice -n 10 python -m bench.prefill --contention    # adds "contention" to the JSON
    nice -n 10 python -m bench.prefill --crossover     # adds "crossover" (short prompts) to the JSON
    nice -n 10 python -m bench.prefill --vs-transformer  # adds "vs_transformer" (the goal's second half)

`--vs-transformer` (each run with its own machine block; the previous runs move to "vs_transformer_earlier")
is the issue's "≥ 6× the Transformer's prefill in the same run": 16,384 tokens at batch 1,
warm, this tree's prefill of the shipped text model against the parameter-matched GPT-2-style baseline
(`bench/baselines/transformer-shakespeare.toml`: 1,978,116 parameters at its trained 256 positions; its
position table is grown to the prompt's length; random weights: the time does not depend on them),
alternated, for each weight dtype (float32, bfloat16: `S4_DTYPE`) and torch thread count (1: the server's
`prefill_threads`; 2: the whole VM). Both models run the same dtype and threads in each pair; the S4 SSM
itself stays float32. Alternated with them: the S4 prefill without logits ("s4_ingest", `logits="none"`:
what the server runs to ingest a prompt, whose last token the decode steps) and with the SSM blocks in
torch ops instead of the C pass ("s4_torch_ssm": the model converted with `fused_step=False`, the code
before `_fused_prefill`; the parallel form at 16k either way).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    BUSY_LOOP,
    ROOT,
    beside,
    machine_info,
    read_results,
    save_figure,
    subplots,
    write_results,
)

NAME = "prefill"
CHECKPOINT = ROOT / "checkpoints" / "text-shakespeare"
BASELINE_REV = "6392c17"  # main before the blocked prefill (float64 kernels grown on the request path)
GOAL_TOKENS_PER_S = 60_000  # issue 18: 16k tokens, batch 1, warm
GOAL_COLD_OVER_WARM = 2.0
GOAL_OVER_TRANSFORMER = 6.0  # issue 18: ... and ≥ 6× the Transformer's prefill in the same run


def _baseline_module() -> Any | None:
    """model/recurrent.py at BASELINE_REV as a module `recurrent_baseline`, or None (no git history).
    It runs with its own revision's fused C step (model/fused.py and model/csrc/ssm_step.c at
    BASELINE_REV, as `fused_baseline`): today's fused.py has other signatures (diag_step's parameters),
    and the old step with it would not be the old step."""

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{BASELINE_REV}:{path}"], cwd=ROOT, capture_output=True, text=True, timeout=30,
            check=True,
        ).stdout  # fmt: skip

    try:
        recurrent, fused_src, c_src = (show(p) for p in ("model/recurrent.py", "model/fused.py",
                                                         "model/csrc/ssm_step.c"))  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    folder = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # (its modules serve until the process ends)
    (folder / "csrc").mkdir()
    (folder / "csrc" / "ssm_step.c").write_text(c_src)
    import_line = "from model import fused\n"
    if import_line not in recurrent:
        raise RuntimeError(f"model/recurrent.py at {BASELINE_REV} does not import model.fused as expected")
    sources = {"fused_baseline": fused_src, "recurrent_baseline": recurrent.replace(
        import_line, "import fused_baseline as fused\n", 1)}  # fmt: skip
    mod = None
    for name, src in sources.items():  # (the fused module first: the recurrent one imports it)
        path = folder / f"{name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _forget_lengths(rec) -> None:
    """Empty the baseline's lazily grown per-form caches (its kernels and matrix powers)."""
    for form in rec.layers:
        form._K = form._K[:, :0]
        if isinstance(getattr(form, "_powers", None), dict):
            form._powers.clear()


def measure(
    lengths: Sequence[int], batches: Sequence[int], reps: int, step_max_tokens: int, baseline: bool = True
) -> dict[str, Any]:
    from model import load, recurrent

    torch.manual_seed(0)
    net = load(str(CHECKPOINT))
    impls = {"new": recurrent.RecurrentModel(net)}
    base = _baseline_module() if baseline else None
    if base is not None:
        impls = {"old": base.RecurrentModel(net), **impls}
    rows: list[dict[str, Any]] = []
    seen: set[int] = set()  # every length this process has prefilled: a cold sample's is none of them
    for L in lengths:
        for B in batches:
            seen.add(L)  # (the warm-up below)
            colds: list[int] = []
            for _ in range(reps):
                colds.append(min(n for n in range(L + 1, L + len(seen) + 2) if n not in seen))
                seen.add(colds[-1])
            tokens = torch.randint(0, net.config.vocab_size, (B, max(colds)))
            samples: dict[str, dict[str, list[float]]] = {k: {"warm": [], "cold": []} for k in impls}
            step_s: list[float] = []
            for rec in impls.values():  # warm-up at L
                rec.prefill(tokens[:, :L], rec.init_state(B))
            for Lc in colds:
                for name, rec in impls.items():
                    st = rec.init_state(B)
                    samples[name]["warm"].append(_timed(lambda: rec.prefill(tokens[:, :L], st)))
                    if name == "old":
                        _forget_lengths(rec)
                    samples[name]["cold"].append(_timed(lambda: rec.prefill(tokens[:, :Lc], st)))
                if L * B <= step_max_tokens:
                    rec = impls["new"]

                    def stepping(rec=rec):
                        s = rec.init_state(B)
                        for t in range(L):
                            rec.step(tokens[:, t], s, out=s)

                    step_s.append(_timed(stepping))
            row: dict[str, Any] = {"length": L, "batch": B}
            for name in impls:
                for kind in ("warm", "cold"):
                    med = statistics.median(samples[name][kind])
                    row[f"{name}_{kind}_s"] = med
                    row[f"{name}_{kind}_samples"] = samples[name][kind]
                row[f"{name}_warm_tokens_per_s"] = L * B / row[f"{name}_warm_s"]
                row[f"{name}_cold_over_warm"] = row[f"{name}_cold_s"] / row[f"{name}_warm_s"]
            row["step_s"] = statistics.median(step_s) if step_s else None
            rows.append(row)
            print(_line(row), flush=True)
    return {
        "checkpoint": str(CHECKPOINT.relative_to(ROOT)),
        "baseline_rev": BASELINE_REV if base is not None else None,
        "reps": reps,
        "load_average_before": list(os.getloadavg()),
        "rows": rows,
        "goals": {"warm_tokens_per_s_16k_batch1": GOAL_TOKENS_PER_S, "cold_over_warm": GOAL_COLD_OVER_WARM},
    }


def contention(L: int = 2048, rounds: int = 2) -> dict[str, Any]:
    """Prefill (old, new) and stepping of L tokens at batch 1, without and with a busy-loop process beside
    them (same niceness), interleaved for `rounds` rounds; medians in seconds."""
    from model import load, recurrent

    net = load(str(CHECKPOINT))
    new = recurrent.RecurrentModel(net)
    base = _baseline_module()
    impls = {"new": new} if base is None else {"old": base.RecurrentModel(net), "new": new}
    tok = torch.randint(0, net.config.vocab_size, (1, L))

    def stepping() -> None:
        s = new.init_state(1)
        for t in range(L):
            new.step(tok[:, t], s, out=s)

    for rec in impls.values():
        rec.prefill(tok, rec.init_state(1))
    out = []
    for _ in range(rounds):
        for busy in (False, True):
            with beside(BUSY_LOOP if busy else None, 0.3):
                r: dict[str, Any] = {"busy": busy, "load_average": os.getloadavg()[0]}
                for name, rec in impls.items():
                    st = rec.init_state(1)
                    r[name] = statistics.median(_timed(lambda: rec.prefill(tok, st)) for _ in range(3))
                r["step"] = statistics.median(_timed(stepping) for _ in range(2))
            out.append(r)
            times = ", ".join(f"{k} {r[k] * 1e3:.0f} ms" for k in (*impls, "step"))
            print(f"busy process {busy}: {times}", flush=True)
    return {"length": L, "batch": 1, "rounds": out}


def crossover(lengths: Sequence[int] = (32, 64, 128, 256, 512, 1024), reps: int = 5) -> dict[str, Any]:
    """Short prompts at batch 1 from a continued session (a nonzero state): the recurrent form layer by
    layer in C (`fused.NetStep.prefill`, what `prefill` takes up to `prefill_by_steps_max_tokens`)
    against the parallel form (the threshold set to 0), alternated `reps` times, best of each, in
    seconds: the crossover that sets PREFILL_BY_STEPS_MAX_TOKENS."""
    from model import load

    rec = load(str(CHECKPOINT)).to_recurrent()
    threshold = rec.prefill_by_steps_max_tokens
    _, state = rec.prefill(torch.randint(0, rec.config.vocab_size, (1, 5)), rec.init_state(1))  # continued
    out = []
    try:
        for L in lengths:
            tok = torch.randint(0, rec.config.vocab_size, (1, L))
            best = {"c_layer_by_layer": float("inf"), "parallel": float("inf")}
            for i in range(reps + 1):  # the first round warms up
                for name, limit in (("c_layer_by_layer", 1 << 30), ("parallel", 0)):
                    rec.prefill_by_steps_max_tokens = limit
                    t = _timed(lambda: rec.prefill(tok, state))  # noqa: B023
                    if i:
                        best[name] = min(best[name], t)
            out.append({"length": L, **best})
            print(f"L={L:5d}: C layer by layer {best['c_layer_by_layer'] * 1e3:7.1f} ms, parallel "
                  f"{best['parallel'] * 1e3:7.1f} ms", flush=True)  # fmt: skip
    finally:
        rec.prefill_by_steps_max_tokens = threshold
    return {"batch": 1, "threshold": threshold, "rows": out}


def _matched_transformer(L: int, dtype: torch.dtype) -> torch.nn.Module:
    """The parameter-matched baseline of issue 15 with its position table grown to L, random weights."""
    from bench.baselines.transformer import TransformerLM, matched_config

    torch.manual_seed(0)
    return TransformerLM(matched_config(L)).eval().requires_grad_(False).to(dtype)


def versus_transformer(
    L: int = 16384,
    reps: int = 3,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    threads: Sequence[int] = (1, 2),
) -> dict[str, Any]:
    """Warm batch-1 prefill of L tokens: the shipped S4 text model against the parameter-matched
    Transformer, same tokens, dtype and torch threads, alternated `reps` times after a warm-up each;
    medians in seconds and the ratio Transformer / S4 (the issue's goal: ≥ 6 at L = 16,384)."""
    from bench.baselines.transformer import TransformerLM, matched_config
    from model import load, recurrent

    info = machine_info()  # before the run: its date, load and commit
    tok = torch.randint(0, 256, (1, L))
    before = torch.get_num_threads()
    out = []
    try:
        for name in dtypes:
            dtype = getattr(torch, name)
            net = load(str(CHECKPOINT))
            rec = recurrent.RecurrentModel(net, dtype=dtype)
            rec_torch = recurrent.RecurrentModel(net, dtype=dtype, fused_step=False)  # the torch-op SSM
            tf = _matched_transformer(L, dtype)
            s4_params = rec.net.num_params()
            tf_params = TransformerLM(matched_config()).num_params()  # at its trained positions

            def run_s4(rec=rec, logits="all") -> None:
                rec.prefill(tok, rec.init_state(1), logits=logits)

            @torch.inference_mode()
            def run_tf(tf=tf) -> None:
                tf(tok, tf.new_cache(1, L))

            for n in threads:
                torch.set_num_threads(n)
                rec.prefill_threads = rec_torch.prefill_threads = n
                runs = [
                    ("s4", run_s4),
                    ("s4_ingest", functools.partial(run_s4, logits="none")),
                    ("s4_torch_ssm", functools.partial(run_s4, rec_torch)),
                    ("transformer", run_tf),
                ]
                samples: dict[str, list[float]] = {key: [] for key, _ in runs}
                for _, fn in runs:
                    fn()  # warm-up at L
                for i in range(reps):
                    for key, fn in runs if i % 2 == 0 else runs[::-1]:
                        samples[key].append(_timed(fn))
                row = dict(dtype=name, threads=n, length=L, batch=1, reps=reps, s4_params=s4_params)
                row["transformer_params_at_trained_positions"] = tf_params
                for key, _ in runs:
                    row[f"{key}_samples"] = samples[key]
                    row[f"{key}_s"] = statistics.median(samples[key])
                    row[f"{key}_tokens_per_s"] = L / row[f"{key}_s"]
                row["transformer_over_s4"] = row["transformer_s"] / row["s4_s"]
                row["torch_ssm_over_c"] = row["s4_torch_ssm_s"] / row["s4_s"]
                out.append(row)
                s4, ing, old, tf = (
                    f"{row[k + '_s'] * 1e3:6.1f} ms ({row[k + '_tokens_per_s'] / 1e3:5.1f}k tok/s)"
                    for k, _ in runs
                )
                ratio = row["transformer_over_s4"]
                print(f"{name:8s} {n} thread(s): S4 {s4}, ingest (no logits) {ing}, torch SSM {old}, "
                      f"Transformer {tf}: {ratio:.1f}x", flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return {"checkpoint": str(CHECKPOINT.relative_to(ROOT)), "goal_ratio": GOAL_OVER_TRANSFORMER,
            "goal_tokens_per_s": GOAL_TOKENS_PER_S, "machine": info, "rows": out}  # fmt: skip


def _line(r: dict[str, Any]) -> str:
    parts = [f"L={r['length']:6d} B={r['batch']:2d}"]
    for name in ("old", "new"):
        if f"{name}_warm_s" in r:
            tps = r[f"{name}_warm_tokens_per_s"]
            parts.append(
                f"{name}: warm {r[f'{name}_warm_s'] * 1e3:8.1f} ms ({tps:9.0f} tok/s)"
                f" cold {r[f'{name}_cold_s'] * 1e3:8.1f} ms ({r[f'{name}_cold_over_warm']:.2f}x)"
            )
    if r.get("step_s") is not None:
        parts.append(f"stepping {r['step_s'] * 1e3:8.1f} ms")
    return "  ".join(parts)


def plot(data: dict[str, Any], quick: bool) -> None:
    vs = data.get("vs_transformer")
    fig, axes = subplots(2 if vs else 1, width=7)
    ax = axes[0]
    rows = data["rows"]
    labels = [f"{r['length']}×{r['batch']}" for r in rows]
    xs = range(len(rows))
    series = [(f"{n} {k}", f"{n}_{k}_s") for n in ("old", "new") for k in ("warm", "cold")] + [
        ("stepping", "step_s")
    ]
    width = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        vals = [r.get(key) or float("nan") for r in rows]
        ax.bar([x + i * width for x in xs], vals, width, label=label)
    ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in xs], labels)
    ax.set_xlabel("prompt tokens × batch")
    ax.set_ylabel("seconds (median)")
    ax.legend(fontsize=8)
    if vs:
        ax = axes[1]
        xs = range(len(vs["rows"]))
        kinds = ("s4", "s4_ingest", "s4_torch_ssm", "transformer")
        keys = [k for k in kinds if f"{k}_tokens_per_s" in vs["rows"][0]]
        w = 0.8 / len(keys)
        for i, key in enumerate(keys):
            ax.bar([x + i * w for x in xs], [r[f"{key}_tokens_per_s"] for r in vs["rows"]], w, label=key)
        ax.axhline(vs["goal_tokens_per_s"], color="k", ls="--", lw=1, label="goal (S4)")
        ticks = [f"{r['dtype']}\n{r['threads']} thr" for r in vs["rows"]]
        ax.set_xticks([x + 0.4 - w / 2 for x in xs], ticks)
        ax.set_ylabel(f"warm prefill tokens/s, {vs['rows'][0]['length']} × 1")
        ax.set_title("S4 vs the parameter-matched Transformer", fontsize=9)
        ax.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="prefill: baseline vs this tree (text-shakespeare, CPU)")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--lengths", type=int, nargs="+", help="lengths (default 2048 16384, --quick 200 1000)")
    p.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; --quick 1 2)")
    p.add_argument("--reps", type=int,
                   help="repetitions, alternated; the median is taken (default 3; --quick 2)")  # fmt: skip
    p.add_argument("--step-max-tokens", type=int, default=16384, help="step only prompts of ≤ this L·B")
    p.add_argument("--quick", action="store_true",
                   help="short defaults (--contention, --crossover too), to results/quick/")  # fmt: skip
    p.add_argument("--replot", action="store_true")
    p.add_argument("--append", action="store_true", help="add these rows to the existing JSON (runs < 1 min)")
    p.add_argument("--no-baseline", action="store_true", help="this tree only")
    p.add_argument("--contention", action="store_true", help="2,048 x 1 with and without a busy process")
    p.add_argument("--crossover", action="store_true", help="short prompts: C layer by layer vs parallel")
    p.add_argument("--vs-transformer", action="store_true",
                   help="16,384 x 1 warm: S4 vs the matched Transformer")  # fmt: skip
    args = p.parse_args(argv)
    if args.replot:
        data = read_results(NAME, args.quick)
        if data is None:
            p.error("no results to replot")
    else:
        defaults = ([200, 1000], [1, 2], 2) if args.quick else ([2048, 16384], [1, 8], 3)  # what is not given
        args.lengths = args.lengths or defaults[0]
        args.batches = args.batches or defaults[1]
        args.reps = defaults[2] if args.reps is None else args.reps
        for v in (*args.lengths, *args.batches, args.reps):
            if not 1 <= v <= 1 << 20:
                p.error(f"lengths, batches and reps must be in [1, 2^20], got {v}")
        extra = {
            "contention": lambda: contention(256, 1) if args.quick else contention(),
            "crossover": lambda: crossover((32, 128), 2) if args.quick else crossover(),
            "vs_transformer": lambda: versus_transformer(2048, 2) if args.quick else versus_transformer(),
        }
        chosen = [k for k in extra if getattr(args, k)]
        if chosen:
            data = read_results(NAME, args.quick) or {"rows": []}
            for k in chosen:
                if k == "vs_transformer" and "vs_transformer" in data:  # keep the earlier runs (the last 5)
                    data["vs_transformer_earlier"] = [*data.get("vs_transformer_earlier", []), data[k]][-5:]
                data[k] = extra[k]()
            info = machine_info()  # each section keeps the machine of the run that measured it
            for k in chosen:
                data[k] = {**data[k], "machine": data[k].get("machine", info)}
            kept = {k: v for k, v in data.items() if k not in ("benchmark", "quick", "machine")}
            data = write_results(NAME, kept, args.quick)
        else:
            baseline = not args.no_baseline
            results = measure(args.lengths, args.batches, args.reps, args.step_max_tokens, baseline)
            old = read_results(NAME, args.quick) if args.append else None
            # one machine block per run (the top-level "machine" is the last write's): each row names
            # its run, an index into machine_by_run. A file from before has one block, its "machine",
            # which its rows are given (what it said of them).
            runs = [] if old is None else list(old.get("machine_by_run") or [old["machine"]])
            runs.append(machine_info())
            rows = [{**r, "run": len(runs) - 1} for r in results["rows"]]
            results["rows"] = rows if old is None else [{"run": 0, **r} for r in old["rows"]] + rows
            results["machine_by_run"] = runs
            if old is not None:
                results["load_average_before"] = [old["load_average_before"], results["load_average_before"]]
                results.update({k: old[k] for k in extra if k in old})
            data = write_results(NAME, results, args.quick)
    plot(data, args.quick)


if __name__ == "__main__":
    main()
