"""The shipped text model served from float32, bfloat16 and float16 weights on this CPU (`S4_DTYPE`),
side by side in one process, the variants alternated:

  * "float32", "bfloat16", "float16": the served form now. The whole-network C step reads 16-bit linear
    weights in their own dtype and widens them exactly in registers (float32 arithmetic, half the
    weight bytes per step); the torch ops (a long prompt's parallel prefill) compute in the dtype where
    the CPU multiplies it natively (`model.recurrent.native_matmul`), else in float32 on a widened copy.
  * "bfloat16 before", "float16 before": the form before (fused_network=False, the torch ops in the
    dtype): no whole-network C step, so no native decode block (the engine stepped and sampled in Python
    per token) and the parallel prefill for every prompt.

Per variant: the step (µs per call at batch 1, 8, 64), decoding (tokens/s at batch 1, 8, 64: the
native block of 32 steps with sampling, or for "before" the one-step loop: `rec.step` + `sample`),
prompt ingestion (ms for 256 and 2,048 tokens, batch 1, no logits), the bytes of linear weights a step
reads, and the logits' relative error over 256 tokens against float64 conv mode on the same 16-bit
weights (what the arithmetic adds) and on the float32 weights (what serving in 16 bits costs).
Medians of `repeat` alternated rounds. JSON + PNG in bench/results (quick: bench/results/quick).

`--arch sashimi`: the same figures for the shipped SaShiMi audio model (`checkpoints/audio-digits`;
quick: a tiny random SaShiMi), float32, bfloat16 and float16 as served now (no "before" variants: 16-bit
SaShiMi was refused until 2026-12-02), to dtype_sashimi.json / .png. Its whole-network C step
(fused.SaShiMiStep) reads the blocks' and pools' 16-bit linear weights as they are; its prefill is the
torch ops (no C prefill), in the dtype where the CPU multiplies it natively.

    python -m bench.dtype [--quick] [--arch sashimi]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import bench_main, cpu_isa, save_figure, subplots
from bench.decode import Rows
from bench.server import checkpoint
from model import ModelConfig, build, load, recurrent
from model.layer import fft_conv

NAME = "dtype"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"batches": [1, 8, 64], "prompts": [256, 2048], "steps": 64, "repeat": 5, "check_tokens": 256},
    True: {"batches": [1, 8], "prompts": [64, 256], "steps": 8, "repeat": 2, "check_tokens": 64},
}
BLOCK_K = 32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHS = ("isotropic", "sashimi")
SHIPPED_SASHIMI = Path(__file__).resolve().parent.parent / "checkpoints" / "audio-digits"
SASHIMI_STANDIN = dict(arch="sashimi", vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=256,
                       pool=[4, 4], modality="audio", sample_rate=8000, cauchy_backend="torch")  # fmt: skip


def sashimi_checkpoint(quick: bool) -> tuple[Any, str]:
    """The shipped SaShiMi audio model, or (quick, or where it is missing) a tiny random one."""
    if SHIPPED_SASHIMI.exists() and not quick:
        return load(SHIPPED_SASHIMI), "shipped checkpoint audio-digits (SaShiMi)"
    torch.manual_seed(0)
    return build(ModelConfig(**SASHIMI_STANDIN)).eval(), f"stand-in SaShiMi, random init: {SASHIMI_STANDIN}"


def build_variants(net) -> dict[str, Any]:
    """{variant: recurrent form}: each dtype as served now, and for the isotropic model the 16-bit ones
    as before (no whole-network C step; the torch ops in the dtype whatever the CPU)."""
    out = {name: copy.deepcopy(net).to_recurrent(dtype=dt) for name, dt in DTYPES.items()}
    if net.config.arch == "sashimi":
        return out
    native = recurrent.native_matmul
    try:
        recurrent.native_matmul = lambda dtype, device: True  # the torch ops in the dtype, as before
        for name in ("bfloat16", "float16"):
            out[f"{name} before"] = copy.deepcopy(net).to_recurrent(dtype=DTYPES[name], fused_network=False)
    finally:
        recurrent.native_matmul = native
    return out


def step_us(rec, B: int, steps: int) -> float:
    state, tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
    rec.step(tok, state, out=state)
    t0 = time.perf_counter()
    for _ in range(steps):
        rec.step(tok, state, out=state)
    return (time.perf_counter() - t0) / steps * 1e6


def decode_tok_s(rec, B: int, steps: int) -> float:
    """Tokens/s of generating `steps` tokens per row at temperature 1: native blocks of BLOCK_K steps
    where the model has them, else the one-step loop (step, sample, the host copy) the engine ran."""
    rows = Rows(rec, B)
    t0 = time.perf_counter()
    if rec.decode_block_ready(B):
        rows.blocks(steps, BLOCK_K)
    else:
        rows.one_step(steps)
    return B * steps / (time.perf_counter() - t0)


def prefill_ms(rec, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    rec.prefill(tokens, rec.init_state(tokens.shape[0]), logits="none")
    return (time.perf_counter() - t0) * 1e3


def linear_weight_bytes(rec) -> int:
    """Bytes of the weights one step reads besides the embedding table (of which it reads one row): what
    the C step holds when the model has it (the linear layers packed 1-D by fused.pack_linear, in their
    dtype, and the small float32 vectors: biases, norms, D), else the torch modules' linear weights in
    their dtype. (Until 2026-12-02 this counted the C step's 2-D tensors, which since the packed layout
    is the embedding alone: 0 after its subtraction.)"""
    if rec._net_step is not None:
        kept = [t for t in rec._net_step._weights.keep if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in kept if t.dim() == 1)
    return sum(
        m.weight.numel() * m.weight.element_size()
        for m in rec.net.modules()
        if isinstance(m, torch.nn.Linear)
    )


def check_errors(net, recs: dict[str, Any], T: int) -> dict[str, dict[str, float]]:
    """Relative logits error of stepping 2 × T probe tokens, per variant, against float64 conv mode on
    the variant's own (16-bit) weights and on the float32 weights."""
    tokens = torch.randint(0, net.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))

    def reference(dtype: torch.dtype) -> torch.Tensor:
        ref = copy.deepcopy(net).double().eval()
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if ".kernel." not in name:
                    p.copy_(p.to(dtype).double())
            if net.config.arch == "sashimi":  # its conv mode: each S4 kernel in float64 at its level's length
                return ref(tokens)
            Ks = [k(T, dtype=torch.float64, backend="torch") for k in ref.kernels()]
            ssms = [lambda u, K=K: fft_conv(u.transpose(1, 2), K).transpose(1, 2) for K in Ks]
            return ref(tokens, ssms=ssms)

    refs = {name: reference(dt) for name, dt in DTYPES.items()}
    out = {}
    for name, rec in recs.items():
        state, logits = rec.init_state(2), []
        for t in range(T):
            lg, state = rec.step(tokens[:, t], state)
            logits.append(lg)
        got = torch.stack(logits, 1).double()
        own = refs[name.split()[0]]
        out[name] = {
            "vs_float64_same_weights": float((got - own).norm() / own.norm()),
            "vs_float64_float32_weights": float((got - refs["float32"]).norm() / refs["float32"].norm()),
        }
    return out


