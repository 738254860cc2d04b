"""The C library at two revisions, side by side in one process: `model/csrc/ssm_step.c` as committed at
`--base` (compiled with this build's flags) against the working tree's, on the same converted models, so a
change to the C code is measured against what it replaces with the machine's load shared between the two.

Each model is converted once; `fused.NetStep` is built on each library (the same weights and layer forms),
and `RecurrentModel._net_step` is switched between them, measurement by measurement: `rounds` times each
(the order swapped every round),

- **step**: `rec.step(tokens, state, out=state)` tokens/s at each batch of `step_batches`;
- **block**: the native decode block (`rec.decode_block`, `bench.step.BLOCK_K` steps, plain seeded sampling)
  at each batch of `block_batches`;
- **prefill**: a prompt of `prompt` tokens by steps (`rec.prefill`, ≤ `prefill_by_steps_max_tokens`: the C
  recurrence) at each batch of `prefill_batches`.

The best round of each side (a shared, noisy machine only ever slows a round down; the median's ratio is
kept too) and the ratio working tree ÷ base; and how far the two libraries' logits are apart over 8 steps
of 3 rows (`logits_max_rel_diff`, 0.0: bit for bit). Models: bench.step's stand-ins "s4" (every layer in the
DPLR form: randomly initialized S4 layers do not diagonalize) and "s4d-ff" (the shipped text model's shape,
diagonal layers), at bench.step's full size (H = 256, 4 layers, N = 64), and bench.sashimi's
"sashimi-official" (the official sc09 SaShiMi's shape, DPLR layers; its step and block, as it has no prefill
by steps); --quick: tiny ones, 2 rounds.

    python -m bench.c_ab [--base REV] [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

import torch

from bench import sashimi as bench_sashimi
from bench import step as bench_step
from bench.common import ROOT, bench_main, plain_block, save_figure, step_rate, subplots
from model import build, fused

NAME = "c_ab"
SIZES: dict[bool, dict[str, Any]] = {
    False: {
        "kinds": ["s4", "s4d-ff", "sashimi-official"],
        "model": bench_step.SIZES[False]["model"],
        "step_batches": [1, 16, 64],
        "block_batches": [16, 64, 256],
        "prefill_batches": [1, 8],
        "prompt": 512,
        "steps": 40,
        "rounds": 9,
    },
    True: {
        "kinds": ["s4", "s4d-ff", "sashimi-official"],
        "model": bench_step.SIZES[True]["model"],
        "step_batches": [1, 9],
        "block_batches": [9],
        "prefill_batches": [1, 9],
        "prompt": 32,
        "steps": 4,
        "rounds": 2,
    },
}
SIDES = ("base", "tree")
SOURCE = "model/csrc/ssm_step.c"
_base = {"rev": "HEAD"}


def base_library(rev: str):
    """ssm_step.c at git revision `rev`, compiled with `fused.build_flags()` into the build cache's c_ab/
    (reused while the source, the flags and the CPU are the same) and loaded; returns (library, full sha,
    source bytes).
    Raises RuntimeError when git cannot show the file (not a git checkout, an unknown revision)."""
    git = ["git", "-C", str(ROOT)]
    try:
        src = subprocess.run([*git, "show", f"{rev}:{SOURCE}"], check=True, capture_output=True).stdout
        sha = subprocess.run([*git, "rev-parse", rev], check=True, capture_output=True, text=True).stdout
        sha = sha.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"git cannot show {SOURCE} at {rev!r}: {exc}") from exc
    flags = fused.build_flags()
    key = fused.build_key(src, flags)
    folder = fused.build_folder() / "c_ab"
    c_file, lib_file = folder / f"ssm_step_{key}.c", folder / f"ssm_step_{key}.so"
    if not lib_file.exists():
        folder.mkdir(parents=True, exist_ok=True)
        c_file.write_bytes(src)
        fused.compile_library(lib_file, flags, source=c_file)
    try:
        return fused.load_library(lib_file), sha, src
    except AttributeError as exc:  # a function this tree's fused.py calls, missing at that revision
        raise SystemExit(f"bench.c_ab: --base {rev!r} ({sha[:10]}): its C library lacks an entry point this "
                         f"tree calls ({exc}); pick a later base") from None  # fmt: skip


def agreement(rec, nets: dict, steps: int = 8, batch: int = 3) -> float:
    """max |Δ logits| / max |logits| between the two libraries over `steps` steps of the same `batch` rows
    from the same state (0.0: bit for bit)."""
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, rec.config.vocab_size, (steps, batch), generator=gen)
    logits = {}
    for side, net in nets.items():
        rec._net_step = net
        state, out = rec.init_state(batch), []
        for t in range(steps):
            lg, state = rec.step(tokens[t], state)
            out.append(lg)
        logits[side] = torch.stack(out)
    diff = (logits["tree"] - logits["base"]).abs().max()
    return float(diff / logits["base"].abs().max())


def _model(kind: str, quick: bool):
    """The converted model of `kind` (seeded: the same weights every run)."""
    if kind != "sashimi-official":
        return bench_step.build(kind, SIZES[quick]["model"])[0]
    size = bench_sashimi.SIZES[quick]
    torch.manual_seed(0)
    cfg = bench_sashimi._cfg(arch="sashimi", d_state=size["d_state"], l_max=size["l_max"], norm="tln",
                             **size["official"])  # fmt: skip
    return build(cfg).eval().to_recurrent()


def _net_step_on(rec, lib):
    """rec's whole-network C step built on another library (the same weights and layer forms)."""
    if isinstance(rec._net_step, fused.SaShiMiStep):
        return fused.SaShiMiStep(lib, rec)
    return fused.NetStep(lib, rec.net, rec.layers)


