"""Memory per session as the context grows: the S4 recurrent state (constant) vs the Transformer's KV
cache (linear in the context), analytic over 256 … 128k tokens and measured at a few contexts.

Models: the text S4 (4 layers, H = 256, N = 64) and the audio S4 (4 layers, H = 128, N = 64) as served,
and a Transformer of the same parameter count as that text S4 (4 layers, d_model 128, 924,160
parameters: the text model's shape before its FF blocks; bench.generation now compares the shipped
model with its 1.98 M-parameter matched baseline, whose KV cache is 1.5× this one's). Measured, per
model in a fresh child process: for each context and batch, peak RSS above the baseline while a
batch's state / KV cache is allocated, filled with random values (no prefill: contents do not change
the size) and stepped once; bytes per session = the marginal cost (peak at batch B − peak at batch 1)
/ (B − 1), so one-time costs cancel (B = 512 for S4, whose 128-256 KiB per session would drown in
allocator noise at a few sessions; 8 for the Transformer).

    python -m bench.memory [--quick]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from bench.common import MB, PeakMemory, bench_main, log2_axis, run_child, save_figure, subplots

NAME = "memory"
SIZES: dict[bool, dict[str, Any]] = {
    False: {
        "models": {
            "s4-text": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
            "s4-audio": {"vocab_size": 256, "d_model": 128, "n_layers": 4, "d_state": 64, "l_max": 1024},
            "transformer": {"vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 448},
        },
        "analytic_contexts": [2**k for k in range(8, 18)],
        "measured_contexts": [1024, 4096, 16384, 65536],
        "batches": {"s4": [1, 512], "transformer": [1, 8]},  # S4: enough sessions to see in the RSS
    },
    True: {
        "models": {
            "s4-text": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "d_state": 16, "l_max": 128},
            "transformer": {"vocab_size": 256, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 32},
        },
        "analytic_contexts": [2**k for k in range(6, 12)],
        "measured_contexts": [256, 1024],
        "batches": {"s4": [1, 64], "transformer": [1, 4]},
    },
}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS above baseline for every (context, batch) of one model."""
    torch.manual_seed(0)
    cfg, out = spec["config"], []
    if spec["kind"] == "s4":
        from model import ModelConfig, SequenceModel

        rec = SequenceModel(ModelConfig(cauchy_backend="torch", **cfg)).to_recurrent()
        params = sum(p.numel() for p in rec.net.parameters())
    else:
        from bench.baselines.transformer import TransformerConfig, TransformerLM

        net = TransformerLM(TransformerConfig(**cfg, max_len=max(spec["contexts"]) + 2)).eval()
        params = net.num_params()
    # the first configuration runs once more, unrecorded, before the others: it pays one-time costs
    runs = [(spec["contexts"][0], spec["batches"][0], False)]
    runs += [(c, b, True) for c in spec["contexts"] for b in spec["batches"]]
    for context, batch, record in runs:
        tok = torch.zeros(batch, dtype=torch.long)
        with torch.inference_mode(), PeakMemory() as mem:
            if spec["kind"] == "s4":
                state = rec.init_state(batch).normal_(std=0.01)  # the size is context-independent
                rec.step(tok, state, out=state)
                analytic = rec.state_bytes_per_sequence
            else:
                cache = net.new_cache(batch, context + 1)
                cache.k.normal_()
                cache.v.normal_()
                cache.length = context
                net(tok[:, None], cache)
                analytic = cache.bytes_per_sequence(context)
        if record:
            out.append(
                {"context": context, "batch": batch, "analytic_bytes_per_sequence": analytic, **mem.as_dict()}
            )
        state = cache = None  # noqa: F841  (free before the next measurement)
    return {"params": params, "results": out}


def analytic_bytes(kind: str, cfg: dict[str, Any], context: int) -> int:
    """S4: n_layers × H × N/2 complex modes × 8 bytes; Transformer: keys + values, float32."""
    if kind == "s4":
        return cfg["n_layers"] * cfg["d_model"] * (cfg["d_state"] // 2) * 2 * 4
    return 2 * cfg["n_layers"] * cfg["d_model"] * context * 4


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)  # children: big buffers mmapped, unmapped on free
    models = {}
    for name, cfg in sz["models"].items():
        kind = "s4" if name.startswith("s4") else "transformer"
        batches = sz["batches"][kind]
        spec = {"kind": kind, "config": cfg, "contexts": sz["measured_contexts"], "batches": batches}
        res = run_child(f"bench.{NAME}", spec, timeout=600)
        measured = []
        for context in sz["measured_contexts"]:
            got = {r["batch"]: r for r in res.get("results", []) if r["context"] == context}
            lo, hi = min(batches), max(batches)
            if lo in got and hi in got:
                marginal = (got[hi]["peak_rss_delta_bytes"] - got[lo]["peak_rss_delta_bytes"]) / (hi - lo)
                ana = got[hi]["analytic_bytes_per_sequence"]
                measured.append(
                    {
                        "context": context,
                        "bytes_per_sequence_marginal": max(0.0, marginal),
                        "analytic_bytes_per_sequence": ana,
                    }
                )
                print(
                    f"{name:12s} context {context:6d}: analytic {ana / MB:9.3f} MiB, "
                    f"measured {max(0.0, marginal) / MB:9.3f} MiB per session",
                    flush=True,
                )
        analytic = [
            {"context": c, "bytes_per_sequence": analytic_bytes(kind, cfg, c)}
            for c in sz["analytic_contexts"]
        ]
        models[name] = {
            "kind": kind,
            "config": cfg,
            "params": res.get("params"),
            "analytic": analytic,
            "measured": measured,
            "raw": res.get("results"),
            "error": res.get("error"),
        }
    return {
        "description": "bytes of per-session state: analytic (S4: n_layers·H·N/2 complex float32; "
        "Transformer: 2·n_layers·d_model·context float32) and measured (marginal peak RSS per session "
        "between the two batch sizes of sizes.batches: allocate, fill with random values, one step; the "
        "children run with MALLOC_MMAP_THRESHOLD_ fixed, so freed buffers leave the RSS)",
        "sizes": sz,
        "models": models,
        "errors": [f"{name}: {m['error']}" for name, m in models.items() if m["error"]],
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax,) = subplots(1, width=7)
    colors = {"s4-text": "tab:blue", "s4-audio": "tab:green", "transformer": "tab:red"}
    for name, m in data["models"].items():
        c = colors.get(name, "k")
        a = m["analytic"]
        ax.plot(
            [r["context"] for r in a],
            [r["bytes_per_sequence"] / MB for r in a],
            "-",
            color=c,
            label=f"{name} analytic",
        )
        if m["measured"]:
            xs = [r["context"] for r in m["measured"]]
            ys = [max(r["bytes_per_sequence_marginal"], 1) / MB for r in m["measured"]]
            ax.plot(xs, ys, "x", ms=9, color=c, label=f"{name} measured")
    log2_axis(ax, data["sizes"]["analytic_contexts"])
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_yscale("log")
    ax.set(xlabel="context (tokens)", ylabel="MiB per session", title="state (S4) vs KV cache (Transformer)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="Memory per session as the context grows (float32)")


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, child=child)


if __name__ == "__main__":
    main()
