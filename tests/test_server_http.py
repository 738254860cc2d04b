"""HTTP endpoints through a real uvicorn: health, models, generate (JSON, SSE, WAV), completions, metrics."""

import base64
import io
import json
import socket
import threading
import time
import wave

import httpx
import numpy as np
import pytest
from server_support import (
    ServerThread,
    b64,
    check_usage,
    metric,
    reference,
    slots_settled,
    sse_events,
    wait_for,
)

from model.codecs import MuLaw, read_wav, wav_bytes
from model.form_cache import STATUSES
from model.sampling import SamplingParams

TEXT, AUDIO = "tiny-text", "tiny-audio"
HOLD_S = 1.0  # how long the SSE stream of the metrics test is held after its first event


def test_health_ready_and_refused_checkpoint_is_reported(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] and body["models"] == [TEXT, AUDIO]
    assert "not valid JSON" in body["failed"]["broken"]  # not served, and the reason is given
    for route, extra in (("/v1/generate", {}), ("/v1/completions", {}), ("/v1/sessions", {})):
        r = client.post(route, json={"model": "broken", "prompt": "a", **extra})  # the request says why too
        err = r.json()["error"]
        assert r.status_code == 404 and err["param"] == "model", (route, r.text)
        assert err["message"].startswith("model 'broken' is configured but not served: ")
        assert "not valid JSON" in err["message"]
    r = client.post("/v1/generate", json={"model": "nosuch", "prompt": "a"})
    assert r.status_code == 404 and "no model 'nosuch'; see GET /v1/models" in r.json()["error"]["message"]


def test_readyz_is_503_while_draining(client, server):
    server.state.draining = True
    try:
        assert client.get("/readyz").status_code == 503
        r = client.post("/v1/generate", json={"model": TEXT, "prompt": "a"})
        assert r.status_code == 503 and "Retry-After" in r.headers
    finally:
        server.state.draining = False
    assert client.get("/readyz").status_code == 200


def test_require_all_models_withholds_readiness_while_a_checkpoint_is_not_served(client, server):
    """S4_REQUIRE_ALL_MODELS: this server's "broken" checkpoint failed at load, so /readyz answers 503 and
    names it, while the models that did load keep serving requests (readiness only, for an orchestrator)."""
    assert not server.state.settings.require_all_models and client.get("/readyz").status_code == 200
    server.state.settings.require_all_models = True
    try:
        r = client.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and not body["ready"] and body["models"] == [TEXT, AUDIO]
        want = "not every configured model is served (S4_REQUIRE_ALL_MODELS): broken: "
        assert body["reason"].startswith(want)
        assert "not valid JSON" in body["reason"]
        g = client.post("/v1/generate", json={"model": TEXT, "prompt": "a", "max_new_tokens": 2})
        assert g.status_code == 200 and len(g.json()["tokens"]) == 2
    finally:
        server.state.settings.require_all_models = False
    assert client.get("/readyz").status_code == 200


def test_a_server_that_requires_all_models_does_not_log_ready_when_one_failed(model_dirs, caplog):
    """With S4_REQUIRE_ALL_MODELS and a checkpoint that failed, the start-up log says "not ready" and why,
    as /readyz does (it said "ready: serving …" while /readyz answered 503)."""
    from server import Settings

    dirs = [str(model_dirs["text"]), str(model_dirs["broken"])]
    with caplog.at_level("INFO", logger="server"):
        s = ServerThread(Settings(checkpoints=dirs, max_sessions=2, require_all_models=True))
        s.thread.start()
        try:
            assert wait_for(lambda: s.state.loaded, 120)
            assert httpx.get(s.url + "/readyz").status_code == 503
        finally:
            s.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "server"]
    assert not any(m.startswith("ready: serving") for m in lines), lines
    line = next(m for m in lines if "not ready (S4_REQUIRE_ALL_MODELS)" in m)
    assert line.startswith(f"serving {TEXT}; not ready") and "broken: " in line


def test_models_describe_kind_sizes_and_state_bytes(client, server):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(data) == {TEXT, AUDIO}
    t, a = data[TEXT], data[AUDIO]
    assert (t["kind"], t["sample_rate"], a["kind"], a["sample_rate"]) == ("text", None, "audio", 8000)
    assert (t["vocab_size"], t["n_layers"], t["d_model"], t["d_state"]) == (256, 2, 32, 16)
    rec = server.state.models[TEXT].rec
    assert t["state_bytes_per_session"] == rec.state_bytes_per_sequence == 2 * 32 * rec.M * 2 * 4


