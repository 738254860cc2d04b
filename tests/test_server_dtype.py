"""S4_DTYPE (issue #16, kind 4): the server serves half-precision weights, isotropic and SaShiMi models
alike, verified at load like every model (the dtype and the measured errors in /v1/models, /readyz and
/metrics); states stay float32; an invalid value is refused at startup, naming the setting."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from server_support import ServerThread, reference
from websockets.asyncio.client import connect

from model import ModelConfig, build, save
from model.codecs import MuLaw
from model.recurrent import LOGITS_TOL
from model.sampling import SamplingParams
from server.config import Settings
from server.metrics import Metrics
from server.registry import load_models
from server.sessions import SessionTable

ROOT = Path(__file__).resolve().parent.parent
TEXT = "tiny-text"
SASHIMI = "tiny-sashimi-audio"


def verification_metrics(client: httpx.Client, model: str) -> dict[str, float]:
    """check → value of s4_verification_relative_error_ratio{model=model}: the logits' checks labelled
    dtype="bfloat16", each layer's kernel check dtype="float32" (its step form is checked in float32)."""
    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "s4_verification_relative_error_ratio" and s.labels["model"] == model:
                kernel = s.labels["check"].startswith("kernel_layer_")
                assert s.labels["dtype"] == ("float32" if kernel else "bfloat16"), s.labels
                out[s.labels["check"]] = s.value
    return out


@pytest.fixture(scope="module")
def sashimi_audio_dir(tmp_path_factory) -> Path:
    """A tiny 16 kHz audio SaShiMi (pool [4, 4], S4 kernels, LayerNorm blocks)."""
    torch.manual_seed(7)
    cfg = ModelConfig(arch="sashimi", vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=64,
                      pool=[4, 4], modality="audio", sample_rate=16000, cauchy_backend="torch")  # fmt: skip
    d = tmp_path_factory.mktemp("sashimi-half") / SASHIMI
    save(build(cfg), d)
    return d


def ws_generate(url: str, body: dict) -> tuple[list[int], dict]:
    """One generation over the WebSocket: the ids of its token frames (text) or binary mu-law frames
    (audio), and the done frame."""

    async def run():
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "generate", **body}))
            ids: list[int] = []
            while True:
                m = await ws.recv()
                if isinstance(m, bytes):
                    ids += list(m)
                elif (frame := json.loads(m))["type"] == "token":
                    ids += frame["ids"]
                elif frame["type"] in ("done", "error"):
                    return ids, frame

    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["text", "sashimi-audio"])
