"""The prefix cache (server/prefix_cache.py, `S4_PREFIX_CACHE_MB`): time to the first token of requests
that share a long prefix, with the cache off (A: S4_PREFIX_CACHE_MB=0) and on (B: the default), two
servers up side by side, the requests alternated between them.

Per prefix length: a document of that many tokens (English text), then a short question that differs
from request to request ("\\nQ7: ..."), as an application asking several questions of one document or
sending one system prompt before each user's message does. Each request is `POST /v1/generate` with
max_new_tokens 1, so its latency is the prompt's ingestion and one step: its time to first token, through
the HTTP stack. First one warm-up request to each server with another document of the same length (so
that neither pays a first prefill at a new length), then the document's first request (B stores its
prefixes: a miss, as A), then `--requests` more alternated (B restores the longest stored prefix: the
document's whole 256-token chunks, and ingests the rest). Reported per length: the median latency of
each, B ÷ A, and the cached tokens B's usage reported.

    python -m bench.prefix_cache [--quick] [--requests N]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import bench_main, save_figure, subplots  # noqa: E402
from bench.server import checkpoint  # noqa: E402
from bench.tail_latency import long_text  # noqa: E402
from server import launch  # noqa: E402

NAME = "prefix_cache"
LENGTHS = {False: (1024, 4096, 8000), True: (64, 300)}
REQUESTS = {False: 16, True: 3}
ARMS = {"A": {"S4_PREFIX_CACHE_MB": "0"}, "B": {}}  # B: the default budget


def one(client: httpx.Client, model: str, prompt: str) -> tuple[float, dict]:
    """Latency (ms) of a 1-token generation of `prompt` (on the client's open connection: a new client
    costs ~20 ms here, ten times the server's answer to a short prompt), and its usage."""
    body = {"model": model, "prompt": prompt, "max_new_tokens": 1, "seed": 0}
    t0 = time.perf_counter()
    r = client.post("/v1/generate", json=body)
    ms = (time.perf_counter() - t0) * 1e3
    r.raise_for_status()
    return ms, r.json()["usage"]


def run(quick: bool, requests: int | None = None) -> dict[str, Any]:
    n = requests or REQUESTS[quick]
    out: dict[str, Any] = {"requests": n, "lengths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, what = checkpoint(quick, Path(tmp))
        model = ckpt.name
        out["model"] = what
        servers = {}
        try:
            for name, env in ARMS.items():
                servers[name] = launch.start_server(["--checkpoints", str(ckpt)], timeout_s=300, env=env)
            urls = {name: httpx.Client(base_url=url, timeout=300) for name, (_, url) in servers.items()}
            text = long_text(3 * max(LENGTHS[quick]))
            for L in LENGTHS[quick]:
                # (headed by their length: no document shares a chunk with another length's)
                doc, other = (
                    f"{head} {L}:\n{text[k * L : (k + 1) * L]}"[:L] for k, head in enumerate(("Doc", "Other"))
                )
                for name in ARMS:  # warm-up: another document of this length
                    one(urls[name], model, other + "\nQ0: who?\nA:")
                first = {name: one(urls[name], model, doc + "\nQ0: who?\nA:")[0] for name in ARMS}
                ms: dict[str, list[float]] = {"A": [], "B": []}
                cached = []
                for i in range(1, n + 1):
                    for name in ("A", "B") if i % 2 else ("B", "A"):
                        t, usage = one(urls[name], model, doc + f"\nQ{i}: what of line {i}?\nA:")
                        ms[name].append(t)
                        if name == "B":
                            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                med = {k: statistics.median(v) for k, v in ms.items()}
                out["lengths"][str(L)] = {
                    "ms": ms, "first_ms": first, "median_ms": med, "b_over_a": med["B"] / med["A"],
                    "cached_tokens": cached,
                }  # fmt: skip
                print(f"prefix {L} tokens: cache off {med['A']:.1f} ms, on {med['B']:.1f} ms "
                      f"({med['A'] / med['B']:.1f}x faster; cached {statistics.median(cached):.0f} tokens); "
                      f"the document's first request {first['A']:.1f} / {first['B']:.1f} ms",
                      flush=True)  # fmt: skip
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    return out


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax,) = subplots(1, width=7)
    lengths = list(data["lengths"])
    x = range(len(lengths))
    for k, (name, label) in enumerate((("A", "prefix cache off"), ("B", "prefix cache on"))):
        ax.bar([i + (k - 0.5) * 0.4 for i in x], [data["lengths"][L]["median_ms"][name] for L in lengths],
               width=0.4, label=label)  # fmt: skip
    ax.set_xticks(list(x), [f"{L} tokens" for L in lengths])
    ax.set_xlabel("shared prefix (then a short distinct question)")
    ax.set_ylabel("time to first token, median (ms)")
    ax.set_yscale("log")
    ax.legend()
    save_figure(fig, NAME, quick, f"Prefix cache: {data['model']}, {data['requests']} requests a length")


def main(argv=None) -> None:
    opts: dict[str, Any] = {}

    def arguments(p):
        p.add_argument("--requests", type=int, default=None, help="alternated requests per length and server")

    def configure(args) -> bool:
        if args.requests is not None and args.requests < 1:
            raise SystemExit("--requests must be ≥ 1")
        opts["requests"] = args.requests
        return True

    bench_main(argv, __doc__, NAME, lambda quick: run(quick, opts["requests"]), plot,
               arguments=arguments, configure=configure)  # fmt: skip


if __name__ == "__main__":
    main()
