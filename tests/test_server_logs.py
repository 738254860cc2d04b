"""Logs a reader can correlate: X-Request-ID on every HTTP response (the client's when well-formed), that
id and the generation's in the log lines of its request, probes and scrapes at DEBUG, and
S4_LOG_FORMAT=json (one JSON object per line). Found by a fresh-user trial: nothing tied a log line to
a request, and the orchestrator's probes were most of the log."""

import contextlib
import contextvars
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from asgi_correlation_id import correlation_id
from server_support import ServerThread, chat_copy, process_ready, uvicorn_debug_lines, wait_for
from websockets.sync.client import connect

from server import Settings
from server.launch import free_port
from server.logs import TEXT_FORMAT, QuietProbes, RequestIds, TextFormatter, generation_id, redact_session_ids

ROOT = Path(__file__).resolve().parent.parent


def test_every_response_carries_a_request_id_the_clients_when_well_formed(client):
    made = client.get("/v1/models")
    assert len(made.headers["x-request-id"]) == 32  # a new uuid4, hex
    assert made.headers["x-request-id"] != client.get("/v1/models").headers["x-request-id"]
    mine = "trace-4bf92f3577b34da6.a3ce929d0e0e4736"
    assert client.get("/v1/models", headers={"X-Request-ID": mine}).headers["x-request-id"] == mine
    for bad in ("has spaces in it", "x" * 200, "semi;colon"):
        got = client.get("/nope", headers={"X-Request-ID": bad})
        assert got.status_code == 404 and got.headers["x-request-id"] not in (bad, "")
    generated = client.post("/v1/generate", json={"model": "tiny-text", "prompt": "a", "max_new_tokens": 2})
    assert generated.status_code == 200 and generated.headers["x-request-id"]
    assert generated.json()["id"].startswith("gen-")


