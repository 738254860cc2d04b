"""Several models in one server (a helper's audit): a text and an audio model, and one checkpoint served
under two ids in two dtypes (`NAME=PATH`, `S4_MODEL_DTYPES`). Each model is named as itself wherever the
server speaks of it (log lines, errors), sessions stay on their model unless moved on purpose, and one
model's load never changes another's output."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest
import torch
from server_support import (
    ServerThread,
    _rec,
    big_vocab_checkpoint,
    metric,
    reference,
    serving_while_loading,
    serving_while_one_loads,
    wait_for,
    ws_turn,
)
from websockets.sync.client import connect

from model.sampling import SamplingParams, sample
from server.config import Settings
from server.metrics import Metrics
from server.registry import load_models
from server.sessions import SessionTable, pack_state, unpack_state

TEXT = "tiny-text"
BF16 = "tiny-text-bf16"  # the same folder as TEXT, served in bfloat16
AUDIO = "tiny-audio"
OCTETS = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def multi(model_dirs):
    """A server of a text model, the same checkpoint in bfloat16 under another id, an audio model, and a
    broken folder it does not serve."""
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), f"{BF16}={model_dirs['text']}", str(model_dirs["audio"]),
                     str(model_dirs["broken"])],
        model_dtypes=[f"{BF16}=bfloat16"],
        max_sessions=32,
        max_new_tokens=300,
        max_audio_s=0.05,
    )  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


@pytest.fixture
def mc(multi):
    with httpx.Client(base_url=multi.url, timeout=120) as c:
        yield c


def test_load_time_log_lines_name_each_model_id_not_its_folder(model_dirs, caplog):
    """One folder under two ids: every load-time line about a model names its id. The lines of
    S4_COMPILE_STEP, S4_STATE_DTYPE and the CUDA graphs named the folder (`path.name`), so both models'
    lines said tiny-text, and the bfloat16 model's were not to be told from the float32 one's. An
    S4_MODEL_DTYPES id that differs from a served one in case only says which (that model serves in
    S4_DTYPE's dtype)."""
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), f"{BF16}={model_dirs['text']}"],
        model_dtypes=[f"{BF16}=bfloat16", "TINY-TEXT=float16"],  # (an id in another case: no model's)
        state_dtype="float16",  # (ignored on CPU: one line per model says so)
        compile_step=True,  # (likewise)
        max_sessions=2,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    assert set(models) == {TEXT, BF16}
    assert failed == {
        "TINY-TEXT": "S4_MODEL_DTYPES names 'TINY-TEXT', which no S4_CHECKPOINTS entry serves (ids are "
        "case-sensitive: the entry's model is tiny-text)"
    }
    for model_id in (TEXT, BF16):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"model {model_id}: ")]
        assert any("S4_STATE_DTYPE=float16 ignored on CPU" in line for line in lines), (model_id, lines)
        assert any("S4_COMPILE_STEP ignored" in line for line in lines), (model_id, lines)


def continued(model_dir, header: dict, raw: bytes, seed: int, n: int, dtype=None) -> list[int]:
    """The library's generation from an exported session (its state, pending token and seen set): what
    the server's continuation of it must be, token for token, at the weights' `dtype`."""
    rec = _rec(model_dir, dtype)
    state = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(header["shape"])
    state = state.unsqueeze(rec.batch_dim).clone()
    params = SamplingParams(seed=seed)
    gen = params.generator()
    seen = torch.zeros(1, rec.config.vocab_size, dtype=torch.bool)
    seen[0, header["seen"]] = True
    tok, out = torch.tensor([header["pending"]]), []
    for _ in range(n):
        logits, state = rec.step(tok, state)
        tok = sample(logits, [params], [gen], seen)
        out.append(int(tok))
        seen[0, tok] = True
    return out


