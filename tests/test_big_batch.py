"""A row's results do not depend on how many rows are stepped beside it, past 256 rows too (float32, CPU).

Until 2026-12-04 a float32 model stepped batches of up to 256 rows in C and larger ones with the torch ops
around the fused SSM steps, equal only to float32 rounding (5e-5 of the shipped text model's logits at 300
rows), so with `S4_MAX_BATCH_SIZE` over 256 a request's log-probabilities, and now and then its tokens,
changed with the load. Every batch now steps in C (bench.big_batch has the speeds): checked here in the
library (the step, the decode block, the prefill by steps; S4D + FF, S4 diagonalized and S4 in its DPLR
form) and through the server (320 rows at once against each prompt alone, log-probabilities compared
as floats). All of them fail on the code before."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from server_support import ServerThread

from bench.common import plain_block
from model import ModelConfig, SequenceModel
from server import Settings

B = 300  # past the old 256


def tiny(kernel: str, init: str, trained: bool) -> SequenceModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=24, n_layers=2, d_state=16, kernel=kernel, init=init, l_max=128,
                      d_ff=40, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg)
    if trained:  # a few steps move a LegS layer off its init, so that it diagonalizes
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        x = torch.randint(0, 64, (2, 65), generator=torch.Generator().manual_seed(3))
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(net(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


MODELS = {
    "s4d-ff": ("s4d", "diag-lin", False, "diagonal"),
    "s4-diagonalized": ("s4", "legs", True, "diagonal"),
    "s4-dplr": ("s4", "legs", False, "dplr"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def rec(request):
    kernel, init, trained, form = MODELS[request.param]
    r = tiny(kernel, init, trained).to_recurrent()
    assert {x["form"] for x in r.report} == {form}
    assert r._net_step is not None
    return r


def test_row_0_is_the_same_bits_alone_and_among_300_step_by_step(rec):
    tokens = torch.randint(0, 64, (B, 8), generator=torch.Generator().manual_seed(4))
    alone, crowd = rec.init_state(1), rec.init_state(B)
    for t in range(8):
        l1, alone = rec.step(tokens[:1, t], alone)
        lB, crowd = rec.step(tokens[:, t], crowd)
        assert torch.equal(lB[0], l1[0]), t
        assert torch.equal(crowd[:, 0], alone[:, 0]), t
    # the prefill by steps (a short prompt: the C recurrent form) too
    p1, s1 = rec.prefill(tokens[:1], rec.init_state(1))
    pB, sB = rec.prefill(tokens, rec.init_state(B))
    assert torch.equal(pB[0], p1[0]) and torch.equal(sB[:, 0], s1[:, 0])


def test_the_decode_block_serves_300_rows_with_row_0_as_alone(rec):
    assert rec.decode_block_ready(B) and rec.decode_block_ready(4096)
    K, V = 12, rec.config.vocab_size

    def block(n: int):
        state, tok = rec.init_state(n), torch.arange(n) % V
        res = plain_block(rec, K, state, tok)  # row r: temperature 1, seed r; K steps or RuntimeError
        return res.tokens[:, 0], state[:, 0]

    (t1, s1), (tB, sB) = block(1), block(B)
    assert torch.equal(tB, t1) and torch.equal(sB, s1)


@pytest.fixture(scope="module")
def big(model_dirs):
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_batch_size=320, max_sessions=320,
                        max_queued_requests=320)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def batch_steps_over(url: str, edge: str) -> float:
    """Decode steps so far that carried more rows than the histogram bucket `edge` (of tiny-text)."""
    count = bucket = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("s4_decode_batch_size_count{") and 'model="tiny-text"' in line:
            count = float(line.rsplit(" ", 1)[1])
        if line.startswith("s4_decode_batch_size_bucket{") and f'le="{edge}"' in line and "tiny-text" in line:
            bucket = float(line.rsplit(" ", 1)[1])
    return count - bucket


def test_through_the_server_320_rows_at_once_give_each_prompts_own_logprobs(big):
    """5 requests of 64 prompts each at once (greedy, log-probabilities of every token), against each prompt
    sent alone: the same tokens and the same log-probabilities, float for float."""
    prompts = [f"{k} to be or" for k in range(320)]
    body = {"model": "tiny-text", "max_tokens": 12, "temperature": 0, "logprobs": 1}

    async def crowd():
        async with httpx.AsyncClient(base_url=big.url, timeout=120) as c:
            parts = [prompts[i : i + 64] for i in range(0, 320, 64)]
            answers = await asyncio.gather(
                *(c.post("/v1/completions", json={**body, "prompt": p}) for p in parts)
            )
        choices = []
        for r in answers:
            assert r.status_code == 200, r.text[:300]
            choices += sorted(r.json()["choices"], key=lambda ch: ch["index"])
        return choices

    before = batch_steps_over(big.url, "256.0")
    together = asyncio.run(crowd())
    assert batch_steps_over(big.url, "256.0") - before > 0, "some decode step carried more than 256 rows"
    with httpx.Client(base_url=big.url, timeout=60) as c:
        for k in range(0, 320, 7):  # every 7th prompt alone (46 of them)
            r = c.post("/v1/completions", json={**body, "prompt": prompts[k]})
            alone = r.json()["choices"][0]
            assert together[k]["text"] == alone["text"], k
            assert together[k]["logprobs"]["token_logprobs"] == alone["logprobs"]["token_logprobs"], k


def test_the_benchmark_runs_and_finds_the_c_step_row_independent():
    """bench.big_batch's quick sizes (the tiny model, 8 and 300 rows): every figure positive, row 0 bit for
    bit alone and in the batch with the C step, and not with the torch ops at 300 rows."""
    from bench import big_batch

    (rows,) = big_batch.run(quick=True)["models"].values()
    assert [r["batch"] for r in rows] == [8, 300]
    for r in rows:
        assert all(v > 0 for part in ("step", "decode") for v in r[part]["tokens_per_s"].values())
        assert r["same_row_max_abs_diff"]["c"] == 0.0
    assert rows[1]["same_row_max_abs_diff"]["torch-ops"] > 0
