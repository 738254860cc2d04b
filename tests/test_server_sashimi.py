"""SaShiMi through the real server: the engine, the slot pool, fork, export/import and the state checks
work on its one-row StateLayout state without knowing what SaShiMi is.

Rows of one decode batch (and of one prefill group) sit at different pooling phases when their sessions
hold prompts of different lengths: sessions holding 1..16 tokens (every phase of pool [4, 4]) then take
the same 8-token turn, one at a time and all at once; both equal the library's one-shot generation on
the concatenated input (server_support.reference), in the fused C step and in the torch step."""

import struct
import threading

import httpx
import pytest
import torch
from server_support import CORPUS, ServerThread, _rec, metric, reference, wait_for
from test_server_store import redis_db, redis_url  # noqa: F401 (fixtures: a redis-server per module)

from model import ModelConfig, build, save
from model.recurrent import StateRangeError
from model.sampling import SamplingParams
from server import Settings
from server.sessions import MAGIC, pack_state, state_version, unpack_state
from server.store import KEY_PREFIX

TEXT = "tiny-sashimi-text"
SHAPE = dict(arch="sashimi", vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=64, pool=[4, 4],
             cauchy_backend="torch")  # fmt: skip
N_NEW = 24
TURN = b" to be:"  # the second turn of every mixed-phase session (+ 1 pending token: 8 ingested)


def make_text_sashimi():
    torch.manual_seed(3)
    return build(ModelConfig(**SHAPE, kernel="s4d"))


@pytest.fixture(scope="module")
def sashimi_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sashimi") / TEXT
    save(make_text_sashimi(), d)
    return d


@pytest.fixture(scope="module", params=["fused", "torch"])
def srv(request, sashimi_dir):
    settings = Settings(checkpoints=[str(sashimi_dir)], max_sessions=48, max_batch_size=32, drain_timeout_s=1)
    s = ServerThread(settings).start()
    rec = s.state.models[TEXT].rec
    if request.param == "torch":  # the torch ops instead of the per-layer C step (before any request)
        rec._fused = None
    else:
        assert rec._fused is not None, "the fused C step did not build"
    yield s
    s.stop()


