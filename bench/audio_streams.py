"""Concurrent audio streams over WebSockets, as a player sees them: N = 1 … 32 streams against a server
on loopback (a child process), each generating `seconds` of audio from the model's silence in mu-law
frames of `frame_ms` (the binary frames of WS /v1/stream), the client in this process.

Per stream, from the arrival time a_k (client clock) of each binary frame k and its samples n_k:
  * real-time factor: seconds of audio after the first frame per second after it,
    (Σ_{k≥1} n_k / rate) / (a_last − a_0), so a start-up delay does not count (it is `first_frame_ms`);
    the stream is "at real time" when it is ≥ 1;
  * jitter: how far each inter-arrival time is from the ideal, |(a_k − a_{k−1}) − n_{k−1}/rate| (the
    frame period T = frame_ms for equal frames; RFC 3550's D, unsmoothed), p50 and p99, and its late
    part max(0, (a_k − a_{k−1}) − n_{k−1}/rate), the part a player feels;
  * playout buffer: the smallest delay after the first frame at which playback never runs dry,
    max_k (a_k − a_0 − Σ_{j<k} n_j / rate) (it grows with the stream when the stream is slower
    than real time).
Per N: total samples/s (all samples ÷ the wall time from the first request to the last frame), the share
of streams at ≥ real time, jitter p50/p99 over all frames of all streams, the largest playout buffer,
and the server process's CPU time per sample (/proc: robust to other load where wall time is not).
First, in this process: the delivery path's cost per sample, token by token (as before frames by time)
against one list per hand-over and the framer (`delivery_cost`).
Jitter in ms grows with the frame size when streams are slower than real time (each interval is then
about T / RTF): compare runs at the same frame_ms; the playout buffer compares across framings.

The checkpoint is a parameter (default checkpoints/audio-digits-s4, the isotropic model: H = 128,
4 layers, 8 kHz; checkpoints/audio-digits is SaShiMi). On a shared 2-core machine the clients share
the CPU with the server: read the figures as a lower bound. Another checkpoint's results are written
beside the default's, as results/audio_streams-DIRNAME.json and .png.

    python -m bench.audio_streams [--quick] [--checkpoint DIR] [--streams 1 2 4 ...] [--seconds S]
                                  [--frame-ms MS] [--spread-ms MS] [--replot]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import (  # noqa: E402
    ROOT,
    cpu_seconds,
    fmt,
    log2_axis,
    nearest_rank,
    ranged,
    read_results,
    results_dir,
    save_figure,
    subplots,
    write_results,
)
from server import launch  # noqa: E402
from server.schemas import MAX_FRAME_MS, MIN_FRAME_MS  # noqa: E402

NAME = "audio_streams"
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "audio-digits-s4"
SIZES: dict[bool, dict[str, Any]] = {
    False: {"streams": [1, 2, 4, 8, 16, 32], "seconds": 4.0, "frame_ms": 20},
    True: {"streams": [1, 4, 16, 32], "seconds": 0.5, "frame_ms": 20},
}
WARMUP_S = 0.1  # seconds of audio each stream generates once before the timed run at each N


def _pct(xs: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of xs; NaN when empty."""
    return nearest_rank(xs, q)


