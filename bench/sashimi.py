"""SaShiMi [4, 4] vs isotropic S4 models of the same parameter count: analytic FLOPs per sample and
recurrent step samples/s at batch 1, 8 and 64, side by side in one run (issue 14's benchmark).

"sashimi" steps in one C call per step (model/fused.py: SaShiMiStep), "sashimi-torch-ops" is the same
network stepped by the torch ops around the fused SSM steps (SaShiMiRecurrent(fused_network=False)).
The isotropic models: "isotropic-ff" has SaShiMi's block recipe (S4 + FF 2H blocks, as many S4
layers as SaShiMi), "isotropic" the shipped audio shape (4 S4 blocks, no FF, which steps the whole
network in one C call); each is as wide as makes its parameter count closest to SaShiMi's.
"sashimi-official" is the official sc09 SaShiMi's shape (state-spaces/s4 configs/model/sashimi.yaml:
d_model 64, 8 (S4, FF) pairs per level, pool [4, 4], expand 2, ff 2, the scalar TransposedLN block norms
of `transposed: true`), as an imported official checkpoint serves: by the C step since TransposedLN is
in it, and by the torch ops around the fused SSM steps ("…-torch-ops"), the only path it had before.
One torch thread for every model (a single-sample step is latency-bound; a second thread only adds
contention on a shared CPU); samples/s = batch · steps / wall time over whole pooling periods.

`--unet` runs another comparison (results sashimi_unet.json): the shape of checkpoints/audio-digits
(d_model 64, 4 (S4, FF) pairs per level, pool [4, 4], expand 2, d_state 64; random weights) with unet on,
stepped by the whole-network C step ("unet") and by the torch ops around the fused SSM steps
("unet-torch-ops", the only path it had before), and decoded by the native decode block (blocks of 8
steps with temperature sampling in C: "unet-block"); and the same shape without unet ("no-unet",
"no-unet-block") for reference.

`--phases` (results sashimi_phases.json): the shipped audio-digits with its rows all at one pooling phase
against rows at every phase of its period, `rec.step` and the native decode block: what the server's
phase alignment (server/engine.py, `align_period`) buys.

`--prefill` (results sashimi_prefill.json): the shipped audio-digits' prefill on CPU, B prompts of T tokens
each alone through torch's linears ("row by row", as from 2026-12-06) against a phase's prompts together
through the C linears ("batched", each row bit for bit the row alone), alternated, best of 15, at 1 torch
thread and at torch's default.

    python -m bench.sashimi [--quick] [--unet | --phases | --prefill]
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from typing import Any

import torch

from bench.common import ROOT, bench_main, save_figure, subplots
from bench.step import flops_per_token
from model import ModelConfig, build

NAME = "sashimi"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"sashimi": {"d_model": 64, "n_layers": 2}, "official": {"d_model": 64, "n_layers": 8},
            "d_state": 64, "l_max": 1024, "batches": [1, 8, 64], "periods": 6},
    True: {"sashimi": {"d_model": 16, "n_layers": 1}, "official": {"d_model": 16, "n_layers": 1},
           "d_state": 16, "l_max": 128, "batches": [1, 8], "periods": 2},
}  # fmt: skip
V = 256

FLOPS_FORMULA = (
    "SaShiMi per sample: Σ over levels k of (1/prod(pool[:k])) × [per S4 block at width H_k: layernorm 5H "
    "+ SSM step (12·H·M diagonal, (8 + 16·rank)·H·M DPLR) + D skip & GELU 10H + output linear 2·H·2H "
    "+ GLU 2H + residual H; per FF block: layernorm 5H + 2·2·H·ffH + GELU 10·ffH + residual H; "
    "skips H per add] "
    "+ per pool k, once per coarse step: DownPool 2·(s·H_k)·H_{k+1}, UpPool 2·H_{k+1}·(s·H_k) "
    "+ final layernorm 5H + head 2·H·V. Isotropic: bench.step.flops_per_token."
)


def sashimi_flops_per_sample(rec) -> dict[str, Any]:
    """Analytic FLOPs per generated sample of a SaShiMiRecurrent's step (see FLOPS_FORMULA)."""
    cfg, net = rec.config, rec.net
    forms = {r["layer"]: r for r in rec.report}
    K = len(cfg.pool)
    groups: dict[int, list] = {k: [(f"up.{k}.blocks", net.up[k].blocks)] for k in range(K)}
    for k in range(K if cfg.unet else 0):
        groups[k].append((f"down.{k}.blocks", net.down[k].blocks))
    groups[K] = [("center", net.center)]
    per_level = []
    for k, H in enumerate(net.widths):
        rate = 1 / math.prod(cfg.pool[:k])
        total = 0
        for prefix, blocks in groups[k]:
            for i in range(len(blocks)):
                rep = forms.get(f"{prefix}.{i}")
                if rep is not None:  # an S4 block
                    M = int(rep["modes"])
                    ssm = 12 * H * M if rep["form"] == "diagonal" else (8 + 16 * cfg.rank) * H * M
                    total += 5 * H + ssm + 10 * H + 2 * H * 2 * H + 2 * H + H
                else:  # an FF block
                    F = cfg.ff * H
                    total += 5 * H + 2 * 2 * H * F + 10 * F + H
        total += 2 * H  # the level's skips
        if k < len(cfg.pool):
            s, H1 = cfg.pool[k], net.widths[k + 1]
            total += (2 * s * H * H1 + 2 * H1 * s * H) * (1 / s)  # once per coarse step, amortized
        per_level.append(
            {"level": k, "width": H, "rate": rate, "flops_at_rate": total, "per_sample": total * rate}
        )
    head = 5 * cfg.d_model + 2 * cfg.d_model * cfg.vocab_size
    return {"total": sum(p["per_sample"] for p in per_level) + head, "head": head, "levels": per_level}


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=V, cauchy_backend="torch", modality="audio", sample_rate=16000, **kw)


