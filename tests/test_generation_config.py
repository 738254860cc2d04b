"""A checkpoint's sampling defaults: `generation_config` in its config.json (as Hugging Face's
generation_config.json). A request that leaves a sampling field out samples with the checkpoint's value,
on every route (HTTP, SSE, WebSocket, OpenAI completions and chat); one that sends the field samples with
its own. A generation_config out of the requests' bounds keeps the checkpoint from being served, and
/readyz says which field."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from server_support import WS_GENERATE, ServerThread, reference, sse_events, token_ids, ws_turn
from websockets.sync.client import connect

from model.sampling import SamplingParams
from server import Settings
from server.chat import ChatTemplate
from server.schemas import GenerationConfig

DEFAULTS = {"temperature": 0.5, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.3, "max_new_tokens": 24}
SAMPLING = {k: v for k, v in DEFAULTS.items() if k != "max_new_tokens"}
PROMPT = "to be, or not"
SHIPPED = json.loads(
    (Path(__file__).resolve().parent.parent / "checkpoints/text-shakespeare/config.json").read_text()
)


@pytest.mark.parametrize(
    "raw, where",
    [
        ([0.9], "generation_config: Input should be a valid dictionary or instance of GenerationConfig"),
        ({"temperature": -0.1}, "generation_config.temperature: Input should be greater than or equal to 0"),
        ({"temperature": 101}, "generation_config.temperature: Input should be less than or equal to 100"),
        ({"temperature": math.nan}, "generation_config.temperature: Input should be a finite number"),
        ({"temperature": "0.9"}, "generation_config.temperature: Input should be a valid number"),
        ({"top_k": 1.5}, "generation_config.top_k: Input should be a valid integer"),
        ({"top_k": -1}, "generation_config.top_k: Input should be greater than or equal to 0"),
        ({"top_p": 0}, "generation_config.top_p: Input should be greater than 0"),
        ({"repetition_penalty": 0}, "generation_config.repetition_penalty: Input should be greater than 0"),
        (
            {"max_new_tokens": 0},
            "generation_config.max_new_tokens: Input should be greater than or equal to 1",
        ),
        ({"max_new_tokens": 8000.0}, "generation_config.max_new_tokens: Input should be a valid integer"),
        (
            {"do_sample": True},
            "generation_config.do_sample: Extra inputs are not permitted (it takes temperature",
        ),
    ],
)
def test_a_generation_config_out_of_the_requests_bounds_is_refused_naming_the_field(raw, where):
    with pytest.raises(ValueError) as err:
        GenerationConfig.from_config({"generation_config": raw})
    assert str(err.value).startswith(where), str(err.value)


def test_the_fields_a_checkpoint_sets_are_its_defaults_and_none_is_none():
    assert GenerationConfig.from_config({}) == {}
    assert GenerationConfig.from_config({"generation_config": {"temperature": 1}}) == {"temperature": 1.0}
    assert GenerationConfig.from_config({"generation_config": DEFAULTS}) == DEFAULTS


@pytest.fixture(scope="module")
def defaults_server(model_dirs, tmp_path_factory):
    """tiny-text with DEFAULTS (and the shipped chat template), and one with a bad generation_config."""
    root = tmp_path_factory.mktemp("generation")
    dirs = {}
    for name, generation in (
        ("tiny-defaults", DEFAULTS),
        ("tiny-bad-defaults", {"temperature": -1}),
        ("tiny-long-defaults", {"max_new_tokens": 100_000}),  # above the server's limit: the limit
    ):
        d = dirs[name] = root / name
        shutil.copytree(model_dirs["text"], d)
        meta = json.loads((d / "config.json").read_text())
        meta |= {"generation_config": generation, "chat_template": SHIPPED["chat_template"], "chat_stop": []}
        (d / "config.json").write_text(json.dumps(meta))
    s = ServerThread(
        Settings(checkpoints=[str(d) for d in dirs.values()], max_sessions=8, max_new_tokens=300)
    ).start()
    yield s, dirs["tiny-defaults"]
    s.stop()


def _want(d, prompt: bytes, n: int, max_new_tokens: int | None = None, **params) -> list[int]:
    return reference(d, list(prompt), SamplingParams(**params), n)


def test_a_bad_generation_config_keeps_its_checkpoint_from_being_served_and_says_why(defaults_server):
    s, _ = defaults_server
    failed = httpx.get(s.url + "/readyz").json()["failed"]
    assert (
        "generation_config.temperature: Input should be greater than or equal to 0"
        in failed["tiny-bad-defaults"]
    )
    models = {m["id"]: m for m in httpx.get(s.url + "/v1/models").json()["data"]}
    assert "tiny-bad-defaults" not in models
    assert models["tiny-defaults"]["generation_config"] == DEFAULTS  # (only the fields it sets)
    assert models["tiny-long-defaults"]["generation_config"] == {"max_new_tokens": 100_000}


def test_a_request_that_leaves_the_fields_out_samples_with_the_checkpoints_defaults(defaults_server):
    s, d = defaults_server
    want = _want(d, PROMPT.encode(), 24, seed=5, **SAMPLING)  # 24: the checkpoint's max_new_tokens
    assert want != _want(d, PROMPT.encode(), 24, seed=5)  # (the defaults change this sample)
    body = {"model": "tiny-defaults", "prompt": PROMPT, "seed": 5}
    r = httpx.post(s.url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["tokens"] == want, r.text
    with httpx.stream("POST", s.url + "/v1/generate", json=body | {"stream": True}, timeout=60) as r:
        events = sse_events(r)
    assert token_ids(events[:-1]) == want and events[-1]["type"] == "done"
    with connect(s.ws_url) as ws:
        frames = ws_turn(ws, {"type": "generate", **body})
    assert frames[-1]["type"] == "done", frames[-1]
    assert token_ids(frames) == want
    # OpenAI: left out, or sent as null (the openai client's "not given")
    for extra in ({}, {"temperature": None, "top_p": None, "max_tokens": None}):
        openai_body = {"model": "tiny-defaults", "prompt": PROMPT, "seed": 5, **extra}
        r = httpx.post(s.url + "/v1/completions", json=openai_body, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == bytes(want).decode(
            errors="replace"
        ), r.text
    messages = [{"role": "user", "content": "Who's there?", "name": "Bernardo"}]
    chat = {"model": "tiny-defaults", "messages": messages, "seed": 5}
    r = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    rendered = ChatTemplate(SHIPPED["chat_template"], []).render(messages).encode()
    reply = bytes(_want(d, rendered, 24, seed=5, **SAMPLING)).decode(errors="replace")
    assert r.json()["choices"][0]["message"]["content"] == reply


def test_the_websocket_script_without_a_length_gets_the_checkpoints_default(defaults_server):
    """scripts/ws_generate.py names no max_new_tokens unless given one (it sent 200 whatever the model:
    25 ms of audio-digits, whose default is one second), so the checkpoint's (24 here) applies."""
    s, d = defaults_server
    want = _want(d, PROMPT.encode(), 24, seed=5, **SAMPLING)
    for extra, n in (([], 24), (["--max-new-tokens", "7"], 7)):
        args = [sys.executable, str(WS_GENERATE), s.ws_url, PROMPT, "--model", "tiny-defaults", "--seed", "5"]
        p = subprocess.run(args + extra, check=False, capture_output=True, timeout=60)
        assert p.returncode == 0, p.stderr
        done = json.loads(p.stderr.decode().strip().splitlines()[-1])
        assert done["type"] == "done" and done["usage"]["completion_tokens"] == n, done
        assert p.stdout == bytes(want[:n]).decode(errors="replace").encode()


