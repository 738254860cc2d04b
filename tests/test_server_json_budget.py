"""A JSON body's structure is counted as it arrives and refused (413) past what a valid request to its
route holds, before anything parses it (server/json_budget.py): parsing holds the GIL, and 5.5 M token
ids in one body paused every stream for a second. The counter is checked against a byte-by-byte
reference and against the parsed value; the server against every kind of costly body, on every JSON
route and over WebSockets, at the budget's edge, and for what must never count (strings, non-JSON
bodies)."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import socket

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from server_support import ServerThread, read_until_closed, reference
from test_server_slow_clients import counters
from test_server_ws import turn
from websockets.asyncio.client import connect

from model.sampling import SamplingParams
from server.json_budget import (
    CHAT_SLACK,
    CONTAINERS,
    MAX_DEPTH,
    SMALL,
    JSONBudget,
    StructureCounter,
    json_content_type,
    over_budget_message,
    route_budget,
    text_over_budget,
)

UNLIMITED = JSONBudget(10**12, 10**12, 10**12, 10**12, depth=10**12)
KINDS = ("depth", "separators", "containers", "members", "floats")
JSON = {"content-type": "application/json"}
MAX_PROMPT = 2048  # the server's max_prompt_tokens: /v1/completions' budget is 64 × 2048 + SMALL


def byte_reference(text: bytes) -> dict[str, int]:
    """The four counts and the deepest nesting, one byte at a time (a plain state machine: in a string,
    after a backslash; the depth open)."""
    counts = dict.fromkeys(KINDS, 0)
    inside = escaped = False
    depth = 0
    for b in text:
        if inside:
            if escaped:
                escaped = False
            elif b == ord("\\"):
                escaped = True
            elif b == ord('"'):
                inside = False
        elif b == ord('"'):
            inside = True
        elif b == ord(","):
            counts["separators"] += 1
        elif b in b"[{":
            counts["containers"] += 1
            depth += 1
            counts["depth"] = max(counts["depth"], depth)
        elif b in b"]}":
            depth -= 1
        elif b == ord(":"):
            counts["members"] += 1
        elif b in b".eE":
            counts["floats"] += 1
    return counts


def value_reference(value) -> dict[str, int]:
    """The four counts from the parsed value: elements but the first of each container, containers,
    object members, and the '.', 'e', 'E' of each number, true and false as json.dumps writes them; and
    the most containers nested in one another."""
    counts = dict.fromkeys(KINDS, 0)

    def walk(v, depth: int = 0) -> None:
        if isinstance(v, (list, dict)):
            counts["depth"] = max(counts["depth"], depth + 1)
            counts["containers"] += 1
            counts["separators"] += max(len(v) - 1, 0)
            if isinstance(v, dict):
                counts["members"] += len(v)
            for item in v.values() if isinstance(v, dict) else v:
                walk(item, depth + 1)
        elif isinstance(v, (bool, int, float)):
            literal = json.dumps(v)
            counts["floats"] += sum(literal.count(c) for c in ".eE")

    walk(value)
    return counts


def feed_split(text: bytes, rng: random.Random, budget: JSONBudget = UNLIMITED) -> StructureCounter:
    counter = StructureCounter(budget)
    i = 0
    while i < len(text):
        j = i + rng.choice([1, 2, 3, 7, 64, 4096])
        counter.feed(text[i:j])
        i = j
    return counter


TRICKY = st.sampled_from(['"', "\\", "\\\\", '\\"', ",", ":", "[", "{", ".", "e", "E", "é", "\u2028", "\x01"])
STRINGS = st.lists(st.one_of(TRICKY, st.text(max_size=4)), max_size=8).map("".join)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    STRINGS,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(STRINGS, inner, max_size=5)),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(VALUES, st.booleans(), st.integers(0, 2**32))
def test_the_count_is_the_parsed_values_and_the_byte_references_however_the_body_is_split(
    value, ascii_, seed
):
    text = json.dumps(value, ensure_ascii=ascii_).encode()
    assert json.loads(text) == value
    counter = feed_split(text, random.Random(seed))
    assert counter.counts == byte_reference(text) == value_reference(value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2**32))
def test_any_bytes_are_counted_as_the_byte_reference_counts_them(data, seed):
    """Not JSON at all, odd runs of backslashes across a split included: the same counts."""
    data = data.replace(b"\x00", b"\\")  # more escapes
    assert feed_split(data, random.Random(seed)).counts == byte_reference(data)


def test_feed_names_the_first_kind_over_its_budget_and_only_then():
    budget = JSONBudget(separators=3, containers=2, members=1, floats=1)
    counter = StructureCounter(budget)
    assert counter.feed(b'{"a": [1, 2') is None
    assert counter.feed(b", 3], ") is None  # 3 separators: at the budget
    assert counter.feed(b'"b,[{:": 1.5') == "members"  # strings count nothing; the 2nd member does
    for kind, text in [("separators", b"[1,2,3,4,5]"), ("containers", b"[[[]]]"), ("floats", b"[1.5, true]")]:
        assert StructureCounter(budget).feed(text) == kind


def test_the_more_specific_kind_is_named_when_two_pass_together():
    """A float adds a separator and an object member does too: the refusal names the float or the
    member (what the client sent), not the comma."""
    budget = JSONBudget(separators=100, containers=100, members=100, floats=100)
    assert StructureCounter(budget).feed(json.dumps([0.5] * 200).encode()) == "floats"
    assert StructureCounter(budget).feed(json.dumps({str(i): 1 for i in range(200)}).encode()) == "members"
    assert StructureCounter(budget).feed(json.dumps([[]] * 200).encode()) == "containers"
    assert StructureCounter(budget).feed(json.dumps([1] * 200).encode()) == "separators"


def test_nesting_past_max_depth_is_named_wherever_the_body_is_split_and_only_outside_strings():
    """MAX_DEPTH (32) arrays and objects nested in one another pass, 33 do not, whatever the pieces (one
    byte at a time; pieces with and without quotes take the counter's two paths); brackets inside strings
    open nothing; closing lowers the depth, so many shallow containers pass; depth is named before
    containers when both pass on one byte (the more specific)."""
    assert MAX_DEPTH == 32 and JSONBudget(1, 1, 1, 1).depth == MAX_DEPTH
    budget = JSONBudget(10**6, 10**6, 10**6, 10**6)
    for n, want in [(MAX_DEPTH, None), (MAX_DEPTH + 1, "depth")]:
        for text in (
            "[" * n + "]" * n,
            '{"a": ' * n + "1" + "}" * n,
            '[{"p": ' * (n // 2) + '"["' + "}]" * (n // 2),
        ):
            if text.startswith("[{") and n % 2:
                text = "[" + text + "]"  # (an odd depth)
            data = text.encode()
            assert byte_reference(data)["depth"] == n and json.loads(data) is not None
            assert StructureCounter(budget).feed(data) == want, (n, text[:20])
            one = StructureCounter(budget)
            assert [k for k in (one.feed(data[i : i + 1]) for i in range(len(data))) if k][:1] == (
                [want] if want else []
            )
            assert text_over_budget(text, budget) == want
    wide = ("[" + "[[]]," * 5000 + "[]]").encode()  # 10,002 containers, 3 deep
    counter = feed_split(wide, random.Random(0), budget)
    assert counter.counts["depth"] == 3 and counter.depth == 0
    assert StructureCounter(budget).feed(b'{"p": "' + b"[" * 100 + b'"}') is None  # in a string
    both = JSONBudget(10**6, MAX_DEPTH, 10**6, 10**6)
    assert StructureCounter(both).feed(b"[" * (MAX_DEPTH + 1)) == "depth"
    msg = over_budget_message("depth", budget)
    assert msg.startswith(
        "the request body holds more than 32 levels of arrays and objects nested in one another"
    )


def test_a_whole_text_is_refused_as_the_counter_refuses_it():
    budget = JSONBudget(separators=2, containers=10, members=10, floats=10)
    assert text_over_budget('{"p": ",,,,,,,,,,,,"}', budget) is None  # commas only in a string
    assert text_over_budget('{"p": [1, 2, 3, 4]}', budget) == "separators"
    assert text_over_budget('{"p": "\\ud800,,,,"}', budget) is None  # a lone surrogate's escape: no error


@pytest.mark.parametrize(
    "value, parsed",
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"application/merge-patch+json", True),
        (b"text/plain", False),
        (b"application/octet-stream", False),
        (b"text/json", False),
        (None, False),  # FastAPI's strict content type: no header, no JSON
    ],
)
def test_bodies_are_counted_exactly_when_fastapi_parses_them_as_json(value, parsed):
    headers = [(b"host", b"x")] + ([(b"content-type", value)] if value is not None else [])
    assert json_content_type(headers) is parsed


def fastapi_reads_as_json(value: bytes) -> bool:
    """Whether FastAPI itself (a route with a JSON object body, its defaults) parses a body sent with
    this Content-Type value as JSON."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/")
    async def echo(body: dict) -> dict:
        return body

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": "/",
             "raw_path": b"/", "root_path": "", "scheme": "http", "query_string": b"", "server": ("x", 80),
             "headers": [(b"host", b"x"), (b"content-type", value)]}  # fmt: skip
    sent = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b'{"a": 1}', "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))  # (the header's bytes as a server hands them over)
    assert sent[0]["status"] in (200, 422), sent
    return sent[0]["status"] == 200


