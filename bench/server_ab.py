"""Two servers side by side: bench.server's steady WebSocket closed loop (`websocket_steady`: n sessions,
32-token prompts, each sending its next turn as soon as the last is done) against server A and server B in
turn, in alternated pairs (A B, B A, A B, ...), both up for the whole run, so that both see the same
machine. On a shared VM one run of the loop swings by ±25 % within minutes, more than most changes worth
measuring; only the ratio of side-by-side runs separates them. Each server differs by its environment
(S4_* settings: `--a S4_DECODE_BLOCK_MS=20 --b S4_DECODE_BLOCK_MS=40`) and/or its checkout (`--b-root
/path/to/another/checkout`, e.g. a `git worktree` of the commit before a change).

The pairs are spread over rounds (`--rounds`, 2 by default): each round starts both servers, A first in
even rounds and B first in odd ones, and stops them after its pairs, so that which server started second
(it has trailed in 9 of 12 pairs of two A/A runs with one start, 2026-12-03) weighs on both alike.

`--workload audio` runs bench.audio_streams' concurrent streams instead (`--sessions` streams, 16 by
default, each `--seconds` of audio, 4 by default, of `--checkpoint`, checkpoints/audio-digits-s4 by
default, after a short warm-up at each server start; `--spread-ms`: their starts spread over that long,
as streams that arrive at any time): per run samples/s, the server's CPU µs per sample,
the median stream's real-time factor and the first frame's p99.

Per run: tokens/s received in the window, the server process's CPU over the run (cores, from /proc, and
µs per token: less noisy than tokens/s where other tenants steal time), TTFT p50 / p99. Reported: each
pair's B ÷ A, the medians of each server's runs and their ratio, and how many pairs B was ahead in.

    python -m bench.server_ab [--quick] [--a ENV ...] [--b ENV ...] [--a-root DIR] [--b-root DIR]
                              [--pairs N] [--rounds N] [--sessions N] [--seconds S]
                              [--workload text|audio] [--checkpoint DIR] [--spread-ms MS] [--name NAME]

Results: bench/results/server_ab.json and .png, or NAME.json and .png with `--name NAME` (a comparison
kept beside the others: docs/performance.md cites each by its name). A run whose servers answered error
frames (refused requests measure nothing) fails, and is kept in bench/results/failed/NAME.json instead.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.audio_streams import WARMUP_S, audio_model, run_streams  # noqa: E402
from bench.common import ROOT, _git, _shown, bench_main, cpu_seconds, save_figure, subplots, write_failed  # noqa: E402
from bench.server import SIZES, checkpoint, websocket_steady  # noqa: E402
from server import launch  # noqa: E402

NAME = "server_ab"
DEFAULTS = {  # (workload, quick) → pairs, rounds, sessions (audio: streams), seconds (audio: of audio each)
    ("text", False): {"pairs": 6, "rounds": 2, "sessions": 64, "seconds": 6.0},
    ("text", True): {"pairs": 1, "rounds": 1, "sessions": 4, "seconds": 1.0},
    ("audio", False): {"pairs": 6, "rounds": 2, "sessions": 16, "seconds": 4.0},
    ("audio", True): {"pairs": 1, "rounds": 1, "sessions": 2, "seconds": 0.25},
}
AUDIO_CHECKPOINT = ROOT / "checkpoints" / "audio-digits-s4"
# each workload's keys: the rate compared, the server's CPU per unit, the latency p99 (ms), the unit's name
KEYS = {
    "text": {"rate": "tokens_per_s", "cpu": "server_cpu_us_per_token", "p99": "ttft_p99_ms", "unit": "token"},
    "audio": {"rate": "samples_per_s", "cpu": "server_cpu_us_per_sample", "p99": "first_frame_p99_ms",
              "unit": "sample"},
}  # fmt: skip
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
RESULT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def parse_env(assignments: list[str] | None) -> dict[str, str]:
    """["S4_X=1", "S4_Y=a b"] → {"S4_X": "1", "S4_Y": "a b"}. Raises ValueError naming a malformed one
    (no "=", or a name that is not an environment variable's: capitals, digits, underscores)."""
    env = {}
    for item in assignments or []:
        key, eq, value = item.partition("=")
        if not eq or not ENV_NAME.fullmatch(key):
            raise ValueError(f"{item!r} is not NAME=VALUE with NAME in capitals, digits and underscores")
        env[key] = value
    return env


def run(
    quick: bool,
    a: dict[str, str] | None = None,
    b: dict[str, str] | None = None,
    a_root: str | None = None,
    b_root: str | None = None,
    pairs: int | None = None,
    sessions: int | None = None,
    seconds: float | None = None,
    rounds: int | None = None,
    workload: str = "text",
    checkpoint_dir: str | None = None,
    spread_ms: float = 0.0,
) -> dict[str, Any]:
    """The two servers' runs (each with its round and which server that round started first) and the
    summary. Raises ValueError when there are fewer pairs than rounds, or for an unknown workload."""
    if workload not in KEYS:
        raise ValueError(f"workload {workload!r} is not one of {sorted(KEYS)}")
    d = DEFAULTS[workload, quick]
    pairs, sessions, seconds = pairs or d["pairs"], sessions or d["sessions"], seconds or d["seconds"]
    rounds = rounds or min(d["rounds"], pairs)
    if rounds > pairs:
        raise ValueError(f"{rounds} rounds need at least as many pairs, got {pairs}")
    sz = dict(SIZES[quick])
    arms = {"A": (a or {}, Path(a_root).resolve() if a_root else ROOT),
            "B": (b or {}, Path(b_root).resolve() if b_root else ROOT)}  # fmt: skip
    out: dict[str, Any] = {
        "workload": workload,
        "sessions": sessions,
        "seconds": seconds,
        "pairs": pairs,
        "rounds": rounds,
        "spread_ms": spread_ms,
        "sizes": sz,
        "servers": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint_dir is not None or workload == "audio":
            ckpt = Path(checkpoint_dir).resolve() if checkpoint_dir else AUDIO_CHECKPOINT
            what = f"checkpoint {ckpt.name}"
        else:
            ckpt, what = checkpoint(quick, Path(tmp))
        out["model"] = what
        n = str(sessions)
        flags = ["--checkpoints", str(ckpt), "--max-sessions", str(sessions + 4), "--max-batch-size", n,
                 "--max-queued-requests", str(sessions + 8)]  # fmt: skip
        for name, (env, root) in arms.items():
            commit = _git("-C", str(root), "rev-parse", "--short", "HEAD") or ""
            out["servers"][name] = {"env": env, "root": str(root), "commit": commit, "runs": []}
        for r in range(rounds):
            first = "A" if r % 2 == 0 else "B"
            servers = {}
            try:
                for name in (first, "B" if first == "A" else "A"):
                    env, root = arms[name]
                    # the prefix cache off unless an arm sets it (runs repeat prompts; an older
                    # checkout has none, and ignores the variable)
                    env = {"S4_PREFIX_CACHE_MB": "0", **env}
                    servers[name] = launch.start_server(flags, timeout_s=300, env=env, cwd=root)
                    if workload == "audio":
                        measure_audio(servers[name], sessions, WARMUP_S, label=None)  # (warm-up)
                for p in range(r * pairs // rounds, (r + 1) * pairs // rounds):
                    for name in ("A", "B") if p % 2 == 0 else ("B", "A"):
                        label = f"round {r} ({first} started first) pair {p} {name}"
                        if workload == "audio":
                            got = measure_audio(servers[name], sessions, seconds, label, spread_ms / 1e3)
                        else:
                            got = measure(servers[name], ckpt.name, sessions, sz, seconds, label)
                        out["servers"][name]["runs"].append({**got, "round": r, "started_first": first})
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(30)
    out["summary"] = summary(out)
    s = out["summary"]
    k = KEYS[workload]
    med, per = s[f"median_{k['rate']}"], ", ".join(f"{r:.2f}" for r in s["pair_ratios"])
    print(f"B ÷ A: ratio of the medians {s['ratio_of_medians']:.3f} ({med['B']:.0f} / {med['A']:.0f} "
          f"{k['unit']}s/s), "
          f"per pair {per}; B ahead in {s['b_ahead']} of {len(s['pair_ratios'])} (by which server started "
          f"first, B ahead / pairs: {s['b_ahead_by_first_started']})", flush=True)  # fmt: skip
    return out


def measure(server, model: str, sessions: int, sz: dict, seconds: float, label: str) -> dict[str, Any]:
    """One run of the steady loop against `server` (its process and URL), printed after `label`:
    tokens/s, the process's CPU (cores, µs per token) and TTFT p50 / p99 (ms)."""
    proc, url = server
    c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    st = websocket_steady(url, model, sessions, sz, seconds)
    cores = (cpu_seconds(proc.pid) - c0) / (time.perf_counter() - t0)
    tps = st["tokens_per_s"]
    us = cores / tps * 1e6 if tps else None  # no tokens: no cost per token (None, not 0)
    errs = f"  {st['errors']} ERROR FRAMES (first: {st['first_error']})" if st.get("errors") else ""
    print(f"{label}: {tps:9.0f} tok/s  server {cores:.2f} cores ({'—' if us is None else f'{us:.0f}'} "
          f"µs/token)  TTFT p50 {st['ttft_p50_ms']:.0f} p99 {st['ttft_p99_ms']:.0f} ms{errs}",
          flush=True)  # fmt: skip
    return {"tokens_per_s": tps, "server_cores": cores, "server_cpu_us_per_token": us,
            "ttft_p50_ms": st["ttft_p50_ms"], "ttft_p99_ms": st["ttft_p99_ms"],
            "errors": st.get("errors", 0), "first_error": st.get("first_error")}  # fmt: skip


def measure_audio(
    server, streams: int, seconds: float, label: str | None, spread_s: float = 0.0
) -> dict[str, Any]:
    """One run of `streams` concurrent audio streams of `seconds` each (bench.audio_streams.run_streams,
    their starts spread over `spread_s`) against `server` (its process and URL), printed after `label`
    (None: a warm-up, not printed):
    samples/s, the server process's CPU (cores over the run, µs per sample generated), the median
    stream's real-time factor, the first frame's p99 and the jitter p99 (ms)."""
    proc, url = server
    model, rate = audio_model(url)
    n = round(seconds * rate)
    c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
    ws_url = url.replace("http", "ws") + "/v1/stream"
    row = asyncio.run(run_streams(ws_url, model, streams, n, None, spread_s, warm_up=label is None))
    cpu, wall = cpu_seconds(proc.pid) - c0, time.perf_counter() - t0
    got = {
        "samples_per_s": row["samples_per_s"],
        "server_cores": cpu / wall,
        "server_cpu_us_per_sample": 1e6 * cpu / (streams * n),
        "realtime_factor_median": row["realtime_factor_median"],
        "first_frame_p99_ms": row["first_frame_ms_p99"],
        "jitter_p99_ms": row["jitter_p99_ms"],
    }
    if label is not None:
        sps, rtf, us = got["samples_per_s"], got["realtime_factor_median"], got["server_cpu_us_per_sample"]
        cores, p99 = got["server_cores"], got["first_frame_p99_ms"]
        print(f"{label}: {sps:9.0f} samples/s (RTF median {rtf:.2f})  server {cores:.2f} cores "
              f"({us:.1f} µs/sample)  first frame p99 {p99:.0f} ms", flush=True)  # fmt: skip
    return got


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """Pair ratios (B ÷ A tokens/s, or samples/s for audio, pair by pair), each server's medians (rate,
    CPU per unit, latency p99) and the ratio of the medians."""
    k = KEYS[data.get("workload", "text")]
    runs = {name: s["runs"] for name, s in data["servers"].items()}
    ratios = [rb[k["rate"]] / ra[k["rate"]] for ra, rb in zip(runs["A"], runs["B"]) if ra[k["rate"]]]
    med = {name: statistics.median(r[k["rate"]] for r in rs) for name, rs in runs.items()}
    cpu = {name: _median([r[k["cpu"]] for r in rs if r[k["cpu"]] is not None]) for name, rs in runs.items()}
    p99 = {name: statistics.median(r[k["p99"]] for r in rs) for name, rs in runs.items()}
    firsts = [ra.get("started_first") for ra in runs["A"]][: len(ratios)]
    errors = {name: sum(r.get("errors", 0) for r in rs) for name, rs in runs.items()}
    first_error = next((f"{name}: {r['first_error']}" for name, rs in runs.items() for r in rs
                        if r.get("errors")), None)  # fmt: skip
    return {
        # error frames the servers answered (a refused request measures nothing: the run fails)
        "errors": errors,
        "first_error": first_error,
        "pair_ratios": ratios,
        "b_ahead": sum(r > 1 for r in ratios),
        # B ahead in how many of the pairs whose round started A first, and B first: [ahead, pairs]
        "b_ahead_by_first_started": {
            first: [sum(r > 1 for r, f in zip(ratios, firsts) if f == first), firsts.count(first)]
            for first in ("A", "B")
        },
        f"median_{k['rate']}": med,
        "ratio_of_medians": med["B"] / med["A"] if med["A"] else float("nan"),
        f"median_{k['cpu']}": cpu,
        f"median_{k['p99']}": p99,
    }


def plot(data: dict[str, Any], quick: bool, results: str = NAME) -> None:
    workload = data.get("workload", "text")
    k = KEYS[workload]
    fig, (ax1, ax2) = subplots(2, width=11, height=4.5)
    for name, s in data["servers"].items():
        label = f"{name}: {' '.join(f'{k}={v}' for k, v in s['env'].items()) or 'defaults'} ({s['commit']})"
        xs = range(len(s["runs"]))
        ax1.plot(xs, [r[k["rate"]] for r in s["runs"]], "o-", label=label)
        ax2.plot(xs, [float("nan") if r[k["cpu"]] is None else r[k["cpu"]] for r in s["runs"]], "o-",
                 label=label)  # fmt: skip
    what = (f"{data['sessions']} sessions, steady closed loop" if workload == "text"
            else f"{data['sessions']} audio streams of {data['seconds']:g} s")  # fmt: skip
    ax1.set(xlabel="pair", ylabel=f"{k['unit']}s/s received", title=what)
    ax2.set(xlabel="pair", ylabel=f"server CPU µs per {k['unit']}", title=f"Server CPU per {k['unit']}")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    s = data["summary"]
    title = (f"Two servers side by side: B ÷ A {s['ratio_of_medians']:.3f} (ratio of medians), B ahead in "
             f"{s['b_ahead']} of {len(s['pair_ratios'])} pairs; {data['model']}")  # fmt: skip
    save_figure(fig, results, quick, title=title)


def result_name(text: str) -> str:
    """--name: the results' file name (NAME.json, NAME.png): letters, digits, '.', '_', '-'."""
    if not RESULT_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name of letters, digits, '.', '_' and '-'")
    return text


def main(argv=None) -> None:
    options: dict[str, Any] = {}
    # the results' name is needed before bench_main's parser runs (it names the JSON and the PNG)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--name", type=result_name, default=NAME)
    known, _ = early.parse_known_args(argv)
    name = known.name

    def arguments(parser) -> None:
        parser.add_argument(
            "--name", type=result_name, default=NAME,
            help=f"the results' name: bench/results/NAME.json and .png (default {NAME}; a comparison "
            "kept beside others gets its own, e.g. server_ab-prefix-cache)",
        )  # fmt: skip
        parser.add_argument(
            "--a", nargs="*", metavar="NAME=VALUE", help="server A's environment (S4_* settings)"
        )
        parser.add_argument(
            "--b", nargs="*", metavar="NAME=VALUE", help="server B's environment (S4_* settings)"
        )
        parser.add_argument("--a-root", help="the checkout server A runs from (default this one)")
        parser.add_argument("--b-root", help="the checkout server B runs from (default this one)")
        parser.add_argument("--pairs", type=int, help="alternated pairs of runs (default 6; --quick 1)")
        parser.add_argument(
            "--rounds",
            type=int,
            help="server starts the pairs are spread over, alternating which starts "
            "first (default 2; --quick 1; at most --pairs)",
        )
        parser.add_argument(
            "--sessions", type=int, help="concurrent sessions, or audio streams (default 64 / audio 16)"
        )
        parser.add_argument(
            "--workload", choices=sorted(KEYS), default="text",
            help="text: the steady WebSocket loop; audio: concurrent audio streams (bench.audio_streams)",
        )  # fmt: skip
        parser.add_argument(
            "--checkpoint",
            help="the checkpoint both serve (default: the shipped text model / audio-digits-s4)",
        )
        parser.add_argument(
            "--seconds", type=float, help="each run's measured window (default 6), or audio per stream (4)"
        )
        parser.add_argument(
            "--spread-ms", type=float, default=0.0,
            help="audio: each stream starts a seeded random delay in [0, this) after the others are bound "
            "(streams that arrive at any time; default 0: together)",
        )  # fmt: skip

    def configure(args) -> bool:
        for flag, value in (
            ("--pairs", args.pairs),
            ("--rounds", args.rounds),
            ("--sessions", args.sessions),
            ("--seconds", args.seconds),
        ):
            if value is not None and not 0 < value < math.inf:
                raise SystemExit(f"{flag} must be positive and finite, got {value}")
        if not 0 <= args.spread_ms < math.inf:  # (inf or nan: every stream slept for ever before its request)
            raise SystemExit(f"--spread-ms must be ≥ 0 and finite, got {args.spread_ms}")
        for flag, root in (("--a-root", args.a_root), ("--b-root", args.b_root)):
            if root is not None and not (Path(root) / "server" / "__main__.py").is_file():
                raise SystemExit(f"{flag} {root} is not a checkout of this project (no server/__main__.py)")
        try:
            options.update(a=parse_env(args.a), b=parse_env(args.b))
        except ValueError as exc:
            raise SystemExit(f"--a/--b: {exc}") from None
        if args.checkpoint is not None and not (Path(args.checkpoint) / "config.json").is_file():
            raise SystemExit(f"--checkpoint {args.checkpoint} is not a checkpoint folder (no config.json)")
        if args.rounds is not None and args.rounds > (
            args.pairs or DEFAULTS[args.workload, args.quick]["pairs"]
        ):
            raise SystemExit(f"--rounds {args.rounds} is more than the pairs to spread over them")
        options.update(a_root=args.a_root, b_root=args.b_root, pairs=args.pairs, sessions=args.sessions,
                       seconds=args.seconds, rounds=args.rounds, workload=args.workload,
                       checkpoint_dir=args.checkpoint, spread_ms=args.spread_ms)  # fmt: skip
        return True

    def measured(quick: bool) -> dict[str, Any]:
        data = run(quick, **options)
        s = data["summary"]
        if any(s["errors"].values()):  # kept to be looked at, never over the committed results
            path = write_failed(name, data, quick)
            n = ", ".join(f"{arm} {c}" for arm, c in s["errors"].items())
            raise SystemExit(
                f"bench.server_ab: the servers answered error frames ({n}); first: {s['first_error']} "
                f"(the run is in {_shown(path)}, not in the results)"
            )
        return data

    bench_main(argv, __doc__, name, measured, lambda data, quick: plot(data, quick, name),
               arguments=arguments, configure=configure, prog=f"python -m bench.{NAME}")  # fmt: skip


if __name__ == "__main__":
    main()