def _block(rec, B: int) -> float:
    state, tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
    plain_block(rec, bench_step.BLOCK_K, state, tok)  # warm
    t0 = time.perf_counter()
    plain_block(rec, bench_step.BLOCK_K, state, tok)
    return B * bench_step.BLOCK_K / (time.perf_counter() - t0)


def _prefill(rec, B: int, L: int) -> float:
    tokens = torch.randint(0, rec.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(L))
    state = rec.init_state(B)
    rec.prefill(tokens, state, logits="none")  # warm
    t0 = time.perf_counter()
    rec.prefill(tokens, state, logits="none")
    return B * L / (time.perf_counter() - t0)


def run(quick: bool) -> dict[str, Any]:
    cfg = SIZES[quick]
    lib, sha, base_src = base_library(_base["rev"])
    tree = fused.library()
    if tree is None:
        raise RuntimeError("the working tree's C library could not be built")
    models = {}
    for kind in cfg["kinds"]:
        rec = _model(kind, quick)
        if rec._net_step is None:
            raise RuntimeError(f"{kind}: no whole-network C step")
        by_steps = getattr(rec, "prefill_by_steps_max_tokens", 0) >= cfg["prompt"]
        nets = {"tree": rec._net_step, "base": _net_step_on(rec, lib)}
        same = agreement(rec, nets)
        measures = [(f"step {B}", lambda B=B: step_rate(rec, B, cfg["steps"])) for B in cfg["step_batches"]]
        measures += [(f"block {B}", lambda B=B: _block(rec, B)) for B in cfg["block_batches"]]
        if by_steps:
            measures += [(f"prefill {B}x{cfg['prompt']}", lambda B=B: _prefill(rec, B, cfg["prompt"]))
                         for B in cfg["prefill_batches"]]  # fmt: skip
        rows = []
        for what, measure in measures:  # the two libraries alternated measurement by measurement
            got: dict[str, list[float]] = {side: [] for side in SIDES}
            for r in range(cfg["rounds"]):
                for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                    rec._net_step = nets[side]
                    got[side].append(measure())
            best = {side: max(got[side]) for side in SIDES}
            rows.append({"what": what, "tokens_per_s": best, "ratio": best["tree"] / best["base"],
                         "median_ratio": statistics.median(got["tree"]) / statistics.median(got["base"]),
                         "rounds": got})  # fmt: skip
        rec._net_step = nets["tree"]
        forms = sorted({r["form"] for r in rec.report})
        models[kind] = {"forms": forms, "logits_max_rel_diff": same, "rows": rows}
    diff = ["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", SOURCE]
    dirty = subprocess.run(diff, check=False, capture_output=True).returncode != 0
    same_source = fused.SOURCE.read_bytes() == base_src
    return {
        "base": {"rev": _base["rev"], "sha": sha},
        "tree": {"ssm_step_c_differs_from_HEAD": dirty, "same_source_as_base": same_source},
        "threads": torch.get_num_threads(),
        "config": cfg,
        "models": models,
    }


