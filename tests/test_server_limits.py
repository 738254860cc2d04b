"""Limits and bad input: 429 + Retry-After, 413, 422 naming the field, 404; never a 500, the server lives."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from server_support import b64, refusal_status, wait_for
from websockets.asyncio.client import connect

TEXT, AUDIO = "tiny-text", "tiny-audio"


@pytest.fixture
def tight(limited):
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        yield c


def _ws_error(url: str, msg: dict) -> dict:
    async def main():
        async with connect(url) as ws:
            await ws.send(json.dumps(msg))
            while (m := json.loads(await ws.recv()))["type"] != "error":
                pass
            return m

    return asyncio.run(main())


def test_a_full_slot_pool_answers_429_with_retry_after(tight, limited):
    ids = [
        tight.post("/v1/sessions", json={"model": TEXT, "prompt": "x"}).json()["session_id"] for _ in range(3)
    ]
    for r in (
        tight.post("/v1/sessions", json={"model": TEXT}),
        tight.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 2}),
        tight.post("/v1/completions", json={"model": TEXT, "prompt": "x"}),
        tight.post(f"/v1/sessions/{ids[0]}/fork"),
        tight.post("/v1/sessions/import", content=tight.get(f"/v1/sessions/{ids[0]}/export").content),
    ):
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert "slots" in r.json()["error"]["message"]
    assert _ws_error(limited.ws_url, {"type": "session", "model": TEXT})["code"] == 429
    text = tight.get("/metrics").text
    assert 'reason="sessions_full"' in text
    for sid in ids:
        assert tight.delete(f"/v1/sessions/{sid}").status_code == 204
    r = tight.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 2})
    assert r.status_code == 200  # capacity is back


def _drain(lines) -> None:
    try:
        for _ in lines:
            pass
    except (httpx.HTTPError, RuntimeError, OSError, AttributeError):
        pass  # closed under us


def test_a_full_queue_answers_429(tight, limited, monkeypatch):
    """max_batch_size=1, max_queued_requests=1: one decoding, one waiting, the third is refused."""
    engine = limited.state.models[TEXT].engine
    step = engine.rec.step

    # ~20 ms a step, so that a's reader keeps up and a keeps decoding: the stream holds 4 tokens, and
    # the reader shares the GIL with the server's threads (1 ms steps let a fall behind on a loaded
    # machine, pause, and give its row to b, which left the queue empty for c)
    def paced_step(*args, **kwargs):
        time.sleep(20e-3)
        return step(*args, **kwargs)

    monkeypatch.setattr(engine.rec, "step", paced_step)
    # the native decode block (K steps in one C call) would bypass the paced step: one step at a time
    monkeypatch.setattr(engine.rec, "decode_block_ready", lambda batch: False)
    a = tight.send(
        tight.build_request(
            "POST",
            "/v1/generate",
            json={"model": TEXT, "prompt": "a", "max_new_tokens": 200_000, "stream": True},
        ),  # fmt: skip
        stream=True,
    )
    lines = a.iter_lines()
    next(lines)  # a is decoding; keep reading it so that it stays in the batch (a reader that
    # stopped would pause it within a few thousand tokens and give its row to b)
    reader = threading.Thread(target=lambda: _drain(lines), daemon=True)
    reader.start()
    b = tight.send(
        tight.build_request(
            "POST", "/v1/generate", json={"model": TEXT, "prompt": "b", "max_new_tokens": 5, "stream": True}
        ),  # fmt: skip
        stream=True,
    )
    assert wait_for(lambda: engine.queued == 1, 60)  # b waits for a batch row
    r = tight.post("/v1/generate", json={"model": TEXT, "prompt": "c", "max_new_tokens": 5})
    assert r.status_code == 429 and "queued" in r.json()["error"]["message"] and "Retry-After" in r.headers
    assert 'reason="queue_full"' in tight.get("/metrics").text
    a.close()  # a goes away; b runs
    reader.join(10)
    events = [json.loads(line[6:]) for line in b.iter_lines() if line.startswith("data: ")]
    b.close()
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 5
    assert wait_for(lambda: engine.queued == 0 and engine.active_requests == 0, 60)


def test_too_long_prompts_are_refused_naming_the_prompt_everywhere(tight, limited):
    """413 on our routes; on the OpenAI routes OpenAI's 400 with code context_length_exceeded."""
    long, ok = "x" * 65, "x" * 64
    sid = tight.post("/v1/sessions", json={"model": TEXT}).json()["session_id"]
    for method, path, body, status in [
        ("POST", "/v1/generate", {"model": TEXT, "prompt": long}, 413),
        ("POST", "/v1/completions", {"model": TEXT, "prompt": long}, 400),
        ("POST", "/v1/sessions", {"model": TEXT, "prompt": long}, 413),
        ("POST", f"/v1/sessions/{sid}/append", {"prompt": long}, 413),
    ]:
        r = tight.request(method, path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == "prompt", (path, r.text)
        if status == 400:
            assert r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert tight.post(f"/v1/sessions/{sid}/append", json={"prompt": ok}).status_code == 200
    tight.delete(f"/v1/sessions/{sid}")
    err = _ws_error(limited.ws_url, {"type": "generate", "model": TEXT, "prompt": long})
    assert err["code"] == 413


def test_max_new_tokens_over_the_limit_is_422_naming_the_field(tight):
    r = tight.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 200_001})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_new_tokens"
    r = tight.post("/v1/completions", json={"model": TEXT, "prompt": "x", "max_tokens": 200_001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_idle_sessions_expire_after_the_ttl(tight, limited):
    engine = limited.state.models[TEXT].engine
    base = engine.pool.in_use
    sid = tight.post("/v1/sessions", json={"model": TEXT, "prompt": "x"}).json()["session_id"]
    assert tight.get(f"/v1/sessions/{sid}").status_code == 200 and engine.pool.in_use == base + 1
    assert wait_for(lambda: tight.get(f"/v1/sessions/{sid}").status_code == 404, 60, 0.1)
    assert engine.pool.in_use == base


BAD = [  # (body changes, status, param)
    ({"temperature": -1}, 422, "temperature"),
    ({"top_p": 0}, 422, "top_p"),
    ({"top_k": -1}, 422, "top_k"),
    ({"repetition_penalty": 0}, 422, "repetition_penalty"),
    ({"seed": -1}, 422, "seed"),
    ({"seed": "1"}, 422, "seed"),
    ({"stream": "yes"}, 422, "stream"),
    ({"prompt": 5}, 422, "prompt"),
    ({"max_new_tokens": 1.5}, 422, "max_new_tokens"),
    ({"max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"stop": [""]}, 422, "stop.0"),
    ({"stop": ["a"] * 17}, 422, "stop"),
    ({"foo": 1}, 422, "foo"),
    ({"model": None}, 422, "model"),
    ({"prompt": None, "prompt_audio": b64(b"RIFF")}, 422, "prompt_audio"),
    ({"session_id": "sess-nope"}, 404, "session_id"),
    ({"model": "nope"}, 404, "model"),
    ({"model": AUDIO, "prompt": None, "stop": ["a"]}, 422, "stop"),
    ({"model": AUDIO, "prompt": None, "prompt_audio": "!!not base64"}, 422, "prompt_audio"),
    ({"model": AUDIO, "prompt": None, "prompt_audio": b64(b"RIFFjunk")}, 422, "prompt_audio"),
    ({"prompt": None}, 422, "prompt"),  # a text model with nothing to continue from (audio: silence)
]


@pytest.mark.parametrize("change,status,param", BAD, ids=[b[2] + f"-{i}" for i, b in enumerate(BAD)])
def test_bad_fields_are_refused_naming_the_field(client, change, status, param):
    r = client.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 3, **change})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == status and err["message"]


def test_malformed_bodies_get_4xx_and_the_server_lives(client):
    for content, ctype, status in [
        (b"{not json", "application/json", 400),
        (b"\x00\xff\xfe garbage", "application/json", 400),
        (b"[1, 2]", "application/json", 422),
        (b"null", "application/json", 422),
        (b"", "application/json", 422),
        (b'{"model": "tiny-text"}', "text/plain", 415),
        (b'{"model": "tiny-text"}', "application/x-www-form-urlencoded", 415),  # curl -d without -H
        (b'{"model": "tiny-text"}', None, 415),
    ]:
        headers = {} if ctype is None else {"content-type": ctype}
        r = client.post("/v1/generate", content=content, headers=headers)
        assert r.status_code == status, (content, ctype, r.status_code, r.text)
        assert r.json()["error"]["message"] and r.json()["error"]["code"] == status
        if status == 415:
            assert "content-type: application/json" in r.json()["error"]["message"]
            assert f"content-type: {ctype or 'none'})" in r.json()["error"]["message"]
    # every JSON route says so alike, and a JSON type with parameters or a +json type is JSON
    sid = client.post("/v1/sessions", json={"model": TEXT}).json()["session_id"]
    routes = [
        "/v1/generate",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/sessions",
        f"/v1/sessions/{sid}/append",
    ]
    for route in routes:
        r = client.post(
            route, content=b'{"model": "x"}', headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], (route, r.text)
        for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
            r = client.post(route, content=b"[1]", headers={"content-type": ctype})
            assert r.status_code == refusal_status(route), (route, ctype, r.text)
    # OpenAI fields we lack are refused by name (the supported ones: tests/test_openai_api.py)
    for extra, param in [({"suffix": "z"}, "suffix"), ({"n": 17}, "n"), ({"functions": []}, "functions")]:
        r = client.post("/v1/completions", json={"model": TEXT, "prompt": "a", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, extra
    assert client.post("/v1/sessions/import", content=b"\x00" * 100).status_code == 422
    assert client.get("/v1/nothing").status_code == 404 and client.get("/v1/nothing").json()["error"]
    r = client.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 3})
    assert r.status_code == 200 and len(r.json()["tokens"]) == 3