def isotropic_of(params: int, n_layers: int, ff: bool, d_state: int, l_max: int) -> ModelConfig:
    """The isotropic config whose width makes its parameter count closest to `params`."""

    def count(H: int) -> int:
        return build(
            _cfg(d_model=H, n_layers=n_layers, d_state=d_state, l_max=64, d_ff=2 * H if ff else 0)
        ).num_params()

    lo, hi = 8, 2048
    while hi - lo > 1:  # the count grows with H
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) <= params else (lo, mid)
    H = min((lo, hi), key=lambda h: abs(count(h) - params))
    return _cfg(d_model=H, n_layers=n_layers, d_state=d_state, l_max=l_max, d_ff=2 * H if ff else 0)


def time_steps(rec, batch: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    tokens = torch.randint(0, V, (steps + 16, batch))
    state = rec.init_state(batch)
    for t in range(16):  # warm-up: one whole period
        _, state = rec.step(tokens[t], state, out=state)
    t0 = time.perf_counter()
    for t in range(16, 16 + steps):
        _, state = rec.step(tokens[t], state, out=state)
    return _rate(batch, steps, time.perf_counter() - t0)


def run(quick: bool) -> dict[str, Any]:
    size = SIZES[quick]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        sash_cfg = _cfg(arch="sashimi", d_state=size["d_state"], l_max=size["l_max"], **size["sashimi"])
        params = build(sash_cfg).num_params()
        official = _cfg(
            arch="sashimi", d_state=size["d_state"], l_max=size["l_max"], norm="tln", **size["official"]
        )
        cfgs = {
            "sashimi": sash_cfg,
            "sashimi-torch-ops": sash_cfg,  # the same network stepped by torch ops around the fused SSM steps
            "isotropic-ff": isotropic_of(
                params, 3 * size["sashimi"]["n_layers"], True, size["d_state"], size["l_max"]
            ),
            "isotropic": isotropic_of(params, 4, False, size["d_state"], size["l_max"]),
            "sashimi-official": official,
            "sashimi-official-torch-ops": official,
        }
        models = {}
        for name, cfg in cfgs.items():
            torch.manual_seed(0)
            net = build(cfg).eval()
            t0 = time.perf_counter()
            rec = net.to_recurrent(fused_network=not name.endswith("-torch-ops"))
            convert_s = time.perf_counter() - t0
            flops = sashimi_flops_per_sample(rec) if cfg.arch == "sashimi" else flops_per_token(rec)
            rows = [time_steps(rec, b, 16 * size["periods"]) for b in size["batches"]]
            models[name] = {
                "config": {
                    k: v
                    for k, v in cfg.to_dict().items()
                    if k in ("arch", "d_model", "n_layers", "d_ff", "d_state", "pool", "expand", "ff", "norm")
                },  # fmt: skip
                "num_params": net.num_params(),
                "forms": sorted({r["form"] for r in rec.report}),
                "convert_s": convert_s,
                "state_bytes_per_sequence": rec.state_bytes_per_sequence,
                "flops_per_sample": flops["total"],
                "flops_detail": flops,
                "step": rows,
            }
            print(
                f"{name:26s} {net.num_params():>9,} params  {flops['total'] / 1e6:6.2f} MFLOP/sample  "
                + "  ".join(f"B={r['batch']}: {r['samples_per_s']:8.0f} samples/s" for r in rows),
                flush=True,
            )
    finally:
        torch.set_num_threads(threads)
    s = models["sashimi"]
    ratios = {}
    for other in ("sashimi-torch-ops", "isotropic-ff", "isotropic"):
        o = models[other]
        ratios[other] = {
            "flops_ratio": o["flops_per_sample"] / s["flops_per_sample"],
            "b1_speedup": s["step"][0]["samples_per_s"] / o["step"][0]["samples_per_s"],
        }
    o, t = models["sashimi-official"], models["sashimi-official-torch-ops"]
    ratios["official_c_step_vs_torch_ops"] = {
        f"b{r['batch']}_speedup": r["samples_per_s"] / q["samples_per_s"]
        for r, q in zip(o["step"], t["step"])
    }
    print({k: {m: f"{v:.2f}" for m, v in r.items()} for k, r in ratios.items()}, flush=True)
    return {
        "description": "SaShiMi [4, 4] vs isotropic S4 of the same parameter count: analytic FLOPs per "
        "sample and step samples/s (1 torch thread; `steps` steps after a 16-step warm-up, whole pooling "
        "periods)",
        "flops_formula": FLOPS_FORMULA,
        "goals": "issue 14: ≥ 2.5× fewer FLOPs per sample, ≥ 2× the isotropic single-stream samples/s",
        "models": models,
        "ratios_vs_sashimi": ratios,
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax_f, ax_s) = subplots(2, width=6.5)
    names = list(data["models"])
    ax_f.barh(names[::-1], [data["models"][n]["flops_per_sample"] / 1e6 for n in names[::-1]])
    ax_f.set_xlabel("MFLOP per sample")
    batches = [r["batch"] for r in data["models"][names[0]]["step"]]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax_s.bar(
            [j + i * width for j in range(len(batches))],
            [r["samples_per_s"] for r in data["models"][n]["step"]],
            width,
            label=n,
        )
    ax_s.set_xticks(
        [j + (len(names) - 1) * width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches]
    )
    ax_s.set_yscale("log")
    ax_s.set_ylabel("samples/s (1 thread, rec.step)")
    ax_s.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(
        fig, NAME, quick, "SaShiMi vs isotropic S4 (same parameter count) and the official sc09 SaShiMi shape"
    )


UNET_NAME = "sashimi_unet"
UNET_SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick: audio-digits' shape, or a tiny one
    False: {"d_model": 64, "n_layers": 4, "d_state": 64, "l_max": 1024, "batches": [1, 8, 64], "periods": 6},
    True: {"d_model": 16, "n_layers": 1, "d_state": 16, "l_max": 128, "batches": [1, 8], "periods": 2},
}  # fmt: skip


