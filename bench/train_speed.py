"""Conv-mode training step, before and after the faster backward passes, side by side in one process.

One full training step as `model.train` runs it (forward, next-token cross-entropy, zero_grad,
backward, gradient clipping, AdamW step) for a shipped config's model, timed alternately for

    before: the previous implementations (autograd through the FFT convolution, the two-term Cauchy
            sum with checkpointed chunks, the SSM output left in transposed strides)
    after:  the current code (hand-written backward for both, contiguous SSM output)

so that the load of this shared machine hits both alike. Both nets start from the same weights; the
first step's gradients of the two paths are compared (they must agree to float32 rounding).

    python -m bench.train_speed [--configs text audio sashimi] [--repeat 3] [--quick] [--replot]

(default: all three configs, about 2.5 minutes here).

Each config updates its own entry of bench/results/train_speed.json (and the PNG), so configs can be
run one at a time (each well under a minute here with the default sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import model.cauchy as cauchy_module
import model.layer as layer_module
from bench.common import ROOT, read_results, results_dir, save_figure, subplots, write_results
from model.train import build_s4, load_config

NAME = "train_speed"
PATHS = ("before", "after")
# name: (config file, batch, sequence length or None for the config's l_max); the audio batches are
# smaller than the configs' 8 clips so that a run stays under a minute (tokens/s is per token either
# way; a bigger batch only amortizes the kernel generation further).
CONFIGS: dict[str, tuple[str, int, int | None]] = {
    "text": ("configs/text-shakespeare.toml", 16, None),
    "audio": ("configs/audio-digits-s4.toml", 2, None),
    "sashimi": ("configs/audio-digits.toml", 2, None),
}
QUICK = {"d_model": 32, "n_layers": 1, "l_max": 256}


def _autograd_fft_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """The previous `fft_conv`: the same FFTs, autograd's backward (a complex FFT for rfft's)."""
    L = u.shape[-1]
    n = 2 * L
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :L]


def _transposed_ssm(self: layer_module.S4Layer, u: torch.Tensor) -> torch.Tensor:
    """The previous `S4Layer.ssm`: its output left as a transposed view."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    K = self.kernel(u.shape[1], dtype=dtype)
    return layer_module.fft_conv(u.transpose(1, 2), K.to(u.dtype)).transpose(1, 2)


@contextlib.contextmanager
def before_path() -> Iterator[None]:
    """Swap the previous implementations in for the duration of the block."""
    saved = (layer_module.fft_conv, cauchy_module.cauchy_torch, layer_module.S4Layer.ssm)
    layer_module.fft_conv = _autograd_fft_conv
    cauchy_module.cauchy_torch = cauchy_module.cauchy_torch_autograd
    layer_module.S4Layer.ssm = _transposed_ssm
    try:
        yield
    finally:
        layer_module.fft_conv, cauchy_module.cauchy_torch, layer_module.S4Layer.ssm = saved


def _path(name: str):
    return before_path() if name == "before" else contextlib.nullcontext()


