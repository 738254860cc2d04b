"""A request that names a held session is not beaten to it by the session's idle TTL. Every route that
continues a session checks it is held (`service.restore`: with a session store, that this copy is the
latest), then claims it; the TTL's sweep on the engine thread (`Engine._housekeeping`) could take it in
between: evicted to the store or, without one, deleted, and the request got a 404 (or a 409 while the
eviction ran) for a session it had found a moment before. `restore` now marks the session used
(`SessionTable.touch`) and, with a store, waits out an eviction already under way and restores the
session from the store.

The window is made wide on purpose: the route's claim (`service.claim`) waits for the engine to run a
sweep after the moment the untouched session's TTL ran out, so that without the touch every case below
is a 404 (checked by reverting it). No sweep runs from the first turn until the request reaches
that claim, so a request that is slow to come (a loaded event loop) cannot meet a sweep before its
`restore`; the one sweep then starts as soon as the TTL has run out, when the touched session has been
idle (1 - IDLE_FRACTION) x TTL_S + the engine's 0.25 s wake at most: ~3 s under the TTL. (With real
sweeps every second both margins were ~1.2-1.5 s, and a fresh-clone CI run got the 404 once.)"""

import threading
import time

import httpx
import pytest
from server_support import ServerThread, reference, token_ids, wait_for, ws_turn
from test_server_store import _stored, redis_url  # noqa: F401  (a redis-server for this module)
from websockets.sync.client import connect

from model.sampling import SamplingParams
from server import Settings, service

TEXT = "tiny-text"
TTL_S = 4.0  # the sweep runs every TTL_S / 4 = 1 s (and the engine wakes every 0.25 s when idle)
IDLE_FRACTION = 0.9  # a request comes when its session has been idle this share of the TTL
PROMPT = "whether 'tis"


@pytest.fixture(params=["store", "no-store"])
def replica(request, model_dirs, redis_url):  # noqa: F811
    store = {"session_store": redis_url} if request.param == "store" else {}
    settings = Settings(checkpoints=[str(model_dirs["text"])], session_ttl_s=TTL_S, max_sessions=8,
                        drain_timeout_s=1, **store)  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def _claim_after_the_ttl(monkeypatch, s: ServerThread, sid: str) -> None:
    """Make the next claim of `sid` wait (on the event loop, as a slow route would) for one TTL sweep that
    would have taken the session had nothing used it since its last turn: the engine's sweeps are held
    from now until that claim (so no sweep can come before the request has passed `restore`, however late
    it comes), and the one it waits for starts once the untouched session's TTL has run out."""
    rec, engine = s.state.sessions.get(sid), s.state.models[TEXT].engine
    assert wait_for(lambda: not rec.busy, 10)
    due, claim, sweep = rec.last_used + TTL_S, service.claim, engine._housekeeping
    claiming, swept = threading.Event(), threading.Event()

    def housekeeping():  # (engine thread)
        if not claiming.is_set() or swept.is_set():
            return
        while time.time() <= due:
            time.sleep(0.01)
        before = engine._next_housekeeping
        sweep()
        if engine._next_housekeeping != before:  # a sweep ran (not skipped as too early)
            swept.set()

    def late_claim(state, model, session_id):
        if session_id == sid:
            claiming.set()
            assert swept.wait(30), "no TTL sweep ran"
        return claim(state, model, session_id)

    monkeypatch.setattr(engine, "_housekeeping", housekeeping)
    monkeypatch.setattr(service, "claim", late_claim)
    assert wait_for(lambda: time.time() > rec.last_used + IDLE_FRACTION * TTL_S, 10, 0.01)


@pytest.fixture
def stored_session(model_dirs, redis_url):  # noqa: F811
    """A server with the Redis store (no TTL sweep in the way: 600 s), and a session the store holds."""
    settings = Settings(checkpoints=[str(model_dirs["text"])], session_store=redis_url, max_sessions=8,
                        drain_timeout_s=1)  # fmt: skip
    s = ServerThread(settings).start()
    try:
        sid = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
        assert wait_for(lambda: _stored_n(redis_url, sid) == len(PROMPT), 10)
        yield s, s.state.models[TEXT].engine, sid
    finally:
        s.stop()


def _generates_the_reference(s: ServerThread, sid: str, model_dirs) -> None:
    """A 5-token turn on the session (no model named) is served, and continues it exactly."""
    body = {"session_id": sid, "max_new_tokens": 5, "seed": 2}
    r = httpx.post(s.url + "/v1/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == reference(
        model_dirs["text"], list(PROMPT.encode()), SamplingParams(seed=2), 5
    )


