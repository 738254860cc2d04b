"""Load for the sanitizer check (scripts/sanitize-c): many concurrent WebSocket sessions on a running server,
their batch growing and shrinking through every tile and vector width of the C step (1 … `--sessions` rows),
with mixed sampling settings (plain temperature, top-k, top-p, min-p, repetition penalty, stops), some
cancelled mid-block, some continued (`append`), and OpenAI completions with logprobs, logit_bias and the
presence and frequency penalties. Exits 1 when a request gets anything but its answer or a 4xx-style error
frame it provoked (the check's point is the server's own stderr: a sanitizer report aborts it).

    .venv/bin/python scripts/sanitize_load.py --port 19000 --sessions 40 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import httpx
import websockets


async def ws_session(url: str, model: str, kind: str, rng: random.Random, rounds: int, problems: list) -> int:
    """One socket: `rounds` generations (a cancelled one, a continued one, mixed settings). Returns tokens."""
    tokens = 0
    async with websockets.connect(url, max_size=None) as ws:
        session = None
        for _ in range(rounds):
            msg: dict = {"type": "generate", "max_new_tokens": rng.choice([1, 2, 7, 8, 9, 33, 120])}
            if session is not None and rng.random() < 0.5:
                msg["session_id"] = session
            else:
                msg["model"] = model
                if kind == "text":
                    msg["prompt"] = rng.choice(["ROMEO:", "To be", "", "a" * rng.randint(1, 300)])
            pick = rng.random()
            if pick < 0.3:
                msg["temperature"] = rng.choice([0.0, 0.5, 1.0, 1.7])
            elif pick < 0.7:
                msg.update(
                    top_k=rng.choice([1, 5, 40, 255, 256, 1000]),
                    top_p=rng.choice([1e-6, 0.5, 0.9, 1.0]),
                    min_p=rng.choice([0.0, 0.05]),
                    repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
                )
            if kind == "text" and rng.random() < 0.3:
                msg["stop"] = [rng.choice(["e", "\n", "the", "ROMEO"])]
            msg["seed"] = rng.randrange(2**32)
            await ws.send(json.dumps(msg))
            cancel_after = rng.choice([None, None, 1, 2])
            frames = 0
            while True:
                raw = await ws.recv()
                frame = None if isinstance(raw, bytes) else json.loads(raw)
                if frame is None or frame["type"] == "token":  # (audio: a binary frame of samples)
                    frames += 1
                    tokens += len(raw) if frame is None else len(frame["ids"])
                    if cancel_after is not None and frames == cancel_after:
                        await ws.send(json.dumps({"type": "cancel"}))
                    continue
                if frame["type"] == "session":
                    session = frame["session_id"]
                elif frame["type"] == "done":
                    break
                elif frame["type"] == "error":  # (server/errors.py: {"type", "code", "message"})
                    code = frame.get("code")
                    if not isinstance(code, int) or code >= 500:
                        problems.append(frame)
                    break
            if rng.random() < 0.2:
                await asyncio.sleep(rng.random() * 0.3)  # rows leave and join at other moments
    return tokens


async def completion(base: str, model: str, rng: random.Random, problems: list) -> None:
    body = {
        "model": model, "prompt": "ROMEO:", "max_tokens": rng.choice([1, 9, 40]), "seed": rng.randrange(9**9),
        "logprobs": rng.choice([0, 1, 5]), "presence_penalty": rng.choice([0.0, 1.5]),
        "frequency_penalty": rng.choice([0.0, -0.5, 2.0]), "logit_bias": {"101": 5.0, "10": -100},
    }  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(base + "/v1/completions", json=body)
        if r.status_code >= 500:
            problems.append({"status": r.status_code, "body": r.text[:500]})


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sessions", type=int, default=40, help="concurrent sockets per model")
    ap.add_argument("--rounds", type=int, default=3, help="generations per socket")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base, url = f"http://127.0.0.1:{args.port}", f"ws://127.0.0.1:{args.port}/v1/stream"
    async with httpx.AsyncClient(timeout=60) as client:
        models = (await client.get(base + "/v1/models")).json()["data"]
    rng = random.Random(args.seed)
    problems: list = []
    jobs = []
    for m in models:
        kind = "text" if m["id"].startswith("text") else "audio"
        for _ in range(args.sessions):
            jobs.append(ws_session(url, m["id"], kind, random.Random(rng.random()), args.rounds, problems))
        if kind == "text":
            jobs += [completion(base, m["id"], random.Random(rng.random()), problems) for _ in range(8)]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    made = sum(r for r in results if isinstance(r, int))
    report = {"models": [m["id"] for m in models], "requests": len(jobs), "tokens": made,
              "exceptions": [repr(e) for e in errors[:5]], "server_errors": problems[:5]}  # fmt: skip
    print(json.dumps(report))
    return 1 if errors or problems else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