def _create(url: str, prompt: bytes) -> str:
    r = httpx.post(url + "/v1/sessions", json={"model": TEXT, "prompt": prompt.decode()}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def _generate(url: str, sid: str | None, prompt: bytes, seed: int, n: int = N_NEW) -> list[int]:
    body = {"model": TEXT, "prompt": prompt.decode(), "max_new_tokens": n, "seed": seed, "temperature": 1.0}
    if sid is not None:
        body["session_id"] = sid
    r = httpx.post(url + "/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _want(sashimi_dir, first: bytes, seed: int) -> list[int]:
    return reference(sashimi_dir, list(first + TURN), SamplingParams(seed=seed, temperature=1.0), N_NEW)


def _watch_decode(rec, observe) -> None:
    """Wrap rec.step and rec.decode_block (the engine thread calls them) so that each call first reports
    observe(K, state, the rows it steps), changing nothing; `del rec.step, rec.decode_block` undoes it."""
    step, block = rec.step, rec.decode_block

    def watched_step(tokens, state, **kw):
        observe(1, state, torch.arange(state.shape[0]))
        return step(tokens, state, **kw)

    def watched_block(K, state, tokens, **kw):
        observe(K, state, (kw["limit"] > 0).nonzero().flatten())
        return block(K, state, tokens, **kw)

    rec.step, rec.decode_block = watched_step, watched_block


def test_the_server_serves_sashimi_with_its_state_layout(srv):
    info = httpx.get(srv.url + "/v1/models/" + TEXT).json()
    rec = srv.state.models[TEXT].rec
    assert info["arch"] == "sashimi"
    assert info["state_bytes_per_session"] == rec.layout.numel * 4
    v = info["verification"]
    assert v["step_rel_err"] <= 1e-4 and v["prefill_rel_err"] <= 1e-4 and v["dtype"] == "float32"
    assert srv.state.models[TEXT].engine.pool.state.shape == (48, rec.layout.numel)


@pytest.mark.parametrize("batching", ["aligned", "mixed"])
def test_every_phase_alone_and_in_one_batch_equals_the_reference(srv, sashimi_dir, batching):
    """Sessions at phases 1..16 (mod 16: all of them) take the same turn alone, then all at once: the
    prefill group holds 16 equal-length chunks at 16 phases. "aligned" (the engine's default for a
    SaShiMi stepped sparsely, `align_period` 16): each row waits until the decode batch's phase comes
    round to its own, so every step's rows share one phase and the batch makes N_NEW + 15 steps.
    "mixed" (the engine told the model has no preference, as with CUDA graphs): the decode batch holds
    16 rows at 16 phases from the first step. The same tokens either way."""
    firsts = [CORPUS[:n].encode() for n in range(1, 17)]
    want = [_want(sashimi_dir, f, seed=10 + i) for i, f in enumerate(firsts)]
    solo = [_create(srv.url, f) for f in firsts]
    alone = [_generate(srv.url, sid, TURN, seed=10 + i) for i, sid in enumerate(solo)]
    assert alone == want
    sids = [_create(srv.url, f) for f in firsts]
    rec = srv.state.models[TEXT].rec
    engine = srv.state.models[TEXT].engine
    assert engine._period == 16 and rec.align_period == 16
    phases_seen: list[int] = []  # distinct pooling phases among the rows of each prefill call
    stepped: list[int] = []  # ... among the rows each decode call steps
    prefill = rec.prefill

    def counting_prefill(tokens, state, **kw):
        phases_seen.append(len(set(rec.phases(state).tolist())))
        return prefill(tokens, state, **kw)

    # the engine thread calls these: observe them, change nothing
    rec.prefill = counting_prefill
    _watch_decode(rec, lambda K, state, rows: stepped.append(len(set(rec.phases(state[rows]).tolist()))))
    if batching == "mixed":
        engine._period = 1
    client = httpx.Client(base_url=srv.url)
    steps_before = metric(client, "s4_decode_batch_size_count", TEXT)
    rows_before = metric(client, "s4_decode_batch_size_sum", TEXT)
    got: list = [None] * len(sids)

    def run(i):
        got[i] = _generate(srv.url, sids[i], TURN, seed=10 + i)

    # hold the engine thread while the 16 requests queue up, so that it admits them in one go (one
    # prefill group, one decode batch) however slowly the requests arrive on a loaded machine
    gate = threading.Event()
    held = engine.call(lambda e: gate.wait(60))
    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sids))]
        for t in threads:
            t.start()
        assert wait_for(lambda: engine.queued >= len(sids), 60), engine.queued
        gate.set()
        held.result(60)
        for t in threads:
            t.join(120)
    finally:
        del rec.prefill, rec.step, rec.decode_block
        engine._period = 16
        for sid in solo + sids:  # (the module's server has 48 slots)
            httpx.delete(f"{srv.url}/v1/sessions/{sid}")
    assert got == want
    assert max(phases_seen) == 16, f"prefill calls saw {phases_seen} phases: no mixed-phase group"
    steps = metric(client, "s4_decode_batch_size_count", TEXT) - steps_before
    rows = metric(client, "s4_decode_batch_size_sum", TEXT) - rows_before
    assert rows == 16 * N_NEW
    if batching == "mixed":
        assert steps == N_NEW and max(stepped) == 16, f"{steps} steps, {stepped} phases: not one mixed batch"
    else:  # each row joined as the batch's phase came round to its own: 15 steps more, one phase a call
        assert steps == N_NEW + 15 and set(stepped) == {1}, (steps, stepped)


