"""The Redis session store: states are written through when a session goes idle, is evicted or the
server shuts down, and a session resumes on another replica or after `kill -9` + restart, continuing
exactly like one-shot generation on everything before it. Corrupt or foreign stored states are refused
with a clear error. Each test module runs its own `redis-server` on a free loopback port."""

import json
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch
from server_support import ServerThread, _rec, reference, wait_for
from test_server_stop import ROOT, free_port, start_server
from websockets.sync.client import connect

from model.sampling import SamplingParams
from server import Settings
from server.sessions import SessionRecord, pack_state, unpack_state
from server.store import (
    KEY_PREFIX,
    MemoryStateStore,
    RedisStateStore,
    StoreError,
    StoreWriter,
    open_store,
    redact_url,
)

TEXT = "tiny-text"


def _redis_server(workdir, password: str = "") -> tuple[subprocess.Popen, int]:
    """A `redis-server` on a free loopback port (no persistence; with `password`, requiring it) and its
    port, once it answers."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: `make sysdeps` installs it"
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), *(["--requirepass", password] if password else [])],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    if not wait_for(lambda: _opens(url), 10, 0.05):
        proc.kill()
        pytest.fail("redis-server did not start")
    return proc, port


def _opens(url: str) -> bool:
    try:
        RedisStateStore(url, 60).close()
        return True
    except StoreError:
        return False


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    proc, port = _redis_server(tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_db(redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    yield r
    r.close()


def _stored(redis_db, sid: str) -> dict | None:
    blob = redis_db.get(KEY_PREFIX + sid)
    return None if blob is None else unpack_state(blob)[0]


def _replica(model_dirs, redis_url, **kw) -> ServerThread:
    settings = Settings(checkpoints=[str(model_dirs["text"])], session_store=redis_url, max_sessions=8,
                        drain_timeout_s=1, **kw)  # fmt: skip
    return ServerThread(settings).start()


def _generate(url: str, sid: str, prompt: str | None, n: int, seed: int) -> list[int]:
    body = {"model": TEXT, "session_id": sid, "prompt": prompt, "max_new_tokens": n, "seed": seed}
    r = httpx.post(url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# --- units ------------------------------------------------------------------------------------------


def test_writer_keeps_the_latest_operation_per_session_and_a_delete_is_not_undone():
    store = MemoryStateStore()
    writer = StoreWriter(store)
    header = {"model": "m", "shape": [1], "dtype": "float32", "n_tokens": 1, "pending": None, "seen": []}
    for i in range(50):
        writer.write("a", {**header, "n_tokens": i}, b"\0\0\0\0")
    writer.write("b", header, b"\0\0\0\0")
    writer.delete("b")
    assert writer.stop(5)
    assert unpack_state(store.get("a"))[0]["n_tokens"] == 49
    assert store.get("b") is None and store.ids() == ["a"]
    # a state older than the stored one (another replica went on), or written after a delete, is refused
    assert not store.put("a", b"old", 48) and store.put("a", b"same", 49)
    assert not store.put("b", b"late", 10**6)


def test_redis_refuses_stale_states_and_writes_after_a_delete(redis_url, redis_db):
    store = RedisStateStore(redis_url, 60)
    assert store.put("s", b"v1", 10) and store.put("s", b"v2", 12) and not store.put("s", b"v0", 11)
    assert store.get("s") == b"v2" and store.ids() == ["s"]
    store.delete("s")
    assert not store.put("s", b"late", 13) and store.get("s") is None and store.ids() == []
    assert 0 < redis_db.pttl(KEY_PREFIX + "s:tokens") <= 60_000  # the tombstone expires too
    store.close()


def test_open_store_refuses_unknown_specs_and_unreachable_redis():
    assert open_store("memory", 60) is None
    with pytest.raises(ValueError, match="redis://"):
        open_store("postgres://x", 60)
    with pytest.raises(RuntimeError, match="cannot connect"):
        RedisStateStore(f"redis://127.0.0.1:{free_port()}/0", 60)
    with pytest.raises(ValueError, match="session_store"):
        Settings(session_store="disk")


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://app:s3cret@cache.internal/2", "rediss://app:***@cache.internal/2"),
        ("redis://h:6379/0?password=s3cret&db=1", "redis://h:6379/0?password=***&db=1"),
        ("redis://:p%40ss@[::1]:6380/1", "redis://:***@[::1]:6380/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@host:notaport/0", "<the configured URL>"),
    ],
)
def test_a_store_url_is_shown_without_its_password(url, shown):
    assert redact_url(url) == shown


def test_a_store_password_reaches_no_client_and_no_log(model_dirs, caplog, tmp_path):
    """A Redis with a password (in the URL, as redis-py takes it): the store going away mid-run gives a
    client a 503 that names neither the password nor the store's host, and the server's log shows the URL
    with the password as ***; a wrong password at start is refused the same way. (The URL, password and
    all, was in the 503's body, every log line and the start-up error: found by a fresh-user trial.)"""
    secret = "s3cretpw"
    proc, port = _redis_server(tmp_path, password=secret)
    url = f"redis://:{secret}@127.0.0.1:{port}/0"
    try:
        with pytest.raises(StoreError) as wrong:
            RedisStateStore(f"redis://:wrong{secret}@127.0.0.1:{port}/0", 60)
        assert secret not in str(wrong.value) and ":***@" in str(wrong.value)
        s = _replica(model_dirs, url)
        try:
            proc.send_signal(signal.SIGSTOP)  # unreachable: reads time out
            with caplog.at_level("INFO"):
                r = httpx.post(
                    s.url + "/v1/generate", json={"model": TEXT, "session_id": "sess-gone"}, timeout=60
                )
            proc.send_signal(signal.SIGCONT)
        finally:
            s.stop()
        assert r.status_code == 503 and "session store cannot be read" in r.text, r.text
        assert secret not in r.text and "127.0.0.1" not in r.text and str(port) not in r.text
        logged = caplog.text
        assert f"redis://:***@127.0.0.1:{port}/0" in logged and secret not in logged
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


# --- one and two replicas -----------------------------------------------------------------------------


def test_a_session_resumes_on_another_replica_and_continues_identically(model_dirs, redis_url, redis_db):
    a, b = _replica(model_dirs, redis_url), _replica(model_dirs, redis_url)
    try:
        prompt = "to be, or not to be"
        sid = httpx.post(a.url + "/v1/sessions", json={"model": TEXT, "prompt": prompt}).json()["session_id"]
        t1 = _generate(a.url, sid, None, 20, seed=4)
        want_tokens = len(prompt) + 20
        assert wait_for(lambda: (_stored(redis_db, sid) or {}).get("n_tokens") == want_tokens, 10)
        # replica b has never seen the session: it reads it from the store
        info = httpx.get(f"{b.url}/v1/sessions/{sid}").json()
        assert info["session_id"] == sid and info["tokens"] == want_tokens
        t2 = _generate(b.url, sid, " that is", 20, seed=9)
        everything = list(prompt.encode()) + t1 + list(b" that is")
        assert t2 == reference(model_dirs["text"], everything, SamplingParams(seed=9), 20)
        # b wrote its turn through: the stored state is b's now
        assert wait_for(lambda: _stored(redis_db, sid)["n_tokens"] == want_tokens + 8 + 20, 10)
        # a delete on b removes the stored state; a session in neither place is a 404
        assert httpx.delete(f"{b.url}/v1/sessions/{sid}").status_code == 204
        assert wait_for(lambda: redis_db.get(KEY_PREFIX + sid) is None, 10)
        assert httpx.get(f"{b.url}/v1/sessions/{sid}").status_code == 404
        assert httpx.get(f"{b.url}/v1/sessions/sess-unknown").status_code == 404
        assert 'op="restore"' in httpx.get(b.url + "/metrics").text
        # a still holds its stale copy; its shutdown flush must not resurrect the deleted session
        a.stop()
        assert redis_db.get(KEY_PREFIX + sid) is None
        assert a.state.writer.stale == 1
    finally:
        a.stop()
        b.stop()


def test_an_evicted_session_frees_its_slot_and_comes_back_from_the_store(model_dirs, redis_url, redis_db):
    s = _replica(model_dirs, redis_url, session_ttl_s=0.5)
    try:
        engine = s.state.models[TEXT].engine
        sid = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": "whether 'tis"}).json()[
            "session_id"
        ]
        t1 = _generate(s.url, sid, None, 10, seed=2)
        assert wait_for(lambda: not s.state.sessions.has(sid) and engine.pool.in_use == 0, 10)
        assert _stored(redis_db, sid)["n_tokens"] == len("whether 'tis") + 10
        t2 = _generate(s.url, sid, None, 12, seed=3)  # restored on demand
        assert t2 == reference(model_dirs["text"], list(b"whether 'tis") + t1, SamplingParams(seed=3), 12)
    finally:
        s.stop()