def _rate(batch: int, steps: int, wall: float) -> dict[str, Any]:
    """A timing's figures: `steps` steps of `batch` rows in `wall` seconds."""
    return {"batch": batch, "steps": steps, "us_per_step": 1e6 * wall / steps,
            "samples_per_s": batch * steps / wall}  # fmt: skip


def time_blocks(rec, batch: int, steps: int) -> dict[str, Any]:
    """Samples/s of the native decode block (bench.decode.Rows.blocks: blocks of 8 steps, temperature 1,
    sampling in C) from the zero state, after one period of warm-up."""
    from bench.decode import Rows  # noqa: PLC0415

    rows = Rows(rec, batch)
    rows.blocks(16, 8)
    t0 = time.perf_counter()
    rows.blocks(steps, 8)
    return _rate(batch, steps, time.perf_counter() - t0)


def run_unet(quick: bool) -> dict[str, Any]:
    size = UNET_SIZES[quick]
    shape = {k: size[k] for k in ("d_model", "n_layers", "d_state", "l_max")}
    steps = 16 * size["periods"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models: dict[str, Any] = {}
    try:
        for unet in (True, False):
            torch.manual_seed(0)
            net = build(_cfg(arch="sashimi", pool=[4, 4], unet=unet, **shape)).eval()
            tag = "unet" if unet else "no-unet"
            paths = [(tag, True)] + ([(f"{tag}-torch-ops", False)] if unet else [])
            for name, c_step in paths:
                rec = net.to_recurrent(fused_network=c_step)
                assert (rec._net_step is not None) == c_step, name
                info = {"num_params": net.num_params(), "unet": unet}
                models[name] = {**info, "step": [time_steps(rec, b, steps) for b in size["batches"]]}
                if c_step:
                    models[f"{tag}-block"] = {
                        **info,
                        "step": [time_blocks(rec, b, steps) for b in size["batches"]],
                    }
    finally:
        torch.set_num_threads(threads)
    for name, m in models.items():
        rows = (
            f"B={r['batch']}: {r['us_per_step']:8.0f} µs/step {r['samples_per_s']:8.0f} samples/s"
            for r in m["step"]
        )
        print(f"{name:16s} " + "  ".join(rows), flush=True)
    ratios = {
        f"b{r['batch']}": {
            "c_step_vs_torch_ops": r["samples_per_s"] / t["samples_per_s"],
            "block_vs_torch_ops": b["samples_per_s"] / t["samples_per_s"],
            "unet_c_step_vs_no_unet": r["samples_per_s"] / n["samples_per_s"],
        }
        for r, t, b, n in zip(
            models["unet"]["step"],
            models["unet-torch-ops"]["step"],
            models["unet-block"]["step"],
            models["no-unet"]["step"],
        )  # fmt: skip
    }
    print({k: {m: f"{v:.2f}" for m, v in r.items()} for k, r in ratios.items()}, flush=True)
    return {
        "description": "U-Net SaShiMi (audio-digits' shape with unet on, random weights): the whole-network "
        "C step vs the torch ops around the fused SSM steps, and the native decode block (blocks of 8 steps, "
        "sampling in C); the same shape without unet for reference (1 torch thread; `steps` steps after a "
        "16-step warm-up)",
        "config": {**shape, "pool": [4, 4], "expand": 2, "ff": 2},
        "models": models,
        "ratios": ratios,
    }


def plot_unet(data: dict[str, Any], quick: bool) -> None:
    fig, (ax,) = subplots(1, width=8.0)
    names = list(data["models"])
    batches = [r["batch"] for r in data["models"][names[0]]["step"]]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(batches))],
               [r["samples_per_s"] for r in data["models"][n]["step"]], width, label=n)  # fmt: skip
    ax.set_xticks(
        [j + (len(names) - 1) * width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches]
    )
    ax.set_yscale("log")
    ax.set_ylabel("samples/s (1 torch thread)")
    ax.legend(fontsize="small")
    save_figure(fig, UNET_NAME, quick, "U-Net SaShiMi: C step and native decode block vs the torch ops")


