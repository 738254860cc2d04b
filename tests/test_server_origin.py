"""Browser origins and DNS rebinding (server/origin.py) through a real uvicorn: a request carrying a
foreign `Origin` (another site's page, `Origin: null`) is refused 403 on every route and on the
WebSocket handshake, before anything is generated; a `Host` that names no loopback host is refused on a
loopback server; the server's own origin, listed origins and hosts, and requests without Origin (API
clients) pass; a server on every interface takes any Host unless told otherwise."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

import httpx
import pytest
from server_support import ServerThread, metric, wait_for
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server import Settings
from server.origin import OriginPolicy

TEXT = "tiny-text"
EVIL = "http://evil.example"
LISTED_ORIGIN, LISTED_HOST = "https://app.example.com", "s4.example.com"
GENERATE = {"model": TEXT, "prompt": "a", "max_new_tokens": 3, "seed": 1}
ROUTES = [("/v1/generate", GENERATE), ("/v1/completions", {"model": TEXT, "prompt": "a", "max_tokens": 3})]


def _serve(model_dirs, **settings) -> ServerThread:
    return ServerThread(
        Settings(checkpoints=[str(model_dirs["text"])], drain_timeout_s=1, **settings)
    ).start()


@pytest.fixture(scope="module")
def local(model_dirs):
    """The default: listening on 127.0.0.1, nothing listed."""
    s = _serve(model_dirs)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def listed(model_dirs):
    s = _serve(model_dirs, allowed_origins=f"{LISTED_ORIGIN}, https://other.example:8443",
               allowed_hosts=LISTED_HOST)  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def everywhere(model_dirs):
    """S4_HOST=0.0.0.0 (as in the image; the test's socket is still on loopback: the check follows the
    setting) and S4_ALLOWED_ORIGINS=*."""
    s = _serve(model_dirs, host="0.0.0.0", allowed_origins="*")
    yield s
    s.stop()


def post(s: ServerThread, path: str, body: dict, **headers) -> httpx.Response:
    return httpx.post(s.url + path, json=body, headers=headers, timeout=60)


def ws_handshake(port: int, headers: dict[str, str]) -> tuple[int, bytes]:
    """A WebSocket upgrade of /v1/stream with exactly these headers (Host among them): (status, body)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /v1/stream HTTP/1.1", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]  # fmt: skip
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(65536)
        head, body = got.split(b"\r\n\r\n", 1)
        status = int(head.split()[1])
        length = next((int(v) for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                       if k.strip().lower() == b"content-length"), 0)  # fmt: skip
        while len(body) < length:
            body += sock.recv(65536)
    return status, body


async def _generate(url: str, **kw) -> list[int]:
    async with connect(url, **kw) as ws:
        await ws.send(json.dumps({"type": "generate", **GENERATE}))
        ids = []
        while (m := json.loads(await ws.recv()))["type"] != "done":
            ids += m.get("ids", [])
        return ids


def refusals(s: ServerThread) -> dict[str, float]:
    with httpx.Client(base_url=s.url) as c:
        lines = c.get("/metrics").text.splitlines()
    prefix = "s4_requests_refused_total{reason="
    return {
        x[len(prefix) + 1 : x.index('"}')]: float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(prefix)
    }


def tokens(s: ServerThread) -> float:
    with httpx.Client(base_url=s.url) as c:
        return metric(c, "s4_tokens_generated_total", TEXT)


def test_requests_without_an_origin_pass(local):
    """curl, the Python clients, the openai client and the websockets library send no Origin."""
    for path, body in ROUTES:
        assert post(local, path, body).status_code == 200, path
    assert len(asyncio.run(_generate(local.ws_url))) == 3


def test_the_servers_own_origin_passes_on_http_and_websocket(local):
    """The demo page: same host:port as the request's Host (the scheme is not compared, so the page works
    behind a TLS-terminating proxy that keeps Host)."""
    for host in (f"127.0.0.1:{local.port}", f"localhost:{local.port}"):
        for origin in (f"http://{host}", f"https://{host}"):
            for path, body in ROUTES:
                assert post(local, path, body, Host=host, Origin=origin).status_code == 200, (origin, path)
    assert len(asyncio.run(_generate(local.ws_url, origin=f"http://127.0.0.1:{local.port}"))) == 3


FOREIGN = [EVIL, "null", "http://127.0.0.1:1", "http://localhost", "https://app.example.com", "file://"]


