"""Recurrent generation speed: `RecurrentModel.step` tokens/s vs batch size, against the matmul ceiling,
and `prefill` of a prompt vs the same number of sequential steps.

Achieved GFLOP/s use FLOPs per token counted analytically from the model shapes (`flops_per_token`);
the ceiling is the measured fp32 torch.mm rate, so "% of ceiling" says how far the step is from
being compute-bound (a batch-1 step is dominated by per-op overhead, not FLOPs).

    python -m bench.step [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import (
    bench_main,
    copy_gbps_by_size,
    log2_axis,
    matmul_gflops_by_size,
    plain_block,
    save_figure,
    subplots,
    timeit,
)
from model import ModelConfig, RecurrentModel, SequenceModel, fused

NAME = "step"
# kind: (kernel, extra config). "s4d-ff" has the shipped text model's shape (diagonal layers of 32 modes
# and FF blocks of 2H, as checkpoints/text-shakespeare converts); "s4" and "s4d" are the shape it had
# before issue 15 (no FF blocks), which the issue-18 figures started from.
KINDS = {"s4": ("s4", {}), "s4d": ("s4d", {}), "s4d-ff": ("s4d", {"d_ff": "2H"})}
BLOCK_K = 32  # steps per native decode block (bench: the `block` rows)
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {
        "model": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
        "batches": [1, 4, 16, 32, 64, 128, 256],
        "max_steps": 200,
        "min_steps": 10,
        "seconds_per_batch": 5.0,
        "prompt": 1024,
        "block_repeat": 3,
    },
    True: {
        "model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "d_state": 16, "l_max": 128},
        "batches": [1, 8],
        "max_steps": 20,
        "min_steps": 5,
        "seconds_per_batch": 1.0,
        "prompt": 128,
        "block_repeat": 1,
    },
}

FLOPS_FORMULA = (
    "per token: sum over layers of [layernorm 5H + SSM step + D skip & GELU 10H + output linear 2*H*2H "
    "+ GLU 2H (+ feed-forward 2*2*H*d_ff + 10*d_ff + layernorm 5H when d_ff > 0)] + final layernorm 5H "
    "+ head 2*H*V; SSM step = 12*H*M for a 'diagonal' layer (2x2 block mul-add 8 + output 4 real flops "
    "per slot), (8 + 16*rank)*H*M for a 'dplr' layer; M = the layer's slots (a complex mode or two real "
    "modes each) or complex modes (rec.report[i]['modes'])"
)


def flops_per_token(rec: RecurrentModel) -> dict[str, Any]:
    """Analytic FLOPs per generated token of `rec.step` (see FLOPS_FORMULA)."""
    cfg = rec.config
    H, V, F = cfg.d_model, cfg.vocab_size, cfg.d_ff
    layers = []
    for rep, kernel in zip(rec.report, rec.net.kernels(), strict=True):
        M = int(rep["modes"])
        ssm = 12 * H * M if rep["form"] == "diagonal" else (8 + 16 * kernel.rank) * H * M
        dense = 5 * H + 10 * H + 2 * H * 2 * H + 2 * H
        ff = (2 * 2 * H * F + 10 * F + 5 * H) if F else 0
        layers.append({"form": rep["form"], "modes": M, "ssm": ssm, "other": dense + ff})
    head = 5 * H + 2 * H * V
    total = sum(lay["ssm"] + lay["other"] for lay in layers) + head
    return {"total": total, "head": head, "layers": layers, "formula": FLOPS_FORMULA}


def build(
    kind: str, model_kw: dict[str, Any], fused: bool = True, network: bool = True
) -> tuple[RecurrentModel, float]:
    torch.manual_seed(0)
    kernel, extra = KINDS[kind]
    extra = {k: 2 * model_kw["d_model"] if v == "2H" else v for k, v in extra.items()}
    net = SequenceModel(ModelConfig(kernel=kernel, cauchy_backend="torch", **model_kw, **extra))
    t0 = time.perf_counter()
    rec = net.to_recurrent(fused_step=fused, fused_network=network)
    return rec, time.perf_counter() - t0


# Step variants timed side by side: the torch-ops step (before), the fused C SSM step inside the torch
# ops returning a new state, the same updating the state in place (`out=state`, no allocation), and
# the whole network in one C call, in place (`network-c`, what `rec.step` runs for batches up to
# `rec.net_step_max_batch`; timed here at every batch size to show the crossover).
VARIANTS = {  # name: (build kwargs, in place)
    "torch-ops": ({"fused": False, "network": False}, False),
    "fused": ({"fused": True, "network": False}, False),
    "fused-inplace": ({"fused": True, "network": False}, True),
    "network-c": ({"fused": True, "network": True}, True),
}


def time_steps(
    rec: RecurrentModel, batch: int, cfg: dict[str, Any], in_place: bool = False
) -> dict[str, Any]:
    """Per-step wall times of rec.step at one batch size (fixed random tokens, state carried)."""
    V = rec.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    tokens = torch.randint(0, V, (cfg["max_steps"] + 3, batch), generator=gen)
    state = rec.init_state(batch)
    out = state if in_place else None
    for i in range(3):  # warmup
        _, state = rec.step(tokens[i], state, out=out)
    t0 = time.perf_counter()
    _, state = rec.step(tokens[0], state, out=out)
    first = time.perf_counter() - t0
    n = int(min(cfg["max_steps"], max(cfg["min_steps"], cfg["seconds_per_batch"] / max(first, 1e-9))))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        _, state = rec.step(tokens[i + 3], state, out=out)
        times.append(time.perf_counter() - t0)
    med, mean = statistics.median(times), statistics.fmean(times)
    return {
        "batch": batch,
        "steps_timed": n,
        "us_per_step_median": med * 1e6,
        "us_per_step_mean": mean * 1e6,
        "tokens_per_s": batch / med,
        "tokens_per_s_from_mean": batch / mean,
    }


def time_blocks(rec: RecurrentModel, batch: int, repeat: int) -> dict[str, Any]:
    """Tokens/s of `rec.decode_block` (BLOCK_K steps with plain seeded sampling, no stops) at one batch
    size in two row orders, alternated `repeat` times, best of each (the least disturbed): "every-step"
    (schedule (0, 1): every step takes all a thread's rows, as before) and "grouped" (the default
    fused.BLOCK_SCHEDULE: groups of rows through rounds of steps, the state kept in cache)."""
    state, tok = rec.init_state(batch), torch.zeros(batch, dtype=torch.long)
    orders = {"every-step": (0, 1), "grouped": fused.BLOCK_SCHEDULE}
    best = dict.fromkeys(orders, 0.0)
    for i in range(repeat + 1):  # the first round warms up
        for name, schedule in orders.items():
            t0 = time.perf_counter()
            plain_block(rec, BLOCK_K, state, tok, schedule)
            dt = time.perf_counter() - t0
            if i > 0:
                best[name] = max(best[name], batch * BLOCK_K / dt)
    return {"batch": batch, "tokens_per_s": best, "schedule": list(fused.BLOCK_SCHEDULE)}


def time_prefill(rec: RecurrentModel, L: int) -> dict[str, Any]:
    """Batch-1 prompt of L tokens: one parallel prefill vs L sequential steps (same final state)."""
    tokens = torch.randint(0, rec.config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
    state0 = rec.init_state(1)
    t_prefill = timeit(lambda: rec.prefill(tokens, state0), warmup=1, repeat=3, max_seconds=20.0)
    logits_p, state_p = rec.prefill(tokens, state0)
    state = state0
    t0 = time.perf_counter()
    for i in range(L):
        logits_s, state = rec.step(tokens[:, i], state)
    t_seq = time.perf_counter() - t0
    state_err = float((state - state_p).abs().max() / state_p.abs().max().clamp(min=1e-30))
    logit_err = float((logits_s - logits_p[:, -1]).abs().max() / logits_p[:, -1].abs().max())
    return {
        "prompt_tokens": L,
        "prefill_s": t_prefill,
        "sequential_steps_s": t_seq,
        "speedup": t_seq / t_prefill,
        "prefill_tokens_per_s": L / t_prefill,
        "final_state_max_rel_diff": state_err,
        "last_logits_max_rel_diff": logit_err,
    }


def _tag(rows: list[dict[str, Any]], variant: str) -> list[dict[str, Any]]:
    return [r | {"variant": variant} for r in rows]


def run(quick: bool) -> dict[str, Any]:
    cfg = SIZES[quick]
    gflops_by_size = matmul_gflops_by_size()
    ceiling = max(gflops_by_size.values())
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s {gflops_by_size}", flush=True)
    copy_gbps = copy_gbps_by_size()  # a step reads and writes each row's state once: the memory bound
    print("copy bandwidth (read + write): " + ", ".join(f"{k} {v:.0f} GB/s" for k, v in copy_gbps.items()))
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        rec, t_convert = build(kind, cfg["model"])
        rec.net_step_max_batch = max(cfg["batches"])  # time the whole-network C step at every batch
        flops = flops_per_token(rec)
        ceiling_tps = ceiling * 1e9 / flops["total"]
        variants: dict[str, list[dict[str, Any]]] = {}
        for variant, (kw, in_place) in VARIANTS.items():
            rows = variants[variant] = []
            vrec = rec if variant == "network-c" else build(kind, cfg["model"], **kw)[0]
            for batch in cfg["batches"]:
                row = time_steps(vrec, batch, cfg, in_place)
                row["gflops"] = row["tokens_per_s"] * flops["total"] / 1e9
                row["fraction_of_ceiling"] = row["gflops"] / ceiling
                rows.append(row)
                print(
                    f"{kind:6s} {variant:13s} batch {batch:4d}: {row['us_per_step_median']:10.0f} µs/step "
                    f"{row['tokens_per_s']:10.0f} tok/s  {row['gflops']:6.2f} GFLOP/s "
                    f"({100 * row['fraction_of_ceiling']:.2f}% of ceiling, n={row['steps_timed']})",
                    flush=True,
                )
        # the faster in-place variant at each batch (the dispatch threshold was chosen from this
        # benchmark; since 2026-12-04 rec.step takes every batch in C: bench.big_batch)
        pairs = zip(
            _tag(variants["network-c"], "network-c"), _tag(variants["fused-inplace"], "fused-inplace")
        )
        rows = [max(pair, key=lambda r: r["tokens_per_s"]) for pair in pairs]
        blocks = []
        for batch in cfg["batches"]:  # the native decode block: the whole network's C step + sampling
            row = time_blocks(rec, batch, cfg["block_repeat"])
            row["fraction_of_ceiling"] = {
                k: v * flops["total"] / 1e9 / ceiling for k, v in row["tokens_per_s"].items()
            }
            blocks.append(row)
            print(
                f"{kind:6s} decode block batch {batch:4d}: "
                + ", ".join(
                    f"{k} {v:8.0f} tok/s ({100 * row['fraction_of_ceiling'][k]:.1f}% of ceiling)"
                    for k, v in row["tokens_per_s"].items()
                ),
                flush=True,
            )
        rec.net_step_max_batch = sys.maxsize
        prefill = time_prefill(rec, cfg["prompt"])
        print(
            f"{kind:6s} prefill {prefill['prompt_tokens']} tokens: {prefill['prefill_s']:.3f} s vs "
            f"{prefill['sequential_steps_s']:.3f} s sequential ({prefill['speedup']:.1f}x)",
            flush=True,
        )
        kinds[kind] = {
            "convert_s": t_convert,
            "layers": rec.report,
            "state_bytes_per_sequence": rec.state_bytes_per_sequence,
            "flops_per_token": flops,
            "ceiling_tokens_per_s": ceiling_tps,
            "step": rows,  # the faster in-place variant per batch (network-c or fused-inplace)
            "step_variants": variants,
            "decode_block": blocks,
            "prefill": prefill,
        }
    return {
        "description": "RecurrentModel.step: median wall time per step over `steps_timed` steps after 3 "
        "warmup steps (fixed random tokens, state carried); tokens/s = batch / median step time; "
        "GFLOP/s from the analytic FLOPs per token; ceiling = best fp32 torch.mm GFLOP/s. decode_block: "
        "RecurrentModel.decode_block of BLOCK_K steps with plain seeded sampling, best of block_repeat "
        "alternated runs per row order (time_blocks); its FLOPs are the step's (sampling not counted)",
        "sizes": {**cfg, "cauchy_backend": "torch"},
        "matmul_gflops": gflops_by_size,
        "copy_gbps": copy_gbps,
        "ceiling_gflops": ceiling,
        "kinds": kinds,
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax, ax_p) = subplots(2, height=8.0)
    colors = {"s4": "tab:blue", "s4d": "tab:green", "s4d-ff": "tab:red"}
    batches = data["sizes"]["batches"]
    for kind, d in data["kinds"].items():
        forms = "/".join(sorted({lay["form"] for lay in d["layers"]}))
        styles = {"torch-ops": ":", "fused": "-.", "fused-inplace": "--", "network-c": "-"}
        for variant, rows in d.get("step_variants", {"fused-inplace": d["step"]}).items():
            ax.plot(
                [r["batch"] for r in rows],
                [r["tokens_per_s"] for r in rows],
                marker="o",
                linestyle=styles[variant],
                color=colors[kind],
                label=f"{kind} {variant} ({forms} layers)",
            )
        blocks = d.get("decode_block", [])
        for order, style in (("every-step", (0, (1, 1))), ("grouped", (0, (5, 1)))):
            if blocks:
                ax.plot(
                    [r["batch"] for r in blocks],
                    [r["tokens_per_s"][order] for r in blocks],
                    marker="s",
                    linestyle=style,
                    color=colors[kind],
                    alpha=0.6,
                    label=f"{kind} decode block of {BLOCK_K}, {order} order (with sampling)",
                )
        ax.axhline(
            d["ceiling_tokens_per_s"],
            color=colors[kind],
            linestyle="--",
            label=f"{kind} matmul ceiling ({d['flops_per_token']['total'] / 1e6:.2f} MFLOP/token)",
        )
        for r in d["step"]:
            ax.annotate(
                f"{100 * r['fraction_of_ceiling']:.2g}%",
                (r["batch"], r["tokens_per_s"]),
                textcoords="offset points",
                xytext=(4, -12),
                fontsize=8,
                color=colors[kind],
            )
    log2_axis(ax, batches)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"step throughput (labels: % of the {data['ceiling_gflops']:.0f} GFLOP/s ceiling)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    kinds = list(data["kinds"])
    x = range(len(kinds))
    pre = [data["kinds"][k]["prefill"]["prefill_s"] for k in kinds]
    seq = [data["kinds"][k]["prefill"]["sequential_steps_s"] for k in kinds]
    ax_p.bar([i - 0.2 for i in x], pre, width=0.4, label="prefill (parallel)", color="tab:purple")
    ax_p.bar([i + 0.2 for i in x], seq, width=0.4, label="sequential steps", color="tab:gray")
    for i, (p, s) in enumerate(zip(pre, seq, strict=True)):
        ax_p.annotate(f"{p:.3g} s", (i - 0.2, p), ha="center", va="bottom", fontsize=8)
        ax_p.annotate(f"{s:.3g} s\n({s / p:.0f}x)", (i + 0.2, s), ha="center", va="bottom", fontsize=8)
    ax_p.set_ylim(min(pre + seq) / 2, max(pre + seq) * 4)
    ax_p.set_xticks(list(x), kinds)
    ax_p.set_yscale("log")
    ax_p.set_ylabel("seconds")
    L = data["kinds"][kinds[0]]["prefill"]["prompt_tokens"]
    ax_p.set_title(f"{L}-token prompt, batch 1")
    ax_p.legend(fontsize=8)
    m = data["sizes"]["model"]
    save_figure(
        fig,
        NAME,
        quick,
        title=f"recurrent generation: {m['n_layers']} layers, H={m['d_model']}, N={m['d_state']}, "
        f"V={m['vocab_size']} (CPU, {data['machine']['torch_threads']} threads)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
