"""Issue 16, kind 7: a text session's UTF-8 decoder belongs to the session, not to the turn.

A character whose first bytes end one generation and whose last bytes start the next is sent whole by
the next (never U+FFFD for bytes a later token completes): WebSocket turns, HTTP (JSON and SSE)
continuation, cancel and max_new_tokens ending mid-character, stop sequences, fork, export/import.
The byte sequences are found with the library (a near-uniform temperature, seeds searched) and the
expected text is written out from them, so each case is the one it claims to be with the test model.
The example of docs/reliability.md runs on the shipped text-shakespeare
(`test_the_documented_example_on_the_shipped_model`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from server_support import ServerThread, reference, sse_events
from websockets.sync.client import connect

from model.codecs import ByteTokenizer, utf8_tail
from model.sampling import SamplingParams
from server.media import TextAssembler
from server.sessions import pack_state, unpack_state

TEXT, AUDIO = "tiny-text", "tiny-audio"
PROMPT = "caf"
HOT = 100.0  # near-uniform: every byte value turns up within a few seeds


def lead2(b: int) -> bool:  # first byte of a 2-byte character
    return 0xC2 <= b <= 0xDF


def cont(b: int) -> bool:
    return 0x80 <= b <= 0xBF


def printable(b: int) -> bool:
    return 0x20 <= b <= 0x7E


def find(model_dirs, ids: list[int], n: int, want, start: int = 0) -> tuple[int, list[int]]:
    """The first seed (from `start`) whose n tokens after `ids` (at temperature HOT) satisfy `want`."""
    for seed in range(start, start + 2000):
        out = reference(model_dirs["text"], ids, SamplingParams(temperature=HOT, seed=seed), n)
        if want(out):
            return seed, out
    raise AssertionError("no seed gives the bytes this test needs")


@pytest.fixture(scope="module")
def split_char(model_dirs):
    """(s1, t1, s2, t2): after PROMPT, seed s1 gives one lead byte t1 = [lead]; after PROMPT + t1,
    seed s2 gives t2 = [continuation, printable ASCII]; so t1 + t2 is valid UTF-8: one 2-byte
    character and one ASCII character."""
    p = list(PROMPT.encode())
    s1, t1 = find(model_dirs, p, 1, lambda o: lead2(o[0]))
    s2, t2 = find(model_dirs, p + t1, 2, lambda o: cont(o[0]) and printable(o[1]))
    whole = bytes(t1 + t2).decode("utf-8")  # strict: it is valid
    assert len(whole) == 2 and ord(whole[0]) > 0x7F
    return s1, t1, s2, t2


def held(data: bytes) -> str:
    """Independent reference: the text of `data` with an unfinished last character held back (a lead
    byte followed by fewer continuation bytes than it announces, which some continuation completes)."""
    for k in (1, 2, 3):
        if len(data) < k:
            break
        tail = data[-k:]
        need = {0xC: 2, 0xD: 2, 0xE: 3, 0xF: 4}.get(tail[0] >> 4, 0)
        if need > k and all(cont(b) for b in tail[1:]):
            if any(_completes(tail, need, c) for c in range(0x80, 0xC0)):
                return data[:-k].decode("utf-8", errors="replace")
            break
    return data.decode("utf-8", errors="replace")


def _completes(tail: bytes, need: int, c: int) -> bool:
    if tail[:1] == b"\xed" and len(tail) == 2:
        return True  # CPython's decoder defers ED A0-BF (a surrogate's start) until the next byte too
    filler = bytes([c]) if len(tail) == 1 else b""
    try:
        (tail + filler + b"\x80" * (need - len(tail) - len(filler))).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- the library pieces ------------------------------------------------------------------------


def test_utf8_tail_is_what_a_later_byte_could_complete():
    for data, tail in [
        (b"", b""), (b"caf", b""), (b"caf\xd3", b"\xd3"), (b"\xe2\x82", b"\xe2\x82"),
        (b"\xf0\x9f\x98", b"\xf0\x9f\x98"),
        (b"\xe2\x82\xac", b""), (b"\x80", b""), (b"\xd3A", b""), (b"\xe0\x80", b""),
        (b"\xed\xa0", b"\xed\xa0"),  # CPython's decoder defers a surrogate's start to the next byte
        (b"\xf4\x90", b""), (b"\xff", b""), (b"\xc0", b""), (b"a\xf0", b"\xf0"),
    ]:  # fmt: skip
        assert utf8_tail(data) == tail, data
        assert held(data) == data[: len(data) - len(tail)].decode("utf-8", errors="replace"), data


def test_text_assembler_carries_an_unfinished_character_across_generations():
    first = TextAssembler([], ends=False)
    assert first.feed([0x63, 0xD3]) == "c" and first.finish(None) == ""  # held, not U+FFFD
    second = TextAssembler([], carry=b"\xd3", ends=False)
    assert second.feed([0x9B]) == "ӛ" and second.feed([0x60]) == "`" and second.finish(None) == ""
    begun = TextAssembler([b"\xd3\x9b", b"`"], carry=b"\xd3", ends=False)  # a stop the carried byte begins
    assert begun.feed([0x9B]) == "" and begun.finish(0) == "" and begun.tokens_emitted() == 0
    ending = TextAssembler([], carry=b"\xd3")  # a one-shot text ends: nothing can complete it now
    assert ending.feed([]) == "" and ending.finish(None) == "\ufffd"
    stopped = TextAssembler([b"x"], ends=False)  # a stop sequence ends the text
    stopped.feed([0xD3, ord("x")])
    assert stopped.finish(1) == "\ufffd" and stopped.text == "\ufffd"
    with pytest.raises(ValueError):
        ByteTokenizer().stream_decoder(b"A")


# --- the server --------------------------------------------------------------------------------


def ws_turn(ws) -> tuple[list[int], str, dict]:
    ids, text = [], ""
    while True:
        m = json.loads(ws.recv())
        if m["type"] == "token":
            ids += m["ids"]
            text += m["text"]
        elif m["type"] in ("done", "error"):
            return ids, text, m


def ws_open(server, prompt: str = PROMPT):
    # entered here (websockets >= 17.1 warns on a connection never entered); callers close it with `with ws:`
    ws = connect(server.ws_url).__enter__()
    ws.send(json.dumps({"type": "append", "model": TEXT, "prompt": prompt}))
    assert json.loads(ws.recv())["type"] == "session"
    appended = json.loads(ws.recv())
    assert appended["type"] == "appended"
    return ws, appended["session_id"]


def gen(ws, n: int, seed: int, **extra):
    ws.send(json.dumps({"type": "generate", "max_new_tokens": n, "temperature": HOT, "seed": seed, **extra}))
    return ws_turn(ws)


def test_websocket_turns_send_a_split_character_whole(server, split_char):
    s1, t1, s2, t2 = split_char
    ws, _ = ws_open(server)
    with ws:
        ids1, text1, done1 = gen(ws, 1, s1)
        ids2, text2, done2 = gen(ws, 2, s2)
    assert (ids1, ids2) == (t1, t2) and done1["finish_reason"] == done2["finish_reason"] == "length"
    assert text1 == "" and text2 == bytes(t1 + t2).decode("utf-8")  # e.g. "" + "ӛ`", never "\ufffd"


def http_gen(client, sid: str | None, n: int, seed: int, stream: bool, **extra) -> tuple[list[int], str, str]:
    body = {"model": TEXT, "max_new_tokens": n, "temperature": HOT, "seed": seed, "stream": stream, **extra}
    if sid is None:
        body["prompt"] = PROMPT
    else:
        body["session_id"] = sid
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    if not stream:
        b = r.json()
        return b["tokens"], b["text"], b["finish_reason"]
    events = sse_events(r)
    tokens = [e for e in events if e["type"] == "token"]
    return (
        [i for e in tokens for i in e["ids"]],
        "".join(e["text"] for e in tokens),
        events[-1]["finish_reason"],
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_http_session_continuation_sends_a_split_character_whole(client, split_char, stream):
    s1, t1, s2, t2 = split_char
    sid = client.post("/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
    assert http_gen(client, sid, 1, s1, stream) == (t1, "", "length")
    assert http_gen(client, sid, 2, s2, stream) == (t2, bytes(t1 + t2).decode("utf-8"), "length")
    client.delete(f"/v1/sessions/{sid}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_a_one_shot_text_ending_mid_character_ends_with_u_fffd(client, split_char, stream):
    s1, t1, _, _ = split_char  # nothing can continue a one-shot request: its text has ended
    assert http_gen(client, None, 1, s1, stream) == (t1, "\ufffd", "length")
    body = {
        "model": TEXT,
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": HOT,
        "seed": s1,
        "stream": stream,
    }
    r = client.post("/v1/completions", json=body)
    texts = [e["choices"][0]["text"] for e in sse_events(r) if e != "[DONE]"] if stream else None
    assert ("".join(texts) if stream else r.json()["choices"][0]["text"]) == "\ufffd"


def test_a_stop_sequence_after_the_completed_character(server, split_char):
    s1, t1, s2, t2 = split_char
    ws, _ = ws_open(server)
    with ws:
        assert gen(ws, 1, s1)[1] == ""
        ids, text, done = gen(ws, 5, s2, stop=[chr(t2[1])])
    assert ids == t2 and done["finish_reason"] == "stop"
    assert text == bytes(t1 + t2[:1]).decode("utf-8")  # the whole character, then the text stops


@pytest.mark.parametrize("via", ["ws", "json", "sse"])
def test_a_stop_sequence_that_the_carried_character_begins_ends_the_text_before_it(
    server, client, split_char, via
):
    """The stop is the split character itself: its lead byte ended the last turn (held, never sent) and
    this turn's first byte completes it. The text ends before the stop, so this turn's text is empty and the
    generation stops there. Stops were matched on this turn's bytes alone, so the character went out in the
    text, whole, and the generation ran on to max_new_tokens ("length")."""
    s1, t1, s2, t2 = split_char
    stop = bytes(t1 + t2[:1]).decode("utf-8")
    if via == "ws":
        ws, _ = ws_open(server)
        with ws:
            assert gen(ws, 1, s1)[1] == ""
            ids, text, done = gen(ws, 5, s2, stop=[stop])
        reason = done["finish_reason"]
    else:
        sid = client.post("/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
        assert http_gen(client, sid, 1, s1, via == "sse") == (t1, "", "length")
        ids, text, reason = http_gen(client, sid, 5, s2, via == "sse", stop=[stop])
        client.delete(f"/v1/sessions/{sid}")
    assert (ids, text, reason) == (t2[:1], "", "stop")


def test_a_stop_sequence_right_after_a_lead_byte_ends_the_text(server, model_dirs):
    """The lead byte can never be completed (the stop sequence's bytes follow it): U+FFFD, and the next
    turn starts clean (no carried byte)."""
    p = list(PROMPT.encode())
    s, out = find(model_dirs, p, 2, lambda o: lead2(o[0]) and printable(o[1]) and o[1] != ord("c"))
    ws, _ = ws_open(server)
    with ws:
        ids, text, done = gen(ws, 5, s, stop=[chr(out[1])])
        assert (ids, text, done["finish_reason"]) == (out, "\ufffd", "stop")
        ids2, text2, _ = gen(ws, 6, 7)
    assert ids2 == reference(model_dirs["text"], p + out, SamplingParams(temperature=HOT, seed=7), 6)
    assert text2 == held(bytes(ids2))


def test_new_input_drops_a_held_byte_it_can_never_complete(server, model_dirs, split_char):
    s1, t1, _, _ = split_char
    ws, _ = ws_open(server)
    with ws:
        assert gen(ws, 1, s1)[:2] == (t1, "")
        ws.send(json.dumps({"type": "append", "prompt": "!"}))
        assert json.loads(ws.recv())["type"] == "appended"
        ids, text, _ = gen(ws, 6, 3)
    assert ids == reference(
        model_dirs["text"], list(b"caf") + t1 + [ord("!")], SamplingParams(temperature=HOT, seed=3), 6
    )
    assert text == held(bytes(ids))  # the dropped byte is in the earlier turn's ids, not in any text


def test_cancel_mid_character_holds_the_byte_for_the_next_turn(server):
    """Cancel lands after whatever the engine has emitted (the stream buffer bounds it); over a few
    seeds at a near-uniform temperature some turn ends inside a character: its text holds the lead
    byte(s) back and the next turn's text completes them, every time matching the reference. About a
    fifth of the turns end inside a character (8 of 40 seeds in one run, at 2–96 tokens); one full-suite
    run found 1 in 40, so the loop may take up to 100 seeds (two or more of them then fail to turn up
    with probability ~5e-9) and stops at the second."""
    split = 0
    for seed in range(100):
        ws, _ = ws_open(server)
        with ws:
            ws.send(
                json.dumps({"type": "generate", "max_new_tokens": 4000, "temperature": HOT, "seed": seed})
            )
            first = json.loads(ws.recv())  # a token frame: it runs (and pauses at 16 unread tokens)
            assert first["type"] == "token", first
            ws.send(json.dumps({"type": "cancel"}))
            ids1, text1, done1 = ws_turn(ws)
            ids1, text1 = first["ids"] + ids1, first["text"] + text1
            ids2, text2, _ = gen(ws, 3, seed)
        assert done1["finish_reason"] in ("cancelled", "length")
        assert text1 == held(bytes(ids1)) and text1 + text2 == held(bytes(ids1 + ids2)), seed
        split += bool(utf8_tail(bytes(ids1)))
        if split >= 2:
            break
    assert split >= 2, "no cancelled turn ended inside a character"


def test_fork_and_export_import_keep_the_held_bytes(client, split_char):
    s1, t1, s2, t2 = split_char
    sid = client.post("/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
    assert http_gen(client, sid, 1, s1, False)[1] == ""
    fork = client.post(f"/v1/sessions/{sid}/fork").json()["session_id"]
    blob = client.get(f"/v1/sessions/{sid}/export").content
    assert unpack_state(blob)[0]["utf8_tail"] == t1
    imported = client.post("/v1/sessions/import", content=blob).json()["session_id"]
    want = (t2, bytes(t1 + t2).decode("utf-8"), "length")
    for s in (sid, fork, imported):
        assert http_gen(client, s, 2, s2, False) == want, s
        client.delete(f"/v1/sessions/{s}")


@pytest.mark.parametrize(
    "tail, ok",
    [
        ([], True), ([0xE2, 0x82], True), ([0xF0, 0x9F, 0x98], True),
        ([0x41], False), ([0x80], False), ([0xE0, 0x80], False), ([0xF4, 0x90], False),
        ([0xE2, 0x82, 0xAC], False), ([0xF0, 0x9F, 0x98, 0x80], False), ([0xC3, 0xA9], False),
        ([256], False), ([-1], False), ([211.0], False), ("\xd3", False), ([True], False), (None, False),
    ],
)  # fmt: skip
def test_import_checks_the_held_bytes(client, tail, ok):
    sid = client.post("/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
    header, raw = unpack_state(client.get(f"/v1/sessions/{sid}/export").content)
    r = client.post("/v1/sessions/import", content=pack_state({**header, "utf8_tail": tail}, raw))
    if ok:
        assert r.status_code == 201, r.text
        client.delete(f"/v1/sessions/{r.json()['session_id']}")
    else:
        assert r.status_code == 422 and r.json()["error"]["param"] == "state" and "utf8_tail" in r.text, (
            r.text
        )
    client.delete(f"/v1/sessions/{sid}")


def test_an_audio_state_holds_no_text_bytes(client):
    import base64

    from model.codecs import wav_bytes

    wav = base64.b64encode(wav_bytes([0.1, -0.2, 0.3] * 20, 8000)).decode()
    sid = client.post("/v1/sessions", json={"model": AUDIO, "prompt_audio": wav}).json()["session_id"]
    header, raw = unpack_state(client.get(f"/v1/sessions/{sid}/export").content)
    assert header["utf8_tail"] == []
    r = client.post("/v1/sessions/import", content=pack_state({**header, "utf8_tail": [0xD3]}, raw))
    assert r.status_code == 422 and r.json()["error"]["param"] == "state"
    header.pop("utf8_tail")  # an export from before the field: nothing held
    assert client.post("/v1/sessions/import", content=pack_state(header, raw)).status_code == 201


EXAMPLE_PAGE = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "text-shakespeare"


def test_the_documented_example_on_the_shipped_model():
    """The example of docs/reliability.md, read from that page and run on the shipped text-shakespeare over
    HTTP: the first turn's lead byte is held back (text ""), the second turn sends the whole character. (The
    example it replaced, seeds 5 and 2, stopped holding when the sampler became counter-based.)"""
    from server import Settings

    text = " ".join(EXAMPLE_PAGE.read_text().split())
    m = re.search(
        r'"caf", 1 token at T=50 seed (\d+) \(0x([0-9A-F]{2})\), then 2 tokens at T=50 seed (\d+) '
        r'\(0x([0-9A-F]{2}) 0x([0-9A-F]{2})\) on text-shakespeare now give `""` and `"([^"]+)"`',
        text,
    )
    assert m, "the UTF-8 example of docs/reliability.md is not in the expected words"
    s1, b1, s2, c1, c2, want = m.groups()
    s = ServerThread(Settings(checkpoints=[str(SHIPPED)])).start()
    try:
        sid = httpx.post(s.url + "/v1/sessions", json={"model": "text-shakespeare", "prompt": "caf"}).json()[
            "session_id"
        ]
        turns = []
        for n, seed in ((1, s1), (2, s2)):
            body = {"model": "text-shakespeare", "session_id": sid, "max_new_tokens": n, "temperature": 50,
                    "seed": int(seed)}  # fmt: skip
            r = httpx.post(s.url + "/v1/generate", json=body, timeout=60).json()
            turns.append((r["tokens"], r["text"]))
    finally:
        s.stop()
    assert turns == [([int(b1, 16)], ""), ([int(c1, 16), int(c2, 16)], want)]
    assert bytes(turns[0][0] + turns[1][0]).decode() == want
