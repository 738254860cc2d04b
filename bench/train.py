"""Conv-mode training step speed and peak memory: forward + backward of the next-token cross-entropy,
Cauchy/Vandermonde backend keops vs torch, kernel s4 and s4d. Each configuration runs in a fresh
subprocess so its peak RSS is its own.

    python -m bench.train [--quick]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    PeakMemory,
    bench_main,
    matmul_gflops_by_size,
    run_child,
    save_figure,
    subplots,
    time_samples,
)
from model import ModelConfig, SequenceModel

NAME = "train"
KINDS = ("s4", "s4d")
BACKENDS = ("keops", "torch")
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {
        "model": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64},
        "L": 4096,
        "batch": 2,
        "warmup": 1,
        "repeat": 3,
        "max_seconds": 30.0,
    },
    True: {
        "model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "d_state": 16},
        "L": 256,
        "batch": 2,
        "warmup": 1,
        "repeat": 2,
        "max_seconds": 2.0,
    },
}


def _train_step(kind: str, backend: str, model_kw: dict[str, Any], L: int, batch: int) -> Callable[[], float]:
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(kernel=kind, cauchy_backend=backend, l_max=L, **model_kw))
    data = torch.randint(0, net.config.vocab_size, (batch, L + 1))
    inputs, targets = data[:, :-1], data[:, 1:]

    def step() -> float:
        net.zero_grad(set_to_none=True)
        logits = net(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        return float(loss)

    return step


def child(spec: dict[str, Any]) -> dict[str, Any]:
    kind, backend = spec["kind"], spec["backend"]
    # A tiny model first pages in the library code (FFT, KeOps formulas) before the memory baseline.
    tiny = {**spec["model"], "d_model": 8, "n_layers": 1, "d_state": min(16, spec["model"]["d_state"])}
    _train_step(kind, backend, tiny, 64, 1)()
    step = _train_step(kind, backend, spec["model"], spec["L"], spec["batch"])
    losses: list[float] = []
    with PeakMemory() as mem:
        samples = time_samples(
            lambda: losses.append(step()), spec["warmup"], spec["repeat"], spec["max_seconds"]
        )
    warmup_timed = samples.warmup_timed  # (the single sample is the warm-up call: over max_seconds)
    samples.sort()
    t = samples[len(samples) // 2]
    return {
        "time_s": t,
        "samples_s": list(samples),
        "warmup_timed": warmup_timed,
        "tokens_per_s": spec["batch"] * spec["L"] / t,
        "loss": losses[-1],
        **mem.as_dict(),
    }


def run(quick: bool) -> dict[str, Any]:
    cfg = SIZES[quick]
    rows = []
    for kind in KINDS:
        for backend in BACKENDS:
            row: dict[str, Any] = {"kind": kind, "backend": backend}
            row.update(run_child(f"bench.{NAME}", {**cfg, **row}))
            if "error" in row:
                print(f"{kind:4s} {backend:6s} ERROR {row['error']}", flush=True)
            else:
                print(
                    f"{kind:4s} {backend:6s} {row['time_s']:8.3f} s/step  {row['tokens_per_s']:9.0f} tok/s  "
                    f"peak +{row['peak_rss_delta_mb']:8.1f} MiB  (n={len(row['samples_s'])}, "
                    f"loss {row['loss']:.3f})",
                    flush=True,
                )
            rows.append(row)
    return {
        "description": "conv-mode training step (zero_grad, forward, next-token cross-entropy, backward; "
        "no optimizer): median wall time, tokens/s = batch*L / time, peak RSS above the pre-work "
        "baseline, each configuration in a fresh subprocess",
        "sizes": cfg,
        "matmul_gflops": matmul_gflops_by_size(),
        "results": rows,
        "errors": [f"{r['kind']} {r['backend']}: {r['error']}" for r in rows if "error" in r],
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax_t, ax_m) = subplots(2, width=5.5)
    colors = {"keops": "tab:blue", "torch": "tab:orange"}
    width = 0.38
    for j, backend in enumerate(BACKENDS):
        for i, kind in enumerate(KINDS):
            r = next(r for r in data["results"] if r["kind"] == kind and r["backend"] == backend)
            x = i + (j - 0.5) * width
            label = backend if i == 0 else None
            if "error" in r:
                for ax in (ax_t, ax_m):
                    ax.annotate("failed", (x, 0), ha="center", va="bottom", fontsize=8)
                continue
            mb = r["peak_rss_delta_mb"]
            ax_t.bar(x, r["tokens_per_s"], width, color=colors[backend], label=label)
            ax_m.bar(x, mb, width, color=colors[backend], label=label)
            ax_t.annotate(
                f"{r['tokens_per_s']:.0f}", (x, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8
            )
            ax_m.annotate(f"{mb:.0f}", (x, mb), ha="center", va="bottom", fontsize=8)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(KINDS)), [f"kernel {k}" for k in KINDS])
        ax.legend(title="Cauchy backend", fontsize=8)
        ax.margins(y=0.12)
    ax_t.set_ylabel("tokens / s (forward + backward)")
    ax_m.set_ylabel("peak RSS above baseline (MiB)")
    ax_t.set_title("training throughput")
    ax_m.set_title("peak memory")
    s, m = data["sizes"], data["sizes"]["model"]
    save_figure(
        fig,
        NAME,
        quick,
        title=f"training step: batch {s['batch']} x L={s['L']}, {m['n_layers']} layers, "
        f"H={m['d_model']}, N={m['d_state']} (CPU)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, child)


if __name__ == "__main__":
    main()
