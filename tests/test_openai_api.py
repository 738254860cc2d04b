"""The OpenAI-compatible API through the official `openai` client against a real server: every
completions field (plain and streamed), chat with a checkpoint's template, the models routes, and the
refusals. Log-probabilities are checked against log_softmax of the recurrent form's logits (1e-4)."""

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from server_support import (
    ServerThread,
    _rec,
    chat_copy,
    reference,
    refusal_status,
    slots_settled,
    wait_for,
    ws_turn,
)
from websockets.sync.client import connect

from model.sampling import SamplingParams, sample
from server.routes.openai import choice_seed

TEXT, AUDIO = "tiny-text", "tiny-audio"
PROMPT = "to take arms"
LP_TOL = 1e-4


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def ids_of(text: str) -> list[int]:
    return list(text.encode())


def model_logprobs(model_dir, prompt: list[int], generated: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax of the recurrent form's logits (float64): for every prompt position (predicting the
    next prompt token) and for every generated token (the distribution it was sampled from)."""
    rec = _rec(model_dir)
    with torch.no_grad():
        logits, state = rec.prefill(torch.tensor([prompt]), rec.init_state(1))
        prompt_lp = logits[0].double().log_softmax(-1)  # (L, V): row i predicts token i + 1
        rows = [prompt_lp[-1]]
        for t in generated[:-1]:
            step, state = rec.step(torch.tensor([t]), state)
            rows.append(step[0].double().log_softmax(-1))
    return prompt_lp, torch.stack(rows)


def reference_with(model_dir, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    """Like server_support.reference, also counting the generated tokens (presence/frequency)."""
    rec = _rec(model_dir)
    logits, state = rec.prefill(torch.tensor([prompt]), rec.init_state(1))
    logits = logits[:, -1]
    gen = params.generator()
    V = rec.config.vocab_size
    seen = torch.zeros(1, V, dtype=torch.bool)
    seen[0, prompt] = True
    counts = torch.zeros(1, V)
    out: list[int] = []
    for _ in range(n):
        tok = sample(logits, [params], [gen], seen, counts)
        out.append(int(tok))
        seen[0, tok] = True
        counts[0, tok] += 1
        logits, state = rec.step(tok, state)
    return out


# --- models -----------------------------------------------------------------------------------------


def test_models_list_and_retrieve_carry_created_and_owned_by(oai, model_dirs):
    listed = {m.id: m for m in oai.models.list().data}
    assert set(listed) == {TEXT, AUDIO}
    for mid, m in listed.items():
        assert m.object == "model" and m.owned_by == "s4serve"
        mtime = int((model_dirs["text" if mid == TEXT else "audio"] / "model.safetensors").stat().st_mtime)
        assert m.created == mtime
        got = oai.models.retrieve(mid)
        assert got.id == mid and got.created == m.created and got.owned_by == m.owned_by
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("no-such-model")
    assert "no-such-model" in e.value.message


def test_model_routes_are_503_while_draining(client, server):
    server.state.draining = True
    try:
        for path in (f"/v1/models/{TEXT}",):
            r = client.get(path)
            assert r.status_code == 503 and "Retry-After" in r.headers
        r = client.post("/v1/completions", json={"model": TEXT, "prompt": "a"})
        assert r.status_code == 503
    finally:
        server.state.draining = False
    assert client.get(f"/v1/models/{TEXT}").json()["id"] == TEXT


def test_openapi_documents_the_openai_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}"]:
        assert p in paths, p
    props = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    for f in [
        "logprobs",
        "echo",
        "n",
        "best_of",
        "logit_bias",
        "presence_penalty",
        "stream_options",
        "min_p",
    ]:
        assert f in props, f


# --- completions: the sampled tokens ----------------------------------------------------------------


def test_completion_with_seed_matches_the_library_and_generate(oai, client, model_dirs):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=20, seed=5, temperature=0.8, top_p=0.9)
    want = reference(
        model_dirs["text"], ids_of(PROMPT), SamplingParams(temperature=0.8, top_p=0.9, seed=5), 20
    )
    assert r.choices[0].text == bytes(want).decode("utf-8", errors="replace")
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 20, 32)


def test_logprobs_are_the_models_log_softmax_with_top_k_and_offsets(oai, model_dirs):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=24, seed=3, temperature=0.7, logprobs=5)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 24
    gen = [ord(t) if not t.startswith("bytes:") else int(t[-2:], 16) for t in lp.tokens]
    want = reference(model_dirs["text"], ids_of(PROMPT), SamplingParams(temperature=0.7, seed=3), 24)
    assert gen == want  # the tokens are the ones sampled
    _, rows = model_logprobs(model_dirs["text"], ids_of(PROMPT), gen)
    for i, t in enumerate(gen):
        assert lp.token_logprobs[i] == pytest.approx(float(rows[i, t]), abs=LP_TOL)
        top = rows[i].topk(5)
        got = lp.top_logprobs[i]
        assert len(got) == 5 + (t not in top.indices.tolist()) and got[lp.tokens[i]] == lp.token_logprobs[i]
        for v, j in zip(top.values.tolist(), top.indices.tolist()):
            key = chr(j) if j < 128 else f"bytes:\\x{j:02x}"
            assert got[key] == pytest.approx(v, abs=LP_TOL)
    text = c.text
    for i, off in enumerate(lp.text_offset):  # each token starts at its offset in the returned text
        if gen[i] < 128:
            assert text[off] == chr(gen[i])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_logprobs_zero_gives_the_sampled_tokens_only_and_twenty_is_allowed(oai):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=4, seed=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=4, seed=3, logprobs=20)
    lp = r.choices[0].logprobs
    assert all(len(top) in (20, 21) and top[t] == v for t, v, top in zip(lp.tokens, lp.token_logprobs,
                                                                            lp.top_logprobs))  # fmt: skip


def key_of(t: int) -> str:
    return chr(t) if t < 128 else f"bytes:\\x{t:02x}"


def test_completion_top_logprobs_always_hold_the_token_itself_and_chat_s_only_the_top_k(
    oai, chat_server, model_dirs
):
    """OpenAI's reference for the legacy completions: "the API will always return the logprob of the
    sampled token, so there may be up to logprobs+1 elements" (vLLM does). Ours held the top k alone:
    `logprobs=0` gave [{}, …] and a token outside the top k was missing from its dict (an audit). Now each
    dict is the model's top k plus the token itself (an echoed prompt token too), streamed or not; chat's
    top_logprobs stay exactly the top k. 'z' is forced by logit_bias, which the logprobs are taken before,
    so the token is often not the model's most likely."""
    forced = {"logit_bias": {str(ord("z")): 100}}
    for k in (0, 1):
        r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=6, logprobs=k, echo=True, **forced)
        lp = r.choices[0].logprobs
        ids = ids_of(PROMPT) + [ord("z")] * 6
        assert "".join(lp.tokens) == PROMPT + "z" * 6 and lp.top_logprobs[0] is None
        prompt_lp, rows = model_logprobs(model_dirs["text"], ids_of(PROMPT), [ord("z")] * 6)
        dists = torch.cat([prompt_lp[:-1], rows])  # the distribution each token after the first came from
        outside = 0
        for i, top in enumerate(lp.top_logprobs[1:]):
            want = {key_of(j): v for v, j in zip(*dists[i].topk(k))}  # the model's top k ...
            want[key_of(ids[i + 1])] = dists[i, ids[i + 1]]  # ... and the token itself
            assert top.keys() == want.keys(), (k, i, top, want)
            assert top == pytest.approx({key: float(v) for key, v in want.items()}, abs=LP_TOL)
            assert top[lp.tokens[i + 1]] == lp.token_logprobs[i + 1]
            outside += len(top) == k + 1
        assert outside >= 6 if k == 0 else outside >= 1  # (k + 1 entries: the token was not in the top k)
        chunks = list(oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=6, logprobs=k, echo=True,
                                             stream=True, **forced))  # fmt: skip
        streamed = [top for c in chunks for x in c.choices if x.logprobs for top in x.logprobs.top_logprobs]
        assert streamed == lp.top_logprobs
    s, _ = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        for k in (0, 1):
            r = c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, logprobs=True,
                                          top_logprobs=k, **forced)  # fmt: skip
            content = r.choices[0].logprobs.content
            assert [e.token for e in content] == ["z"] * 6 and all(len(e.top_logprobs) == k for e in content)


def test_echo_returns_the_prompt_with_its_logprobs(oai, model_dirs):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=6, seed=1, echo=True, logprobs=3)
    plain = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=6, seed=1)
    c = r.choices[0]
    assert c.text == PROMPT + plain.choices[0].text
    lp = c.logprobs
    n = len(PROMPT)
    assert "".join(lp.tokens[:n]) == PROMPT and lp.text_offset[:n] == list(range(n))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    prompt_lp, _ = model_logprobs(model_dirs["text"], ids_of(PROMPT), [])
    for i in range(1, n):
        assert lp.token_logprobs[i] == pytest.approx(float(prompt_lp[i - 1, ord(PROMPT[i])]), abs=LP_TOL)
        in_top = ord(PROMPT[i]) in prompt_lp[i - 1].topk(3).indices.tolist()
        assert (
            len(lp.top_logprobs[i]) == 3 + (not in_top)
            and lp.top_logprobs[i][PROMPT[i]] == lp.token_logprobs[i]
        )
    assert lp.text_offset[n] == n and len(lp.tokens) == n + 6
    # max_tokens=0 with echo scores the prompt alone
    s = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert s.choices[0].text == PROMPT and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n], abs=1e-6)
    one = oai.completions.create(model=TEXT, prompt="t", max_tokens=0, echo=True, logprobs=2).choices[0]
    assert one.text == "t" and one.logprobs.token_logprobs == [None] and one.logprobs.text_offset == [0]
    e = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=3, seed=1, echo=True)
    assert e.choices[0].text == PROMPT + plain.choices[0].text[:3] and e.choices[0].logprobs is None


def test_prompt_logprobs_across_prefill_chunks(oai, model_dirs, server):
    """A prompt longer than a prefill chunk (256 tokens): every position's log-probability."""
    long = ("to be, or not to be, that is the question: " * 20)[
        : server.state.settings.prefill_chunk_tokens * 2 + 37
    ]
    r = oai.completions.create(model=TEXT, prompt=long, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    prompt_lp, _ = model_logprobs(model_dirs["text"], ids_of(long), [])
    want = prompt_lp[torch.arange(len(long) - 1), torch.tensor(ids_of(long)[1:])]
    assert len(lp.token_logprobs) == len(long) and lp.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), want, atol=LP_TOL)


