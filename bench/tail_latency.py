"""Tail latency while a long prompt is ingested (issue 18, item 5): chunked prefill on against off.

Two servers run side by side (child processes, the shipped text model), one with the default chunked
prefill (`S4_PREFILL_CHUNK_TOKENS` 256, `S4_PREFILL_TOKEN_BUDGET` 512) and one with chunking off (one
chunk as long as the longest prompt). Against each, in turn (rounds alternate between the two):
  * `sessions` WebSocket sessions decode continuously (closed loop: 32-character prompt, `decode_tokens`
    new tokens, again); the gap between two token frames of one generation is its inter-token latency
    (a frame may carry several tokens: the gap is the stall a reader sees);
  * a new short request (32-character prompt, 4 new tokens, on one of `probes` WebSocket sessions) is
    sent every `probe_every_s`: its time to first token (TTFT);
  * after `baseline_s`, one request with a `long_prompt`-token prompt arrives.
Two workloads: "synchronized", every generation `decode_tokens` long, so the sessions, started together,
also finish together and send their next prompts as one wave of `sessions` prompts every
`decode_tokens` steps (the worst case for a new request: a probe sent during a wave waits for its 64 ×
32 prompt tokens, ≥ 45 ms of prefill on the 2-core CPU); and "staggered" (chunked prefill only), each
generation's length drawn uniformly from decode_tokens · [1 − spread, 1 + spread] (seeded per session
and turn), so that after the first turn the prompts arrive spread out, as from independent users (the
windows open STAGGER_SETTLE_S later).
The figures are taken over the long prompt's ingestion (from its send to its first token): TTFT p50/p99
of the short requests sent in it and inter-token latency p50/p99 of the decoding sessions' frames that
arrive in it; the same over the baseline window before it, for reference. Every server is warmed up
with one long prompt first (the first prefill at a new length is slower). The clients share the CPU
with the server: the 1-minute load average is recorded at the start and end.

    python -m bench.tail_latency [--quick]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import ROOT, bench_main, nearest_rank, save_figure, subplots, wait_for_clients  # noqa: E402
from server import launch  # noqa: E402

NAME = "tail_latency"
SHIPPED = ROOT / "checkpoints" / "text-shakespeare"
SIZES: dict[bool, dict[str, Any]] = {
    False: {"sessions": 64, "probes": 8, "long_prompt": 16384, "decode_tokens": 256, "probe_every_s": 0.05,
            "baseline_s": 2.0, "rounds": 5},
    True: {"sessions": 64, "probes": 4, "long_prompt": 16384, "decode_tokens": 256, "probe_every_s": 0.1,
           "baseline_s": 1.0, "rounds": 1},
}  # fmt: skip
CONFIGS = {
    "chunked": {"prefill_chunk_tokens": 256, "prefill_token_budget": 512},  # the defaults
    "unchunked": {"prefill_chunk_tokens": 16384, "prefill_token_budget": 16384},
}
# (name, server config, spread of the decoders' generation lengths): see the module docstring
VARIANTS = [
    ("chunked", "chunked", 0.0),
    ("unchunked", "unchunked", 0.0),
    ("chunked-staggered", "chunked", 0.5),
]
STAGGER_SETTLE_S = 2.0  # the staggered decoders run this long before the baseline window opens


def _pcts(xs: list[float]) -> dict[str, float | int]:
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    return {
        "n": len(xs),
        "p50_ms": 1e3 * statistics.median(xs),
        "p99_ms": 1e3 * nearest_rank(xs, 0.99),
        "max_ms": 1e3 * xs[-1],
    }


def long_text(n: int) -> str:
    """n ASCII characters (n byte tokens) of English: the README, repeated."""
    text = (ROOT / "README.md").read_text().encode("ascii", "ignore").decode()
    return (text * (n // len(text) + 1))[:n]


async def _generate(ws, prompt: str, max_new: int, seed: int, on_frame) -> None:
    """One generation on an open session: on_frame(t, n_ids) per token frame; returns at `done`."""
    await ws.send(json.dumps({"type": "generate", "prompt": prompt, "max_new_tokens": max_new, "seed": seed}))
    while True:
        m = json.loads(await ws.recv())
        if m["type"] == "token" and m["ids"]:
            on_frame(time.perf_counter(), len(m["ids"]))
        elif m["type"] == "done":
            return
        elif m["type"] == "error":
            raise RuntimeError(f"server error: {m}")


async def _session(ws, model: str, tries: int = 30) -> None:
    """A new session on `ws`. A 429 is retried after its retry_after, as a client should: a round's sessions
    can still be busy a moment after the round ended (their turns cut mid-generation are being taken back),
    and the next round on the same server (the order reverses every round) found every slot in use."""
    for _ in range(tries):
        await ws.send(json.dumps({"type": "session", "model": model}))
        m = json.loads(await ws.recv())
        if m.get("type") != "error":
            return
        if m.get("code") != 429:
            break
        await asyncio.sleep(float(m.get("retry_after") or 1.0))
    raise RuntimeError(f"server error: {m}")


async def measure(
    url: str, model: str, sz: dict, long_prompt: str, warm_up: bool, spread: float = 0.0, round_: int = 0
) -> dict[str, Any]:
    """One round against one server (see the module docstring); `spread` > 0: the staggered workload."""
    from websockets.asyncio.client import connect

    ws_url = url.replace("http", "ws") + "/v1/stream"
    stop = asyncio.Event()
    gaps: list[tuple[float, float]] = []  # (arrival time, gap since the previous frame)
    probes: list[tuple[float, float]] = []  # (send time, TTFT)

    async def decoder(k: int) -> None:
        async with connect(ws_url, max_queue=None, max_size=None) as ws:
            await _session(ws, model)
            turn = 0
            while not stop.is_set():
                last = [None]

                def frame(t: float, n: int) -> None:
                    if last[0] is not None:
                        gaps.append((t, t - last[0]))
                    last[0] = t

                prompt = "".join(chr(97 + (k * 7 + turn + i) % 26) for i in range(32))
                n = sz["decode_tokens"]
                if spread:
                    u = random.Random(f"{round_}/{k}/{turn}").uniform(-spread, spread)
                    n = max(1, round(n * (1 + u)))
                await _generate(ws, prompt, n, k, frame)
                turn += 1

    async def prober(k: int, queue: asyncio.Queue) -> None:
        async with connect(ws_url, max_queue=None, max_size=None) as ws:
            await _session(ws, model)
            while True:
                t0 = await queue.get()
                if t0 is None:
                    return
                first = []

                def frame(t: float, n: int) -> None:
                    if not first:
                        first.append(t)

                prompt = "".join(chr(65 + (k * 5 + i) % 26) for i in range(32))
                await _generate(ws, prompt, 4, k, frame)
                probes.append((t0, first[0] - t0))

    async def long_request() -> tuple[float, float]:
        async with connect(ws_url, max_queue=None, max_size=None) as ws:
            await _session(ws, model)
            first = []
            t0 = time.perf_counter()
            await _generate(ws, long_prompt, 4, 0, lambda t, n: first or first.append(t))
            return t0, first[0]

    if warm_up:
        await long_request()
    decoders = [asyncio.create_task(decoder(k)) for k in range(sz["sessions"])]
    queues = [asyncio.Queue() for _ in range(sz["probes"])]
    probers = [asyncio.create_task(prober(k, q)) for k, q in enumerate(queues)]
    # every session is decoding (a client that could not connect, or was refused, ends the round)
    await wait_for_clients(lambda: len(gaps) >= 4 * sz["sessions"], [*decoders, *probers], poll_s=0.05)
    if spread:  # past the first turn's common start: the prompts arrive spread out
        await asyncio.sleep(STAGGER_SETTLE_S)

    async def send_probes() -> None:
        k = 0
        while not stop.is_set():
            queues[k % len(queues)].put_nowait(time.perf_counter())
            k += 1
            await asyncio.sleep(sz["probe_every_s"])

    sender = asyncio.create_task(send_probes())
    t_base = time.perf_counter()
    await asyncio.sleep(sz["baseline_s"])
    t_long, t_first = await long_request()
    await asyncio.sleep(0.3)
    stop.set()
    await sender
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*probers)
    for d in decoders:
        d.cancel()
    ended = await asyncio.gather(*decoders, return_exceptions=True)
    failed = [e for e in ended if isinstance(e, Exception)]  # (not the CancelledError of the cancel above)
    if failed:  # the figures were taken with fewer sessions decoding than the round says
        raise RuntimeError(f"{len(failed)} of {len(decoders)} decoding sessions failed in the round; the "
                           f"first: {failed[0]}") from failed[0]  # fmt: skip

    def window(xs, a, b):
        return [v for t, v in xs if a <= t < b]

    return {
        "long_prompt_ttft_ms": 1e3 * (t_first - t_long),
        "during_long": {
            "short_ttft": _pcts(window(probes, t_long, t_first)),
            "itl": _pcts(window(gaps, t_long, t_first)),
        },
        "baseline": {
            "short_ttft": _pcts(window(probes, t_base, t_long)),
            "itl": _pcts(window(gaps, t_base, t_long)),
        },
        "_raw": {
            "gaps": [(t - t_long, g) for t, g in gaps if t_base <= t < t_first + 0.3],
            "probes": [(t - t_long, g) for t, g in probes],
        },  # fmt: skip
    }


def _merge(rounds: list[dict]) -> dict[str, Any]:
    """Pool the rounds' samples (percentiles over all of them)."""
    out: dict[str, Any] = {"long_prompt_ttft_ms": [r["long_prompt_ttft_ms"] for r in rounds]}
    for win in ("during_long", "baseline"):
        out[win] = {}
        for what in ("short_ttft", "itl"):
            xs = []
            for r in rounds:
                raw = r["_raw"]["probes" if what == "short_ttft" else "gaps"]
                lo, hi = (0.0, r["long_prompt_ttft_ms"] / 1e3) if win == "during_long" else (-1e9, 0.0)
                xs += [v for t, v in raw if lo <= t < hi]
            out[win][what] = _pcts(xs)
    out["rounds"] = [{k: v for k, v in r.items() if k != "_raw"} for r in rounds]
    out["trace"] = rounds[0]["_raw"]  # the first round's samples, for the plot (times from the long send)
    return out