def test_a_foreign_origin_is_refused_403_in_each_routes_error_shape_and_nothing_is_generated(local):
    before, made = refusals(local), tokens(local)
    for origin in FOREIGN:
        ours = post(local, "/v1/generate", GENERATE, Origin=origin)
        assert ours.status_code == 403, origin
        assert ours.json()["error"]["code"] == 403 and ours.json()["error"]["type"] == "forbidden"
        assert (
            repr(origin) in ours.json()["error"]["message"]
            and "S4_ALLOWED_ORIGINS" in ours.json()["error"]["message"]
        )
        oa = post(local, "/v1/completions", ROUTES[1][1], Origin=origin)
        assert oa.status_code == 403, origin
        assert oa.json()["error"]["code"] == "origin_not_allowed"
        assert oa.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(local.url + "/v1/models", headers={"Origin": origin}).status_code == 403
    assert tokens(local) == made
    assert refusals(local)["foreign_origin"] - before["foreign_origin"] == 3 * len(FOREIGN)


def test_the_openai_client_raises_permission_denied_for_a_foreign_origin(local):
    import openai

    with openai.OpenAI(base_url=local.url + "/v1", api_key="x", max_retries=0,
                       default_headers={"Origin": EVIL}) as c:  # fmt: skip
        with pytest.raises(openai.PermissionDeniedError) as e:
            c.completions.create(model=TEXT, prompt="a", max_tokens=1)
    assert e.value.code == "origin_not_allowed"


def test_a_foreign_origin_websocket_handshake_is_refused_before_any_session(local):
    """Cross-site WebSocket hijacking: another site's page opens ws://127.0.0.1:PORT/v1/stream."""
    before, made = refusals(local), tokens(local)
    for origin in (EVIL, "null", "http://127.0.0.1:1"):
        with pytest.raises(InvalidStatus) as e:
            asyncio.run(_generate(local.ws_url, origin=origin))
        assert e.value.response.status_code == 403, origin
        assert repr(origin) in json.loads(e.value.response.body)["error"]["message"]
    with httpx.Client(base_url=local.url) as c:
        assert metric(c, "s4_active_sessions", TEXT) == 0
    assert tokens(local) == made
    assert refusals(local)["foreign_origin"] - before["foreign_origin"] == 3


def test_listed_origins_pass_and_others_are_still_refused(listed):
    for origin in (LISTED_ORIGIN, "https://APP.example.com", "https://app.example.com:443",
                   "https://other.example:8443"):  # fmt: skip
        for path, body in ROUTES:
            assert post(listed, path, body, Origin=origin).status_code == 200, (origin, path)
        assert len(asyncio.run(_generate(listed.ws_url, origin=origin))) == 3
    for origin in (
        EVIL,
        "null",
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://other.example",
    ):
        assert post(listed, "/v1/generate", GENERATE, Origin=origin).status_code == 403, origin
        with pytest.raises(InvalidStatus):
            asyncio.run(_generate(listed.ws_url, origin=origin))


def test_any_origin_passes_with_a_star(everywhere):
    for origin in (EVIL, "null"):
        for path, body in ROUTES:
            assert post(everywhere, path, body, Origin=origin).status_code == 200, (origin, path)
        assert len(asyncio.run(_generate(everywhere.ws_url, origin=origin))) == 3


REBINDING = ["evil.example:{port}", "evil.example", "127.0.0.1.evil.example:{port}", "localhost.evil.example"]


def test_a_rebinding_host_is_refused_on_a_loopback_server_on_http_and_websocket(local):
    """DNS rebinding: evil.example resolves to 127.0.0.1, so its page is same-origin to the server."""
    before, made = refusals(local), tokens(local)
    for host in (h.format(port=local.port) for h in REBINDING):
        for path, body in ROUTES:
            r = post(local, path, body, Host=host, Origin=f"http://{host}")
            assert r.status_code == 403, (host, path)
            assert (
                repr(host) in r.json()["error"]["message"]
                and "S4_ALLOWED_HOSTS" in r.json()["error"]["message"]
            )
        assert (
            post(local, "/v1/completions", ROUTES[1][1], Host=host).json()["error"]["code"]
            == "host_not_allowed"
        )
        status, body = ws_handshake(local.port, {"Host": host})
        assert status == 403 and repr(host) in json.loads(body)["error"]["message"], host
    assert tokens(local) == made
    assert refusals(local)["foreign_host"] - before["foreign_host"] == 4 * len(REBINDING)


def test_loopback_hosts_and_ip_addresses_pass_on_a_loopback_server(local):
    p = local.port
    for host in (f"localhost:{p}", f"127.0.0.1:{p}", f"[::1]:{p}", "127.0.0.2", "LOCALHOST",
                 f"s4.localhost:{p}", f"192.168.1.10:{p}"):  # fmt: skip
        for path, body in ROUTES:
            assert post(local, path, body, Host=host).status_code == 200, (host, path)
        assert ws_handshake(p, {"Host": host})[0] == 101, host


