"""How long one request's JSON body pauses every stream (server/json_budget.py, docs/reliability.md).

A body is parsed and validated on the event loop, mostly in C calls that hold the GIL: no stream gets a
frame meanwhile. This measures what a streaming client sees: against `python -m server` (the
shipped text model), two WebSocket sessions generate turn after turn of 1,000 tokens, staggered, while
`curl` posts one body; the figure is the longest gap between two token frames of a turn while the body
was in flight (from curl's start to its answer), with the body's status and answer time.
One body of each costly kind, all under the 16 MiB body limit (token ids, strings, negative ids and
floats as a completions prompt, a huge `logit_bias`, numbers in an unknown field, chat content parts,
one-id lists), a 16 MB string, the largest valid completions body (64 prompts of 8,192 ids: 16 s of
prefill), and none (the stream's own gaps). With `--baseline-root DIR` a second server runs from another
checkout (the code before a change), and each round measures both, in turn: a side-by-side A/B on one
machine.

    python -m bench.parse_stall [--quick] [--baseline-root ../main-before] [--rounds 2]
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

from bench.common import ROOT, _git, bench_main, ranged, save_figure, subplots

NAME = "parse_stall"
MODEL = "text-shakespeare"
TURN_TOKENS = 1000
SOCKETS = 2
IDLE_S = 2.0  # the window for "none"


def bodies(scale: float) -> dict[str, tuple[str, bytes | None]]:
    """Each kind's route and body (`scale` < 1 shrinks them for --quick)."""
    n = lambda k: max(int(k * scale), 2)  # noqa: E731
    m, one = MODEL, {"model": MODEL, "max_tokens": 1}
    kinds: dict[str, tuple[str, Any]] = {
        "none": ("", None),
        "5.5M token ids": ("/v1/completions", {"model": m, "prompt": [7] * n(5_500_000), "max_tokens": 1}),
        "589k strings": ("/v1/completions", {"model": m, "prompt": ["a"] * n(589_000), "max_tokens": 1}),
        "589k negative ids": ("/v1/completions", {"model": m, "prompt": [-1] * n(589_000), "max_tokens": 1}),
        "589k floats": ("/v1/completions", {"model": m, "prompt": [0.5] * n(589_000), "max_tokens": 1}),
        "1M logit_bias keys": ("/v1/completions", {"model": m, "prompt": "a", "max_tokens": 1,
                                                   "logit_bias": {str(i): 1 for i in range(n(1_000_000))}}),
        "5.5M unknown-field numbers": ("/v1/generate", {"model": m, "prompt": "a", "junk": [0] * n(5.5e6)}),
        "500k chat parts": ("/v1/chat/completions", {"model": m, "max_tokens": 1, "messages": [
            {"role": "user", "content": [{"type": "text", "text": ""}] * n(500_000)}]}),
        "2.6M one-id lists": ("/v1/completions", {**one, "prompt": [[7]] * n(2_600_000)}),
        "16 MB string": ("/v1/completions", {"model": m, "prompt": "a" * n(16_000_000), "max_tokens": 1}),
        "valid: 64 x 8192 ids": ("/v1/completions", {**one, "prompt": [[7] * n(8192)] * 64}),
    }  # fmt: skip
    return {k: (path, None if obj is None else json.dumps(obj).encode()) for k, (path, obj) in kinds.items()}