def test_generate_equals_the_library_one_shot(client, model_dirs):
    req = {"model": TEXT, "prompt": "to be, or", "max_new_tokens": 48, "seed": 7, "temperature": 0.9,
           "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.3}  # fmt: skip
    r = client.post("/v1/generate", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3, seed=7)
    want = reference(model_dirs["text"], list(b"to be, or"), params, 48)
    assert body["tokens"] == want
    assert body["text"] == bytes(want).decode("utf-8", errors="replace")
    assert body["finish_reason"] == "length"
    check_usage(body["usage"], 9, 48)
    assert client.post("/v1/generate", json=req).json()["tokens"] == want  # same seed, same tokens


def test_sse_streams_the_same_tokens_then_a_done_event(client):
    req = {"model": TEXT, "prompt": "whether", "max_new_tokens": 40, "seed": 3}
    whole = client.post("/v1/generate", json=req).json()
    with client.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    tokens = [i for e in events if e["type"] == "token" for i in e["ids"]]
    assert tokens == whole["tokens"]
    assert "".join(e["text"] for e in events if e["type"] == "token") == whole["text"]
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"
    # the same prompt a second time: its state after all but its last token comes from the prefix cache
    cached = {"cached_tokens": len("whether") - 1}
    assert events[-1]["usage"] == {**whole["usage"], "prompt_tokens_details": cached}


def test_stop_sequence_ends_the_text_before_it(client, model_dirs):
    req = {"model": TEXT, "prompt": "the slings", "max_new_tokens": 60, "seed": 11}
    free = client.post("/v1/generate", json=req).json()["tokens"]
    i = next(k for k in range(3, 60) if 97 <= free[k] <= 122)  # a lowercase letter after a few tokens
    stop = chr(free[i]) + chr(free[i + 1])
    i = bytes(free).find(stop.encode())  # its first occurrence
    r = client.post("/v1/generate", json={**req, "stop": [stop, "@@"]}).json()
    assert r["finish_reason"] == "stop"
    assert r["tokens"] == free[: i + 2]  # generation ends with the stop sequence...
    assert r["text"] == bytes(free[:i]).decode("utf-8", errors="replace")  # ...which the text leaves out
    with client.stream("POST", "/v1/generate", json={**req, "stop": stop, "stream": True}) as s:
        events = sse_events(s)
    assert "".join(e["text"] for e in events if e["type"] == "token") == r["text"]  # held back while partial
    assert events[-1]["finish_reason"] == "stop"


def test_completions_are_openai_shaped_json_and_stream(client):
    req = {"model": TEXT, "prompt": "to take arms", "max_tokens": 30, "seed": 5, "temperature": 0.8,
           "top_p": 0.9, "logprobs": None, "user": "ignored"}  # fmt: skip
    ours = client.post(
        "/v1/generate",
        json={"model": TEXT, "prompt": "to take arms", "max_new_tokens": 30, "seed": 5, "temperature": 0.8,
              "top_p": 0.9},
    ).json()  # fmt: skip
    r = client.post("/v1/completions", json=req).json()
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-")
    assert r["choices"][0]["text"] == ours["text"] and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {  # (the prompt was ingested just before: all but its last token from the cache)
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
        "prompt_tokens_details": {"cached_tokens": 11},
    }
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == ours["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert client.post("/v1/completions", json={**req, "prompt": ["to take arms"]}).json()["choices"][0][
        "text"
    ] == ours["text"]  # fmt: skip
    r = client.post("/v1/completions", json={**req, "model": AUDIO})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_audio_generate_gives_wav_in_json_or_raw(client, model_dirs):
    x = 0.5 * np.sin(np.arange(400) * 2 * np.pi * 440 / 8000)
    req = {"model": AUDIO, "prompt_audio": b64(wav_bytes(x, 8000)), "max_new_tokens": 50, "seed": 2}
    body = client.post("/v1/generate", json=req).json()
    prompt = MuLaw().encode(read_wav(wav_bytes(x, 8000))[0]).tolist()
    assert body["tokens"] == reference(model_dirs["audio"], prompt, SamplingParams(seed=2), 50)
    assert body["usage"]["prompt_tokens"] == 400 and "text" not in body
    wav = base64.b64decode(body["audio"])
    with wave.open(io.BytesIO(wav)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == (8000, 1, 2, 50)
    raw = client.post("/v1/generate", json=req, headers={"Accept": "audio/wav"})
    assert raw.headers["content-type"] == "audio/wav" and raw.content == wav
    assert raw.headers["x-finish-reason"] == "length" and raw.headers["x-completion-tokens"] == "50"
    # a prompt at another rate is resampled to the model's
    at16k = client.post("/v1/generate", json={**req, "prompt_audio": b64(wav_bytes(x, 16000))}).json()
    assert at16k["usage"]["prompt_tokens"] == 200


def test_the_accept_header_is_negotiated_and_a_type_the_route_cannot_give_is_406(client):
    """Accept picks the answer of a plain /v1/generate: audio/wav (or audio/*) named by it gives an audio
    model's raw WAV; */*, none or application/json give JSON; an Accept that takes neither (audio/wav to
    a text model, text/plain) is a 406 saying what the model answers, before anything is generated (a
    text model once answered `Accept: audio/wav` with JSON and a 200: a fresh-user trial)."""
    text = {"model": TEXT, "prompt": "a", "max_new_tokens": 2, "seed": 1}
    audio = {"model": AUDIO, "max_new_tokens": 2, "seed": 1}
    for body, accept, want in [
        (text, None, "application/json"),
        (text, "*/*", "application/json"),
        (text, "application/json, audio/wav;q=0.5", "application/json"),
        (text, "audio/wav", 406),
        (text, "text/plain", 406),
        (text, "application/json;q=0, audio/*", 406),
        (audio, "*/*", "application/json"),
        (audio, "audio/wav", "audio/wav"),
        (audio, "audio/*", "audio/wav"),
        (audio, "audio/wav;q=0, application/json", "application/json"),
        (audio, "text/html", 406),
    ]:
        headers = {} if accept is None else {"Accept": accept}
        before = metric(client, "s4_tokens_generated_total", body["model"])
        r = client.post("/v1/generate", json=body, headers=headers)
        if want == 406:
            assert r.status_code == 406, (accept, r.text)
            assert f"model {body['model']} answers application/json" in r.json()["error"]["message"]
            assert metric(client, "s4_tokens_generated_total", body["model"]) == before  # nothing generated
        else:
            assert r.status_code == 200 and r.headers["content-type"].startswith(want), (accept, r.headers)


def test_accept_q_values_choose_between_json_and_wav(client):
    """A plain audio /v1/generate answers what the Accept header prefers by q (RFC 9110 12.5.1): the
    most specific range sets a type's q (audio/wav over audio/* over */*), JSON wins a tie, and `*/*`
    alone does not ask for WAV (curl's) unless JSON is refused. WAV was chosen whenever the header
    took it at all: `application/json, audio/wav;q=0.1` got a WAV (an audit)."""
    audio = {"model": AUDIO, "max_new_tokens": 2, "seed": 1}
    json_, wav = "application/json", "audio/wav"
    for accept, want in [
        ("application/json, audio/wav;q=0.1", json_),
        ("audio/wav;q=0.1, application/json;q=0.9", json_),
        ("audio/wav;q=0.9, application/json;q=0.1", wav),
        ("audio/wav, application/json", json_),  # a tie
        ("audio/*;q=0.2, audio/wav, application/json;q=0.5", wav),  # audio/wav's own q, 1
        ("audio/wav;q=0.3, audio/*, application/json;q=0.5", json_),  # audio/wav's own q, 0.3
        ("audio/*;q=0.6, application/json;q=0.5", wav),
        ("audio/wav, */*;q=0.1", wav),
        ("audio/wav;q=0, */*", json_),
        ("application/json;q=0, */*", wav),
        ("application/json;q=0, audio/wav;q=0, */*", 406),
        ("application/json;q=0.5, */*", json_),
        # a q outside [0, 1] (or not a number) counts as 0: refused, not ranked below another 0
        ("application/json;q=-0.5, audio/wav;q=0", 406),
        ("audio/wav;q=2, application/json;q=0.5", json_),
        ("audio/wav;q=nan, application/json;q=0.1", json_),
    ]:
        r = client.post("/v1/generate", json=audio, headers={"Accept": accept})
        if want == 406:
            assert r.status_code == 406, (accept, r.text)
        else:
            assert r.status_code == 200 and r.headers["content-type"].startswith(want), (accept, r.headers)
    text = {"model": TEXT, "prompt": "a", "max_new_tokens": 2, "seed": 1}
    for accept, status in [
        ("audio/wav;q=0.9, application/json;q=0.1", 200),
        ("application/json;q=0, */*", 406),
    ]:
        r = client.post("/v1/generate", json=text, headers={"Accept": accept})
        assert r.status_code == status, (accept, r.text)
    for accept, status in [
        ("text/event-stream;q=0.1, application/json", 200),
        ("text/event-stream;q=0, */*", 406),  # (it was streamed: text/event-stream's own q is 0)
    ]:
        r = client.post("/v1/generate", json={**audio, "stream": True}, headers={"Accept": accept})
        assert r.status_code == status, (accept, r.text)


def test_a_stream_is_406_unless_accept_takes_text_event_stream(client):
    """stream: true answers Server-Sent Events, so an Accept that does not take text/event-stream (or
    text/*, */*; no Accept takes anything) is a 406 before anything is generated, for both kinds of
    model. It was streamed whatever the Accept, `audio/wav` included (a fresh-user trial)."""
    for body in (
        {"model": TEXT, "prompt": "A", "max_new_tokens": 3, "seed": 1, "stream": True},
        {"model": AUDIO, "max_new_tokens": 3, "seed": 1, "stream": True},
    ):
        for accept in (
            None,
            "*/*",
            "text/event-stream",
            "text/*",
            "application/json;q=0.5, text/event-stream",
        ):
            headers = {} if accept is None else {"Accept": accept}
            r = client.post("/v1/generate", json=body, headers=headers)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), accept
        for accept in ("audio/wav", "audio/*", "application/json", "text/plain", "text/event-stream;q=0"):
            before = metric(client, "s4_tokens_generated_total", body["model"])
            r = client.post("/v1/generate", json=body, headers={"Accept": accept})
            assert r.status_code == 406, (body["model"], accept, r.text)
            assert (
                "text/event-stream" in r.json()["error"]["message"] and accept in r.json()["error"]["message"]
            )
            assert metric(client, "s4_tokens_generated_total", body["model"]) == before  # nothing generated


def test_metrics_expose_latency_histograms_and_gauges(client):
    names = ("s4_time_to_first_token_seconds_count", "s4_inter_token_latency_seconds_count",
             "s4_tokens_generated_total", "s4_decode_batch_size_count",
             "s4_decode_batch_size_sum")  # fmt: skip
    before = {n: metric(client, n, TEXT) if n in client.get("/metrics").text else 0.0 for n in names}
    client.post("/v1/generate", json={"model": TEXT, "prompt": "x", "max_new_tokens": 5, "seed": 1})
    got = {n: metric(client, n, TEXT) - before[n] for n in names}
    # alone, 5 tokens: one first token, 4 gaps, and every decode step a batch of one row
    assert got["s4_time_to_first_token_seconds_count"] == 1
    assert got["s4_inter_token_latency_seconds_count"] == 4
    assert got["s4_tokens_generated_total"] == 5
    assert got["s4_decode_batch_size_count"] >= 4
    assert got["s4_decode_batch_size_sum"] == got["s4_decode_batch_size_count"]
    text = client.get("/metrics").text
    for name in ("s4_time_to_first_token_seconds", "s4_inter_token_latency_seconds",
                 "s4_request_duration_seconds", "s4_decode_batch_size"):  # fmt: skip
        assert f"# TYPE {name} histogram" in text
        assert float(text.split(f'{name}_count{{model="{TEXT}"}} ')[1].split()[0]) >= 1
    assert metric(client, "s4_tokens_generated_total", TEXT) >= 5
    for name in ("s4_active_sessions", "s4_state_resident_bytes", "s4_queue_depth", "s4_state_pool_bytes"):
        metric(client, name, TEXT)
    assert "# TYPE s4_rejections_total counter" in text


def test_the_token_latency_buckets_resolve_an_audio_models_real_time_token(client, server):
    """An audio model makes a token per sample (125 µs of audio at 8 kHz, 62.5 µs at 16 kHz), and the
    time-to-first-token and inter-token histograms started at 1 ms: on a real server 2,769 of an 8 kHz
    model's 2,798 inter-token gaps (99 %) fell in the first bucket, and 43 of a text model's 64 (on CPU),
    so no query could tell a real-time stream from one eight times slower. Their bounds now reach below
    a sample's period at 16 kHz, three of them below 1 ms; an audio generation's gaps are all counted."""
    from prometheus_client.parser import text_string_to_metric_families

    def bounds_and_count(name: str) -> tuple[list[float], float]:
        (family,) = [f for f in text_string_to_metric_families(client.get("/metrics").text) if f.name == name]
        mine = [s for s in family.samples if s.labels.get("model") == AUDIO]
        count = next(s.value for s in mine if s.name == name + "_count")
        return sorted(float(s.labels["le"]) for s in mine if s.name == name + "_bucket"), count

    rate = server.state.models[AUDIO].sample_rate
    for name in ("s4_time_to_first_token_seconds", "s4_inter_token_latency_seconds"):
        bounds, _ = bounds_and_count(name)
        assert bounds[0] <= 1 / max(rate, 16_000), (name, bounds)
        assert len([b for b in bounds if b < 0.001]) >= 3, (name, bounds)
    _, before = bounds_and_count("s4_inter_token_latency_seconds")
    r = client.post("/v1/generate", json={"model": AUDIO, "max_new_tokens": 400, "seed": 1})
    assert r.status_code == 200
    _, after = bounds_and_count("s4_inter_token_latency_seconds")
    assert after - before == 399  # one gap between each two of its 400 tokens


def test_metrics_follow_prometheus_conventions_and_every_known_series_is_there_from_the_start(model_dirs):
    """On a fresh server, before any request: the exposition parses (prometheus_client's parser); every
    counter ends in _total and has its HELP and TYPE; units come last (bytes, seconds) and ratios end in
    _ratio; each labelled counter's known label values are exported at 0 (a series that appears only at
    its first event loses that event to rate()); no *_created series; a text model has no audio series.
    Then one generation moves s4_generations_total{finish_reason="length"} by exactly one. (From a
    fresh-user trial's review of /metrics.)"""
    from prometheus_client.parser import text_string_to_metric_families

    from server import Settings, metrics

    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])])).start()
    try:
        text = httpx.get(s.url + "/metrics").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert "_created" not in text
        for f in families.values():
            assert f"# HELP {f.name}" in text and f.documentation, f.name
            if f.type == "counter":
                assert f"{f.name}_total" in text, f.name
            assert not any(f.name.endswith(u) for u in ("_bytes_resident", "_factor", "_error")), f.name

        def labels(name: str, key: str, **fixed) -> set[str]:
            return {x.labels[key] for x in families[name].samples if x.name == name + "_total"
                    and all(x.labels.get(k) == v for k, v in fixed.items()) and x.value == 0}  # fmt: skip

        assert labels("s4_session_store_operations", "op") == set(metrics.STORE_OPS)
        assert labels("s4_session_store_errors", "op") == set(metrics.STORE_ERROR_OPS)
        assert labels("s4_auth_failures", "transport") == set(metrics.AUTH_TRANSPORTS)
        assert labels("s4_connections_closed", "reason") == set(metrics.CLOSE_REASONS)
        assert labels("s4_connections_refused", "reason") == set(metrics.CONNECTION_REFUSALS)
        assert labels("s4_requests_refused", "reason") == set(metrics.REQUEST_REFUSALS)
        for model in (TEXT, AUDIO):
            assert labels("s4_rejections", "reason", model=model) == set(metrics.REJECTION_REASONS)
            assert labels("s4_generations", "finish_reason", model=model) == set(metrics.FINISH_REASONS)
        audio_models = {x.labels["model"] for x in families["s4_audio_stream_realtime_ratio"].samples}
        assert audio_models == {AUDIO}
        assert {x.labels["model"] for x in families["s4_state_resident_bytes"].samples} == {TEXT, AUDIO}
        rows = {(x.labels["model"], x.labels["kind"]): x.value
                for x in families["s4_prefix_cache_rows"].samples}  # fmt: skip
        assert rows == {(m, kind): 0 for m in (TEXT, AUDIO) for kind in ("kept", "spare")}
        # each model's load: its layers by where their recurrent form came from, and the seconds it took
        forms = {(x.labels["model"], x.labels["source"]): x.value
                 for x in families["s4_recurrent_form_layers"].samples}  # fmt: skip
        assert forms.keys() == {(m, src) for m in (TEXT, AUDIO) for src in ("cache", "converted")}
        for m in (TEXT, AUDIO):
            assert forms[m, "cache"] + forms[m, "converted"] == 2  # (TINY: 2 layers)
        # what the recurrent-form cache (on: tests/conftest.py's S4_RECURRENT_CACHE) holds after the load
        held = {x.labels["status"]: x.value for x in families["s4_recurrent_cache_bytes"].samples}
        assert held.keys() == set(STATUSES) and held["current"] > 0, held
        load = {(x.labels["model"], x.labels["phase"]): x.value
                for x in families["s4_model_load_seconds"].samples}  # fmt: skip
        phases = ("official", "read", "convert", "warm_up")
        assert load.keys() == {(m, p) for m in (TEXT, AUDIO) for p in (*phases, "total")}
        assert all(0 < load[m, "convert"] < load[m, "total"] for m in (TEXT, AUDIO))
        for m in (TEXT, AUDIO):  # (the phases add up to the total)
            assert load[m, "total"] == pytest.approx(sum(load[m, p] for p in phases), rel=1e-9)
        r = httpx.post(s.url + "/v1/generate", json={"model": TEXT, "prompt": "a", "max_new_tokens": 3})
        assert r.json()["finish_reason"] == "length"
        after = {x.labels["finish_reason"]: x.value
                 for f in text_string_to_metric_families(httpx.get(s.url + "/metrics").text)
                 if f.name == "s4_generations" for x in f.samples if x.labels["model"] == TEXT}  # fmt: skip
        assert after == {"stop": 0, "length": 1, "cancelled": 0}
    finally:
        s.stop()


