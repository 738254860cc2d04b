"""Run the standard benchmarks (kernel, step, linear, decode, dtype, train, train_speed, server,
tail_latency, parse_stall, audio_streams, generation, memory), then print a markdown summary of the headline
numbers and write it to bench/results/summary.md (bench/results/quick/summary.md with --quick). The A/B
and study benchmarks (prefill, sashimi, big_batch, split, sampler, c_ab, state_precision, prefix_cache,
text_baseline, official, gpu, server_ab, wt103) each answer one question against a baseline or a revision,
or at a size this set does not run (wt103: the official WikiText-103 recipe's shapes, 9.8 GB of RSS after
its conversion in bench/results/wt103.json), and run on their own (README.md, "Performance").

    python -m bench.run_all [--quick] [--only kernel step ...] [--summary-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import MB, ROOT, fmt, read_results, results_dir

BENCHMARKS = (
    "kernel", "step", "linear", "decode", "dtype", "train", "train_speed", "server", "tail_latency",
    "parse_stall", "audio_streams", "generation", "memory",
)  # fmt: skip


def run_benchmarks(names: Sequence[str], quick: bool) -> dict[str, str]:
    """Run `python -m bench.NAME` for each name (output streamed); returns {name: status}."""
    status = {}
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else [])]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, check=False).returncode
        took = time.perf_counter() - t0
        status[name] = f"ok ({took:.0f} s)" if rc == 0 else f"FAILED (exit {rc}, {took:.0f} s)"
        print(f"=== bench.{name}: {status[name]}", flush=True)
    return status


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def kernel_section(d: dict[str, Any]) -> list[str]:
    sz = d["sizes"]
    lines = [
        f"## Kernel K (H={sz['H']}, L={sz['L']}): time and peak memory per kernel",
        "",
        f"dense baseline check: matches S4's kernel to rel. err {d['dense_vs_s4_rel_err_float64']:.1e} "
        "(float64, small size)",
        "",
    ]
    by = {(r["method"], r["mode"], r["N"]): r for r in d["results"]}
    methods = list(d["methods"])
    header = ["N"] + [f"{m} {mode}" for mode in ("fwd", "fwd+bwd") for m in methods]

    def cell(r: dict[str, Any] | None, key: str, scale: float, unit: str) -> str:
        if r is None:
            return "—"
        if "skipped" in r:
            return "skipped (>8 GB est.)"
        if "error" in r:
            return "error"
        return f"{fmt(r[key] * scale)} {unit}"

    rows_t = [
        [str(N)]
        + [cell(by.get((m, mode, N)), "time_s", 1e3, "ms") for mode in ("fwd", "fwd+bwd") for m in methods]
        for N in sz["Ns"]
    ]
    rows_m = [
        [str(N)]
        + [
            cell(by.get((m, mode, N)), "peak_rss_delta_mb", 1.0, "MiB")
            for mode in ("fwd", "fwd+bwd")
            for m in methods
        ]
        for N in sz["Ns"]
    ]
    lines += ["Median time:", "", *_table(header, rows_t), "", "Peak RSS above baseline:", ""]
    lines += _table(header, rows_m)
    return lines


def step_section(d: dict[str, Any]) -> list[str]:
    m = d["sizes"]["model"]
    lines = [
        f"## Recurrent step ({m['n_layers']} layers, H={m['d_model']}, N={m['d_state']}, "
        f"V={m['vocab_size']})",
        "",
        f"matmul ceiling {d['ceiling_gflops']:.0f} GFLOP/s (fp32 torch.mm)",
        "",
    ]
    rows = []
    for kind, k in d["kinds"].items():
        forms = "/".join(sorted({lay["form"] for lay in k["layers"]}))
        for r in k["step"]:
            rows.append(
                [
                    kind,
                    forms,
                    str(r["batch"]),
                    fmt(r["us_per_step_median"]),
                    fmt(r["tokens_per_s"]),
                    fmt(r["gflops"]),
                    f"{100 * r['fraction_of_ceiling']:.2g}%",
                ]
            )
    header = ["kernel", "layer form", "batch", "µs/step", "tokens/s", "GFLOP/s", "% of ceiling"]
    lines += _table(header, rows)
    lines += ["", "Prompt ingestion, batch 1:", ""]
    rows = []
    for kind, k in d["kinds"].items():
        p = k["prefill"]
        rows.append(
            [
                kind,
                str(p["prompt_tokens"]),
                f"{fmt(p['prefill_s'])} s",
                f"{fmt(p['sequential_steps_s'])} s",
                f"{p['speedup']:.0f}x",
                f"{fmt(k['flops_per_token']['total'] / 1e6)}",
            ]
        )
    header = ["kernel", "prompt", "prefill", "sequential steps", "speedup", "MFLOP/token"]
    lines += _table(header, rows)
    return lines


def linear_section(d: dict[str, Any]) -> list[str]:
    variants = list(d["results"][0]["us"])
    lines = ["## Step linear layers: µs per call (C row loop, C four-row tiles, sgemm)", ""]
    rows = [[r["shape"], str(r["batch"]), *(f"{r['us'][v]:.1f}" for v in variants), r["fastest"]]
            for r in d["results"]]  # fmt: skip
    return lines + _table(["shape", "batch", *variants, "fastest"], rows)


def decode_section(d: dict[str, Any]) -> list[str]:
    lines = [f"## Decode: engine tokens/s, one-step loop vs native block ({d['model']})", ""]
    rows = [[str(r["batch"]), f"{r['one-step']:.0f}", f"{r['native-block']:.0f}", f"{r['speedup']:.2f}x",
             f"{r['loop']['one-step']:.0f}", f"{r['loop']['native-block']:.0f}", f"{r['loop_speedup']:.2f}x"]
            for r in d["results"]]  # fmt: skip
    head = [
        "batch",
        "engine one-step",
        "engine native block",
        "ratio",
        "loop one-step",
        "loop block",
        "ratio",
    ]
    return lines + _table(head, rows)


def dtype_section(d: dict[str, Any]) -> list[str]:
    isa = ", ".join(d.get("isa", [])) or "?"
    lines = [f"## Weights dtype on this CPU ({isa}; {d['model']})", ""]
    batches, prompts = d["sizes"]["batches"], d["sizes"]["prompts"]
    rows = []
    for name, r in d["results"].items():
        m = r["medians"]
        rows.append([name, r["compute_dtype"]]
                    + [f"{m[f'decode_tok_s_b{B}']:.0f}" for B in batches]
                    + [f"{m[f'prefill_ms_{L}']:.1f}" for L in prompts]
                    + [f"{r['logits_rel_err']['vs_float64_same_weights']:.1e}"])  # fmt: skip
    head = ["weights", "torch ops in", *(f"decode tok/s, batch {B}" for B in batches),
            *(f"prefill ms, {L} tokens" for L in prompts), "logits rel. err (same weights)"]  # fmt: skip
    return lines + _table(head, rows)


def train_section(d: dict[str, Any]) -> list[str]:
    s, m = d["sizes"], d["sizes"]["model"]
    lines = [
        f"## Training step (batch {s['batch']} x L={s['L']}, {m['n_layers']} layers, H={m['d_model']}, "
        f"N={m['d_state']}; forward + backward)",
        "",
    ]
    rows = []
    for r in d["results"]:
        if "error" in r:
            rows.append([r["kind"], r["backend"], "error", "error", "error"])
            continue
        rows.append(
            [
                r["kind"],
                r["backend"],
                f"{fmt(r['time_s'])} s",
                fmt(r["tokens_per_s"]),
                fmt(r["peak_rss_delta_bytes"] / MB),
            ]
        )
    lines += _table(["kernel", "backend", "time/step", "tokens/s", "peak MiB"], rows)
    return lines


def server_section(d: dict[str, Any]) -> list[str]:
    lines = [
        f"## Serving ({d['model']}; {d['sizes']['prompt']}-token prompts, {d['sizes']['tokens']} new tokens)",
        "",
    ]
    rows = []
    for r in d["results"]:
        e, w = r["engine"], r.get("websocket", {})
        rows.append(
            [
                str(r["sessions"]),
                fmt(r["raw_step_tokens_per_s"]),
                fmt(e["tokens_per_s"]),
                fmt(w.get("tokens_per_s")),
                f"{w['fraction_of_engine']:.2f}" if w else "—",
                f"{fmt(e['ttft_p99_ms'])} / {fmt(w.get('ttft_p99_ms'))}",
            ]
        )
    header = [
        "sessions",
        "raw step tok/s",
        "engine tok/s",
        "WebSocket tok/s",
        "WS / engine",
        "TTFT p99 ms (engine / WS)",
    ]
    lines += _table(header, rows)
    return lines


def tail_latency_section(d: dict[str, Any]) -> list[str]:
    sz = d["sizes"]
    lines = [
        f"## Tail latency: {sz['sessions']} WebSocket sessions decoding while a {sz['long_prompt']}-token "
        f"prompt is ingested ({d['model']}; load average {min(d['load_avg_1min']):.1f}–"
        f"{max(d['load_avg_1min']):.1f})",
        "",
    ]
    rows = []
    for name, r in d["results"].items():
        w, b = r["during_long"], r["baseline"]
        rows.append(
            [
                name,
                f"{fmt(w['short_ttft']['p50_ms'])} / {fmt(w['short_ttft']['p99_ms'])}",
                f"{fmt(w['itl']['p50_ms'])} / {fmt(w['itl']['p99_ms'])}",
                f"{fmt(b['short_ttft']['p99_ms'])} / {fmt(b['itl']['p99_ms'])}",
                " / ".join(fmt(x) for x in r["long_prompt_ttft_ms"]),
            ]
        )
    header = [
        "prefill",
        "short TTFT p50 / p99 ms",
        "ITL p50 / p99 ms",
        "before it: TTFT p99 / ITL p99 ms",
        "long prompt TTFT ms",
    ]
    return lines + _table(header, rows)


def parse_stall_section(d: dict[str, Any]) -> list[str]:
    servers = d["servers"]
    lines = [
        "## One request's JSON body: the longest pause of a stream while it is in flight (worst of "
        f"{d['rounds']} rounds; status)",
        "",
    ]
    kinds = list(next(iter(servers.values()))["kinds"])
    rows = []
    for k in kinds:
        row = [k]
        for s in servers.values():
            runs = s["kinds"][k]
            row.append(f"{fmt(max(r['max_gap_ms'] for r in runs))} ms ({runs[-1].get('status', '-')})")
        rows.append(row)
    header = ["body", *(f"{name} ({s['commit']})" for name, s in servers.items())]
    return lines + _table(header, rows)


def audio_streams_section(d: dict[str, Any]) -> list[str]:
    from bench.audio_streams import HEADER, table

    s = d["sizes"]
    lines = [
        f"## Audio streams over WebSockets ({d['model']}; {s['seconds']:g} s each, frame_ms {s['frame_ms']})",
        "",
    ]
    return lines + _table(HEADER, table(d))


def generation_section(d: dict[str, Any]) -> list[str]:
    from bench.generation import table

    lines = [
        f"## Generation: S4 vs KV-cache Transformer (S4: {d['s4_model']})",
        "",
        "MiB per sequence: S4 / Transformer, analytic and measured (marginal RSS per extra sequence).",
        "",
    ]
    header = [
        "context",
        "batch",
        "S4 tok/s",
        "Transformer tok/s",
        "S4 ÷ Transformer",
        "MiB/seq analytic",
        "MiB/seq measured",
    ]
    return lines + _table(header, table(d))


def memory_section(d: dict[str, Any]) -> list[str]:
    lines = ["## Memory per session (measured marginal RSS / analytic)", ""]
    contexts = d["sizes"]["measured_contexts"]
    rows = []
    for name, m in d["models"].items():
        got = {r["context"]: r for r in m["measured"]}
        cells = []
        for c in contexts:
            r = got.get(c)
            cells.append(
                f"{fmt(r['bytes_per_sequence_marginal'] / MB)} / {fmt(r['analytic_bytes_per_sequence'] / MB)}"
                if r
                else "—"
            )
        rows.append([name, *cells])
    return lines + _table(["MiB per session", *[str(c) for c in contexts]], rows)


def train_speed_section(d: dict[str, Any]) -> list[str]:
    lines = ["## Conv-mode training step, before vs after (forward + backward + AdamW, medians)", ""]
    rows = []
    for name, r in d["results"].items():
        rows.append(
            [
                f"{name} (B={r['batch']}, L={r['L']}, {r['threads']} thr.)",
                fmt(r["before"]["tokens_per_s"]),
                fmt(r["after"]["tokens_per_s"]),
                f"{r['speedup']:.2f}",
            ]
        )
    return lines + _table(["config", "before tokens/s", "after tokens/s", "speedup"], rows)


def _machine(mc: dict[str, Any]) -> str:
    """A results JSON's machine block in words (without its date and commit)."""
    threads = f"{mc['cpu_count']} CPUs ({mc['torch_threads']} torch threads)"
    return f"{mc['cpu']}, {threads}, torch {mc['torch']}, pykeops {mc['pykeops']}"