def test_an_ip_address_in_any_form_a_url_takes_passes_on_a_loopback_server(local):
    """`curl http://127.1:8000/...` sends `Host: 127.1:8000` (curl, like inet_aton and the URL standard,
    reads 127.1, 2130706433 and 0x7f000001 as 127.0.0.1), which was refused 403 as a rebinding name,
    telling the user to use "an IP address". A browser sends such a host as its dotted quad and never
    asks DNS for it, so it is no rebinding name: it passes, while names that only hold numbers still do
    not."""
    p = local.port
    for host in (f"127.1:{p}", "2130706433", f"0x7f000001:{p}", "0x7f.1", "127.0.1", f"017700000001:{p}"):
        for path, body in ROUTES:
            assert post(local, path, body, Host=host).status_code == 200, (host, path)
        assert ws_handshake(p, {"Host": host})[0] == 101, host
    for host in ("1.evil.example", f"127.1.evil.example:{p}", "evil.1", "256.256.256.256", "1.2.3.4.5"):
        assert post(local, *ROUTES[0], Host=host).status_code == 403, host
        assert ws_handshake(p, {"Host": host})[0] == 403, host


def test_a_star_with_no_api_key_is_named_in_a_warning_at_start(model_dirs, caplog):
    """`S4_ALLOWED_ORIGINS=*` lets every web page the user visits drive the server, and `S4_ALLOWED_HOSTS=*`
    on a loopback address lets DNS rebinding through: the README calls either unsafe without API keys,
    and the server said nothing when one was set so. Each is a warning at start now; with keys, a listed
    origin or host, or `*` hosts on every interface (no Host check there anyway), none."""
    import logging

    from server import create_app

    def warned(**settings) -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="server"):
            create_app(Settings(checkpoints=[str(model_dirs["text"])], **settings))
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    origins, hosts = warned(allowed_origins="*"), warned(allowed_hosts="*")
    assert len(origins) == 1 and origins[0].startswith("S4_ALLOWED_ORIGINS=* with no API key: any web page")
    assert len(hosts) == 1 and hosts[0].startswith("S4_ALLOWED_HOSTS=* with no API key on a loopback address")
    assert len(warned(allowed_origins="*", allowed_hosts="*")) == 2
    strong = "k" * 32
    settings_warning_nothing = [
        {"allowed_origins": "*", "allowed_hosts": "*", "api_keys": strong},
        {"allowed_origins": "https://app.example.com"},
        {"allowed_hosts": "app.example.com"},
        {"allowed_hosts": "*", "host": "0.0.0.0"},
        {},
    ]
    for quiet in settings_warning_nothing:
        assert warned(**quiet) == [], quiet


def test_the_probes_answer_whatever_the_host(local):
    """The kubelet's probes name the pod's IP, and a probe holds no data: no Host check on them."""
    for path in ("/healthz", "/readyz"):
        assert httpx.get(local.url + path, headers={"Host": "evil.example"}).status_code == 200, path
    assert httpx.get(local.url + "/metrics", headers={"Host": "evil.example"}).status_code == 403


def test_readyz_on_a_rebinding_host_withholds_why_a_model_is_not_served(model_dirs):
    """The probes answer whatever the Host, so a DNS-rebinding page (same-origin to a loopback server under
    its own name) read /readyz whole: why a model is not served, which quotes the checkpoint's path on the
    server's disk and the exception's text, with no keys configured (the default on loopback). On a Host
    the other routes refuse it keeps its status and fields and names the model, and the reason is
    withheld; on an allowed Host it is given whole."""
    broken = str(model_dirs["broken"])
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), broken], drain_timeout_s=1, require_all_models=True
    )
    s = ServerThread(settings)
    s.thread.start()  # (never ready: start() waits for a 200)
    try:
        loaded = lambda: s.server.started and httpx.get(s.url + "/readyz").json()["reason"] != "loading"  # noqa: E731
        assert wait_for(loaded, 120, 0.1)
        rebound = httpx.get(s.url + "/readyz", headers={"Host": f"rebind.evil.example:{s.port}"})
        own = [
            httpx.get(s.url + "/readyz", headers={"Host": h}) for h in (f"localhost:{s.port}", "127.0.0.1")
        ]
        assert httpx.get(s.url + "/v1/models", headers={"Host": "rebind.evil.example"}).status_code == 403
    finally:
        s.stop()
    for r in (rebound, *own):  # the same status and fields whatever the Host
        assert (
            r.status_code == 503 and r.json()["models"] == [TEXT] and list(r.json()["failed"]) == ["broken"]
        )
    assert broken not in rebound.text and "JSON" not in rebound.text, rebound.text
    assert rebound.json()["failed"]["broken"].startswith("not served (why: in the server's log")
    assert rebound.json()["reason"].startswith(
        "not every configured model is served (S4_REQUIRE_ALL_MODELS): broken"
    )
    for r in own:
        assert "not valid JSON" in r.json()["failed"]["broken"] and "not valid JSON" in r.json()["reason"]


