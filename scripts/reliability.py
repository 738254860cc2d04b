"""Overload and soak runs against a real `python -m server` on loopback (bounded; nothing else reached).

  .venv/bin/python scripts/reliability.py overload [--capacity 8] [--phase-s 30]
      1x, then 4x, then 1x again the configured capacity (max_sessions = max_batch_size =
      max_queued_requests = capacity): half the users run WebSocket turns (a socket per turn), half
      post one-shot generations, back to back. Refused clients wait Retry-After and try again.
      Reports per phase the turns served, the tokens/s (the tokens received within the phase ÷ its
      seconds: the turns in flight at its end are finished, their later tokens not counted), the
      refusals (seen by clients, and counted by /metrics), and the admitted turns' latency: as the
      clients see it (time to first token, whole turn, gap
      between token frames; the clients share the CPU with the server) and as the engine measures
      it (p99 of the inter-token, first-token and request histograms of /metrics).
  .venv/bin/python scripts/reliability.py soak [--duration-s 600]
      mixed load: WebSocket turns, sockets dropped mid-generation, cancels, HTTP sessions (create,
      append, generate, fork) half of them deleted and half left to expire (TTL 5 s), one-shot and
      SSE requests, some abandoned. Samples the server's RSS, slots and errors every 10 s; at the end
      waits for every session to expire and checks that no slot is left.

Both serve the shipped text model unless --checkpoint names another text checkpoint, write JSON to
scripts/results/ (--out) and print a summary. CI runs a 6-second soak on a tiny model
(tests/test_reliability_script.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus, WebSocketException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # (run as a file: bench/ is no installed package; server/ is this tree's)

from bench.common import nearest_rank, ranged  # noqa: E402
from server import launch  # noqa: E402

CHECKPOINT = ROOT / "checkpoints" / "text-shakespeare"  # --checkpoint; the model id is its folder name
MODEL = CHECKPOINT.name
LINES = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players;",
    "Friends, Romans, countrymen, lend me your ears;",
]


# --- the server under test -------------------------------------------------------------------------


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    try:
        return launch.start_server(["--checkpoints", str(CHECKPOINT), *flags], timeout_s=180)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples summed over labels, by name (and by name{labels} too)."""
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, value = line.rsplit(" ", 1)
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value)
        out[key] = float(value)
    return out


