"""Several models in one server (a helper's audit): a text and an audio model, and one checkpoint served
under two ids in two dtypes (`NAME=PATH`, `S4_MODEL_DTYPES`). Each model is named as itself wherever the
server speaks of it (log lines, errors), sessions stay on their model unless moved on purpose, and one
model's load never changes another's output."""

from __future__ import annotations

import logging

import httpx
import pytest
from server_support import ServerThread

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
    lines said tiny-text, and the bfloat16 model's were not to be told from the float32 one's."""
    settings = Settings(
        checkpoints=[str(model_dirs["text"]), f"{BF16}={model_dirs['text']}"],
        model_dtypes=[f"{BF16}=bfloat16"],
        state_dtype="float16",  # (ignored on CPU: one line per model says so)
        compile_step=True,  # (likewise)
        max_sessions=2,
        device="cpu",
    )
    with caplog.at_level(logging.INFO, logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    assert set(models) == {TEXT, BF16} and not failed
    for model_id in (TEXT, BF16):
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"model {model_id}: ")]
        assert any("S4_STATE_DTYPE=float16 ignored on CPU" in line for line in lines), (model_id, lines)
        assert any("S4_COMPILE_STEP ignored" in line for line in lines), (model_id, lines)


def test_an_export_imports_into_another_id_of_its_checkpoint_with_the_model_parameter(mc):
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
    # the moved session decodes on the bfloat16 model: as a second import of the same export does
    twin = mc.post(f"/v1/sessions/import?model={BF16}", content=blob, headers=OCTETS).json()["session_id"]
    turns = [
        mc.post("/v1/generate", json={"session_id": s, "max_new_tokens": 40, "seed": 5}).json()
        for s in (moved["session_id"], twin)
    ]
    assert turns[0]["model"] == BF16 and turns[0]["tokens"] == turns[1]["tokens"]
    assert len(turns[0]["tokens"]) == 40
    # without the parameter: the export's own model
    assert mc.post("/v1/sessions/import", content=blob, headers=OCTETS).json()["model"] == TEXT
    # another model's weights; an id not served
    r = mc.post(f"/v1/sessions/import?model={AUDIO}", content=blob, headers=OCTETS)
    assert r.status_code == 422 and r.json()["error"]["param"] == "state", r.text
    assert f"was made by other weights than model {AUDIO}'s" in r.json()["error"]["message"]
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