def summary(data: dict[str, Any]) -> str:
    """The run as text: per model its forms, the logits' difference, and per measure tokens/s and ratio."""
    lines = [f"working tree vs {data['base']['rev']} ({data['base']['sha'][:10]}), best of "
             f"{data['config']['rounds']} each, tokens/s:"]  # fmt: skip
    if data["tree"].get("same_source_as_base"):
        lines.append("  (ssm_step.c is the base's: both sides run the same code, so the ratios show only "
                     "this machine's noise; name an older --base)")  # fmt: skip
    for kind, m in data["models"].items():
        diff = m["logits_max_rel_diff"]
        lines.append(f"{kind} ({', '.join(m['forms'])} layers; logits max rel diff {diff:.1e})")
        for r in m["rows"]:
            t = r["tokens_per_s"]
            base, tree = f"{t['base']:>9,.0f}", f"{t['tree']:>9,.0f}"
            lines.append(f"  {r['what']:<16} base {base}  tree {tree}  ratio {r['ratio']:.2f}")
    return "\n".join(lines)


def plot(data: dict[str, Any], quick: bool) -> None:
    print(summary(data))
    models = data["models"]
    fig, axes = subplots(ncols=max(len(models), 1))
    top = 1.1 * max(r["ratio"] for m in models.values() for r in m["rows"])
    for ax, (kind, m) in zip(axes, models.items()):
        whats = [r["what"] for r in m["rows"]]
        bars = ax.barh(range(len(whats)), [r["ratio"] for r in m["rows"]])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xlim(0, max(top, 1.2))  # one scale for every panel
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(range(len(whats)), whats)
        ax.invert_yaxis()
        best_of = data["config"]["rounds"]
        ax.set_xlabel(f"tokens/s, working tree ÷ {data['base']['sha'][:10]} (best of {best_of} each)")
        ax.set_title(f"{kind} ({', '.join(m['forms'])} layers)")
    save_figure(fig, NAME, quick, title="C library: working tree vs base, side by side")


def _arguments(parser) -> None:
    parser.add_argument("--base", default="HEAD", help=f"git revision whose {SOURCE} is the base (HEAD)")


def _configure(args) -> bool:
    """--base must name a commit holding ssm_step.c in this checkout; else exit 1 saying so."""
    git = ["git", "-C", str(ROOT)]
    try:
        ok = bool(args.base.strip()) and all(
            subprocess.run(probe, check=False, capture_output=True).returncode == 0
            for probe in ([*git, "rev-parse", "--verify", "--quiet", f"{args.base}^{{commit}}"],
                          [*git, "cat-file", "-e", f"{args.base}:{SOURCE}"])
        )  # fmt: skip
    except OSError:  # no git
        ok = False
    if not ok:
        why = f"no {SOURCE} at that revision in {ROOT} (needs git and a checkout with that commit)"
        raise SystemExit(f"bench.c_ab: --base {args.base!r}: {why}")
    _base["rev"] = args.base
    return True


def main(argv=None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, arguments=_arguments, configure=_configure)


if __name__ == "__main__":
    main()