# a header value may hold any byte but controls (obs-text, RFC 9110 5.5); Starlette reads it as Latin-1
HEADER_BYTES = [b for b in range(256) if b == 9 or 0x20 <= b < 0x7F or b >= 0x80]


def test_a_content_type_is_read_as_json_by_the_count_exactly_when_fastapi_reads_it_so():
    """Every byte a header value may hold, before and after `application/json`, and inside it: the count
    and FastAPI agree. (FastAPI reads the value as Latin-1 text and strips it as Unicode text: with a
    no-break space (0xA0) or NEL (0x85) before or after, FastAPI parsed the body as JSON while the count,
    which stripped ASCII whitespace only, took it for another type and left it uncounted.)"""
    values = [bytes([b]) + b"application/json" for b in HEADER_BYTES]
    values += [b"application/json" + bytes([b]) for b in HEADER_BYTES]
    values += [b"application" + bytes([b]) + b"/json" for b in HEADER_BYTES]
    values += [b"application/json;" + bytes([b]) + b"charset=utf-8" for b in HEADER_BYTES]
    wrong = [v for v in values if json_content_type([(b"content-type", v)]) is not fastapi_reads_as_json(v)]
    assert not wrong, wrong


# --- the server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(model_dirs):
    from server import Settings

    settings = Settings(
        checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])],
        max_prompt_tokens=MAX_PROMPT,
        max_new_tokens=4096,
        drain_timeout_s=1,
    )
    s = ServerThread(settings).start()
    yield s
    s.stop()