def test_concurrent_plain_and_biased_requests_each_match_the_library(server, model_dirs):
    """Plain rows and rows with logit_bias / penalties decoded in the same batches."""
    from concurrent.futures import ThreadPoolExecutor

    reqs = [
        ({}, SamplingParams(seed=21)),
        ({"logit_bias": {"32": -3}}, SamplingParams(seed=22, logit_bias={32: -3.0})),
        ({}, SamplingParams(seed=23)),
        ({"frequency_penalty": 1.0}, SamplingParams(seed=24, frequency_penalty=1.0)),
    ]

    def one(extra, params):
        body = {"model": TEXT, "prompt": PROMPT, "max_tokens": 60, "seed": params.seed, **extra}
        return post(server, "/v1/completions", body).json()["choices"][0]["text"]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda a: one(*a), reqs))
    for text, (_, params) in zip(got, reqs):
        want = reference_with(model_dirs["text"], ids_of(PROMPT), params, 60)
        assert text == bytes(want).decode("utf-8", errors="replace"), params


def test_n_choices_are_independent_and_seeded_per_choice(oai, model_dirs):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=16, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) == 3  # independent samples
    for i, t in enumerate(texts):
        want = reference(model_dirs["text"], ids_of(PROMPT), SamplingParams(seed=choice_seed(11, i)), 16)
        assert t == bytes(want).decode("utf-8", errors="replace")
    again = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=16, seed=11, n=3)
    assert [c.text for c in again.choices] == texts  # reproducible
    assert r.usage.prompt_tokens == 12 and r.usage.completion_tokens == 48


def test_a_negative_seed_is_openais_and_keys_its_own_generator(oai, chat_server, model_dirs):
    """OpenAI takes any int64 seed; ours refused a negative one (400 naming seed; an audit). A negative
    seed s now samples with the 64-bit key s + 2^64 (its two's complement), no other seed's key: -1 is
    2^64 - 1, not 2^63 - 1 nor 1; the same seed gives the same tokens, choice i > 0 its derived seed."""
    kw = dict(model=TEXT, prompt=PROMPT, max_tokens=24, temperature=1.0)

    def texts(seed: int, n: int = 1) -> list[str]:
        return [c.text for c in oai.completions.create(**kw, seed=seed, n=n).choices]

    def want(key: int) -> str:
        ids = reference(model_dirs["text"], ids_of(PROMPT), SamplingParams(seed=key), 24)
        return bytes(ids).decode("utf-8", errors="replace")

    for seed in (-1, -(2**63), -12345):
        got = texts(seed, n=2)
        assert got == texts(seed, n=2), seed  # the same seed, the same tokens
        assert got[0] == want(seed + 2**64) and got[1] == want(choice_seed(seed + 2**64, 1)), seed
    assert len({texts(s)[0] for s in (-1, 2**63 - 1, 1, -2)}) == 4  # each seed its own stream
    s, _ = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        chat = dict(model="tiny-chat", messages=MESSAGES, max_tokens=8, seed=-7)
        assert c.chat.completions.create(**chat).choices[0].message.content == (
            c.chat.completions.create(**chat).choices[0].message.content
        )


def test_best_of_returns_the_n_of_highest_mean_logprob(oai, model_dirs):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=10, seed=2, n=2, best_of=5)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 50  # five sampled
    scored = []
    for i in range(5):
        gen = reference(model_dirs["text"], ids_of(PROMPT), SamplingParams(seed=choice_seed(2, i)), 10)
        _, rows = model_logprobs(model_dirs["text"], ids_of(PROMPT), gen)
        mean = float(rows[torch.arange(10), torch.tensor(gen)].mean())
        scored.append((mean, bytes(gen).decode("utf-8", errors="replace")))
    best = [t for _, t in sorted(scored, key=lambda x: -x[0])[:2]]
    assert [c.text for c in r.choices] == best


def test_logit_bias_changes_the_distribution(oai, model_dirs):
    base = dict(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0)
    free = oai.completions.create(**base).choices[0].text
    assert "e" in free  # greedy text says "e" ...
    banned = oai.completions.create(**base, logit_bias={"101": -100}).choices[0].text
    assert "e" not in banned  # ... and never with a bias of -100 on it
    forced = oai.completions.create(**base, logit_bias={"122": 100}).choices[0].text
    assert forced == "z" * 40
    params = SamplingParams(temperature=0.9, seed=4, logit_bias={101: -5.0, 32: 2.5})
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=30, temperature=0.9, seed=4,
                               logit_bias={"101": -5, "32": 2.5})  # fmt: skip
    assert r.choices[0].text == bytes(reference(model_dirs["text"], ids_of(PROMPT), params, 30)).decode(
        "utf-8", errors="replace"
    )


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)])
def test_presence_and_frequency_penalties(oai, model_dirs, presence, frequency):
    r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=30, seed=6, temperature=0.8,
                               presence_penalty=presence, frequency_penalty=frequency)  # fmt: skip
    params = SamplingParams(temperature=0.8, seed=6, presence_penalty=presence, frequency_penalty=frequency)
    want = reference_with(model_dirs["text"], ids_of(PROMPT), params, 30)
    assert r.choices[0].text == bytes(want).decode("utf-8", errors="replace")
    plain = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=30, seed=6, temperature=0.8)
    assert plain.choices[0].text != r.choices[0].text  # it took effect


def test_greedy_frequency_penalty_stops_a_repeated_token(oai):
    free = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    pen = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0, frequency_penalty=2,
                                 presence_penalty=2).choices[0].text  # fmt: skip
    assert max(pen.count(ch) for ch in set(pen)) < max(free.count(ch) for ch in set(free))


def test_vllm_extensions_top_k_min_p_repetition_penalty(oai, model_dirs):
    for extra, params in [
        ({"top_k": 3}, SamplingParams(top_k=3, seed=8)),
        ({"top_k": -1}, SamplingParams(seed=8)),
        ({"min_p": 0.2}, SamplingParams(min_p=0.2, seed=8)),
        ({"repetition_penalty": 1.3}, SamplingParams(repetition_penalty=1.3, seed=8)),
    ]:
        r = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=25, seed=8, extra_body=extra)
        want = reference_with(model_dirs["text"], ids_of(PROMPT), params, 25)
        assert r.choices[0].text == bytes(want).decode("utf-8", errors="replace"), extra


def test_prompt_as_list_of_strings_token_ids_and_lists_of_ids(oai):
    a, b = "to be", "the slings"
    one = {
        p: oai.completions.create(model=TEXT, prompt=p, max_tokens=8, seed=9).choices[0].text for p in (a, b)
    }
    r = oai.completions.create(model=TEXT, prompt=[a, b], max_tokens=8, seed=9, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == one[a] and r.choices[2].text == one[b]
    assert r.usage.prompt_tokens == len(a) + len(b)
    assert (
        oai.completions.create(model=TEXT, prompt=ids_of(a), max_tokens=8, seed=9).choices[0].text == one[a]
    )
    r = oai.completions.create(model=TEXT, prompt=[ids_of(a), ids_of(b)], max_tokens=8, seed=9)
    assert [c.text for c in r.choices] == [one[a], one[b]]


def test_stop_sequences_end_the_text_and_its_logprobs(oai):
    free = oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0).choices[0].text
    stop = free[5:7]
    r = oai.completions.create(
        model=TEXT, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop], logprobs=1
    )
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == free[: free.index(stop)]
    assert "".join(c.logprobs.tokens) == c.text


def test_a_stop_holding_u_fffd_is_refused_on_every_route_as_the_text_writes_it_for_bytes_not_utf8(
    server, chat_server
):
    """The text routes write U+FFFD for generated bytes that are not UTF-8, and stop sequences are matched
    on the generated bytes: a stop "\ufffd" never ended such a text, which then held it ("\ufffd" × 4 and
    finish_reason "length" with logit_bias on byte 255). Refused naming the stop on every text route."""
    forced = {"model": TEXT, "prompt": PROMPT, "max_tokens": 4, "logit_bias": {"255": 100}, "seed": 1}
    r = httpx.post(f"{server.url}/v1/completions", json=forced, timeout=60)
    assert r.json()["choices"][0]["text"] == "\ufffd" * 4, r.text  # (the text such a stop let through)
    for stop, param in (("\ufffd", "stop.0"), (["e", "a\ufffd"], "stop.1")):
        for url, path, body in (
            (server.url, "/v1/completions", {**forced, "stop": stop}),
            (chat_server[0].url, "/v1/chat/completions",
             {"model": "tiny-chat", "messages": [{"role": "user", "content": "Who?"}], "max_tokens": 4,
              "logit_bias": {"255": 100}, "stop": stop}),
            (server.url, "/v1/generate", {"model": TEXT, "prompt": PROMPT, "max_new_tokens": 4,
                                          "stop": stop}),
        ):  # fmt: skip
            r = httpx.post(url + path, json=body, timeout=60)
            assert r.status_code == refusal_status(path), (path, r.text)
            err = r.json()["error"]
            assert err["param"] == param, r.text
            assert "U+FFFD" in err["message"] and "not UTF-8" in err["message"], r.text
        with connect(server.ws_url) as ws:
            frames = ws_turn(ws, {"type": "generate", "model": TEXT, "prompt": PROMPT, "max_new_tokens": 4,
                                  "stop": stop})  # fmt: skip
            assert frames[-1]["type"] == "error" and frames[-1]["param"] == param, frames
            assert ws_turn(ws, {"type": "generate", "model": TEXT, "prompt": PROMPT, "max_new_tokens": 4,
                                "stop": ["e"]})[-1]["type"] == "done"  # fmt: skip


