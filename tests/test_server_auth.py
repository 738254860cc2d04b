"""API keys (S4_API_KEYS) through a real uvicorn: every API route refuses a missing or wrong key with the
same 401, accepts either header, exempts the probes and the demo page; the WebSocket handshake is
refused before any session exists, and a browser can carry the key as a subprotocol."""

import asyncio
import json
import logging
import socket
import subprocess
import sys

import httpx
import pytest
from fastapi.responses import JSONResponse
from server_support import WS_GENERATE, ServerThread, metric, uvicorn_debug_lines, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.auth import APIKeys, encode_key_subprotocol
from server.errors import is_openai_path

TEXT = "tiny-text"
KEYS = ["alpha-key-1", "b3ta/key+with=odd chars"]
# what every refusal says, naming the headers a key is read from (it named none: an Azure-style `api-key`
# header or `Authorization: Token KEY` got no word of what the server reads)
MESSAGE = "missing or invalid API key: send one as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
PAGE, PAGE_LISTED_AS = "https://app.example.com", "HTTPS://App.Example.com:443"  # S4_ALLOWED_ORIGINS


@pytest.fixture(scope="module")
def keyed(model_dirs, tmp_path_factory):
    """A server whose first key is given in S4_API_KEYS, the second in S4_API_KEYS_FILE (a secret's file)."""
    from server import Settings

    key_file = tmp_path_factory.mktemp("secrets") / "api-keys"
    key_file.write_text(f"# the second key\n{KEYS[1]}\n")
    settings = Settings(checkpoints=[str(model_dirs["text"])], api_keys=KEYS[0], api_keys_file=str(key_file),
                        drain_timeout_s=1, allowed_origins=PAGE_LISTED_AS)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def _operations(url: str, key: str) -> list[tuple[str, str]]:
    """Every (method, path) of the OpenAPI schema, path parameters filled with a dummy."""
    spec = httpx.get(url + "/openapi.json", headers={"X-API-Key": key}).json()
    return [
        (method.upper(), path.replace("{session_id}", "s-0"))
        for path, ops in spec["paths"].items()
        for method in ops
        if path not in ("/healthz", "/readyz")  # the probes are exempt (tested below)
    ]


def test_every_api_route_refuses_a_missing_or_wrong_key_with_the_same_401(keyed):
    ops = _operations(keyed.url, KEYS[0])
    assert len(ops) >= 10 and ("POST", "/v1/generate") in ops
    refusals = []
    for method, path in ops + [("GET", "/openapi.json"), ("GET", "/metrics"), ("GET", "/no/such/route")]:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": KEYS[0] + "x"},
                        {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": "Bearer"}):  # fmt: skip
            r = httpx.request(method, keyed.url + path, headers=headers, json={"model": TEXT, "prompt": "a"})
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            refusals.append((is_openai_path(path), r.json()))
            # the bytes a route's JSONResponse writes (they were json.dumps' spaced ones: a fresh-user trial)
            assert r.content == JSONResponse(r.json()).body, r.content
    # one message whatever was wrong: a prober learns nothing about which part failed; on the OpenAI
    # routes in OpenAI's shape (the openai client's AuthenticationError, code invalid_api_key)
    ours = {"code": 401, "type": "unauthorized", "message": MESSAGE, "param": None}
    openai_s = {"message": MESSAGE, "type": "invalid_request_error", "param": None,
                "code": "invalid_api_key"}  # fmt: skip
    assert {oa for oa, _ in refusals} == {True, False}
    for oa, body in refusals:
        assert body == {"error": openai_s if oa else ours}


def test_the_openai_client_raises_authentication_error_for_a_wrong_key(keyed):
    """OpenAI's 401 object: type invalid_request_error, code invalid_api_key (it was our own shape, type
    "unauthorized" and the integer 401 as code: a fresh-user trial); the right key works."""
    import openai

    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0) as c:
        for call in (lambda: c.completions.create(model=TEXT, prompt="a", max_tokens=1), c.models.list):
            with pytest.raises(openai.AuthenticationError) as e:
                call()
            assert e.value.code == "invalid_api_key" and e.value.type == "invalid_request_error"
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=KEYS[1], max_retries=0) as c:
        assert c.completions.create(model=TEXT, prompt="a", max_tokens=1).choices[0].finish_reason == "length"