PHASES_NAME = "sashimi_phases"
PHASES_SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"batches": [1, 8, 16, 64], "periods": 20, "rounds": 3, "block": 32},
    True: {"batches": [1, 16], "periods": 2, "rounds": 1, "block": 8},
}


def phase_rows(rec, batch: int, mixed: bool):
    """bench.decode.Rows of `batch` rows from the zero state, row r stepped r mod period times alone first
    when `mixed` (every phase of the period among the rows), else none (all at one phase)."""
    from bench.decode import Rows  # noqa: PLC0415

    rows = Rows(rec, batch)
    if mixed:
        for r in range(batch):
            st, tok = rows.state[r : r + 1].clone(), torch.zeros(1, dtype=torch.long)
            for _ in range(r % rec.period):
                rec.step(tok, st, out=st)
            rows.state[r] = st[0]
    return rows


def run_phases(quick: bool) -> dict[str, Any]:
    """The shipped audio-digits (checkpoints/audio-digits) with its rows at one phase vs at every phase of
    its period: `rec.step` and the native decode block (what the server runs), alternated in rounds."""
    from model import load  # noqa: PLC0415

    size = PHASES_SIZES[quick]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = load(ROOT / "checkpoints" / "audio-digits").to_recurrent()
        steps = rec.period * size["periods"]
        times: dict[tuple[str, int, str], list[float]] = {}
        for _ in range(size["rounds"]):
            for B in size["batches"]:
                for mixed in (False, True):
                    kind = "mixed" if mixed else "aligned"
                    rows = phase_rows(rec, B, mixed)
                    tok = torch.zeros(B, dtype=torch.long)
                    rec.step(tok, rows.state.clone())  # (warm)
                    st = rows.state.clone()
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        rec.step(tok, st, out=st)
                    times.setdefault(("step", B, kind), []).append(time.perf_counter() - t0)
                    rows.blocks(rec.period, size["block"])  # (warm)
                    t0 = time.perf_counter()
                    rows.blocks(steps, size["block"])
                    times.setdefault(("block", B, kind), []).append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    out = []
    for path in ("step", "block"):
        for B in size["batches"]:
            row: dict[str, Any] = {"path": path, "batch": B}
            for kind in ("aligned", "mixed"):
                wall = sorted(times[(path, B, kind)])[len(times[(path, B, kind)]) // 2]
                row[kind] = {**_rate(B, steps, wall), "walls_s": times[(path, B, kind)]}
            row["aligned_over_mixed"] = row["aligned"]["samples_per_s"] / row["mixed"]["samples_per_s"]
            out.append(row)
            a, m = row["aligned"]["samples_per_s"], row["mixed"]["samples_per_s"]
            print(f"{path:5s} B={B:3d}: aligned {a:8.0f}, mixed {m:8.0f} samples/s ({a / m:.2f}x)")
    return {
        "description": "checkpoints/audio-digits (SaShiMi, pool [4, 4]): rows at one pooling phase vs at "
        "every phase of the period, rec.step and the native decode block (temperature 1, blocks of "
        "`block` steps), 1 torch thread, the median of `rounds` alternated rounds of `steps` steps",
        "sizes": size,
        "steps": steps,
        "rows": out,
    }


def plot_phases(data: dict[str, Any], quick: bool) -> None:
    fig, axes = subplots(2)
    for ax, path in zip(axes, ("step", "block")):
        rs = [r for r in data["rows"] if r["path"] == path]
        xs = range(len(rs))
        for i, kind in enumerate(("aligned", "mixed")):
            ax.bar([x + (i - 0.5) * 0.4 for x in xs], [r[kind]["samples_per_s"] for r in rs], 0.4, label=kind)
        ax.set_xticks(list(xs), [f"{r['batch']} rows" for r in rs])
        ax.set_ylabel("samples/s (1 thread)")
        ax.set_title("rec.step" if path == "step" else "native decode block")
        ax.legend()
    save_figure(fig, PHASES_NAME, quick, "audio-digits (SaShiMi): rows at one pooling phase vs every phase")


PREFILL_NAME = "sashimi_prefill"
PREFILL_SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick: (prompts, tokens each)
    False: {"shapes": [(1, 256), (4, 256), (8, 256), (16, 256), (8, 64), (4, 1024)], "repeats": 15},
    True: {"shapes": [(1, 32), (4, 32)], "repeats": 1},
}
# "row by row": each prompt prefilled alone through torch's linears (on CPU from 2026-12-06, ec7b1a3, until
# the C linears); "batched": a phase's prompts together through the C linears (RowwiseLinear), each row bit
# for bit the row alone. The bench switches between them on the form's private attributes.
PREFILL_PATHS = ("row by row", "batched")