def test_a_field_the_request_sends_overrides_the_checkpoints(defaults_server):
    s, d = defaults_server
    body = {"model": "tiny-defaults", "prompt": PROMPT, "max_new_tokens": 24, "seed": 5, "temperature": 1.0,
            "top_k": 0}  # fmt: skip
    want = _want(d, PROMPT.encode(), 24, seed=5, temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.3)
    assert want != _want(d, PROMPT.encode(), 24, seed=5, **SAMPLING)
    r = httpx.post(s.url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["tokens"] == want, r.text
    openai_body = {"model": "tiny-defaults", "prompt": PROMPT, "max_tokens": 24, "seed": 5,
                   "temperature": 1.0, "top_k": -1}  # fmt: skip
    r = httpx.post(s.url + "/v1/completions", json=openai_body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == bytes(want).decode(errors="replace"), (
        r.text
    )


def test_a_checkpoints_max_new_tokens_is_the_length_of_a_generation_that_names_none_within_the_limit(
    defaults_server,
):
    s, _ = defaults_server

    def n_tokens(body):
        r = httpx.post(s.url + "/v1/generate", json={"prompt": PROMPT, "seed": 1, **body}, timeout=60)
        assert r.status_code == 200, r.text
        return len(r.json()["tokens"])

    assert n_tokens({"model": "tiny-defaults"}) == 24
    assert n_tokens({"model": "tiny-defaults", "max_new_tokens": 10}) == 10  # sent: the request's
    assert n_tokens({"model": "tiny-long-defaults"}) == 300  # the server's limit (S4_MAX_NEW_TOKENS)
    r = httpx.post(
        s.url + "/v1/generate", json={"model": "tiny-long-defaults", "prompt": PROMPT, "max_new_tokens": 301}
    )
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_new_tokens", r.text  # sent: checked
    body = {"model": "tiny-long-defaults", "prompt": PROMPT, "seed": 1}
    r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300, r.text
    with connect(s.ws_url) as ws:
        frames = ws_turn(ws, {"type": "generate", "model": "tiny-defaults", "prompt": PROMPT, "seed": 1})
    assert frames[-1]["type"] == "done" and frames[-1]["usage"]["completion_tokens"] == 24, frames[-1]


def test_a_default_length_above_the_servers_limit_is_said_at_load(model_dirs, tmp_path, caplog):
    import logging

    d = tmp_path / "tiny-long"
    shutil.copytree(model_dirs["text"], d)
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(meta | {"generation_config": {"max_new_tokens": 5000}}))
    with caplog.at_level(logging.WARNING, logger="server.models"):
        ServerThread(Settings(checkpoints=[str(d)], max_new_tokens=300)).start().stop()
    assert (
        "tiny-long: generation_config max_new_tokens 5000 is above this server's limit "
        "(300, max_new_tokens): a request that names no length generates 300"
    ) in caplog.text