def test_rows_out_of_phase_leave_and_rejoin_in_phase_and_a_block_ends_where_one_can_join(srv, sashimi_dir):
    """Three sessions at phases 5 apart decode in one mixed batch (the engine told the model has no
    preference); after its first decode call it aligns: the rows not at the batch's phase
    leave and wait, each decode block while one waits is sized to end where the batch's phase comes
    round to a waiting row's, every call after that steps rows of one phase, and each session's tokens
    are those of its sequence alone."""
    n = 400
    firsts = [CORPUS[:k].encode() for k in (1, 6, 11)]
    want = [reference(sashimi_dir, list(f + TURN), SamplingParams(seed=30 + i, temperature=1.0), n)
            for i, f in enumerate(firsts)]  # fmt: skip
    sids = [_create(srv.url, f) for f in firsts]
    rec, engine = srv.state.models[TEXT].rec, srv.state.models[TEXT].engine
    calls: list[tuple[int, int, int]] = []  # (K, phases among the stepping rows, jobs waiting)

    def observe(K, state, rows):
        calls.append((K, len(set(rec.phases(state[rows]).tolist())), len(engine._waiting)))
        if len(calls) == 1:  # (the engine thread: its next iteration aligns)
            engine._period = 16

    got: list = [None] * 3

    def run(i):
        got[i] = _generate(srv.url, sids[i], TURN, seed=30 + i, n=n)

    gate = threading.Event()
    held = engine.call(lambda e: gate.wait(60))
    try:
        engine._period = 1  # (the engine thread waits on the gate)
        _watch_decode(rec, observe)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert wait_for(lambda: engine.queued >= 3, 60), engine.queued
        gate.set()
        held.result(60)
        for t in threads:
            t.join(120)
    finally:
        del rec.step, rec.decode_block
        engine._period = 16
        for sid in sids:
            httpx.delete(f"{srv.url}/v1/sessions/{sid}")
    assert got == want
    # one mixed batch first (its first tokens: a block of 1 step); from the next iteration, the two rows
    # not at the batch's phase have left and wait, in blocks that end where one can join (5 steps
    # apart), and every call steps rows of one phase
    assert calls[0] == (1, 3, 0), calls
    assert calls[1][1:] == (1, 2) and all(ph == 1 for _, ph, _ in calls[1:]), calls
    # their phases after the first token: 7, 12 and 1 (15 at the start, + 0, 5, 10 prompt tokens, + the
    # turn's 7, + 1); the batch takes 1 (a tie: the smaller), so blocks of 6 and 5 steps end at the joins
    # (later, a row whose client falls behind by a stream's room waits again: on a loaded machine)
    assert [K for K, _, w in calls if w][:2] == [6, 5], calls


def test_a_job_held_for_its_phase_keeps_its_place_in_a_full_batch(sashimi_dir):
    """max_batch_size 2, one row decoding (A) and 16 jobs at the 16 phases queued in order behind one
    place: each waits for its phase (≤ 15 steps) in that place, so they decode in the order they came
    (a job at the batch's phase used to take the place of the one before it, which then waited for another:
    without bound under load), each with its tokens alone. The order is the engine's (its `_finish`
    calls): the clients' threads, 16 ms apart here, can read their answers out of order on a loaded
    machine (CI saw 15 before 14 once). A is long: 4,000 tokens could end before the test saw it decode."""
    settings = Settings(checkpoints=[str(sashimi_dir)], max_sessions=24, max_batch_size=2, drain_timeout_s=1,
                        max_new_tokens=100_000)  # fmt: skip
    srv = ServerThread(settings).start()
    firsts = [CORPUS[:k].encode() for k in range(1, 17)]  # every phase
    n = 20
    want = [reference(sashimi_dir, list(f + TURN), SamplingParams(seed=50 + i, temperature=1.0), n)
            for i, f in enumerate(firsts)]  # fmt: skip
    try:
        engine = srv.state.models[TEXT].engine
        a = _create(srv.url, CORPUS[:1].encode())
        sids = [_create(srv.url, f) for f in firsts]
        finished: list[str] = []  # session ids, in the order the engine finished their turns
        finish = engine._finish

        def recording(job, reason):
            finished.append(job.session.id)
            return finish(job, reason)

        engine._finish = recording
        got: dict[int, list[int]] = {}

        def run(i, sid, n, seed):
            got[i] = _generate(srv.url, sid, TURN, seed=seed, n=n)

        # A: long enough to be seen decoding (4,000 tokens once ended within wait_for's 20 ms poll)
        ta = threading.Thread(target=run, args=(-1, a, 100_000, 1))
        ta.start()
        assert wait_for(lambda: engine.batch.live == 1, 60)
        gate, started = threading.Event(), threading.Event()
        held = engine.call(lambda e: (started.set(), gate.wait(60)))
        assert started.wait(60)
        threads = []
        for i, sid in enumerate(sids):  # queued one after another: the engine takes them in this order
            threads.append(threading.Thread(target=run, args=(i, sid, n, 50 + i)))
            threads[-1].start()
            assert wait_for(lambda i=i: engine.queued >= i + 1, 60)
        gate.set()
        held.result(60)
        for t in threads:
            t.join(120)
        assert ta.is_alive(), "A ended before the 16: it did not keep the other place"
        ta.join(120)
    finally:
        srv.stop()
    assert [got[i] for i in range(16)] == want
    assert [sid for sid in finished if sid in sids] == sids, finished