def _prefill_path(rec, path: str, rowwise_net) -> None:
    """Point `rec`'s prefill at one of PREFILL_PATHS (CPU, float32 weights)."""
    rec._rowwise = path == "batched"
    rec._prefill_net = rowwise_net if rec._rowwise else rec._net_ops


def run_prefill(quick: bool) -> dict[str, Any]:
    """The shipped audio-digits prefilling B prompts of T tokens from the zero state on CPU by each path of
    PREFILL_PATHS, alternated in `repeats` rounds: the best wall time of each (torch's default threads), and
    how far the batched logits and states are from the row-by-row ones (different linears: rounding)."""
    from model import load  # noqa: PLC0415

    size = PREFILL_SIZES[quick]
    rec = load(ROOT / "checkpoints" / "audio-digits").to_recurrent(device="cpu")
    if not rec._rowwise:
        raise SystemExit("the batched prefill needs the C library (a C compiler) and float32 weights")
    rowwise_net = rec._prefill_net
    gen = torch.Generator().manual_seed(0)
    times: dict[tuple[int, int, int, str], list[float]] = {}
    diffs: dict[tuple[int, int], tuple[float, float]] = {}
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads})
    try:
        for threads, (B, T) in itertools.product(thread_counts, size["shapes"]):
            torch.set_num_threads(threads)
            tokens = torch.randint(0, rec.config.vocab_size, (B, T), generator=gen)
            state = rec.init_state(B)
            outs = {}
            for path in PREFILL_PATHS:  # (a warm-up, and the outputs compared)
                _prefill_path(rec, path, rowwise_net)
                outs[path] = rec.prefill(tokens, state)
            (lo, so), (ln, sn) = outs["row by row"], outs["batched"]
            diffs[(B, T)] = (float((lo - ln).abs().max()), float((so - sn).abs().max()))
            for _ in range(size["repeats"]):
                for path in PREFILL_PATHS:
                    _prefill_path(rec, path, rowwise_net)
                    t0 = time.perf_counter()
                    rec.prefill(tokens, state)
                    times.setdefault((threads, B, T, path), []).append(time.perf_counter() - t0)
    finally:
        _prefill_path(rec, "batched", rowwise_net)
        torch.set_num_threads(default_threads)
    rows = []
    for threads, (B, T) in itertools.product(thread_counts, size["shapes"]):
        row: dict[str, Any] = {"threads": threads, "prompts": B, "tokens": T}
        for path in PREFILL_PATHS:
            walls = times[(threads, B, T, path)]
            row[path] = {"best_ms": 1e3 * min(walls), "walls_ms": [1e3 * t for t in walls]}
        old, new = row["row by row"]["best_ms"], row["batched"]["best_ms"]
        row["row_by_row_over_batched"] = old / new
        row["max_abs_diff_logits"], row["max_abs_diff_state"] = diffs[(B, T)]
        rows.append(row)
        dl, ds = diffs[(B, T)]
        print(f"{threads} thread(s), {B:2d} x {T:4d}: row by row {old:7.1f} ms, batched {new:7.1f} ms "
              f"({old / new:.2f}x); |logits diff| {dl:.1e}, |state diff| {ds:.1e}")  # fmt: skip
    return {
        "description": "checkpoints/audio-digits (SaShiMi, float32, CPU): B prompts of T tokens prefilled "
        "from the zero state row by row (each prompt alone, torch's linears) and batched (a phase's prompts "
        "together through the C linears, each row bit for bit the row alone), alternated in `repeats` "
        "rounds, the best wall time of each; at 1 torch thread and at torch's default; the largest "
        "differences between the two paths' logits and states (the linears' rounding)",
        "threads": thread_counts,
        "torch": torch.__version__,
        "sizes": size,
        "rows": rows,
    }