def histogram_p(before: dict, after: dict, name: str, q: float) -> float | None:
    """The q-quantile of a Prometheus histogram's observations between two scrapes (the upper bound
    of the bucket it falls in), over every model. One that falls in the +Inf bucket is the largest finite
    bound, as Prometheus's histogram_quantile gives it (a lower bound; it was `inf`, which the results JSON
    wrote as `Infinity`, not JSON); None when no observation fell between the scrapes."""
    buckets: dict[float, float] = {}
    for key, value in after.items():
        if key.startswith(name + "_bucket{"):
            le = key.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + value - before.get(key, 0.0)
    total = buckets.get(float("inf"), 0.0)
    if not total:
        return None
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            finite = [b for b in buckets if math.isfinite(b)]
            return bound if math.isfinite(bound) else max(finite, default=None)
    return None


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of xs by nearest rank (`bench.common.nearest_rank`), to 4 decimals; None when empty.
    (`xs[int(q * n)]`, used before, was one rank too high wherever q·n is whole: the p99 of 100 turns was
    the slowest one.)"""
    return round(nearest_rank(xs, q), 4) if xs else None


def summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 0.5), "p99": pct(xs, 0.99), "max": pct(xs, 1.0)}


class Stats:
    def __init__(self) -> None:
        self.ok = self.refused = self.tokens = 0
        self.errors: dict[str, int] = {}
        self.ttft: list[float] = []
        self.turn: list[float] = []
        self.gap: list[float] = []

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


# --- overload ---------------------------------------------------------------------------------------


def turn_message(rng: random.Random, n_tokens: int) -> dict:
    return {"type": "generate", "model": MODEL, "prompt": rng.choice(LINES), "max_new_tokens": n_tokens,
            "seed": rng.randrange(2**31)}  # fmt: skip


def ws_failure(exc: Exception) -> str:
    """A WebSocket user's failure in the errors' words: a refused handshake by its status ("ws handshake
    503": S4_MAX_CONNECTIONS, a drain), anything else (a closed connection, OSError) by its type."""
    if isinstance(exc, InvalidStatus):
        return f"ws handshake {exc.response.status_code}"
    return f"ws {type(exc).__name__}"


async def ws_user(url: str, stats: Stats, rng: random.Random, stop: asyncio.Event, n_tokens: int) -> None:
    """One turn per socket (its session slot is freed when it closes), back to back; refused: waits
    Retry-After, tries again."""
    ws_url = url.replace("http", "ws") + "/v1/stream"
    while not stop.is_set():
        try:
            async with connect(ws_url, max_size=2**22) as ws:
                t0 = time.perf_counter()
                await ws.send(json.dumps(turn_message(rng, n_tokens)))
                first = last = None
                while True:
                    msg = json.loads(await ws.recv())
                    now = time.perf_counter()
                    if msg["type"] == "token":
                        if first is None:
                            first = now
                            stats.ttft.append(now - t0)
                        else:
                            stats.gap.append(now - last)
                        last = now
                        if not stop.is_set():  # (tokens/s: those received within the phase)
                            stats.tokens += len(msg["ids"])
                    elif msg["type"] == "done":
                        stats.ok += 1
                        stats.turn.append(now - t0)
                        break
                    elif msg["type"] == "error":
                        if msg["code"] != 429:
                            stats.error(f"ws {msg['code']}")
                        else:
                            stats.refused += 1
                        break
            if msg["type"] == "error":
                await asyncio.sleep(msg.get("retry_after", 1))
        except (WebSocketException, OSError) as exc:  # (a closed connection, a refused handshake, ...)
            if not stop.is_set():
                stats.error(ws_failure(exc))
                await asyncio.sleep(0.5)


async def http_user(url: str, stats: Stats, rng: random.Random, stop: asyncio.Event, n_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while not stop.is_set():
            body = {"model": MODEL, "prompt": rng.choice(LINES), "max_new_tokens": n_tokens,
                    "seed": rng.randrange(2**31)}  # fmt: skip
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/generate", json=body)
            except httpx.HTTPError as exc:
                stats.error(f"http {type(exc).__name__}")
                await asyncio.sleep(0.5)
                continue
            if r.status_code == 200:
                stats.ok += 1
                stats.turn.append(time.perf_counter() - t0)
                if not stop.is_set():  # (tokens/s: those received within the phase)
                    stats.tokens += len(r.json()["tokens"])
            elif r.status_code == 429:
                stats.refused += 1
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
            else:
                stats.error(f"http {r.status_code}")


async def overload_phase(url: str, users: int, seconds: float, n_tokens: int, seed: int) -> dict:
    stats, stop = Stats(), asyncio.Event()
    before = metrics(url)
    rng = random.Random(seed)
    tasks = [
        asyncio.create_task(
            (ws_user if i % 2 == 0 else http_user)(url, stats, random.Random(rng.random()), stop, n_tokens)
        )  # fmt: skip
        for i in range(users)
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    # closed sockets give their slots back: waited for (up to 30 s; a fixed 2 s was a loaded machine's to
    # miss, and the slots still on their way back read as held), so a slot still held then is a real one
    deadline = time.monotonic() + 30
    while (after := await asyncio.to_thread(metrics, url)).get("s4_active_sessions", 0) and (
        time.monotonic() < deadline
    ):
        await asyncio.sleep(0.2)
    return {
        "users": users,
        "seconds": seconds,
        "turns_ok": stats.ok,
        "refused_429_seen_by_clients": stats.refused,
        "rejections_in_metrics": after.get("s4_rejections_total", 0) - before.get("s4_rejections_total", 0),
        "other_errors": stats.errors,
        "tokens_per_s": round(stats.tokens / seconds, 1),
        "ttft_s": summary(stats.ttft),
        "turn_s": summary(stats.turn),
        "ws_frame_gap_s": summary(stats.gap),
        "engine_itl_p99_s": histogram_p(before, after, "s4_inter_token_latency_seconds", 0.99),
        "engine_ttft_p99_s": histogram_p(before, after, "s4_time_to_first_token_seconds", 0.99),
        "engine_request_p99_s": histogram_p(before, after, "s4_request_duration_seconds", 0.99),
        "slots_in_use_after": after.get("s4_active_sessions", 0),
    }


def overload(args) -> dict:
    c = args.capacity
    flags = ["--max-sessions", str(c), "--max-batch-size", str(c), "--max-queued-requests", str(c),
             "--torch-threads", str(args.torch_threads)]  # fmt: skip
    proc, url = start_server(flags)
    try:
        phases = {}
        for name, mult in (("1x", 1), ("4x", 4), ("1x_after", 1)):
            phases[name] = asyncio.run(overload_phase(url, mult * c, args.phase_s, args.tokens, seed=mult))
            print(name, json.dumps(phases[name]), flush=True)
    finally:
        code = stop_server(proc)
    return {"capacity": c, "max_new_tokens": args.tokens, "model": MODEL, "phases": phases, "exit_code": code}


# --- soak -------------------------------------------------------------------------------------------


async def soak_ws(url, st: Stats, rng: random.Random, stop: asyncio.Event) -> None:
    """Turns, dropped sockets mid-generation and cancels, on short-lived sockets."""
    ws_url = url.replace("http", "ws") + "/v1/stream"
    while not stop.is_set():
        kind = rng.choice(["turns", "drop", "cancel"])
        try:
            async with connect(ws_url, max_size=2**22) as ws:
                for turn in range(rng.randint(1, 3)):
                    n = 32 if kind == "turns" else 2000
                    await ws.send(json.dumps(turn_message(rng, n)))
                    frames = 0
                    while True:
                        msg = json.loads(await ws.recv())
                        frames += 1
                        if msg["type"] == "error":
                            st.refused += msg["code"] == 429
                            if msg["code"] != 429:
                                st.error(f"ws {msg['code']}")
                            break
                        if msg["type"] == "done":
                            st.ok += 1  # (a cancel that crossed this done frame is answered by nothing)
                            break
                        if kind == "drop" and frames == 5:
                            # leave mid-generation without a close handshake: the connection is lost
                            # (leaving `async with connect` closes it with one, code 1011)
                            ws.transport.abort()
                            raise _Drop
                        if kind == "cancel" and frames == 5 and turn == 0:
                            await ws.send(json.dumps({"type": "cancel"}))
        except _Drop:
            st.ok += 1
        except (WebSocketException, OSError) as exc:  # (a closed connection, a refused handshake, ...)
            st.error(ws_failure(exc))
        await asyncio.sleep(rng.uniform(0, 0.3))


class _Drop(Exception):
    pass


async def soak_http(url, st: Stats, rng: random.Random, stop: asyncio.Event) -> None:
    """Sessions (create, append, generate, fork; half deleted, half left to expire), one-shot and
    SSE requests (some abandoned halfway)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while not stop.is_set():
            try:
                r = await c.post("/v1/sessions", json={"model": MODEL, "prompt": rng.choice(LINES)})
                codes = [r.status_code]
                if r.status_code == 201:
                    sid = r.json()["session_id"]
                    codes.append(
                        (await c.post(f"/v1/sessions/{sid}/append", json={"prompt": " and"})).status_code
                    )
                    body = {"model": MODEL, "session_id": sid, "max_new_tokens": 24, "seed": 1}
                    codes.append((await c.post("/v1/generate", json=body)).status_code)
                    if rng.random() < 0.3:
                        f = await c.post(f"/v1/sessions/{sid}/fork")
                        codes.append(f.status_code)
                        if f.status_code == 201:
                            codes.append(
                                (await c.delete(f"/v1/sessions/{f.json()['session_id']}")).status_code
                            )
                    if rng.random() < 0.5:
                        codes.append((await c.delete(f"/v1/sessions/{sid}")).status_code)
                body = {"model": MODEL, "prompt": rng.choice(LINES), "max_new_tokens": 200, "stream": True}
                async with c.stream("POST", "/v1/generate", json=body) as s:
                    codes.append(await sse_outcome(s, rng))
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "Now", "max_tokens": 16})
                codes.append(r.status_code)
                for code in codes:
                    if code in (200, 201, 204):
                        st.ok += 1
                    elif code == 429:
                        st.refused += 1
                    else:
                        st.error(code if isinstance(code, str) else f"http {code}")
            except httpx.HTTPError as exc:
                st.error(f"http {type(exc).__name__}")
            await asyncio.sleep(rng.uniform(0, 0.3))


async def sse_outcome(s: httpx.Response, rng: random.Random) -> int | str:
    """A streamed generation's outcome, read to its end unless abandoned halfway (2 % a line): its status when
    not 200; else 200 once its done event came (or it was abandoned), and an error for a 200 stream that ended
    in an error event ("sse CODE": an engine failure, a drain), without its done event, or held an event that
    is not a JSON object."""
    if s.status_code != 200:
        return s.status_code
    error, done = None, False
    async for line in s.aiter_lines():
        if rng.random() < 0.02:  # abandoned halfway
            return 200
        if line.startswith("data: "):
            try:
                event = json.loads(line[len("data: ") :])
            except ValueError:
                event = None
            if not isinstance(event, dict):  # (an error of its own, not the end of the soak's user)
                error = error or "sse: an event that is not a JSON object"
            elif event.get("type") == "error":
                error = error or f"sse {event.get('code')}"
            done = done or (isinstance(event, dict) and event.get("type") == "done")
    return error or (200 if done else "sse: ended without a done event")


async def soak_run(proc, url: str, args) -> dict:
    st, stop = Stats(), asyncio.Event()
    rng = random.Random(0)
    users = [soak_ws] * args.ws_users + [soak_http] * args.http_users
    tasks = [asyncio.create_task(u(url, st, random.Random(rng.random()), stop)) for u in users]
    samples = []
    t0 = time.monotonic()
    while (elapsed := time.monotonic() - t0) < args.duration_s:
        await asyncio.sleep(min(args.sample_s, max(0.0, args.duration_s - elapsed)))
        m = await asyncio.to_thread(metrics, url)
        samples.append({
            "t_s": round(time.monotonic() - t0, 1),
            "rss_mib": round(rss_mib(proc.pid), 1),
            "slots_in_use": m.get("s4_active_sessions", 0),
            "queue_depth": m.get("s4_queue_depth", 0),
            "ok": st.ok,
            "refused_429": st.refused,
            "errors": sum(st.errors.values()),
            "tokens_generated": m.get("s4_tokens_generated_total", 0),
        })  # fmt: skip
        print(json.dumps(samples[-1]), flush=True)
    stop.set()
    await asyncio.wait(tasks, timeout=60)
    for t in tasks:
        t.cancel()
    # every session expires (TTL) or went with its socket: nothing may be left
    deadline = time.monotonic() + args.ttl_s * 4 + 10
    while time.monotonic() < deadline:
        m = await asyncio.to_thread(metrics, url)
        if m.get("s4_active_sessions", 0) == 0 and m.get("s4_queue_depth", 0) == 0:
            break
        await asyncio.sleep(1)
    warm = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    base, end = warm[0]["rss_mib"], warm[-1]["rss_mib"]
    rss = [s["rss_mib"] for s in warm]
    half = len(warm) // 2
    return {
        "duration_s": args.duration_s,
        "users": {"websocket": args.ws_users, "http": args.http_users},
        "session_ttl_s": args.ttl_s,
        "rss_mib": {
            "after_warmup": base,
            "end": end,
            "min": min(rss),
            "max": max(rss),
            "drift_pct": round(100 * (end - base) / base, 2),
            "idle_after": round(rss_mib(proc.pid), 1),
        },
        "requests_ok": st.ok,
        "refused_429": st.refused,
        "errors": st.errors,
        "errors_first_half": warm[half]["errors"] - warm[0]["errors"] if warm else None,
        "errors_second_half": warm[-1]["errors"] - warm[half]["errors"] if warm else None,
        "slots_in_use_at_end": m.get("s4_active_sessions", 0),
        "queue_depth_at_end": m.get("s4_queue_depth", 0),
        "tokens_generated": m.get("s4_tokens_generated_total", 0),
        "rejections_in_metrics": m.get("s4_rejections_total", 0),
        "samples": samples,
    }


def soak(args) -> dict:
    flags = ["--session-ttl-s", str(args.ttl_s), "--max-sessions", "64", "--torch-threads", "1"]
    proc, url = start_server(flags)
    try:
        out = asyncio.run(soak_run(proc, url, args))
    finally:
        out_code = stop_server(proc)
    out["exit_code"] = out_code
    return out


def main() -> None:
    global CHECKPOINT, MODEL  # noqa: PLW0603  (one model per run, chosen by --checkpoint)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    o = sub.add_parser("overload")
    o.add_argument("--capacity", type=ranged(int, 1, 4096), default=8)
    o.add_argument("--phase-s", type=ranged(float, 0, 86400, lo_open=True), default=30)
    o.add_argument("--tokens", type=ranged(int, 1, 100_000), default=64)
    o.add_argument("--torch-threads", type=ranged(int, 1, 1024), default=1)
    s = sub.add_parser("soak")
    s.add_argument("--duration-s", type=ranged(float, 0, 10**6, lo_open=True), default=600)
    s.add_argument("--sample-s", type=ranged(float, 0.1, 3600), default=10)
    s.add_argument("--warmup-s", type=ranged(float, 0, 10**6), default=60)
    s.add_argument("--ttl-s", type=ranged(float, 1, 86400), default=5)  # (the server: at least 1 s)
    s.add_argument("--ws-users", type=ranged(int, 0, 1000), default=6)
    s.add_argument("--http-users", type=ranged(int, 0, 1000), default=4)
    for p in (o, s):
        p.add_argument(
            "--out",
            default=str(ROOT / "scripts" / "results"),
            help="the folder for the result, NAME.json (default: scripts/results/, whose files are the "
            "measured figures of docs/reliability.md: pass a folder of your own to keep them)",
        )
        p.add_argument("--checkpoint", default=str(CHECKPOINT), help="a text model's checkpoint folder")
    args = parser.parse_args()
    if args.mode == "soak" and args.ws_users + args.http_users == 0:
        parser.error("soak: --ws-users and --http-users are both 0: nothing would load the server")
    CHECKPOINT = Path(args.checkpoint).resolve()
    MODEL = CHECKPOINT.name
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.time()
    result = overload(args) if args.mode == "overload" else soak(args)
    result = {
        "command": "python scripts/reliability.py " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "load_avg_at_end": os.getloadavg(),
        **result,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"{args.mode}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
