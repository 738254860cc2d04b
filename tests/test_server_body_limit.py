"""Request size (S4_MAX_BODY_BYTES): bodies are limited while they are read, before anything parses
them, on every route; prompt lengths are checked before a prompt is converted to token ids. Against a
real `python -m server` on 127.0.0.1, whose memory is measured (/proc: VmHWM, the peak resident set)."""

from __future__ import annotations

import asyncio
import io
import json
import select
import socket
import sys
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from server_support import ServerThread, b64, read_until_closed, refusal_status

from server.launch import start_server

LIMIT = 16 << 20  # S4_MAX_BODY_BYTES of the server below
HUGE = 64 << 20  # the 64 MB prompt
BODY_TIMEOUT_S = (
    120.0  # S4_BODY_TIMEOUT_S of the server below: how long a server that waited for a body waits
)
TEXT, AUDIO = "tiny-text", "tiny-audio"
PATHS = [  # every kind of route: JSON, state blob, unknown, and one that takes no body at all
    "/v1/generate", "/v1/completions", "/v1/sessions", "/v1/sessions/s/append", "/v1/sessions/import",
    "/nowhere", "/healthz",
]  # fmt: skip


@pytest.fixture(scope="module")
def big_server(model_dirs):
    env = {
        "S4_CHECKPOINTS": str(model_dirs["text"]),
        "S4_MAX_BODY_BYTES": str(LIMIT),
        "S4_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    proc, url = start_server([], timeout_s=120, env=env)
    yield proc, url, int(url.rsplit(":", 1)[1])
    proc.terminate()
    proc.wait(30)


def memory(pid: int) -> dict[str, int]:
    """The process's resident set now (VmRSS) and its peak (VmHWM), in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def peak_growth(pid: int, action) -> int:
    """How far above its resident set before `action()` the process's peak went during it (the peak
    is reset first: writing 5 to /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = memory(pid)["VmRSS"]
    action()
    return memory(pid)["VmHWM"] - before


def refused(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('s4_requests_refused_total{reason="body_too_large"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def head(path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}\r\n".encode()
    )


def declared_only(port: int, path: str, length: int, timeout: float = 60.0) -> tuple[bytes, float]:
    """Send headers declaring `length` body bytes and none of them: (the response, seconds to it)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(head(path, f"Content-Length: {length}\r\n"))
        return read_until_closed(s, timeout), time.monotonic() - t0


def send_chunked(port: int, total: int, chunk: int = 256 << 10) -> tuple[bytes, int]:
    """A chunked body of up to `total` bytes (a JSON prompt of x's), sent while watching for the answer:
    (the response, bytes sent when it came)."""
    piece = b"x" * chunk
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/v1/generate", "Transfer-Encoding: chunked\r\n"))
        first = b'{"model": "tiny-text", "prompt": "'
        s.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        s.setblocking(False)
        got = b""
        while sent < total:
            readable, writable, _ = select.select([s], [s], [], 5)
            if readable:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                got += data
                if not data or b"\r\n\r\n" in got:
                    break
            if writable:
                try:
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    time.sleep(0.01)
        s.setblocking(True)
        return got + read_until_closed(s), sent


def send_declared_body(port: int, size: int) -> bytes:
    """Content-Length: size and the body itself, written until the server stops reading."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head("/v1/generate", f"Content-Length: {size}\r\n"))
        s.settimeout(5)
        try:
            s.sendall(b'{"model": "tiny-text", "prompt": "' + b"x" * size)
        except OSError:  # closed under us once the 413 was sent
            pass
        return read_until_closed(s)


def status_and_error(response: bytes) -> tuple[int, dict, bytes]:
    headers, _, body = response.partition(b"\r\n\r\n")
    return int(headers.split()[1]), json.loads(body)["error"], headers.lower()


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(big_server):
    """On every route, 413 comes back while the client has sent only its headers."""
    _, url, port = big_server
    before = refused(url)
    for path in PATHS:
        response, seconds = declared_only(port, path, HUGE)
        status, error, headers = status_and_error(response)
        assert status == 413 and b"connection: close" in headers, (path, response[:200])
        assert str(LIMIT) in error["message"] and "max_body_bytes" in error["message"]
        # answered while the body never came: long before the body's deadline (a 408 then), which a server
        # that waited for the body would have met (not a wall-clock bound: a loaded machine answers later)
        assert seconds < BODY_TIMEOUT_S / 2, (path, seconds)
    assert refused(url) - before == len(PATHS)
    response, _ = declared_only(port, "/v1/generate", LIMIT, timeout=1.0)  # at the limit: not refused
    assert response == b""  # (it never comes: the server is still waiting for the body)


def test_a_chunked_body_is_refused_once_it_passes_the_limit(big_server):
    _, url, port = big_server
    before = refused(url)
    response, sent = send_chunked(port, HUGE)
    status, error, headers = status_and_error(response)
    assert status == 413 and b"connection: close" in headers and "max_body_bytes" in error["message"]
    assert LIMIT <= sent < LIMIT + (16 << 20), sent  # refused soon after: kernel buffers hold the rest
    assert refused(url) - before == 1


def test_an_ordinary_client_sending_too_much_gets_the_413(big_server):
    """httpx writes the whole body before it reads; the server's early 413 still reaches it."""
    _, url, _ = big_server
    r = httpx.post(url + "/v1/generate", content=b"x" * (LIMIT + 1), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_server_memory_stays_flat_under_huge_bodies(big_server):
    """The issue's 64 MB prompt grew the server by 641 MB before its 413. Now the server's peak RSS
    grows by < 8 MiB under a declared 64 MiB body and under one actually sent (refused before the body
    is read), by < the limit + 8 MiB under a chunked one (read up to the limit); and a prompt just under
    the body limit is refused 413 naming `prompt` by its length, before it becomes token ids (a list:
    8 bytes each, 128 MiB), with the peak < 4 x the limit above (the body, the parsed JSON string, a
    copy while joining the body's chunks)."""
    proc, url, port = big_server
    httpx.post(url + "/v1/generate", json={"model": TEXT, "prompt": "warm", "max_new_tokens": 2}, timeout=30)
    statuses = []

    def declared():
        statuses.append(status_and_error(declared_only(port, "/v1/generate", HUGE)[0])[0])
        statuses.append(status_and_error(send_declared_body(port, HUGE))[0])

    grown = peak_growth(proc.pid, declared)
    assert statuses == [413, 413] and grown < 8 << 20, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    grown = peak_growth(proc.pid, lambda: statuses.append(status_and_error(send_chunked(port, HUGE)[0])[0]))
    assert statuses[-1] == 413 and grown < LIMIT + (8 << 20), f"peak RSS grew by {grown / 2**20:.1f} MiB"
    prompt = "x" * (LIMIT - 1024)
    responses = []
    grown = peak_growth(
        proc.pid,
        lambda: responses.append(
            httpx.post(url + "/v1/generate", json={"model": TEXT, "prompt": prompt}, timeout=60)
        ),
    )
    r = responses[0]
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt", r.text[:200]
    assert grown < 4 * LIMIT, f"peak RSS grew by {grown / 2**20:.1f} MiB"
    r = httpx.post(
        url + "/v1/generate", json={"model": TEXT, "prompt": "to be", "max_new_tokens": 4}, timeout=30
    )
    assert r.status_code == 200  # and the server serves on


def test_session_imports_may_be_as_large_as_a_state_but_other_bodies_not(model_dirs):
    """The import route's limit is the largest state blob (+ 1 MiB), whatever S4_MAX_BODY_BYTES."""
    from server import Settings

    settings = Settings(checkpoints=[str(model_dirs["text"])], max_body_bytes=1024, drain_timeout_s=0)
    s = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            sid = c.post("/v1/sessions", json={"model": TEXT, "prompt": "to be"}).json()["session_id"]
            blob = c.get(f"/v1/sessions/{sid}/export").content
            assert len(blob) > 1024
            r = c.post("/v1/sessions/import", content=blob)
            assert r.status_code == 201, r.text
            r = c.post("/v1/generate", json={"model": TEXT, "prompt": "x" * 1024})
            assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
            r = c.post("/v1/generate", json={"model": TEXT, "prompt": "x" * 900, "max_new_tokens": 1})
            assert r.status_code == 200
    finally:
        s.stop()


def test_every_import_refused_for_its_size_is_counted_once_as_body_too_large(client, server):
    """The import route holds a blob to the largest state (`max_state_blob_bytes`), under the body
    limit (16 MiB here): its own 413, for a declared length or for a chunked body as read, was counted
    in http_requests_total but not in s4_requests_refused_total{reason="body_too_large"}, where every
    other body refused for its size is. Each refusal below counts exactly once, whichever layer
    refused it."""
    limit = server.state.max_state_blob_bytes
    assert limit < (16 << 20)  # (the route's own limit is the one met first)
    port = int(server.url.rsplit(":", 1)[1])

    def counts() -> tuple[float, float]:
        refused = http = 0.0
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('s4_requests_refused_total{reason="body_too_large"}'):
                refused = float(line.rsplit(" ", 1)[1])
            elif line.startswith("http_requests_total{") and 'handler="/v1/sessions/import"' in line:
                http += float(line.rsplit(" ", 1)[1]) if 'status="413"' in line else 0.0
        return refused, http

    def chunks():  # no Content-Length: counted as read
        for _ in range(limit // 65536 + 2):
            yield b"\0" * 65536

    refusals = [
        lambda: client.post("/v1/sessions/import", content=b"\0" * (limit + 1)),  # declared, the route's
        lambda: client.post("/v1/sessions/import", content=chunks()),  # read, the route's
        lambda: status_and_error(declared_only(port, "/v1/sessions/import", 64 << 20)[0]),  # the middleware's
    ]
    for i, refuse in enumerate(refusals):
        before = counts()
        r = refuse()
        status = r.status_code if isinstance(r, httpx.Response) else r[0]
        assert status == 413, (i, r)
        after = counts()
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1), (i, before, after)
    r = client.post("/v1/sessions/import", content=b"\0" * limit)  # at the limit: read, and refused for
    assert r.status_code == 422 and r.json()["error"]["param"] == "state"  # what it holds, not its size
    assert counts()[0] == after[0]


def _wav(n: int, rate: int, width: int = 2, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        dtype = "<i2" if width == 2 else np.uint8
        w.writeframes((np.arange(n * channels) % 50).astype(dtype).tobytes())
    return buf.getvalue()


def test_a_prompt_with_a_lone_surrogate_is_refused_naming_it_on_every_route(client, server):
    """Valid JSON that is not UTF-8 text (it was a 500: UnicodeEncodeError)."""
    bad = "ab\\ud800"  # as JSON text: the escape of a lone surrogate
    for path, body, param in [
        ("/v1/generate", f'{{"model": "{TEXT}", "prompt": "{bad}", "max_new_tokens": 1}}', "prompt"),
        ("/v1/completions", f'{{"model": "{TEXT}", "prompt": "{bad}", "max_tokens": 1}}', "prompt"),
        ("/v1/completions", f'{{"model": "{TEXT}", "prompt": ["ok", "{bad}"], "max_tokens": 1}}', "prompt"),
        ("/v1/sessions", f'{{"model": "{TEXT}", "prompt": "{bad}"}}', "prompt"),
    ]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == refusal_status(path) and r.json()["error"]["param"] == param, (path, r.text)
    # the WebSocket alike (it said "malformed JSON": pydantic's parser refuses the escape; found by a
    # fresh-user trial), for generate and append; JSON that is malformed still says so; the socket serves on
    from websockets.sync.client import connect

    with connect(server.ws_url) as ws:
        for msg in (
            {"type": "generate", "model": TEXT, "prompt": "ab\ud800", "max_new_tokens": 1},
            {"type": "append", "model": TEXT, "prompt": "ab\ud800"},
        ):
            ws.send(json.dumps(msg))  # (ensure_ascii: the lone surrogate as its escape)
            err = json.loads(ws.recv(timeout=30))
            assert (err["type"], err["code"], err["param"]) == ("error", 422, "prompt"), err
            assert "not valid Unicode" in err["message"], err
        ws.send('{"type": "generate", "prompt": ')
        err = json.loads(ws.recv(timeout=30))
        assert err["code"] == 400 and "malformed JSON" in err["message"], err
        ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "ok", "max_new_tokens": 1}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session"


def test_malformed_json_is_one_400_with_the_reason_and_place_on_every_route(client, server):
    """Every route that takes a JSON body, and the WebSocket, say the same for the same malformed text:
    Python's json reason and the character where it stopped. The WebSocket said pydantic's "expected
    ident at line 1 column 2" where HTTP said "Expecting value" with no place (a fresh-user trial)."""
    from websockets.sync.client import connect

    sid = client.post("/v1/sessions", json={"model": TEXT}).json()["session_id"]
    routes = ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/sessions"]
    routes.append(f"/v1/sessions/{sid}/append")
    cases = [  # (text, what json.loads says): each reason's place computed here, not copied from the server
        ('{"type": "generate", "model": ', "Expecting value"),
        ('{"type" "generate"}', "Expecting ':' delimiter"),
        ("{'type': 'generate'}", "Expecting property name enclosed in double quotes"),
        ('{"type": "generate"} x', "Extra data"),
    ]  # (an empty body is another refusal: 422, "the body is missing")
    with connect(server.ws_url) as ws:
        for text, reason in cases:
            with pytest.raises(json.JSONDecodeError) as bad:
                json.loads(text)
            assert bad.value.msg == reason
            want = f"malformed JSON: {reason} at character {bad.value.pos}"
            for path in routes:
                r = client.post(path, content=text.encode(), headers={"content-type": "application/json"})
                got = (r.status_code, r.json()["error"]["message"], r.json()["error"]["param"])
                assert got == (400, want, None), (path, text, r.text)
            ws.send(text)
            err = json.loads(ws.recv(timeout=30))
            assert (err["type"], err["code"], err["message"]) == ("error", 400, want), err
            assert "param" not in err, err  # (a frame names no field it does not have)
        ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "ok", "max_new_tokens": 1}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session"  # the socket serves on
    # a body that is not UTF-8 is malformed too, said as the WebSocket's close 1007 says it (it was
    # FastAPI's "There was an error parsing the body"; a fresh-user trial)
    for body in (b'{"model": "\x80"}', b"\xc3"):
        with pytest.raises(UnicodeDecodeError) as bad:
            body.decode()
        want = f"malformed JSON: invalid UTF-8 ({bad.value.reason}) at byte {bad.value.start}"
        for path in routes:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            got = (r.status_code, r.json()["error"]["message"], r.json()["error"]["param"])
            assert got == (400, want, None), (path, body, r.text)


def test_json_nested_past_max_depth_is_a_413_and_past_pythons_digits_a_400_on_every_route_and_the_websocket(
    client, server
):
    """JSON the grammar allows but no valid request holds, or Python's json does not take.

    Nesting: arrays nested deeper than json's recursion limit were a 400 from RecursionError, at a depth set
    by the interpreter. Before that, the HTTP routes said FastAPI's "There was an error parsing the body" (no
    reason), the WebSocket pydantic's "recursion limit exceeded at line 1 column 267" (a helper's audit).
    Now nesting past json_budget.MAX_DEPTH (32) is refused 413 by the structure count before anything
    parses it, on every route and the socket; 32 deep is parsed (a 422 naming the field it does not fit).
    An integer of more digits than json converts (sys.get_int_max_str_digits) is one 400 with one reason
    everywhere. The socket serves on."""
    from websockets.sync.client import connect

    from server.json_budget import MAX_DEPTH

    sid = client.post("/v1/sessions", json={"model": TEXT}).json()["session_id"]
    routes = ["/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/sessions"]
    routes.append(f"/v1/sessions/{sid}/append")
    digits = sys.get_int_max_str_digits()

    def nested(depth: int) -> str:  # the body's own object is one level: `stop` holds depth - 1
        return f'{{"model": "{TEXT}", "prompt": "a", "stop": {"[" * (depth - 1)}{"]" * (depth - 1)}}}'

    cases = [(nested(d), "depth") for d in (MAX_DEPTH + 1, 1_500, 16_000)]  # (1,500: past json's recursion)
    cases.append((f'{{"model": "{TEXT}", "prompt": "a", "seed": {"9" * (digits + 1)}}}', "digits"))
    depth_msg = (
        f"holds more than {MAX_DEPTH} levels of arrays and objects nested in one another outside strings"
    )
    want = {
        "depth": (413, depth_msg),
        "digits": (400, f"malformed JSON: number out of range (an integer of more than {digits} digits)"),
    }
    with pytest.raises(RecursionError):  # (what json did with the deepest)
        json.loads(cases[1][0])
    with pytest.raises(ValueError) as exc:
        json.loads(cases[-1][0])
    assert not isinstance(exc.value, json.JSONDecodeError)
    with connect(server.ws_url, max_size=None) as ws:
        for text, kind in cases:
            status, message = want[kind]
            for path in routes:
                r = client.post(path, content=text.encode(), headers={"content-type": "application/json"})
                assert r.status_code == status and message in r.json()["error"]["message"], (
                    path,
                    r.text[:300],
                )
            ws.send(text)
            err = json.loads(ws.recv(timeout=30))
            assert (err["type"], err["code"]) == ("error", status) and message in err["message"], err
        for path in routes[:3]:  # at MAX_DEPTH the body is parsed: `stop` is refused by its schema
            r = client.post(
                path, content=nested(MAX_DEPTH).encode(), headers={"content-type": "application/json"}
            )
            assert r.status_code in (400, 422) and "stop" in r.text and "levels" not in r.text, (
                path,
                r.text[:300],
            )
        ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "ok", "max_new_tokens": 1}))
        assert json.loads(ws.recv(timeout=30))["type"] == "session"  # the socket serves on
    client.delete(f"/v1/sessions/{sid}")


