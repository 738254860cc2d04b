"""Fuzzing: schemathesis against our own OpenAPI schema (every operation; no 5xx, every response as
the schema says) and a hypothesis fuzzer of WebSocket frames (malformed JSON, wrong types, huge
numbers, unknown types, binary garbage, oversized frames, messages out of order): the server answers
with error frames or a proper close code, never a 5xx, leaks no session slot, and a bystander session
generating all along continues exactly as the library says.

CI runs the small sizes. The dedicated runs (numbers in docs/reliability.md, "Fuzzing"):
  S4_FUZZ_API_EXAMPLES=400 S4_FUZZ_WS_FRAMES=2000 S4_FUZZ_RESULTS=scripts/results \\
      .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import base64
import collections
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_support import ServerThread, reference, wait_for
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from model.sampling import SamplingParams
from server.auth import MESSAGE

TEXT, AUDIO = "tiny-text", "tiny-audio"
KEY = "fuzz-key-0123456789"  # the fuzz server requires an API key (S4_API_KEYS); the fuzzers send it
HEADERS = {"X-API-Key": KEY}
API_EXAMPLES = int(os.environ.get("S4_FUZZ_API_EXAMPLES", "20"))  # per operation
WS_FRAMES = int(os.environ.get("S4_FUZZ_WS_FRAMES", "240"))
RESULTS = os.environ.get("S4_FUZZ_RESULTS")  # a folder: write the run's figures there as JSON
MAX_FRAME = 8192
FRAMES_PER_EXAMPLE = 6  # at most; the mean is about half

COUNTS: dict[str, collections.Counter] = {"api": collections.Counter(), "ws": collections.Counter()}


def _write_results(name: str, extra: dict) -> None:
    if RESULTS:
        Path(RESULTS).mkdir(parents=True, exist_ok=True)
        body = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        (Path(RESULTS) / f"fuzz-{name}.json").write_text(json.dumps(body, indent=2) + "\n")


@pytest.fixture(scope="module")
def fuzz_server(model_dirs):
    """Both tiny models, small generation limits (every fuzzed request finishes quickly), a short TTL
    (sessions the fuzzer makes go away), a small frame limit (oversized frames are cheap)."""
    from server import Settings

    settings = Settings(
        checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])],
        max_sessions=48,
        max_new_tokens=64,
        max_prompt_tokens=512,
        max_audio_s=64 / 8000,  # the audio model's limits (prompts and generations): 64 samples
        session_ttl_s=3,
        ws_max_frame_bytes=MAX_FRAME,
        drain_timeout_s=1,
        api_keys=[KEY],
    )
    s = ServerThread(settings).start()
    yield s
    s.stop()


PROMPT = "to be, or not to be"
TURNS_PER_SESSION = 4  # then a new session: histories stay short enough to compare tokens exactly


class Bystander(threading.Thread):
    """Sessions generating turn after turn while the fuzzers run (a new session every few turns);
    every turn's tokens are checked after against the library."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop_flag, self.error = url, threading.Event(), None
        self.turns: list[tuple[list[int], int, list[int]]] = []  # (history before, seed, tokens)
        self.checked = False

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=60, headers=HEADERS) as c:
                while not self.stop_flag.is_set():
                    r = c.post("/v1/sessions", json={"model": TEXT, "prompt": PROMPT})
                    if r.status_code == 429:  # the fuzzer holds every slot for a moment
                        time.sleep(0.05)
                        continue
                    assert r.status_code == 201, r.text
                    sid, history = r.json()["session_id"], list(PROMPT.encode())
                    for _ in range(TURNS_PER_SESSION):
                        seed = len(self.turns)
                        body = {"model": TEXT, "session_id": sid, "max_new_tokens": 8, "seed": seed}
                        r = c.post("/v1/generate", json=body)
                        assert r.status_code == 200, r.text
                        self.turns.append((list(history), seed, r.json()["tokens"]))
                        history += self.turns[-1][2]
                        time.sleep(0.1)  # a steady trickle, not a flood
                    assert c.delete(f"/v1/sessions/{sid}").status_code == 204
        except Exception as exc:  # reported by check()
            self.error = exc

    def check(self, model_dir) -> int:
        """Stop, then compare every turn with the library (once: the test, else its teardown)."""
        self.stop_flag.set()
        self.join(60)
        if self.checked:
            return len(self.turns)
        self.checked = True
        assert self.error is None, self.error
        assert len(self.turns) >= 2
        for i, (history, seed, tokens) in enumerate(self.turns):
            want = reference(model_dir, history, SamplingParams(seed=seed), 8)
            assert tokens == want, (i, tokens, want)
        return len(self.turns)


@pytest.fixture
def bystander(fuzz_server, model_dirs):
    """One per test, generating while that test's fuzzer runs, whatever order the tests run in."""
    b = Bystander(fuzz_server.url)
    b.start()
    yield b
    b.check(model_dirs["text"])  # when the test stopped before its own check