def http_requests(client) -> dict[tuple[str, str, str], float]:
    """http_requests_total by (handler, method, status), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(x.labels["handler"], x.labels["method"], x.labels["status"]): x.value
            for f in text_string_to_metric_families(client.get("/metrics").text)
            if f.name == "http_requests" for x in f.samples if x.name == "http_requests_total"}  # fmt: skip


def test_http_requests_are_counted_by_route_template_method_and_exact_status(client, monkeypatch):
    """prometheus-fastapi-instrumentator's http_requests_total and http_request_duration_seconds in the
    app's registry: a route's template, not its path (a session id or an unknown path adds no series:
    "none"), the exact status (422, not 4xx), an SSE stream timed to its end, probes and scrapes not
    counted (server/app.py instrument_http)."""
    from server.engine import Stream

    # the SSE stream is held HOLD_S after its first event has reached this client, so it lasts at least that
    # long on the server whatever the machine's load (its time was compared with this client's own timings,
    # ~0.1 s, which a descheduled client thread could exceed)
    held, release, deliver = [False], threading.Event(), Stream.deliver

    def held_deliver(self, n: int) -> None:  # (the event loop) the first hand-over once armed waits
        deliver(self, n)
        if held[0]:
            held[0] = False
            release.wait(60)

    monkeypatch.setattr(Stream, "deliver", held_deliver)

    def generate_seconds() -> float:  # http_request_duration_seconds_sum of POST /v1/generate
        line = next(line for line in client.get("/metrics").text.splitlines() if line.startswith(
            'http_request_duration_seconds_sum{handler="/v1/generate",method="POST"}'))  # fmt: skip
        return float(line.rsplit(" ", 1)[1])

    client.post("/v1/generate", json={"model": TEXT, "prompt": "a", "max_new_tokens": 2})
    before = http_requests(client)
    s0 = generate_seconds()
    client.post("/v1/generate", json={"model": TEXT, "prompt": "a", "max_new_tokens": 2})
    client.post("/v1/generate", json={"model": TEXT, "prompt": "a", "max_new_tokens": -1})
    stream = {"model": TEXT, "prompt": "a", "max_new_tokens": 2000, "seed": 1, "stream": True}
    held[0] = True
    with client.stream("POST", "/v1/generate", json=stream) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        time.sleep(HOLD_S)
        release.set()
        assert '"done"' in [line for line in lines if line][-1]
    client.get("/v1/sessions/sess-no-such-session")
    client.get("/v1/sessions/sess-another-one")
    client.get("/no/such/path/x1")
    client.get("/no/such/path/x2")
    client.get("/healthz")
    client.get("/readyz")
    after = http_requests(client)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    assert delta == {
        ("/v1/generate", "POST", "200"): 2,
        ("/v1/generate", "POST", "422"): 1,
        ("/v1/sessions/{session_id}", "GET", "404"): 2,
        ("none", "GET", "404"): 2,
    }, delta
    assert not any(h in ("/healthz", "/readyz", "/metrics") for h, _, _ in after)
    assert not any("sess-" in h or "/no/such" in h for h, _, _ in after)
    # the stream is timed to its last event, not to its headers: it was held HOLD_S after its first event
    assert generate_seconds() - s0 >= HOLD_S, generate_seconds() - s0


def test_methods_the_app_does_not_serve_add_no_series_beyond_other(client):
    """Every method the HTTP parser takes became a `method` label value of http_requests_total and
    http_request_duration_seconds (34 methods on 16 paths: /metrics from 300 lines to 4,092, without a
    key). A method no route serves is counted as "other" (server/app.py
    METHOD_LABELS); the methods the routes serve keep their own."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.app import METHOD_LABELS, ROUTE_MODULES

    def method_values() -> dict[str, set[str]]:  # each family with a method label: its values
        families = text_string_to_metric_families(client.get("/metrics").text)
        return {f.name: {x.labels["method"] for x in f.samples} for f in families
                if f.name.startswith("http_") and any("method" in x.labels for x in f.samples)}  # fmt: skip

    served = {m for module in ROUTE_MODULES for r in module.router.routes for m in getattr(r, "methods", ())}
    assert "POST" in served and served <= METHOD_LABELS  # (a route with another method: add it there)
    before = http_requests(client)
    odd = ("PROPFIND", "MKCALENDAR", "LINK", "QUERY", "PURGE")
    for method in odd:
        for path in ("/v1/generate", "/v1/models", "/v1/sessions/sess-x", "/no/such/path"):
            r = client.request(method, path)
            assert r.status_code in (404, 405), (method, path, r.status_code)
    families = method_values()
    assert {"http_requests", "http_request_duration_seconds"} <= families.keys(), families.keys()
    for name, values in families.items():
        assert values <= METHOD_LABELS | {"other"}, (name, values)
        assert not values & set(odd), (name, values)
    after = http_requests(client)
    other = sum(v - before.get(k, 0.0) for k, v in after.items() if k[1] == "other")
    assert other == len(odd) * 4


