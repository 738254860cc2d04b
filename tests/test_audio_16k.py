"""16 kHz audio end to end (SC09 and YouTubeMix models are 16 kHz), on a tiny 16 kHz SaShiMi model:
WebSocket binary frames in and out, WAV output and resampled prompts over HTTP, the limits in seconds,
and the demo page (model line, state size, playback and WAV download at the model's rate). Every sample
is checked against the library's one-shot generation (server_support.reference)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
from server_support import ServerThread, b64, check_usage, reference
from test_demo_page import WAIT_MS, Demo, browser, downloaded_wav  # noqa: F401 (browser: a fixture)
from websockets.asyncio.client import connect

from model import ModelConfig, build, save
from model.codecs import MuLaw, read_audio, to_pcm16, wav_bytes
from model.sampling import SamplingParams
from server import Settings, media

AUDIO = "tiny-sashimi-16k"
OFFICIAL = "tiny-sashimi-16k-s4mulaw"
SC09 = "sc09-official"  # tests/fixtures/official/sashimi_sc09.ckpt, made with the official code
BEETHOVEN = "beethoven-official"  # sashimi_beethoven.ckpt: the same on the Beethoven data (8-bit linear)
RATE = 16000
MU = MuLaw()


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    import torch

    torch.manual_seed(5)
    shape = dict(vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=64, pool=[4, 4], unet=True)
    cfg = ModelConfig(arch="sashimi", **shape, modality="audio", sample_rate=RATE, cauchy_backend="torch")
    d = tmp_path_factory.mktemp("audio16k") / AUDIO
    save(build(cfg), d)
    return d


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """The same shape with the official (state-spaces/s4) mu-law convention, as an import writes it."""
    import torch

    torch.manual_seed(6)
    shape = dict(vocab_size=256, d_model=16, n_layers=1, d_state=16, l_max=64, pool=[4, 4])
    cfg = ModelConfig(
        arch="sashimi", **shape, modality="audio", sample_rate=RATE, mulaw="s4", cauchy_backend="torch"
    )
    d = tmp_path_factory.mktemp("audio16k-s4") / OFFICIAL
    save(build(cfg), d)
    return d


@pytest.fixture(scope="module")
def srv(audio_dir, official_dir, tmp_path_factory):
    fix = Path(__file__).resolve().parent / "fixtures" / "official"
    # the official .ckpt files are converted at startup
    checkpoints = [str(audio_dir), str(official_dir), f"{SC09}={fix / 'sashimi_sc09.ckpt'}",
                   f"{BEETHOVEN}={fix / 'sashimi_beethoven.ckpt'}"]  # fmt: skip
    settings = Settings(checkpoints=checkpoints, max_sessions=8, max_audio_s=2.0,
                        convert_cache=str(tmp_path_factory.mktemp("convert-cache")))  # fmt: skip
    s = ServerThread(settings).start()
    yield s
    s.stop()


def run(coro):
    """asyncio.run in a thread of its own (playwright's sync API keeps a loop on this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def pcm_turn(ws, pcm_in: bytes, n: int, seed: int) -> bytes:
    """On a socket bound with pcm16 frames: send `pcm_in` as the prompt, generate n samples, and return
    the binary frames' bytes (after the audio_header, until the done frame)."""
    await ws.send(pcm_in)
    await ws.send(json.dumps({"type": "generate", "max_new_tokens": n, "seed": seed}))
    await ws.recv()  # audio_header
    out = b""
    while isinstance(m := await ws.recv(), bytes):
        out += m
    return out


def tone(n: int, rate: int, hz: float = 440.0) -> np.ndarray:
    return 0.4 * np.sin(2 * np.pi * hz * np.arange(n) / rate)


def test_websocket_binary_frames_in_and_out_at_16_khz(srv, audio_dir):
    pcm_in = to_pcm16(tone(700, RATE))
    prompt = media.audio_frame_ids(pcm_in, "pcm16")

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "session", "model": AUDIO, "audio_encoding": "pcm16"}))
            bound = json.loads(await ws.recv())
            await ws.send(pcm_in[:600])  # s16le prompt samples in two binary frames
            await ws.send(pcm_in[600:])
            await ws.send(json.dumps({"type": "generate", "max_new_tokens": 1000, "seed": 3}))
            header = json.loads(await ws.recv())
            frames = []
            while isinstance(m := await ws.recv(), bytes):
                frames.append(m)
            return bound, header, frames, json.loads(m)

    bound, header, frames, done = run(main())
    assert bound["type"] == "session" and bound["sample_rate"] == RATE
    assert header == {"type": "audio_header", "sample_rate": RATE, "encoding": "pcm16", "channels": 1,
                      "frame_ms": 20, "frame_samples": 320}  # fmt: skip
    # the default 20 ms at the model's 16 kHz: 320 samples (640 bytes) a frame, the last one the rest
    assert [len(f) for f in frames] == [640, 640, 640, 80]
    want = reference(audio_dir, prompt, SamplingParams(seed=3), 1000)
    assert b"".join(frames) == to_pcm16(MU.decode(want))
    check_usage(done["usage"], 700, 1000)