def test_bfloat16_weights_are_verified_at_load_and_serve_a_request(kind, model_dirs, sashimi_audio_dir):
    """The isotropic text model and an audio SaShiMi: verified in bfloat16 at load (the dtype and the
    errors in /v1/models, /readyz and /metrics), the weights bfloat16, the slots float32, and a sampled
    request over HTTP and over the WebSocket gives the library's own bfloat16 generation (same seed)."""
    if kind == "text":
        path, model, prompt = model_dirs["text"], TEXT, b"to be, or"
        body, ws_body = {"prompt": prompt.decode()}, {"prompt": prompt.decode()}
    else:  # no prompt: an audio model starts from mu-law silence
        path, model, prompt = sashimi_audio_dir, SASHIMI, bytes([MuLaw().silence])
        body, ws_body = {}, {"audio_encoding": "mulaw"}
    # (S4_STATE_DTYPE=float16 is a GPU setting: ignored on CPU, the states stay float32)
    settings = Settings(checkpoints=[str(path)], dtype="bfloat16", max_sessions=4, drain_timeout_s=1,
                        state_dtype="float16")  # fmt: skip
    server = ServerThread(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            info = client.get("/v1/models").json()["data"][0]
            served = server.state.models[model]
            v, tol = info["verification"], LOGITS_TOL[torch.bfloat16]
            assert info["dtype"] == v["dtype"] == "bfloat16" and v["logits_tol"] == tol
            assert v["tokens"] == min(256, served.config.l_max)
            # bfloat16 really runs (errors of bfloat16's order, not float32's) and is within the tolerance
            assert 1e-4 < v["step_rel_err"] <= tol and 1e-4 < v["prefill_rel_err"] <= tol
            layers = [r["layer"] for r in served.rec.report]
            assert len(v["kernel_rel_err"]) == len(layers) == (2 if kind == "text" else 3)
            assert max(v["kernel_rel_err"]) <= settings.verify_tolerance
            ready = client.get("/readyz").json()
            assert ready["ready"] and ready["verification"][model] == {
                "dtype": "bfloat16", "tol": tol,
                "step_rel_err": v["step_rel_err"], "prefill_rel_err": v["prefill_rel_err"],
            }  # fmt: skip
            assert verification_metrics(client, model) == {
                "step": v["step_rel_err"], "prefill": v["prefill_rel_err"],
                **{f"kernel_layer_{name}": e for name, e in zip(layers, v["kernel_rel_err"], strict=True)},
            }  # fmt: skip
            assert all(p.dtype == torch.bfloat16 for p in served.rec.net.parameters())
            assert served.engine.pool.state.dtype == torch.float32  # the slots hold float32 states
            assert served.engine.batch.state.dtype == torch.float32 == served.rec.state_dtype
            assert info["state_dtype"] == "float32" and v["state_dtype_check"] is None
            want = reference(path, list(prompt), SamplingParams(seed=5), 24, dtype=torch.bfloat16)
            assert len(set(want)) > 4  # (not one repeated token: the sampled ids carry the logits)
            req = {"model": model, "max_new_tokens": 24, "seed": 5}
            r = client.post("/v1/generate", json={**req, **body})
            assert r.status_code == 200, r.text
            assert r.json()["tokens"] == want
            ids, done = ws_generate(server.ws_url, {**req, **ws_body})
            assert done["type"] == "done", done
            assert ids == want
    finally:
        server.stop()


def test_a_model_that_misses_the_tolerance_at_its_dtype_is_not_served_and_the_reason_names_it(
    model_dirs, monkeypatch
):
    monkeypatch.setitem(LOGITS_TOL, torch.bfloat16, 1e-5)  # below bfloat16's reach (u = 3.9e-3)
    settings = Settings(checkpoints=[str(model_dirs["text"])], dtype="bfloat16", max_sessions=2)
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert models == {}
    assert failed[TEXT].startswith("VerificationError: the recurrent network in bfloat16 does not reproduce")
    assert "within rel. err 1e-05 over 256 tokens (step " in failed[TEXT]


def test_an_invalid_dtype_is_refused_at_startup_naming_the_setting():
    with pytest.raises(ValidationError, match="dtype"):
        Settings(dtype="half")
    env = {**os.environ, "S4_DTYPE": "fp8", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "server"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)  # fmt: skip
    assert run.returncode != 0
    assert (
        "not serving: invalid settings: S4_DTYPE (--dtype): Input should be 'float32', 'bfloat16' or "
        "'float16'" in run.stderr
    )
    env.pop("S4_DTYPE")  # the flag, parsed by Settings as the variable is: the same line
    run = subprocess.run([sys.executable, "-m", "server", "--dtype", "float8"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT, check=False)  # fmt: skip
    assert run.returncode == 1
    assert "not serving: invalid settings: S4_DTYPE (--dtype): Input should be 'float32'" in run.stderr


def test_prefill_threads_reach_the_model_and_are_range_checked(model_dirs):
    """S4_PREFILL_THREADS (the 16k-token goal's configuration is bfloat16 weights on 2 threads): the served
    model's parallel prefill runs with them and gives the 1-thread result within bfloat16 rounding."""
    settings = Settings(
        checkpoints=[str(model_dirs["text"])], dtype="bfloat16", max_sessions=2, prefill_threads=2
    )
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert not failed
    rec = models[TEXT].rec
    assert rec.prefill_threads == 2
    tokens = torch.randint(0, 256, (1, 700))  # > 512: the parallel form
    two, s2 = rec.prefill(tokens, rec.init_state(1), logits="last")
    rec.prefill_threads = 1
    one, s1 = rec.prefill(tokens, rec.init_state(1), logits="last")
    assert float((two - one).norm() / one.norm()) <= LOGITS_TOL[torch.bfloat16]
    assert float((s2 - s1).norm() / s1.norm()) <= LOGITS_TOL[torch.bfloat16]
    for bad in (-1, 1025):
        with pytest.raises(ValidationError, match="prefill_threads"):
            Settings(prefill_threads=bad)


def test_model_dtypes_set_each_models_dtype_over_s4_dtype(model_dirs, monkeypatch, caplog):
    """S4_MODEL_DTYPES: MODEL_ID=DTYPE entries override S4_DTYPE for those models only (one process can
    serve a text model in bfloat16 beside an audio model in float32, or the reverse); an id no checkpoint
    serves is reported as not served; a malformed entry is refused by the setting's name."""
    ckpts = [str(model_dirs["text"]), str(model_dirs["audio"])]
    for default, override, want_text, want_audio in (
        ("float32", "bfloat16", torch.bfloat16, torch.float32),
        ("bfloat16", "float32", torch.float32, torch.bfloat16),
    ):
        settings = Settings(checkpoints=ckpts, dtype=default, max_sessions=2,
                            model_dtypes=[f"{TEXT}={override}", "ghost=float16"])  # fmt: skip
        assert settings.dtype_for(TEXT) == override and settings.dtype_for("tiny-audio") == default
        caplog.clear()
        with caplog.at_level("WARNING", logger="server.models"):
            models, failed = load_models(settings, SessionTable(), Metrics())
        assert models[TEXT].rec.dtype == want_text and models["tiny-audio"].rec.dtype == want_audio
        half = TEXT if want_text != torch.float32 else "tiny-audio"  # the one 16-bit model: its warning
        source = "S4_MODEL_DTYPES" if half == TEXT else "S4_DTYPE"
        warned = [r.getMessage() for r in caplog.records if "weights on CPU" in r.getMessage()]
        assert len(warned) == 1
        assert warned[0].startswith(f"{half} serves bfloat16 weights on CPU ({source}): the C step")
        ops = models[half].rec.compute_dtype
        assert ("float32 on widened weights" in warned[0]) == (ops == torch.float32)
        assert models[TEXT].rec.verification["dtype"] == str(want_text).removeprefix("torch.")
        assert failed == {"ghost": "S4_MODEL_DTYPES names 'ghost', which no S4_CHECKPOINTS entry serves"}
    monkeypatch.setenv("S4_MODEL_DTYPES", f" {TEXT}=float16 , tiny-audio=bfloat16")
    assert Settings().model_dtypes == [f"{TEXT}=float16", "tiny-audio=bfloat16"]
    monkeypatch.delenv("S4_MODEL_DTYPES")
    for bad, why in (([f"{TEXT}=half"], "is not MODEL_ID=DTYPE"), (["=float32"], "is not MODEL_ID=DTYPE"),
                     ([TEXT], "is not MODEL_ID=DTYPE"), (["a b=float32"], "is not MODEL_ID=DTYPE"),
                     ([f"{TEXT}=float32", f"{TEXT}=bfloat16"], "is given twice")):  # fmt: skip
        with pytest.raises(ValidationError, match=f"model_dtypes(.|\\n)*{why}"):
            Settings(model_dtypes=bad)
    env = {**os.environ, "S4_MODEL_DTYPES": "text=fp8", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "server"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "not serving: invalid settings: S4_MODEL_DTYPES (--model-dtypes)" in run.stderr
    assert "'text=fp8' is not MODEL_ID=DTYPE" in run.stderr
    env.pop("S4_MODEL_DTYPES")  # the flag, which Settings validates too: the same message
    run = subprocess.run([sys.executable, "-m", "server", "--model-dtypes", "text=fp8"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)  # fmt: skip
    assert run.returncode == 1 and "invalid settings: S4_MODEL_DTYPES (--model-dtypes): " in run.stderr