@pytest.mark.parametrize("route", ["generate", "append", "fork", "export", "websocket"])
def test_a_session_named_before_its_ttl_runs_out_is_served_whenever_the_route_claims_it(
    replica, monkeypatch, model_dirs, route
):
    s = replica
    if route == "websocket":  # a socket bound to its session: its second turn
        with connect(s.ws_url) as ws:
            first = ws_turn(ws, {"type": "generate", "model": TEXT, "prompt": PROMPT, "max_new_tokens": 4,
                                  "seed": 1})  # fmt: skip
            sid = first[0]["session_id"]
            _claim_after_the_ttl(monkeypatch, s, sid)
            frames = ws_turn(ws, {"type": "generate", "max_new_tokens": 5, "seed": 2})
        assert frames[-1]["type"] == "done" and frames[-1]["session_id"] == sid, frames[-1]
        expected = reference(
            model_dirs["text"], list(PROMPT.encode()) + token_ids(first), SamplingParams(seed=2), 5
        )
        assert token_ids(frames) == expected
        return
    sid = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
    _claim_after_the_ttl(monkeypatch, s, sid)
    if route == "generate":
        r = httpx.post(
            s.url + "/v1/generate", json={"session_id": sid, "max_new_tokens": 5, "seed": 2}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == reference(
            model_dirs["text"], list(PROMPT.encode()), SamplingParams(seed=2), 5
        )
    elif route == "append":
        r = httpx.post(f"{s.url}/v1/sessions/{sid}/append", json={"prompt": " be"}, timeout=30)
        assert r.status_code == 200 and r.json()["tokens"] == len(PROMPT) + 3, r.text
    elif route == "fork":
        r = httpx.post(f"{s.url}/v1/sessions/{sid}/fork", timeout=30)
        assert r.status_code == 201 and r.json()["tokens"] == len(PROMPT), r.text
    else:
        r = httpx.get(f"{s.url}/v1/sessions/{sid}/export", timeout=30)
        assert r.status_code == 200, r.text
    assert s.state.sessions.has(sid)  # served from the copy held here, not evicted


def test_a_request_that_meets_its_sessions_eviction_under_way_restores_it_from_the_store(
    stored_session, model_dirs, monkeypatch
):
    """The TTL's sweep claims the session just after the request's version check found the copy here
    current, and hands it to the store a moment later: the request waits for that, restores the session
    and serves it (it got a 409, the session being busy with its own eviction, or a 404)."""
    s, engine, sid = stored_session
    is_current, swept = service._is_current, []

    async def current_then_swept(state, session_id, refresh=False):
        answer = await is_current(state, session_id, refresh)
        if answer and not swept:  # what the sweep does, with its eviction 0.3 s behind its claim
            [rec] = state.sessions.claim_expired(TEXT, -1.0)
            swept.append(engine.call(lambda e: (time.sleep(0.3), e._expire(rec))))
        return answer

    monkeypatch.setattr(service, "_is_current", current_then_swept)
    _generates_the_reference(s, sid, model_dirs)
    assert swept and swept[0].done()


def test_a_request_naming_only_its_session_finds_its_model_after_an_eviction_between_two_reads(
    stored_session, model_dirs, monkeypatch
):
    """A request that names a session and no model looks the model up in the session's record; a session
    evicted to the store between the check that it is held and that look-up is restored (a 404)."""
    s, engine, sid = stored_session
    session_model, evicted = service.session_model, []

    def evicted_then_looked_up(state, session_id):
        if not evicted:
            [rec] = state.sessions.claim_expired(TEXT, -1.0)
            evicted.append(engine.call(lambda e: e._expire(rec)).result(10))
        return session_model(state, session_id)

    monkeypatch.setattr(service, "session_model", evicted_then_looked_up)
    _generates_the_reference(s, sid, model_dirs)
    assert evicted


def _stored_n(url: str, sid: str) -> int | None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        header = _stored(r, sid)
    finally:
        r.close()
    return None if header is None else header["n_tokens"]


@pytest.mark.parametrize("eviction", ["under way", "over"])
def test_session_info_of_a_copy_its_ttl_is_evicting_reads_the_store_once_the_eviction_lands(
    stored_session, model_dirs, monkeypatch, eviction
):
    """GET /v1/sessions/{id} while the idle TTL's sweep evicts the copy here, just after the version check
    found it current: the info is the stored session's, idle, once the eviction's write has landed. (It
    said `busy` while the eviction ran, and 404 once it had freed the copy.)"""
    s, engine, sid = stored_session
    _generates_the_reference(s, sid, model_dirs)  # (its write-through may still be queued: the eviction's)
    is_current, swept = service._is_current, []

    async def current_then_swept(state, session_id, refresh=False):
        answer = await is_current(state, session_id, refresh)
        if answer and not swept:
            [rec] = state.sessions.claim_expired(TEXT, -1.0)
            if eviction == "under way":
                swept.append(engine.call(lambda e: (time.sleep(0.3), e._expire(rec))))
            else:
                swept.append(engine.call(lambda e: e._expire(rec)))
                swept[0].result(10)
        return answer

    monkeypatch.setattr(service, "_is_current", current_then_swept)
    r = httpx.get(f"{s.url}/v1/sessions/{sid}", timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["status"], info["tokens"], info["generated"]) == ("idle", len(PROMPT) + 5, 5), info
    assert swept and swept[0].done() and not s.state.sessions.has(sid)  # read, not restored


def test_a_request_that_meets_its_sessions_expiry_under_way_without_a_store_gets_a_404_not_a_409(
    model_dirs, monkeypatch
):
    """Without a store the idle TTL deletes a session. A request arriving as the sweep has claimed it (its
    TTL ran out first; the delete 0.3 s behind here) waits for the delete and is told the session is gone
    (404 naming session_id); it was told the session was busy (409)."""
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"])], max_sessions=8)).start()
    try:
        engine = s.state.models[TEXT].engine
        sid = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": PROMPT}).json()["session_id"]
        restore, swept = service.restore, []

        async def swept_then_restored(state, session_id):
            if not swept:
                [rec] = state.sessions.claim_expired(TEXT, -1.0)
                swept.append(engine.call(lambda e: (time.sleep(0.3), e._expire(rec))))
            return await restore(state, session_id)

        monkeypatch.setattr(service, "restore", swept_then_restored)
        r = httpx.post(f"{s.url}/v1/sessions/{sid}/append", json={"prompt": " be"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "session_id", r.text
        assert swept and swept[0].done() and not s.state.sessions.has(sid) and engine.pool.in_use == 0
    finally:
        s.stop()