def test_a_stop_of_any_length_ends_the_generation_at_the_token_that_completes_it(server):
    """logit_bias makes the output a run of one byte, so a stop of k of them ends at token k: the text
    empty, finish_reason "stop", k completion tokens. Stops over about 10 bytes that began in an earlier
    decode block were missed (the block's history lost its start: model/fused.py) and the generation went
    on: 40 'a's ended after 46 to 77 tokens, which usage counted and a session would have kept."""

    async def run() -> list[tuple[int, dict]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:

            async def one(k: int) -> tuple[int, dict]:
                body = {"model": TEXT, "prompt": PROMPT, "max_tokens": 80, "logit_bias": {"97": 100},
                        "stop": ["a" * k], "seed": k}  # fmt: skip
                return k, (await c.post("/v1/completions", json=body)).json()

            return await asyncio.gather(*[one(k) for k in range(1, 65)])

    for k, r in asyncio.run(run()):
        choice = r["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == ("", "stop"), (k, r)
        assert r["usage"]["completion_tokens"] == k, (k, r["usage"])


# --- completions: streaming -------------------------------------------------------------------------


def test_stream_matches_the_whole_response_with_logprobs_and_usage(oai):
    kw = dict(model=TEXT, prompt=PROMPT, max_tokens=30, seed=7, n=2, logprobs=2, echo=True)
    whole = oai.completions.create(**kw)
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 60 and last.usage.prompt_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    for i in range(2):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == whole.choices[i].text
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])
        tokens = [t for c in mine for t in c.logprobs.tokens]
        lps = [t for c in mine for t in c.logprobs.token_logprobs]
        offs = [t for c in mine for t in c.logprobs.text_offset]
        w = whole.choices[i].logprobs
        assert tokens == w.tokens and offs == w.text_offset
        assert lps[0] is None and lps[1:] == pytest.approx(w.token_logprobs[1:], abs=1e-6)
    plain = list(oai.completions.create(model=TEXT, prompt=PROMPT, max_tokens=5, seed=7, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"


# --- completions: refusals and ranges ---------------------------------------------------------------


def post(server, path: str, body: dict) -> httpx.Response:
    """Raw JSON (NaN and ±inf included, which the openai client cannot send)."""
    data = json.dumps(body, allow_nan=True)
    return httpx.post(
        server.url + path, content=data, headers={"Content-Type": "application/json"}, timeout=30
    )


@pytest.mark.parametrize(
    "field, bad",
    [
        ("temperature", [-1e-300, 100.000001, 1e308, float("nan"), float("inf"), float("-inf")]),
        ("top_p", [-5e-324, -1e-300, -1, 1.0000001, 1e308, float("nan"), float("inf")]),
        ("n", [0, -1, 17, 10**30]),
        ("best_of", [0, 17, 10**30]),
        ("logprobs", [-1, 21, 10**30]),
        ("max_tokens", [-1, 10**30, 5000]),
        ("presence_penalty", [-2.0000001, 2.5, float("nan"), float("inf"), float("-inf"), 1e308]),
        ("frequency_penalty", [-3, 2.0000001, float("nan"), float("-inf")]),
        ("seed", [-(2**63) - 1, 2**63, 10**40, -(10**40)]),
        ("top_k", [-2, 2**31, 10**30]),
        ("min_p", [-5e-324, 1.0000001, float("nan"), float("inf")]),
        ("repetition_penalty", [0, 5e-324, 1e-300, 0.0099, 100.01, float("nan"), float("inf")]),
    ],
)
def test_every_numeric_field_is_range_checked(server, field, bad):
    for v in bad:
        r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", "max_tokens": 2, field: v})
        assert r.status_code == 400, (field, v, r.text)
        assert r.json()["error"]["param"] == field, (field, v, r.text)


ELEMENT_0 = "element [0]: Input should be"
UNION_ERRORS = [  # (route, body, param, message): the member of a union field that came nearest
    *[("completions", {"prompt": v}, "prompt", "prompt: " + m) for v, m in [
        ([-1], f"{ELEMENT_0} greater than or equal to 0"),
        ([2**40], f"{ELEMENT_0} less than 2147483648"),
        ([], "List should have at least 1 item"),
        ([[]], "element [0]: List should have at least 1 item"),
        ([[-1]], "element [0][0]: Input should be greater than or equal to 0"),
        ([["a"]], "element [0][0]: Input should be an integer"),
        ([1.5], f"{ELEMENT_0} a string, an integer or an array"),
        ([True], f"{ELEMENT_0} a string, an integer or an array"),
        (["a", [65]], "element [1]: Input should be a string"),
        (5, "Input should be a string or an array"),
    ]],
    ("completions", {"prompt": "a", "stop": 5}, "stop", "stop: Input should be a string or an array of"),
    *[("chat/completions", {"messages": [{"role": "user", "content": v}]}, "messages.0.content",
       "messages.0.content: " + m) for v, m in [
        (5, "Input should be a string or an array"),
        ([], "List should have at least 1 item"),
        ([5], f"{ELEMENT_0} an object"),
    ]],
]  # fmt: skip


@pytest.mark.parametrize("route, body, param, message", UNION_ERRORS)
def test_a_union_field_refused_names_the_element_and_the_nearest_member(server, route, body, param, message):
    """A value no member of a union field takes gets one error from the member that came nearest, at the
    element that failed (pydantic's first member's "prompt.str: Input should be a valid string" named no
    field and hid the cause, for [-1] as for 5; found by a fresh-user trial)."""
    r = post(server, f"/v1/{route}", {"model": TEXT, "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(message), r.text


@pytest.mark.parametrize(
    "field, ok",
    [
        ("temperature", [0, 1e-30, 1, 2, 100]),
        ("top_p", [1e-30, 0.5, 1]),
        ("min_p", [0, 5e-324, 0.5, 1]),
        ("presence_penalty", [-2, 5e-324, 2]),
        ("frequency_penalty", [-2, 5e-324, 2]),
        ("repetition_penalty", [0.01, 100]),
        ("top_k", [1, 3, 255, 256, 2**31 - 1]),
    ],
)
def test_numeric_fields_at_their_limits_sample_as_the_library_does(server, model_dirs, field, ok):
    for v in ok:
        r = post(
            server, "/v1/completions", {"model": TEXT, "prompt": PROMPT, "max_tokens": 6, "seed": 1, field: v}
        )
        assert r.status_code == 200, (field, v, r.text)
        want = reference_with(model_dirs["text"], ids_of(PROMPT), SamplingParams(seed=1, **{field: 0 if
                              field == "top_k" and v >= 256 else v}), 6)  # fmt: skip
        assert r.json()["choices"][0]["text"] == bytes(want).decode("utf-8", errors="replace"), (field, v)


@pytest.mark.parametrize("extra", [{}, {"logit_bias": {"7": 1}}, {"presence_penalty": 0.5}])
def test_tiny_temperature_and_top_p_are_greedy_on_both_sampling_paths(server, extra):
    """Denormal and tiny temperatures (and top_p) are the greedy limit, whether the fused C sampler
    (plain rows) or the torch path (rows with logit_bias or penalties) samples."""
    base = {"model": TEXT, "prompt": PROMPT, "max_tokens": 12, "seed": 2, **extra}
    greedy = post(server, "/v1/completions", {**base, "temperature": 0}).json()["choices"][0]["text"]
    for kw in [{"temperature": 5e-324}, {"temperature": 1e-300}, {"temperature": 1e-30}, {"top_p": 5e-324}]:
        r = post(server, "/v1/completions", {**base, **kw})
        assert r.status_code == 200, (kw, r.text)
        assert r.json()["choices"][0]["text"] == greedy, (extra, kw)


@pytest.mark.parametrize("extra", [{}, {"logit_bias": {"7": 1}}, {"presence_penalty": 0.5}])
def test_top_p_zero_is_openais_and_keeps_the_most_likely_token_on_both_routes(server, chat_server, extra):
    """OpenAI takes top_p 0; ours refused it (400 naming top_p; an audit). It now keeps the most likely
    token alone: the greedy (temperature 0) text, on completions and chat, plain and streamed, whichever
    sampling path; -0.0 too. Our own routes keep (0, 1]."""
    s, _ = chat_server
    routes = [
        (server.url + "/v1/completions", {"model": TEXT, "prompt": PROMPT}),
        (s.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": MESSAGES}),
    ]
    for url, body in routes:
        base = {**body, "max_tokens": 16, "seed": 2, "temperature": 1.5, **extra}

        def text(kw: dict, stream: bool = False) -> str:
            r = httpx.post(url, json={**base, **kw, "stream": stream}, timeout=30)
            assert r.status_code == 200, (kw, r.text)
            if not stream:
                c = r.json()["choices"][0]
                return c["text"] if "text" in c else c["message"]["content"]
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for x in chunks
                           for c in x["choices"])  # fmt: skip

        greedy = text({"temperature": 0})
        for top_p in (0, 0.0, -0.0):
            assert text({"top_p": top_p}) == greedy and text({"top_p": top_p}, stream=True) == greedy, top_p
        assert text({}) != greedy  # (temperature 1.5 alone samples something else)
    r = httpx.post(server.url + "/v1/generate", json={"model": TEXT, "prompt": "a", "top_p": 0})
    assert r.status_code == 422 and r.json()["error"]["param"] == "top_p"


def test_logit_bias_is_checked(server):
    bad = [{"256": 1}, {"x": 1}, {"-1": 1}, {"1": 100.5}, {"1": float("nan")}, {"1": float("-inf")}]
    for bias in bad:
        r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", "logit_bias": bias})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias"), (bias, r.text)


def test_unsupported_fields_are_refused_by_name(oai, server):
    cases = [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [300]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ["a"] * 33, "n": 2}, "prompt"),  # 66 samples > 64
        ({"tools": []}, "tools"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"model": AUDIO}, "model"),
    ]
    for extra, param in cases:
        r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"].split(".")[0] == param, (extra, r.text)
    for extra, what in [({"n": 2}, "33 prompts × n 2"), ({"best_of": 2}, "33 prompts × best_of 2")]:
        r = post(server, "/v1/completions", {"model": TEXT, "prompt": ["a"] * 33, **extra})
        assert r.json()["error"]["message"].startswith(f"{what} is more than 64 samples"), r.text  # (as sent)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=TEXT, prompt="a", suffix="b")
    assert "suffix" in e.value.message
    r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", "best_of": 3, "n": 1, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


# --- the sampling paths agree ----------------------------------------------------------------------


def test_feature_rows_sample_the_same_on_the_fused_and_torch_paths(monkeypatch):
    """A batch mixing plain rows (the fused C sampler when it is built) with rows that need logit_bias,
    penalties or min_p: every row gets the same token as when sampled alone on the torch path."""
    from model import fused

    torch.manual_seed(0)
    logits = torch.randn(6, 256) * 3
    params = [
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.8, seed=2, logit_bias={5: 4.0, 7: -100.0}),
        SamplingParams(temperature=1.2, seed=3, presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, seed=4, logit_bias={9: 50.0}),
        SamplingParams(temperature=0.7, seed=5, min_p=0.3),
        SamplingParams(temperature=1.0, seed=6),
    ]
    counts = torch.zeros(6, 256)
    counts[:, :20] = 1
    mixed = [sample(logits, params, [p.generator() for p in params], None, counts) for _ in range(1)][0]
    monkeypatch.setattr(fused, "library", lambda: None)
    alone = torch.cat([sample(logits[i : i + 1], [p], [p.generator()], None, counts[i : i + 1])
                       for i, p in enumerate(params)])  # fmt: skip
    assert mixed.tolist() == alone.tolist()
    assert int(alone[3]) == 9  # greedy with the bias


def test_penalty_and_bias_math_against_float64():
    from model.sampling import apply_logit_bias, apply_presence_frequency, filter_min_p

    torch.manual_seed(1)
    x = torch.randn(2, 8)
    c = torch.tensor([[0, 1, 2, 0, 0, 3, 0, 0], [1, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.float32)
    got = apply_presence_frequency(x, c, torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0]))
    xd, cd = x.double(), c.double()
    want = (
        xd
        - cd * torch.tensor([[0.25], [2.0]], dtype=torch.float64)
        - (cd > 0) * torch.tensor([[0.5], [-1.0]])
    )
    assert torch.allclose(got.double(), want, atol=1e-6)
    b = apply_logit_bias(x, [SamplingParams(logit_bias={3: -2.5}), SamplingParams()])
    assert b[0, 3] == pytest.approx(float(x[0, 3]) - 2.5) and torch.equal(b[1], x[1])
    m = filter_min_p(x, torch.tensor([0.5, 0.0]))
    p = xd.softmax(-1)
    keep = p[0] >= 0.5 * p[0].max()
    assert torch.equal(torch.isfinite(m[0]), keep) and torch.isfinite(m[1]).all()