# --- HTTP: schemathesis -----------------------------------------------------------------------------


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_api_fuzz_no_5xx_and_responses_match_the_schema(fuzz_server, bystander, model_dirs):
    """Every operation of /openapi.json, with schema-valid (positive) and invalid (negative) data."""
    spec = httpx.get(fuzz_server.url + "/openapi.json", headers=HEADERS).json()
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 12
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=API_EXAMPLES, deadline=None, phases=[Phase.generate], database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(op.as_strategy(generation_mode=mode), st.sampled_from([None, TEXT, AUDIO]))
            def one_case(case, model):
                if model and isinstance(case.body, dict) and "model" in case.body:
                    case.body["model"] = model  # a served model now and then: the engine is reached
                response = case.call(base_url=fuzz_server.url, headers=HEADERS, timeout=60)
                COUNTS["api"]["cases"] += 1
                COUNTS["api"][f"{response.status_code // 100}xx"] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                one_case()
            except Unsatisfiable:  # negative data for an operation without parameters: none exists
                assert mode == GenerationMode.NEGATIVE, op.label
            except (Exception, BaseExceptionGroup) as exc:  # record every operation's failure, then fail
                failures.append(f"{op.label} ({mode.value}): {type(exc).__name__}: {str(exc)[:2000]}")
    assert httpx.get(fuzz_server.url + "/healthz").status_code == 200
    turns = bystander.check(model_dirs["text"])
    _write_results(
        "api",
        {
            "command": "S4_FUZZ_API_EXAMPLES=... pytest tests/test_fuzz.py",
            "operations": [op.label for op in operations],
            "examples_per_operation_and_mode": API_EXAMPLES,
            "cases": COUNTS["api"]["cases"],
            "status_classes": {k: v for k, v in COUNTS["api"].items() if k != "cases"},
            "server_errors_5xx": COUNTS["api"]["5xx"],
            "failures": failures,
            "bystander_turns_checked": turns,
        },
    )
    assert not failures, "\n\n".join(failures)
    assert COUNTS["api"]["5xx"] == 0


def test_without_a_valid_key_every_operation_but_the_probes_is_401(fuzz_server):
    """With S4_API_KEYS set, every operation in the schema (and the WebSocket handshake) refuses a
    request without a valid key: 401, WWW-Authenticate: Bearer, one message; the probes stay open."""
    paths = httpx.get(fuzz_server.url + "/openapi.json", headers=HEADERS).json()["paths"]
    assert httpx.get(fuzz_server.url + "/openapi.json").status_code == 401
    checked = 0
    for path, methods in paths.items():
        url = fuzz_server.url + path.replace("{session_id}", "sess-x")
        for method in methods:
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer " + KEY + "x"}):
                r = httpx.request(method.upper(), url, headers=headers, json={})
                if path in ("/healthz", "/readyz"):
                    assert r.status_code == 200, (method, path)
                    continue
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert r.json()["error"]["message"] == MESSAGE
                checked += 1
    assert checked >= 3 * 11
    with pytest.raises(InvalidStatus) as refused:
        connect(fuzz_server.ws_url, open_timeout=10).close()
    assert refused.value.response.status_code == 401
    with connect(fuzz_server.ws_url, additional_headers=HEADERS) as ws:  # and with the key it opens
        ws.send(json.dumps({"type": "append"}))  # (no model named: the socket's answer, a 422)
        assert json.loads(ws.recv(10))["code"] == 422


# --- WebSocket frames -------------------------------------------------------------------------------

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
JUNK = st.recursive(
    JSON_LEAF,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=8,
)
SOCKET_MODEL = st.shared(st.sampled_from([TEXT, TEXT, AUDIO]), key="model")  # one per socket
VALID = {  # values the server accepts (text prompts and stops for the text model)
    "prompt": st.text(min_size=1, max_size=40),
    "max_new_tokens": st.integers(min_value=1, max_value=64),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_k": st.integers(0, 300),
    "top_p": st.floats(0.01, 1),
    "repetition_penalty": st.floats(0.5, 3),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "audio_encoding": st.sampled_from(["pcm16", "mulaw"]),
}
TEXT_ONLY = {"prompt", "stop"}
AUDIO_ONLY = {"audio_encoding"}  # (a 422 naming it for a text model, as frame_ms)
BAD = {  # out of range, huge, of the wrong type, unknown
    "model": st.sampled_from(["nope", "", TEXT, AUDIO]),
    "session_id": st.sampled_from(["sess-nope", "x" * 300]),
    "prompt_audio": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    "max_new_tokens": st.sampled_from([0, -1, 65, 2**63, 10**30, 1.5, "8"]),
    "seed": st.sampled_from([-1, 2**63, 2**64 + 1, 1e300]),
    "temperature": st.sampled_from([-1, 1e308, 101]),
    "top_p": st.sampled_from([0, 1.0001, -0.5]),
    "stop": st.sampled_from([[""], ["a"] * 17, "x" * 65]),
    "audio_encoding": st.sampled_from(["mp3", ""]),
    "stream": st.booleans(),
}
TYPES = ["session", "generate", "append", "cancel"]


