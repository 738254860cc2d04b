"""Serving throughput: tokens/s vs concurrent sessions for (1) the raw batched `RecurrentModel.step`,
(2) the engine alone (scheduler, prefill, sampling, streams; no HTTP), (3) end to end over WebSockets
through uvicorn (server in a child process, clients in this one), with client-side time to first token,
both for a burst (all sessions start together) and in a steady closed loop (`websocket_steady`).

Every session sends a 32-token prompt and generates `tokens` tokens; all sessions start together (a
burst), so time to first token includes prefilling every prompt. The model is the shipped text
checkpoint when it exists, else a stand-in of the same shape as bench.step's (named in the JSON).
On a 2-core machine the WebSocket clients share the CPU with the server: read end-to-end numbers as
a lower bound. One run of each swings by ±15 % on a shared machine, so the goal's figure (end to end ÷
engine at 64 sessions) is the ratio of the medians of `goal_repeats` alternated runs of the engine and
the steady WebSocket loop.

    python -m bench.server [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    ROOT,
    bench_main,
    log2_axis,
    nearest_rank,
    save_figure,
    subplots,
    wait_for_clients,
)
from bench.step import SIZES as STEP_SIZES  # noqa: E402
from model import ModelConfig, SequenceModel, load, save  # noqa: E402
from server import launch  # noqa: E402

NAME = "server"
GOAL_SESSIONS = 64  # issue 18's figures: end to end ÷ engine and TTFT p99 at this many sessions
SHIPPED = ROOT / "checkpoints" / "text-shakespeare"
SIZES: dict[bool, dict[str, Any]] = {
    False: {
        "model": STEP_SIZES[False]["model"],
        "sessions": [1, 4, 16, 64, 256],
        "tokens": 128,
        "prompt": 32,
        "step_repeat": 30,
        "steady_s": 8.0,
        "goal_repeats": 5,
    },
    True: {
        "model": STEP_SIZES[True]["model"],
        "sessions": [1, 4, 16, 64],
        "tokens": 32,
        "prompt": 32,
        "step_repeat": 10,
        "steady_s": 2.0,
        "goal_repeats": 2,
    },
}


def checkpoint(quick: bool, tmp: Path) -> tuple[Path, str]:
    if SHIPPED.exists() and not quick:
        return SHIPPED, "shipped checkpoint text-shakespeare"
    torch.manual_seed(0)
    cfg = SIZES[quick]["model"]
    save(SequenceModel(ModelConfig(cauchy_backend="torch", **cfg)), tmp / "standin")
    return tmp / "standin", f"stand-in, random init: {cfg}"


def raw_step_rate(rec, batch: int, repeat: int) -> float:
    """Tokens/s of the bare batched step, in place (what the engine can at best achieve)."""
    state = rec.init_state(batch)
    tok = torch.zeros(batch, dtype=torch.long, device=rec.device)
    for _ in range(3):
        rec.step(tok, state, out=state)
    t0 = time.perf_counter()
    for _ in range(repeat):
        rec.step(tok, state, out=state)
    return batch * repeat / (time.perf_counter() - t0)


def engine_rate(rec, n: int, sz: dict, logprobs_rows: int = 0) -> dict[str, float]:
    """The engine with n sessions in a burst, consumed by a local event loop; the first `logprobs_rows`
    of them ask for the log-probabilities of each token and the 5 most likely (OpenAI's logprobs=5)."""
    from model.sampling import SamplingParams
    from server.config import Settings
    from server.engine import Engine, Job, Stream
    from server.metrics import Metrics
    from server.sessions import SessionTable

    # (no prefix cache: its warm-up and its runs send the same prompts)
    settings = Settings(max_sessions=n, max_batch_size=max(n, 1), max_queued_requests=n + 1,
                        stream_buffer=256, prefix_cache_mb=0)  # fmt: skip
    engine = Engine("bench", rec, settings, SessionTable(), Metrics().for_model("bench"))
    engine.start()

    async def run() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        firsts: list[float] = []

        async def one(k: int):
            stream = Stream(loop, settings.stream_buffer)
            rec_ = engine.new_session(f"s{k}", ephemeral=True)
            prompt = [(k * 7 + i) % 256 for i in range(sz["prompt"])]
            params = SamplingParams(seed=k, logprobs=5 if k < logprobs_rows else None)
            engine.submit(Job(rec_, prompt, fresh=True, stream=stream, params=params,
                              max_new_tokens=sz["tokens"]))  # fmt: skip
            first, made = True, 0
            while True:
                items = await stream.get()
                if first:
                    firsts.append(time.perf_counter() - t0)
                    first = False
                made += sum(isinstance(x, int) for x in items)
                if not isinstance(items[-1], int):
                    if made != sz["tokens"]:  # (a failed job's stream ends early: no rate from it)
                        raise RuntimeError(f"session {k} made {made} of {sz['tokens']} tokens: {items[-1]}")
                    return

        await asyncio.gather(*(one(k) for k in range(n)))
        return time.perf_counter() - t0, firsts

    try:
        asyncio.run(run())  # warm-up
        wall, firsts = asyncio.run(run())
    finally:  # (a failed run's engine thread was left running)
        engine.stop()
    return {"tokens_per_s": n * sz["tokens"] / wall, "wall_s": wall, **_pcts("ttft", firsts)}


def _pcts(name: str, xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if not xs:  # e.g. no request started inside a steady window shorter than one request
        return {f"{name}_p50_ms": float("nan"), f"{name}_p99_ms": float("nan")}
    return {
        f"{name}_p50_ms": 1e3 * statistics.median(xs),
        f"{name}_p99_ms": 1e3 * nearest_rank(xs, 0.99),
    }


def start_server(ckpt: Path, max_sessions: int) -> tuple[subprocess.Popen, str]:
    # (no prefix cache: every prompt is ingested, as before it existed, though runs repeat prompts)
    return launch.start_server(["--checkpoints", str(ckpt), "--max-sessions", str(max_sessions),
                                "--max-batch-size", str(max_sessions),
                                "--max-queued-requests", str(max_sessions + 8)], timeout_s=300,
                               env={"S4_PREFIX_CACHE_MB": "0"})  # fmt: skip


def error_text(frame: dict) -> str:
    """An error frame in one line: its status code and message (or the whole frame)."""
    code, msg = frame.get("code"), frame.get("message") or frame.get("detail")
    text = f"{code} {msg}" if code is not None and msg is not None else json.dumps(frame)
    return " ".join(str(text).split())


def check_errors(result: dict, what: str) -> dict:
    """`result` of websocket_rate / websocket_steady, or SystemExit naming the first error frame: a run
    whose requests were refused measures nothing (it printed 0 tok/s and exited 0)."""
    if result.get("errors"):
        raise SystemExit(
            f"{what}: {result['errors']} error frames from the server; first: {result['first_error']}"
        )
    return result


def websocket_rate(url: str, model: str, n: int, sz: dict) -> dict[str, float]:
    from websockets.asyncio.client import connect

    ws_url = url.replace("http", "ws") + "/v1/stream"

    async def run() -> dict[str, float]:
        go = asyncio.Event()
        ready = 0
        ttfts: list[float] = []
        counts: list[int] = []
        errors: list[str] = []

        async def one(k: int):
            nonlocal ready
            async with connect(ws_url, max_queue=None) as ws:
                await ws.send(json.dumps({"type": "session", "model": model}))
                await ws.recv()
                ready += 1
                await go.wait()
                prompt = "".join(chr(97 + (k * 7 + i) % 26) for i in range(sz["prompt"]))
                t0 = time.perf_counter()
                req = {"type": "generate", "prompt": prompt, "max_new_tokens": sz["tokens"], "seed": k}
                await ws.send(json.dumps(req))
                got = 0
                while True:
                    m = json.loads(await ws.recv())
                    if m["type"] == "token" and m["ids"]:
                        if got == 0:
                            ttfts.append(time.perf_counter() - t0)
                        got += len(m["ids"])
                    elif m["type"] in ("done", "error"):
                        if m["type"] == "error":
                            errors.append(error_text(m))
                        counts.append(got)
                        return

        tasks = [asyncio.create_task(one(k)) for k in range(n)]
        await wait_for_clients(lambda: ready >= n, tasks)  # (a client that failed to bind ends the burst)
        t0 = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        return {
            "tokens_per_s": sum(counts) / wall,
            "wall_s": wall,
            "tokens": sum(counts),
            "errors": len(errors),
            "first_error": errors[0] if errors else None,
            **_pcts("ttft", ttfts),
        }

    asyncio.run(run())  # warm-up
    return asyncio.run(run())


def websocket_steady(url: str, model: str, n: int, sz: dict, seconds: float) -> dict[str, float]:
    """n clients in a closed loop (each sends its next request as soon as the previous one is done),
    for `seconds` after a warm-up of the same length: the steady state a load test sees, where new
    requests arrive while the other n − 1 sessions are decoding. TTFT counts requests started in the
    measured window; tokens/s counts tokens received in it."""
    from websockets.asyncio.client import connect

    ws_url = url.replace("http", "ws") + "/v1/stream"

    async def run() -> dict[str, float]:
        ttfts: list[float] = []
        errors: list[str] = []
        tokens = 0
        t_begin = time.perf_counter()
        window = [t_begin + seconds, t_begin + 2 * seconds]  # [start, end) of the measured window

        async def one(k: int):
            nonlocal tokens
            async with connect(ws_url, max_queue=None) as ws:
                await ws.send(json.dumps({"type": "session", "model": model}))
                await ws.recv()
                turn = 0
                while time.perf_counter() < window[1]:
                    prompt = "".join(chr(97 + (k * 7 + turn + i) % 26) for i in range(sz["prompt"]))
                    req = {"type": "generate", "prompt": prompt, "max_new_tokens": sz["tokens"], "seed": k}
                    t0 = time.perf_counter()
                    await ws.send(json.dumps(req))
                    first = True
                    while True:
                        m = json.loads(await ws.recv())
                        now = time.perf_counter()
                        if m["type"] == "token" and m["ids"]:
                            if first and window[0] <= t0 < window[1]:
                                ttfts.append(now - t0)
                            first = False
                            if window[0] <= now < window[1]:
                                tokens += len(m["ids"])
                        elif m["type"] in ("done", "error"):
                            if m["type"] == "error":
                                errors.append(error_text(m))
                            break
                    turn += 1

        await asyncio.gather(*(one(k) for k in range(n)))
        return {"tokens_per_s": tokens / seconds, "requests_timed": len(ttfts), "errors": len(errors),
                "first_error": errors[0] if errors else None, **_pcts("ttft", ttfts)}  # fmt: skip

    return asyncio.run(run())


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, what = checkpoint(quick, Path(tmp))
        net = load(ckpt)
        rec = net.to_recurrent()
        rows = []
        for n in sz["sessions"]:
            row = {"sessions": n, "raw_step_tokens_per_s": raw_step_rate(rec, n, sz["step_repeat"])}
            row["engine"] = engine_rate(rec, n, sz)
            rows.append(row)
            e = row["engine"]
            print(f"{n:4d} sessions: raw {row['raw_step_tokens_per_s']:9.0f}  engine {e['tokens_per_s']:9.0f}"
                  f" tok/s  ttft p99 {e['ttft_p99_ms']:.1f} ms", flush=True)  # fmt: skip
        proc, url = start_server(ckpt, max(sz["sessions"]))

        def burst(n: int) -> dict:  # (a run with any error frame stops the benchmark: check_errors)
            return check_errors(websocket_rate(url, ckpt.name, n, sz), "bench.server: websocket")

        def steady(n: int) -> dict:
            return check_errors(websocket_steady(url, ckpt.name, n, sz, sz["steady_s"]),
                                "bench.server: websocket steady")  # fmt: skip

        try:
            for row in rows:
                w = row["websocket"] = burst(row["sessions"])
                w["fraction_of_engine"] = w["tokens_per_s"] / row["engine"]["tokens_per_s"]
                print(f"{row['sessions']:4d} sessions: websocket {w['tokens_per_s']:9.0f} tok/s "
                      f"({w['fraction_of_engine']:.2f} of engine), ttft p50 {w['ttft_p50_ms']:.1f} "
                      f"p99 {w['ttft_p99_ms']:.1f} ms", flush=True)  # fmt: skip
                st = row["websocket_steady"] = steady(row["sessions"])
                st["fraction_of_engine"] = st["tokens_per_s"] / row["engine"]["tokens_per_s"]
                print(f"{row['sessions']:4d} sessions, steady: websocket {st['tokens_per_s']:9.0f} tok/s "
                      f"({st['fraction_of_engine']:.2f} of engine), ttft p50 {st['ttft_p50_ms']:.1f} "
                      f"p99 {st['ttft_p99_ms']:.1f} ms, {st['requests_timed']} reqs", flush=True)  # fmt: skip
            repeats = []  # the goal's figure: engine and steady WebSocket alternated (one run swings ±15 %)
            if GOAL_SESSIONS in sz["sessions"]:
                runs = {
                    "engine": lambda: engine_rate(rec, GOAL_SESSIONS, sz),
                    "burst": lambda: burst(GOAL_SESSIONS),
                    "steady": lambda: steady(GOAL_SESSIONS),
                }
                for i in range(sz["goal_repeats"]):  # odd repeats in the reverse order (no position bias)
                    got = {name: runs[name]() for name in (runs if i % 2 == 0 else reversed(runs))}
                    e, bu, st = got["engine"], got["burst"], got["steady"]
                    repeats.append({"engine_tokens_per_s": e["tokens_per_s"],
                                    "websocket_burst_tokens_per_s": bu["tokens_per_s"],
                                    "websocket_steady_tokens_per_s": st["tokens_per_s"],
                                    "websocket_steady_ttft_p50_ms": st["ttft_p50_ms"],
                                    "websocket_steady_ttft_p99_ms": st["ttft_p99_ms"]})  # fmt: skip
                    et, bt, wt = e["tokens_per_s"], bu["tokens_per_s"], st["tokens_per_s"]
                    print(f"{GOAL_SESSIONS} sessions, repeat: engine {et:9.0f}, websocket burst {bt:9.0f} "
                          f"({bt / et:.2f}), steady {wt:9.0f} tok/s ({wt / et:.2f})", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)
    goals = {"websocket_over_engine_at_64": 0.9, "ttft_p99_ms_at_64": 50.0}  # issue 18
    at64 = next((r for r in rows if r["sessions"] == GOAL_SESSIONS), None)
    measured = None
    if at64 and repeats:
        eng = statistics.median(r["engine_tokens_per_s"] for r in repeats)
        ws = statistics.median(r["websocket_steady_tokens_per_s"] for r in repeats)
        wb = statistics.median(r["websocket_burst_tokens_per_s"] for r in repeats)
        pairs = [r["websocket_steady_tokens_per_s"] / r["engine_tokens_per_s"] for r in repeats]
        measured = {
            # medians of the alternated repeats: steady WebSocket ÷ engine
            "websocket_over_engine_at_64": ws / eng,
            "ttft_p99_ms_at_64": statistics.median(r["websocket_steady_ttft_p99_ms"] for r in repeats),
            "pair_ratios_steady": pairs,  # each repeat's steady WebSocket ÷ its engine run
            "pair_ratio_steady_median_min_max": [statistics.median(pairs), min(pairs), max(pairs)],
            "engine_tokens_per_s_median": eng,
            "websocket_steady_tokens_per_s_median": ws,
            "repeats": repeats,
            "single_run": {
                "websocket_over_engine_at_64": at64["websocket_steady"]["fraction_of_engine"],
                "ttft_p99_ms_at_64": at64["websocket_steady"]["ttft_p99_ms"],
            },
            "burst": {  # medians of the repeats' bursts (one 0.4 s burst each)
                "websocket_over_engine_at_64": wb / eng,
                "websocket_burst_tokens_per_s_median": wb,
                "single_run": at64["websocket"]["fraction_of_engine"],
            },
        }
        print(f"{GOAL_SESSIONS} sessions, medians of {len(repeats)} alternated repeats: engine {eng:.0f}, "
              f"websocket burst {wb:.0f} ({wb / eng:.2f} of engine), steady {ws:.0f} tok/s "
              f"({ws / eng:.2f})", flush=True)  # fmt: skip
    return {
        "model": what,
        "model_config": net.config.to_dict(),
        "layer_forms": [r["form"] for r in rec.report],
        "sizes": sz,
        "results": rows,
        "goals": goals,
        "measured_vs_goals": measured,
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    rows = data["results"]
    ns = [r["sessions"] for r in rows]
    fig, (ax, ax2) = subplots(2)
    ax.plot(ns, [r["raw_step_tokens_per_s"] for r in rows], "o-", label="raw batched step")
    ax.plot(ns, [r["engine"]["tokens_per_s"] for r in rows], "s-", label="engine (no HTTP)")
    ax.plot(ns, [r["websocket"]["tokens_per_s"] for r in rows], "^-", label="WebSocket end to end")
    ax.plot(ns, [r["websocket_steady"]["tokens_per_s"] for r in rows], "v-", label="WebSocket, steady loop")
    log2_axis(ax, ns)
    ax.set(xlabel="concurrent sessions", ylabel="tokens/s", title="Throughput")
    ax.legend()  # (after the last line: the steady loop's was drawn after it, with no entry)
    for key, mark in (("engine", "s"), ("websocket", "^"), ("websocket_steady", "v")):
        ax2.plot(ns, [r[key]["ttft_p50_ms"] for r in rows], mark + "--", label=f"{key} p50")
        ax2.plot(ns, [r[key]["ttft_p99_ms"] for r in rows], mark + "-", label=f"{key} p99")
    ax2.axhline(data["goals"]["ttft_p99_ms_at_64"], color="grey", lw=0.8, ls=":", label="goal p99 at 64")
    log2_axis(ax2, ns)
    ax2.set(xlabel="concurrent sessions", ylabel="ms", title="Time to first token")
    ax2.legend()
    save_figure(fig, NAME, quick, title=f"Serving: {data['model']}")


def main(argv=None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