def stream_stats(
    t_request: float, arrivals: Sequence[float], sizes: Sequence[int], rate: int
) -> dict[str, Any]:
    """One stream's figures (module docstring) from its frames' arrival times (s) and sample counts."""
    n = len(arrivals)
    out: dict[str, Any] = {
        "frames": n,
        "samples": int(sum(sizes)),
        "first_frame_ms": 1e3 * (arrivals[0] - t_request) if n else float("nan"),
        "frame_samples_max": max(sizes) if n else 0,
    }
    if n < 2:
        return out | {"realtime_factor": float("nan"), "deviation_ms": [], "buffer_ms": float("nan")}
    span = arrivals[-1] - arrivals[0]
    out["realtime_factor"] = (sum(sizes[1:]) / rate) / span if span > 0 else float("inf")
    dev = [1e3 * ((arrivals[k] - arrivals[k - 1]) - sizes[k - 1] / rate) for k in range(1, n)]
    media_t, buffer = 0.0, 0.0
    for k in range(n):
        buffer = max(buffer, arrivals[k] - arrivals[0] - media_t)
        media_t += sizes[k] / rate
    out |= {
        "deviation_ms": dev,
        "jitter_p50_ms": _pct([abs(d) for d in dev], 0.5),
        "jitter_p99_ms": _pct([abs(d) for d in dev], 0.99),
        "late_p99_ms": _pct([max(0.0, d) for d in dev], 0.99),
        "buffer_ms": 1e3 * buffer,
    }
    return out