# --- chat ------------------------------------------------------------------------------------------

ROOT_CKPT = "checkpoints/text-shakespeare"


@pytest.fixture(scope="module")
def chat_server(model_dirs, tmp_path_factory):
    """The tiny text model with the shipped Shakespeare template, the tiny one without, and the audio one."""

    from server import Settings

    d = chat_copy(model_dirs["text"], tmp_path_factory.mktemp("chat"))
    dirs = [str(d), str(model_dirs["text"]), str(model_dirs["audio"])]
    s = ServerThread(Settings(checkpoints=dirs, max_sessions=16)).start()
    yield s, d
    s.stop()


MESSAGES = [
    {"role": "system", "content": "Elsinore. A platform before the castle."},
    {"role": "user", "content": "Who's there?", "name": "Bernardo"},
    {"role": "assistant", "content": "Nay, answer me.", "name": "Francisco"},
    {"role": "user", "content": "Long live the King!", "name": "Bernardo"},
]
RENDERED = (
    "[Elsinore. A platform before the castle.]\n\nBernardo.\nWho's there?\n\nFrancisco.\nNay, answer me.\n\n"
    "Bernardo.\nLong live the King!\n\nFrancisco.\n"
)


def test_chat_renders_the_play_and_stops_at_the_next_speaker(chat_server):
    s, d = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        assert c.models.retrieve("tiny-chat").model_extra["chat"] is True
        r = c.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=200, seed=3, temperature=0.9
        )
        msg = r.choices[0].message
        assert msg.role == "assistant" and r.object == "chat.completion"
        assert r.usage.prompt_tokens == len(RENDERED.encode())
        # the tiny model writes no newline in these 200 tokens (the library's, without any stop)...
        want = bytes(reference(d, list(RENDERED.encode()), SamplingParams(temperature=0.9, seed=3), 200))
        assert b"\n" not in want
        assert r.choices[0].finish_reason == "length"
        assert msg.content == want.decode("utf-8", errors="replace")
        # ...so a bias towards "\n" (id 10) makes it write a blank line: the speech ends before it, "stop"
        # (the checkpoint's chat_stop; a request stop is tested elsewhere). The index comes from the
        # library's tokens, sampled without any stop: the bias is just enough to put one within 200.
        biased = SamplingParams(temperature=0.9, seed=3, logit_bias={10: 7.0})
        free = bytes(reference(d, list(RENDERED.encode()), biased, 200))
        i = free.find(b"\n\n")
        assert 0 < i < 198, free
        b = c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=200, seed=3,
                                      temperature=0.9, logit_bias={"10": 7.0})  # fmt: skip
        assert b.choices[0].finish_reason == "stop" and b.choices[0].message.content == free[:i].decode()
        assert b.usage.completion_tokens == i + 2  # (the blank line was generated, and is left out)
        # streamed: a role delta, then content deltas adding up to the same reply, then usage
        chunks = list(c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=200, seed=3,
                                                temperature=0.9, stream=True,
                                                stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == msg.content
        assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs_n_and_content_parts(chat_server):
    s, d = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        parts = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Who's "}, {"type": "text", "text": "there?"}],
            }
        ]
        kw = dict(max_completion_tokens=12, seed=1, n=2, logprobs=True, top_logprobs=2, stop=["zz"])
        r = c.chat.completions.create(model="tiny-chat", messages=parts, **kw)
        prompt = "Ham.\nWho's there?\n\nHor.\n"
        assert len(r.choices) == 2 and r.usage.prompt_tokens == len(prompt)
        for i, ch in enumerate(r.choices):
            content = ch.logprobs.content
            gen = [e.bytes[0] for e in content]
            assert bytes(gen).decode("utf-8", errors="replace") == ch.message.content
            params = SamplingParams(seed=choice_seed(1, i), stop=[b"zz", b"\n\n"])
            assert gen == reference(d, list(prompt.encode()), params, 12)[: len(gen)]
            _, rows = model_logprobs(d, list(prompt.encode()), gen)
            for k, e in enumerate(content):
                assert e.logprob == pytest.approx(float(rows[k, gen[k]]), abs=LP_TOL)
                assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(
                    float(rows[k].max()), abs=LP_TOL
                )
        chunks = list(c.chat.completions.create(model="tiny-chat", messages=parts, stream=True, **kw))
        for i, ch in enumerate(r.choices):
            mine = [x.choices[0] for x in chunks if x.choices[0].index == i]
            assert "".join(x.delta.content or "" for x in mine) == ch.message.content
            streamed = [e.logprob for x in mine if x.logprobs for e in x.logprobs.content]
            assert streamed == pytest.approx([e.logprob for e in ch.logprobs.content], abs=1e-6)
            assert mine[-1].finish_reason == ch.finish_reason


def test_chat_logprob_bytes_are_the_bytes_the_text_writes_for_ids_past_255(tmp_path):
    """A byte-level text model with more than 256 ids (no vocab.txt) writes id t as its low byte (its text,
    stop matching, text_offset and /detokenize alike: server.engine's _id_bytes). Chat's logprobs said
    `bytes: [t]` for such an id ([300]: not a byte, so the entries' bytes neither added up to the content
    nor made a bytes object)."""
    from model import ModelConfig, SequenceModel, save
    from server import Settings

    torch.manual_seed(3)
    net = SequenceModel(ModelConfig(vocab_size=512, d_model=8, n_layers=1, d_state=8, l_max=32,
                                    cauchy_backend="torch"))  # fmt: skip
    d = chat_copy(save(net, tmp_path / "wide"), tmp_path / "chat")
    s = ServerThread(Settings(checkpoints=[str(d)], max_sessions=4)).start()
    try:
        body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 4, "temperature": 0,
                "logit_bias": {"300": 100}, "logprobs": True, "top_logprobs": 5}  # fmt: skip
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        content, entries = choice["message"]["content"], choice["logprobs"]["content"]
        assert [e["token"] for e in entries] == ["token:300"] * 4  # (the bias makes every token 300)
        assert sum((e["bytes"] for e in entries), []) == list(content.encode()), (content, entries)
        tops = [t for e in entries for t in e["top_logprobs"]]
        assert any(t["token"].startswith("token:") for t in tops)  # (ids past 255 among them too)
        assert all(len(t["bytes"]) == 1 and 0 <= t["bytes"][0] < 256 for t in tops), tops
    finally:
        s.stop()


def test_chat_refusals(chat_server):
    s, _ = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        # a model that cannot serve the route is a 400 naming `model`, whatever the reason
        audio = "audio model; the OpenAI routes serve text models (use POST /v1/generate)"
        for model, why in [(TEXT, "chat template"), (AUDIO, audio)]:
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model=model, messages=MESSAGES)
            assert why in e.value.message and e.value.body["param"] == "model"
        for kw, param in [
            ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"top_logprobs": 2}, "top_logprobs"),
            ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
             "messages"),
            ({"messages": []}, "messages"),
            ({"temperature": 101}, "temperature"),
            ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
            ({"max_completion_tokens": 0}, "max_completion_tokens"),
            ({"max_completion_tokens": 10**30}, "max_completion_tokens"),
            ({"max_tokens": 5000}, "max_tokens"),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
            ({"n": 0}, "n"),
            ({"presence_penalty": 2.5}, "presence_penalty"),
            ({"logit_bias": {"999": 1}}, "logit_bias"),
            ({"stream_options": {"include_usage": True}}, "stream_options"),
            ({"seed": 2**63}, "seed"),
        ]:  # fmt: skip
            body = {"model": "tiny-chat", "messages": MESSAGES, **kw}
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(**body)
            assert e.value.body["param"].split(".")[0] == param, (kw, e.value.body)


def test_refusals_are_openai_s_400_and_fields_that_change_nothing_are_accepted(chat_server):
    """On the OpenAI routes a request the server cannot take is OpenAI's 400 `invalid_request_error`, the
    openai client's BadRequestError (it was a 422: UnprocessableEntityError, which `except
    openai.BadRequestError` handlers miss; found by a fresh-user trial). Fields clients send that
    change nothing here are accepted and range-checked (store false, metadata, parallel_tool_calls);
    store true, which would ask the server to keep completions, is refused by name."""
    s, _ = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        chat = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8, "seed": 3}
        plain = c.chat.completions.create(**chat).choices[0].message.content
        noops = {"store": False, "metadata": {"run": "a" * 512, "k" * 64: ""}, "parallel_tool_calls": False}
        assert c.chat.completions.create(**chat, **noops).choices[0].message.content == plain
        for kw, param in [
            ({"store": True}, "store"),
            ({"metadata": {"k": 1}}, "metadata"),
            ({"metadata": {"k": "v" * 513}}, "metadata"),
            ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
            ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
            ({"temperature": -1}, "temperature"),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(**chat, **kw)
            err = e.value.body
            assert e.value.status_code == 400 and err["type"] == "invalid_request_error", (kw, err)
            assert err["param"].split(".")[0] == param, (kw, err)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=TEXT, prompt=[-1])
        assert e.value.body["param"] == "prompt" and "element [0]" in e.value.body["message"]
    # our own routes keep 422 for the same kind of refusal
    r = httpx.post(s.url + "/v1/generate", json={"model": TEXT, "prompt": "a", "temperature": -1})
    assert r.status_code == 422 and r.json()["error"]["type"] == "unprocessable_entity"


def test_a_choice_the_drains_end_cuts_short_is_a_503_or_an_error_event_never_finish_reason_stop(chat_server):
    """SIGTERM with generations far longer than the drain (S4_DRAIN_TIMEOUT_S): when it ends the engine
    ends them "cancelled", which these routes answered as a finished completion: 200 with finish_reason
    "stop" (streamed: a "stop" chunk, usage and [DONE]; an audit). Now, on completions and chat alike, a
    plain request gets a 503 server_error with Retry-After naming the choice and its tokens, a stream an
    error event in OpenAI's shape and [DONE], and no choice a finish_reason. The signal is simulated
    (`handle_exit`, python -m server's)."""
    import signal
    import threading

    from server import Settings

    _, d = chat_server
    n = 10**6  # minutes of the tiny model: running when the 0.5 s drain ends
    s = ServerThread(Settings(checkpoints=[str(d)], drain_timeout_s=0.5, max_new_tokens=n, max_sessions=8),
                     graceful=True).start()  # fmt: skip
    never_stops = {"logit_bias": {"97": 100}, "max_tokens": n}  # "aaa…": no "\n\n" to end a speech
    requests = {
        "completions": ("/v1/completions", {"prompt": "to be", "n": 2}),
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}], "n": 2}),
    }
    answers: dict = {}

    def ask(name: str, path: str, body: dict, stream: bool) -> None:
        body = {"model": "tiny-chat", **body, **never_stops, "stream": stream}
        with httpx.stream("POST", s.url + path, json=body, timeout=60) as r:
            answers[name, stream] = (r.status_code, r.headers, [x for x in r.iter_lines() if x])

    threads = [threading.Thread(target=ask, args=(name, path, body, stream))
               for name, (path, body) in requests.items() for stream in (False, True)]  # fmt: skip
    try:
        for t in threads:
            t.start()
        engine = s.state.models["tiny-chat"].engine
        assert wait_for(lambda: engine.active_requests == 8, 30)  # 4 requests × n 2: all running
        s.server.handle_exit(signal.SIGTERM, None)
        for t in threads:
            t.join(60)
        for name in requests:
            status, headers, lines = answers[name, False]
            assert status == 503 and "Retry-After" in headers, (name, status, lines[0][-300:])
            err = openai_error(httpx.Response(status, content="\n".join(lines)))
            assert err["type"] == "server_error", err
            assert err["message"].startswith("the server shut down before the completion finished: choice ")
            assert f"of {n} tokens" in err["message"] and "(1 other choice too)" in err["message"], err
            status, _, lines = answers[name, True]
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
            assert status == 200 and lines[-1] == "data: [DONE]", (name, lines[-3:])
            assert set(events[-1]) == {"error"} and events[-1]["error"]["type"] == "server_error", events[-1]
            assert "shut down before the completion finished" in events[-1]["error"]["message"]
            finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
            assert set(finishes) == {None}, (name, finishes)
            assert sum(1 for e in events[:-1] for c in e["choices"] if c.get("text") or c.get("delta")), name
        s.thread.join(30)
        assert not s.thread.is_alive()
    finally:
        s.stop()


