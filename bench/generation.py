"""Generation speed, S4 vs a same-parameter-count causal Transformer with a KV cache, side by side in
one run: decode tokens/s and memory per sequence at contexts 1k, 4k, 16k, batch 1 and 32.

S4: the shipped text checkpoint (4 layers, H = 256, N = 64) when `checkpoints/text-shakespeare` exists,
else a random-init stand-in of the same shape (named in the JSON; speed does not depend on the
weights), stepped with `RecurrentModel.step(tokens, state, out=state)` (fused, in place).
Transformer: `bench.baselines.transformer` (pre-norm, learned positions, preallocated KV cache,
`scaled_dot_product_attention`), parameter-matched to the S4 model: with the shipped checkpoint, issue
15's trained-for-comparison baseline shape (`bench/baselines/transformer-shakespeare.toml`: 4 layers,
d_model 192, 4 heads, d_ff 801; 1,978,116 parameters at 256 positions against S4's 1,977,856); with
the stand-in, d_model 128, d_ff 448 (924,160 parameters at 1,024 positions, the stand-in's count). At
a longer context its position table grows to context + generated rows, which are looked up, not
multiplied (the JSON gives both counts).

Per configuration, in a fresh child process: prefill a random batch-1 context of `context` tokens for
real (timed), copy the resulting S4 state / KV cache into every row of the batch, then time `steps`
greedy decode steps (median step time → tokens/s). Memory per sequence: analytic state / KV bytes,
and measured: peak RSS above the baseline while the batch's state / cache is allocated, filled and
decoded; the marginal bytes of one more sequence = (peak at batch 32 − peak at batch 1) / 31.

    python -m bench.generation [--quick]
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.baselines.transformer import matched_config
from bench.common import (
    MB,
    ROOT,
    PeakMemory,
    bench_main,
    fmt,
    log2_axis,
    run_child,
    save_figure,
    subplots,
)

NAME = "generation"
SHIPPED = ROOT / "checkpoints" / "text-shakespeare"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {
        "s4": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
        "transformer": {
            "vocab_size": 256,
            "d_model": 128,
            "n_layers": 4,
            "n_heads": 4,
            "d_ff": 448,
            "max_len": 1024,
        },
        "contexts": [1024, 4096, 16384],
        "batches": [1, 32],
        "steps": 32,
        "warmup": 3,
        "max_seconds": 15.0,
    },
    True: {
        "s4": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "d_state": 16, "l_max": 128},
        "transformer": {
            "vocab_size": 256,
            "d_model": 16,
            "n_layers": 2,
            "n_heads": 2,
            "d_ff": 32,
            "max_len": 128,
        },
        "contexts": [128, 512],
        "batches": [1, 4],
        "steps": 8,
        "warmup": 2,
        "max_seconds": 2.0,
    },
}
GOAL_SPEEDUP_AT_16K = 60.0


# ---------------------------------------------------------------------------------------------
# The two models behind one interface: prefill a batch-1 context, copy it to a batch, decode steps


class S4Runner:
    def __init__(self, spec: dict[str, Any]) -> None:
        from model import ModelConfig, SequenceModel, load

        torch.manual_seed(0)
        if spec.get("checkpoint"):
            net = load(spec["checkpoint"])
        else:
            net = SequenceModel(ModelConfig(cauchy_backend="torch", **spec["s4"]))
        self.rec = net.to_recurrent()
        self.params = net.num_params()
        self.forms = [r["form"] for r in self.rec.report]

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        logits, self.one = self.rec.prefill(tokens, self.rec.init_state(1))
        return logits[:, -1].argmax(-1)

    def batch(self, batch: int) -> None:
        # a new tensor at every batch, 1 included (.contiguous() of batch 1 would be the prefill's own
        # state, allocated before the memory measurement starts: measured 0 bytes per sequence)
        self.state = self.one.expand(-1, batch, -1, -1, -1).clone(memory_format=torch.contiguous_format)
        del self.one  # only the batch's state stays resident

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        logits, _ = self.rec.step(tok, self.state, out=self.state)
        return logits.argmax(-1)

    def bytes_per_sequence(self, context: int) -> int:
        return self.rec.state_bytes_per_sequence


class TransformerRunner:
    def __init__(self, spec: dict[str, Any]) -> None:
        from bench.baselines.transformer import TransformerConfig, TransformerLM

        torch.manual_seed(0)
        self.capacity = spec["context"] + spec["warmup"] + spec["steps"] + 1
        shape = spec["transformer"]
        self.matched_len = shape["max_len"]  # the position count its parameter count is matched at
        cfg = TransformerConfig(**{**shape, "max_len": max(self.matched_len, self.capacity)})
        self.net = TransformerLM(cfg).eval().requires_grad_(False)
        self.params = self.net.num_params()
        self.params_matched = TransformerLM(TransformerConfig(**shape)).num_params()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.one = self.net.new_cache(1, tokens.shape[1])
        return self.net(tokens, self.one)[:, -1].argmax(-1)

    def batch(self, batch: int) -> None:
        self.cache = self.net.new_cache(batch, self.capacity).fill_(self.one)
        del self.one  # only the batch's cache stays resident

    @torch.inference_mode()
    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self.net(tok[:, None], self.cache)[:, -1].argmax(-1)

    def bytes_per_sequence(self, context: int) -> int:
        return self.cache.bytes_per_sequence(context)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, context, batch): prefill (batch 1), copy to the batch, decode; time and memory."""
    t0 = time.perf_counter()
    runner = S4Runner(spec) if spec["model"] == "s4" else TransformerRunner(spec)
    build_s = time.perf_counter() - t0
    context, batch = spec["context"], spec["batch"]
    tokens = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(context))
    t0 = time.perf_counter()
    tok = runner.prefill(tokens)
    prefill_s = time.perf_counter() - t0
    times: list[float] = []
    with PeakMemory() as mem:
        runner.batch(batch)
        tok = tok.expand(batch).contiguous()
        for _ in range(spec["warmup"]):
            tok = runner.step(tok)
        spent = 0.0
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            tok = runner.step(tok)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
            if spent > spec["max_seconds"] and len(times) >= 5:
                break
    med = statistics.median(times)
    out = {
        "model": spec["model"],
        "context": context,
        "batch": batch,
        "params": runner.params,
        "build_s": build_s,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": context / prefill_s,
        "steps_timed": len(times),
        "ms_per_step_median": med * 1e3,
        "ms_per_step_mean": statistics.fmean(times) * 1e3,
        "tokens_per_s": batch / med,
        "bytes_per_sequence_analytic": runner.bytes_per_sequence(context),
        "bytes_per_sequence_measured": mem.peak_bytes / batch,
        **mem.as_dict(),
    }
    if spec["model"] == "s4":
        out["layer_forms"] = runner.forms
    else:
        out["params_at_matched_len"] = runner.params_matched
        out["matched_len"] = runner.matched_len
        out["max_len"] = runner.net.config.max_len
    return out


