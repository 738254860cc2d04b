"""The prefix cache (server/prefix_cache.py, `S4_PREFIX_CACHE_MB`): time to the first token of requests
that share a long prefix, with the cache off (A: S4_PREFIX_CACHE_MB=0) and on (B: the default), two
servers up side by side, the requests alternated between them.

Per prefix length: a document of that many tokens (English text), then a short question that differs
from request to request ("\\nQ7: ..."), as an application asking several questions of one document or
sending one system prompt before each user's message does. Each request is `POST /v1/generate` with
max_new_tokens 1, so its latency is the prompt's ingestion and one step: its time to first token, through
the HTTP stack. First one warm-up request to each server with another document of the same length (so
that neither pays a first prefill at a new length), then misses: the document's first request (B stores
its prefixes: a miss, as A) and as many new documents after it (5 in all; quick 2), each sent to both
servers in an alternated order (A B, B A, ...), then `--requests` more questions after the document
alternated (B restores the longest stored prefix: the document's whole 256-token chunks, and ingests
the rest). Reported per length: the median latency of each, B ÷ A, the cached tokens B's usage
reported, and the misses' median latency of each (what storing the rows costs) and its B ÷ A.

Then prompts that arrive `together` and share a new document of 8,000 tokens (nothing stored), 4
times to each server alternated after a warm-up: `samples`, n = 8 samples of one prompt (POST
/v1/completions, max_tokens 1); `questions`, 8 requests sent at once, the document and a question each.
With the cache on, the first ingests the document and the other 7 wait and start from its state.

Then which rows stay when the budget is short (`documents`): `--documents` documents (12 of 8,000
tokens: 32 rows each, 384 in all, beyond the default budget's 256 rows of the shipped model; the quick
run's 3 of 600 tokens in a budget of 4 rows), each asked a new short question in turn, `--rounds`
rounds (4), with every chunk's row kept (A: S4_PREFIX_CACHE_RETENTION_INTERVAL = the chunk, least
recently used eviction alone, as before kept and spare rows) and with the default (B: only a prompt's
last whole chunk and its junction kept, the other rows spare), each request sent to both servers in
turn. Reported: the share of prompt tokens each served from its cache, and its median time to the first
token in the rounds after the first.

    python -m bench.prefix_cache [--quick] [--requests N] [--documents N] [--rounds N]
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import bench_main, ranged, save_figure, subplots  # noqa: E402
from bench.server import checkpoint  # noqa: E402
from bench.tail_latency import long_text  # noqa: E402
from model import load  # noqa: E402
from server import launch  # noqa: E402
from server.config import Settings  # noqa: E402

NAME = "prefix_cache"
LENGTHS = {False: (1024, 4096, 8000), True: (64, 300)}
REQUESTS = {False: 16, True: 3}
MISSES = {False: 5, True: 2}  # a length's misses: the document's first request and new documents after it
ARMS = {"A": {"S4_PREFIX_CACHE_MB": "0"}, "B": {}}  # B: the default budget
DOCUMENTS = {False: (12, 8000, 4), True: (3, 600, 2)}  # documents, their tokens, rounds
QUICK_ROWS = 4  # the quick run's budget, in state rows
TOGETHER = {False: (8, 8000, 4), True: (3, 300, 1)}  # n, the document's tokens, requests


def one(client: httpx.Client, model: str, prompt: str) -> tuple[float, dict]:
    """Latency (ms) of a 1-token generation of `prompt` (on the client's open connection: a new client
    costs ~20 ms here, ten times the server's answer to a short prompt), and its usage."""
    body = {"model": model, "prompt": prompt, "max_new_tokens": 1, "seed": 0}
    t0 = time.perf_counter()
    r = client.post("/v1/generate", json=body)
    ms = (time.perf_counter() - t0) * 1e3
    r.raise_for_status()
    return ms, r.json()["usage"]


@contextlib.contextmanager
def servers(ckpt: Path, arms: dict[str, dict[str, str]]) -> Iterator[dict[str, httpx.Client]]:
    """One server of `ckpt` per arm (name → its S4_* environment), all up together; a client on an open
    connection to each. Stopped (and the clients closed) on the way out."""
    started: dict[str, tuple] = {}
    clients: dict[str, httpx.Client] = {}
    try:
        for name, env in arms.items():
            started[name] = launch.start_server(["--checkpoints", str(ckpt)], timeout_s=300, env=env)
            clients[name] = httpx.Client(base_url=started[name][1], timeout=300)
        yield clients
    finally:
        for client in clients.values():
            client.close()
        for proc, _ in started.values():
            proc.terminate()
            proc.wait(30)


def run(quick: bool, requests: int | None = None) -> dict[str, Any]:
    n = requests or REQUESTS[quick]
    out: dict[str, Any] = {"requests": n, "lengths": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, what = checkpoint(quick, Path(tmp))
        model = ckpt.name
        out["model"] = what
        with servers(ckpt, ARMS) as urls:
            text = long_text((1 + MISSES[quick]) * max(LENGTHS[quick]))
            for L in LENGTHS[quick]:
                # (headed by their length: no document shares a chunk with another length's)
                doc, other, *new = (
                    f"{head} {L}:\n{text[k * L : (k + 1) * L]}"[:L]
                    for k, head in enumerate(("Doc", "Other", *(f"New {j}" for j in range(1, MISSES[quick]))))
                )
                for name in ARMS:  # warm-up: another document of this length
                    one(urls[name], model, other + "\nQ0: who?\nA:")
                # misses: the document's first request, then new documents, each to both servers in an
                # alternated order (the first requests alone, A's always first, were one sample in a fixed
                # order: B's, right after A's, came out 2-11 % slower in every committed run)
                miss: dict[str, list[float]] = {"A": [], "B": []}
                for j, d in enumerate([doc, *new]):
                    for name in ("A", "B") if j % 2 == 0 else ("B", "A"):
                        miss[name].append(one(urls[name], model, d + "\nQ0: who?\nA:")[0])
                first = {name: v[0] for name, v in miss.items()}
                ms: dict[str, list[float]] = {"A": [], "B": []}
                cached = []
                for i in range(1, n + 1):
                    for name in ("A", "B") if i % 2 else ("B", "A"):
                        t, usage = one(urls[name], model, doc + f"\nQ{i}: what of line {i}?\nA:")
                        ms[name].append(t)
                        if name == "B":
                            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
                med = {k: statistics.median(v) for k, v in ms.items()}
                missed = {k: statistics.median(v) for k, v in miss.items()}
                out["lengths"][str(L)] = {
                    "ms": ms, "first_ms": first, "median_ms": med, "b_over_a": med["B"] / med["A"],
                    "cached_tokens": cached, "miss_ms": miss, "miss_median_ms": missed,
                    "miss_b_over_a": missed["B"] / missed["A"],
                }  # fmt: skip
                print(f"prefix {L} tokens: cache off {med['A']:.1f} ms, on {med['B']:.1f} ms "
                      f"({med['A'] / med['B']:.1f}x faster; cached {statistics.median(cached):.0f} tokens); "
                      f"a miss (median of {len(miss['A'])}) {missed['A']:.1f} / {missed['B']:.1f} ms",
                      flush=True)  # fmt: skip
            out["together"] = together(quick, urls, model)
    return out


def together(quick: bool, clients: dict[str, httpx.Client], model: str) -> dict[str, Any]:
    """Prompts that arrive together and share their start, a new document each time (nothing stored):
    `samples`, n samples of one prompt (POST /v1/completions, max_tokens 1); `questions`, n requests at
    once (POST /v1/generate from n threads, max_new_tokens 1), each the document and its own question.
    With the cache on, the first ingests the document and the others start from the state it stored.
    Latency: of the request (`samples`), of the last answer (`questions`)."""
    n, length, requests = TOGETHER[quick]
    text = long_text(2 * (requests + 1) * length)
    out: dict[str, Any] = {"n": n, "tokens": length}
    pool = concurrent.futures.ThreadPoolExecutor(n)

    def samples(client: httpx.Client, doc: str) -> None:
        body = {"model": model, "prompt": doc, "n": n, "max_tokens": 1, "seed": 0}
        client.post("/v1/completions", json=body).raise_for_status()

    def questions(client: httpx.Client, doc: str) -> None:
        asked = [pool.submit(one, client, model, doc + f"\nQ{q}: what of line {q}?\nA:") for q in range(n)]
        for f in asked:
            f.result()

    try:
        for w, (name_, send) in enumerate((("samples", samples), ("questions", questions))):
            ms: dict[str, list[float]] = {"A": [], "B": []}
            for i in range(requests + 1):  # the first: a warm-up of each server at this many rows and length
                k = w * (requests + 1) + i
                doc = f"Together {k}:\n{text[k * length : (k + 1) * length]}"[:length]
                for name in ("A", "B") if i % 2 else ("B", "A"):
                    t0 = time.perf_counter()
                    send(clients[name], doc)
                    if i:
                        ms[name].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in ms.items()}
            out[name_] = {"ms": ms, "median_ms": med, "b_over_a": med["B"] / med["A"]}
            print(f"{n} {name_} of a {length}-token document together: cache off {med['A']:.1f} ms, on "
                  f"{med['B']:.1f} ms ({med['A'] / med['B']:.1f}x faster)", flush=True)  # fmt: skip
    finally:
        pool.shutdown()
    return out


def row_bytes(ckpt: Path) -> int:
    """Bytes of one session's state (a pool slot, a prefix cache row) of the model at `ckpt`."""
    state = load(ckpt).eval().to_recurrent().init_state(1)
    return state.numel() * state.element_size()


def documents(quick: bool, n_docs: int | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Many documents, each asked a short question in turn, in a budget shorter than all their rows:
    every chunk kept (A) against the default retention (B). See the module docstring."""
    d0, length, r0 = DOCUMENTS[quick]
    n_docs, rounds = n_docs or d0, rounds or r0
    if rounds < 2:  # (the figure is the time to first token in the rounds after the first)
        raise ValueError(f"documents need at least 2 rounds, got {rounds}")
    out: dict[str, Any] = {"documents": n_docs, "tokens": length, "rounds": rounds}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, what = checkpoint(quick, Path(tmp))
        out["model"] = what
        mb = (QUICK_ROWS + 0.5) * row_bytes(ckpt) / (1 << 20)
        budget = {"S4_PREFIX_CACHE_MB": f"{mb:.6f}"} if quick else {}
        chunk = str(Settings().prefill_chunk_tokens)
        arms = {"A": {**budget, "S4_PREFIX_CACHE_RETENTION_INTERVAL": chunk}, "B": budget}
        with servers(ckpt, arms) as clients:
            text = long_text((n_docs + 1) * length)
            docs = [f"Doc {k}:\n{text[k * length : (k + 1) * length]}"[:length] for k in range(n_docs + 1)]
            for name in arms:  # warm-up: a document no round asks, so that neither pays a first prefill
                one(clients[name], ckpt.name, docs[-1] + "\nQ0: who?\nA:")
            runs = {name: {"ms": [], "cached": [], "prompt": []} for name in arms}
            for r in range(rounds):
                for k, doc in enumerate(docs[:-1]):
                    for name in ("A", "B") if (r * n_docs + k) % 2 == 0 else ("B", "A"):
                        question = f"\nQ{r + 1}: what of line {r + 1}?\nA:"
                        t, usage = one(clients[name], ckpt.name, doc + question)
                        runs[name]["ms"].append(t)
                        runs[name]["cached"].append(usage["prompt_tokens_details"]["cached_tokens"])
                        runs[name]["prompt"].append(usage["prompt_tokens"])
            for run_ in runs.values():
                later = run_["ms"][n_docs:]
                run_["cached_share"] = sum(run_["cached"]) / sum(run_["prompt"])
                run_["hits"] = sum(c > 0 for c in run_["cached"])
                run_["later_median_ms"] = statistics.median(later) if later else None
            out["arms"] = runs
            a, b = runs["A"], runs["B"]
            print(f"{n_docs} documents of {length} tokens, {rounds} rounds: prompt tokens from the cache "
                  f"{a['cached_share']:.0%} with every chunk kept, {b['cached_share']:.0%} with the default "
                  f"({a['hits']} / {b['hits']} hits of {n_docs * rounds}); time to first token after the "
                  f"first round {a['later_median_ms']:.1f} / {b['later_median_ms']:.1f} ms",
                  flush=True)  # fmt: skip
    return out


def plot(data: dict[str, Any], quick: bool) -> None:
    fig, (ax, ax2, ax3) = subplots(3, width=6)
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
    ax.set_title(f"{data['requests']} requests a length")
    doc = data["documents"]
    arms = doc["arms"]
    for name, label in (("A", "every chunk's row kept"), ("B", "default: kept and spare rows")):
        ax2.plot(range(1, len(arms[name]["ms"]) + 1), arms[name]["ms"], "o-", ms=3, label=label)
    ax2.set_xlabel(f"request ({doc['documents']} documents in turn, {doc['rounds']} rounds)")
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_yscale("log")
    ax2.legend()
    ax2.set_title(f"budget shorter than the documents' {doc['tokens']}-token rows")
    tog = data["together"]
    kinds = ("samples", "questions")
    for k, (name, label) in enumerate((("A", "prefix cache off"), ("B", "prefix cache on"))):
        ax3.bar([i + (k - 0.5) * 0.4 for i in range(2)], [tog[w]["median_ms"][name] for w in kinds],
                width=0.4, label=label)  # fmt: skip
    ax3.set_xticks([0, 1], [f"n = {tog['n']} samples of a prompt", f"{tog['n']} questions at once"])
    ax3.set_ylabel("latency, median (ms)")
    ax3.set_title(f"prompts together, a new {tog['tokens']}-token document")
    ax3.legend()
    save_figure(fig, NAME, quick, f"Prefix cache: {data['model']}")


def main(argv=None) -> None:
    opts: dict[str, Any] = {}

    def arguments(p):
        p.add_argument("--requests", type=ranged(int, 1), default=None,
                       help="alternated requests per length and server, ≥ 1")  # fmt: skip
        p.add_argument("--documents", type=ranged(int, 1), default=None,
                       help="documents asked in turn, ≥ 1 (12; quick 3)")  # fmt: skip
        p.add_argument("--rounds", type=ranged(int, 2), default=None,
                       help="questions to each document, ≥ 2: the figure is the rounds after the first "
                       "(4; quick 2)")  # fmt: skip

    def configure(args) -> bool:
        opts.update(requests=args.requests, documents=args.documents, rounds=args.rounds)
        return True

    def both(quick: bool) -> dict[str, Any]:
        out = run(quick, opts["requests"])
        return {**out, "documents": documents(quick, opts["documents"], opts["rounds"])}

    bench_main(argv, __doc__, NAME, both, plot, arguments=arguments, configure=configure)


if __name__ == "__main__":
    main()