@contextlib.contextmanager
def server_records():
    """The records the "server" loggers emit meanwhile, at INFO and above, with the ids of the emitting
    context on them (as configure_logging's handler has them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    handler.addFilter(RequestIds())
    logger = logging.getLogger("server")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_plain_request_whose_client_left_is_logged_with_its_request_id(model_dirs):
    """A plain (not streamed) request whose client leaves ends with 499 (server/service.py collect),
    written to a closed connection: uvicorn writes no access line for it, so it was counted in
    http_requests_total{status="499"} and logged nowhere. One INFO line names it, with its request id."""
    server = ServerThread(Settings(checkpoints=[str(model_dirs["text"])], max_new_tokens=10**7)).start()
    with server_records() as records, contextlib.ExitStack() as stop:
        stop.callback(server.stop)
        body = {"model": "tiny-text", "prompt": "long", "max_new_tokens": 10**7, "seed": 1}  # (minutes)
        try:
            httpx.post(server.url + "/v1/generate", json=body, headers={"X-Request-ID": "gone-req-9"},
                       timeout=0.5)  # fmt: skip
        except httpx.ReadTimeout:
            pass  # the client leaves mid-request
        counted = 'http_requests_total{handler="/v1/generate",method="POST",status="499"} 1.0'
        assert wait_for(lambda: counted in httpx.get(server.url + "/metrics").text)  # (its 499, counted)
        assert wait_for(lambda: [r for r in records if "499" in r.getMessage()])
    (line,) = [r for r in records if "499" in r.getMessage()]
    assert line.levelno == logging.INFO and line.request_id == "gone-req-9"
    assert line.getMessage().endswith('"POST /v1/generate" 499 client closed the connection'), (
        line.getMessage()
    )


STREAMED = {  # a streamed request on each route and modality that streams (SSE); max tokens as given
    "/v1/generate text": ("/v1/generate", {"model": "tiny-text", "prompt": "a", "seed": 1}, "max_new_tokens"),
    "/v1/generate audio": (
        "/v1/generate",
        {"model": "tiny-audio", "seed": 1},
        "max_new_tokens",
    ),
    "/v1/completions": ("/v1/completions", {"model": "tiny-text", "prompt": "a", "seed": 1}, "max_tokens"),
    "/v1/chat/completions": (
        "/v1/chat/completions",
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "Who's there?"}], "seed": 1},
        "max_tokens",
    ),
}


def test_a_streamed_request_whose_client_left_before_its_end_is_logged(model_dirs, tmp_path):
    """A streamed answer's access line is uvicorn's, written when it starts: 200 whatever happens after.
    A client that left mid-stream was logged nowhere (a plain request's has its 499 line), so a reader
    of the log saw a 200 for a stream its client never got the end of (a fresh-user trial). Now one INFO
    line says so, with its request id, on every streamed route and modality; a stream read to its end
    has none."""
    chat = chat_copy(model_dirs["text"], tmp_path)
    dirs = [str(model_dirs["text"]), str(model_dirs["audio"]), str(chat)]
    server = ServerThread(Settings(checkpoints=dirs, max_new_tokens=10**7)).start()
    cut = "client closed the connection before the stream's end"
    with server_records() as records, contextlib.ExitStack() as stop:
        stop.callback(server.stop)
        for k, (name, (path, body, limit)) in enumerate(STREAMED.items()):
            rid, whole_rid = f"cut-{k}", f"whole-{k}"
            long = {**body, limit: 200_000, "stream": True}  # (minutes; audio: 25 s)
            with httpx.stream("POST", server.url + path, json=long, headers={"X-Request-ID": rid}) as r:
                assert r.status_code == 200, (name, r.read())
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert wait_for(
                lambda rid=rid: [r for r in records if r.request_id == rid and cut in r.getMessage()]
            )
            (line,) = [r for r in records if r.request_id == rid and cut in r.getMessage()]
            assert line.levelno == logging.INFO, name
            message = line.getMessage()
            assert f'"POST {path}" 200 {cut} (' in message and message.endswith(" bytes sent)"), message
            sent = int(message.rsplit("(", 1)[1].split()[0].replace(",", ""))
            assert sent >= len(first), (name, message)  # (what the client read, at least)
            # the same request, short, read to its end: no such line
            short = {**body, limit: 3, "stream": True}
            with httpx.stream(
                "POST", server.url + path, json=short, headers={"X-Request-ID": whole_rid}
            ) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]" or '"type": "done"' in lines[-1], (name, lines[-1])
        # the instrumentator, outermost, counts a request once every middleware is done with it
        total = 'http_requests_total{handler="/v1/generate",method="POST",status="200"} 4.0'
        assert wait_for(lambda: total in httpx.get(server.url + "/metrics").text)
        assert wait_for(
            lambda: (
                'http_requests_total{handler="/v1/chat/completions",method="POST",status="200"} 2.0'
                in httpx.get(server.url + "/metrics").text
            )
        )
        metrics = httpx.get(server.url + "/metrics").text
        for model, n in (("tiny-text", 2), ("tiny-audio", 1), ("tiny-chat", 1)):  # (as the README says)
            assert f's4_generations_total{{finish_reason="cancelled",model="{model}"}} {n:.1f}' in metrics
    assert not [r for r in records if r.request_id.startswith("whole-") and cut in r.getMessage()]
    assert len([r for r in records if cut in r.getMessage()]) == len(STREAMED)


def test_an_sse_stream_ended_by_an_error_event_is_logged_with_its_request_id(model_dirs, tmp_path):
    """A stream that the server ends with an error event (here its engine fails mid-stream; the end of a
    drain is the other cause) said so to its client only: the access line, written at its start, says
    200, and no line named the request (a WebSocket's error frame has one). Now one INFO line,
    `error event 500: …`, with the request id, on each SSE route (the status the event carries)."""
    chat = chat_copy(model_dirs["text"], tmp_path)
    server = ServerThread(Settings(checkpoints=[str(chat)], max_new_tokens=10**7, drain_timeout_s=1)).start()
    bodies = {  # every SSE route, on the one model, each generating for minutes
        "/v1/generate": {"prompt": "a", "max_new_tokens": 10**6},
        "/v1/completions": {"prompt": "a", "max_tokens": 10**6},
        "/v1/chat/completions": {
            "messages": [{"role": "user", "content": "Who's there?"}],
            "max_tokens": 10**6,
        },
    }
    with server_records() as records, contextlib.ExitStack() as stop:
        stop.callback(server.stop)
        streams, lines = [], []
        for k, (path, body) in enumerate(bodies.items()):
            request = {**body, "model": "tiny-chat", "stream": True, "seed": k}
            r = stop.enter_context(
                httpx.stream("POST", server.url + path, json=request, headers={"X-Request-ID": f"err-{k}"})
            )
            assert r.status_code == 200, r.read()
            streams.append(r.iter_lines())
            lines.append([next(line for line in streams[-1] if line.startswith("data: "))])  # (under way)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the step")

        engine = server.state.models["tiny-chat"].engine
        engine.rec.step = engine.rec.decode_block = broken  # the next decode step fails, mid-stream
        for got, it in zip(lines, streams, strict=True):
            got += [line for line in it if line.startswith("data: ")]
        assert wait_for(lambda: len([r for r in records if r.name == "server.sse"]) == 3)
    errors = [
        json.loads(got[-1][6:]) if got[-1] != "data: [DONE]" else json.loads(got[-2][6:]) for got in lines
    ]
    assert errors[0]["type"] == "error" and errors[0]["code"] == 500, errors[0]  # (the native route's frame)
    assert [e["error"]["type"] for e in errors[1:]] == ["server_error"] * 2, errors  # (OpenAI's, for a 500)
    messages = [errors[0]["message"]] + [e["error"]["message"] for e in errors[1:]]
    logged = sorted((r.request_id, r.levelno, r.getMessage()) for r in records if r.name == "server.sse")
    assert logged == [(f"err-{k}", logging.INFO, f"error event 500: {m}") for k, m in enumerate(messages)]


def test_a_client_that_leaves_while_its_body_is_read_is_a_499_on_every_route(model_dirs):
    """A client that closes the connection partway through its request body: a session import (its blob
    read by the route) was a 500 with an ERROR traceback (ClientDisconnect, a soak audit), and a JSON body
    (read by FastAPI) a 400 "There was an error parsing the body". Each is now a 499, counted and logged
    once at INFO, as every client gone is, with no ERROR line; the server goes on serving."""
    import socket

    server = ServerThread(Settings(checkpoints=[str(model_dirs["text"])])).start()
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(handler)
    routes = {
        "/v1/sessions/import": ("application/octet-stream", b"S4STATE\n" + b"\0" * 1000),
        "/v1/generate": ("application/json", b'{"model": "tiny-text", "prompt": "' + b"a" * 1000),
        "/v1/sessions": ("application/json", b'{"model": "tiny-text", "prompt": "' + b"a" * 1000),
        "/v1/completions": ("application/json", b'{"model": "tiny-text", "prompt": "' + b"a" * 1000),
    }
    try:
        with server_records() as records:
            for path, (media, part) in routes.items():
                with socket.create_connection(("127.0.0.1", server.port)) as s:
                    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: {media}\r\n"
                    s.sendall(head.encode() + b"content-length: 300000\r\n\r\n" + part)
                    time.sleep(0.3)  # (the route is reading the body when the client leaves)
            metrics = ""

            def all_counted() -> bool:
                nonlocal metrics
                metrics = httpx.get(server.url + "/metrics").text
                gone = 'http_requests_total{{handler="{}",method="POST",status="499"}} 1.0'
                return all(gone.format(p) in metrics for p in routes)

            assert wait_for(all_counted), [m for m in metrics.splitlines() if m.startswith("http_requests")]
            assert 'status="500"' not in metrics and 'status="400"' not in metrics
            lines = [r.getMessage() for r in records if " 499 " in r.getMessage()]
            assert sorted(m.split('"')[1] for m in lines) == sorted(f"POST {p}" for p in routes), lines
        made = httpx.post(server.url + "/v1/sessions", json={"model": "tiny-text", "prompt": "a"})
        assert made.status_code == 201, made.text
    finally:
        uvicorn_log.removeHandler(handler)
        server.stop()
    assert not errors, [r.getMessage() for r in errors]


def test_text_lines_name_the_request_and_the_generation_only_inside_one():
    formatter, ids = TextFormatter(TEXT_FORMAT), RequestIds()

    def line(message: str) -> str:
        record = logging.LogRecord("server", logging.INFO, __file__, 1, message, None, None)
        ids.filter(record)
        return formatter.format(record)

    assert line("outside").endswith(" INFO server: outside")
    rid, gid = correlation_id.set("req-1"), generation_id.set("gen-abc")
    try:
        assert line("inside").endswith(" INFO server [req-1 gen-abc]: inside")
    finally:
        correlation_id.reset(rid)
        generation_id.reset(gid)


def test_a_clients_string_in_a_message_cannot_forge_a_line():
    """A session id with a newline in it, logged while the session store was down ("session %s: %s"), wrote
    a forged line of its own into the text log, an access line of the attacker's choosing (a helper's
    audit). Every control character of a message is escaped: one record, one line, its text readable;
    a traceback still follows on its own lines."""
    formatter = TextFormatter(TEXT_FORMAT)
    forged = 'x\n2026-12-06 11:00:00,000 INFO uvicorn.access [admin]: "POST /v1/admin HTTP/1.1" 200'
    for sid in (forged, "x\r\x1b[2Ky", "x\u2028y\x85z", "x\x00y"):
        args = (sid, "down")
        record = logging.LogRecord("server.store", logging.ERROR, __file__, 1, "session %s: %s", args, None)
        text = formatter.format(record)
        assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text, text
        assert text.endswith(f"session {sid.encode('unicode_escape').decode()}: down"), text
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("server", logging.ERROR, __file__, 1, "a\nb", None, sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert lines[0].endswith("server: a\\nb") and lines[1] == "Traceback (most recent call last):"


def test_probe_and_scrape_access_lines_are_debug():
    access = logging.getLogger("test.uvicorn.access")
    quiet = QuietProbes()

    def kept(path: str, level: int) -> tuple[bool, str]:
        access.setLevel(level)
        args = ("127.0.0.1:5000", "GET", path, "1.1", 200)
        message = '%s - "%s %s HTTP/%s" %d'  # uvicorn's access line
        record = logging.LogRecord(access.name, logging.INFO, __file__, 1, message, args, None)
        return quiet.filter(record), record.levelname

    assert kept("/readyz", logging.INFO) == (False, "DEBUG")
    assert kept("/metrics?x=1", logging.INFO) == (False, "DEBUG")
    assert kept("/healthz", logging.DEBUG) == (True, "DEBUG")
    assert kept("/v1/generate", logging.INFO) == (True, "INFO")


def test_json_log_lines_carry_the_request_and_generation_ids(model_dirs):
    """`python -m server` with S4_LOG_FORMAT=json: every line of stderr is one JSON object with time, level,
    logger and message; a generate's access line names the client's X-Request-ID and the generation's
    id; the probes and the scrape made meanwhile are not logged at INFO."""
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--checkpoints", str(model_dirs["text"]),
           "--log-level", "info"]  # fmt: skip
    env = {**os.environ, "S4_LOG_FORMAT": "json", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: process_ready(proc, url), 120, 0.2), "the server did not become ready"
        body = {"model": "tiny-text", "prompt": "to be", "max_new_tokens": 3}
        r = httpx.post(url + "/v1/generate", json=body, headers={"X-Request-ID": "client-req-7"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "client-req-7"
        assert httpx.get(url + "/metrics").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        proc.kill()
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    # RFC 3339 with the offset, as log shippers read it (it was '2026-12-07 03:04:38,916': no zone)
    times = [datetime.fromisoformat(x["time"]) for x in lines]
    assert all(t.tzinfo is not None and re.fullmatch(r"[-\d]{10}T[:\d]{8}\.\d{3}[+-]\d\d:\d\d", x["time"])
               for t, x in zip(times, lines, strict=True)), lines[0]["time"]  # fmt: skip
    assert all(abs((t - datetime.now(UTC)).total_seconds()) < 600 for t in times)  # (the run's own)
    (access,) = [x for x in lines if x["logger"] == "uvicorn.access" and "/v1/generate" in x["message"]]
    assert access["request_id"] == "client-req-7" and access["generation_id"] == r.json()["id"]
    assert access["level"] == "INFO"
    assert not [x for x in lines if "/readyz" in x["message"] or "/metrics" in x["message"]]
    assert any(x["logger"] == "server" and x["message"].startswith("ready: serving") for x in lines)
    assert not [x for x in lines if "color_message" in x]  # uvicorn's coloured copy of a message


def test_the_drain_logs_no_request_id_though_the_signal_interrupts_an_open_websocket(model_dirs):
    """A signal handler runs in the context of whatever the main thread was running, often an open
    WebSocket's task: the SIGTERM line and the drain's lines are the server's and carry no request or
    generation id (once: `INFO server [c492bd…]: SIGTERM: draining`, the id of an unrelated socket, and
    the drain task inherited it). The signal is simulated: handle_exit called in the socket's context."""
    settings = Settings(checkpoints=[str(model_dirs["text"])], drain_timeout_s=0.3, max_new_tokens=1_000_000)
    s = ServerThread(settings, graceful=True).start()
    with server_records() as records, contextlib.ExitStack() as stop:
        stop.callback(s.stop)
        socket_id = "socket-req-7"  # the socket's X-Request-ID (asgi-correlation-id takes a client's)
        with connect(s.ws_url, additional_headers={"X-Request-ID": socket_id}) as ws:
            ws.send(
                json.dumps({"type": "generate", "model": "tiny-text", "prompt": "a", "max_new_tokens": 10**6})
            )
            assert json.loads(ws.recv())["type"] == "session"
            assert json.loads(ws.recv())["type"] == "token"  # the turn is running

            def interrupted() -> None:  # what the main thread runs when the signal lands in the socket's task
                correlation_id.set(socket_id)
                generation_id.set("gen-of-the-socket")
                s.server.handle_exit(signal.SIGTERM, None)

            contextvars.copy_context().run(interrupted)
            while (m := json.loads(ws.recv()))["type"] != "done":
                pass
            assert m["finish_reason"] == "cancelled"  # the drain timed out and cancelled the turn
        s.thread.join(30)
        assert not s.thread.is_alive()
    drain = [r for r in records if "draining" in r.getMessage() or "drain timeout" in r.getMessage()]
    assert len(drain) == 2, [r.getMessage() for r in records]
    assert [(r.request_id, r.generation_id) for r in drain] == [(None, None)] * 2
    assert drain[0].getMessage() == "SIGTERM: draining (up to 0.3 s)"  # (it said "up to 0 s": %.0f)


def test_session_ids_in_log_lines_keep_their_first_8_hex_digits_only(model_dirs):
    """A session id is a capability (128 random bits: whoever holds it reaches the session's state, export
    and delete), so a log read by more people than the clients must not hold it whole. It was in every
    access line of a session route and in the server's own lines (expired, evicted, store). Now `sess-` and
    its first 8 hex digits stay (enough to find a client's session), the rest is dropped: in uvicorn's
    access lines, the server's lines, text and JSON alike."""
    assert redact_session_ids("GET /v1/sessions/sess-0123456789abcdef0123456789abcdef/export") == (
        "GET /v1/sessions/sess-01234567.../export"
    )
    assert (
        redact_session_ids("sess-0123456789abcdef0123456789abcdef0")
        == "sess-0123456789abcdef0123456789abcdef0"
    )
    for fmt in ("text", "json"):
        port = free_port()
        cmd = [sys.executable, "-m", "server", "--port", str(port), "--checkpoints", str(model_dirs["text"]),
               "--log-level", "info", "--session-ttl-s", "1"]  # fmt: skip
        env = {**os.environ, "S4_LOG_FORMAT": fmt, "OMP_WAIT_POLICY": "PASSIVE"}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            assert wait_for(lambda: process_ready(proc, url), 120), "the server did not become ready"
            sids = []
            for _ in range(2):
                made = httpx.post(url + "/v1/sessions", json={"model": "tiny-text"})
                assert made.status_code == 201
                sids.append(made.json()["session_id"])
            kept, expiring = sids
            body = {"model": "tiny-text", "prompt": "to be", "max_new_tokens": 3, "session_id": kept}
            assert httpx.post(url + "/v1/generate", json=body).status_code == 200
            assert httpx.get(f"{url}/v1/sessions/{kept}/export").status_code == 200
            assert httpx.delete(f"{url}/v1/sessions/{kept}").status_code == 204
            # the other one's TTL (1 s) runs out: its expiry line names it
            assert wait_for(lambda: httpx.get(f"{url}/v1/sessions/{expiring}").status_code == 404, 60, 0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            log = proc.stderr.read()
        finally:
            proc.kill()
        if fmt == "json":  # (a message's quotes are escaped in its JSON line)
            log = "\n".join(json.loads(line)["message"] for line in log.splitlines())
        for sid in sids:
            assert sid not in log, (fmt, sid)
        assert f'"DELETE /v1/sessions/{kept[:13]}... HTTP/1.1" 204' in log, fmt
        assert f"/v1/sessions/{kept[:13]}.../export HTTP/1.1" in log, fmt
        assert f"session {expiring[:13]}... expired" in log, fmt


def test_websocket_frames_logged_at_debug_hold_no_prompt_and_no_output(server):
    """At S4_LOG_LEVEL=debug the websockets library logs every frame with its payload's first and last
    characters: `< TEXT '{"prompt": "…", …}'`, the client's prompt, and `> TEXT '{"type": "token", …,
    "text": …}'`, what was generated for it. Data frames are logged by kind and length only now; every
    frame the server sent is still one line."""
    prompt = "PROMPT-7c1f to be or not"
    received, text = 0, ""
    with uvicorn_debug_lines() as lines, connect(server.ws_url) as ws:
        msg = {"prompt": prompt, "type": "generate", "model": "tiny-text", "max_new_tokens": 24}
        ws.send(json.dumps(msg))  # (the prompt first: what websockets' elided payload shows)
        while True:
            frame = json.loads(ws.recv())
            received += 1
            text += frame.get("text", "")
            if frame["type"] in ("done", "error"):
                break
    assert frame["type"] == "done" and len(text.strip()) >= 4, (frame, text)
    sent = [line for line in lines if line.startswith("> TEXT")]
    assert len(sent) == received and all(line.startswith("> TEXT [redacted, ") for line in sent), sent
    assert any(line.startswith("< TEXT [redacted, ") for line in lines), lines
    assert not [line for line in lines if prompt[:11] in line or text.strip() in line]


def test_every_refused_request_logs_one_line_saying_why_with_its_request_id(server, caplog):
    """An HTTP request the app refuses (a route's 4xx, the body limit's 413, the Host check's 403, an
    unknown path) had only uvicorn's access line, which says the status and not why: now one INFO line
    each, `refused CODE: MESSAGE`, the answer's own message, with the answer's X-Request-ID."""
    lines: list[tuple[str | None, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append((correlation_id.get(), record.getMessage()))

    keep = Keep(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="server.refused")
    logging.getLogger("server.refused").addHandler(keep)
    too_many = b'{"model": "tiny-text", "prompt": [' + b"0," * 70_000 + b"0]}"  # over the JSON budget
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            answers = [
                c.post("/v1/generate", json={"model": "tiny-text", "prompt": "x", "temperature": -3}),
                c.post("/v1/generate", json={"model": "no-such-model", "prompt": "x"}),
                c.post("/v1/generate", content=too_many, headers={"content-type": "application/json"}),
                c.get("/v1/models", headers={"Host": "evil.example"}),
                c.get("/no/such/path"),
                # the OpenAI routes answer a 422 as OpenAI does, a 400: the line says the status sent
                c.post("/v1/completions", json={"model": "tiny-text", "prompt": "x", "temperature": -3}),
                c.post(
                    "/v1/chat/completions",
                    content=b'{"model": "tiny-text", "messages": "a\nb"}',
                    headers={"content-type": "application/json"},
                ),
            ]
    finally:
        logging.getLogger("server.refused").removeHandler(keep)
    assert [r.status_code for r in answers] == [422, 404, 413, 403, 404, 400, 400]
    expected = [(r.headers["x-request-id"], f"refused {r.status_code}: {r.json()['error']['message']}")
                for r in answers]  # fmt: skip
    assert lines == expected


def test_a_key_sent_in_a_query_string_is_not_written_to_the_log(server):
    """Keys are read from headers only, but a client may send one as `?api_key=…`: uvicorn's access line
    and its WebSocket handshake line quoted the path with its query string, the key in the clear. Every
    query value but `model` (the one the API reads) is logged as [redacted] now; the path and `model` as
    before."""
    from websockets.sync.client import connect as ws_connect

    secrets = ("sk-query-5e0b1a", "sk-token-77aa02", "sk-bare-41c9d3", "sk-semi-0c3e9f")
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        r = httpx.get(f"{server.url}/v1/models?api_key={secrets[0]}&model=tiny-text&{secrets[2]}")
        assert r.status_code == 200
        # `;` as a separator (HTML 4's; Python's parse_qsl and Starlette split at `&` only): `model`'s value
        # runs on to the end, and the item named `model` was logged whole with the key in it (R13's note)
        r = httpx.get(f"{server.url}/v1/models?model=tiny-text;api_key={secrets[3]}")
        assert r.status_code == 200
        with ws_connect(f"{server.ws_url}?token={secrets[1]}"):
            pass
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    assert not [line for line in lines if any(s in line for s in secrets)], lines
    access = '"GET /v1/models?api_key=[redacted]&model=tiny-text&[redacted] HTTP/1.1" 200'
    assert any(access in line for line in lines), lines
    assert any('"GET /v1/models?model=tiny-text;api_key=[redacted] HTTP/1.1" 200' in line for line in lines)
    assert any('"WebSocket /v1/stream?token=[redacted]" [accepted]' in line for line in lines), lines