async def one(url: str, path: str, body_file: str | None) -> dict[str, Any]:
    """SOCKETS sessions generate turns of TURN_TOKENS back to back (staggered) until the body is answered
    (or IDLE_S with no body): the longest gap between two token frames of one turn that overlaps the
    time the body was in flight. Gaps between turns are left out (a new turn's first token waits for
    its prefill, behind a large valid body's); with two staggered sessions one is mid-turn whenever the
    other is between turns, so a pause of the event loop always shows. A stream's turn answered by an
    error frame raises RuntimeError (the pauses would be the other stream's alone)."""
    from websockets.asyncio.client import connect

    turns: list[list[float]] = []
    window = [0.0, 0.0]
    done = asyncio.Event()
    answer: dict[str, Any] = {}

    async def post() -> None:
        await asyncio.sleep(0.5)
        window[0] = time.perf_counter()
        if body_file is None:
            await asyncio.sleep(IDLE_S)
        else:
            p = await asyncio.create_subprocess_exec(
                "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
                "--data-binary", "@" + body_file, url + path, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await p.communicate()
            answer["status"] = int(out or 0)
        window[1] = time.perf_counter()
        answer["answer_s"] = window[1] - window[0]
        done.set()

    async def stream(i: int) -> None:
        await asyncio.sleep(0.15 * i)
        async with connect(url.replace("http", "ws") + "/v1/stream", max_size=None) as ws:
            while not done.is_set():
                await ws.send(json.dumps({"type": "generate", "model": MODEL, "prompt": "To be",
                                          "max_new_tokens": TURN_TOKENS, "seed": i}))  # fmt: skip
                turns.append(frames := [])
                while (m := json.loads(await ws.recv()))["type"] != "done":
                    if m["type"] == "error":  # (its turns made no frames: the pauses were the other's alone)
                        raise RuntimeError(f"stream {i}: the server answered a turn with {m}")
                    if m["type"] == "token":
                        frames.append(time.perf_counter())

    await asyncio.gather(post(), *(stream(i) for i in range(SOCKETS)))
    gaps = sorted(b - a for f in turns for a, b in zip(f, f[1:]) if b >= window[0] and a <= window[1])
    return {**answer, "max_gap_ms": 1e3 * gaps[-1], "p50_gap_ms": 1e3 * statistics.median(gaps),
            "gaps": len(gaps)}  # fmt: skip


def start(root: Path) -> tuple[subprocess.Popen, str]:
    from server.launch import start_server

    return start_server(["--checkpoints", str(ROOT / "checkpoints" / MODEL)], timeout_s=300, cwd=root)


def run(quick: bool, baseline_root: str | None = None, rounds: int = 2) -> dict[str, Any]:
    kinds = bodies(0.02 if quick else 1.0)
    rounds = 1 if quick else rounds
    files: dict[str, str] = {}
    roots = {"this": ROOT, **({"baseline": Path(baseline_root).resolve()} if baseline_root else {})}
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    out: dict[str, Any] = {"rounds": rounds, "turn_tokens": TURN_TOKENS, "servers": {}}
    try:  # (the files and the servers inside it: a baseline that does not start stops the first server)
        for k, (_, body) in kinds.items():
            if body is not None:
                with tempfile.NamedTemporaryFile(delete=False, suffix=".json") as f:
                    files[k] = f.name
                    f.write(body)
        for name, root in roots.items():
            servers[name] = start(root)
        for name, root in roots.items():
            commit = _git("-C", str(root), "rev-parse", "--short", "HEAD") or ""
            out["servers"][name] = {"root": str(root), "commit": commit, "kinds": {k: [] for k in kinds}}
        for r in range(rounds):
            order = list(servers) if r % 2 == 0 else list(reversed(servers))
            for name in order:
                url = servers[name][1]
                for k, (path, _) in kinds.items():
                    got = asyncio.run(one(url, path, files.get(k)))
                    got["body_mib"] = os.path.getsize(files[k]) / 2**20 if k in files else 0.0
                    out["servers"][name]["kinds"][k].append(got)
                    print(f"round {r} {name:8s} {k:28s} max gap {got['max_gap_ms']:7.0f} ms "
                          f"(p50 {got['p50_gap_ms']:5.1f}); status {got.get('status', '-')}, "
                          f"answered in {got['answer_s']:.2f} s", flush=True)  # fmt: skip
    finally:
        for f in files.values():
            os.unlink(f)
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    return out


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax,) = subplots(1, width=11, height=5)
    servers = data["servers"]
    kinds = list(next(iter(servers.values()))["kinds"])
    width = 0.8 / len(servers)
    for i, (name, s) in enumerate(servers.items()):
        worst = [max(x["max_gap_ms"] for x in s["kinds"][k]) for k in kinds]
        xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(kinds))]
        ax.bar(xs, worst, width, label=f"{name} ({s['commit']})")
    ax.set_yscale("log")
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("longest token-frame gap in flight (ms)")
    ax.legend()
    title = "One JSON body: a stream's longest pause while it is in flight (worst round)"
    save_figure(fig, NAME, quick, title=title)


def main(argv=None) -> None:
    options: dict[str, Any] = {}

    def arguments(parser) -> None:
        parser.add_argument("--baseline-root", help="a checkout to run a second server from (A/B)")
        parser.add_argument(
            "--rounds",
            type=ranged(int, 1),
            default=2,
            help="rounds, ≥ 1 (each measures every server; default 2; --quick always runs 1)",
        )

    def configure(args) -> bool:
        options.update(baseline_root=args.baseline_root, rounds=args.rounds)
        return True

    bench_main(argv, __doc__, NAME, lambda quick: run(quick, **options), plot, arguments=arguments,
               configure=configure)  # fmt: skip


if __name__ == "__main__":
    main()