def measure(config: str, quick: bool, repeat: int) -> dict[str, Any]:
    path, batch, L = CONFIGS[config]
    load_start = list(os.getloadavg())
    cfg = load_config(ROOT / path)
    model_cfg = dict(cfg["model"])
    if quick:
        model_cfg.update(QUICK)
        if model_cfg.get("arch") == "sashimi":
            model_cfg["n_layers"] = 1
    L = L or model_cfg["l_max"]
    threads = int(cfg.get("train", {}).get("threads", 0)) or torch.get_num_threads()
    torch.set_num_threads(threads)
    lr, wd, ssm_lr = 3e-3, 0.05, 1e-3
    nets, opts = {}, {}
    for p in PATHS:
        torch.manual_seed(0)
        nets[p] = build_s4(model_cfg)
        opts[p] = torch.optim.AdamW(nets[p].param_groups(lr, wd, ssm_lr), lr=lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, model_cfg["vocab_size"], (batch, L + 1), generator=g)
    x, y = data[:, :-1], data[:, 1:]

    def step(p: str) -> tuple[float, dict[str, torch.Tensor]]:
        net, opt = nets[p], opts[p]
        with _path(p):
            logits = net(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        grads = {n: q.grad.clone() for n, q in net.named_parameters()}
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return float(loss.detach()), grads

    # The first (warm-up) step of each path: its gradients are compared, not timed.
    first = {p: step(p) for p in PATHS}
    grad_rel = max(
        float((first["after"][1][n] - gb).abs().max() / gb.abs().max().clamp(min=1e-30))
        for n, gb in first["before"][1].items()
    )
    samples: dict[str, list[float]] = {p: [] for p in PATHS}
    for i in range(repeat):
        for p in PATHS if i % 2 == 0 else PATHS[::-1]:  # alternate which goes first
            t0 = time.perf_counter()
            step(p)
            samples[p].append(time.perf_counter() - t0)
    row: dict[str, Any] = {
        "config": path,
        "model": {
            k: model_cfg[k] for k in ("arch", "d_model", "n_layers", "d_state", "kernel") if k in model_cfg
        },
        "cauchy_backend": model_cfg.get("cauchy_backend", "auto"),
        "batch": batch,
        "L": L,
        "threads": threads,
        "first_loss": {p: first[p][0] for p in PATHS},
        "first_step_grad_max_rel_diff": grad_rel,
        "load_average_start": load_start,  # 1, 5, 15 min
        "load_average_end": list(os.getloadavg()),
    }
    for p in PATHS:
        t = statistics.median(samples[p])
        row[p] = {"samples_s": samples[p], "median_s": t, "tokens_per_s": batch * L / t}
    row["speedup"] = row["before"]["median_s"] / row["after"]["median_s"]
    return row


def plot(data: dict[str, Any], quick: bool) -> None:
    rows = data["results"]
    names = [n for n in CONFIGS if n in rows]
    fig, (ax,) = subplots(1, width=6.5)
    width = 0.38
    colors = {"before": "tab:gray", "after": "tab:blue"}
    for i, n in enumerate(names):
        for j, p in enumerate(PATHS):
            v = rows[n][p]["tokens_per_s"]
            x = i + (j - 0.5) * width
            ax.bar(x, v, width, color=colors[p], label=p if i == 0 else None)
            ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
        r = rows[n]
        top = max(r["before"]["tokens_per_s"], r["after"]["tokens_per_s"])
        ax.annotate(f"×{r['speedup']:.2f}", (i, top), xytext=(0, 14), textcoords="offset points", ha="center",
                    fontsize=9, weight="bold")  # fmt: skip
    labels = [f"{n}\nB={rows[n]['batch']}×L={rows[n]['L']}\n{rows[n]['threads']} thread(s)" for n in names]
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("training tokens / s (forward + backward + AdamW)")
    ax.margins(y=0.2)
    ax.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="conv-mode training step, before vs after (CPU, medians)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per path (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test), to results/quick/")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the existing JSON only")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    old = read_results(NAME, args.quick) or {}
    if args.replot:
        if not old:
            parser.error(f"no {results_dir(args.quick) / NAME}.json to replot")
        plot(old, args.quick)
        return
    results = dict(old.get("results", {}))
    runs = dict(old.get("machine_by_config", {}))
    for name in args.configs:
        row = measure(name, args.quick, args.repeat)
        results[name] = row
        b, a = row["before"], row["after"]
        print(
            f"{name:8s} B={row['batch']} L={row['L']} threads={row['threads']}: before "
            f"{b['tokens_per_s']:8,.0f} tok/s ({b['median_s']:.2f} s/step)  after {a['tokens_per_s']:8,.0f} "
            f"tok/s ({a['median_s']:.2f} s/step)  x{row['speedup']:.2f}  first-step grad rel diff "
            f"{row['first_step_grad_max_rel_diff']:.1e}",
            flush=True,
        )
    data = write_results(
        NAME,
        {
            "description": "one conv-mode training step (forward, cross-entropy, zero_grad, backward, "
            "clip, AdamW) on random tokens, before vs after, alternating in one process; median of the "
            "timed steps after one warm-up step per path; tokens/s = batch*L / median",
            "results": results,
            "machine_by_config": runs,
        },
        args.quick,
    )
    for name in args.configs:  # the machine info of the run that produced each entry
        data["machine_by_config"][name] = data["machine"]
    (results_dir(args.quick) / f"{NAME}.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(data, args.quick)


if __name__ == "__main__":
    main()
