"""SSE keep-alive (S4_SSE_KEEPALIVE_S): a stream with nothing to send (its request queued behind the
engine, a long prefill) gets `: keep-alive` comment lines, so that a proxy's idle timeout does not cut
it, and the events after them are those of a stream that never waited. No stream sent anything between
its headers and its first token before (chat its role chunks only). The engine is held by an engine
call that waits on an event (as tests/test_server_sessions.py's `hold_engine`)."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from server_support import ServerThread, chat_copy, reference

from model.sampling import SamplingParams
from server import Settings

TEXT, CHAT = "tiny-text", "tiny-chat"
PROMPT = "to take arms"
INTERVAL = 0.1  # (S4_SSE_KEEPALIVE_S: its smallest value)
KEEP_ALIVE = ": keep-alive"


@pytest.fixture(scope="module")
def ka_server(model_dirs, tmp_path_factory):
    """The tiny text model, and a copy with the shipped Shakespeare chat template, keep-alive every 0.1 s."""
    d = chat_copy(model_dirs["text"], tmp_path_factory.mktemp("keepalive"))  # (model id CHAT)
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), str(d)], max_sessions=8, sse_keepalive_s=INTERVAL
    )
    s = ServerThread(settings).start()
    yield s
    s.stop()


class Held:
    """The model's engine thread held by one of its own calls until `release` (or 30 s): whatever is
    submitted meanwhile waits in its queue."""

    def __init__(self, server, model: str) -> None:
        running, self._hold = threading.Event(), threading.Event()

        def wait(_engine) -> None:
            running.set()
            self._hold.wait(30)

        self._done = server.state.models[model].engine.call(wait)
        assert running.wait(10)

    def release(self) -> None:
        self._hold.set()
        self._done.result(10)


ROUTES = {
    "generate": ("/v1/generate", {"model": TEXT, "prompt": PROMPT, "max_new_tokens": 12, "seed": 3}),
    "completions": ("/v1/completions", {"model": TEXT, "prompt": PROMPT, "max_tokens": 12, "seed": 3}),
    "chat": (
        "/v1/chat/completions",
        {
            "model": CHAT,
            "messages": [{"role": "user", "content": "Who's there?"}],
            "max_tokens": 12,
            "seed": 3,
        },
    ),
}


def _stream_lines(ka_server, route: str, hold: bool) -> list[str]:
    """The lines of one streamed request (blank lines left out); with `hold`, the engine is held until
    two keep-alive comments have come after the last data line (the chat's role chunk), then let go."""
    path, body = ROUTES[route]
    held = Held(ka_server, body["model"]) if hold else None
    lines: list[str] = []
    try:
        with httpx.stream("POST", ka_server.url + path, json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if held is not None and lines[-2:] == [KEEP_ALIVE] * 2:
                    held.release()
                    held = None
    finally:
        if held is not None:
            held.release()
    return lines


def _payloads(lines: list[str]) -> list:
    return [
        json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
        for line in lines
        if line.startswith("data: ")
    ]


def _answer(route: str, payloads: list) -> tuple:
    """What a stream's events say, however its tokens were grouped into events: (the tokens or text, how
    it finished)."""
    if route == "generate":
        ids = [t for e in payloads if e["type"] == "token" for t in e["ids"]]
        return ids, [e["finish_reason"] for e in payloads if e["type"] == "done"]
    assert payloads[-1] == "[DONE]"
    choices = [c for e in payloads[:-1] for c in e["choices"]]
    if route == "completions":
        text = "".join(c["text"] for c in choices)
    else:
        text = "".join(c["delta"].get("content") or "" for c in choices)
    return text, [c["finish_reason"] for c in choices if c.get("finish_reason") is not None]


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_waiting_stream_gets_keep_alive_comments_and_then_the_events_of_one_that_never_waited(
    ka_server, model_dirs, route
):
    """Held: after the headers (and the chat's role chunk) the stream sends `: keep-alive` lines, not
    data, until the engine goes on; then the same events (ids and times aside) as an unheld request's,
    whose tokens are the library's (seeded sampling: any change shows within a few tokens)."""
    held = _stream_lines(ka_server, route, hold=True)
    first_data = next(i for i, line in enumerate(held) if line.startswith("data: "))
    comments = [i for i, line in enumerate(held) if line.startswith(":")]
    assert all(held[i] == KEEP_ALIVE for i in comments)
    if route == "chat":  # its role chunk at once, then the wait
        role = json.loads(held[first_data][6:])
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        first_data = next(i for i in range(first_data + 1, len(held)) if held[i].startswith("data: "))
    assert len([i for i in comments if i < first_data]) >= 2
    answer = _answer(route, _payloads(held))
    assert answer == _answer(route, _payloads(_stream_lines(ka_server, route, hold=False)))
    assert len(answer[0]) > 0 and len(answer[1]) == 1
    if route == "generate":
        assert answer[0] == reference(model_dirs["text"], list(PROMPT.encode()), SamplingParams(seed=3), 12)


class _Watch(httpx.SyncByteStream):
    """A response body passed through as read, `seen` set once two keep-alive comments have come by."""

    def __init__(self, inner: httpx.SyncByteStream, seen: threading.Event) -> None:
        self.inner, self.seen, self.read = inner, seen, b""

    def __iter__(self):
        for chunk in self.inner:
            self.read += chunk
            if self.read.count(KEEP_ALIVE.encode()) >= 2:
                self.seen.set()
            yield chunk

    def close(self) -> None:
        self.inner.close()


class _WatchTransport(httpx.HTTPTransport):
    def __init__(self, seen: threading.Event) -> None:
        super().__init__()
        self.seen, self.watches = seen, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = super().handle_request(request)
        self.watches.append(_Watch(r.stream, self.seen))
        return httpx.Response(
            r.status_code, headers=r.headers, stream=self.watches[-1], extensions=r.extensions
        )


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_the_openai_client_reads_a_stream_with_keep_alive_comments_as_one_without(ka_server, route):
    """The official openai client, streaming through keep-alive comments (two at least, before the engine
    goes on), yields the same chunks as for a stream without any."""
    path, body = ROUTES[route]
    seen = threading.Event()

    def run(http_client: httpx.Client) -> tuple:
        with openai.OpenAI(base_url=ka_server.url + "/v1", api_key="x", max_retries=0, timeout=60,
                           http_client=http_client) as c:  # fmt: skip
            create = c.completions.create if route == "completions" else c.chat.completions.create
            chunks = [ch.model_dump(exclude_none=True) for ch in create(**body, stream=True)]
        return _answer(route, [*chunks, "[DONE]"])

    held = Held(ka_server, body["model"])
    letgo = threading.Thread(target=lambda: (seen.wait(30), held.release()))
    letgo.start()
    transport = _WatchTransport(seen)
    try:
        watched = run(httpx.Client(transport=transport))
    finally:
        letgo.join()
    assert [w.read.count(KEEP_ALIVE.encode()) >= 2 for w in transport.watches] == [True]
    assert len(watched[0]) > 0 and len(watched[1]) == 1 and watched == run(httpx.Client())


def test_the_keep_alive_interval_is_range_checked():
    """S4_SSE_KEEPALIVE_S: 0.1 s to an hour, as the other network timeouts."""
    assert Settings(sse_keepalive_s=0.1).sse_keepalive_s == 0.1
    assert Settings().sse_keepalive_s == 15.0
    for bad in (0, 0.05, -1, 3601, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sse_keepalive_s"):
            Settings(sse_keepalive_s=bad)