def test_the_schema_documents_the_keys_only_when_they_are_on(keyed, server):
    spec = httpx.get(keyed.url + "/openapi.json", headers={"X-API-Key": KEYS[0]}).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert "ErrorResponse" in spec["components"]["schemas"]  # what the 401s refer to
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if path in ("/healthz", "/readyz"):
                assert "security" not in op and "401" not in op["responses"], path
            else:
                assert op["security"] == [{"bearer": []}, {"apiKey": []}] and "401" in op["responses"], path
    assert spec == httpx.get(keyed.url + "/openapi.json", headers={"X-API-Key": KEYS[1]}).json()  # once
    plain = httpx.get(server.url + "/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    assert not any("401" in op["responses"] for ops in plain["paths"].values() for op in ops.values())


def test_either_header_with_any_configured_key_is_accepted(keyed):
    body = {"model": TEXT, "prompt": "to be", "max_new_tokens": 5, "seed": 3}
    outs = []
    for headers in ({"Authorization": f"Bearer {KEYS[0]}"}, {"authorization": f"bearer {KEYS[1]}"},
                    {"X-API-Key": KEYS[1]}):  # fmt: skip
        r = httpx.post(keyed.url + "/v1/generate", json=body, headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        outs.append(r.json()["tokens"])
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 5


def test_probes_and_the_demo_page_need_no_key(keyed):
    assert httpx.get(keyed.url + "/healthz").status_code == 200
    assert httpx.get(keyed.url + "/readyz").status_code == 200
    for path in ("/", "/static/app.js"):  # the page holds no data (404 until it is served)
        assert httpx.get(keyed.url + path).status_code != 401


def test_refusals_are_counted(keyed):
    c = httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEYS[0]})

    def sample(prefix: str) -> float:  # 0 before the series exists
        lines = c.get("/metrics").text.splitlines()
        return next((float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(prefix + " ")), 0.0)

    names = ('s4_auth_failures_total{transport="http"}', 's4_auth_failures_total{transport="websocket"}',
             'http_requests_total{handler="/v1/models",method="GET",status="401"}')  # fmt: skip
    before = [sample(n) for n in names]
    httpx.get(keyed.url + "/v1/models")
    with pytest.raises(InvalidStatus):
        asyncio.run(_open(keyed.ws_url))
    assert [sample(n) for n in names] == [b + 1 for b in before]  # the HTTP middleware counts the 401 too
    assert metric(c, "s4_active_sessions", TEXT) == 0


async def _open(url: str, **kw) -> list:
    """Open /v1/stream, run one short generation, return (selected subprotocol, ids)."""
    async with connect(url, **kw) as ws:
        await ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "a", "max_new_tokens": 4}))
        ids = []
        while (m := json.loads(await ws.recv()))["type"] != "done":
            assert m["type"] in ("session", "token"), m
            ids += m.get("ids", [])
        return [ws.subprotocol, ids]


def test_websocket_handshake_without_a_valid_key_is_refused_before_any_session(keyed):
    c = httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEYS[0]})
    for kw in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}}, {"subprotocols": ["s4"]},
               {"subprotocols": ["s4", encode_key_subprotocol("wrong")]},
               {"subprotocols": ["s4", "s4.key.%%%"]}):  # fmt: skip
        with pytest.raises(InvalidStatus) as e:
            asyncio.run(_open(keyed.ws_url, **kw))
        assert e.value.response.status_code == 401, kw
        assert json.loads(e.value.response.body)["error"]["message"] == MESSAGE
    assert metric(c, "s4_active_sessions", TEXT) == 0


def test_a_refused_websocket_handshake_logs_no_error(keyed, caplog):
    """uvicorn logged "ASGI callable returned without completing handshake." at ERROR for every handshake
    the key check refused (its HTTP 401 is a denial response, which uvicorn did not count as an end of
    the handshake): anyone could fill the logs with ERROR lines. The refusal is the access line only."""
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with pytest.raises(InvalidStatus) as e:
                asyncio.run(_open(keyed.ws_url, additional_headers={"X-API-Key": "wrong"}))
            assert e.value.response.status_code == 401
        # the handshakes' ASGI tasks have ended: uvicorn's line comes as one returns, after the client has
        # its answer (a 0.2 s sleep here let a loaded server's line come after the check)
        assert wait_for(lambda: not keyed.server.server_state.tasks, 10)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_websocket_key_by_header_or_by_subprotocol_never_echoed(keyed):
    by_header = asyncio.run(_open(keyed.ws_url, additional_headers={"X-API-Key": KEYS[0]}))
    assert by_header[0] is None and len(by_header[1]) == 4
    for key in KEYS:  # the second key has characters a subprotocol token cannot hold: base64url carries it
        proto, ids = asyncio.run(_open(keyed.ws_url, subprotocols=["s4", encode_key_subprotocol(key)]))
        assert proto == "s4" and len(ids) == 4