def test_an_export_imports_into_another_id_of_its_checkpoint_with_the_model_parameter(mc, model_dirs):
    """One checkpoint served in float32 and bfloat16 under two ids: a session exported from one imports
    into the other with POST /v1/sessions/import?model=ID (its state bytes kept, the session then on
    that model), which checks the export's weights against that model's. The parameter was ignored: the
    session landed on the export's model, with a 201 that read as done. Without it the export's own model
    serves it, as before; another model's weights are a 422 naming state, an unknown id a 404 naming
    model, and an export of an id this server does not serve names the id that serves its weights."""
    sid = mc.post("/v1/sessions", json={"model": TEXT, "prompt": "to be, or not"}).json()["session_id"]
    blob = mc.get(f"/v1/sessions/{sid}/export").content
    header, raw = unpack_state(blob)
    r = mc.post(f"/v1/sessions/import?model={BF16}", content=blob, headers=OCTETS)
    assert r.status_code == 201, r.text
    moved = r.json()
    assert moved["model"] == BF16 and moved["tokens"] == header["n_tokens"]
    again_header, again_raw = unpack_state(mc.get(f"/v1/sessions/{moved['session_id']}/export").content)
    assert again_raw == raw and again_header["model"] == BF16
    assert {k: again_header[k] for k in ("n_tokens", "pending", "seen")} == {
        k: header[k] for k in ("n_tokens", "pending", "seen")
    }
    # the moved session decodes on the bfloat16 weights (the library's step from the exported state, token
    # for token), the session it came from on the float32 ones
    turns = [
        mc.post("/v1/generate", json={"session_id": s, "max_new_tokens": 300, "seed": 5}).json()
        for s in (moved["session_id"], sid)
    ]
    assert turns[0]["model"] == BF16 and turns[1]["model"] == TEXT
    assert turns[0]["tokens"] == continued(model_dirs["text"], header, raw, 5, 300, torch.bfloat16)
    assert turns[1]["tokens"] == continued(model_dirs["text"], header, raw, 5, 300)
    assert turns[0]["tokens"] != turns[1]["tokens"]
    # without the parameter: the export's own model
    assert mc.post("/v1/sessions/import", content=blob, headers=OCTETS).json()["model"] == TEXT
    # another model's weights; an id not served
    r = mc.post(f"/v1/sessions/import?model={AUDIO}", content=blob, headers=OCTETS)
    assert r.status_code == 422 and r.json()["error"]["param"] == "state", r.text
    assert f"was made by other weights than model {AUDIO}'s" in r.json()["error"]["message"]
    assert r.json()["error"]["message"].endswith(f"; it is model {TEXT!r}'s state: import it without ?model")
    for missing in ("nope", "Tiny-Text", "broken"):
        r = mc.post(f"/v1/sessions/import?model={missing}", content=blob, headers=OCTETS)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text
    # an export of an id this server does not serve (another server's name for the checkpoint)
    renamed = pack_state({**header, "model": "shakespeare-elsewhere"}, raw)
    r = mc.post("/v1/sessions/import", content=renamed, headers=OCTETS)
    assert r.status_code == 422 and r.json()["error"]["param"] == "state", r.text
    message = r.json()["error"]["message"]
    assert "'shakespeare-elsewhere', which this server does not serve" in message
    assert f"import it with ?model={TEXT})" in message, message
    assert mc.post(f"/v1/sessions/import?model={TEXT}", content=renamed, headers=OCTETS).status_code == 201


def _turn(c: httpx.Client, model: str, seed: int, n: int, prompt: str | None = None) -> list[int]:
    body = {"model": model, "max_new_tokens": n, "seed": seed}
    if prompt is not None:
        body["prompt"] = prompt
    r = c.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_a_models_seeded_output_is_the_same_whether_or_not_the_other_models_are_busy(multi, mc):
    """Each model has its own engine and batches: seeded generations of the float32 text model, of the
    same checkpoint in bfloat16 and of the audio model give the same tokens alone and while the two other
    models decode and ingest long prompts from 6 concurrent clients (real load through the server)."""
    prompts = {TEXT: "to be, or not to be", BF16: "to be, or not to be", AUDIO: None}
    n = {TEXT: 120, BF16: 120, AUDIO: 400}
    alone = {m: [_turn(mc, m, s, n[m], prompts[m]) for s in (1, 2)] for m in prompts}
    assert alone[TEXT] != alone[BF16]  # (two dtypes: two models, not one batch)
    for target, prompt in prompts.items():
        others = [m for m in prompts if m != target]
        stop, errors = threading.Event(), []

        def load(model: str, k: int) -> None:
            with httpx.Client(base_url=multi.url, timeout=120) as c:
                i = 0
                while not stop.is_set():
                    try:  # long prompts (ingested between decode steps) and long generations
                        long = None if model == AUDIO else "whether 'tis nobler in the mind " * (4 + i % 9)
                        _turn(c, model, 1000 * k + i, n[model], long)
                    except Exception as exc:  # noqa: BLE001 (reported below)
                        errors.append(repr(exc))
                    i += 1

        threads = [threading.Thread(target=load, args=(others[k % 2], k)) for k in range(6)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: all(metric(mc, "s4_active_sessions", m) > 0 for m in others), 30)
            busy = [_turn(mc, target, s, n[target], prompt) for s in (1, 2)]
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[:3]
        assert busy == alone[target], target