def test_wav_output_and_prompts_at_other_rates_resampled_to_16_khz(srv, audio_dir):
    import httpx

    for rate in (RATE, 8000, 44100):
        wav_in = wav_bytes(tone(rate // 20, rate), rate)  # 50 ms
        prompt = MU.encode(read_audio(wav_in, RATE)[0]).tolist()
        assert len(prompt) == RATE // 20
        req = {"model": AUDIO, "prompt_audio": b64(wav_in), "max_new_tokens": 200, "seed": 4}
        r = httpx.post(srv.url + "/v1/generate", json=req, headers={"accept": "audio/wav"}, timeout=60)
        assert r.status_code == 200, r.text
        with wave.open(io.BytesIO(r.content)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (RATE, 1, 2)
            got = w.readframes(w.getnframes())
        assert got == to_pcm16(MU.decode(reference(audio_dir, prompt, SamplingParams(seed=4), 200)))
    # max_audio_s = 2 s is 32,000 samples at 16 kHz, for the prompt and for the output
    over = httpx.post(srv.url + "/v1/generate", json={"model": AUDIO, "max_new_tokens": 2 * RATE + 1}).json()
    assert over["error"]["param"] == "max_new_tokens" and f"at {RATE} Hz" in over["error"]["message"]
    long = {
        "model": AUDIO,
        "prompt_audio": b64(wav_bytes(tone(2 * RATE + 1, RATE), RATE)),
        "max_new_tokens": 1,
    }
    r = httpx.post(srv.url + "/v1/generate", json=long)
    assert r.status_code == 413 and r.json()["error"]["param"] == "prompt_audio"


def test_the_demo_page_plays_a_16_khz_sashimi_stream_and_shows_its_state_size(browser, srv, audio_dir):  # noqa: F811
    d = Demo(browser, srv.url)
    try:
        d.wait_status("model")
        d.page.select_option("#model", AUDIO)
        info = d.page.text_content("#model-info")
        assert info.startswith(
            f"audio: {RATE} Hz mu-law samples (256 levels) · SaShiMi: a U-Net of S4 blocks"
        ), info
        assert "time resolutions (1 at each)" in info
        state_bytes = srv.state.models[AUDIO].rec.state_bytes_per_sequence
        assert (
            d.page.text_content("#state-size") == f"{state_bytes / 1024:.1f} KiB, whatever the context length"
        )
        n = 1000  # 4 frames of 20 ms at 16 kHz; the reference steps the torch ops (2 ms a sample here)
        d.page.fill("#audio-samples", str(n))
        d.page.fill("#audio-temperature", "1")
        d.page.fill("#audio-seed", "6")
        d.page.click("#audio-generate")
        d.wait_status(f"Done: length, {n} samples")
        want = to_pcm16(MU.decode(reference(audio_dir, [MU.silence], SamplingParams(seed=6), n)))
        d.page.wait_for_function(f"() => s4demo.samplesPlayed === {n}", timeout=WAIT_MS)
        assert d.js("[s4demo.samplesReceived, s4demo.samplesScheduled]") == [n, n]
        assert downloaded_wav(d, RATE) == want
        assert d.errors == []
    finally:
        d.context.close()


def test_a_model_with_the_official_mulaw_convention_streams_in_it(srv, official_dir):
    """config mulaw = "s4": prompts are encoded and outputs decoded as state-spaces/s4 does (zero at
    128, q/128 − 1), over WebSocket pcm16 frames and WAV; silence (no prompt) is its code 128."""
    import httpx

    s4 = MuLaw("s4")
    pcm_in = to_pcm16(tone(400, RATE))
    # (pcm16 in by the server's table: s4's encode, except that each id's own pcm16 value is that id)
    prompt = media.audio_frame_ids(pcm_in, "pcm16", s4)
    assert prompt != MU.encode(np.frombuffer(pcm_in, "<i2") / 32768).tolist()  # the conventions differ
    assert np.abs(np.array(prompt) - s4.encode(np.frombuffer(pcm_in, "<i2") / 32768)).max() <= 1

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "session", "model": OFFICIAL, "audio_encoding": "pcm16"}))
            await ws.recv()
            return await pcm_turn(ws, pcm_in, 200, seed=2)

    out = run(main())
    want = reference(official_dir, prompt, SamplingParams(seed=2), 200)
    assert out == to_pcm16(s4.decode(want))
    r = httpx.post(srv.url + "/v1/generate", json={"model": OFFICIAL, "max_new_tokens": 150, "seed": 5})
    body = r.json()
    assert body["tokens"] == reference(official_dir, [128], SamplingParams(seed=5), 150)
    with wave.open(io.BytesIO(base64.b64decode(body["audio"]))) as w:
        assert w.getframerate() == RATE and w.readframes(w.getnframes()) == to_pcm16(
            s4.decode(body["tokens"])
        )