def test_a_key_with_surrounding_whitespace_is_accepted_alike_by_headers_and_the_subprotocol(keyed):
    """HTTP takes a header value without its surrounding whitespace, so " KEY " in X-API-Key or after
    Bearer was accepted, while the same key base64url-encoded in the subprotocol was refused (a
    fresh-user trial). Both now take the key without surrounding whitespace; one that differs
    otherwise (an inner space, a missing character) is refused by both."""
    import socket

    from server_support import read_until_closed

    def status(header: str) -> int:  # (httpx refuses to send a padded header value: a raw request)
        with socket.create_connection(("127.0.0.1", keyed.port)) as s:
            s.sendall(f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{header}\r\n\r\n"
                      .encode())  # fmt: skip
            return int(read_until_closed(s).split()[1])

    for padded in (f" {KEYS[0]}", f"{KEYS[0]} ", f"\t{KEYS[1]}  "):
        assert status(f"X-API-Key: {padded}") == 200, padded
        assert status(f"Authorization: Bearer {padded}") == 200, padded
        proto, ids = asyncio.run(_open(keyed.ws_url, subprotocols=["s4", encode_key_subprotocol(padded)]))
        assert proto == "s4" and len(ids) == 4, padded
    for wrong in (KEYS[0][:-1], KEYS[0][:3] + " " + KEYS[0][3:], " ", ""):
        assert status(f"X-API-Key: {wrong}") == 401, wrong
        with pytest.raises(InvalidStatus) as e:
            asyncio.run(_open(keyed.ws_url, subprotocols=["s4", encode_key_subprotocol(wrong)]))
        assert e.value.response.status_code == 401, wrong


def test_websocket_without_keys_configured_selects_s4_when_offered(server):
    proto, ids = asyncio.run(_open(server.ws_url, subprotocols=["s4"]))
    assert proto == "s4" and len(ids) == 4


def test_key_check_compares_every_configured_key():
    keys = APIKeys(["one", "two", "three"])
    assert keys.enabled and not APIKeys([]).enabled
    assert [keys.accepts(k) for k in (b"one", b"two", b"three")] == [True, True, True]
    assert not any(keys.accepts(k) for k in (b"", b"on", b"one ", b"ONE", b"four"))
    scope = {
        "type": "http",
        "path": "/v1/models",
        "headers": [(b"x-api-key", b"bad"), (b"x-api-key", b"two")],
    }
    assert keys.allows(scope)  # any valid key among those presented
    assert keys.allows({"type": "http", "path": "/healthz", "headers": []})
    for path in ("/static/../v1/models", "/static/%2e%2e/metrics", "/healthz/../metrics", "/v1/models"):
        assert not keys.allows({"type": "http", "path": path, "headers": []}), path