CASES = [  # (route, body without `model`): each route's request, text or audio
    ("/v1/generate", {"prompt": "to be", "max_new_tokens": 2}),
    ("/v1/sessions", {"prompt": "to be"}),
    ("/v1/completions", {"prompt": "to be", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "to be"}),
    ("/detokenize", {"tokens": [65]}),
]


@pytest.mark.parametrize(("path", "body"), CASES)
def test_every_route_refuses_a_model_it_cannot_serve_naming_model_never_a_500(mc, path, body):
    """`model` left out, unknown, in another case, configured but not served (the broken folder), or the
    audio model for a text request: a 4xx naming `model` (404 for an id not served; OpenAI's shape and
    code model_not_found on its routes), and no other model's counters move."""
    from server.errors import is_openai_path

    openai = is_openai_path(path)
    before = {m: metric(mc, "s4_tokens_generated_total", m) for m in (TEXT, BF16, AUDIO)}
    refused = {
        "omitted": (body, 400 if openai else 422),
        "unknown": ({**body, "model": "nope"}, 404),
        "cased": ({**body, "model": "TINY-TEXT"}, 404),
        "broken": ({**body, "model": "broken"}, 404),
    }
    if path not in ("/v1/generate", "/v1/sessions"):  # (there: the audio model refuses `prompt`, below)
        refused["audio"] = ({**body, "model": AUDIO}, 400)
    for case, (sent, status) in refused.items():
        r = mc.post(path, json=sent)
        assert r.status_code == status, (case, r.text)
        err = r.json()["error"]
        assert err["param"] == "model", (case, err)
        if openai:
            assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
            assert err["code"] == ("model_not_found" if status == 404 else None), (case, err)
        if case == "broken":
            assert "configured but not served: CheckpointError" in err["message"]
        if case == "cased":  # (the id it differs from in case only)
            assert err["message"].endswith(f"see GET /v1/models (ids are case-sensitive: {TEXT} is served)")
    if path in ("/v1/generate", "/v1/sessions"):  # the other modality's input, named
        r = mc.post(path, json={**body, "model": AUDIO})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt", r.text
        r = mc.post(path, json={"model": TEXT, "prompt_audio": "UklGRg=="})
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt_audio", r.text
    assert {m: metric(mc, "s4_tokens_generated_total", m) for m in before} == before


