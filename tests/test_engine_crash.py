"""An engine thread that dies of a bug: its requests fail, later ones get 503 at once (they used to sit
in an inbox nobody read, forever), /readyz says why, and the other models keep serving."""

import httpx
from server_support import ServerThread

from server import Settings


def test_a_crashed_engine_refuses_with_503_instead_of_hanging_and_readyz_names_it(model_dirs):
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])],
                              drain_timeout_s=1)).start()  # fmt: skip
    try:
        with httpx.Client(base_url=s.url, timeout=20) as c:
            req = {"model": "tiny-text", "prompt": "to be", "max_new_tokens": 4, "seed": 1}
            assert c.post("/v1/generate", json=req).status_code == 200
            engine = s.state.models["tiny-text"].engine

            def broken_step(*args, **kwargs):
                raise RuntimeError("a bug in the step")

            engine.rec.step = broken_step  # the next decode step raises on the engine thread
            engine.rec.decode_block = broken_step  # (the native decode block as well)
            r = c.post("/v1/generate", json=req)
            assert r.status_code == 500 and "failed" in r.json()["error"]["message"], r.text
            for call in (
                lambda: c.post("/v1/generate", json=req),
                lambda: c.post("/v1/sessions", json={"model": "tiny-text", "prompt": "x"}),
                lambda: c.post(
                    "/v1/completions", json={"model": "tiny-text", "prompt": "x", "max_tokens": 2}
                ),
            ):
                r = call()  # answered at once (the client's 20 s timeout would fail a hang)
                assert r.status_code == 503, r.text
                assert "engine of model tiny-text failed (RuntimeError)" in r.json()["error"]["message"]
            ready = c.get("/readyz")
            assert ready.status_code == 503 and "tiny-text failed" in ready.json()["reason"]
            audio = {"model": "tiny-audio", "max_new_tokens": 8, "seed": 1}
            assert c.post("/v1/generate", json=audio).status_code == 200  # the other model still serves
            metrics = c.get("/metrics").text
            assert 's4_engine_crashes_total{model="tiny-text"} 1.0' in metrics
            assert 's4_engine_crashes_total{model="tiny-audio"} 0.0' in metrics
    finally:
        s.stop()