def test_a_listed_host_passes_on_a_loopback_server(listed):
    assert post(listed, "/v1/generate", GENERATE, Host=f"{LISTED_HOST}:{listed.port}").status_code == 200
    assert ws_handshake(listed.port, {"Host": LISTED_HOST.upper()})[0] == 101
    assert post(listed, "/v1/generate", GENERATE, Host="evil.example").status_code == 403


def test_a_server_on_every_interface_takes_any_host(everywhere):
    for host in ("evil.example", "s4.internal:8000", "10.0.0.7:8000"):
        for path, body in ROUTES:
            assert post(everywhere, path, body, Host=host).status_code == 200, (host, path)
        assert ws_handshake(everywhere.port, {"Host": host})[0] == 101, host


def test_which_hosts_each_listening_address_checks():
    """Loopback addresses check the Host; any other address only when S4_ALLOWED_HOSTS lists names (then
    those, loopback names and IP addresses: in-pod probes and scrapes by pod IP keep working)."""
    for listen in ("127.0.0.1", "127.0.1.1", "::1", "localhost", "[::1]"):
        p = OriginPolicy(listen)
        assert p.loopback and not p.host_allowed("evil.example:8000") and p.host_allowed("localhost:8000"), (
            listen
        )
    for listen in ("0.0.0.0", "::", "10.0.0.7", "s4.internal"):
        p = OriginPolicy(listen)
        assert not p.loopback and p.host_allowed("evil.example:8000"), listen
        p = OriginPolicy(listen, allowed_hosts=[LISTED_HOST])
        assert not p.host_allowed("evil.example:8000"), listen
        assert all(p.host_allowed(h) for h in (LISTED_HOST, "localhost:8000", "[::1]:8000", "10.1.2.3:8000"))
    assert OriginPolicy("127.0.0.1", allowed_hosts=["*"]).host_allowed("evil.example")
    assert OriginPolicy("127.0.0.1").host_allowed(None)  # no Host: not a browser's request


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("allowed-origins", "https://app.example.com/"),
        ("allowed-origins", "app.example.com"),
        ("allowed-origins", "null"),
        ("allowed-hosts", "app.example.com:8000"),
        ("allowed-hosts", "https://a.example"),
        ("allowed-hosts", "a b"),
    ],  # fmt: skip
)
def test_a_malformed_entry_stops_the_server_with_one_line_naming_the_setting(flag, value, monkeypatch):
    from server.__main__ import main

    for args, env in (([f"--{flag}", value], {}), ([], {f"S4_{flag.upper().replace('-', '_')}": value})):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(SystemExit) as e:
            main(args)
        message = str(e.value.code)
        assert message.startswith("not serving: invalid settings: ") and "\n" not in message
        assert f"S4_{flag.upper().replace('-', '_')} (--{flag})" in message and repr(value) in message, (
            message
        )


def test_a_listed_page_can_read_every_header_an_answer_carries_for_its_client(model_dirs):
    """A page on a listed origin reads only the response headers CORS exposes (the Fetch standard: the
    safelisted ones and Access-Control-Expose-Headers). The WAV answer of /v1/generate carries its id,
    finish reason and usage (prompt, completion and cached tokens: the prefix cache's report) in X- headers
    alone, and an export its file name in Content-Disposition; only X-Request-ID and Retry-After were
    exposed, so the page read null for each. Every such header of these answers is exposed now."""
    s = ServerThread(
        Settings(
            checkpoints=[str(model_dirs[k]) for k in ("text", "audio")],
            drain_timeout_s=1,
            allowed_origins=LISTED_ORIGIN,
        )
    ).start()
    try:
        page = {"Origin": LISTED_ORIGIN}
        body = {"model": "tiny-audio", "prompt_audio": None, "max_new_tokens": 40, "seed": 1}
        wav = httpx.post(
            s.url + "/v1/generate", json=body, headers={**page, "Accept": "audio/wav"}, timeout=60
        )
        assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav", wav.text
        sid = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": "a"}, headers=page).json()
        export = httpx.get(f"{s.url}/v1/sessions/{sid['session_id']}/export", headers=page)
        assert export.status_code == 200
        carrying = [(wav, {h for h in wav.headers if h.startswith("x-")}), (export, {"content-disposition"})]
        for r, carried in carrying:
            assert r.headers["access-control-allow-origin"] == LISTED_ORIGIN and carried <= set(r.headers)
            exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
            assert carried <= exposed, (carried, exposed)
        assert int(wav.headers["x-completion-tokens"]) == 40 and "x-cached-tokens" in wav.headers
    finally:
        s.stop()