def test_sessions_stay_on_their_model_and_limits_are_each_models(mc, multi):
    """A session of one model continued with another named (the same checkpoint's other dtype, the audio
    model): 422 naming model, over HTTP and the WebSocket; left out: the session's own. max_new_tokens is
    the text limit for text models and max_audio_s at the model's rate for audio ones. A generation on
    one model moves only its own counters."""
    sid = mc.post("/v1/sessions", json={"model": TEXT, "prompt": "to be"}).json()["session_id"]
    for other in (BF16, AUDIO):
        r = mc.post("/v1/generate", json={"model": other, "session_id": sid, "max_new_tokens": 2})
        assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
        assert f"belongs to model '{TEXT}'" in r.json()["error"]["message"]
    with connect(multi.ws_url) as ws:
        frame = ws_turn(ws, {"type": "generate", "session_id": sid, "model": BF16, "max_new_tokens": 2})[-1]
        assert frame["type"] == "error" and frame["code"] == 422 and frame["param"] == "model", frame
        frames = ws_turn(ws, {"type": "generate", "session_id": sid, "max_new_tokens": 2})
        assert frames[0] == {"type": "session", "session_id": sid, "model": TEXT, "kind": "text"}
        assert frames[-1]["type"] == "done"
    limits = {m["id"]: m["max_new_tokens"] for m in mc.get("/v1/models").json()["data"]}
    assert limits == {TEXT: 300, BF16: 300, AUDIO: 400}  # (0.05 s at 8 kHz)
    for model, limit in limits.items():
        body = {"model": model, "max_new_tokens": limit + 1, **({"prompt": "a"} if model != AUDIO else {})}
        r = mc.post("/v1/generate", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == "max_new_tokens", r.text
        assert f"limit of {limit} (" in r.json()["error"]["message"]
    before = {m: metric(mc, "s4_tokens_generated_total", m) for m in limits}
    assert len(_turn(mc, BF16, 3, 25, "to be")) == 25
    after = {m: metric(mc, "s4_tokens_generated_total", m) for m in limits}
    assert after == {**before, BF16: before[BF16] + 25}


def test_an_unknown_model_or_session_id_is_quoted_short_in_its_404(mc, multi):
    """An id the server does not know is named in the 404 by its first 128 characters and its length,
    over HTTP (our routes and OpenAI's) and the WebSocket: the whole repr made a 15 MiB body whose model
    was DEL characters a 75 MiB answer (each written \\x7f, its backslash escaped again by JSON)."""
    long = "\x7f" * (1 << 20)
    for path, body in (("/v1/generate", {"model": long, "prompt": "a"}),
                       ("/v1/completions", {"model": long, "prompt": "a"}),
                       ("/v1/generate", {"session_id": long, "max_new_tokens": 2})):  # fmt: skip
        r = mc.post(path, json=body)
        assert r.status_code == 404 and len(r.content) < 1024, (path, len(r.content))
        assert "… (1,048,576 characters)" in r.json()["error"]["message"]
    assert "no model 'x'; see" in mc.post("/v1/generate", json={"model": "x", "prompt": "a"}).text
    with connect(multi.ws_url, max_size=None) as ws:
        frame = ws_turn(ws, {"type": "generate", "model": "\x7f" * 60_000, "max_new_tokens": 2})[-1]
        assert frame["code"] == 404 and len(frame["message"]) < 1024, len(frame["message"])


def test_a_clients_field_name_or_message_type_is_quoted_short_in_its_422(mc, multi):
    """A validation error names the field, and pydantic's message can quote the client's own string: a
    member the schema lacks is named by its name (in the message and in `param`), a WebSocket message's
    unknown type by its tag. A 1 MiB name of DEL characters (each escaped \u007f by JSON) was answered
    whole, twice: a 12 MiB 422. Now each is its first 128 characters and its length, on every JSON route
    and the WebSocket."""
    long = "\x7f" * (1 << 20)
    bodies = {
        "/v1/generate": {"model": TEXT, "prompt": "a"},
        "/v1/completions": {"model": TEXT, "prompt": "a"},
        "/v1/chat/completions": {"model": TEXT, "messages": [{"role": "user", "content": "a"}]},
        "/v1/sessions": {"model": TEXT},
    }
    for path, body in bodies.items():
        r = mc.post(path, json={**body, long: 1})
        assert r.status_code in (400, 422) and len(r.content) < 2048, (path, r.status_code, len(r.content))
        err = r.json()["error"]
        assert "… (1,048,576 characters)" in err["message"] and "… (1,048,576 characters)" in err["param"]
    with connect(multi.ws_url, max_size=None) as ws:
        for message in ({"type": "\x7f" * 60_000}, {"type": "generate", "model": TEXT, "\x7f" * 60_000: 1}):
            ws.send(json.dumps(message))
            frame = json.loads(ws.recv(10))
            assert frame["type"] == "error" and frame["code"] == 422 and len(frame["message"]) < 1024, frame
            assert "… (60,000 characters)" in frame["message"], frame["message"]


def test_the_model_list_answers_as_every_model_route_while_loading_and_draining(model_dirs, monkeypatch):
    """GET /v1/models said 200 and [] while the models loaded (and listed them while the server drained)
    though GET /v1/models/{id} and every model route answered 503 then: a client that lists the models at
    start read "this server serves nothing". Now the list is a 503 with Retry-After too, with the same
    message as /v1/models/{id} and /readyz's reason; once loaded, the models that loaded (a configured
    folder that failed is not listed, and is a 404 by id)."""
    import asyncio  # noqa: PLC0415

    settings = Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["broken"])])
    s, go = serving_while_loading(settings, monkeypatch)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:

            def refused(message: str, by_id: str | None = None) -> None:
                for path, said in (("/v1/models", message), (f"/v1/models/{TEXT}", by_id or message)):
                    r = c.get(path)
                    assert r.status_code == 503 and r.headers["retry-after"] == "5", (path, r.text)
                    assert r.json()["error"]["message"] == said, (path, r.text)
                r = c.post("/v1/completions", json={"model": TEXT, "prompt": "a", "max_tokens": 1})
                assert r.status_code == 503 and r.json()["error"]["message"] == (by_id or message), r.text

            # (each model's requests: a 503 naming it while it loads; an id not configured: a 404 at once)
            refused(
                "models are still loading",
                f"model {TEXT} is still loading (GET /readyz lists the models loading)",
            )
            assert c.get("/v1/models/nope").status_code == 404
            assert c.get("/readyz").json()["reason"] == "loading"
            go.set()
            assert wait_for(lambda: c.get("/readyz").status_code == 200, 60)
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [TEXT]
            assert c.get(f"/v1/models/{TEXT}").status_code == 200
            assert c.get(f"/v1/models/{model_dirs['broken'].name}").status_code == 404
            asyncio.run_coroutine_threadsafe(s.state.drain(), s.state.loop).result(30)
            refused("the server is shutting down")
            assert c.get("/readyz").json()["reason"] == "draining"
    finally:
        go.set()
        s.stop()


