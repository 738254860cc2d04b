"""Load-test sweep: start the server on loopback (or target `--host`), run locust headless at a sweep
of concurrencies with a bounded duration each, collect the CSVs and write a report (Markdown + PNG).

    python -m loadtest                        # the full sweep (≈ 5 min), report in loadtest/results/
    python -m loadtest --quick                # tiny stand-in models, 4 s per level → loadtest/results/quick/
    python -m loadtest --host http://127.0.0.1:8000 --scenarios text-ws --users 1 8 32   # → results/partial/
    python -m loadtest --replot               # rebuild the report from loadtest/results/loadtest.json

Scenarios (each a list of locust user classes from loadtest/locustfile.py and a user sweep):
  text-ws  WebSocket text sessions (several turns per socket): tokens/s, requests/s, TTFT, ITL
  audio    WebSocket audio streams (mu-law frames): real-time factor per stream and in total
  mixed    HTTP generate + SSE + WebSocket text + WebSocket audio together

The server serves checkpoints/text-shakespeare and checkpoints/audio-digits-s4 (the isotropic audio
model) when they exist, else random-init stand-ins of the same shapes (speed does not depend on the
weights; the report says which). Before each level the 1-minute load average is recorded (the machine
may be shared).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ranged
from loadtest.loopback import loopback_url

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
SHIPPED = {
    "text": ROOT / "checkpoints" / "text-shakespeare",
    "audio": ROOT / "checkpoints" / "audio-digits-s4",
}
STANDIN = {  # the shipped models' shapes
    False: {
        "text": {"vocab_size": 256, "d_model": 256, "n_layers": 4, "d_state": 64, "l_max": 1024},
        "audio": {
            "vocab_size": 256,
            "d_model": 128,
            "n_layers": 4,
            "d_state": 64,
            "l_max": 8000,
            "modality": "audio",
            "sample_rate": 8000,
        },
    },
    True: {
        "text": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "d_state": 16, "l_max": 256},
        "audio": {
            "vocab_size": 256,
            "d_model": 32,
            "n_layers": 2,
            "d_state": 16,
            "l_max": 256,
            "kernel": "s4d",
            "modality": "audio",
            "sample_rate": 8000,
        },
    },
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "text-ws": {"classes": ["WsTextUser"], "users": [1, 8, 32, 64, 128], "quick_users": [1, 4]},
    "audio": {"classes": ["WsAudioUser"], "users": [1, 2, 4, 8], "quick_users": [1, 2]},
    "mixed": {
        "classes": ["HttpGenerateUser", "SseUser", "WsTextUser", "WsAudioUser"],
        "users": [8, 64],
        "quick_users": [4],
    },
}
GOALS = {"ttft_p99_ms_at_64": 50.0, "audio_rtf_streams": 4}
KINDS = ("HTTP", "SSE", "WS", "WS-audio")


# ---------------------------------------------------------------------------------------------
# Server


def checkpoints(quick: bool, tmp: Path) -> tuple[list[Path], dict[str, str]]:
    """The shipped checkpoints, or stand-ins with the same folder names (so the model ids match)."""
    paths, what = [], {}
    for kind, path in SHIPPED.items():
        if path.exists() and not quick:
            paths.append(path)
            what[kind] = f"shipped checkpoint {path.name}"
            continue
        import torch

        from model import ModelConfig, SequenceModel, save

        torch.manual_seed(0)
        cfg = {"cauchy_backend": "torch", **STANDIN[quick][kind]}
        save(SequenceModel(ModelConfig(**cfg)), tmp / path.name)
        paths.append(tmp / path.name)
        what[kind] = f"stand-in, random init: {cfg}"
    return paths, what


def start_server(
    ckpts: list[Path], max_users: int, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen, str]:
    from server.launch import start_server as launch

    slots = str(max(256, 2 * max_users))  # sockets that reconnect hold their old slot a moment
    flags = ["--checkpoints", ",".join(map(str, ckpts)), "--max-sessions", slots]
    return launch([*flags, "--max-queued-requests", slots, *extra])


def served_models(url: str, api_key: str = "") -> dict[str, dict]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url + "/v1/models", timeout=10, headers=headers)
    if r.status_code == 401:  # (a server with S4_API_KEYS: its KeyError 'data' said nothing)
        given = "the key given was refused" if api_key else "it needs an API key"
        raise RuntimeError(f"HTTP 401: {given} (set S4_API_KEY to one of the server's S4_API_KEYS)")
    if r.status_code == 503:  # (models still loading, or draining: a KeyError 'data' said nothing)
        raise RuntimeError(f"HTTP 503: {r.json()['error']['message']} (wait for its /readyz to answer 200)")
    # each model serves once loaded: a list while others still load would skip their scenarios
    ready = httpx.get(url + "/readyz", timeout=10, headers=headers)
    if ready.status_code == 503 and (loading := ready.json().get("loading")):
        raise RuntimeError(f"models still loading: {', '.join(loading)} (wait for its /readyz to answer 200)")
    return {m["id"]: m for m in r.json()["data"]}


# ---------------------------------------------------------------------------------------------
# One level: locust headless, then its CSV + exact-latency JSON


LEVEL_GRACE_S = 120  # a level's locust may run this long past its seconds (start-up, stopping users)


class LevelError(RuntimeError):
    """A level whose locust run did not produce its statistics (the message is one line)."""


def run_level(url: str, classes: list[str], users: int, seconds: int, prefix: Path, opts: dict,
              api_key: str = "") -> dict:  # fmt: skip
    """Run locust headless at `users` users for `seconds` (stats reset once all are spawned). LevelError when
    locust did not produce its statistics, or when every request of a kind failed (naming its first one)."""
    latency = prefix.with_suffix(".latency.json")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--host",
        url,
        "--csv",
        str(prefix),
        "--reset-stats",
        "--only-summary",
        "--latency-out",
        str(latency),
        "--loglevel",
        "WARNING",
        *[f"--{k.replace('_', '-')}={v}" for k, v in opts.items()],
        *classes,
    ]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "S4_API_KEY": api_key}  # the key in the environment, not the command line (ps)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                              timeout=seconds + LEVEL_GRACE_S)  # fmt: skip
    except subprocess.TimeoutExpired as exc:  # (killed by subprocess.run: a traceback came out of main)
        err = exc.stderr or ""
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        tail = " | ".join(line.strip() for line in err.strip().splitlines()[-3:] if line.strip())
        limit = seconds + LEVEL_GRACE_S
        raise LevelError(
            f"locust did not finish at {users} users within {limit} s (the level's {seconds} s + "
            f"{LEVEL_GRACE_S} s) and was killed: {tail or 'no stderr'}"
        ) from None
    wall = time.perf_counter() - t0
    stats = Path(f"{prefix}_stats.csv")
    if proc.returncode not in (0, 1) or not stats.exists():  # 1: some requests failed (counted below)
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:] if line.strip())
        raise LevelError(
            f"locust failed at {users} users (exit code {proc.returncode}"
            f"{'' if stats.exists() else ', no ' + stats.name}): {tail or 'no stderr'}"
        )
    level = summarize(prefix, latency)
    # a kind whose every request failed measured nothing (it was reported as a level at 0 tokens/s, exit 0)
    by_kind = level["by_kind"]
    if dead := [k for k, d in by_kind.items() if d["failures"] >= max(1, d["requests"] + d["connects"])]:
        why = "; ".join(f"{k}'s first: {by_kind[k].get('first_failure') or 'not recorded'}" for k in dead)
        raise LevelError(f"every {' and '.join(dead)} request failed at {users} users: {why}")
    level.update(
        users=users,
        classes=classes,
        seconds=seconds,
        wall_s=wall,
        load_avg_1min_before=load,
        locust_exit_code=proc.returncode,
    )
    if proc.returncode not in (0, 1):  # 1: some requests failed (counted in the error rate)
        level["locust_stderr_tail"] = proc.stderr[-2000:]
    for p in prefix.parent.glob(prefix.name + "_*"):  # keep the small per-request CSVs only
        if p.name.endswith(("_stats_history.csv", "_exceptions.csv")):
            p.unlink()
    return level


def read_stats(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def summarize(prefix: Path, latency: Path) -> dict[str, Any]:
    """Per level: locust's own request percentiles from its CSV; requests, connects, failures, requests/s,
    tokens/s, exact TTFT/ITL percentiles, audio RTF and locust's CPU from the locustfile's JSON. (Locust
    writes its CSV once a second while it runs and not at its end: the counts there missed the run's last
    second. A JSON without connects, from an older locustfile, leaves them to the CSV.)"""
    rows = read_stats(Path(f"{prefix}_stats.csv"))
    exact = json.loads(latency.read_text()) if latency.exists() else {}
    per: dict[str, dict[str, Any]] = {}

    def kind_of(kind: str) -> dict[str, Any]:
        return per.setdefault(kind, {"requests": 0, "failures": 0, "requests_per_s": 0.0, "connects": 0})

    for r in rows:
        kind, name = r["Type"], r["Name"]
        if kind not in KINDS or name not in ("generate", "connect"):
            continue
        d = kind_of(kind)
        if name == "generate":
            d["requests"] += int(r["Request Count"])
            d["requests_per_s"] += float(r["Requests/s"])
            d["request_p50_ms_locust"] = float(r["50%"] or 0)
            d["request_p99_ms_locust"] = float(r["99%"] or 0)
        else:
            d["connects"] += int(r["Request Count"])
        d["failures"] += int(r["Failure Count"])
    window = exact.get("window_s") or 0.0
    if "connects" in exact:  # the locustfile's own counts, to the end of the run
        for kind in exact["requests"]:  # (one whose reports all came after the CSV's last write: there alone)
            if kind in KINDS:
                kind_of(kind)
        for kind, d in per.items():
            d["connects"] = exact["connects"].get(kind, 0)
            d["requests"] = exact["requests"].get(kind, 0) - d["connects"]
            d["failures"] = exact["failures"].get(kind, 0)
            d["requests_per_s"] = d["requests"] / window if window else 0.0
    for kind, d in per.items():
        d["tokens_per_s"] = exact.get("tokens_per_s", {}).get(kind, 0.0)
        d["error_rate"] = d["failures"] / max(1, d["requests"] + d["connects"])
        if first := exact.get("first_failures", {}).get(kind):
            d["first_failure"] = first
        for name in ("ttft", "itl"):
            lat = exact.get("latency", {}).get(f"{kind} {name}")
            if lat:
                d.update(
                    {f"{name}_{k}": v for k, v in lat.items() if k.endswith("_ms")},
                    **{f"{name}_count": lat["count"]},
                )
    out: dict[str, Any] = {
        "by_kind": per,
        "window_s": window,
        "locust_cpu_percent": exact.get("locust_cpu_percent"),
    }
    text = [k for k in per if k != "WS-audio"]
    out["text_tokens_per_s"] = sum(per[k]["tokens_per_s"] for k in text)
    out["requests_per_s"] = sum(d["requests_per_s"] for d in per.values())
    reqs = sum(d["requests"] + d["connects"] for d in per.values())
    out["error_rate"] = sum(d["failures"] for d in per.values()) / max(1, reqs)
    turns = exact.get("audio_turns") or []
    if "WS-audio" in per:
        sr = turns[0]["sample_rate"] if turns else 8000
        streams = [x / sr for x in exact.get("tokens_per_s_per_user", {}).get("WS-audio", [])]
        rtfs = sorted(t["rtf"] for t in turns)
        after = [t["rtf_after_first_sample"] for t in turns if t.get("rtf_after_first_sample") is not None]
        out["audio"] = {
            "sample_rate": sr,
            "streams_seen": len(streams),
            "samples_per_s": per["WS-audio"]["tokens_per_s"],
            "rtf_total": per["WS-audio"]["tokens_per_s"] / sr,  # all streams together
            # per stream: its samples received in the window ÷ window ÷ sample rate
            "rtf_per_stream_mean": sum(streams) / len(streams) if streams else None,
            "rtf_per_stream_min": min(streams) if streams else None,
            # per completed turn: samples ÷ sample rate ÷ (request sent → done)
            "turns": len(turns),
            "rtf_per_turn_mean": sum(rtfs) / len(rtfs) if rtfs else None,
            "rtf_per_turn_min": rtfs[0] if rtfs else None,
            # per completed turn of two frames or more: its samples after the first frame ÷ sample rate ÷
            # the time from the first frame to the last
            "rtf_after_first_sample_mean": sum(after) / len(after) if after else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


def _cpu(x: float | dict | None) -> float | None:
    """Locust's CPU % of one core; results written before this was measured from getrusage hold
    locust's own monitor's reading, which stayed 0 here: shown as unknown."""
    return None if isinstance(x, dict) else x


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def text_rows(levels: list[dict], kinds: Sequence[str] = ("WS",)) -> list[list[str]]:
    rows = []
    for lv in levels:
        for kind in kinds:
            d = lv["by_kind"].get(kind)
            if not d:
                continue
            rows.append(
                [
                    str(lv["users"]),
                    kind,
                    _f(d["tokens_per_s"]),
                    _f(d["requests_per_s"]),
                    f"{_f(d.get('ttft_p50_ms'))} / {_f(d.get('ttft_p99_ms'))}",
                    f"{_f(d.get('itl_p50_ms'))} / {_f(d.get('itl_p99_ms'))}",
                    f"{100 * d['error_rate']:.2g} %",
                    _f(lv["load_avg_1min_before"]),
                    _f(_cpu(lv.get("locust_cpu_percent"))),
                ]
            )
    return rows


TEXT_HEADER = [
    "users",
    "transport",
    "tokens/s",
    "requests/s",
    "TTFT p50 / p99 ms",
    "ITL p50 / p99 ms",
    "errors",
    "load avg before",
    "locust CPU %",
]


def audio_rows(levels: list[dict]) -> list[list[str]]:
    rows = []
    for lv in levels:
        a, d = lv.get("audio"), lv["by_kind"].get("WS-audio", {})
        if not a:
            continue
        rows.append(
            [
                str(a.get("streams_seen") or lv["users"]),
                _f(a["samples_per_s"]),
                _f(a["rtf_total"]),
                f"{_f(a['rtf_per_stream_mean'])} / {_f(a['rtf_per_stream_min'])}",
                f"{_f(a['rtf_per_turn_mean'])} / {_f(a['rtf_per_turn_min'])}",
                f"{_f(d.get('ttft_p50_ms'))} / {_f(d.get('ttft_p99_ms'))}",
                f"{100 * d.get('error_rate', 0):.2g} %",
                str(a["turns"]),
                _f(lv["load_avg_1min_before"]),
            ]
        )
    return rows


AUDIO_HEADER = [
    "streams",
    "samples/s",
    "RTF total",
    "RTF per stream mean / min",
    "RTF per turn mean / min",
    "TTFT p50 / p99 ms",
    "errors",
    "turns",
    "load avg before",
]


def report(data: dict[str, Any], out: Path) -> str:
    m = data["machine"]
    lines = [
        "# Load test report" + (" (--quick smoke sizes)" if data["quick"] else ""),
        "",
        f"{data['date']}; {m['cpu']}, {m['cpu_count']} CPUs, Python {m['python']}, torch {m['torch']}, "
        f"locust {data['locust_version']}; commit {str(m.get('git_commit'))[:10]}.",
        "Server and locust run on the same machine (loopback), so the client's CPU is taken from the "
        "server's: read the numbers as a lower bound.",
        "",
        f"Models: text = {data['models'].get('text', '—')}; audio = {data['models'].get('audio', '—')}.",
        f"Command: `{data['command']}`",
        f"Per level: {data['seconds']:g} s (stats reset once every user is spawned); text turns "
        f"{data['options']['new_tokens']} tokens, {data['options']['turns']} turns per WebSocket session; "
        f"audio turns {data['options']['audio_samples']} samples after a "
        f"{data['options']['audio_prompt_samples']}-sample mu-law prompt frame.",
        "TTFT: request sent → first token; ITL: gap between consecutive token frames (client side); "
        "percentiles from every sample (the locustfile's exact timings, not locust's rounded buckets).",
        "",
    ]
    sc = data["scenarios"]
    if "text-ws" in sc:
        lines += [
            "## Text over WebSocket (`text-ws`)",
            "",
            *_table(TEXT_HEADER, text_rows(sc["text-ws"])),
            "",
            "![text](text-ws.png)",
            "",
        ]
    if "audio" in sc:
        lines += [
            "## Audio over WebSocket (`audio`): real-time factor",
            "",
            "RTF per stream = the samples a stream received in the measured window ÷ sample rate ÷ "
            "window; per turn = a completed turn's samples ÷ sample rate ÷ its wall time (request → done, "
            "TTFT included); total = all streams' samples per second ÷ sample rate.",
            "",
            *_table(AUDIO_HEADER, audio_rows(sc["audio"])),
            "",
            "![audio](audio.png)",
            "",
        ]
    if "mixed" in sc:
        lines += [
            "## Mixed: HTTP + SSE + WebSocket text + WebSocket audio (`mixed`)",
            "",
            *_table(TEXT_HEADER, text_rows(sc["mixed"], KINDS)),
            "",
        ]
        if audio_rows(sc["mixed"]):
            lines += [*_table(AUDIO_HEADER, audio_rows(sc["mixed"])), ""]
    g = data.get("goals_measured") or {}
    if g:
        lines += ["## Goals", ""]
        for k, v in g.items():
            lines.append(f"- {k}: {v}")
        lines.append("")
    lines += [
        "Raw: `loadtest.json` (every number above), `csv/` (locust's per-level statistics and failures).",
        "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = data["scenarios"]
    if sc.get("text-ws"):
        lv = sc["text-ws"]
        us = [x["users"] for x in lv]
        ws = [x["by_kind"].get("WS", {}) for x in lv]
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        a.plot(us, [d.get("tokens_per_s", 0) for d in ws], "o-", label="tokens/s")
        a.set(
            xscale="log",
            xlabel="concurrent users (WebSocket sessions)",
            ylabel="tokens/s",
            title="Throughput",
        )
        a2 = a.twinx()
        a2.plot(us, [d.get("requests_per_s", 0) for d in ws], "s--", color="tab:orange", label="requests/s")
        a2.set_ylabel("requests/s")
        a.legend(loc="upper left")
        a2.legend(loc="lower right")
        for key, mark in (("ttft", "o"), ("itl", "s")):
            b.plot(us, [d.get(f"{key}_p50_ms") for d in ws], mark + "--", label=f"{key.upper()} p50")
            b.plot(us, [d.get(f"{key}_p99_ms") for d in ws], mark + "-", label=f"{key.upper()} p99")
        b.axhline(GOALS["ttft_p99_ms_at_64"], color="grey", ls=":", label="goal: TTFT p99 at 64 users")
        b.set(
            xscale="log", yscale="log", xlabel="concurrent users", ylabel="ms", title="Latency (client side)"
        )
        b.legend(fontsize=8)
        for ax in (a, b):
            ax.set_xticks(us, [str(u) for u in us])
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"Text over WebSocket: {data['models'].get('text')}"[:140], fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "text-ws.png", dpi=110)
        plt.close(fig)
    if sc.get("audio"):
        lv = [x for x in sc["audio"] if x.get("audio")]
        us = [x["users"] for x in lv]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(us, [x["audio"]["rtf_total"] for x in lv], "o-", label="RTF, all streams together")
        ax.plot(us, [x["audio"]["rtf_per_stream_mean"] for x in lv], "s-", label="RTF per stream (mean)")
        ax.plot(us, [x["audio"]["rtf_per_stream_min"] for x in lv], "v:", label="RTF per stream (min)")
        ax.axhline(1.0, color="grey", ls=":", label="real time")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="concurrent audio streams",
            ylabel="real-time factor",
            title=f"Audio streams at {lv[0]['audio']['sample_rate'] if lv else '?'} Hz",
        )
        ax.set_xticks(us, [str(u) for u in us])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "audio.png", dpi=110)
        plt.close(fig)


def goals(data: dict[str, Any]) -> dict[str, str]:
    out = {}
    at64 = next((x for x in data["scenarios"].get("text-ws", []) if x["users"] == 64), None)
    if at64 and "WS" in at64["by_kind"]:
        p99 = at64["by_kind"]["WS"].get("ttft_p99_ms")
        ok = p99 is not None and p99 <= GOALS["ttft_p99_ms_at_64"]
        out["TTFT p99 ≤ 50 ms at 64 WebSocket sessions"] = f"{_f(p99)} ms ({'met' if ok else 'not met'})"
    rt = [  # (the label's test: every turn's own RTF, not a stream's average over its turns)
        x for x in data["scenarios"].get("audio", []) if x.get("audio") and x["audio"].get("rtf_per_turn_min")
    ]
    if rt:  # (a failed turn has no RTF: a level with one did not have every turn in real time)
        failed = [x for x in rt if x.get("by_kind", {}).get("WS-audio", {}).get("failures")]
        real = [x["users"] for x in rt if x["audio"]["rtf_per_turn_min"] >= 1.0 and x not in failed]
        most = max(real) if real else 0
        ok = most >= GOALS["audio_rtf_streams"]
        out["audio real time (every turn RTF ≥ 1) for ≥ 4 streams"] = (
            f"{most} streams in real time ({'met' if ok else 'not met'}); best total RTF "
            f"{_f(max(x['audio']['rtf_total'] for x in rt))}"
        )
    return out


# ---------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    try:
        from bench.common import machine_info

        return machine_info()
    except Exception:  # noqa: BLE001  (the report still works without the bench helpers)
        return {
            "cpu": platform.processor(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": None,
        }


def report_folder(args: argparse.Namespace) -> Path:
    """--out, else loadtest/results/ for the full sweep, results/quick/ with --quick, and results/partial/
    for a run with any option other than the full sweep's defaults (scenarios, users, levels, tokens,
    turns, audio sizes, server flags or --host: one rewrote the committed report, dropping the scenarios
    it did not run: a fresh user's trial)."""
    if args.out:
        return args.out
    defaults = build_parser()
    partial = any(
        getattr(args, dest) != defaults.get_default(dest)
        for dest in vars(args)
        if dest not in ("quick", "out", "replot", "scenarios")
    ) or set(args.scenarios) != set(SCENARIOS)
    return HERE / "results" / ("quick" if args.quick else "partial" if partial and not args.replot else "")