def run(quick: bool, arch: str = "isotropic") -> dict[str, Any]:
    sz = SIZES[quick]
    if arch == "sashimi":
        net, what = sashimi_checkpoint(quick)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt, what = checkpoint(quick, Path(tmp))
            net = load(ckpt)
    recs = build_variants(net)
    names = list(recs)
    V = net.config.vocab_size
    prompts = {
        L: torch.randint(0, V, (1, L), generator=torch.Generator().manual_seed(L)) for L in sz["prompts"]
    }
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for _ in range(sz["repeat"]):
        for n in names:  # alternated: every variant once per round
            rec, s = recs[n], samples[n]
            for B in sz["batches"]:
                s.setdefault(f"step_us_b{B}", []).append(step_us(rec, B, sz["steps"]))
                s.setdefault(f"decode_tok_s_b{B}", []).append(decode_tok_s(rec, B, sz["steps"]))
            for L, tok in prompts.items():
                s.setdefault(f"prefill_ms_{L}", []).append(prefill_ms(rec, tok))
        print(
            "round done:",
            {n: round(statistics.median(samples[n]["step_us_b1"]), 1) for n in names},
            flush=True,
        )
    results = {
        n: {
            "medians": {k: statistics.median(v) for k, v in samples[n].items()},
            "runs": samples[n],
            "compute_dtype": str(recs[n].compute_dtype).removeprefix("torch."),
            "whole_network_c_step": recs[n]._net_step is not None,
            "linear_weight_bytes_per_step": linear_weight_bytes(recs[n]),
        }
        for n in names
    }
    errors = check_errors(net, recs, sz["check_tokens"])
    for n in names:
        results[n]["logits_rel_err"] = errors[n]
        m = results[n]["medians"]
        print(f"{n:16s} " + " ".join(f"{k} {v:.1f}" for k, v in m.items()), errors[n], flush=True)
    return {
        "model": what,
        "arch": arch,
        "sizes": sz,
        "isa": cpu_isa(),
        "native_matmul": {n: recurrent.native_matmul(dt, torch.device("cpu")) for n, dt in DTYPES.items()},
        "threads": torch.get_num_threads(),
        "results": results,
        "note": "one process, variants alternated in each round, medians; the machine may be shared "
        "(ratios within a round are the figures to read)",
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    res = data["results"]
    names = list(res)
    fig, axes = subplots(3, width=5.5, height=4.2)
    batches = data["sizes"]["batches"]
    width = 0.8 / len(names)
    panels = (("decode_tok_s_b", "decode tokens/s (higher is better)", axes[0]),
              ("step_us_b", "step µs per call (lower is better)", axes[1]))  # fmt: skip
    for key, label, ax in panels:
        for i, n in enumerate(names):
            ys = [res[n]["medians"][f"{key}{B}"] for B in batches]
            ax.bar([b + (i - (len(names) - 1) / 2) * width for b in range(len(batches))], ys, width, label=n)
        ax.set_xticks(range(len(batches)), [f"batch {B}" for B in batches])
        ax.set_yscale("log")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    ax = axes[2]
    Ls = data["sizes"]["prompts"]
    for i, n in enumerate(names):
        ys = [res[n]["medians"][f"prefill_ms_{L}"] for L in Ls]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(Ls))], ys, width, label=n)
    ax.set_xticks(range(len(Ls)), [f"{L} tokens" for L in Ls])
    ax.set_yscale("log")
    ax.set_title("prompt ingestion ms, batch 1 (lower is better)")
    isa = ", ".join(data.get("isa", [])) or "?"
    save_figure(fig, results_name(data.get("arch", "isotropic")), quick,
                title=f"{data['model']}: weights dtype on this CPU ({isa})")  # fmt: skip


def results_name(arch: str) -> str:
    """dtype (the isotropic text model) or dtype_<arch>."""
    return NAME if arch == "isotropic" else f"{NAME}_{arch}"


def add_arch(parser: argparse.ArgumentParser) -> None:
    help_ = "the model: the shipped text model (isotropic) or the shipped SaShiMi audio model (sashimi)"
    parser.add_argument("--arch", choices=ARCHS, default="isotropic", help=help_)


def main(argv=None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    add_arch(pre)
    arch = pre.parse_known_args(argv)[0].arch  # (the results' name depends on it)
    bench_main(argv, __doc__, results_name(arch), functools.partial(run, arch=arch), plot, arguments=add_arch)


if __name__ == "__main__":
    main()