def test_each_model_serves_as_soon_as_it_is_loaded_while_the_others_load(model_dirs, monkeypatch):
    """No model served until every configured one had loaded (`state.loaded`, set once for all): on a cold
    start the first model waited ~10 s after its own load for the others. Now each model serves from the
    moment it is loaded and verified: while the audio model (after it in S4_CHECKPOINTS) still loads, the
    text model answers every route, GET /v1/models lists it, and a request naming the audio model is a
    503 with Retry-After naming it (OpenAI's error shape on the OpenAI routes, a WebSocket error frame);
    /readyz stays 503 "loading" until every model is served, and lists which are."""
    settings = Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])], max_audio_s=0.05)
    s, go = serving_while_one_loads(settings, monkeypatch, AUDIO)
    loading = f"model {AUDIO} is still loading (GET /readyz lists the models loading)"
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert wait_for(lambda: c.get(f"/v1/models/{TEXT}").status_code == 200, 60), (
                "the text model never served"
            )
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [TEXT]
            ready = c.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json() | {"verification": None} == {
                "ready": False,
                "reason": "loading",
                "models": [TEXT],
                "loading": [AUDIO],
                "failed": {},
                "verification": None,
            }
            want = reference(model_dirs["text"], list(b"ab"), SamplingParams(seed=3), 4)
            r = c.post("/v1/generate", json={"model": TEXT, "prompt": "ab", "max_new_tokens": 4, "seed": 3})
            assert r.status_code == 200 and r.json()["tokens"] == want, r.text
            for path, body in (("/v1/completions", {"model": AUDIO, "prompt": "a", "max_tokens": 1}),
                               ("/v1/generate", {"model": AUDIO, "max_new_tokens": 1}),
                               ("/v1/sessions", {"model": AUDIO})):  # fmt: skip
                r = c.post(path, json=body)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", (path, r.text)
                assert r.json()["error"]["message"] == loading, (path, r.text)
            r = c.post("/v1/completions", json={"model": AUDIO, "prompt": "a", "max_tokens": 1})
            assert r.json()["error"].keys() == {"message", "type", "param", "code"}, r.text  # OpenAI's shape
            r = c.get(f"/v1/models/{AUDIO}")
            assert r.status_code == 503 and r.json()["error"]["message"] == loading, r.text
            assert c.get("/v1/models/nope").status_code == 404
            with connect(s.ws_url) as ws:
                frame = ws_turn(ws, {"type": "generate", "model": AUDIO, "max_new_tokens": 1})[-1]
                assert frame["type"] == "error" and frame["code"] == 503 and frame["message"] == loading, (
                    frame
                )
            go.set()
            assert wait_for(lambda: c.get("/readyz").status_code == 200, 60)
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [TEXT, AUDIO]
            r = c.post("/v1/generate", json={"model": AUDIO, "max_new_tokens": 2})
            assert r.status_code == 200 and len(r.json()["tokens"]) == 2, r.text
            assert c.get("/readyz").json()["loading"] == []
    finally:
        go.set()
        s.stop()