def _loopback(url: str) -> str:
    """An argparse type: a loopback server's URL (loadtest.loopback)."""
    try:
        return loopback_url(url)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server_arg(flag: str) -> str:
    """An argparse type: a flag for the started server, which listens on 127.0.0.1 (not --host, --port)."""
    if flag.split("=", 1)[0] in ("--host", "--port"):
        raise argparse.ArgumentTypeError(f"{flag!r}: the started server listens on 127.0.0.1 at a free port")
    return flag


MAX_USERS = 1024  # the server gets max(256, 2 × users) session slots; locust on one core tops out far below


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", type=_loopback, help="target a running server on loopback, "
                        "http://127.0.0.1:PORT (default: start one there)")  # fmt: skip
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--users", nargs="+", type=ranged(int, 1, MAX_USERS),
                        help=f"override every scenario's user sweep (1..{MAX_USERS})")  # fmt: skip
    parser.add_argument("--seconds", type=ranged(int, 1, 3600),  # (locust's --run-time: whole seconds)
                        help="per level, whole seconds, 1 to 3600 (default 20, --quick 4)")  # fmt: skip
    parser.add_argument("--new-tokens", type=ranged(int, 1, 100_000), default=64)
    parser.add_argument("--turns", type=ranged(int, 1, 10_000), default=4)
    parser.add_argument("--audio-samples", type=ranged(int, 1, 10_000_000), default=4000)
    parser.add_argument("--audio-prompt-samples", type=ranged(int, 0, 10_000_000), default=400)
    parser.add_argument("--quick", action="store_true", help="tiny stand-in models, short levels")
    parser.add_argument("--out", type=Path, help="report folder (default loadtest/results/ for the full "
                        "sweep, results/quick/ with --quick, results/partial/ for any other)")  # fmt: skip
    parser.add_argument("--server-arg", action="append", default=[], type=_server_arg,
                        help="extra flag for python -m server (not --host or --port: it listens on "
                        "127.0.0.1)")  # fmt: skip
    parser.add_argument(
        "--replot", action="store_true", help="rebuild report.md and the PNGs from loadtest.json"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = report_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        data = json.loads((out / "loadtest.json").read_text())
        plot(data, out)
        print(report(data, out))
        return
    seconds = args.seconds if args.seconds is not None else (4 if args.quick else 20)
    opts = {
        "new_tokens": args.new_tokens,
        "turns": args.turns,
        "audio_samples": args.audio_samples,
        "audio_prompt_samples": args.audio_prompt_samples,
    }
    sweeps = {s: args.users or SCENARIOS[s]["quick_users" if args.quick else "users"] for s in args.scenarios}
    from importlib.metadata import version  # importing locust would monkey-patch this process (gevent)

    data: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "command": "python -m loadtest " + " ".join(argv if argv is not None else sys.argv[1:]),
        "locust_version": version("locust"),
        "seconds": seconds,
        "options": opts,
        "scenarios": {},
    }
    proc = None
    api_key = os.environ.get("S4_API_KEY", "")  # a keyed --host's; never a flag: the command is recorded
    with tempfile.TemporaryDirectory() as tmp:
        # levels write here; the old csv/ is replaced once the sweep is done, with its report: a sweep that
        # stops midway (a level's locust failed, Ctrl-C) leaves the old report, its JSON and CSVs, whole
        csv_dir = Path(tmp) / "csv"
        csv_dir.mkdir()
        if args.host:
            url, data["models"] = (
                args.host.rstrip("/"),
                {"text": "as served by --host", "audio": "as served by --host"},
            )
        else:
            ckpts, data["models"] = checkpoints(args.quick, Path(tmp))
            print(f"starting the server: {data['models']}", flush=True)
            proc, url = start_server(ckpts, max(max(v) for v in sweeps.values()), args.server_arg)
        try:
            try:
                models = served_models(url, api_key)
            except Exception as e:  # noqa: BLE001  (connection refused, timeout, not an s4 server)
                where = f"--host {url}" if args.host else f"the server started at {url}"
                why = " ".join(f"{type(e).__name__}: {e}".split())
                sys.exit(f"loadtest: error: cannot read {url}/v1/models ({where}): {why}")
            data["served"] = models
            for name, users in sweeps.items():
                classes = SCENARIOS[name]["classes"]
                if "audio-digits-s4" not in models:
                    classes = [c for c in classes if c != "WsAudioUser"]
                if not classes:
                    print(f"{name}: no audio model served, skipped", flush=True)
                    continue
                levels = data["scenarios"][name] = []
                for u in users:
                    try:
                        lv = run_level(url, classes, u, seconds, csv_dir / f"{name}-{u}", opts, api_key)
                    except LevelError as e:
                        sys.exit(f"loadtest: error: {name}: {e}")
                    levels.append(lv)
                    kinds = ", ".join(
                        f"{k} {_f(d['tokens_per_s'])} tok/s ttft p99 {_f(d.get('ttft_p99_ms'))} ms "
                        f"itl p99 {_f(d.get('itl_p99_ms'))} ms err {100 * d['error_rate']:.2g}%"
                        for k, d in lv["by_kind"].items()
                    )
                    rtf = f"; audio RTF total {_f(lv['audio']['rtf_total'])}" if lv.get("audio") else ""
                    print(
                        f"{name} {u:4d} users (load {lv['load_avg_1min_before']:.2f}): {kinds}{rtf}",
                        flush=True,
                    )
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
        shutil.rmtree(out / "csv", ignore_errors=True)
        shutil.move(csv_dir, out / "csv")
    data["machine"] = machine()
    data["goals"] = GOALS
    data["goals_measured"] = goals(data)
    (out / "loadtest.json").write_text(json.dumps(data, indent=1) + "\n")
    plot(data, out)
    print(report(data, out))
    print(f"wrote {out}/report.md, loadtest.json, PNGs and csv/")


if __name__ == "__main__":
    main()