def refusals(url: str) -> float:
    return counters(url, "s4_requests_refused_total")["json_structure"]


def first_over(body: bytes, budget: JSONBudget) -> int:
    """The length of the shortest prefix of `body` whose count is over `budget`."""
    counter = StructureCounter(budget)
    for i in range(len(body)):
        if counter.feed(body[i : i + 1]) is not None:
            return i + 1
    raise AssertionError("never over the budget")


def send_prefix(port: int, path: str, body: bytes, cut: int) -> bytes:
    """Headers declaring all of `body`, then only body[:cut]; what the server answers (the rest is
    never sent: a server that waited for the whole body to parse it would answer nothing)."""
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(head.encode() + body[:cut])
        return read_until_closed(s, timeout=10)


def body_of(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


N_OVER = SMALL + 10
COMPLETIONS_N = 64 * MAX_PROMPT + SMALL + 10
COSTLY = {  # every kind of costly body, on each JSON route; each holds a bit more than its budget
    "token ids": ("/v1/completions", {"model": "tiny-text", "prompt": [7] * COMPLETIONS_N}),
    "prompt lists": ("/v1/completions", {"model": "tiny-text", "prompt": [[7]] * (CONTAINERS + 10)}),
    "logit_bias": ("/v1/completions", {"model": "tiny-text", "prompt": "a",
                                       "logit_bias": {str(i): 1 for i in range(N_OVER)}}),
    "floats": ("/v1/completions", {"model": "tiny-text", "prompt": "a", "stop": [0.5] * N_OVER}),
    "chat parts": ("/v1/chat/completions", {"model": "tiny-text", "messages": [
        {"role": "user", "content": [{"type": "text", "text": ""}] * (CONTAINERS + 10)}]}),
    "unknown field": ("/v1/generate", {"model": "tiny-text", "prompt": "a", "junk": [0] * N_OVER}),
    "booleans": ("/v1/generate", {"model": "tiny-audio", "junk": [True] * N_OVER}),
    "session": ("/v1/sessions", {"model": "tiny-text", "prompt": "a", "junk": [None] * N_OVER}),
    "nested": ("/v1/generate", {"model": "tiny-text", "prompt": "a", "junk": [[[]]] * (CONTAINERS // 2 + 9)}),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(COSTLY))
def test_a_costly_body_is_refused_413_once_its_count_passes_the_budget_before_the_rest_arrives(srv, kind):
    path, obj = COSTLY[kind]
    body = body_of(obj) + b" " * (1 << 20)  # and a MiB the server must never wait for
    budget, note = route_budget(path, MAX_PROMPT)
    cut = first_over(body, budget)
    before = refusals(srv.url)
    response = send_prefix(srv.port, path, body, cut)
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), response[:300]
    message = json.loads(payload)["error"]["message"]
    assert refusals(srv.url) - before == 1
    over = StructureCounter(budget)
    over.feed(body[:cut])
    (named,) = [k for k in KINDS if over.counts[k] > budget.limit(k)]  # (one byte passes one kind)
    why = note if named == "separators" and note else "more than any valid request body holds"
    assert f"the request body holds more than {budget.limit(named)} " in message, message
    assert f"({why}); it was refused before it was parsed" in message, message


def test_at_the_budget_a_body_is_parsed_and_one_more_is_refused(srv):
    """/v1/generate: 65,536 separators in all are parsed (422 naming the unknown field), 65,537 are not."""
    for k, status in [(SMALL - 1, 422), (SMALL, 413)]:
        obj = {"model": "tiny-text", "prompt": "a", "junk": [0] * k}  # 2 + k - 1 separators
        assert byte_reference(body_of(obj))["separators"] == k + 1
        r = httpx.post(
            srv.url + "/v1/generate", content=body_of(obj), headers={"content-type": "application/json"}
        )
        assert r.status_code == status, r.text[:300]
        if status == 422:
            assert r.json()["error"]["param"] == "junk"


def test_the_largest_valid_completions_request_is_served(srv):
    """64 prompts of max_prompt_tokens token ids (131,072 ids: twice what other routes take) → 200."""
    prompts = [[random.Random(i).randrange(32, 127) for _ in range(MAX_PROMPT)] for i in range(64)]
    body = body_of({"model": "tiny-text", "prompt": prompts, "max_tokens": 1, "temperature": 0})
    assert byte_reference(body)["separators"] > SMALL
    r = httpx.post(srv.url + "/v1/completions", content=body, headers=JSON, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 64 and r.json()["usage"]["prompt_tokens"] == 64 * MAX_PROMPT


def test_structure_inside_strings_never_counts(srv):
    """Valid prompts whose bytes are ':', '[', '.' and 'e' (over the members', containers' and floats'
    budgets many times, all inside strings) are served."""
    for prompts in ([":" * MAX_PROMPT] * 40 + ["[" * MAX_PROMPT] * 24, [".e" * (MAX_PROMPT // 2)] * 64):
        body = body_of({"model": "tiny-text", "prompt": prompts, "max_tokens": 1, "temperature": 0})
        naive = {k: sum(body.count(c) for c in cs) for k, cs in [("members", b":"), ("containers", b"[{"),
                                                                  ("floats", b".eE")]}  # fmt: skip
        budget = route_budget("/v1/completions", MAX_PROMPT)[0]
        assert any(n > budget.limit(k) for k, n in naive.items())
        r = httpx.post(srv.url + "/v1/completions", content=body, headers=JSON, timeout=300)
        assert r.status_code == 200, r.text[:300]


@pytest.mark.parametrize("content_type", [b"application/json\xa0", b"\x85application/json"])
def test_a_costly_body_is_refused_whatever_spelling_of_json_its_content_type_has(srv, content_type):
    """A Content-Type FastAPI reads as JSON after stripping it as Unicode text (a no-break space, a NEL)
    is counted too: 300,000 empty lists under `application/json\\xa0` were parsed (0.6 s of a held event
    loop, then a 422), where `application/json` is refused 413 before the rest arrives."""
    body = body_of({"model": "tiny-text", "prompt": "a", "junk": [[]] * (CONTAINERS + 10)})
    body += b" " * (1 << 20)  # and a MiB the server must never wait for
    cut = first_over(body, route_budget("/v1/generate", MAX_PROMPT)[0])
    head = b"POST /v1/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + content_type + b"\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    before = refusals(srv.url)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(head + body[:cut])
        response = read_until_closed(s, timeout=10)
    assert response.startswith(b"HTTP/1.1 413"), response[:300]
    assert refusals(srv.url) - before == 1


def test_a_body_fastapi_does_not_read_as_json_is_not_counted(srv):
    body = body_of({"model": "tiny-text", "prompt": "a", "junk": [0] * N_OVER})
    r = httpx.post(srv.url + "/v1/generate", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415, r.text[:300]  # not JSON to FastAPI (server/app.py): uncounted, not a 413


# Python's json (FastAPI's body parser) reads UTF-16 and UTF-32 too, by a BOM or by NUL bytes among a
# body's first four; the name it detects each encoding by, as the 400 gives it
NOT_UTF8 = {"utf-16": "UTF-16", "utf-16-le": "UTF-16-LE", "utf-16-be": "UTF-16-BE", "utf-32": "UTF-32",
            "utf-32-le": "UTF-32-LE", "utf-32-be": "UTF-32-BE"}  # fmt: skip


@pytest.mark.parametrize("encoding", list(NOT_UTF8))
def test_a_body_in_utf16_or_utf32_is_a_400_from_its_first_bytes_on_every_json_route(srv, encoding):
    """A JSON body must be UTF-8 (RFC 8259 8.1), and the count reads UTF-8 bytes. A UTF-16 body whose
    prompt is "∀" (0x00 0x22: 0x22 is '"') had the counter inside a string from there on, so 2.8 M empty
    lists after it went uncounted and were parsed (422 after 0.74 s of a held event loop; 3 at once
    stalled every stream 3.1 s: a helper's audit). Now any body whose first four bytes say UTF-16 or
    UTF-32 is a 400 naming the encoding, answered from those bytes with the rest never sent, on every JSON
    route; it is not a structure refusal (s4_requests_refused_total unchanged). A UTF-8 BOM is read."""
    attack = {"model": "tiny-text", "prompt": "\u2200", "stop": [[]] * (CONTAINERS + 10)}
    body = json.dumps(attack, ensure_ascii=False).encode(encoding) + " ".encode(encoding) * (1 << 18)
    want = f"malformed JSON: the body is {NOT_UTF8[encoding]}, not UTF-8"
    before = refusals(srv.url)
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/sessions"):
        response = send_prefix(srv.port, path, body, 4)  # its first 4 bytes of ~1 MiB
        head, _, payload = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), response[:300]
        error = json.loads(payload)["error"]
        assert error["message"].startswith(want) and error["param"] is None, error
        small = json.dumps({"model": "tiny-text", "prompt": "a"}).encode(encoding)  # whole, and valid
        r = httpx.post(srv.url + path, content=small, headers=JSON)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(want), r.text[:300]
    assert refusals(srv.url) == before
    bom = b"\xef\xbb\xbf" + body_of({"model": "tiny-text", "prompt": "a", "max_new_tokens": 1})
    assert httpx.post(srv.url + "/v1/generate", content=bom, headers=JSON).status_code == 200


def test_a_state_import_header_is_read_as_utf8_only():
    """The same class in an import's header, which is counted as UTF-8 bytes before json.loads parses it:
    a header in UTF-16 or UTF-32 (its checksum right; json.loads read it) is refused as not valid JSON (as
    UTF-8 its NUL bytes are not JSON); the same header in UTF-8 is read."""
    import hashlib

    from server.sessions import _PREFIX, MAGIC, STATE_VERSION, StateFormatError, unpack_state

    header = {"dtype": "float32", "shape": [2], "seen": [], "model": "m", "prompt": "\u2200"}
    for encoding, ok in (("utf-8", True), ("utf-16-le", False), ("utf-16", False), ("utf-32", False)):
        head = json.dumps(header, ensure_ascii=False).encode(encoding)
        body = _PREFIX.pack(MAGIC, STATE_VERSION, len(head)) + head + b"\0" * 8
        blob = body + hashlib.sha256(body).digest()
        if ok:
            assert unpack_state(blob)[0] == header
        else:
            with pytest.raises(StateFormatError, match=r"state header is not valid JSON \("):
                unpack_state(blob)


def test_an_over_budget_websocket_message_is_an_error_frame_and_changes_no_other_stream(srv, model_dirs):
    """One socket streams; another sends over-budget messages (token ids, nested arrays) between its
    own turns: each is refused with a 413 error frame, the socket generates on, and the first
    socket's tokens are the library's own for its seed."""
    params = SamplingParams(temperature=1.0, seed=5)
    want = reference(model_dirs["text"], list(b"to be"), params, 600)

    async def main():
        async with connect(srv.ws_url, max_size=None) as a, connect(srv.ws_url, max_size=None) as b:
            await a.send(json.dumps({"type": "generate", "model": "tiny-text", "prompt": "to be",
                                     "max_new_tokens": 600, "seed": 5}))  # fmt: skip
            errors = []
            for junk in ([0] * N_OVER, [[]] * (CONTAINERS + 1), [0.5] * N_OVER):
                await b.send(
                    json.dumps({"type": "generate", "model": "tiny-text", "prompt": "a", "junk": junk})
                )
                errors.append(json.loads(await b.recv()))
            await b.send(
                json.dumps({"type": "generate", "model": "tiny-text", "prompt": "a", "max_new_tokens": 3})
            )
            b_ids, _, b_done = await turn(b)
            a_ids, _, a_done = await turn(a)
            return errors, b_ids, b_done, a_ids, a_done

    before = refusals(srv.url)
    errors, b_ids, b_done, a_ids, a_done = asyncio.run(main())
    budget = route_budget("/v1/stream", MAX_PROMPT)[0]
    for e, kind in zip(errors, ["separators", "containers", "floats"], strict=True):  # floats: the kind named
        assert e["type"] == "error" and e["code"] == 413, e
        assert f"the message holds more than {budget.limit(kind)} " in e["message"], e
        assert "(more than any valid message holds)" in e["message"], e
    assert refusals(srv.url) - before == 3
    assert b_done["type"] == "done" and len(b_ids) == 3
    assert a_done["type"] == "done" and a_ids == want


def test_a_union_stops_at_each_members_first_bad_item(monkeypatch):
    """pydantic reports every bad item of a list by default: 10,000 bad token ids made 20,000 errors,
    ~3 s for 600k of them. Each member of the prompt union now reports its first."""
    from pydantic import ValidationError

    from server import schemas

    seen = []
    original = schemas.union_error

    def recording(errors):
        seen.append(len(errors))
        return original(errors)

    monkeypatch.setattr(schemas, "union_error", recording)
    for prompt in ([-1] * 10_000, [0.5] * 10_000, [None] * 10_000, [[-1]] * 60, [["a"]] * 60):
        with pytest.raises(ValidationError) as err:
            schemas.CompletionRequest.model_validate({"model": "m", "prompt": prompt})
        assert err.value.error_count() == 1
        assert seen[-1] <= 4, (prompt[:2], seen[-1])  # one per member at most
    with pytest.raises(ValidationError):
        schemas.ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": [1] * 10_000}]}
        )
    assert seen[-1] <= 3


def test_a_too_long_id_prompt_is_refused_by_its_length_before_its_ids_are_read(srv):
    """Out of vocabulary and too long: the length is checked first (the 400 OpenAI sends)."""
    r = httpx.post(
        srv.url + "/v1/completions", json={"model": "tiny-text", "prompt": [999] * (MAX_PROMPT + 1)}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny-text", "prompt": [999] * MAX_PROMPT})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"], r.text


def test_python_m_server_freezes_what_startup_made_and_in_process_servers_do_not(model_dirs):
    from server import Settings

    before = gc.get_freeze_count()
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])], drain_timeout_s=0))
    s.state.freeze_gc = True  # as python -m server sets it
    try:
        s.start()
        frozen = gc.get_freeze_count() - before
    finally:
        s.stop()
        gc.unfreeze()  # the test process's own objects back under the GC
    assert frozen > 1000, frozen
    from server.state import ServerState

    assert ServerState(Settings(checkpoints=[])).freeze_gc is False


def test_the_budgets_grow_with_the_token_limits_on_the_token_id_routes_only():
    assert route_budget("/v1/completions", 8192)[0] == JSONBudget(64 * 8192 + SMALL, CONTAINERS, SMALL, SMALL)
    for prompt, new in ((8192, 4096), (4096, 8192)):  # (the larger of the two)
        budget = route_budget("/detokenize", prompt, new)[0]
        assert budget == JSONBudget(8192 + SMALL, CONTAINERS, SMALL, SMALL)
    for path in ("/v1/generate", "/v1/sessions", "/v1/stream"):
        assert (
            route_budget(path, 8192)[0]
            == route_budget(path, 10**6, 10**6)[0]
            == JSONBudget(SMALL, CONTAINERS, SMALL, SMALL)
        )
    # chat: its content parts, one token each at least, grow with the prompt limit past the defaults' budget
    assert route_budget("/v1/chat/completions", 8192)[0] == JSONBudget(SMALL, CONTAINERS, SMALL, SMALL)
    n = 10**6
    assert route_budget("/v1/chat/completions", n)[0] == JSONBudget(
        2 * n + CHAT_SLACK, n + CHAT_SLACK, 2 * n + CHAT_SLACK, SMALL
    )


def test_a_chat_of_as_many_one_token_content_parts_as_the_prompt_limit_is_served(model_dirs, tmp_path):
    """A message's content parts are an unbounded list; each part {"type": "text", "text": "a"} holds a
    token at least. With S4_MAX_PROMPT_TOKENS=40000, a chat of 20,000 one-byte parts (a prompt well within
    the limit) was refused 413 as holding more arrays and objects "than any valid request body holds"
    (16,384: the chat budget did not grow with the limit, as /v1/completions' does; R13's note). Now it
    is served, and a body past the grown budget is still refused before it is parsed."""
    from server_support import chat_copy

    from server import Settings

    chat = chat_copy(model_dirs["text"], tmp_path)
    settings = Settings(checkpoints=[str(chat)], max_prompt_tokens=40_000, max_sessions=2)
    srv = ServerThread(settings).start()
    try:
        parts = [{"type": "text", "text": "a"}] * 20_000
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": parts}], "max_tokens": 1}
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["usage"]["prompt_tokens"] > 20_000, r.json()["usage"]
        over = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}] * 45_000}]}
        r = httpx.post(srv.url + "/v1/chat/completions", content=body_of(over), headers=JSON)
        said = r.json()["error"]["message"]
        assert r.status_code == 413 and "more than any valid request body holds" in said, r.text[:300]
    finally:
        srv.stop()