def test_openapi_documents_every_endpoint(client):
    paths = client.get("/openapi.json").json()["paths"]
    sid = "/{session_id}"
    sessions = ["", sid, sid + "/fork", sid + "/append", sid + "/export", "/import"]
    for p in ["/v1/models", "/v1/generate", "/v1/completions", "/healthz", "/readyz", "/metrics"] + [
        "/v1/sessions" + s for s in sessions
    ]:
        assert p in paths, p
    assert "GenerateRequest" in client.get("/openapi.json").text


def test_client_disconnect_stops_generation_and_frees_the_slot(client, server):
    """A streamed generate whose client leaves: the generation stops and its one-shot session goes, slot
    and all. (Checked against the slot count before the request, the test failed on a sound server when an
    earlier test's socket session was deleted after that count was taken, as on a loaded machine.)"""
    engine, table = server.state.models[TEXT].engine, server.state.sessions
    req = {"model": TEXT, "prompt": "long", "max_new_tokens": 4000, "seed": 1}
    with client.stream("POST", "/v1/generate", json={**req, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.active_requests >= 1 and any(r.ephemeral for r in table.records(TEXT))
    # SSE: the response task is cancelled at once; the engine drops the request at its next step
    assert wait_for(lambda: slots_settled(engine, table, TEXT), 60)
    assert wait_for(lambda: metric(client, "s4_active_sessions", TEXT) == engine.pool.in_use, 10)


def test_a_plain_json_client_that_leaves_mid_generation_cancels_it(limited):
    """A non-streaming generate: the server polls for the client's disconnect while it waits, and the
    generation ends cancelled, its slot free. (The client left after 0.3 s and the test asserted all that
    within 3 s: a time bound, and a machine fast enough to generate the 4,000 tokens in 0.3 s tested
    nothing.) The client leaves once the generation runs, 200,000 tokens (minutes) on the limited server."""
    engine = limited.state.models[TEXT].engine
    body = json.dumps({"model": TEXT, "prompt": "long", "max_new_tokens": 200_000, "seed": 1}).encode()
    request = (
        f"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    table = limited.state.sessions
    with httpx.Client(base_url=limited.url, timeout=60) as c:
        assert wait_for(lambda: engine.active_requests == 0, 60)  # (an earlier test's turn ended)
        ended = metric(c, "s4_generations_total", TEXT, finish_reason="cancelled")
        with socket.create_connection(("127.0.0.1", limited.port)) as s:
            s.sendall(request + body)
            assert wait_for(
                lambda: engine.active_requests == 1 and any(r.ephemeral for r in table.records(TEXT)), 60
            )
        # (not a slot count from before: the 1 s TTL takes an earlier test's idle session meanwhile)
        assert wait_for(lambda: slots_settled(engine, table, TEXT), 60)
        assert metric(c, "s4_generations_total", TEXT, finish_reason="cancelled") == ended + 1


PROMETHEUS_ACCEPT = (  # what Prometheus 2 sends to a target by default (its scrape_protocols)
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_metrics_are_openmetrics_where_the_scraper_asks_else_the_text_format_it_asked_for(client):
    """/metrics wrote the text format whatever the Accept header, labelled `text/plain; version=1.0.0` (a
    version no Prometheus 2 asks for). Now Prometheus's Accept gets OpenMetrics 1.0.0 (ending `# EOF`,
    so a cut-off scrape is seen as one), parsed by prometheus_client's OpenMetrics parser, with the same
    series as the text format, which a client sending no Accept, or text/plain;version=0.0.4, gets
    under that version."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    from prometheus_client.parser import text_string_to_metric_families

    def series(families) -> set:
        return {(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples}

    om = client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    assert om.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0;"), om.headers
    assert om.text.endswith("\n# EOF\n")
    for accept in (None, "text/plain;version=0.0.4", "text/plain"):
        text = client.get("/metrics", headers={"Accept": accept} if accept else {})
        assert text.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8", accept
        assert series(openmetrics(om.text)) == series(text_string_to_metric_families(text.text))


@pytest.mark.parametrize(
    "accept, content_type",
    [
        ("application/openmetrics-text; version=abc", "text/plain; version=0.0.4"),
        ("application/openmetrics-text; version=1.x", "text/plain; version=0.0.4"),
        ("text/plain; version=1.0.0 beta", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=x,application/openmetrics-text;version=1.0.0",
         "application/openmetrics-text; version=1.0.0;"),
    ],
)  # fmt: skip
def test_an_unreadable_version_in_accept_is_passed_over_not_a_500(client, accept, content_type):
    """prometheus_client's choose_encoder compares an Accept's `version` with (1, 0, 0) part by part, and
    a part that is not a number (`version=abc`, `1.x`) raised TypeError: /metrics answered 500 to any
    client's Accept. Such a media range is passed over as one the server cannot serve: the next one the
    client accepts is served, else the text format 0.0.4 (a client sending no Accept's)."""
    r = client.get("/metrics", headers={"Accept": accept})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(content_type), r.headers
    assert "s4_tokens_generated_total" in r.text


@pytest.mark.parametrize(
    "accept, served",
    [
        ("application/openmetrics-text; version=9.9.9", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=1.1,text/plain;version=1.0.0", "text/plain; version=1.0.0"),
        ("application/openmetrics-text;version=2.0.0", "application/openmetrics-text; version=2.0.0"),
        ("application/openmetrics-text;version=1.0.0", "application/openmetrics-text; version=1.0.0"),
    ],
)  # fmt: skip
def test_an_openmetrics_version_it_does_not_write_is_passed_over_not_echoed(client, accept, served):
    """prometheus_client's choose_encoder serves any OpenMetrics version of dotted numbers it is asked for
    as the body it writes (1.0.0's), with the version asked for in the Content-Type: `version=9.9.9` was
    answered `application/openmetrics-text; version=9.9.9`. A version other than those it writes (1.0.0,
    2.0.0) is passed over as an unreadable one is: the next range the client accepts, else the text
    format 0.0.4."""
    r = client.get("/metrics", headers={"Accept": accept})
    content_type = r.headers["content-type"]
    assert r.status_code == 200 and content_type.startswith(served + ";"), (r.status_code, content_type)
    assert r.text.endswith("\n# EOF\n") == served.startswith("application/openmetrics-text"), r.text[-40:]


def test_the_schema_documents_what_the_server_sends(client):
    """Found by the schemathesis run: /metrics is text (not JSON), /readyz may answer 503, and the
    import route's octet-stream body is part of the schema (so clients and fuzzers can send one)."""
    paths = client.get("/openapi.json").json()["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        "text/plain", "application/openmetrics-text"]  # fmt: skip
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert "503" in paths["/readyz"]["get"]["responses"]
    body = paths["/v1/sessions/import"]["post"]["requestBody"]
    assert body["required"] and list(body["content"]) == ["application/octet-stream"]


def test_every_get_route_answers_head_with_its_headers_and_no_body(client):
    """RFC 9110 9.3.2: a server answers HEAD as GET, without the body. FastAPI's GET routes (the probes,
    /metrics, /v1/models, a session's info and export) answered 405, which uptime monitors that send HEAD
    by default (UptimeRobot) read as down; Starlette's static routes answered it. Each answers as its GET
    now: the same status, content type and length, no body; a route that takes no GET still answers 405,
    and an unknown path 404."""
    sid = client.post("/v1/sessions", json={"model": "tiny-text", "prompt": "to be"}).json()["session_id"]
    paths = ["/healthz", "/readyz", "/metrics", "/v1/models", "/v1/models/tiny-text", f"/v1/sessions/{sid}",
             f"/v1/sessions/{sid}/export", "/", "/openapi.json"]  # fmt: skip
    for path in paths:
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, (path, head.status_code, got.status_code)
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path.endswith("/export"):  # (its length is known only by building the export: none sent)
            assert "content-length" not in head.headers, head.headers
            assert head.headers["content-disposition"] == got.headers["content-disposition"]
        elif path not in ("/metrics", "/readyz"):  # (their bodies change between two requests)
            assert head.headers["content-length"] == got.headers["content-length"], path
    assert client.head("/v1/generate").status_code == client.get("/v1/generate").status_code == 405
    assert client.head("/v1/no/such/path").status_code == 404
    assert client.head("/v1/sessions/sess-0123").status_code == 404
    assert client.head("/v1/sessions/sess-0123/export").status_code == 404


def test_a_405_names_every_method_its_path_serves_in_allow(client):
    """RFC 9110 15.5.6: a 405 MUST carry Allow, the methods the resource serves. Starlette's 405 carried it,
    but the app's handler answered it in the error shape without its headers (no Allow on any route, ours or
    OpenAI's), and Starlette's names only the first route matching the path (GET for PUT on a session, whose
    path serves DELETE too). A path's every route counts, and HEAD beside GET (server.app.HeadAsGet)."""
    sid = client.post("/v1/sessions", json={"model": TEXT, "prompt": "to be"}).json()["session_id"]
    cases = {  # (method, path): the methods the path serves
        ("GET", "/v1/generate"): "POST",
        ("HEAD", "/v1/generate"): "POST",
        ("GET", "/v1/completions"): "POST",  # (OpenAI's error shape)
        ("PUT", "/v1/chat/completions"): "POST",
        ("POST", "/v1/models"): "GET, HEAD",
        ("DELETE", f"/v1/models/{TEXT}"): "GET, HEAD",
        ("PUT", f"/v1/sessions/{sid}"): "DELETE, GET, HEAD",
        ("GET", f"/v1/sessions/{sid}/append"): "POST",
        ("POST", "/healthz"): "GET, HEAD",
        ("POST", "/static/app.js"): "GET, HEAD",  # (a mount's static files)
    }
    for (method, path), allow in cases.items():
        r = client.request(method, path)
        assert r.status_code == 405, (method, path, r.status_code)
        assert r.headers.get("allow") == allow, (method, path, r.headers)
        if method != "HEAD":
            assert r.headers["content-type"] == "application/json" and "error" in r.json(), r.text
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204


def test_a_plain_http_request_to_the_websocket_endpoint_is_426_with_upgrade(client):
    """GET /v1/stream without a WebSocket handshake (curl, a browser's address bar, a proxy that dropped
    the Upgrade header) was a 404, as if the route did not exist. RFC 9110 15.5.22: 426 Upgrade Required,
    which MUST carry Upgrade (here `websocket`, named in Connection as 7.8 asks), in the error shape, and
    the message says what to do; HEAD as GET; another method is a 405 naming GET and HEAD; the connection
    stays usable (no switch of protocol). R5's note of session 59."""
    for method in ("GET", "HEAD"):
        r = client.request(method, "/v1/stream")
        assert r.status_code == 426, (method, r.status_code, r.text)
        assert r.headers["upgrade"] == "websocket" and r.headers["connection"].lower() == "upgrade", r.headers
        if method == "GET":
            err = r.json()["error"]
            assert err["code"] == 426 and err["type"] == "upgrade_required", err
            assert "WebSocket endpoint" in err["message"] and "POST /v1/generate" in err["message"], err
    r = client.post("/v1/stream", json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.headers
    assert client.get("/healthz").status_code == 200  # (the same connection: the client keeps one)


def test_a_head_of_an_export_neither_claims_nor_keeps_the_session_alive(client, server):
    """HEAD /v1/sessions/{id}/export is answered as session info is (no claim, no restore, no TTL
    refreshed) with the export's headers: it ran the export, so a monitor's HEAD marked the session used
    (its idle TTL counted again from each HEAD: kept alive for ever; with a session store, restored onto
    the replica and its store TTL extended), and was a 409 while a turn ran on the session. Tolerance 0:
    last_used is the float the server holds."""
    sid = client.post("/v1/sessions", json={"model": "tiny-text", "prompt": "to be"}).json()["session_id"]
    before = client.get(f"/v1/sessions/{sid}").json()["last_used"]
    for _ in range(3):
        head = client.head(f"/v1/sessions/{sid}/export")
        assert head.status_code == 200 and head.headers["content-type"] == "application/octet-stream"
    assert client.get(f"/v1/sessions/{sid}").json()["last_used"] == before
    rec = server.state.sessions.claim(sid)  # (as a running turn holds it: a GET of the export is 409)
    try:
        assert client.get(f"/v1/sessions/{sid}/export").status_code == 409
        assert client.head(f"/v1/sessions/{sid}/export").status_code == 200
    finally:
        server.state.sessions.release(rec)