def test_a_model_that_fails_while_another_loads_is_a_404_with_its_reason_and_the_rest_serve(
    model_dirs, monkeypatch
):
    """A configured model that fails its load is a 404 with the reason as soon as it has failed (not a 503
    until every model is done), the ones loaded before it serve, and once all are done the server is
    ready as before (a failed model does not stop it, nor make it unready without S4_REQUIRE_ALL_MODELS)."""
    broken = model_dirs["broken"].name
    folders = [str(model_dirs[k]) for k in ("text", "broken", "audio")]
    settings = Settings(checkpoints=folders, max_audio_s=0.05)
    s, go = serving_while_one_loads(settings, monkeypatch, AUDIO)
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert wait_for(lambda: c.get(f"/v1/models/{broken}").status_code == 404, 60)
            r = c.get(f"/v1/models/{broken}")
            assert "is configured but not served: " in r.json()["error"]["message"], r.text
            ready = c.get("/readyz").json()
            assert (
                ready["reason"] == "loading" and ready["loading"] == [AUDIO] and broken in ready["failed"]
            ), ready
            assert c.get(f"/v1/models/{TEXT}").status_code == 200
            go.set()
            assert wait_for(lambda: c.get("/readyz").status_code == 200, 60)
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [TEXT, AUDIO]
    finally:
        go.set()
        s.stop()


TABLES = (
    "in_tab",
    "out_tab",
    "Kf",
    "conv_tab",
    "pow_bin",
    "_prefill_c",
    "A_bin_t",
)  # a form's prefill tables


def test_two_ids_of_one_checkpoint_hold_one_copy_of_its_layers_tables(multi):
    """The float32 and the bfloat16 id of one folder: their SSM forms are float32 either way, built from
    the same float64 system, so their prefill tables are equal byte for byte. Each id held its own copy
    (text-shakespeare: 56 MiB more for the second id); now both forms hold the same tensors, and a
    model of other weights shares none of them."""
    a, b = (multi.state.models[k].rec for k in (TEXT, BF16))
    shared = 0
    for fa, fb in zip(a.layers, b.layers, strict=True):
        assert fa is not fb  # (the forms themselves are each model's)
        for name in TABLES:
            ta, tb = getattr(fa, name, None), getattr(fb, name, None)
            for x, y in zip(*((t if isinstance(t, (list, tuple)) else [t]) for t in (ta, tb)), strict=True):
                assert x is y, name
                shared += x is not None
    assert shared >= 2 * len(a.layers)
    audio = multi.state.models[AUDIO].rec
    ours = {id(t) for f in a.layers for n in TABLES for t in _tensors(getattr(f, n, None))}
    assert not ours & {id(t) for f in audio.layers for n in TABLES for t in _tensors(getattr(f, n, None))}


def _tensors(value) -> list:
    return [t for t in (value if isinstance(value, (list, tuple)) else [value]) if t is not None]


def test_sessions_of_two_ids_sharing_tables_decode_at_once_as_each_alone(mc, model_dirs):
    """Sessions on the float32 and the bfloat16 id of one checkpoint (whose forms share their prefill
    tables), decoded at the same time from two threads, give each the tokens it gives alone, and the
    library's own generation at its dtype (same seed): nothing of one id's work reaches the other's."""
    import concurrent.futures  # noqa: PLC0415

    prompt = "to be, or not to be: that is the question"

    def turns(model: str, seed: int) -> list[list[int]]:
        sid = mc.post("/v1/sessions", json={"model": model, "prompt": prompt}).json()["session_id"]
        out = []
        for i in range(2):  # the second turn prefills nothing new: it goes on from the first's state
            r = mc.post("/v1/generate", json={"session_id": sid, "max_new_tokens": 120, "seed": seed + i})
            assert r.status_code == 200, r.text
            out.append(r.json()["tokens"])
        mc.delete(f"/v1/sessions/{sid}")
        return out

    jobs = [(TEXT, 11), (BF16, 11), (TEXT, 12), (BF16, 13)]
    alone = {job: turns(*job) for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: turns(*job), jobs), strict=True))
    assert together == alone
    for (model, seed), got in alone.items():
        dtype = torch.bfloat16 if model == BF16 else None
        assert got[0] == reference(model_dirs["text"], list(prompt.encode()), SamplingParams(seed=seed), 120,
                                   dtype)  # fmt: skip


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory):
    return big_vocab_checkpoint(tmp_path_factory.mktemp("big"))