def plot_prefill(data: dict[str, Any], quick: bool) -> None:
    fig, axes = subplots(len(data["threads"]), width=8.0)
    width = 0.8 / len(PREFILL_PATHS)
    for ax, threads in zip(axes, data["threads"]):
        rows = [r for r in data["rows"] if r["threads"] == threads]
        for i, path in enumerate(PREFILL_PATHS):
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [r[path]["best_ms"] for r in rows], width, label=path)
        ticks = [f"{r['prompts']}×{r['tokens']}" for r in rows]
        ax.set_xticks([j + width / 2 for j in range(len(rows))], ticks)
        ax.set_yscale("log")
        ax.set_ylabel(f"prefill ms, best of {data['sizes']['repeats']}")
        ax.set_title(f"{threads} torch thread{'s' if threads > 1 else ''}")
        ax.legend(fontsize="small")
    save_figure(fig, PREFILL_NAME, quick, "audio-digits prefill on CPU: row by row vs batched (C linears)")


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv

    def arguments(parser) -> None:
        which = parser.add_mutually_exclusive_group()  # (each is its own benchmark: one at a time)
        which.add_argument("--unet", action="store_true", help="the U-Net comparison (sashimi_unet.json)")
        which.add_argument("--phases", action="store_true",
                           help="rows at one phase vs every phase (sashimi_phases.json)")  # fmt: skip
        which.add_argument("--prefill", action="store_true",
                           help="CPU prefill row by row vs batched (sashimi_prefill.json)")  # fmt: skip

    if "--unet" in args:
        bench_main(argv, __doc__, UNET_NAME, run_unet, plot_unet, arguments=arguments)
    elif "--phases" in args:
        bench_main(argv, __doc__, PHASES_NAME, run_phases, plot_phases, arguments=arguments)
    elif "--prefill" in args:
        bench_main(argv, __doc__, PREFILL_NAME, run_prefill, plot_prefill, arguments=arguments)
    else:
        bench_main(argv, __doc__, NAME, run, plot, arguments=arguments)


if __name__ == "__main__":
    main()
