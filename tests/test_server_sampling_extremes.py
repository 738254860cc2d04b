"""Issue 16, kind 1, through the server: every numeric sampling field at zero, tiny, denormal, huge,
NaN, ±Infinity and past 2**63, on every route (HTTP JSON, SSE, /v1/completions and its stream, the
WebSocket), for the text and the audio model, through the C sampling pass (plain temperature) and the
torch ops (a filter or penalty on). Each value is refused with a 422 naming the field (an error frame on
the WebSocket, which stays usable) or gives its mathematical limit, checked against the library:
a tiny temperature gives exactly the greedy (temperature 0) tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest
from server_support import b64, reference, sse_events
from websockets.sync.client import connect

from model.codecs import MuLaw, read_wav, wav_bytes
from model.sampling import SamplingParams

TEXT, AUDIO = "tiny-text", "tiny-audio"
N = 10
SMALLEST = 5e-324  # the smallest positive double
WAV = wav_bytes((np.sin(np.arange(400) / 5) * 0.5).astype(np.float32), 8000)
ROUTES = {TEXT: ["json", "sse", "completions", "completions-sse", "ws"], AUDIO: ["json", "sse", "ws"]}
CASES = [(m, r) for m, routes in ROUTES.items() for r in routes]
JSON = {"content-type": "application/json"}


def prompt_of(model: str) -> dict:
    return {"prompt": "ROMEO:"} if model == TEXT else {"prompt_audio": b64(WAV)}


def prompt_ids(model: str) -> list[int]:
    return list(b"ROMEO:") if model == TEXT else MuLaw().encode(read_wav(WAV)[0]).tolist()


def _ws(server, model: str, body: dict):
    with connect(server.ws_url) as ws:
        audio = {} if model == TEXT else {"audio_encoding": "mulaw"}  # binary frames = ids (text: a 422)
        ws.send(json.dumps({"type": "generate", **body, **audio}))
        ids: list[int] = []
        while True:
            m = ws.recv()
            if isinstance(m, bytes):
                ids += list(m)
                continue
            m = json.loads(m)
            if m["type"] == "token":
                ids += m["ids"]
            elif m["type"] == "done":
                return "ok", ids
            elif m["type"] == "error":  # the socket stays usable after a refused frame
                ws.send(
                    json.dumps({"type": "generate", "model": model, **prompt_of(model), "max_new_tokens": 2})
                )
                assert json.loads(ws.recv())["type"] == "session"
                return m["code"], m.get("param")


def _completions(client, body: dict, stream: bool):
    body["max_tokens"] = body.pop("max_new_tokens")
    r = client.post("/v1/completions", content=json.dumps({**body, "stream": stream}), headers=JSON)
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["param"]
    if stream:
        return "ok", "".join(e["choices"][0]["text"] for e in sse_events(r) if e != "[DONE]")
    return "ok", r.json()["choices"][0]["text"]


def run(server, client, model: str, route: str, fields: dict):
    """One request; ("ok", token ids, or the text for completions) or (status, param). Bodies go
    through Python's json, which writes NaN and Infinity literally (as some clients do)."""
    body = {"model": model, **prompt_of(model), "max_new_tokens": N, **fields}
    if route == "ws":
        return _ws(server, model, body)
    if route.startswith("completions"):
        return _completions(client, body, route.endswith("sse"))
    r = client.post("/v1/generate", content=json.dumps({**body, "stream": route == "sse"}), headers=JSON)
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["param"]
    if route == "sse":
        events = sse_events(r)
        assert events[-1]["type"] == "done", events[-1]
        return "ok", [i for e in events if e["type"] in ("token", "audio") for i in e["ids"]]
    return "ok", r.json()["tokens"]


def expected(model_dirs, model: str, route: str, params: SamplingParams):
    """The library's one-shot tokens (the text, for completions)."""
    ids = reference(model_dirs["text" if model == TEXT else "audio"], prompt_ids(model), params, N)
    return bytes(ids).decode("utf-8", errors="replace") if route.startswith("completions") else ids


