"""The whole-network C step of a few rows split over the cores (model/csrc/ssm_step.c `net_rows_split`,
`decode_split`) against one thread, side by side in one run: native decode blocks (K steps with plain
sampling, what the server runs on CPU) at batch 1, 2, 4 and 7, with 1 OpenMP thread (the step as it ran
before: a batch under 8 rows never left the calling thread) and with 2 (split); on a quiet machine and
beside a CPU-bound process (a Python busy loop: the contention guard then pauses splitting after a stalled
barrier). Rounds alternate the two settings; the JSON keeps every round, the table the median. Then the
C prefill of one prompt of 32, 256 and 512 tokens (`net_rows_split` with L > 1: one row's prompt split by
channels and columns the same way), 1 thread against 2, alternated. Last, the threaded decode block of 16
and 64 rows (2 threads) with its rows' groups shared by the threads (`decode_shared`, the default) against
each thread keeping its fixed share (the order before), alternated, on a quiet machine, beside a process that
takes a quarter of a core (busy 1 ms, asleep 3 ms: about what the server's event loop and a local client
take at 64 sessions) and beside a CPU-bound one. And the library's `rec.step` of a batch of 16 rows (each
thread stepping its own rows: `step_all_rows`), 1 thread against 2, quiet and beside a CPU-bound process,
whose stalls the contention guard has paused since 2026-12-05 (before, 2 threads ran 7.5x slower than 1
beside a busy loop).

Models: the shipped text-shakespeare checkpoint (4 × H = 256, FF blocks of 512, 7.9 MB of float32 weights
a token) in float32 and bfloat16, and bench.official's shape (4 × H = 256 S4 blocks, no FF, random LegS
init: the model the "vs the official dense step" figure is measured on). Run as the server runs:
OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep), set before torch loads.

    python -m bench.split [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as server/__main__.py: before torch loads libgomp

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from bench.common import BUSY_LOOP, ROOT, bench_main, beside, fmt, save_figure, subplots  # noqa: E402

NAME = "split"
TEXT = ROOT / "checkpoints/text-shakespeare"
SIZES: dict[bool, dict[str, Any]] = {  # keyed by quick
    False: {"batches": [1, 2, 4, 7], "K": 64, "rounds": 7, "busy_rounds": 15, "official_shape": {
        "vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
        "prompts": [32, 256, 512], "shared_batches": [16, 64], "shared_K": 32, "shared_rounds": 7,
        "step_batches": [16, 64], "step_n": 50},
    True: {"batches": [1, 3], "K": 8, "rounds": 2, "busy_rounds": 2, "official_shape": {
        "vocab_size": 64, "d_model": 64, "n_layers": 2, "d_state": 16, "l_max": 64}, "prompts": [8, 40],
        "shared_batches": [16], "shared_K": 8, "shared_rounds": 2, "step_batches": [16], "step_n": 5},
}  # fmt: skip


def models(quick: bool) -> list[tuple[str, Any]]:
    """(name, RecurrentModel) for each model timed."""
    from model import ModelConfig, SequenceModel, load

    torch.manual_seed(0)
    shape = SIZES[quick]["official_shape"]
    out = [("official shape (S4, no FF), float32", SequenceModel(ModelConfig(
        kernel="s4", cauchy_backend="torch", **shape)).to_recurrent())]  # fmt: skip
    if not quick and (TEXT / "config.json").exists():
        net = load(TEXT)
        out.insert(0, ("text-shakespeare, float32", net.to_recurrent()))
        out.insert(1, ("text-shakespeare, bfloat16", load(TEXT).to_recurrent(dtype=torch.bfloat16)))
    return out


def block_us(rec, B: int, K: int) -> float:
    """µs per step of one native decode block of K steps at batch B (temperature 1, seeded)."""
    from model.sampling import SamplingParams, row_settings, uint64_bits

    V = rec.config.vocab_size
    settings = row_settings([SamplingParams(temperature=1.0, seed=r) for r in range(B)], V)
    state, tok = rec.init_state(B), torch.zeros(B, dtype=torch.long)
    t0 = time.perf_counter()
    res = rec.decode_block(
        K, state, tok, settings=settings, counts=None, key=uint64_bits(list(range(B))),
        counter=torch.zeros(B, dtype=torch.long), limit=torch.full((B,), K), stops=[[]] * B,
        history=[b""] * B, seen=torch.zeros(B, V, dtype=torch.bool),
    )  # fmt: skip
    dt = time.perf_counter() - t0
    if res.steps != K:
        raise RuntimeError(f"decode block made {res.steps} of {K} steps")
    return dt / K * 1e6


def step_us(rec, B: int, n: int) -> float:
    """µs per `rec.step` of B rows, over n steps (the library's step: one C call a token for the batch)."""
    state, tok = rec.init_state(B), torch.arange(B) % rec.config.vocab_size
    t0 = time.perf_counter()
    for _ in range(n):
        _, state = rec.step(tok, state)
    return (time.perf_counter() - t0) / n * 1e6


def batch_steps(lib, recs: list[tuple[str, Any]], size: dict) -> list[dict[str, Any]]:
    """`rec.step` of a batch split by rows, 1 thread against 2, quiet then beside a CPU-bound process."""
    from model import fused

    out = []
    for condition in ("quiet", "busy"):
        time.sleep(max(fused.step_split_state(lib)[1], 0.0) + 0.05)  # (a pause left by earlier runs)
        for name, rec in recs[:1]:  # text-shakespeare, float32
            with beside(BUSY_LOOP, 0.5) if condition == "busy" else beside(None, 0):
                for B in size["step_batches"]:
                    rounds = size["rounds"] if condition == "quiet" else size["busy_rounds"]
                    r = compare(lambda: step_us(rec, B, size["step_n"]), rounds)
                    one, two = statistics.median(r["1"]), statistics.median(r["2"])
                    out.append({
                        "model": name, "condition": condition, "batch": B,
                        "us_per_step_1_thread": r["1"], "us_per_step_2_threads": r["2"],
                        "median_us_1_thread": one, "median_us_2_threads": two, "speedup": one / two,
                        "tokens_per_s_2_threads": B / two * 1e6,
                    })  # fmt: skip
                    print(f"{name}, {condition}, rec.step of {B} rows: {fmt(one)} µs on 1 thread, {fmt(two)} "
                          f"on 2 ({one / two:.2f}x; {B / two * 1e6:,.0f} tokens/s)", flush=True)  # fmt: skip
    return out


def prefill_us(rec, L: int) -> float:
    """µs for the C prefill of one prompt of L tokens (one row, no logits: as the server ingests a prompt)."""
    tokens = (torch.arange(L) * 7 % rec.config.vocab_size).reshape(1, L)
    state = rec.init_state(1)
    t0 = time.perf_counter()
    rec._net_step.prefill(tokens, state, "none")
    return (time.perf_counter() - t0) * 1e6


def compare(timed, rounds: int) -> dict[str, list[float]]:
    """Rounds alternating 1 and 2 threads: the median µs of 5 calls of timed() in each round."""
    out: dict[str, list[float]] = {"1": [], "2": []}
    threads = torch.get_num_threads()
    try:
        for i in range(rounds + 1):  # the first round warms up
            for t in ("1", "2"):
                torch.set_num_threads(int(t))
                us = statistics.median(timed() for _ in range(5))
                if i > 0:
                    out[t].append(us)
    finally:
        torch.set_num_threads(threads)
    return out


HOGS = {  # the processes beside the shared-groups comparison: a quarter of a core, and a whole one
    "quiet": None,
    "quarter core": "import time\nwhile True:\n    t = time.perf_counter()\n"
    "    while time.perf_counter() - t < 1e-3: pass\n    time.sleep(3e-3)",
    "busy": BUSY_LOOP,
}


def shared_rows(lib, recs: list[tuple[str, Any]], size: dict) -> list[dict[str, Any]]:
    """The threaded decode block (2 threads) with the groups shared against fixed shares, per condition
    (HOGS) and batch: tokens/s, rounds alternating the two settings (median of 5 blocks a round)."""
    from model import fused

    name, rec = recs[0]  # the shipped model when there is one
    out = []
    threads, share = torch.get_num_threads(), fused.decode_block_state(lib)[1]
    try:
        torch.set_num_threads(2)
        for condition, code in HOGS.items():
            with beside(code, 0.3):
                for B in size["shared_batches"]:
                    got: dict[str, list[float]] = {"fixed": [], "shared": []}
                    for i in range(size["shared_rounds"] + 1):  # the first round warms up
                        for how in ("fixed", "shared"):
                            fused.decode_block_state(lib, share=how == "shared")
                            us = statistics.median(block_us(rec, B, size["shared_K"]) for _ in range(5))
                            if i > 0:
                                got[how].append(B / us * 1e6)
                    fixed, shared = statistics.median(got["fixed"]), statistics.median(got["shared"])
                    out.append({
                        "model": name, "condition": condition, "batch": B, "K": size["shared_K"],
                        "tokens_per_s_fixed": got["fixed"], "tokens_per_s_shared": got["shared"],
                        "median_tokens_per_s_fixed": fixed, "median_tokens_per_s_shared": shared,
                        "shared_over_fixed": shared / fixed,
                    })  # fmt: skip
                    print(f"{name}, {condition}, batch {B}, 2 threads: {fixed:,.0f} tokens/s with fixed "
                          f"shares, {shared:,.0f} with the groups shared ({shared / fixed:.2f}x)",
                          flush=True)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        fused.decode_block_state(lib, share=share)
    for row in out:  # each condition against the quiet run of its setting: what the other process cost
        quiet = next(r for r in out if r["condition"] == "quiet" and r["batch"] == row["batch"])
        for how in ("fixed", "shared"):
            row[f"{how}_of_quiet"] = row[f"median_tokens_per_s_{how}"] / quiet[f"median_tokens_per_s_{how}"]
    return out


def run(quick: bool) -> dict[str, Any]:
    from model import fused

    size = SIZES[quick]
    lib = fused.library()
    if lib is None:
        raise SystemExit("bench.split needs the fused C library (a C compiler)")
    if quick:  # the quick model is below the split's size threshold: split it anyway (a smoke test)
        fused.step_split_min_weights(lib, 0)
    rows = []
    recs = models(quick)
    for condition in ("quiet", "busy"):  # every quiet run first: a busy run leaves the guard paused up to 1 s
        for name, rec in recs:
            with beside(BUSY_LOOP, 0.5) if condition == "busy" else beside(None, 0):
                for B in size["batches"] if condition == "quiet" else size["batches"][:1]:
                    rounds = size["rounds"] if condition == "quiet" else size["busy_rounds"]
                    r = compare(lambda: block_us(rec, B, size["K"]), rounds)
                    one, two = statistics.median(r["1"]), statistics.median(r["2"])
                    rows.append({
                        "model": name, "condition": condition, "batch": B, "K": size["K"],
                        "us_per_step_1_thread": r["1"], "us_per_step_2_threads": r["2"],
                        "median_us_1_thread": one, "median_us_2_threads": two, "speedup": one / two,
                        "pause_s_after": fused.step_split_state(lib)[0],
                    })  # fmt: skip
                    print(f"{name}, {condition}, batch {B}: {fmt(one)} µs a step on 1 thread, {fmt(two)} "
                          f"split over 2 ({one / two:.2f}x)", flush=True)  # fmt: skip
    prefill = []
    left = fused.step_split_state(lib)[1]  # the busy runs' last pause: over before the prefill is timed
    time.sleep(max(left, 0.0) + 0.05)
    for name, rec in recs:  # one prompt (one row): split by channels and columns (net_rows_split, L > 1)
        for L in size["prompts"]:
            r = compare(lambda: prefill_us(rec, L), size["rounds"])
            one, two = statistics.median(r["1"]), statistics.median(r["2"])
            prefill.append({
                "model": name, "tokens": L, "us_1_thread": r["1"], "us_2_threads": r["2"],
                "median_us_1_thread": one, "median_us_2_threads": two, "speedup": one / two,
                "tokens_per_s_1_thread": L / one * 1e6, "tokens_per_s_2_threads": L / two * 1e6,
            })  # fmt: skip
            print(f"{name}, prefill of one prompt of {L} tokens: {fmt(one)} µs on 1 thread, {fmt(two)} split "
                  f"over 2 ({one / two:.2f}x; {L / two * 1e6:,.0f} tokens/s)", flush=True)  # fmt: skip
    shared = shared_rows(lib, recs, size)
    steps = batch_steps(lib, recs, size)
    return {
        "batch_steps": steps,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpus": os.cpu_count(), "shared": shared,
        "description": "native decode block µs per step (median of 5 blocks per round; rounds alternate 1 "
        "and 2 threads); busy: beside a CPU-bound Python process; prefill: the C prefill of one prompt "
        "(no logits), µs per call, median of 5 per round", "rows": rows, "prefill": prefill,
    }  # fmt: skip


def _bars(ax, rows: list[dict], key: str, labels: list[str], ylabel: str) -> None:
    """1 thread against split over 2, side by side per row (key + "_1_thread" / "_2_threads"), with the
    speed-up above each pair."""
    xs = range(len(rows))
    one, two = [r[key + "_1_thread"] for r in rows], [r[key + "_2_threads"] for r in rows]
    ax.bar([x - 0.2 for x in xs], one, width=0.4, label="1 thread")
    ax.bar([x + 0.2 for x in xs], two, width=0.4, label="split over 2")
    for x, r, a, b in zip(xs, rows, one, two):
        ax.text(x, max(a, b), f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(ylabel)
    ax.legend()


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax, bx, cx) = subplots(3, width=8.0)
    name = lambda r: f"{r['model'].split(',')[0][:16]}\n{r['model'].split(', ')[-1]}"  # noqa: E731
    rows, pre = data["rows"], data.get("prefill", [])
    _bars(ax, rows, "median_us", [f"{name(r)} b{r['batch']} {r['condition']}" for r in rows],
          "µs per decode step (median)")  # fmt: skip
    _bars(bx, pre, "tokens_per_s", [f"{name(r)} {r['tokens']} tok" for r in pre],
          "prompt tokens/s, one prompt (median)")  # fmt: skip
    sh = data.get("shared", [])
    xs = range(len(sh))
    fixed = [r["median_tokens_per_s_fixed"] for r in sh]
    shared = [r["median_tokens_per_s_shared"] for r in sh]
    cx.bar([x - 0.2 for x in xs], fixed, width=0.4, label="fixed shares")
    cx.bar([x + 0.2 for x in xs], shared, width=0.4, label="groups shared")
    for x, r, a, b in zip(xs, sh, fixed, shared):
        cx.text(x, max(a, b), f"{r['shared_over_fixed']:.2f}x", ha="center", va="bottom", fontsize=7)
    labels = [f"b{r['batch']} {r['condition']}" for r in sh]
    cx.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=6)
    cx.set_ylabel("decode block tokens/s, 2 threads (median)")
    cx.legend()
    title = (
        "one thread vs split over two cores: decode step (left), one prompt's C prefill (middle); "
        "a 2-thread block's groups shared vs fixed shares (right)"
    )
    save_figure(fig, NAME, quick, title=title)


def main(argv: Sequence[str] | None = None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