def test_fork_and_export_import_continue_identically(srv, sashimi_dir):
    first = CORPUS[:11].encode()  # phase 11 + the turns below: an odd phase with full buffers
    sid = _create(srv.url, first)
    t1 = _generate(srv.url, sid, b"", seed=1, n=5)
    fork = httpx.post(f"{srv.url}/v1/sessions/{sid}/fork").json()["session_id"]
    blob = httpx.get(f"{srv.url}/v1/sessions/{sid}/export").content
    header, raw = unpack_state(blob)
    rec = _rec(sashimi_dir)
    assert state_version(blob) == 2 and header["arch"] == "sashimi" and header["shape"] == [rec.layout.numel]
    r = httpx.post(srv.url + "/v1/sessions/import", content=blob)
    assert r.status_code == 201, r.text
    imported = r.json()["session_id"]
    base = list(first) + t1 + list(TURN)
    want = reference(sashimi_dir, base, SamplingParams(seed=7, temperature=1.0), N_NEW)
    for s in (sid, fork, imported):
        assert _generate(srv.url, s, TURN, seed=7) == want


def test_import_refuses_states_the_model_cannot_reach_naming_the_part(srv, sashimi_dir):
    sid = _create(srv.url, CORPUS[:6].encode())
    header, raw = unpack_state(httpx.get(f"{srv.url}/v1/sessions/{sid}/export").content)
    rec = _rec(sashimi_dir)
    x = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()[None]
    assert int(rec.layout.view(x, "phase")[0, 0]) == 5  # 6 tokens: 5 ingested, 1 pending

    def tamper(part: str, index: tuple, value: float) -> str:
        y = x.clone()
        rec.layout.view(y, part)[(0, *index)] = value
        r = httpx.post(srv.url + "/v1/sessions/import", content=pack_state(header, y.numpy().tobytes()))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "state"
        return r.json()["error"]["message"]

    assert "NaN or infinite" in tamper("center.0.x", (0, 0, 0), float("nan"))
    assert "phase counter 16" in tamper("phase", (0,), 16.0)
    assert "phase counter 2.5" in tamper("phase", (0,), 2.5)
    # phase 5: level 0 has filled entry 0 of its block (5 = 4 + 1), level 1 entry 0 (5 // 4 = 1)
    assert "down.0.buffer entry 2" in tamper("down.0.buffer", (2, 3), 0.25)
    assert "down.1.buffer entry 1" in tamper("down.1.buffer", (1, 0), 0.25)
    msg = tamper("center.0.x", (1, 0, 2), 1e9)
    assert "center.0.x[1, 0, 2]" in msg and "largest this model can reach" in msg
    assert "down.0.buffer" in tamper("down.0.buffer", (0, 3), 1e3)  # beyond every embedding
    assert "up.1.buffer[2, 5]" in tamper("up.1.buffer", (2, 5), 1e30)  # beyond the residual stream's bound
    # the untouched state imports
    r = httpx.post(srv.url + "/v1/sessions/import", content=pack_state(header, raw))
    assert r.status_code == 201, r.text


def test_a_format_version_1_state_is_read_as_isotropic_and_refused_for_sashimi(srv):
    sid = _create(srv.url, b"abc")
    header, raw = unpack_state(httpx.get(f"{srv.url}/v1/sessions/{sid}/export").content)
    blob = _pack_v1({k: v for k, v in header.items() if k != "arch"}, raw)
    r = httpx.post(srv.url + "/v1/sessions/import", content=blob)
    assert r.status_code == 422 and r.json()["error"]["param"] == "state"
    assert (
        "format version 1" in r.json()["error"]["message"] and "'isotropic'" in r.json()["error"]["message"]
    )


def _pack_v1(header: dict, state: bytes) -> bytes:
    """The export format before SaShiMi (version 1: no arch in the header)."""
    import hashlib
    import json

    head = json.dumps(header, sort_keys=True).encode()
    body = struct.pack("<8sHI", MAGIC, 1, len(head)) + head + state
    return body + hashlib.sha256(body).digest()