@pytest.mark.parametrize("model, route", CASES)
def test_tiny_and_denormal_temperatures_give_exactly_the_greedy_tokens(
    server, client, model_dirs, model, route
):
    greedy = expected(model_dirs, model, route, SamplingParams(temperature=0.0))
    assert run(server, client, model, route, {"temperature": 0}) == ("ok", greedy)
    for T in (1e-9, 1e-30, 1e-38, 1e-320, SMALLEST):
        assert run(server, client, model, route, {"temperature": T, "seed": 1}) == ("ok", greedy), T
        # the torch ops (a top_p filter on) give the same limit
        assert run(server, client, model, route, {"temperature": T, "top_p": 0.5, "seed": 1}) == (
            "ok",
            greedy,
        )


LIMITS = [  # fields → the library's params that give the same tokens (the limit they stand for)
    ({"temperature": 100, "seed": 3}, dict(temperature=100.0, seed=3)),
    ({"temperature": 1, "top_p": 1e-320, "seed": 3}, dict(temperature=0.0)),  # tiny top_p: the top token
    ({"temperature": 1, "top_p": SMALLEST, "seed": 3}, dict(temperature=0.0)),
    ({"temperature": 1, "top_k": 2**70, "seed": 3}, dict(temperature=1.0, seed=3)),  # ≥ V: off
    ({"temperature": 1, "top_k": 2**63, "seed": 3}, dict(temperature=1.0, seed=3)),
    ({"temperature": 1, "top_k": 1, "seed": 3}, dict(temperature=0.0)),
    ({"temperature": 1, "repetition_penalty": 1e-320, "seed": 3}, dict(repetition_penalty=1e-320, seed=3)),
    ({"temperature": 1, "repetition_penalty": 100, "seed": 3}, dict(repetition_penalty=100.0, seed=3)),
    ({"temperature": 1, "seed": 2**63 - 1}, dict(temperature=1.0, seed=2**63 - 1)),
]


@pytest.mark.parametrize("model, route", CASES)
def test_other_fields_at_their_extremes_give_their_limits(server, client, model_dirs, model, route):
    for fields, params in LIMITS:
        if route.startswith("completions") and {"top_k", "repetition_penalty"} & set(fields):
            continue  # not completions fields (the OpenAI layer owns its field list)
        want = expected(model_dirs, model, route, SamplingParams(**params))
        assert run(server, client, model, route, fields) == ("ok", want), fields


NAN, INF = float("nan"), float("inf")
REFUSED = [  # (field, value): each is a 422 naming the field
    *[("temperature", v) for v in (NAN, INF, -INF, -1e-320, -0.5, 100.000001, 1e308, 2**64, 2**70, "1")],
    *[("top_p", v) for v in (NAN, INF, -INF, 0, 0.0, -SMALLEST, 1.0000001, 1e308, 2**64)],
    *[("top_k", v) for v in (NAN, INF, -1, 1.5, -(2**70), "5", True)],
    *[("repetition_penalty", v) for v in (NAN, INF, -INF, 0, -1e-320, 100.5, 1e308, 2**64)],
    *[("seed", v) for v in (NAN, INF, -1, -(2**63) - 1, 2**63, 2**70, 1.5)],
    *[("max_new_tokens", v) for v in (NAN, INF, 0, -1, 2**63, 2**70, 1.5)],
]
COMPLETIONS_FIELDS = {"temperature", "top_p", "seed", "max_new_tokens"}
OPENAI_TAKES = {("seed", "-1"), ("top_p", "0"), ("top_p", "0.0")}  # (field, repr(value)): ours refuse them


@pytest.mark.parametrize("model, route", CASES)
def test_non_finite_and_out_of_range_values_are_422_naming_the_field(server, client, model, route):
    for field, value in REFUSED:
        if route.startswith("completions"):
            if field not in COMPLETIONS_FIELDS or isinstance(value, str) or value is True:
                continue  # completions parse OpenAI-style (lax: "1" is a number there)
            if (field, repr(value)) in OPENAI_TAKES:
                continue
            field_name = "max_tokens" if field == "max_new_tokens" else field
        else:
            field_name = field
        status, param = run(server, client, model, route, {field: value})
        want = 400 if route.startswith("completions") else 422  # OpenAI's status on its routes
        assert (status, param) == (want, field_name), (field, value, status, param)
    assert run(server, client, model, route, {"seed": 0})[0] == "ok"  # and the server serves on