def test_an_official_beethoven_sashimi_streams_its_linear_quantization(srv):
    """The official Beethoven SaShiMi's tokens are 8-bit linear (once refused at conversion): served from
    its .ckpt, prompts are encoded and outputs decoded by Linear8 (state-spaces/s4's quantize /
    linear_decode), over WebSocket pcm16 frames and an HTTP WAV, from silence (its code 128, 0.0) and
    after a prompt; `mulaw` frames (the ids as mu-law bytes) are refused naming audio_encoding, before
    the socket binds."""
    import httpx

    from model.codecs import Linear8

    lin, folder = Linear8(), srv.state.models[BEETHOVEN].path
    assert srv.state.models[BEETHOVEN].config.quantization == "linear"
    codecs = {
        m: httpx.get(f"{srv.url}/v1/models/{m}").json()["audio_codec"] for m in (BEETHOVEN, SC09, AUDIO)
    }
    assert codecs == {BEETHOVEN: "linear", SC09: "mu-law s4", AUDIO: "mu-law s4serve"}
    pcm_in = to_pcm16(tone(400, RATE))
    prompt = media.audio_frame_ids(pcm_in, "pcm16", lin)
    assert prompt != MuLaw("s4").encode(np.frombuffer(pcm_in, "<i2") / 32768).tolist()

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "session", "model": BEETHOVEN, "audio_encoding": "mulaw"}))
            refused = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session", "model": BEETHOVEN, "audio_encoding": "pcm16"}))
            bound = json.loads(await ws.recv())
            return refused, bound, await pcm_turn(ws, pcm_in, 150, seed=3)

    refused, bound, out = run(main())
    assert (refused["type"], refused["code"], refused["param"]) == ("error", 422, "audio_encoding"), refused
    assert "8-bit linear" in refused["message"] and bound["type"] == "session"
    assert out == to_pcm16(lin.decode(reference(folder, prompt, SamplingParams(seed=3), 150)))
    r = httpx.post(srv.url + "/v1/generate", json={"model": BEETHOVEN, "max_new_tokens": 100, "seed": 4})
    body = r.json()
    assert body["tokens"] == reference(folder, [128], SamplingParams(seed=4), 100)
    with wave.open(io.BytesIO(base64.b64decode(body["audio"]))) as w:
        assert w.readframes(w.getnframes()) == to_pcm16(lin.decode(body["tokens"]))


def test_the_servers_own_pcm16_comes_back_as_the_ids_it_was_made_from(srv, official_dir, audio_dir):
    """Every id's pcm16 sample (the server's WAV and pcm16 frames), sent back as a WAV prompt_audio or as
    WebSocket pcm16 frames, is read as that id for every codec: a generation after it is the library's
    after the 256 ids. In the official "s4" mu-law convention and linear quantization 127 of the 256
    ids came back one lower (a decoded id is its bin's lower edge, which their encode puts in the bin
    below; an audit). (tests/test_audio_frames.py checks the ids themselves.)"""
    import httpx

    from model.codecs import Linear8

    ids = list(range(256))
    beethoven = srv.state.models[BEETHOVEN].path
    for model, codec, folder in [(OFFICIAL, MuLaw("s4"), official_dir), (BEETHOVEN, Linear8(), beethoven),
                                 (AUDIO, MU, audio_dir)]:  # fmt: skip
        pcm = media.pcm16_table(codec).tobytes()
        assert pcm == to_pcm16(codec.decode(ids))
        want = reference(folder, ids, SamplingParams(seed=9), 40)
        req = {"model": model, "prompt_audio": b64(wav_bytes(codec.decode(ids), RATE)), "max_new_tokens": 40}
        body = httpx.post(f"{srv.url}/v1/generate", json={**req, "seed": 9}).json()
        assert body["usage"]["prompt_tokens"] == 256 and body["tokens"] == want, model

        async def main(model=model, pcm=pcm) -> bytes:
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"type": "session", "model": model, "audio_encoding": "pcm16"}))
                await ws.recv()
                return await pcm_turn(ws, pcm, 40, seed=9)

        assert run(main()) == to_pcm16(codec.decode(want)), model


def test_an_official_sashimi_checkpoint_is_converted_and_streams_official_mulaw(srv):
    """S4_CHECKPOINTS names the official .ckpt: converted at startup (model.convert), served as SaShiMi
    with the official mu-law; a WebSocket stream equals the library reference of the converted folder."""
    import httpx

    info = httpx.get(f"{srv.url}/v1/models/{SC09}").json()
    assert info["arch"] == "sashimi" and info["sample_rate"] == RATE
    folder = srv.state.models[SC09].path
    s4 = MuLaw("s4")

    async def main():
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "model": SC09, "max_new_tokens": 120, "seed": 1,
                                      "audio_encoding": "pcm16"}))  # fmt: skip
            out = b""
            while not isinstance(m := await ws.recv(), str) or json.loads(m)["type"] != "done":
                out += m if isinstance(m, bytes) else b""
            return out

    want = reference(folder, [128], SamplingParams(seed=1), 120)  # silence: 128, exactly 0.0 here
    assert run(main()) == to_pcm16(s4.decode(want))