def test_every_answer_and_chunk_carries_the_models_system_fingerprint(oai, server, chat_server):
    """OpenAI's `system_fingerprint` (the backend a seed's tokens depend on) was never sent: the openai
    client read None (an audit). Now every completion, chat completion and stream chunk carries "fp_" and
    12 hex digits of the served model's weights, config, dtypes and device: the same on every request
    and route, and on another server serving the same checkpoint; another model's differs."""
    import re

    s, _ = chat_server
    fp = server.state.models[TEXT].system_fingerprint
    assert re.fullmatch(r"fp_[0-9a-f]{12}", fp) and fp != server.state.models[AUDIO].system_fingerprint
    assert s.state.models[TEXT].system_fingerprint == fp  # another server, the same checkpoint
    answers = [oai.completions.create(model=TEXT, prompt="a", max_tokens=2, n=2) for _ in range(2)]
    answers += list(oai.completions.create(model=TEXT, prompt="a", max_tokens=2, n=2, stream=True,
                                           stream_options={"include_usage": True}))  # fmt: skip
    assert [a.system_fingerprint for a in answers] == [fp] * len(answers)
    chat = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2}
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        answers = [c.chat.completions.create(**chat)]
        answers += list(
            c.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
        )
    # the same weights and config (tiny-chat is tiny-text with a chat template): the same fingerprint
    assert [a.system_fingerprint for a in answers] == [fp] * len(answers)


def test_stream_options_include_obfuscation_is_accepted_and_changes_nothing(server, chat_server):
    """`stream_options.include_obfuscation`, which the openai client types, was a 400 ("Extra inputs are
    not permitted"; an audit). It is accepted, true or false, and changes nothing: this server pads no
    chunk with OpenAI's `obfuscation` field. Another type is still a 400 naming it."""
    s, _ = chat_server
    routes = [
        (server.url + "/v1/completions", {"model": TEXT, "prompt": PROMPT}),
        (s.url + "/v1/chat/completions", {"model": "tiny-chat", "messages": MESSAGES}),
    ]
    for url, body in routes:
        base = {**body, "max_tokens": 8, "seed": 1, "stream": True}

        def chunks(options: dict | None) -> list[dict]:
            r = httpx.post(url, json={**base, "stream_options": options}, timeout=30)
            assert r.status_code == 200, (options, r.text)
            return [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]

        def content(events: list[dict]) -> tuple[str, list]:  # (the text, the finish reasons)
            choices = [c for e in events for c in e["choices"]]
            text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
            return text, [c["finish_reason"] for c in choices if c["finish_reason"]]

        plain = chunks({"include_usage": True})
        for obfuscation in (False, True):
            got = chunks({"include_usage": True, "include_obfuscation": obfuscation})
            assert content(got) == content(plain), obfuscation
            assert got[-1]["usage"]["completion_tokens"] == plain[-1]["usage"]["completion_tokens"]
            assert not any("obfuscation" in e for e in got)
        r = httpx.post(url, json={**base, "stream_options": {"include_obfuscation": "no"}}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_obfuscation"
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        stream = c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2, stream=True,
                                           stream_options={"include_obfuscation": False})  # fmt: skip
        assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")


UNSUPPORTED = [  # (route, field changes, param): OpenAI's fields this server does not support
    *[("completions", {f: v}, f) for f, v in [
        ("tools", []), ("response_format", {"type": "text"}), ("suffix", "end"),
    ]],
    *[("chat/completions", {f: v}, f) for f, v in [
        ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "none"),
        ("functions", [{"name": "f"}]), ("function_call", "none"),
        ("response_format", {"type": "json_object"}), ("modalities", ["text"]),
        ("audio", {"voice": "alloy", "format": "wav"}), ("service_tier", "auto"),
        ("prediction", {"type": "content", "content": "x"}), ("web_search_options", {}),
        ("reasoning_effort", "low"), ("store", True), ("best_of", 2),
    ]],
    ("chat/completions", {"messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]},
     "messages.0.tool_call_id"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
     "messages.0.tool_calls"),
    ("chat/completions", {"stream": True, "stream_options": {"foo": True}}, "stream_options.foo"),
]  # fmt: skip


@pytest.mark.parametrize("route, change, param", UNSUPPORTED)
def test_an_unsupported_openai_field_is_a_400_saying_this_server_does_not_support_it(
    chat_server, route, change, param
):
    """tools, response_format, tool_choice and OpenAI's other fields this server lacks were refused with
    pydantic's "tools: Extra inputs are not permitted" (an audit), beside "suffix is not supported" and
    "store: Input should be False" for the ones refused by name. Now every one says "<field> is not
    supported by this server" (and why, where a reason helps), a 400 naming it; our own routes keep
    their 422."""
    s, _ = chat_server
    body = (
        {"model": TEXT, "prompt": "a"}
        if route == "completions"
        else {"model": "tiny-chat", "messages": MESSAGES}
    )
    r = post(s, f"/v1/{route}", {**body, "max_tokens": 2, **change})
    err = openai_error(r)
    assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", r.text
    assert err["message"].startswith(param) and "is not supported by this server" in err["message"], err
    if param in ("tools", "response_format", "tool_choice", "best_of", "stream_options.foo"):
        assert err["message"] == f"{param} is not supported by this server", err
    native = httpx.post(s.url + "/v1/generate", json={"model": TEXT, "prompt": "a", "tools": []})
    assert native.status_code == 422 and native.json()["error"]["param"] == "tools"


def test_shipped_shakespeare_chat_template_renders_speaker_lines():
    from pathlib import Path

    from server.chat import ChatTemplate

    root = Path(__file__).resolve().parent.parent
    t = ChatTemplate.from_config(json.loads((root / ROOT_CKPT / "config.json").read_text()))
    msgs = [{"role": m["role"], "content": m["content"], "name": m.get("name")} for m in MESSAGES]
    assert t.render(msgs) == RENDERED and t.stop == ["\n\n"]
    assert t.render([{"role": "user", "content": "Speak.", "name": None}]) == "Ham.\nSpeak.\n\nHor.\n"
    # the corpus writes speeches this way: a speaker line ending in ".", the speech, a blank line
    sample_text = (root / ROOT_CKPT / "eval_slice" / "test.bin").read_bytes()[:2000].decode(errors="replace")
    assert "\n\nHam.\n" in sample_text


def test_a_hugging_face_chat_template_refuses_breaks_loops_and_writes_json_as_transformers_does():
    """What transformers gives a chat template (its `_compile_jinja_template`), which a template written for
    it uses: `raise_exception` (was undefined: the 400 said "'raise_exception' is undefined", not the
    template's reason), `{% break %}` (was an unknown tag: the checkpoint was not served) and `tojson` as
    `json.dumps(ensure_ascii=False)` (Jinja's escaped "<", "&", "é" and sorted the keys: another prompt)."""
    from types import SimpleNamespace

    from server.chat import ChatTemplate
    from server.errors import APIError
    from server.routes.openai import chat_prompt
    from server.schemas import ChatCompletionRequest

    alternate = (
        "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    model = SimpleNamespace(id="m", chat=ChatTemplate(alternate, []))
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(APIError) as e:
        chat_prompt(model, ChatCompletionRequest(model="m", messages=two_users))
    assert e.value.status == 422 and e.value.param == "messages"  # (400 on the OpenAI routes: as_openai)
    assert "Conversation roles must alternate user/assistant/user/assistant/..." in e.value.message
    answered = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    prompt = chat_prompt(model, ChatCompletionRequest(model="m", messages=answered))
    assert prompt == "user: a\nassistant: b\n"

    first_two = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }};{% endfor %}",
        [],
    )
    msgs = [
        {"role": r, "content": c, "name": None} for r, c in [("system", "s"), ("user", "u"), ("user", "v")]
    ]
    assert first_two.render(msgs) == "u;"
    marked = ChatTemplate(
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}!"
        "{% endgeneration %}{% else %}{{ m.content }};{% endif %}{% endfor %}",
        [],
    )
    assert marked.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]) == "u;a!"

    message = {"role": "user", "content": "<a & b> 'é' 😀", "name": None}
    for filt, kwargs in [("tojson", {}), ("tojson(indent=2)", {"indent": 2})]:
        got = ChatTemplate(f"{{{{ messages[0] | {filt} }}}}", []).render([message])
        assert got == json.dumps(message, ensure_ascii=False, **kwargs)


