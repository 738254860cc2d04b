"""What a client on the network could do with one small request, through a real uvicorn: add metric
series without bound, stall the event loop that every other client shares, or get a 500. Each test
replays an attack that worked before its fix."""

import asyncio
import hashlib
import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from server_support import b64
from websockets.asyncio.client import connect

from model.codecs import wav_bytes

TEXT, AUDIO = "tiny-text", "tiny-audio"


def _handlers(client: httpx.Client) -> set[str]:
    """Every `handler` label of http_requests_total."""
    return {s.labels["handler"] for f in text_string_to_metric_families(client.get("/metrics").text)
            if f.name == "http_requests" for s in f.samples}  # fmt: skip


def test_a_path_a_trailing_slash_away_from_a_route_adds_no_metric_series(client):
    """prometheus-fastapi-instrumentator labels a path that would match a route once a trailing slash is
    added or removed (Starlette redirects it) with the path itself: `GET /v1/sessions/<any id>/` made a
    series per request (1.2 KB of /metrics and 1.7 KB of memory each, with or without an API key).
    Such paths are "none", as any unknown path."""
    paths = ["/v1/sessions/sess-attack-1/", "/v1/models/attack-2/", "/v1/sessions/sess-attack-3/export/",
             "/v1/generate/", "/no/such/attack-4/"]  # fmt: skip
    for path in paths:
        client.get(path)
    handlers = _handlers(client)
    assert not any("attack" in h or h.endswith("/generate/") for h in handlers), handlers
    assert "none" in handlers


def _state_blob(header: dict) -> bytes:
    """An exported state's format around `header` and no payload, with a valid checksum."""
    head = json.dumps(header).encode()
    body = struct.pack("<8sHI", b"S4STATE\n", 2, len(head)) + head
    return body + hashlib.sha256(body).digest()


def test_a_state_import_with_a_long_or_huge_shape_is_a_quick_422(client):
    """The payload's length was checked against the product of the header's whole shape: 300 sizes of 2**62
    made a product of 5,600 digits, which the error message could not print (a 500), and 40,000 made a
    bignum product that held the event loop for 16 s. The product now stops once past the payload."""
    for shape in ([2**62] * 300, [2**62] * 40_000, [10**4000, 10**4000], [1] * 40_000 + [2]):
        t0 = time.monotonic()
        r = client.post("/v1/sessions/import", content=_state_blob({"dtype": "float32", "shape": shape}),
                        headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["param"] == "state", (len(shape), r.text[:200])
        assert "state payload is 0 bytes" in r.json()["error"]["message"]
        # quick: under half the 16 s the unbounded product held the event loop for (2 s was a speed, which a
        # loaded machine's request could take)
        assert len(r.text) < 1000 and time.monotonic() - t0 < 8.0


def test_audio_prompts_are_decoded_off_the_event_loop(server, client, monkeypatch):
    """Decoding a prompt_audio file ran on the event loop: 100 KB of FLAC (30 s at 384 kHz, 8 channels;
    any small compressed file of many frames and channels) took 1.8 s of CPU, and four at once held
    /healthz (a liveness probe) and every other client's stream for 4 s. Every route that takes
    prompt_audio (generate, session create and append, WebSocket generate and append) decodes it in a
    worker thread now (which waits for the decoder's worker process, server/decoder.py), while the event
    loop answers /healthz."""
    decoder = server.state.decoder
    decoders, real = [], decoder.read_audio
    started, probed, overlapped = threading.Event(), threading.Event(), []

    def slow_read_audio(*args, **kwargs):  # the first stands for a costly decode: it lasts until /healthz
        decoders.append(threading.current_thread())  # has answered (or 30 s, had that waited for it)
        if len(decoders) == 1:
            started.set()
            overlapped.append(probed.wait(30))
        return real(*args, **kwargs)

    monkeypatch.setattr(decoder, "read_audio", slow_read_audio)
    audio = b64(wav_bytes(np.zeros(80), 8000))
    # the probe is sent once the decode has started and answered while it runs: events, not durations (a
    # fixed 0.3 s for the decode to start and 0.6 s for the probe were a loaded machine's to miss)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/v1/generate",
                              json={"model": AUDIO, "prompt_audio": audio, "max_new_tokens": 1})  # fmt: skip
        assert started.wait(60)  # (the decode has started)
        assert client.get("/healthz").status_code == 200
        probed.set()
        assert pending.result().status_code == 200
    assert overlapped == [True], "/healthz waited for the decode to end"
    sid = client.post("/v1/sessions", json={"model": AUDIO, "prompt_audio": audio}).json()["session_id"]
    r = client.post(f"/v1/sessions/{sid}/append", json={"prompt_audio": audio})
    assert r.status_code == 200 and r.json()["tokens"] == 160

    async def over_websocket() -> list[str]:
        async with connect(server.ws_url) as ws:
            types = []
            for msg in ({"type": "append", "model": AUDIO, "prompt_audio": audio},
                        {"type": "generate", "prompt_audio": audio, "max_new_tokens": 1}):  # fmt: skip
                await ws.send(json.dumps(msg))
                while (frame := await ws.recv()) and (isinstance(frame, bytes) or json.loads(frame)["type"]
                                                      not in ("appended", "done", "error")):  # fmt: skip
                    pass
                types.append(json.loads(frame)["type"])
            return types

    assert asyncio.run(over_websocket()) == ["appended", "done"]
    assert len(decoders) == 5 and server.thread not in decoders, decoders