@st.composite
def control_message(draw) -> str:
    """A message of a real type with valid fields, then (sometimes) a few fields made wrong."""
    msg = {"type": draw(st.sampled_from(TYPES))}
    model = draw(SOCKET_MODEL)
    if msg["type"] != "cancel":
        msg["model"] = model
        fields = sorted(VALID.keys() - (AUDIO_ONLY if model == TEXT else TEXT_ONLY))
        for name in draw(st.lists(st.sampled_from(fields), max_size=5, unique=True)):
            msg[name] = draw(VALID[name])
        if model == TEXT and msg["type"] != "session":
            msg.setdefault("prompt", draw(VALID["prompt"]))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        name = draw(st.sampled_from(sorted(VALID.keys() | BAD.keys() | {"type", "unknown"})))
        msg[name] = draw(BAD[name] if name in BAD and draw(st.booleans()) else JUNK)
    if draw(st.integers(0, 19)) == 0:
        msg.pop("type", None)
    return json.dumps(msg)


OVERSIZED = st.sampled_from([("text", "x" * (MAX_FRAME + 1)), ("binary", b"\0" * (MAX_FRAME + 1))])
FRAME = st.one_of(
    *[control_message().map(lambda t: ("text", t))] * 6,  # most frames: real messages, some made wrong
    st.text(max_size=200).map(lambda t: ("text", t)),  # mostly not JSON at all
    st.sampled_from(['{"type": "generate"', "[]", "null", "1e999", '{"type": "cancel"}', "{}"]).map(
        lambda t: ("text", t)
    ),
    st.one_of(*[st.binary(max_size=300).map(lambda b: ("binary", b))] * 3, OVERSIZED),
)

KNOWN_FRAMES = {"session", "token", "audio_header", "appended", "done", "error"}


def _exchange(url: str, frames: list[tuple[str, str | bytes]]) -> tuple[list, int | None]:
    """Send the frames on one socket (reading what comes back as we go), then close; returns the
    frames received and the server's close code (None when we closed first)."""
    got: list = []
    with connect(url, max_size=2**22, open_timeout=30, additional_headers=HEADERS) as ws:
        try:
            for kind, data in frames:
                ws.send(data)
                COUNTS["ws"]["frames"] += 1
                COUNTS["ws"][f"sent_{kind}"] += 1
                try:
                    while True:
                        got.append(ws.recv(timeout=0.02))
                except TimeoutError:
                    pass
            try:  # whatever is still running: let it end (max_new_tokens ≤ 64: milliseconds), briefly
                while True:
                    got.append(ws.recv(timeout=0.1))
            except TimeoutError:
                pass
        except ConnectionClosed as exc:
            return got, exc.rcvd.code if exc.rcvd else None
    return got, None


def _check_frames(got: list, close_code: int | None) -> None:
    for frame in got:
        if isinstance(frame, bytes):  # audio samples
            COUNTS["ws"]["recv_binary"] += 1
            continue
        msg = json.loads(frame)
        assert msg["type"] in KNOWN_FRAMES, msg
        COUNTS["ws"][f"recv_{msg['type']}"] += 1
        if msg["type"] == "error":
            assert 400 <= msg["code"] < 500, msg  # never a server error
            assert msg["message"]
            COUNTS["ws"][f"error_{msg['code']}_{msg.get('param')}"] += 1
    if close_code is not None:
        COUNTS["ws"][f"close_{close_code}"] += 1
        assert close_code in (1000, 1009), close_code  # 1009: an oversized frame


def test_websocket_fuzz_error_frames_or_close_codes_and_no_leak(fuzz_server, bystander, model_dirs):
    pool = {m: fuzz_server.state.models[m].engine.pool for m in (TEXT, AUDIO)}
    examples = max(1, 2 * WS_FRAMES // FRAMES_PER_EXAMPLE)

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(FRAME, min_size=1, max_size=FRAMES_PER_EXAMPLE))
    def one_socket(frames):
        got, code = _exchange(fuzz_server.ws_url, frames)
        _check_frames(got, code)

    while COUNTS["ws"]["frames"] < WS_FRAMES:
        one_socket()
    assert httpx.get(fuzz_server.url + "/healthz").status_code == 200
    turns = bystander.check(model_dirs["text"])
    # nothing leaked: sockets' sessions went with them, the bystander deleted its own, and what the
    # HTTP fuzzer made expired (TTL 3 s; waited for up to 60 s: a loaded machine's sweeps come late)
    table = fuzz_server.state.sessions
    assert wait_for(lambda: all(p.in_use == 0 for p in pool.values()) and table.count(TEXT) == 0, 60), {
        m: p.in_use for m, p in pool.items()
    }
    _write_results(
        "ws",
        {
            "command": "S4_FUZZ_WS_FRAMES=... pytest tests/test_fuzz.py",
            "frames_sent": COUNTS["ws"]["frames"],
            "counts": dict(COUNTS["ws"]),
            "bystander_turns_checked": turns,
            "slots_in_use_after_ttl": {m: p.in_use for m, p in pool.items()},
        },
    )