def test_an_import_for_a_model_still_loading_is_a_503_whatever_its_size(model_dirs, big_vocab, monkeypatch):
    """An import's size and header budget were those of the models served so far: while a model with a
    larger vocabulary still loaded, an export of its session that had seen many ids was a 413 (over the
    served models' largest state blob + 1 MiB) or a 422 'holds more JSON separators than an export's
    header can ... it was not parsed', final-sounding refusals of a state the server takes once that model
    serves. Now either is a 503 with Retry-After naming the models still loading, and the same blobs import
    (201) once the model serves; `?model=` naming the model loading is a 503 before the body is read."""
    big = big_vocab.name
    a = ServerThread(Settings(checkpoints=[str(big_vocab)])).start()
    try:
        with httpx.Client(base_url=a.url, timeout=60) as c:
            sid = c.post("/v1/sessions", json={"model": big, "prompt": "ab"}).json()["session_id"]
            header, raw = unpack_state(c.get(f"/v1/sessions/{sid}/export").content)
    finally:
        a.stop()
    blobs = {n: pack_state({**header, "seen": list(range(n))}, raw) for n in (70_000, 200_000)}
    # (a body limit under the blobs: an import is held to the largest state blob served instead)
    settings = Settings(checkpoints=[str(model_dirs["text"]), str(big_vocab)], max_body_bytes=1024)
    s, go = serving_while_one_loads(settings, monkeypatch, big)
    loading = f"model {big} is still loading (GET /readyz lists the models loading)"
    try:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert wait_for(lambda: c.get(f"/v1/models/{TEXT}").status_code == 200, 60)
            limit = s.state.max_state_blob_bytes
            sizes = {n: len(b) for n, b in blobs.items()}
            assert sizes[70_000] < limit < sizes[200_000], (limit, sizes)
            for n, blob in blobs.items():
                r = c.post("/v1/sessions/import", content=blob, headers=OCTETS)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", (n, r.text[:300])
                assert f"still loading: {big}" in r.json()["error"]["message"], (n, r.text[:300])
                r = c.post(f"/v1/sessions/import?model={big}", content=blob, headers=OCTETS)
                assert r.status_code == 503 and r.json()["error"]["message"] == loading, (n, r.text[:300])
            go.set()
            assert wait_for(lambda: c.get("/readyz").status_code == 200, 60)
            for n, blob in blobs.items():
                r = c.post("/v1/sessions/import", content=blob, headers=OCTETS)
                assert r.status_code == 201 and r.json()["model"] == big, (n, r.text[:300])
    finally:
        go.set()
        s.stop()


def test_a_byte_models_chat_stop_holding_u_fffd_is_refused_at_load(model_dirs, tmp_path):
    """A byte model's text writes U+FFFD for generated bytes that are not UTF-8, and stop sequences are
    matched on the bytes: a stop holding U+FFFD never matches, so a request's is a 422 naming it. A
    checkpoint's `chat_stop` holding one was taken (R11's note): every chat reply ran on past its turn's
    end to max_tokens. That model now fails its load naming chat_stop; its other chat_stop still loads."""
    import json  # noqa: PLC0415

    from server_support import chat_copy  # noqa: PLC0415

    bad = chat_copy(model_dirs["text"], tmp_path / "bad")
    meta = json.loads((bad / "config.json").read_text())
    meta["chat_stop"] = [*meta["chat_stop"], "\ufffd\n"]
    (bad / "config.json").write_text(json.dumps(meta))
    good = chat_copy(model_dirs["text"], tmp_path / "good")
    settings = Settings(checkpoints=[f"bad={bad}", f"good={good}"], max_sessions=2, device="cpu")
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert set(models) == {"good"} and set(failed) == {"bad"}, failed
    i = len(meta["chat_stop"]) - 1
    assert f"chat_stop.{i} holds U+FFFD" in failed["bad"] and "never end a reply" in failed["bad"], failed