def run(quick: bool) -> dict[str, Any]:
    sz = SIZES[quick]
    if not SHIPPED.exists():
        raise SystemExit(f"{SHIPPED} is missing: this benchmark runs the shipped text model")
    text = long_text(sz["long_prompt"])
    load = [os.getloadavg()[0]]
    servers = {}
    try:
        for name, cfg in CONFIGS.items():
            # (no prefix cache: every round sends the same long prompt, to be ingested each time)
            flags = ["--checkpoints", str(SHIPPED), "--max-sessions", "128", "--max-batch-size", "128",
                     "--max-queued-requests", "136", "--max-prompt-tokens", str(sz["long_prompt"]),
                     "--prefix-cache-mb", "0"]  # fmt: skip
            for k, v in cfg.items():
                flags += [f"--{k.replace('_', '-')}", str(v)]
            servers[name] = launch.start_server(flags, timeout_s=300)
        rounds: dict[str, list] = {name: [] for name, _, _ in VARIANTS}
        for r in range(sz["rounds"]):
            for name, server, spread in VARIANTS if r % 2 == 0 else reversed(VARIANTS):
                warm = r == 0 and spread == 0  # each server's first round
                res = asyncio.run(measure(servers[server][1], SHIPPED.name, sz, text, warm, spread, r))
                rounds[name].append(res)
                d, t = res["during_long"], res["long_prompt_ttft_ms"]
                tt, itl = d["short_ttft"], d["itl"]
                print(f"round {r} {name:17s}: long prompt TTFT {t:7.0f} ms; during it: short TTFT p50 "
                      f"{tt['p50_ms']:6.1f} p99 {tt['p99_ms']:6.1f} ms (n={tt['n']}), ITL p50 "
                      f"{itl['p50_ms']:6.1f} p99 {itl['p99_ms']:6.1f} ms (n={itl['n']})",
                      flush=True)  # fmt: skip
                load.append(os.getloadavg()[0])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    results = {name: _merge(rs) for name, rs in rounds.items()}
    on, off = results["chunked"]["during_long"], results["unchunked"]["during_long"]
    return {
        "model": "shipped checkpoint text-shakespeare",
        "sizes": sz,
        "configs": CONFIGS,
        "variants": [{"name": n, "config": c, "decode_tokens_spread": sp} for n, c, sp in VARIANTS],
        "load_avg_1min": load,
        "results": results,
        "ratios_off_over_on": {
            "short_ttft_p99": off["short_ttft"]["p99_ms"] / on["short_ttft"]["p99_ms"],
            "itl_p99": off["itl"]["p99_ms"] / on["itl"]["p99_ms"],
        },
        "goals": {"short_ttft_p99_ms": 50.0},
    }


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax, ax2) = subplots(2, width=6.5)
    colors = {"chunked": "tab:blue", "unchunked": "tab:red", "chunked-staggered": "tab:green"}
    for name, res in data["results"].items():
        tr = res["trace"]
        ax.plot([t for t, _ in tr["gaps"]], [1e3 * g for _, g in tr["gaps"]], ".", ms=2, alpha=0.5,
                color=colors[name], label=f"{name}: decoder frame gaps")  # fmt: skip
        ax.plot([t for t, _ in tr["probes"]], [1e3 * g for _, g in tr["probes"]], "^", ms=5,
                color=colors[name], label=f"{name}: short request TTFT (at send time)")  # fmt: skip
        ax.axvline(res["rounds"][0]["long_prompt_ttft_ms"] / 1e3, color=colors[name], ls=":", lw=1)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(xlabel="s since the long prompt was sent (dotted: its first token)", ylabel="ms", yscale="log",
           title=f"first round, {data['sizes']['sessions']} decoding sessions")  # fmt: skip
    ax.legend(fontsize=7)
    names = list(data["results"])
    labels = ["short TTFT p50", "short TTFT p99", "ITL p50", "ITL p99"]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        d = data["results"][name]["during_long"]
        vals = [d["short_ttft"]["p50_ms"], d["short_ttft"]["p99_ms"], d["itl"]["p50_ms"], d["itl"]["p99_ms"]]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(labels))]
        ax2.bar(xs, vals, width, label=name, color=colors[name])
    ax2.axhline(data["goals"]["short_ttft_p99_ms"], color="grey", ls=":", lw=0.8, label="TTFT p99 goal")
    ax2.set_xticks(range(len(labels)), labels)
    ax2.set(ylabel="ms", yscale="log", title=f"during a {data['sizes']['long_prompt']}-token prompt")
    ax2.legend(fontsize=8)
    save_figure(fig, NAME, quick, title="Tail latency: chunked prefill on vs off (text model, WebSocket)")


def main(argv=None) -> None:
    bench_main(argv, __doc__, NAME, run, plot)


if __name__ == "__main__":
    main()