def test_detokenize_takes_back_every_id_list_tokenize_or_a_generation_gives(model_dirs):
    """/detokenize takes token ids too, as many as a prompt (/tokenize's answer, up to max_prompt_tokens) or a
    generation (up to max_new_tokens) holds; its budget was every other route's, 65,536 elements, so past
    that a valid body was refused 413 as holding "more than any valid request body holds" (with
    S4_MAX_PROMPT_TOKENS=70000: /tokenize answered 70,000 ids that /detokenize refused). The other routes'
    budgets stay as they were."""
    from server import Settings

    n = SMALL + 4464  # 70,000
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_prompt_tokens=n, max_new_tokens=n + 1000)
    srv = ServerThread(settings).start()
    try:
        text = "to be, or " * (n // 10)
        ids = httpx.post(srv.url + "/tokenize", json={"model": "tiny-text", "prompt": text}).json()["tokens"]
        assert len(ids) == n
        for tokens, want in ((ids, text), ([65] * (n + 1000), "A" * (n + 1000))):
            r = httpx.post(srv.url + "/detokenize", json={"model": "tiny-text", "tokens": tokens})
            assert r.status_code == 200 and r.json()["prompt"] == want, r.text[:300]
        over = {"model": "tiny-text", "tokens": [65] * (n + 1000 + SMALL + 2)}
        r = httpx.post(srv.url + "/detokenize", content=body_of(over), headers=JSON)
        assert r.status_code == 413, r.text[:300]
        assert "a valid /detokenize body holds" in r.json()["error"]["message"], r.text
        r = httpx.post(srv.url + "/v1/generate", json={"model": "tiny-text", "prompt": "a", "junk": [0] * n})
        assert r.status_code == 413, r.text[:300]  # (another route's budget: as before)
    finally:
        srv.stop()


def test_a_state_import_header_is_counted_before_it_is_parsed(srv):
    """The class's variant in a binary body: an import's JSON header (a real export's, with its checksum
    recomputed) that holds more than an export's can is refused 422 naming `state` unparsed; one at
    the budget (SMALL + the largest vocabulary served: a `seen` list may hold every id) is parsed (and
    refused for its shape)."""
    from server.sessions import header_budget, pack_state, unpack_state

    most = max(m.config.vocab_size for m in srv.state.models.values())

    with httpx.Client(base_url=srv.url, timeout=60) as c:
        sid = c.post("/v1/sessions", json={"model": "tiny-text", "prompt": "to be"}).json()["session_id"]
        header, raw = unpack_state(c.get(f"/v1/sessions/{sid}/export").content)
        assert c.post("/v1/sessions/import", content=pack_state(header, raw)).status_code == 201
        extra = (
            header_budget(most).separators
            - byte_reference(json.dumps(header, sort_keys=True).encode())["separators"]
        )
        for n, parsed in [(extra, True), (extra + 1, False)]:
            blob = pack_state({**header, "shape": header["shape"] + [1] * n}, raw)  # the same product
            r = c.post("/v1/sessions/import", content=blob)
            error = r.json()["error"]
            assert r.status_code == 422 and error["param"] == "state", r.text[:300]
            assert ("was not parsed" not in error["message"]) is parsed, error["message"]
            assert ("does not match" in error["message"]) is parsed, error["message"]


def test_a_word_level_sessions_seen_list_may_hold_more_than_65536_ids():
    """A session of a model with a large vocabulary (the WikiText-103 recipe's 267,735 words) can have seen
    more than 65,536 distinct ids (a weak model's random words reach it within ~75,000 tokens): its export
    is read back whole when the largest vocabulary served allows it (the budget was 65,536 separators
    whatever the model: such a session was exported, then refused at its import or its resume from Redis),
    and still refused unparsed beyond it."""
    from server.sessions import StateFormatError, pack_state, unpack_state

    header = {"dtype": "float32", "shape": [2], "seen": list(range(70_000)), "model": "m"}
    blob = pack_state(header, b"\0" * 8)
    with pytest.raises(StateFormatError, match="it was not parsed"):
        unpack_state(blob)
    got, raw = unpack_state(blob, 70_000)
    assert got["seen"] == list(range(70_000)) and raw == b"\0" * 8
    with pytest.raises(StateFormatError, match="it was not parsed"):
        unpack_state(pack_state({**header, "seen": list(range(70_000 + 65_536 + 1))}, b"\0" * 8), 70_000)


# bodies Python's json refuses with a reason that ends in "at" (its msg; the position is added after it)
AT_REASONS = {
    b'{"model": "tiny-text", "prompt": "a\nb"}': ("Invalid control character at character 35", True),
    b'{"model": "tiny-text", "prompt": "ab': ("Unterminated string starting at character 33", False),
}


@pytest.mark.parametrize("body", list(AT_REASONS))
def test_malformed_json_says_where_once_and_a_raw_line_break_says_what_to_do_on_every_route(srv, body):
    """A raw line break in a string (a prompt_audio built with `base64`, which wraps at 76 characters,
    without -w0: a fresh-user trial) was refused "malformed JSON: Invalid control character at at character
    141": Python's reason ends in "at", and the position was added after it. Now "at character N" once, on
    every JSON route and the WebSocket, and a control character says what to do."""
    reason, hint = AT_REASONS[body]
    want = f"malformed JSON: {reason}"
    for path in ("/v1/generate", "/v1/completions", "/v1/chat/completions", "/v1/sessions"):
        r = httpx.post(srv.url + path, content=body, headers=JSON)
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and message.startswith(want) and " at at " not in message, (path, r.text)
        assert ("needs -w0" in message) == hint, message

    async def ws_error() -> dict:
        async with connect(srv.ws_url) as ws:
            await ws.send(body.replace(b'"model"', b'"type": "generate", "model"').decode())
            return json.loads(await ws.recv())

    error = asyncio.run(ws_error())
    assert error["type"] == "error" and error["code"] == 400, error
    assert error["message"].startswith(
        "malformed JSON: " + reason.rsplit(" at character", 1)[0] + " at character"
    )
    assert " at at " not in error["message"] and ("needs -w0" in error["message"]) == hint, error