def test_a_socket_whose_session_was_evicted_continues_it_from_the_store(model_dirs, redis_url, redis_db):
    """A socket bound to a session that its TTL evicted to the store: the next turn on the socket restores
    it and continues it exactly (once a 404, as if it were gone)."""
    s = _replica(model_dirs, redis_url, session_ttl_s=0.5)
    try:
        with connect(s.ws_url) as ws:
            ws.send(
                json.dumps(
                    {"type": "generate", "model": TEXT, "prompt": "to die", "max_new_tokens": 6, "seed": 1}
                )
            )
            sid = json.loads(ws.recv())["session_id"]
            frames = [json.loads(ws.recv())]
            while frames[-1]["type"] != "done":
                frames.append(json.loads(ws.recv()))
            t1 = [i for f in frames if f["type"] == "token" for i in f["ids"]]
            assert wait_for(lambda: not s.state.sessions.has(sid), 10)  # evicted to the store
            ws.send(json.dumps({"type": "generate", "max_new_tokens": 7, "seed": 2}))
            frames = [json.loads(ws.recv())]
            while frames[-1]["type"] not in ("done", "error"):
                frames.append(json.loads(ws.recv()))
        assert frames[-1]["type"] == "done" and frames[-1]["session_id"] == sid, frames[-1]
        t2 = [i for f in frames if f["type"] == "token" for i in f["ids"]]
        assert t2 == reference(model_dirs["text"], list(b"to die") + t1, SamplingParams(seed=2), 7)
    finally:
        s.stop()