def _calls_made(fn) -> int:
    """How many functions (Python and C) `fn()` calls: a count of the work it does, not a timing."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(count)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_a_key_check_does_the_same_work_however_many_keys_are_configured(keyed):
    """Each presented key was compared with every configured key (`hmac.compare_digest` in a loop), so one
    request of 4,900 `X-API-Key` headers (64 KiB, no valid key) held the event loop, every stream, 13 s
    against a 20,000-key S4_API_KEYS_FILE. A key is now one digest and one lookup: the work of checking a
    request depends on what it carries only."""
    presented = [(b"x-api-key", b"guess-%d" % i) for i in range(40)]
    scope = {"type": "http", "path": "/v1/models", "headers": presented}
    few, many = (
        APIKeys([f"key-{i:05d}-abcdefgh" for i in range(3)]),
        APIKeys([f"key-{i:05d}-abcdefgh" for i in range(3000)]),
    )
    assert not few.allows(scope) and not many.allows(scope)
    assert _calls_made(lambda: many.allows(scope)) == _calls_made(lambda: few.allows(scope))
    right = {**scope, "headers": [*presented, (b"x-api-key", b"key-02999-abcdefgh")]}
    assert many.allows(right) and not few.allows(right)  # the last of 41 keys carried, the last of 3,000
    # on a real server: 2,000 keys carried, the right one among them or not
    wrong = [("X-API-Key", f"guess-{i}") for i in range(2000)]
    with httpx.Client() as client:
        assert client.get(keyed.url + "/v1/models", headers=wrong).status_code == 401
        ok = client.get(keyed.url + "/v1/models", headers=[*wrong, ("Authorization", f"Bearer {KEYS[1]}")])
        assert ok.status_code == 200


def test_the_websocket_script_sends_its_key(keyed):
    args = [sys.executable, str(WS_GENERATE), keyed.ws_url, "ab", "--model", TEXT, "--max-new-tokens", "3"]
    ok = subprocess.run(
        args + ["--api-key", KEYS[1]], capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0 and json.loads(ok.stderr)["usage"]["completion_tokens"] == 3, ok.stderr
    refused = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and refused.stderr.startswith("refused: HTTP 401 "), refused.stderr
    assert "Traceback" not in refused.stderr  # the server's message, not the client library's traceback
    # the server's message names headers a user of the script cannot set: the script says how it sends one
    assert refused.stderr.rstrip().endswith("(this script sends one given --api-key KEY or S4_API_KEY)")


def test_prometheus_scrapes_metrics_with_a_bearer_token(keyed):
    """What README "Metrics with API keys" configures (authorization: type Bearer, credentials_file):
    Prometheus sends `Authorization: Bearer <key>`, which /metrics accepts; without it, 401."""
    assert httpx.get(keyed.url + "/metrics").status_code == 401
    r = httpx.get(keyed.url + "/metrics", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert r.status_code == 200 and "# TYPE s4_" in r.text


def test_websocket_handshake_headers_logged_at_debug_hold_no_key(keyed):
    """At S4_LOG_LEVEL=debug the websockets library logs each header of a handshake: `< authorization:
    Bearer KEY`, `< x-api-key: KEY`, `< sec-websocket-protocol: s4, s4.key.<base64url(KEY)>` put the
    keys in the log in the clear (a log collector, a support ticket's pasted log). They are redacted;
    the other headers are logged as before."""
    with uvicorn_debug_lines() as lines:
        for kw in ({"additional_headers": {"Authorization": f"Bearer {KEYS[0]}"}},
                   {"additional_headers": {"X-API-Key": KEYS[1], "Cookie": f"k={KEYS[0]}"}},
                   {"subprotocols": ["s4", encode_key_subprotocol(KEYS[1])]}):  # fmt: skip
            assert len(asyncio.run(_open(keyed.ws_url, **kw))[1]) == 4
        with pytest.raises(InvalidStatus):  # a refused key is not logged either
            asyncio.run(_open(keyed.ws_url, additional_headers={"X-API-Key": "wrong-key-9"}))
    assert "< authorization: [redacted]" in lines and "< x-api-key: [redacted]" in lines, lines
    assert "< sec-websocket-protocol: s4, s4.key.[redacted]" in lines and "< cookie: [redacted]" in lines
    assert any(line.startswith("< user-agent: ") for line in lines)  # the others as before
    secrets = [*KEYS, "wrong-key-9", encode_key_subprotocol(KEYS[1])[len("s4.key.") :]]
    assert not [line for line in lines if any(s in line for s in secrets)]


def test_a_websocket_handshakes_query_and_a_refused_key_subprotocol_logged_at_debug_hold_no_key(keyed):
    """At S4_LOG_LEVEL=debug the websockets library also logs a handshake's request line, `< GET
    /v1/stream?api_key=KEY HTTP/1.1`, and the traceback of a handshake it refuses, whose text quotes the
    header: a key subprotocol with base64's `=` padding is no token (`invalid Sec-WebSocket-Protocol header:
    expected comma at 42 in s4, s4.key.<base64url(KEY)>=`). Both wrote the key to the log; the query's
    values but `model` and the key subprotocol are `[redacted]` now, the rest as before."""
    logger = logging.getLogger("uvicorn.error")
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(logging.Formatter().format(record))  # with its traceback
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    padded = encode_key_subprotocol(KEYS[0]) + "="
    try:
        asyncio.run(_open(f"{keyed.ws_url}?api_key={KEYS[0]}&model={TEXT}", subprotocols=["s4", padded[:-1]]))
        with socket.create_connection(("127.0.0.1", keyed.port)) as sock:
            sock.sendall(
                f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{keyed.port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: s4, {padded}\r\n\r\n".encode()
            )
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert answer.startswith(b"HTTP/1.1 400 "), answer  # websockets' own refusal of the header
    assert f"< GET /v1/stream?api_key=[redacted]&model={TEXT} HTTP/1.1" in lines, lines
    refused = [line for line in lines if "invalid Sec-WebSocket-Protocol header" in line]
    assert refused and all("Traceback" in line and "s4.key.[redacted]" in line for line in refused), lines
    secrets = [*KEYS, encode_key_subprotocol(KEYS[0])[len("s4.key.") :]]
    assert not [line for line in lines if any(s in line for s in secrets)], lines


def test_a_listed_origins_page_can_fetch_with_its_key(keyed):
    """A page on an S4_ALLOWED_ORIGINS origin calling an HTTP route with `fetch` and `Authorization`:
    the browser first sends a CORS preflight, an OPTIONS without the key, which the key check answered
    401 (and no route answers OPTIONS: 405 without keys), and no answer carried
    Access-Control-Allow-Origin, so the page could read none. The preflight is answered now (no key
    needed: it carries none), and every answer to the page, a 401 included, names its origin."""
    preflight = {"Origin": PAGE, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
                 "Access-Control-Request-Private-Network": "true"}  # fmt: skip
    for path in ("/v1/chat/completions", "/v1/generate", "/v1/sessions/s-0", "/metrics"):
        r = httpx.options(keyed.url + path, headers=preflight)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == PAGE
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-private-network"] == "true"
    body = {"model": TEXT, "prompt": "a", "max_tokens": 2}
    ok = httpx.post(keyed.url + "/v1/completions", json=body, timeout=30,
                    headers={"Origin": PAGE, "Authorization": f"Bearer {KEYS[0]}"})  # fmt: skip
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE, ok.text
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    refused = httpx.post(keyed.url + "/v1/completions", json=body, headers={"Origin": PAGE})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    assert refused.json()["error"]["code"] == "invalid_api_key"
    # another page: still refused before anything else (403), its preflight too; a request without
    # Origin (curl) gets no CORS headers
    foreign = httpx.options(
        keyed.url + "/v1/generate", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
    assert "access-control-allow-origin" not in httpx.get(keyed.url + "/healthz").headers
    assert httpx.options(keyed.url + "/v1/generate").status_code == 401  # not a preflight: the key check


def test_keys_clients_will_trip_on_are_named_by_position_in_warnings_at_start(model_dirs, caplog):
    """A comma in S4_API_KEYS splits a key: `x9f,q` was the keys `x9f` and `q`, so a one-character guess
    passed, and nothing said so; a key holding a control character could never be sent, and a non-ASCII
    one only by UTF-8 senders (httpx and the openai client refuse it, requests sends Latin-1). Each is
    now named at start by its position (never its value); sound keys, and no keys, warn nothing."""
    import httpx

    from server import Settings, create_app

    strong = "s" * 16
    with pytest.raises(UnicodeEncodeError):  # what the openai client does with a non-ASCII key
        httpx.Request("GET", "http://127.0.0.1/", headers={"Authorization": "Bearer clé-" + strong})
    keys = f"x9f,q,{strong},{strong}\x01,clé-{strong}"
    with caplog.at_level(logging.WARNING, logger="server"):
        create_app(Settings(checkpoints=[str(model_dirs["text"])], api_keys=keys))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    which = "of 5 (S4_API_KEYS in order, then S4_API_KEYS_FILE's lines)"
    assert warned == [
        f"API key 1, 2 {which} is shorter than 16 characters: guessable; a comma in S4_API_KEYS splits a "
        "key (one with a comma goes in S4_API_KEYS_FILE)",
        f"API key 4 {which} holds a control character, which no HTTP header can carry: no client can send it",
        f"API key 5 {which} is not ASCII: httpx and the openai client cannot send it, requests sends it as "
        "Latin-1 (refused); only UTF-8 senders (curl, the demo page) pass",
    ]
    assert not [w for w in warned if "x9f" in w or strong in w]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server"):
        create_app(Settings(checkpoints=[str(model_dirs["text"])], api_keys=strong))
        create_app(Settings(checkpoints=[str(model_dirs["text"])]))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_key_subprotocol_offered_without_s4_is_a_400_saying_what_to_offer(keyed, server):
    """A browser page that offers only `s4.key.…` (forgetting `s4`) had its handshake accepted with no
    subprotocol selected, which a browser fails at once (close 1006, no reason); a Python client went on
    unawares. The handshake is now refused 400, naming `s4` and the header; a wrong key is still the 401."""
    c = httpx.Client(base_url=keyed.url, headers={"X-API-Key": KEYS[0]})
    for url, proto in ((keyed.ws_url, encode_key_subprotocol(KEYS[0])), (server.ws_url, "s4.key.eA")):
        with pytest.raises(InvalidStatus) as e:
            asyncio.run(_open(url, subprotocols=[proto]))
        assert e.value.response.status_code == 400
        err = json.loads(e.value.response.body)["error"]
        assert err["param"] == "Sec-WebSocket-Protocol" and "offer the subprotocol 's4'" in err["message"]
        assert KEYS[0] not in err["message"] and proto not in err["message"]
    with pytest.raises(InvalidStatus) as e:
        asyncio.run(_open(keyed.ws_url, subprotocols=[encode_key_subprotocol("wrong")]))
    assert e.value.response.status_code == 401
    assert metric(c, "s4_active_sessions", TEXT) == 0


def test_readyz_without_a_key_withholds_why_a_model_is_not_served(model_dirs):
    """/readyz needs no key (the orchestrator's probe sends none), but why a model is not served quotes
    the checkpoint's path on the server's disk and the exception's text (an audit's note): without a valid
    key the answer keeps its status and fields and names the model, and the reason is withheld; with a
    key it is given whole, as without keys configured."""
    from server import Settings

    broken = str(model_dirs["broken"])
    settings = Settings(checkpoints=[str(model_dirs["text"]), broken], api_keys=KEYS[0], drain_timeout_s=1,
                        require_all_models=True)  # fmt: skip
    s = ServerThread(settings)
    s.thread.start()  # (never ready: start() waits for a 200)
    try:
        loaded = lambda: s.server.started and httpx.get(s.url + "/readyz").json()["reason"] != "loading"  # noqa: E731
        assert wait_for(loaded, 120, 0.1)
        bare = httpx.get(s.url + "/readyz")
        wrong = httpx.get(s.url + "/readyz", headers={"X-API-Key": "not-a-key"})
        keyed = httpx.get(s.url + "/readyz", headers={"Authorization": f"Bearer {KEYS[0]}"})
    finally:
        s.stop()
    for r in (bare, wrong, keyed):  # the same status and fields: the probe's answer does not depend on a key
        assert (
            r.status_code == 503 and r.json()["models"] == [TEXT] and list(r.json()["failed"]) == ["broken"]
        )
    for r in (bare, wrong):
        assert broken not in r.text and "JSON" not in r.text, r.text
        assert r.json()["failed"]["broken"].startswith("not served (why: in the server's log")
        assert r.json()["reason"].startswith(
            "not every configured model is served (S4_REQUIRE_ALL_MODELS): broken"
        )
    assert "not valid JSON" in keyed.json()["failed"]["broken"] and "not valid JSON" in keyed.json()["reason"]


def _declared_only(port: int, path: str, length: int, key: str | None) -> bytes:
    """Headers declaring a `length`-byte body, and no body: what the server answers within 60 s."""
    auth = f"X-API-Key: {key}\r\n" if key else ""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"{auth}Content-Length: {length}\r\n\r\n".encode())  # fmt: skip
        s.settimeout(60)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < _content_length(got):
            data = s.recv(65536)
            if not data:
                break
            got += data
        return got


def _content_length(response: bytes) -> int:
    for line in response.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_body_over_the_limit_without_a_key_is_a_401_that_names_no_limit(keyed):
    """The body-size check ran outside the key check: a request with no key and a declared body over
    S4_MAX_BODY_BYTES got the 413, whose message names the limit in bytes, so anyone could read a keyed
    server's setting. The key check now comes first; with a key the same request is the 413."""
    over = keyed.app.state.server.settings.max_body_bytes + 1
    for path in ("/v1/generate", "/v1/completions", "/v1/sessions"):
        refused = _declared_only(keyed.port, path, over, key=None)
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.split()[1] == b"401", (path, refused[:300])
        assert json.loads(body)["error"]["message"] == MESSAGE and str(over - 1) not in body.decode()
        limited = _declared_only(keyed.port, path, over, key=KEYS[0])
        assert limited.split()[1] == b"413" and b"max_body_bytes" in limited, (path, limited[:300])