def _ws_close_code(url: str, message, compression: str | None) -> tuple[int, str, list[str]]:
    """The close code and reason after sending `message`, and the extensions the handshake agreed."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async def main():
        async with connect(url, max_size=None, compression=compression) as ws:
            agreed = [e.name for e in ws.protocol.extensions]
            await ws.send(message)
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code, exc.rcvd.reason, agreed

    return asyncio.run(main())


def test_websocket_messages_are_bounded_fragments_and_compression_included(server, client):
    """S4_WS_MAX_FRAME_BYTES bounds a whole message: one frame over it, a message of small fragments
    that add up to more, and a compressed frame that inflates to more (1 MB of x's is ~1 KB deflated)
    are each closed with 1009 before the app sees them; the server serves on."""
    limit = server.state.settings.ws_max_frame_bytes
    over = json.dumps({"type": "append", "model": TEXT, "prompt": "x" * limit})
    fragments = [over[i : i + limit // 8] for i in range(0, len(over), limit // 8)]
    assert all(len(f) < limit for f in fragments) and len(fragments) > 8
    cases = {
        "one frame": (over, None),
        "fragments": (fragments, None),
        "deflated": ("x" * 1_000_000, "deflate"),
    }
    assert server.state.settings.ws_compression  # this server offers permessage-deflate (S4_WS_COMPRESSION)
    for name, (message, compression) in cases.items():
        code, reason, agreed = _ws_close_code(server.ws_url, message, compression)
        assert code == 1009 and str(limit) in reason, (name, code, reason)
        assert agreed == (["permessage-deflate"] if compression else []), (name, agreed)
    assert client.get("/healthz").status_code == 200


def test_websocket_compression_is_off_unless_configured(limited):
    """The default (S4_WS_COMPRESSION off): a client that offers permessage-deflate gets plain frames."""
    from websockets.asyncio.client import connect

    assert not limited.state.settings.ws_compression

    async def main():
        async with connect(limited.ws_url, compression="deflate") as ws:
            return [e.name for e in ws.protocol.extensions]

    assert asyncio.run(main()) == []


def test_websocket_audio_frames_are_counted_before_they_are_converted(server):
    """Binary frames of samples are at most the audio prompt limit together: a frame that would pass
    it is refused (413 naming audio, buffer cleared) by its length, unconverted, and with it the
    append that would have used that prompt (tests/test_server_ws.py); exactly the limit is accepted."""
    from websockets.asyncio.client import connect

    from server import service

    limit, _ = service.prompt_limit(server.state, server.state.models[AUDIO])
    frame = 60_000  # < the fixture's ws_max_frame_bytes
    frames = [frame] * (limit // frame) + ([limit % frame] if limit % frame else [])

    async def main():
        out = []
        async with connect(server.ws_url) as ws:

            async def reply(want: str) -> dict:
                while (m := json.loads(await ws.recv()))["type"] not in (want, "error"):
                    pass
                return m

            await ws.send(json.dumps({"type": "session", "model": AUDIO, "audio_encoding": "mulaw"}))
            await reply("session")
            for n in frames:
                await ws.send(bytes(n))
            await ws.send(bytes(1))  # one over: refused, and the buffer is cleared
            out.append(await reply("error"))
            await ws.send(json.dumps({"type": "append"}))  # the append of the refused prompt: refused
            out.append(await reply("appended"))
            for n in frames:
                await ws.send(bytes(n))
            await ws.send(json.dumps({"type": "append"}))
            out.append(await reply("appended"))
        return out

    over, refused, appended = asyncio.run(main())
    assert over["code"] == 413 and over["param"] == "audio"
    assert refused["type"] == "error" and refused["code"] == 413 and refused["param"] == "audio"
    assert appended["type"] == "appended" and appended["usage"]["prompt_tokens"] == limit


def test_the_default_body_limit_admits_the_largest_legitimate_requests():
    """What the README says: at the defaults, a text prompt of S4_MAX_PROMPT_TOKENS control characters
    (6 bytes each in JSON) and an audio prompt of S4_MAX_AUDIO_S as a 48 kHz 16-bit stereo WAV in
    base64 fit S4_MAX_BODY_BYTES with room to spare, and even as 32-bit float stereo (session imports
    have their own bound: the test above)."""
    from server import Settings

    s = Settings()
    n = s.max_prompt_tokens
    text = json.dumps({"model": "text-shakespeare", "prompt": "\x01" * n, "max_new_tokens": s.max_new_tokens})
    assert len(text) > 6 * n and 100 * len(text) < s.max_body_bytes  # 48 KiB
    wav = _wav(round(s.max_audio_s * 48000), 48000, channels=2)
    audio = json.dumps({"model": "audio-digits", "prompt_audio": b64(wav)})
    assert 2 * len(audio) < s.max_body_bytes  # 7.7 MB
    assert (len(wav) - 44) * 2 * 4 / 3 < s.max_body_bytes  # float32 samples: 15.4 MB