def test_a_template_whose_source_ends_in_a_newline_renders_the_prompt_transformers_renders():
    """transformers' environment (`_compile_jinja_template`: trim_blocks, lstrip_blocks, the loop controls)
    leaves Jinja's keep_trailing_newline off, so the one newline that ends a template's source is not
    written (a chat_template.jinja file ends in one). Ours kept it: a Zephyr-style template ending in
    "<|assistant|>\\n" gave the prompt one byte more than the model was trained to continue from. The
    prompt is now the one an environment built as transformers builds it renders, for every ending."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from server.chat import ChatTemplate

    loops = [jinja2.ext.loopcontrols]
    hf = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=loops)
    body = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
    messages = [{"role": "user", "content": "Who's there?"}]
    ends = ["<|assistant|>\n", "<|assistant|>\n\n", "{{ '<|assistant|>' }}\n", "<|assistant|>",
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}\n"]  # fmt: skip
    for end in ends:
        for add in (True, False):
            want = hf.from_string(body + end).render(messages=messages, add_generation_prompt=add)
            assert ChatTemplate(body + end, []).render(messages, add) == want, (end, add)
    assert ChatTemplate(body + "<|assistant|>\n", []).render(messages).endswith("</s>\n<|assistant|>")


def test_a_hugging_face_list_of_named_templates_serves_its_default_one():
    """A Hugging Face tokenizer_config.json holds several templates as a list of {"name", "template"}
    ("default", "tool_use", "rag"; transformers reads it as a mapping too), of which transformers renders
    "default" for a conversation without tools. Such a `chat_template` copied into config.json made the
    model refuse to load ("must be a string"; R11's note). The default one is served now, as the string
    itself would be; a list or mapping without one is refused naming the templates it holds."""
    import re  # noqa: PLC0415

    from server.chat import ChatTemplate, ChatTemplateError  # noqa: PLC0415

    default = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    tools = "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}"
    messages = [{"role": "user", "content": "Who's there?"}]
    want = ChatTemplate.from_config({"chat_template": default, "chat_stop": ["\n"]})
    for form in (
        [{"name": "tool_use", "template": tools}, {"name": "default", "template": default}],
        {"default": default, "tool_use": tools},
    ):
        got = ChatTemplate.from_config({"chat_template": form, "chat_stop": ["\n"]})
        assert got.source == default and got.stop == ["\n"]
        assert got.render(messages) == want.render(messages) == "user: Who's there?\nassistant:"
    bad = {
        "none of its templates ('tool_use', 'rag') is named 'default'": [
            {"name": "tool_use", "template": tools}, {"name": "rag", "template": tools}],
        'a list must hold {"name", "template"} objects': [default],
        "its 'default' template must be a string": {"default": 5},
        "must be a string (a Jinja template), or Hugging Face's list": 5,
    }  # fmt: skip
    for says, form in bad.items():
        with pytest.raises(ChatTemplateError, match=re.escape(says)):
            ChatTemplate.from_config({"chat_template": form})


def test_a_template_sees_tools_and_documents_as_none_as_transformers_gives_them(chat_server, monkeypatch):
    """transformers renders a chat template with `tools` and `documents` always set (None when the caller
    passes none: `render_jinja_template`'s `tools=tool_schemas, documents=documents`), so a template for it
    may test `tools is not none`. Ours left them undefined, which is "not none": such a template wrote its
    tool preamble into every prompt, and one that wrote `tools | tojson` there failed on every request (a
    400 naming messages, the model's chat unusable). They are None now, as this server has no tools."""
    from server.chat import ChatTemplate

    s, _ = chat_server
    source = (
        "{% if tools is not none %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
        "{% if documents is none %}{% else %}[DOCS]{% endif %}{% if tools is none %}no tools;{% endif %}"
        "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    )
    template = ChatTemplate(source, [])
    assert template.render([{"role": "user", "content": "hi"}]) == "no tools;hi\n"
    monkeypatch.setattr(s.state.models["tiny-chat"], "chat", template)
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(b"no tools;hi\n")


def test_a_message_without_a_name_reaches_the_template_without_one():
    """A message the client sent without `name` reached the template as {"name": None}: `m.name is defined`
    and `'name' in m`, Hugging Face templates' tests for a name, were true, and the prompt said "None: hi".
    The key is now left out, as in the request (and as transformers passes a message)."""
    from types import SimpleNamespace

    from server.chat import ChatTemplate
    from server.routes.openai import chat_prompt
    from server.schemas import ChatCompletionRequest

    for test in ("m.name is defined", "'name' in m"):
        speech = "{{ m.name }}: {% endif %}{{ m.content }}\n{% endfor %}"
        source = f"{{% for m in messages %}}{{% if {test} %}}" + speech
        model = SimpleNamespace(id="m", chat=ChatTemplate(source, []))
        messages = [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo", "name": "Bob"}]
        assert chat_prompt(model, ChatCompletionRequest(model="m", messages=messages)) == "hi\nBob: yo\n", (
            test
        )


@pytest.mark.parametrize(
    "source, said",
    [
        ("{{ messages[0].content + 1 }}", "TypeError"),  # a str and an int
        ("{{ messages[0].name | tojson }}", "TypeError"),  # no name: Undefined is no JSON
        ("{% for m in messages %}{{ 1 // (loop.length - 1) }}{% endfor %}", "ZeroDivisionError"),
        ("{{ messages[0].content.nope.nope }}", "has no attribute 'nope'"),  # (Jinja's: a 400 before too)
    ],
)
def test_a_template_that_fails_on_the_messages_is_a_400_naming_messages_never_a_500(
    chat_server, monkeypatch, source, said
):
    """A template is Python run on the client's messages: an error of Python's it raises on them (a
    TypeError, a ZeroDivisionError) went past render's `except TemplateError` and was a 500 with nothing
    said. Now it is the 400 a Jinja error was: naming messages, with the error's type and text; the
    model still serves messages the template takes."""
    from server.chat import ChatTemplate

    s, _ = chat_server
    monkeypatch.setattr(s.state.models["tiny-chat"], "chat", ChatTemplate(source, []))
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for stream in (False, True):
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages", r.text
        assert err["type"] == "invalid_request_error" and said in err["message"], err
    monkeypatch.setattr(s.state.models["tiny-chat"], "chat", ChatTemplate("{{ messages[0].content }}", []))
    assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_messages_a_template_renders_as_no_prompt_are_a_400_naming_messages(chat_server, monkeypatch):
    """A byte model has no start-of-text token, so a chat template that renders the messages as nothing
    leaves nothing to continue from. The refusal came from the generation's start, naming `prompt`, a field
    the chat route does not have (the completions route refuses an empty prompt naming `prompt`, its own).
    It names `messages` now, streamed or not; the messages the template renders as text are served."""
    from server.chat import ChatTemplate

    s, _ = chat_server
    monkeypatch.setattr(s.state.models["tiny-chat"], "chat", ChatTemplate("{{ messages[0].content }}", []))
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": ""}], "max_tokens": 2}
    for stream in (False, True):
        r = httpx.post(s.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and err["message"].startswith("messages: "), err
    body["messages"][0]["content"] = "to be"
    assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_logit_bias_keys_are_canonical_decimal_token_ids_on_both_routes(chat_server):
    """int() read "6_5", " 65", "+65", "065" and Arabic-Indic "٦٥" as token 65, so {"65": 100, "065":
    -100} resolved by key order, silently (a fresh-user trial). A key is now "0" or ASCII digits without
    a leading zero; anything else is a 400 naming logit_bias and the key, on completions and chat."""
    s, _ = chat_server
    routes = [
        ("/v1/completions", {"model": TEXT, "prompt": "a"}),
        ("/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "a"}]}),
    ]
    for path, body in routes:
        for bias in [{"0": 1, "65": -100, "255": 100}]:
            r = post(s, path, {**body, "max_tokens": 2, "logit_bias": bias})
            assert r.status_code == 200, (path, bias, r.text)
        for key in ["6_5", " 65", "65 ", "+65", "-0", "065", "00", "٦٥", "６５", "65\n", "1e2", "0x41", ""]:
            r = post(s, path, {**body, "max_tokens": 2, "logit_bias": {key: 1}})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "logit_bias", (path, key, r.text)
            assert repr(key) in err["message"] and "not a token id" in err["message"], (key, err)
        r = post(s, path, {**body, "max_tokens": 2, "logit_bias": {"65": 100, "065": -100}})
        assert r.status_code == 400 and "'065'" in r.json()["error"]["message"], r.text
        for key in ["256", "9" * 5000]:
            r = post(s, path, {**body, "max_tokens": 2, "logit_bias": {key: 1}})
            assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"], key


def test_a_reply_sent_back_as_a_message_is_accepted_and_what_it_cannot_carry_is_refused_by_name(chat_server):
    """`messages.append(reply.choices[0].message.model_dump())`, the openai client's way to continue a
    conversation, writes every field of OpenAI's reply message, null: refusal, tool_calls,
    function_call, audio, annotations. That was a 400 ("messages.4.refusal: Extra inputs are not
    permitted"), and so was an assistant message with content null (a fresh-user trial). Now they are
    accepted as null (null content: an empty speech) and refused by name when they carry anything."""
    from server.chat import ChatTemplate
    from server.schemas import NULL_ONLY_MESSAGE_FIELDS

    s, d = chat_server
    template = ChatTemplate.from_config(json.loads((d / "config.json").read_text()))
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        reply = c.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8, seed=3)
        sent_back = reply.choices[0].message.model_dump()
        assert set(NULL_ONLY_MESSAGE_FIELDS) <= set(sent_back)  # what openai's reply model carries
        assert all(sent_back[k] is None for k in NULL_ONLY_MESSAGE_FIELDS)
        follow_up = {"role": "user", "content": "Who is there?", "name": "Bernardo"}
        silent = {"role": "assistant", "content": None, "tool_calls": None, "refusal": None}
        for messages in (MESSAGES + [sent_back, follow_up], MESSAGES + [silent, follow_up]):
            r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=4, seed=3)
            rendered = template.render(
                [{"role": m["role"], "content": m["content"] or "", "name": m.get("name")} for m in messages]
            )
            assert r.usage.prompt_tokens == len(rendered.encode()), messages[-2]
        assert "Hor.\n\n" in rendered  # the empty speech
        for field, value in [
            ("refusal", "I cannot."),
            ("tool_calls", [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
            ("tool_calls", []),
            ("function_call", {"name": "f", "arguments": "{}"}),
            ("audio", {"id": "a"}),
            ("annotations", []),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(
                    model="tiny-chat", messages=MESSAGES + [{**sent_back, field: value}]
                )
            assert e.value.param == f"messages.4.{field}" and field in e.value.message, (field, e.value.body)
        with pytest.raises(openai.BadRequestError) as e:  # null content: an assistant's only
            c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": None}])
        assert e.value.param == "messages.0.content" and "assistant" in e.value.message


def test_a_chat_name_is_openai_s_1_to_64_letters_digits_underscores_or_hyphens(chat_server):
    """A name went into the play as the speaker's line: "" and "A\n\nHor." were accepted, and the
    second wrote a whole speaker turn into the prompt (a fresh-user trial). Now OpenAI's rule,
    ^[a-zA-Z0-9_-]{1,64}$, else a 400 naming the message's name."""
    s, _ = chat_server
    with openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0) as c:
        for name in ["Bernardo", "a" * 64, "First_Witch-2"]:
            msg = {"role": "user", "content": "Who's there?", "name": name}
            r = c.chat.completions.create(model="tiny-chat", messages=[msg], max_tokens=2, seed=1)
            assert r.usage.prompt_tokens == len(f"{name}.\nWho's there?\n\nHor.\n"), name
        for name in ["", "A\n\nHor.", "Hor.", "Ber nardo", "a" * 65, "Bérnardo", "A\n", "\tA", "A\x00"]:
            msg = {"role": "user", "content": "Who's there?", "name": name}
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="tiny-chat", messages=[MESSAGES[0], msg], max_tokens=2)
            assert e.value.param == "messages.1.name", (name, e.value.body)
            assert "letters, digits" in e.value.message


# --- the code layout -------------------------------------------------------------------------------


def test_routes_import_without_the_app_factory():
    code = (
        "import sys\n"
        "import server.routes.openai, server.routes.generate, server.routes.websocket\n"
        "import server.routes.sessions, server.routes.health, server.service\n"
        "assert 'server.app' not in sys.modules, 'a route imports the app factory'\n"
    )
    # server/__init__ imports the app; load the routes with a bare `server` package instead
    prelude = (
        "import importlib.util, sys, types, pathlib\n"
        "pkg = types.ModuleType('server'); pkg.__path__ = [str(pathlib.Path('server').resolve())]\n"
        "sys.modules['server'] = pkg\n"
    )
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-c", prelude + code],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_choices_beyond_the_servers_capacity_are_refused_and_a_429_leaks_no_slot(limited, monkeypatch):
    """The `limited` server holds 3 sessions and queues 1 request: n=2 can never be admitted (400
    naming n, not a 429 to retry). When a request's second choice is refused (429: queue full), its
    first choice is cancelled and every slot is freed."""
    from server.errors import over_capacity

    with httpx.Client(base_url=limited.url, timeout=30) as c:
        r = c.post("/v1/completions", json={"model": TEXT, "prompt": "a", "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        engine = limited.state.models[TEXT].engine
        submit, calls = engine.submit, []

        def second_refused(job):
            calls.append(job)
            if len(calls) == 2:
                raise over_capacity("queue full (test)")
            submit(job)

        monkeypatch.setattr(limited.state.settings, "max_queued_requests", 2)
        monkeypatch.setattr(engine, "submit", second_refused)
        r = c.post("/v1/completions", json={"model": TEXT, "prompt": "a", "n": 2, "max_tokens": 100_000})
        assert r.status_code == 429 and len(calls) == 2, r.text
        monkeypatch.undo()
        assert wait_for(
            lambda: engine.pool.in_use == 0 and engine.queued == 0 and not engine.active_requests, 10
        )
        assert calls[0].stream.cancelled
        r = c.post("/v1/completions", json={"model": TEXT, "prompt": "a", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_closing_a_streamed_n2_request_cancels_both_choices(server):
    """Both choices' one-shot sessions go, slots and all (checked as the slots settle, not against a count
    from before the request: an earlier test's socket session deleted late moved that count)."""
    engine, table = server.state.models[TEXT].engine, server.state.sessions
    body = {"model": TEXT, "prompt": PROMPT, "n": 2, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert any(r.ephemeral for r in table.records(TEXT))
    assert wait_for(lambda: slots_settled(engine, table, TEXT), 60)


def test_types_are_strict_and_null_means_absent(server):
    bad = [
        {"n": "2"},
        {"logprobs": True},
        {"temperature": True},
        {"echo": "yes"},
        {"max_tokens": 2.5},
        {"prompt": None},
    ]
    for extra in bad:
        param = next(iter(extra))
        r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (extra, r.text)
    nulls = {
        k: None for k in ("n", "logprobs", "suffix", "stop", "seed", "temperature", "logit_bias", "best_of")
    }
    r = post(server, "/v1/completions", {"model": TEXT, "prompt": "a", "max_tokens": 3, **nulls})
    assert (
        r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    )


def test_text_offsets_count_characters_and_non_ascii_bytes_are_named(oai):
    r = oai.completions.create(model=TEXT, prompt="aé b", max_tokens=0, echo=True, logprobs=1).choices[0]
    assert r.text == "aé b"
    assert r.logprobs.tokens == ["a", "bytes:\\xc3", "bytes:\\xa9", " ", "b"]
    assert r.logprobs.text_offset == [0, 1, 1, 2, 3]  # both bytes of é start at its character
    r = oai.completions.create(
        model=TEXT, prompt="a", max_tokens=5, logprobs=1, logit_bias={"195": 100}
    ).choices[0]
    assert r.logprobs.tokens == ["bytes:\\xc3"] * 5 and r.text == "\ufffd" * 5  # lone lead bytes
    assert r.logprobs.text_offset == [0, 1, 2, 3, 4]


# --- errors in OpenAI's shape -----------------------------------------------------------------------

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


def openai_error(r: httpx.Response) -> dict:
    """The error object of an OpenAI-route answer, checked to be OpenAI's: exactly message, type, param
    and code, the code a string or null (never the status)."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == OPENAI_ERROR_KEYS, r.text
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str), r.text
    return body["error"]


def test_openai_routes_answer_errors_in_openai_s_shape_and_the_client_raises_its_classes(
    oai, server, monkeypatch
):
    """Malformed JSON, a body not sent as JSON, an unknown model, a refused field, a full queue and a
    body over the limit, on /v1/completions, /v1/chat/completions and /v1/models: OpenAI's error object
    (type invalid_request_error / requests, code null or OpenAI's string), so the openai client raises
    BadRequestError, NotFoundError and RateLimitError with `.code` and `.type` set as OpenAI's API sets
    them. They were our own shape: "type": "bad_request" / "not_found" / "too_many_requests", the code
    an integer (a fresh-user trial). Our own routes keep theirs."""
    from server_support import read_until_closed

    from server.errors import over_capacity

    chat = {"model": TEXT, "messages": [{"role": "user", "content": "a"}]}
    for path, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", chat)):
        r = httpx.post(server.url + path, content=b'{"model": ', headers={"content-type": "application/json"})
        err = openai_error(r)
        assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["code"] is None
        assert err["message"].startswith("malformed JSON"), err
        r = httpx.post(server.url + path, content=b'{"model": "x"}')  # no content-type: not JSON
        assert r.status_code == 415 and openai_error(r)["type"] == "invalid_request_error"
        r = httpx.post(server.url + path, json={**body, "model": "nope"})
        err = openai_error(r)
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", err
        assert err["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/models/nope")
    assert r.status_code == 404 and openai_error(r)["code"] == "model_not_found"
    for call in (
        lambda: oai.completions.create(model="nope", prompt="a"),
        lambda: oai.chat.completions.create(model="nope", messages=chat["messages"]),
        lambda: oai.models.retrieve("nope"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
        assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=TEXT, prompt="a", temperature=-1)
    assert e.value.type == "invalid_request_error" and e.value.code is None and e.value.param == "temperature"
    # a full queue: OpenAI's rate-limit object (type "requests", code rate_limit_exceeded) and Retry-After
    engine = server.state.models[TEXT].engine

    def full(job):
        raise over_capacity("the request queue is full (test)", retry_after=2)

    monkeypatch.setattr(engine, "submit", full)
    with pytest.raises(openai.RateLimitError) as e:
        oai.completions.create(model=TEXT, prompt="a", max_tokens=2)
    assert e.value.type == "requests" and e.value.code == "rate_limit_exceeded"
    assert e.value.response.headers["retry-after"] == "2"
    r = httpx.post(server.url + "/v1/completions", json={"model": TEXT, "prompt": "a", "stream": True})
    assert r.status_code == 429 and openai_error(r)["type"] == "requests"
    monkeypatch.undo()
    # a body over the limit, refused before the route is reached (server/body_limit.py)
    import socket

    for path in ("/v1/completions", "/v1/generate"):
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {1 << 40}\r\n\r\n".encode())  # fmt: skip
            head, _, body = read_until_closed(s).partition(b"\r\n\r\n")
        assert head.split()[1] == b"413", head
        err = json.loads(body)["error"]
        if path == "/v1/completions":
            assert set(err) == OPENAI_ERROR_KEYS and err["type"] == "invalid_request_error", err
        else:
            assert err["code"] == 413 and err["type"] == "request_entity_too_large", err
    # our own routes keep our shape: the status as `code`, its phrase as `type`
    r = httpx.post(server.url + "/v1/generate", content=b"{", headers={"content-type": "application/json"})
    assert (
        r.status_code == 400
        and r.json()["error"]["type"] == "bad_request"
        and r.json()["error"]["code"] == 400
    )
    r = httpx.post(server.url + "/v1/generate", json={"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"] == {
        "code": 404, "type": "not_found", "message": r.json()["error"]["message"], "param": "model"
    }  # fmt: skip


UNSERVED_OPENAI_URLS = [
    ("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("POST", "/v1/audio/speech"),
    ("POST", "/v1/audio/transcriptions"), ("POST", "/v1/images/generations"), ("POST", "/v1/moderations"),
    ("GET", "/v1/files"), ("POST", "/v1/batches"), ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/assistants"), ("POST", "/v1/threads/runs"), ("GET", "/v1/vector_stores"),
    ("POST", "/v1/uploads"), ("GET", "/v1/realtime"), ("POST", "/v1/edits"), ("GET", "/v1/engines/davinci"),
    ("GET", "/v1/chat/completions/chatcmpl-1"), ("DELETE", "/v1/models/x/y"),
]  # fmt: skip


@pytest.mark.parametrize("method, path", UNSERVED_OPENAI_URLS)
def test_a_part_of_openais_api_this_server_lacks_is_openais_invalid_url_404(oai, server, method, path):
    """/v1/embeddings, /v1/responses and the rest of OpenAI's API that this server does not serve answered
    our own 404 ({"code": 404, "type": "not_found", "message": "Not Found"}; an audit), where OpenAI's
    answers `{"error": {"message": "Invalid URL (POST /v1/embeddings)", "type": "invalid_request_error",
    "param": null, "code": null}}`. Now OpenAI's, saying what this server serves; other unknown paths keep
    our own shape."""
    r = httpx.request(
        method, server.url + path, json={"model": TEXT, "input": "a"} if method == "POST" else None
    )
    err = openai_error(r)
    assert r.status_code == 404 and err["type"] == "invalid_request_error" and err["param"] is None, r.text
    assert err["message"].startswith(f"Invalid URL ({method} {path}): this server serves only "), err
    assert "POST /v1/chat/completions" in err["message"], err
    if path == "/v1/embeddings":
        with pytest.raises(openai.NotFoundError) as e:
            oai.embeddings.create(model=TEXT, input="a")
        assert (
            e.value.body["message"].startswith("Invalid URL (POST /v1/embeddings)") and e.value.code is None
        )


def test_an_unknown_path_outside_openais_api_keeps_our_own_404(server):
    from server.errors import is_openai_path

    for path in ("/v1/nothing", "/v1", "/v1/", "/nothing", "/x/v1/embeddings", "/v1/generate/x"):
        assert not is_openai_path(path), path
    for path in ("/v1/nothing", "/nothing"):
        r = httpx.post(server.url + path, json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404, r.text
        assert r.json()["error"]["type"] == "not_found", r.text


def test_the_openai_routes_answer_406_to_an_accept_that_takes_neither_json_nor_the_stream(oai, server):
    """A stream needs an Accept that takes text/event-stream, or application/json (what the openai client
    sends with every request, streams too); a plain answer needs application/json. Else a 406 in
    OpenAI's shape, before anything is generated; streams were answered whatever the Accept."""
    from server_support import metric

    routes = [
        ("/v1/completions", {"model": TEXT, "prompt": "A", "max_tokens": 3}),
        ("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "A"}]}),
    ]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        body = routes[0][1]
        for accept in (None, "*/*", "text/event-stream", "text/*", "application/json"):
            r = c.post("/v1/completions", json={**body, "stream": True}, headers={} if accept is None else
                       {"Accept": accept})  # fmt: skip
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), accept
        assert c.post("/v1/completions", json=body, headers={"Accept": "application/json"}).status_code == 200
        for path, body in routes:
            if path.endswith("chat/completions"):  # tiny-text has no chat template: its 400 naming
                body = {**body, "model": TEXT}  # `model` comes after the 406
            refused = [(True, a) for a in ("audio/wav", "text/plain", "text/event-stream;q=0")]
            refused += [(False, a) for a in ("text/event-stream", "audio/wav", "text/html")]
            for stream, accept in refused:
                before = metric(c, "s4_tokens_generated_total", TEXT)
                r = c.post(path, json={**body, "stream": stream}, headers={"Accept": accept})
                err = openai_error(r)
                assert r.status_code == 406 and err["type"] == "invalid_request_error", (path, accept, r.text)
                assert accept in err["message"]
                assert metric(c, "s4_tokens_generated_total", TEXT) == before
    # the openai client's streams (Accept: application/json) work
    chunks = list(oai.completions.create(model=TEXT, prompt="A", max_tokens=3, seed=1, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_schema_lists_a_406_for_the_routes_that_answer_one(server):
    """/openapi.json lists a 406 (an Accept the route cannot answer) on the routes that check Accept, and only
    there: /tokenize and /detokenize listed it (OPENAI_ERROR_RESPONSES less the 429) and answer their JSON
    whatever the Accept (vLLM's routes do too)."""
    bodies = {
        ("post", "/v1/generate"): {"model": TEXT, "prompt": "A", "max_new_tokens": 2},
        ("post", "/v1/completions"): {"model": TEXT, "prompt": "A", "max_tokens": 2},
        ("post", "/v1/chat/completions"): {"model": TEXT, "messages": [{"role": "user", "content": "A"}]},
        ("post", "/tokenize"): {"model": TEXT, "prompt": "A"},
        ("post", "/detokenize"): {"model": TEXT, "tokens": [65]},
        ("get", "/v1/models"): None,
        ("get", "/v1/models/{model_id}"): None,
    }
    with httpx.Client(base_url=server.url, timeout=60) as c:
        paths = c.get("/openapi.json").json()["paths"]
        listed = {(m, p) for p, ops in paths.items() for m, op in ops.items() if "406" in op["responses"]}
        answered = set()
        for (method, path), body in bodies.items():
            assert method in paths[path], (method, path)
            r = c.request(method.upper(), path.replace("{model_id}", TEXT), json=body,
                          headers={"Accept": "text/plain"})  # fmt: skip
            if r.status_code == 406:
                answered.add((method, path))
    assert listed == answered, (sorted(listed - answered), sorted(answered - listed))


def test_openai_error_objects_by_status():
    """APIError.openai_body for each status the OpenAI routes can answer (a stream's error event too:
    `data: {"error": …}`, which the openai client raises as APIError)."""
    from server.errors import APIError, as_openai, prompt_too_long

    for status, param, kind, code in [
        (400, None, "invalid_request_error", None),
        (422, "temperature", "invalid_request_error", None),  # → 400 on these routes
        (401, None, "invalid_request_error", "invalid_api_key"),
        (404, "model", "invalid_request_error", "model_not_found"),
        (406, None, "invalid_request_error", None),
        (413, "prompt", "invalid_request_error", None),  # a body over the limit: OpenAI's status kept
        (415, None, "invalid_request_error", None),
        (429, None, "requests", "rate_limit_exceeded"),
        (500, None, "server_error", None),
        (503, None, "server_error", None),
    ]:
        err = as_openai(APIError(status, "why", param=param))
        assert err.status == (400 if status == 422 else status)
        assert err.openai_body() == {"error": {"message": "why", "type": kind, "param": param, "code": code}}
    err = as_openai(prompt_too_long("why", "messages"))  # a prompt over the limit: 413 on our routes
    assert err.status == 400 and err.openai_body() == {
        "error": {"message": "why", "type": "invalid_request_error", "param": "messages",
                  "code": "context_length_exceeded"}
    }  # fmt: skip


def test_a_prompt_over_the_limit_is_openais_400_context_length_exceeded(oai, server, chat_server):
    """OpenAI answers a prompt too long for the model with 400, code `context_length_exceeded` (what
    clients look for to shorten it); these routes answered our 413 with a null code, which the openai
    client raises as a bare APIStatusError. Every way a prompt arrives: text, token ids, chat messages;
    our own routes keep the 413."""
    limit = server.state.settings.max_prompt_tokens
    chat, _ = chat_server
    assert chat.state.settings.max_prompt_tokens == limit
    too_long = [
        (server, "/v1/completions", {"prompt": "a" * (limit + 1)}, "prompt"),
        (server, "/v1/completions", {"prompt": [65] * (limit + 1)}, "prompt"),
        (server, "/v1/completions", {"prompt": ["a", "é" * (limit // 2 + 1)]}, "prompt"),  # bytes count
        (chat, "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user",
                                        "content": "a" * (limit + 1)}]}, "messages"),
    ]  # fmt: skip
    for s, route, body, param in too_long:
        r = httpx.post(s.url + route, json={"model": TEXT, "max_tokens": 1, **body})
        err = openai_error(r)
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", (route, r.text[:300])
        assert err["param"] == param and err["type"] == "invalid_request_error", err
        assert f"the limit is {limit}" in err["message"], err
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=TEXT, prompt="a" * (limit + 1), max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    r = httpx.post(server.url + "/v1/generate", json={"model": TEXT, "prompt": "a" * (limit + 1)})
    assert r.status_code == 413 and (r.json()["error"]["code"], r.json()["error"]["param"]) == (413, "prompt")


def test_an_answer_cannot_ask_for_more_than_a_bounded_number_of_logprobs(chat_server):
    """64 echoed prompts of 8,192 bytes with logprobs 20 (a 0.5 MB request) made a 260 MB answer, held the
    event loop for 23 s and the process's memory by 0.9 GiB; n × max_tokens × top_logprobs did the same
    on both routes. Samples × token positions × (1 + k) is at most MAX_LOGPROB_VALUES (a 400 naming the
    field, before anything is queued); a prompt scored at the server's length still fits."""
    s, _ = chat_server
    prompt = "to be, or not " * 585  # 8,190 bytes
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "a"}], "logprobs": True}
    big = [
        ("/v1/completions", {"prompt": [prompt] * 2, "max_tokens": 0, "echo": True, "logprobs": 20}),
        ("/v1/completions", {"prompt": "a", "max_tokens": 4096, "n": 4, "logprobs": 20}),
        ("/v1/chat/completions", {**chat, "max_tokens": 4096, "n": 4, "top_logprobs": 20}),
    ]
    for (route, fields), param in zip(big, ("logprobs", "logprobs", "top_logprobs")):
        r = httpx.post(s.url + route, json={"model": TEXT, **fields})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, r.text[:300])
        assert "more than 262144 in one answer" in r.json()["error"]["message"]
    scored = {"model": TEXT, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 20}
    r = httpx.post(s.url + "/v1/completions", json=scored, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["top_logprobs"]) == 8190


def test_tokenize_and_detokenize_read_and_write_text_as_the_text_routes_do(server):
    """vLLM's /tokenize and /detokenize on a byte-level model: the prompt's UTF-8 bytes as ids (the text
    routes' reading), their OpenAI spellings with return_token_strs, no unknown words, this server's prompt
    limit as max_model_len; a longer prompt is the completions route's 400 (context_length_exceeded). Ids
    back to text; bad input is a 400 in OpenAI's shape naming the field, for an audio model too."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/tokenize", json={"model": TEXT, "prompt": "héllo\n", "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == list("héllo\n".encode()) and body["count"] == 7
        assert body["token_strs"] == ["h", "bytes:\\xc3", "bytes:\\xa9", "l", "l", "o", "\n"]
        limit = server.state.settings.max_prompt_tokens
        assert body["unknown_words"] == [] and body["max_model_len"] == limit
        assert c.post("/tokenize", json={"model": TEXT, "prompt": "ab"}).json()["token_strs"] is None
        r = c.post("/detokenize", json={"model": TEXT, "tokens": body["tokens"]})
        assert r.status_code == 200 and r.json() == {"prompt": "héllo\n"}
        assert c.post("/detokenize", json={"model": TEXT, "tokens": [0xC3]}).json()["prompt"] == "\ufffd"
        r = c.post("/tokenize", json={"model": TEXT, "prompt": "x" * (limit + 1)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        V = server.state.models[TEXT].config.vocab_size
        for path, body, param in [
            ("/tokenize", {"model": AUDIO, "prompt": "a"}, "model"),
            ("/tokenize", {"model": TEXT}, "prompt"),
            ("/tokenize", {"model": TEXT, "prompt": 5}, "prompt"),
            ("/tokenize", {"model": TEXT, "prompt": "a", "extra": 1}, "extra"),
            ("/detokenize", {"model": TEXT, "tokens": [V]}, "tokens"),
            ("/detokenize", {"model": TEXT, "tokens": [-1]}, "tokens.0"),
            ("/detokenize", {"model": TEXT, "tokens": ["a"]}, "tokens.0"),
        ]:
            r = c.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["type"] == "invalid_request_error", (path, body, r.text)
            assert err["param"] == param, (path, body, err)
        r = c.post("/tokenize", json={"model": "nope", "prompt": "a"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_a_non_streamed_answer_is_built_and_serialized_off_the_event_loop(chat_server, monkeypatch):
    """Completions and chat answers were built, validated and serialized on the event loop: one answer of
    MAX_LOGPROB_VALUES log-probabilities (16 echoed 8,000-token prompts, logprobs 1: 7.2 MB) held every
    other stream for 0.3 s (a helper's audit). Both are built in a worker thread now (usage is computed
    as part of the answer, so it is called there), and the answer is what the response model says."""
    import threading

    from server.routes import openai as routes

    s, _ = chat_server
    threads: list[int] = []
    real = routes.usage
    monkeypatch.setattr(routes, "usage", lambda *a: (threads.append(threading.get_ident()), real(*a))[1])
    asked = {"max_tokens": 4, "seed": 1}
    body = {"model": TEXT, "prompt": PROMPT, "echo": True, "logprobs": 2, **asked}
    completion = httpx.post(s.url + "/v1/completions", timeout=60, json=body)
    chat = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}],
                            "logprobs": True, "top_logprobs": 2, **asked})  # fmt: skip
    assert completion.status_code == 200 and chat.status_code == 200, (completion.text, chat.text)
    assert completion.headers["content-type"] == chat.headers["content-type"] == "application/json"
    body = completion.json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"].startswith(PROMPT)
    assert len(body["choices"][0]["logprobs"]["top_logprobs"]) == len(PROMPT) + 4
    assert len(chat.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert len(threads) == 2 and s.thread.ident not in threads
