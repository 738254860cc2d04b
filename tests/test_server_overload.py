"""Overload: at 4x the configured capacity the server refuses the excess with 429 + Retry-After (HTTP)
or an error frame with code 429 and retry_after (WebSocket), counts every refusal in /metrics, the
admitted requests complete exactly, and once the load drops everything is admitted again."""

import asyncio
import json

import httpx
from server_support import ServerThread, reference, steps_held_until, wait_for
from websockets.asyncio.client import connect

from model.sampling import SamplingParams

TEXT = "tiny-text"
CAPACITY = 4


def _rejections(client: httpx.Client) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("s4_rejections_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _ws_turn(url: str, seed: int) -> dict:
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "to be", "max_new_tokens": 48,
                                  "seed": seed}))  # fmt: skip
        tokens = []
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "error":
                return {"status": msg["code"], "retry_after": msg.get("retry_after"), "seed": seed}
            if msg["type"] == "token":
                tokens += msg["ids"]
            if msg["type"] == "done":
                return {"status": 200, "tokens": tokens, "seed": seed}


async def _http_turn(client: httpx.AsyncClient, seed: int) -> dict:
    body = {"model": TEXT, "prompt": "to be", "max_new_tokens": 48, "seed": seed}
    r = await client.post("/v1/generate", json=body)
    out = {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "seed": seed}
    if r.status_code == 200:
        out["tokens"] = r.json()["tokens"]
    return out


async def _burst(s: ServerThread, n: int, first_seed: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=s.url, timeout=60) as client:
        jobs = [
            _ws_turn(s.ws_url, first_seed + i) if i % 2 else _http_turn(client, first_seed + i)
            for i in range(n)
        ]
        return await asyncio.gather(*jobs)


def test_4x_capacity_is_shed_with_429_counted_and_the_server_recovers(model_dirs, monkeypatch):
    from server import Settings

    settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=CAPACITY, max_batch_size=CAPACITY,
                        max_queued_requests=CAPACITY, drain_timeout_s=1)  # fmt: skip
    s = ServerThread(settings).start()
    try:
        engine = s.state.models[TEXT].engine
        # The burst overlaps whatever the machine's speed: the admitted turns wait at their first step until
        # every request of the burst has been taken (its job submitted) or refused. (Each admitted turn
        # slept 2 ms a step instead, and the burst overlapped if its requests came faster than 48 steps: a
        # slow or loaded machine's client could send them slower, each served before the next came.)
        burst = 4 * CAPACITY
        steps_held_until(monkeypatch, engine, burst, refusals=True)
        monkeypatch.setattr(engine.rec, "decode_block_ready", lambda batch: False)  # no native block
        with httpx.Client(base_url=s.url, timeout=60) as client:
            before = _rejections(client)
            results = asyncio.run(_burst(s, burst, 100))
            ok = [r for r in results if r["status"] == 200]
            refused = [r for r in results if r["status"] != 200]
            # as many admitted as there are sessions (one a turn: no more can be), every other one refused
            assert len(ok) == CAPACITY and len(refused) == burst - CAPACITY, [r["status"] for r in results]
            assert all(r["status"] == 429 and int(r["retry_after"]) >= 1 for r in refused), refused
            for r in ok:  # the admitted turns are exact
                want = reference(model_dirs["text"], list(b"to be"), SamplingParams(seed=r["seed"]), 48)
                assert r["tokens"] == want
            assert _rejections(client) - before == len(refused)
            # the load drops: capacity is back (slots freed by finished turns and closed sockets)
            assert wait_for(lambda: engine.pool.in_use == 0, 10)
            again = asyncio.run(_burst(s, CAPACITY, 200))
            assert [r["status"] for r in again] == [200] * CAPACITY
    finally:
        s.stop()