def test_a_corrupt_or_foreign_stored_state_is_refused_with_a_clear_error(model_dirs, redis_url, redis_db):
    s = _replica(model_dirs, redis_url)
    try:
        r = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": "arrows"})
        sid = r.json()["session_id"]
        assert wait_for(lambda: _stored(redis_db, sid) is not None, 10)
        good = redis_db.get(KEY_PREFIX + sid)
        header, raw = unpack_state(good)
        cases = {
            "sess-flipped": (good[:-40] + bytes([good[-40] ^ 1]) + good[-39:], "checksum"),
            "sess-truncated": (good[: len(good) // 2], "checksum"),
            "sess-garbage": (b"not a state at all, just some bytes in the store" * 2, "magic"),
            "sess-foreign": (pack_state({**header, "fingerprint": "0" * 32}, raw), "other weights"),
            "sess-othermodel": (pack_state({**header, "model": "gpt-9"}, raw), "gpt-9"),
            "sess-nan": (pack_state(header, b"\x00\x00\xc0\x7f" * (len(raw) // 4)), "NaN or infinite"),
            "sess-huge": (pack_state(header, b"\xff\xff\x7f\x7f" + raw[4:]), "exceeds"),
        }
        for key, (blob, words) in cases.items():
            redis_db.set(KEY_PREFIX + key, blob)
            for r in (
                httpx.get(f"{s.url}/v1/sessions/{key}"),
                httpx.post(s.url + "/v1/generate", json={"model": TEXT, "session_id": key, "prompt": "x"}),
            ):
                err = r.json()["error"]
                assert r.status_code == 422 and err["param"] == "session_id", (key, r.text)
                assert words in err["message"] and key in err["message"], (key, err)
        with connect(s.ws_url) as ws:
            ws.send(json.dumps({"type": "session", "model": TEXT, "session_id": "sess-flipped"}))
            frame = json.loads(ws.recv(10))
            assert frame["type"] == "error" and frame["code"] == 422 and "checksum" in frame["message"]
        assert s.state.models[TEXT].engine.pool.in_use == 1  # nothing was installed; sid is still fine
        assert _generate(s.url, sid, None, 3, seed=1)
    finally:
        s.stop()


# --- real processes: kill -9, and SIGTERM flushing to the store ----------------------------------------


def _serve(model_dirs, port: int, redis_url: str, drain_s: int = 60, max_new: int = 4096) -> subprocess.Popen:
    flags = ["--session-store", redis_url, "--drain-timeout-s", str(drain_s)]
    return start_server(model_dirs["text"], port, [*flags, "--max-new-tokens", str(max_new)])


def test_after_kill_9_and_a_restart_the_session_continues_from_its_last_persisted_step(
    model_dirs, redis_url, redis_db
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(model_dirs, port, redis_url)
    try:
        prompt = "the slings and arrows of"
        sid = httpx.post(url + "/v1/sessions", json={"model": TEXT, "prompt": prompt}).json()["session_id"]
        created = httpx.get(f"{url}/v1/sessions/{sid}").json()["created"]
        t1 = _generate(url, sid, None, 20, seed=7)
        assert wait_for(lambda: (_stored(redis_db, sid) or {}).get("n_tokens") == len(prompt) + 20, 10)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        proc = _serve(model_dirs, port, redis_url)
        # the restored session is the same session: its creation time too (it was the restore's time)
        assert httpx.get(f"{url}/v1/sessions/{sid}").json()["created"] == created
        t2 = _generate(url, sid, " outrageous", 20, seed=8)
        everything = list(prompt.encode()) + t1 + list(b" outrageous")
        assert t2 == reference(model_dirs["text"], everything, SamplingParams(seed=8), 20)
    finally:
        proc.kill()
        proc.wait(10)


def test_sigterm_cancels_running_turns_and_flushes_every_session_to_the_store(
    model_dirs, redis_url, redis_db
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # a turn far longer than the time SIGTERM takes to arrive: the native decode block makes the tiny
    # test model decode thousands of tokens a second, so a 4,096-token turn could finish first
    proc = _serve(model_dirs, port, redis_url, drain_s=0, max_new=1_000_000)
    try:
        prompts = {}
        for p in ("to be", "or not", "to be!"):
            r = httpx.post(url + "/v1/sessions", json={"model": TEXT, "prompt": p})
            prompts[r.json()["session_id"]] = p
        with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            turn = {"type": "generate", "model": TEXT, "prompt": "a sea of", "max_new_tokens": 1_000_000}
            turn["seed"] = 5
            ws.send(json.dumps(turn))
            running = json.loads(ws.recv(30))["session_id"]
            assert json.loads(ws.recv(30))["type"] == "token"
            proc.send_signal(signal.SIGTERM)  # drain_timeout_s=0: the turn is cancelled at once
            assert proc.wait(30) == 0
        for sid, p in prompts.items():
            assert _stored(redis_db, sid)["n_tokens"] == len(p), sid
        # the cancelled turn's session is stored at its last step: state = prompt + generated tokens
        # before the pending one, as the library computes it (float tolerance: batched vs one row)
        header, raw = unpack_state(redis_db.get(KEY_PREFIX + running))
        k = header["n_tokens"] - len("a sea of")
        assert 0 < k < 1_000_000  # cancelled, not finished
        gen = reference(model_dirs["text"], list(b"a sea of"), SamplingParams(seed=5), k)
        assert header["pending"] == gen[-1]
        rec = _rec(model_dirs["text"])
        # the prompt prefilled, then each generated token stepped as the engine decodes them (one
        # parallel prefill of thousands of tokens drifts from the stepped state by float32 rounding)
        _, state = rec.prefill(torch.tensor([list(b"a sea of")]), rec.init_state(1))
        for tok in gen[:-1]:
            _, state = rec.step(torch.tensor([tok]), state, out=state)
        stored = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(state[:, 0].shape)
        torch.testing.assert_close(stored, state[:, 0], rtol=1e-3, atol=1e-4)
        # after a restart every idle session continues exactly
        proc = _serve(model_dirs, port, redis_url)
        for sid, p in prompts.items():
            got = _generate(url, sid, None, 12, seed=3)
            assert got == reference(model_dirs["text"], list(p.encode()), SamplingParams(seed=3), 12)
    finally:
        proc.kill()
        proc.wait(10)


def test_the_shutdown_flush_skips_a_session_whose_creation_never_reached_the_engine(
    model_dirs, redis_url, redis_db
):
    """A create or import refused at shutdown leaves a record whose slot still holds another
    session's old state (its client got the 503): writing it would store a wrong state."""
    s = _replica(model_dirs, redis_url)
    engine = s.state.models[TEXT].engine
    real = httpx.post(s.url + "/v1/sessions", json={"model": TEXT, "prompt": "arrows"}).json()["session_id"]
    never = SessionRecord(id="sess-never-set-up", model=TEXT, slot=engine.pool.reserve())
    s.state.sessions.add(never)  # as service._new_record does before the engine runs the job
    s.stop()
    assert _stored(redis_db, real)["n_tokens"] == len("arrows")
    assert redis_db.get(KEY_PREFIX + never.id) is None


def test_python_m_server_exits_non_zero_before_listening_when_the_store_is_unreachable(model_dirs):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    cmd = [sys.executable, "-m", "server", "--port", str(free_port()),
           "--checkpoints", str(model_dirs["text"]), "--session-store", dead]  # fmt: skip
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert f"session store {dead}: cannot connect" in out.stderr
    assert "Uvicorn running" not in out.stderr