def _commit(mc: dict[str, Any]) -> str:
    """The commit a results JSON was measured at, and whether the tree differed from it."""
    modified = (" (tracked files modified)" if mc.get("tree_modified")
                else " (model/ modified)" if mc.get("model_dir_modified") else "")  # fmt: skip
    return str(mc["git_commit"])[:10] + modified


def summary(quick: bool, status: dict[str, str] | None = None) -> str:
    sections = {
        "kernel": kernel_section,
        "step": step_section,
        "linear": linear_section,
        "decode": decode_section,
        "dtype": dtype_section,
        "train": train_section,
        "train_speed": train_speed_section,
        "server": server_section,
        "tail_latency": tail_latency_section,
        "parse_stall": parse_stall_section,
        "audio_streams": audio_streams_section,
        "generation": generation_section,
        "memory": memory_section,
    }
    lines = ["# Benchmark summary" + (" (--quick smoke sizes)" if quick else ""), ""]
    machines = []  # each section's, in order: its results may come from another run, CPU and commit
    for name, section in sections.items():
        d = read_results(name, quick)
        if d is None:
            lines += [f"## {name}: no results", ""]
            continue
        mc = d["machine"]
        machines.append(mc)
        lines += [*section(d), "", f"_{name}: {mc['date']}, {mc['cpu']}, commit {_commit(mc)}_", ""]
    if machines:
        mc = machines[0]
        if all(_machine(m) == _machine(mc) for m in machines):
            lines[1:1] = [f"Machine: {_machine(mc)}, commit {_commit(mc)}", ""]
        else:  # (one line for all named the first section's machine and commit for every section)
            cpus, commits = len({m["cpu"] for m in machines}), len({_commit(m) for m in machines})
            lines[1:1] = [f"Machine: the sections come from {len(machines)} runs, on {cpus} CPU model(s) at "
                          f"{commits} commit(s): each names its own below", ""]  # fmt: skip
    if status:
        lines += ["Runs: " + ", ".join(f"{k} {v}" for k, v in status.items()), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 2 min)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the summary")
    args = parser.parse_args(argv)
    status = None
    if not args.summary_only:
        status = run_benchmarks(args.only or BENCHMARKS, args.quick)
    text = summary(args.quick, status)
    print("\n" + text)
    path = results_dir(args.quick) / "summary.md"
    path.write_text(text)
    print(f"wrote {path.relative_to(ROOT)}")
    if status and any(not v.startswith("ok") for v in status.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