# ---------------------------------------------------------------------------------------------


def marginal_memory(rows: list[dict[str, Any]]) -> None:
    """Measured bytes per sequence as the marginal cost of a sequence: (peak at the largest batch −
    peak at batch 1) / (batch − 1), per model and context; one-time costs (allocator arenas, the
    first step's workspace) cancel out. Added to every row of that model and context."""
    for r in rows:
        for model in ("s4", "transformer"):
            same = [
                q[model] for q in rows if q["context"] == r["context"] and "peak_rss_delta_bytes" in q[model]
            ]
            if len(same) < 2 or "peak_rss_delta_bytes" not in r[model]:
                continue
            lo, hi = min(same, key=lambda q: q["batch"]), max(same, key=lambda q: q["batch"])
            r[model]["bytes_per_sequence_marginal"] = max(
                0.0, (hi["peak_rss_delta_bytes"] - lo["peak_rss_delta_bytes"]) / (hi["batch"] - lo["batch"])
            )


def run(quick: bool) -> dict[str, Any]:
    cfg = SIZES[quick]
    # children: buffers above 128 KiB are mmapped and unmapped on free (no dynamic threshold), so the
    # prefill's freed temporaries do not hide the batch's state / cache from the RSS
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    ckpt = str(SHIPPED) if SHIPPED.exists() and not quick else None
    if ckpt:  # the shipped model's parameter-matched baseline (issue 15), not the stand-in's
        cfg = {**cfg, "transformer": dataclasses.asdict(matched_config())}
    rows = []
    for context in cfg["contexts"]:
        for batch in cfg["batches"]:
            pair = {}
            for model in ("s4", "transformer"):
                spec = {**cfg, "model": model, "context": context, "batch": batch, "checkpoint": ckpt}
                r = pair[model] = run_child(f"bench.{NAME}", spec, timeout=900)
                if "error" in r:
                    print(f"{model} context {context} batch {batch}: {r['error']}", flush=True)
                    continue
                print(
                    f"{model:11s} context {context:6d} batch {batch:3d}: "
                    f"{r['ms_per_step_median']:8.2f} ms/step "
                    f"{r['tokens_per_s']:9.0f} tok/s  prefill {r['prefill_s']:.2f} s  "
                    f"{r['bytes_per_sequence_analytic'] / MB:8.3f} MiB/seq analytic, "
                    f"{r['bytes_per_sequence_measured'] / MB:8.3f} measured",
                    flush=True,
                )
            row = {"context": context, "batch": batch, **pair}
            if "error" not in pair["s4"] and "error" not in pair["transformer"]:
                row["speedup"] = pair["s4"]["tokens_per_s"] / pair["transformer"]["tokens_per_s"]
                print(f"  S4 / Transformer: {row['speedup']:.1f}x", flush=True)
            rows.append(row)
    marginal_memory(rows)
    top = max(cfg["contexts"])
    at_top = {str(r["batch"]): r.get("speedup") for r in rows if r["context"] == top}
    return {
        "description": "decode tokens/s (batch / median step time over `steps` greedy steps after `warmup`) "
        "after a real batch-1 prefill of `context` random tokens copied into every row; memory per "
        "sequence: analytic state/KV bytes, and measured: peak RSS above baseline over allocation + fill "
        "+ decode (fresh child process per configuration); marginal = (peak at the largest batch − peak at "
        "batch 1) / (batch − 1)",
        "s4_model": f"shipped checkpoint {SHIPPED.name}" if ckpt else f"stand-in, random init: {cfg['s4']}",
        "transformer_params_note": "position table has max(matched_len, context + generated) rows; the "
        "parameter count is matched to S4's at matched_len rows (`params_at_matched_len`); extra rows are a "
        "lookup (no FLOPs per token)",
        "sizes": cfg,
        "results": rows,
        "goals": {"speedup_at_max_context": GOAL_SPEEDUP_AT_16K},
        "measured_vs_goals": {"max_context": top, "speedup_by_batch": at_top},
        "errors": [
            f"{m} context {r['context']} batch {r['batch']}: {r[m]['error']}"
            for r in rows
            for m in ("s4", "transformer")
            if "error" in r[m]
        ],  # fmt: skip
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    rows = data["results"]
    contexts = data["sizes"]["contexts"]
    fig, (ax, ax_s, ax_m) = subplots(3, width=5.5)
    colors = {"s4": "tab:blue", "transformer": "tab:red"}
    for batch, style in zip(data["sizes"]["batches"], ("-", "--", ":"), strict=False):
        sel = [r for r in rows if r["batch"] == batch]
        for model in ("s4", "transformer"):
            pts = [(r["context"], r[model]["tokens_per_s"]) for r in sel if "tokens_per_s" in r[model]]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), "o" + style, color=colors[model], label=f"{model}, batch {batch}"
                )
        pts = [(r["context"], r["speedup"]) for r in sel if "speedup" in r]
        if pts:
            ax_s.plot(*zip(*pts, strict=True), "o" + style, color="k", label=f"batch {batch}")
            for x, y in pts:
                ax_s.annotate(f"{y:.3g}x", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for model in ("s4", "transformer"):
            pts = [
                (r["context"], r[model]["bytes_per_sequence_marginal"] / MB)
                for r in sel
                if "bytes_per_sequence_marginal" in r[model]
            ]
            if pts and batch == max(data["sizes"]["batches"]):
                ax_m.plot(*zip(*pts, strict=True), "x", color=colors[model], ms=9,
                          label=f"{model} measured (marginal RSS per sequence)")  # fmt: skip
    for model in ("s4", "transformer"):
        pts = sorted({(r["context"], r[model]["bytes_per_sequence_analytic"] / MB) for r in rows
                      if "tokens_per_s" in r[model]})  # fmt: skip
        if pts:
            ax_m.plot(*zip(*pts, strict=True), "-", color=colors[model], label=f"{model} analytic")
    ax_s.axhline(data["goals"]["speedup_at_max_context"], color="grey", ls=":", label="goal (60x)")
    for a, ylabel, title in (
        (ax, "generated tokens / s", "decode throughput"),
        (ax_s, "S4 tokens/s ÷ Transformer tokens/s", "speedup"),
        (ax_m, "MiB per sequence", "state / KV cache per sequence"),
    ):
        log2_axis(a, contexts)
        a.set_yscale("log")
        a.set(xlabel="context (tokens)", ylabel=ylabel, title=title)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    save_figure(fig, NAME, quick, title=f"S4 ({data['s4_model']}) vs KV-cache Transformer, "
                f"CPU {data['machine']['torch_threads']} threads")  # fmt: skip


def table(data: dict[str, Any]) -> list[list[str]]:
    """Rows for the README / summary: context, batch, tokens/s each, speedup, MiB per sequence
    (analytic, measured marginal: S4 / Transformer)."""
    out = []
    for r in data["results"]:
        s, t = r["s4"], r["transformer"]
        out.append(
            [
                str(r["context"]),
                str(r["batch"]),
                fmt(s.get("tokens_per_s")),
                fmt(t.get("tokens_per_s")),
                f"{r['speedup']:.3g}x" if "speedup" in r else "—",
                _mib(s, "bytes_per_sequence_analytic") + " / " + _mib(t, "bytes_per_sequence_analytic"),
                _mib(s, "bytes_per_sequence_marginal") + " / " + _mib(t, "bytes_per_sequence_marginal"),
            ]
        )
    return out


def _mib(r: dict[str, Any], key: str) -> str:
    return fmt(r[key] / MB) if key in r else "—"


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, child=child)


if __name__ == "__main__":
    main()
