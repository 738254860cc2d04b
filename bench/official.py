"""The official state-spaces/s4 generation path vs ours, on the same model, side by side.

One S4 LM (4 layers, d_model 256, N 64, vocab 256, LegS, softplus Δ; random weights: speed does not
depend on them) is built by the official code itself, then imported with model.official (the same
weights). Official: generate.py's path: `_setup_step()` on every module (its default mode, 'dense' for
DPLR), `default_state`, and the prompt fed one token at a time through `step`. Ours: the imported
checkpoint's verified RecurrentModel: parallel `prefill` of the prompt, then `step(out=state)` in a Python
loop, and again with the native decode block (`decode_block`: the remaining tokens in one C call, as the
server decodes on CPU; its tokens must equal the loop's). All decode greedily: a 1,024-token prompt, then
256 new tokens, at batch 1 and 16. Time to first token = prompt ingestion + the first new token's logits;
decode tokens/s = batch × new tokens / time.
The JSON also gives how far the two paths' logits agree and whether they pick the same tokens.

The official code is loaded from a local checkout named by `--official DIR` or $S4_OFFICIAL_DIR (with
its own dependencies importable: einops, scipy, rich, omegaconf; hydra and pytorch-lightning are replaced
by the small stand-ins below); without one the benchmark is skipped with a message.

    python -m bench.official --official /path/to/state-spaces/s4 [--quick]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import bench_main, fmt, save_figure, subplots
from model.official.reference import install_standins

NAME = "official"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"H": 256, "n_layers": 4, "N": 64, "V": 256, "l_max": 1024, "prompt": 1024, "new": 256,
            "batches": [1, 16]},
    True: {"H": 32, "n_layers": 2, "N": 16, "V": 256, "l_max": 64, "prompt": 64, "new": 16,
           "batches": [1, 4]},
}  # fmt: skip
# what the official code imports that this project's python lacks (src.utils.config imports omegaconf: the
# check left it out, and a python with the other three failed on it with a traceback, a fresh-user trial)
OFFICIAL_IMPORTS = ("einops", "scipy", "rich", "omegaconf")
OPTIONS: dict[str, str | None] = {"official": None}  # set by main() from --official or $S4_OFFICIAL_DIR


def official_model(official: str, size: dict[str, Any]) -> tuple[nn.Module, dict]:
    """The official backbone + LM encoder/decoder (as tasks.LMTask builds them) and its config."""
    sys.path.insert(0, official)
    install_standins()  # (model/official/reference.py: importing it runs and unpickles nothing)
    import src.models.nn.utils as U
    from src import utils
    from src.models.sequence.kernels import ssm
    from src.utils import registry

    ssm.has_pykeops = False  # its naive Cauchy path: no compilation inside the timing (step mode uses none)
    H, V = size["H"], size["V"]
    layer = {
        "_name_": "s4", "d_state": size["N"], "mode": "nplr", "init": "legs", "dt_transform": "softplus",
        "l_max": size["l_max"], "n_ssm": 1, "final_act": "glu", "activation": "gelu", "verbose": False,
    }  # fmt: skip
    model = {
        "_name_": "model", "n_layers": size["n_layers"], "d_model": H, "prenorm": True, "transposed": False,
        "residual": "R", "norm": "layer", "dropout": 0.0, "layer": [layer],
    }  # fmt: skip
    task = {"_name_": "lm", "rescale": True, "tied": False}
    cfg = {"model": model, "task": task, "encoder": None, "decoder": None}

    class Scalar(nn.Module):  # src/tasks/tasks.py:Scalar
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x):
            return x * self.c

    class Lit(nn.Module):  # train.py's SequenceLightningModule module tree
        def __init__(self):
            super().__init__()
            self.model = utils.instantiate(registry.model, copy.deepcopy(cfg["model"]))
            self.encoder = U.PassthroughSequential(nn.Embedding(V, H), Scalar(math.sqrt(H)))
            self.decoder = U.PassthroughSequential(nn.Linear(H, V))

    torch.manual_seed(0)
    lit = Lit().eval()
    with torch.no_grad():  # the conv forward sets each layer's C̃ and l_kernel, as training does
        x, _ = lit.encoder(torch.zeros(1, size["l_max"], dtype=torch.long))
        lit.model(x)
    return lit, cfg


@torch.no_grad()
def run_official(lit, prompt: torch.Tensor, new: int) -> dict[str, Any]:
    """generate.py: _setup_step() (default mode), default_state, then step() token by token."""
    t0 = time.perf_counter()
    for m in lit.modules():
        if hasattr(m, "_setup_step"):
            m._setup_step()
    state = lit.model.default_state(prompt.shape[0], device=prompt.device)
    for t in range(prompt.shape[1]):
        x, _ = lit.encoder(prompt[:, t])
        x, state = lit.model.step(x, state=state)
    logits, _ = lit.decoder(x)
    first = logits
    ttft = time.perf_counter() - t0
    toks = [logits.argmax(-1)]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        x, _ = lit.encoder(toks[-1])
        x, state = lit.model.step(x, state=state)
        logits, _ = lit.decoder(x)
        toks.append(logits.argmax(-1))
    decode = time.perf_counter() - t1
    return {"ttft_s": ttft, "decode_s": decode, "tokens": torch.stack(toks, 1), "first_logits": first}


@torch.no_grad()
def run_ours(rec, prompt: torch.Tensor, new: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    logits, state = rec.prefill(prompt, rec.init_state(prompt.shape[0]))
    first = logits[:, -1]
    ttft = time.perf_counter() - t0
    toks = [first.argmax(-1)]
    t1 = time.perf_counter()
    for _ in range(new - 1):
        logits, state = rec.step(toks[-1], state, out=state)
        toks.append(logits.argmax(-1))
    decode = time.perf_counter() - t1
    return {"ttft_s": ttft, "decode_s": decode, "tokens": torch.stack(toks, 1), "first_logits": first}


@torch.no_grad()
def run_ours_block(rec, prompt: torch.Tensor, new: int) -> dict[str, Any]:
    """The same greedy generation by the native decode block (what the server runs on CPU): the prefill,
    then the new − 1 remaining tokens in one `decode_block` call (temperature 0: the first argmax, as
    `argmax` picks; sampling, stop checks and the per-step loop in C)."""
    from model.sampling import SamplingParams, row_settings, uint64_bits

    B, V = prompt.shape[0], rec.config.vocab_size
    t0 = time.perf_counter()
    logits, state = rec.prefill(prompt, rec.init_state(B), logits="last")
    tok = logits[:, -1].argmax(-1)
    ttft = time.perf_counter() - t0
    first = tok.clone()
    t1 = time.perf_counter()
    res = rec.decode_block(
        new - 1, state, tok, settings=row_settings([SamplingParams(temperature=0.0)] * B, V), counts=None,
        key=uint64_bits([0] * B), counter=torch.zeros(B, dtype=torch.long), limit=torch.full((B,), new - 1),
        stops=[[]] * B, history=[b""] * B, seen=torch.zeros(B, V, dtype=torch.bool),
    )  # fmt: skip
    decode = time.perf_counter() - t1
    if res.steps != new - 1:
        raise RuntimeError(f"the decode block made {res.steps} of {new - 1} steps")
    return {"ttft_s": ttft, "decode_s": decode, "tokens": torch.cat([first[:, None], res.tokens.T], 1)}


def run(quick: bool) -> dict[str, Any]:
    from model.convert import build
    from model.official.mapping import map_official

    size = SIZES[quick]
    lit, cfg = official_model(str(OPTIONS["official"]), size)
    sd = {f"{k}": v for k, v in lit.state_dict().items()}
    rec = build(map_official(sd, cfg, "lightning")).to_recurrent()
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in size["batches"]:
        prompt = torch.randint(0, size["V"], (B, size["prompt"]), generator=g)
        off, ours = run_official(lit, prompt, size["new"]), run_ours(rec, prompt, size["new"])
        block = run_ours_block(rec, prompt, size["new"])
        diff = (ours["first_logits"] - off["first_logits"]).abs().max() / off["first_logits"].abs().max()
        for impl, r in (("official", off), ("ours", ours), ("ours-block", block)):
            rows.append({
                "impl": impl, "batch": B, "ttft_s": r["ttft_s"], "decode_s": r["decode_s"],
                "decode_tokens_per_s": B * (size["new"] - 1) / r["decode_s"],
                "decode_vs_official": off["decode_s"] / r["decode_s"],
            })  # fmt: skip
        rows[-2]["first_logits_rel_diff_vs_official"] = float(diff)
        rows[-2]["same_greedy_tokens_fraction"] = float((ours["tokens"] == off["tokens"]).float().mean())
        rows[-1]["same_tokens_as_step_loop"] = bool(torch.equal(block["tokens"], ours["tokens"]))
        print(
            f"batch {B}: TTFT official {fmt(off['ttft_s'])} s, ours {fmt(ours['ttft_s'])} s; decode tokens/s "
            f"official {fmt(rows[-3]['decode_tokens_per_s'])}, ours: rec.step loop "
            f"{fmt(rows[-2]['decode_tokens_per_s'])} ({rows[-2]['decode_vs_official']:.1f}x), native decode "
            f"block {fmt(rows[-1]['decode_tokens_per_s'])} ({rows[-1]['decode_vs_official']:.1f}x, same "
            f"tokens: {rows[-1]['same_tokens_as_step_loop']}); logits rel. diff {diff:.1e}",
            flush=True,
        )
    mode = "dense (the _setup_step default)"
    return {"size": size, "official_dir": OPTIONS["official"], "official_step_mode": mode, "rows": rows}


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (a, b) = subplots(2, width=5.0)
    batches = data["size"]["batches"]
    impls = (("official", "tab:gray", -0.27), ("ours", "tab:blue", 0.0), ("ours-block", "tab:green", 0.27))
    for impl, color, off in impls:
        r = [x for x in data["rows"] if x["impl"] == impl]
        xs = [i + off for i in range(len(batches))]
        label = {"ours": "ours: rec.step loop", "ours-block": "ours: native decode block"}.get(impl, impl)
        a.bar(xs, [x["ttft_s"] for x in r], width=0.27, color=color, label=label)
        b.bar(xs, [x["decode_tokens_per_s"] for x in r], width=0.27, color=color, label=label)
    for ax, ylabel in ((a, "time to first token (s)"), (b, "decode tokens/s")):
        ax.set_xticks(range(len(batches)), [f"batch {x}" for x in batches])
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.legend()
    s = data["size"]
    save_figure(
        fig, NAME, quick, f"official step path vs ours: {s['prompt']}-token prompt + {s['new']} new tokens"
    )


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--official", metavar="DIR", help="a state-spaces/s4 checkout (default: $S4_OFFICIAL_DIR)"
    )


def _configure(args: argparse.Namespace) -> bool:
    """The checkout from --official, else OPTIONS["official"], else $S4_OFFICIAL_DIR; False (skip, with a
    line saying why) when there is none or the official code's own dependencies are missing. Given
    --official, either is an error instead (exit 2): the benchmark asked for cannot run (it said "skipped"
    and exited 0: a fresh user's trial)."""
    OPTIONS["official"] = args.official or OPTIONS["official"] or os.environ.get("S4_OFFICIAL_DIR")
    why = None
    if not OPTIONS["official"] or not (Path(OPTIONS["official"]) / "src" / "models").is_dir():
        why = "no official state-spaces/s4 checkout: pass --official DIR or set S4_OFFICIAL_DIR"
    elif missing := [m for m in OFFICIAL_IMPORTS if importlib.util.find_spec(m) is None]:
        why = (
            f"the official code is imported into this python, which lacks {', '.join(missing)}: install "
            f"them here (pip install {' '.join(OFFICIAL_IMPORTS)}) or put a folder holding them on PYTHONPATH"
        )
    if why is None:
        return True
    if args.official:
        print(f"bench.official: error: {why}", file=sys.stderr)
        raise SystemExit(2)
    print(f"bench.official: skipped ({why})")
    return False


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot, arguments=_arguments, configure=_configure)


if __name__ == "__main__":
    main()