def test_check_state_accepts_every_reachable_state_and_refuses_by_part(sashimi_dir):
    """Library level: the states random prompts of every length reach (prefill and step, U-Net too)
    all pass; a TransposedLN model has no SSM input bound (finiteness only) and says so by inf."""
    for kw in (dict(kernel="s4d"), dict(kernel="s4", unet=True), dict(kernel="s4d", norm="tln")):
        torch.manual_seed(0)
        rec = build(ModelConfig(**{**SHAPE, "vocab_size": 32, **kw})).to_recurrent()
        bound = rec.state_bound()
        tln = kw.get("norm") == "tln"
        for name, _, _ in rec.net.named_s4_blocks():
            b = rec.layout.view(bound[None], f"{name}.x")
            assert bool(b.isinf().all()) == tln
        for k in range(2):  # the DownPools of a non-U-Net see no norm; the UpPools see blocks' outputs
            assert bool(rec.layout.view(bound[None], f"down.{k}.buffer").isfinite().all())  # also under a TLN
            assert bool(rec.layout.view(bound[None], f"up.{k}.buffer").isinf().all()) == tln
        state = rec.init_state(4)
        for L in (1, 5, 16, 23):
            _, state = rec.prefill(torch.randint(0, 32, (4, L)), state)
            rec.check_state(state)
            for _ in range(3):
                _, state = rec.step(torch.randint(0, 32, (4,)), state)
                rec.check_state(state)
        with pytest.raises(StateRangeError, match="shape"):
            rec.check_state(state[:, :-1])


def test_a_sashimi_value_just_over_its_bound_prints_digits_that_tell_the_two_apart():
    """ "-54.2178 in center.0.x[...] exceeds 54.2178" (a fresh-user trial): each number is now written in
    the fewest digits that read back as its float32."""
    from test_state_isolation import bound_message_numbers

    from model.recurrent import STATE_BOUND_SLACK

    torch.manual_seed(0)
    rec = build(ModelConfig(**{**SHAPE, "vocab_size": 32, "kernel": "s4d"})).to_recurrent()
    limit = (rec.state_bound() * STATE_BOUND_SLACK).float()
    slot = next(v for k, v in rec.layout.slots.items() if k.endswith(".x"))  # an SSM state
    i = slot.offset + 3
    x = rec.init_state(1)
    over = torch.nextafter(limit[i], torch.tensor(float("inf")))
    x[0, i] = -over
    with pytest.raises(StateRangeError) as err:
        rec.check_state(x)
    value, bound = bound_message_numbers(str(err.value))
    assert value != "-" + bound, str(err.value)
    assert torch.tensor(float(value)) == -over and torch.tensor(float(bound)) == limit[i]


def test_a_format_version_1_export_of_an_isotropic_model_still_imports(client):
    """Exports written before SaShiMi (version 1, no arch) import into the same isotropic model and
    continue exactly like the session they came from."""
    r = client.post("/v1/sessions", json={"model": "tiny-text", "prompt": "a sea of troubles"})
    sid = r.json()["session_id"]
    header, raw = unpack_state(client.get(f"/v1/sessions/{sid}/export").content)
    assert header.pop("arch") == "isotropic"
    r = client.post("/v1/sessions/import", content=_pack_v1(header, raw))
    assert r.status_code == 201, r.text
    body = {"model": "tiny-text", "max_new_tokens": 16, "seed": 3}
    a = client.post("/v1/generate", json={**body, "session_id": sid}).json()["tokens"]
    b = client.post("/v1/generate", json={**body, "session_id": r.json()["session_id"]}).json()["tokens"]
    assert a == b and len(a) == 16


def test_a_sashimi_session_resumes_from_the_redis_store_on_another_replica(sashimi_dir, redis_url, redis_db):  # noqa: F811
    """Write-through on idle, then a replica that never saw the session reads it from Redis (the store
    holds the same version-2 blob an export does) and continues like one-shot generation."""

    def replica():
        settings = Settings(checkpoints=[str(sashimi_dir)], session_store=redis_url, max_sessions=4,
                            drain_timeout_s=1)  # fmt: skip
        return ServerThread(settings).start()

    a, b = replica(), replica()
    try:
        first = CORPUS[:13].encode()
        sid = _create(a.url, first)
        t1 = _generate(a.url, sid, b"", seed=2, n=6)
        assert wait_for(lambda: _stored_tokens(redis_db, sid) == 13 + 6, 10)
        t2 = _generate(b.url, sid, TURN, seed=8)
        everything = list(first) + t1 + list(TURN)
        assert t2 == reference(sashimi_dir, everything, SamplingParams(seed=8, temperature=1.0), N_NEW)
    finally:
        a.stop()
        b.stop()