async def run_streams(
    ws_url: str, model: str, n: int, samples: int, frame_ms: int | None, spread_s: float = 0.0,
    warm_up: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """n concurrent streams of `samples` samples each, started together once all are bound; with
    `spread_s`, stream k sends its request that long times a number of its own in [0, 1) later (seeded
    by k: the same offsets every run), as streams that arrive at any time do (a SaShiMi's rows then come
    at any pooling phase). RuntimeError when a stream got fewer than two frames (no real-time factor),
    unless this is a `warm_up` (its figures are not used: 0.1 s may be one frame)."""
    from websockets.asyncio.client import connect

    go = asyncio.Event()
    ready = 0
    rate = 0

    async def one(k: int) -> dict[str, Any]:
        nonlocal ready, rate
        async with connect(ws_url, max_queue=None) as ws:
            await ws.send(json.dumps({"type": "session", "model": model, "audio_encoding": "mulaw"}))
            bound = json.loads(await ws.recv())
            if bound.get("type") != "session":
                raise RuntimeError(f"stream {k}: {bound}")
            rate = bound["sample_rate"]
            ready += 1
            await go.wait()
            if spread_s:
                await asyncio.sleep(spread_s * random.Random(k).random())
            req = {"type": "generate", "max_new_tokens": samples, "seed": k}
            if frame_ms is not None:
                req["frame_ms"] = frame_ms
            t0 = time.perf_counter()
            await ws.send(json.dumps(req))
            arrivals: list[float] = []
            sizes: list[int] = []
            header: dict = {}
            while True:
                m = await ws.recv()
                if isinstance(m, bytes):
                    arrivals.append(time.perf_counter())
                    sizes.append(len(m))  # mu-law: one byte a sample
                    continue
                f = json.loads(m)
                if f["type"] == "audio_header":
                    header = f
                elif f["type"] in ("done", "error"):
                    if f["type"] == "error":
                        raise RuntimeError(f"stream {k}: {f}")
                    return {"t_request": t0, "arrivals": arrivals, "sizes": sizes, "header": header}

    tasks = [asyncio.create_task(one(k)) for k in range(n)]
    while ready < n:
        await asyncio.sleep(0.005)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    go.set()
    raw = await asyncio.gather(*tasks)
    short = [k for k, r in enumerate(raw) if len(r["arrivals"]) < 2]  # (no RTF, no jitter: NaN figures)
    if short and not warm_up:
        k = short[0]
        raise RuntimeError(
            f"{len(short)} of {n} streams got at most one frame (stream {k}: {len(raw[k]['arrivals'])}, of "
            f"{raw[k]['header'].get('frame_samples')} samples; {samples} a stream): a real-time factor needs "
            "two frames, ask for more audio"
        )
    # from the first request (with `spread_s`, a stream's delay after the start is no streaming time)
    wall = max(r["arrivals"][-1] for r in raw if r["arrivals"]) - min(r["t_request"] for r in raw)
    streams = [stream_stats(r["t_request"], r["arrivals"], r["sizes"], rate) for r in raw]
    devs = [d for s in streams for d in s.pop("deviation_ms")]
    rtfs = [s["realtime_factor"] for s in streams]
    total = sum(s["samples"] for s in streams)
    return {
        "streams": n,
        "sample_rate": rate,
        "frame_samples": raw[0]["header"].get("frame_samples"),
        "samples_per_stream": samples,
        "wall_s": wall,
        "samples_per_s": total / wall,
        "realtime_share": sum(r >= 1 for r in rtfs) / n,
        "realtime_factor_min": min(rtfs),
        "realtime_factor_median": statistics.median(rtfs),
        "jitter_p50_ms": _pct([abs(d) for d in devs], 0.5),
        "jitter_p99_ms": _pct([abs(d) for d in devs], 0.99),
        "late_p99_ms": _pct([max(0.0, d) for d in devs], 0.99),
        "buffer_ms_max": max(s["buffer_ms"] for s in streams),
        "first_frame_ms_p99": _pct([s["first_frame_ms"] for s in streams], 0.99),
        "per_stream": streams,
    }


def delivery_cost(block: int, samples: int = 100_000, repeat: int = 3) -> dict[str, float]:
    """µs per sample of the server's delivery path alone (engine hand-over → asyncio queue → pcm16 frame
    bytes), one stream, the engine handing over `block` ids at a time, best of `repeat`:
      * per_token: what the server did before frames by time: a queue item per token, the filtering
        passes over the items (`isinstance`), `to_pcm16(MuLaw.decode(ids))` per hand-over;
      * per_block: one list per hand-over, and media.AudioFramer (20 ms at 8 kHz) with its lookup table."""
    import random

    from model.codecs import MuLaw, to_pcm16
    from server import media

    codec, rnd = MuLaw(), random.Random(0)
    blocks = [[rnd.randrange(256) for _ in range(block)] for _ in range(samples // block)]

    async def per_token() -> None:
        q: asyncio.Queue = asyncio.Queue()
        for blk in blocks:
            for t in blk:
                q.put_nowait(t)
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            sum(1 for x in items if isinstance(x, int))
            to_pcm16(codec.decode([x for x in items if isinstance(x, int)]))

    async def per_block() -> None:
        q: asyncio.Queue = asyncio.Queue()
        framer = media.AudioFramer(160, "pcm16", codec)
        for blk in blocks:
            q.put_nowait(list(blk))
            items = await q.get()
            while not q.empty():
                items += q.get_nowait()
            for frame in framer.feed(items):
                framer.encode(frame)

    out = {}
    for name, fn in (("per_token", per_token), ("per_block", per_block)):
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            asyncio.run(fn())
            best = min(best, time.perf_counter() - t0)
        out[name] = 1e6 * best / (len(blocks) * block)
    return out


def audio_model(url: str) -> tuple[str, int]:
    """The id and sample rate of the (first) audio model the server serves. RuntimeError where the server
    does not list its models (503 while it loads them or drains: its message is quoted)."""
    import httpx

    r = httpx.get(url + "/v1/models", timeout=30)
    if r.status_code != 200:
        why = r.text[:200]
        raise RuntimeError(f"the server at {url} answered GET /v1/models with {r.status_code}: {why}")
    models = r.json()["data"]
    audio = [(m["id"], m["sample_rate"]) for m in models if m.get("kind") == "audio"]
    if not audio:  # (each model serves once loaded: one may still be on its way)
        ready = httpx.get(url + "/readyz", timeout=30)
        if ready.status_code == 503 and (loading := ready.json().get("loading")):
            still = ", ".join(loading)
            raise RuntimeError(f"the server at {url} serves no audio model yet: still loading {still}")
        raise RuntimeError(f"the server at {url} serves no audio model")
    return audio[0]


def run(
    quick: bool,
    checkpoint: Path,
    streams: Sequence[int],
    seconds: float,
    frame_ms: int | None,
    spread_ms: float = 0.0,
) -> dict:
    delivery = {str(b): delivery_cost(b) for b in (8, 25, 64)}
    for b, d in delivery.items():
        ratio = d["per_token"] / d["per_block"]
        print(f"delivery path, blocks of {b:>2}: {d['per_token']:.2f} µs/sample token by token, "
              f"{d['per_block']:.2f} by blocks and frames ({ratio:.1f}x)")  # fmt: skip
    n_max = max(streams)
    proc, url = launch.start_server(["--checkpoints", str(checkpoint), "--max-sessions", str(n_max + 4),
                                     "--max-batch-size", str(n_max),
                                     "--max-queued-requests", str(n_max + 8)], timeout_s=600)  # fmt: skip
    rows = []
    try:
        model, rate = audio_model(url)
        ws_url = url.replace("http", "ws") + "/v1/stream"
        for n in streams:
            asyncio.run(run_streams(ws_url, model, n, round(WARMUP_S * rate), frame_ms, warm_up=True))
            cpu0 = cpu_seconds(proc.pid)
            row = asyncio.run(run_streams(ws_url, model, n, round(seconds * rate), frame_ms, spread_ms / 1e3))
            row["server_cpu_us_per_sample"] = (
                1e6 * (cpu_seconds(proc.pid) - cpu0) / (n * round(seconds * rate))
            )
            rows.append(row)
            print(
                f"{n:3d} streams: {row['samples_per_s']:9.0f} samples/s, "
                f"{100 * row['realtime_share']:3.0f} % at >= real time "
                f"(RTF min {row['realtime_factor_min']:.2f}, median {row['realtime_factor_median']:.2f}), "
                f"jitter p50 {row['jitter_p50_ms']:.1f} p99 {row['jitter_p99_ms']:.1f} ms, "
                f"late p99 {row['late_p99_ms']:.1f} ms, buffer max {row['buffer_ms_max']:.0f} ms, "
                f"server CPU {row['server_cpu_us_per_sample']:.0f} µs/sample",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(30)
    realtime = [r["streams"] for r in rows if r["realtime_share"] == 1]
    return {
        "model": model,
        "checkpoint": str(checkpoint),
        "sizes": {
            "streams": list(streams),
            "seconds": seconds,
            "frame_ms": frame_ms,
            "quick": quick,
            "spread_ms": spread_ms,
        },  # fmt: skip
        "results": rows,
        "delivery_us_per_sample": delivery,
        "goals": {"streams_at_real_time": 16},
        "measured_vs_goals": {"streams_at_real_time": max(realtime, default=0)},
    }


def table(data: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(r["streams"]),
            fmt(r["samples_per_s"]),
            f"{100 * r['realtime_share']:.0f} %",
            f"{r['realtime_factor_min']:.2f} / {r['realtime_factor_median']:.2f}",
            f"{fmt(r['jitter_p50_ms'])} / {fmt(r['jitter_p99_ms'])}",
            fmt(r["late_p99_ms"]),
            fmt(r["buffer_ms_max"]),
            fmt(r["first_frame_ms_p99"]),
            fmt(r.get("server_cpu_us_per_sample")),
        ]
        for r in data["results"]
    ]


HEADER = ["streams", "samples/s", "≥ real time", "RTF min / median", "jitter p50 / p99 ms", "late p99 ms",
          "buffer max ms", "first frame p99 ms", "server CPU µs/sample"]  # fmt: skip


def plot(data: dict[str, Any], quick: bool, name: str = NAME) -> None:
    rows = data["results"]
    ns = [r["streams"] for r in rows]
    fig, (ax, ax2) = subplots(2)
    rate = rows[0]["sample_rate"]
    ax.plot(ns, [r["samples_per_s"] for r in rows], "o-", label="samples/s, all streams")
    ax.plot(ns, [n * rate for n in ns], ":", color="grey", label=f"N × real time ({rate} Hz)")
    ax3 = ax.twinx()
    ax3.plot(ns, [100 * r["realtime_share"] for r in rows], "s--", color="C1", label="% streams ≥ real time")
    ax3.set(ylabel="% of streams at ≥ real time", ylim=(-5, 105))
    log2_axis(ax, ns)
    ax.set(xlabel="concurrent streams", ylabel="samples/s", title="Throughput")
    ax.legend(loc="upper left")
    ax3.legend(loc="lower right")
    ax2.plot(ns, [r["jitter_p50_ms"] for r in rows], "o--", label="jitter p50")
    ax2.plot(ns, [r["jitter_p99_ms"] for r in rows], "o-", label="jitter p99")
    ax2.plot(ns, [r["late_p99_ms"] for r in rows], "^-", label="late p99")
    ax2.axhline(data["sizes"]["frame_ms"] or 0, color="grey", lw=0.8, ls=":", label="frame period")
    log2_axis(ax2, ns)
    ax2.set(xlabel="concurrent streams", ylabel="ms", title="Inter-frame arrival vs the frame period")
    ax2.legend()
    save_figure(fig, name, quick, title=f"Audio streams over WebSockets: {data['model']}")


MAX_STREAMS = 1024  # (the server started here gets a session slot for each; far past real time on a CPU)


def frame_ms_arg(text: str) -> int:
    """--frame-ms: 0 (not sent) or MIN_FRAME_MS..MAX_FRAME_MS, the range the server takes (else 422)."""
    try:
        x = int(text)
    except ValueError:
        x = None
    if x is None or (x != 0 and not MIN_FRAME_MS <= x <= MAX_FRAME_MS):
        raise argparse.ArgumentTypeError(
            f"must be 0 (not sent) or {MIN_FRAME_MS}..{MAX_FRAME_MS}, got {text!r}"
        )
    return x


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench.{NAME}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short streams (smoke test), to results/quick/")
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the existing JSON only")
    parser.add_argument(
        "--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="an audio checkpoint folder"
    )
    parser.add_argument("--streams", type=ranged(int, 1, MAX_STREAMS), nargs="+",
                        help=f"concurrent stream counts, 1..{MAX_STREAMS} (default by mode)")  # fmt: skip
    parser.add_argument("--seconds", type=ranged(float, 0, lo_open=True),
                        help="seconds of audio per stream, > 0 and at most the server's S4_MAX_AUDIO_S "
                        "(30 by default) (default by mode)")  # fmt: skip
    parser.add_argument(
        "--frame-ms", type=frame_ms_arg,
        help=f"frame_ms of each request, {MIN_FRAME_MS}..{MAX_FRAME_MS} as the server takes (default 20; 0: "
        "do not send it)",
    )  # fmt: skip
    parser.add_argument(
        "--spread-ms", type=ranged(float, 0), default=0.0,
        help="each stream starts a seeded random delay in [0, this) after all are bound (streams that "
        "arrive at any time; default 0: together)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.seconds is not None and not args.replot:
        from server.config import Settings

        limit = Settings().max_audio_s  # (the servers started here read the same environment)
        if args.seconds > limit:
            parser.error(f"argument --seconds: the server takes at most {limit:g} s (S4_MAX_AUDIO_S)")
    # another checkpoint's figures go beside the default one's, not over them
    name = (
        NAME
        if args.checkpoint.resolve() == DEFAULT_CHECKPOINT.resolve()
        else f"{NAME}-{args.checkpoint.name}"
    )
    if args.replot:
        data = read_results(name, args.quick)
        if data is None:
            parser.error(f"no {results_dir(args.quick) / name}.json to replot")
    else:
        sz = SIZES[args.quick]
        frame_ms = sz["frame_ms"] if args.frame_ms is None else (args.frame_ms or None)
        streams = args.streams or sz["streams"]
        seconds = sz["seconds"] if args.seconds is None else args.seconds
        result = run(args.quick, args.checkpoint, streams, seconds, frame_ms, args.spread_ms)
        data = write_results(name, result, args.quick)
    plot(data, args.quick, name)
    print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
    for r in table(data):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