def _stored_tokens(db, sid: str) -> int | None:
    blob = db.hget(KEY_PREFIX + sid, "state")
    return None if blob is None else unpack_state(blob)[0]["n_tokens"]


def test_a_bfloat16_sashimi_server_exports_float32_states_that_import_into_either_dtype(sashimi_dir):
    """S4_DTYPE=bfloat16 serves a SaShiMi checkpoint (refused by name before 2026-12-02), reported as
    bfloat16; its sessions continue exactly like the library's bfloat16 generation. An export is the
    same float32 StateLayout row a float32 server writes (header dtype float32, shape [numel]): it
    imports into the bfloat16 server, continuing exactly like the session it came from, and into a
    float32 server of the same checkpoint (states are float32 whatever the weights' dtype, and the
    fingerprint names the weights, not the dtype they serve in), as an isotropic model's does."""

    def start(**kw):
        settings = Settings(checkpoints=[str(sashimi_dir)], max_sessions=8, drain_timeout_s=1, **kw)
        return ServerThread(settings).start()

    half, full = start(dtype="bfloat16"), start()
    try:
        info = httpx.get(half.url + "/v1/models/" + TEXT).json()
        assert info["dtype"] == info["verification"]["dtype"] == "bfloat16"
        rec = half.state.models[TEXT].rec
        assert rec.dtype == torch.bfloat16 and 1e-4 < info["verification"]["step_rel_err"]  # bfloat16 runs
        assert half.state.models[TEXT].engine.pool.state.dtype == torch.float32
        first = CORPUS[:11].encode()  # phase 11 + the turns below: an odd phase with full buffers
        sid = _create(half.url, first)
        t1 = _generate(half.url, sid, b"", seed=1, n=5)
        blob = httpx.get(f"{half.url}/v1/sessions/{sid}/export").content
        header, raw = unpack_state(blob)
        assert header["dtype"] == "float32" and header["shape"] == [rec.layout.numel]
        assert len(raw) == rec.layout.numel * 4
        r = httpx.post(half.url + "/v1/sessions/import", content=blob)
        assert r.status_code == 201, r.text
        base = list(first) + t1 + list(TURN)
        params = SamplingParams(seed=7, temperature=1.0)
        want = reference(sashimi_dir, base, params, N_NEW, dtype=torch.bfloat16)
        for s in (sid, r.json()["session_id"]):
            assert _generate(half.url, s, TURN, seed=7) == want
        r = httpx.post(full.url + "/v1/sessions/import", content=blob)
        assert r.status_code == 201, r.text
        assert len(_generate(full.url, r.json()["session_id"], TURN, seed=7)) == N_NEW
    finally:
        half.stop()
        full.stop()


def test_a_sashimi_models_unet_flag_is_in_its_startup_line_and_in_v1_models(
    client, sashimi_dir, tmp_path, caplog
):
    """Where the arch and pool are reported (the model's startup line, GET /v1/models), so is `unet`: a
    SaShiMi U-Net (blocks before each DownPool, skips) and a plain one are told apart (once neither said)."""
    from server.metrics import Metrics
    from server.registry import load_models
    from server.sessions import SessionTable

    assert all(m["unet"] is False for m in client.get("/v1/models").json()["data"])  # isotropic ones
    torch.manual_seed(4)
    unet_dir = tmp_path / "tiny-unet"
    save(build(ModelConfig(**SHAPE, kernel="s4d", unet=True)), unet_dir)
    settings = Settings(checkpoints=[str(unet_dir), str(sashimi_dir)], max_sessions=2)
    with caplog.at_level("INFO", logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    assert not failed
    assert (models["tiny-unet"].describe()["unet"], models[TEXT].describe()["unet"]) == (True, False)
    assert "model tiny-unet: text SaShiMi s4d, pool [4, 4], unet true, widths" in caplog.text
    assert f"model {TEXT}: text SaShiMi s4d, pool [4, 4], unet false, widths" in caplog.text
    from server.schemas import ModelInfo

    assert ModelInfo(**models["tiny-unet"].describe(), max_prompt_tokens=1, max_new_tokens=1).unet is True
