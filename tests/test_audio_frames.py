"""Streamed audio in frames sized by time (issue 18, item 2): `frame_ms` (5-200 ms, default 20) on every
route that streams audio (WS /v1/stream, SSE /v1/generate); every frame but the last holds exactly
round(frame_ms × sample_rate / 1000) samples at the model's rate; frames are assembled on whole blocks
(media.AudioFramer, pcm16 by a lookup table) and are bit-identical to the per-sample path
(`to_pcm16(MuLaw.decode(ids))`, one id at a time); a bad value is an error naming the field and never
touches another session; the send side is timed in Prometheus."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random

import numpy as np
import pytest
from server_support import metric, reference, sse_events
from websockets.asyncio.client import connect

from model.codecs import Linear8, MuLaw, audio_codec, to_pcm16, wav_bytes
from model.sampling import SamplingParams
from server import media
from server.schemas import AudioStreamFields

AUDIO, TEXT = "tiny-audio", "tiny-text"
SILENCE = [MuLaw().silence]


def per_sample_pcm16(ids, codec: MuLaw) -> bytes:
    """The per-sample path: each id decoded and converted on its own (what the table must equal)."""
    return b"".join(to_pcm16(codec.decode([int(i)])) for i in ids)


def mulaw_float64(q: int, convention: str) -> float:
    """An independent scalar float64 expansion (the formulas of model/codecs.py's docstrings): mu-law in
    its convention, or ("linear") state-spaces/s4's linear dequantization q/128 − 1."""
    if convention == "linear":
        return q / 128 - 1
    f = q / 128 - 1 if convention == "s4" else 2 * q / 255 - 1
    return math.copysign(math.expm1(abs(f) * math.log1p(255)) / 255, f)


# --- the lookup table and the framer ------------------------------------------------------------


@pytest.mark.parametrize("convention", ["s4serve", "s4", "linear"])
def test_the_pcm16_table_is_the_per_sample_path_bit_for_bit(convention):
    codec = audio_codec("linear") if convention == "linear" else MuLaw(convention)  # (a table per codec)
    table = media.pcm16_table(codec)
    assert table.dtype == np.dtype("<i2") and table.shape == (256,)
    assert table.tobytes() == per_sample_pcm16(range(256), codec)  # each id alone: bit-identical
    # and against an independent float64 expansion: within one 16-bit step (the float32 rounding of
    # decode may move a value across a rounding boundary)
    want = np.array([round(mulaw_float64(q, convention) * 32767) for q in range(256)])
    assert np.abs(table.astype(np.int64) - want).max() <= 1
    rng = np.random.default_rng(0)
    for n in (1, 7, 160, 1000, 4097):  # whole blocks of any length: the same bytes as the block path
        ids = rng.integers(0, 256, n)
        assert media.audio_bytes(ids.tolist(), "pcm16", codec) == to_pcm16(codec.decode(ids))
        assert media.audio_bytes(ids.tolist(), "mulaw", codec) == bytes(ids.tolist())


@pytest.mark.parametrize(
    "ms,rate,samples",
    [(20, 8000, 160), (20, 16000, 320), (20, 44100, 882), (5, 8000, 40), (200, 16000, 3200), (7, 44100, 309),
     (5, 50, 1), (5, 99, 1), (5, 1, 1)],
)  # fmt: skip
def test_frame_samples_are_the_duration_at_the_rate(ms, rate, samples):
    """round(ms × rate / 1000) samples, at least one (the README's and the schema's rule): a model under
    100 Hz (its rate may be any from 1 Hz) has no 5 ms frame of samples."""
    assert media.frame_samples(ms, rate) == samples
    described = AudioStreamFields.model_fields["frame_ms"].description
    assert "round(frame_ms × sample_rate / 1000) samples, at least one" in described


@pytest.mark.parametrize("encoding", ["pcm16", "mulaw"])
def test_the_framer_cuts_blocks_of_any_size_into_whole_frames_and_flushes_the_rest(encoding):
    rnd = random.Random(1)
    codec = MuLaw()
    for n in (1, 40, 160, 333):
        framer = media.AudioFramer(n, encoding, codec)
        ids = [rnd.randrange(256) for _ in range(5000)]
        frames, i = [], 0
        while i < len(ids):  # blocks as the engine hands them over: 0 to several frames long
            k = rnd.choice([0, 1, 3, 8, 64, n - 1, n, n + 1, 3 * n + 2])
            frames += framer.feed(ids[i : i + k])
            i += k
        assert all(len(f) == n for f in frames)
        last = framer.flush()
        assert framer.flush() is None  # nothing twice
        if len(ids) % n:
            assert len(last) == len(ids) % n
            frames.append(last)
        else:
            assert last is None
        assert framer.frames == len(frames) and framer.total == len(ids)
        assert np.concatenate(frames).tolist() == ids
        data = b"".join(framer.encode(f) for f in frames)
        assert data == (bytes(ids) if encoding == "mulaw" else per_sample_pcm16(ids, codec))


def test_a_framer_needs_at_least_one_sample():
    with pytest.raises(ValueError, match="at least one sample"):
        media.AudioFramer(0)


# --- over the API -------------------------------------------------------------------------------


async def ws_generate(url: str, req: dict, encoding: str = "pcm16") -> tuple[dict, list[bytes], dict]:
    """One audio generation on a new socket: (audio_header, binary frames, done frame)."""
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "generate", "model": AUDIO, "audio_encoding": encoding, **req}))
        assert json.loads(await ws.recv())["type"] == "session"
        header = json.loads(await ws.recv())
        assert header["type"] == "audio_header", header
        frames = []
        while isinstance(m := await ws.recv(), bytes):
            frames.append(m)
        return header, frames, json.loads(m)


@pytest.mark.parametrize("ms,encoding", [(None, "pcm16"), (5, "mulaw"), (37, "pcm16"), (200, "mulaw")])
def test_websocket_frames_hold_frame_ms_of_samples_and_the_per_sample_bytes(server, model_dirs, ms, encoding):
    n_new = 1000
    req = {"max_new_tokens": n_new, "seed": 11} | ({} if ms is None else {"frame_ms": ms})
    header, frames, done = asyncio.run(ws_generate(server.ws_url, req, encoding))
    n = round((ms or 20) * 8000 / 1000)  # the tiny audio model runs at 8 kHz
    width = 2 if encoding == "pcm16" else 1
    assert header == {"type": "audio_header", "sample_rate": 8000, "encoding": encoding, "channels": 1,
                      "frame_ms": ms or 20, "frame_samples": n}  # fmt: skip
    sizes = [len(f) // width for f in frames]
    assert sizes[:-1] == [n] * (len(frames) - 1)  # every frame but the last: exactly n samples
    assert 0 < sizes[-1] <= n and sum(sizes) == n_new  # the last: the rest, flushed at the end
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == n_new
    want = reference(model_dirs["audio"], SILENCE, SamplingParams(seed=11), n_new)
    data = b"".join(frames)
    assert data == (bytes(want) if encoding == "mulaw" else per_sample_pcm16(want, MuLaw()))


def test_a_cancelled_stream_still_ends_with_its_last_partial_frame_and_loses_no_sample(server, model_dirs):
    async def main():
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "model": AUDIO, "audio_encoding": "mulaw",
                                      "max_new_tokens": 200_000, "seed": 8, "frame_ms": 15}))  # fmt: skip
            assert json.loads(await ws.recv())["type"] == "session"
            header = json.loads(await ws.recv())
            frames = [await ws.recv() for _ in range(3)]
            await ws.send(json.dumps({"type": "cancel"}))
            while isinstance(m := await ws.recv(), bytes):
                frames.append(m)
            return header, frames, json.loads(m)

    header, frames, done = asyncio.run(main())
    n = header["frame_samples"]
    assert n == 120 and all(isinstance(f, bytes) for f in frames)
    assert [len(f) for f in frames[:-1]] == [n] * (len(frames) - 1) and 0 < len(frames[-1]) <= n
    assert done["finish_reason"] == "cancelled"
    got = b"".join(frames)
    assert len(got) == done["usage"]["completion_tokens"] < 200_000  # every generated sample was sent
    assert list(got) == reference(model_dirs["audio"], SILENCE, SamplingParams(seed=8), len(got))


def test_sse_audio_events_are_frames_of_frame_ms(client, model_dirs):
    req = {"model": AUDIO, "max_new_tokens": 700, "seed": 2, "stream": True, "frame_ms": 25}
    with client.stream("POST", "/v1/generate", json=req) as r:
        assert r.status_code == 200
        events = sse_events(r)
    audio = [e for e in events if e["type"] == "audio"]
    assert [len(e["ids"]) for e in audio] == [200, 200, 200, 100]  # 25 ms at 8 kHz, then the rest
    for e in audio:
        assert base64.b64decode(e["audio"]) == per_sample_pcm16(e["ids"], MuLaw())
    want = reference(model_dirs["audio"], SILENCE, SamplingParams(seed=2), 700)
    assert sum((e["ids"] for e in audio), []) == want
    assert events[-1]["type"] == "done" and events[-1]["usage"]["completion_tokens"] == 700


BAD = [(4, "greater than or equal to 5"), (201, "less than or equal to 200"), (0, "greater than"),
       (-20, "greater than"), (20.5, "integer"), ("20", "integer"), (True, "integer"),
       (2**70, "less than")]  # fmt: skip


@pytest.mark.parametrize("value,needle", BAD)
def test_out_of_range_frame_ms_is_refused_naming_it_over_sse_and_http(client, value, needle):
    for stream in (True, False):
        r = client.post(
            "/v1/generate", json={"model": AUDIO, "max_new_tokens": 5, "stream": stream, "frame_ms": value}
        )
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["param"] == "frame_ms" and needle in err["message"], err


def test_frame_ms_where_it_means_nothing_is_refused_naming_it(client, server):
    not_streamed = {"model": AUDIO, "max_new_tokens": 5, "frame_ms": 20}
    r = client.post("/v1/generate", json=not_streamed)
    assert r.status_code == 422 and r.json()["error"]["param"] == "frame_ms"
    assert "streamed" in r.json()["error"]["message"]
    for stream in (True, False):
        r = client.post(
            "/v1/generate",
            json={"model": TEXT, "prompt": "a", "max_new_tokens": 5, "stream": stream, "frame_ms": 20},
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "frame_ms"
        assert "audio models only" in r.json()["error"]["message"]

    async def text_ws():
        async with connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "model": TEXT, "prompt": "a", "frame_ms": 20}))
            err = json.loads(await ws.recv())
            await ws.send(json.dumps({"type": "session", "model": AUDIO, "frame_ms": 20}))  # a generate field
            err2 = json.loads(await ws.recv())
            # audio_encoding for a text model: refused as frame_ms is (a trial found it taken silently),
            # binding nothing; the socket then binds the text model
            session = {"type": "session", "model": TEXT, "audio_encoding": "pcm16"}
            for msg in (
                session,
                {"type": "generate", "model": TEXT, "prompt": "a", "audio_encoding": "mulaw"},
            ):
                await ws.send(json.dumps(msg))
                err3 = json.loads(await ws.recv())
                assert err3["type"] == "error" and err3["code"] == 422, err3
                assert err3["param"] == "audio_encoding" and "audio models only" in err3["message"], err3
            await ws.send(json.dumps({"type": "session", "model": TEXT}))
            bound = json.loads(await ws.recv())
            return err, err2, bound

    err, err2, bound = asyncio.run(text_ws())
    assert err["type"] == "error" and err["code"] == 422 and err["param"] == "frame_ms"
    assert err2["type"] == "error" and err2["code"] == 422 and err2["param"] == "frame_ms"
    assert bound["type"] == "session" and bound["model"] == TEXT


def test_a_bad_frame_ms_gets_an_error_frame_and_never_touches_another_session(server, model_dirs):
    """Socket A streams 3,000 samples in 20 ms frames while socket B sends every bad value (each an
    error frame naming frame_ms, the socket still usable) and then streams in 5 ms frames itself: A's
    frames and samples are exactly what A alone gets, and B's good request works after its bad ones."""
    n_a, n_b = 3000, 400

    async def main():
        async def a():
            return await ws_generate(server.ws_url, {"max_new_tokens": n_a, "seed": 21, "frame_ms": 20})

        async def b():
            async with connect(server.ws_url) as ws:
                await ws.send(json.dumps({"type": "session", "model": AUDIO, "audio_encoding": "mulaw"}))
                assert json.loads(await ws.recv())["type"] == "session"
                errors = []
                for value, _ in BAD:
                    await ws.send(json.dumps({"type": "generate", "max_new_tokens": 50, "frame_ms": value}))
                    errors.append(json.loads(await ws.recv()))
                    await asyncio.sleep(0)
                await ws.send(
                    json.dumps({"type": "generate", "max_new_tokens": n_b, "seed": 22, "frame_ms": 5})
                )
                header = json.loads(await ws.recv())
                frames = []
                while isinstance(m := await ws.recv(), bytes):
                    frames.append(m)
                return errors, header, frames, json.loads(m)

        return await asyncio.gather(a(), b())

    (header_a, frames_a, done_a), (errors, header_b, frames_b, done_b) = asyncio.run(main())
    for err, (_, needle) in zip(errors, BAD):
        assert err["type"] == "error" and err["code"] == 422 and err["param"] == "frame_ms", err
        assert needle in err["message"]
    assert header_a["frame_samples"] == 160 and [len(f) for f in frames_a] == [320] * 18 + [240]
    want_a = reference(model_dirs["audio"], SILENCE, SamplingParams(seed=21), n_a)
    assert b"".join(frames_a) == per_sample_pcm16(want_a, MuLaw()) and done_a["type"] == "done"
    assert header_b["frame_samples"] == 40 and [len(f) for f in frames_b] == [40] * 10  # mulaw: 1 byte each
    assert list(b"".join(frames_b)) == reference(model_dirs["audio"], SILENCE, SamplingParams(seed=22), n_b)
    assert done_b["usage"]["completion_tokens"] == n_b


def test_frames_are_timed_on_the_send_side_in_prometheus(client, server):
    name = "s4_audio_frame_interval_seconds_count"
    before = metric(client, name, AUDIO), metric(client, "s4_audio_stream_realtime_ratio_count", AUDIO)
    _, frames, _ = asyncio.run(ws_generate(server.ws_url, {"max_new_tokens": 810, "seed": 3, "frame_ms": 10}))
    assert len(frames) == 11  # 80 samples a frame: 10 whole, and 10 samples left
    after = metric(client, name, AUDIO), metric(client, "s4_audio_stream_realtime_ratio_count", AUDIO)
    assert after[0] - before[0] == len(frames) - 1  # one interval between two frames of the stream
    assert after[1] - before[1] == 1  # one finished stream
    assert metric(client, "s4_audio_stream_realtime_ratio_sum", AUDIO) > 0


def test_sse_frames_are_timed_on_the_send_side_as_the_websockets_are(client):
    """An audio stream over SSE moves the same send-side metrics as one over the WebSocket: N frames,
    N - 1 intervals, one real-time factor (they were measured on the WebSocket only)."""
    name = "s4_audio_frame_interval_seconds_count"
    before = metric(client, name, AUDIO), metric(client, "s4_audio_stream_realtime_ratio_count", AUDIO)
    req = {"model": AUDIO, "max_new_tokens": 810, "seed": 3, "stream": True, "frame_ms": 10}
    with client.stream("POST", "/v1/generate", json=req) as r:
        assert r.status_code == 200
        events = sse_events(r)
    frames = [e for e in events if e["type"] == "audio"]
    assert len(frames) == 11 and events[-1]["type"] == "done"  # 80 samples a frame: 10 whole, 10 left
    after = metric(client, name, AUDIO), metric(client, "s4_audio_stream_realtime_ratio_count", AUDIO)
    assert after[0] - before[0] == len(frames) - 1
    assert after[1] - before[1] == 1


# --- the benchmark's measures (bench/audio_streams.py) --------------------------------------------


def test_the_benchmark_measures_jitter_real_time_and_the_playout_buffer():
    from bench.audio_streams import stream_stats

    rate, n = 8000, 160  # 20 ms frames
    on_time = [1.0 + 0.02 * k for k in range(50)]
    s = stream_stats(0.99, on_time, [n] * 50, rate)
    assert s["first_frame_ms"] == pytest.approx(10) and s["samples"] == 50 * n
    assert s["realtime_factor"] == pytest.approx(1) and s["buffer_ms"] == pytest.approx(0, abs=1e-9)
    assert s["jitter_p99_ms"] == pytest.approx(0, abs=1e-9)
    late = list(on_time)
    late[10] += 0.030  # one frame 30 ms late: two intervals off by 30 ms, the buffer must cover it
    s = stream_stats(0.99, late, [n] * 50, rate)
    assert s["jitter_p99_ms"] == pytest.approx(30) and s["late_p99_ms"] == pytest.approx(30)
    assert s["jitter_p50_ms"] == pytest.approx(0, abs=1e-9) and s["buffer_ms"] == pytest.approx(30)
    half = [1.0 + 0.04 * k for k in range(50)]  # half real time: the buffer grows with the stream
    s = stream_stats(0.99, half, [n] * 50, rate)
    assert s["realtime_factor"] == pytest.approx(0.5) and s["buffer_ms"] == pytest.approx(49 * 20)
    assert s["jitter_p50_ms"] == pytest.approx(20)
    early = [1.0 + 0.005 * k for k in range(49)] + [1.25]  # 4x real time, then a short last frame
    s = stream_stats(0.99, early, [n] * 49 + [40], rate)
    assert s["realtime_factor"] == pytest.approx((48 * n + 40) / rate / 0.25)
    assert s["buffer_ms"] == pytest.approx(0, abs=1e-9) and s["late_p99_ms"] == 0


def test_the_benchmark_client_reads_concurrent_streams(server):
    from bench.audio_streams import run_streams

    row = asyncio.run(run_streams(server.ws_url, AUDIO, 3, 500, 10))
    assert row["streams"] == 3 and row["sample_rate"] == 8000 and row["frame_samples"] == 80
    assert [s["samples"] for s in row["per_stream"]] == [500] * 3
    assert all(s["frames"] == 7 and s["frame_samples_max"] == 80 for s in row["per_stream"])
    assert row["samples_per_s"] > 0 and 0 <= row["realtime_share"] <= 1


def test_the_benchmark_client_spreads_the_starts_when_asked(server):
    """spread_s: stream k sends its request spread_s × Random(k).random() after the others are bound, so
    the run, from the first request to the last frame, lasts at least the largest offset less the smallest
    (here 1.9 − 0.27 s; 300 samples take a fraction of that)."""
    import random

    from bench.audio_streams import run_streams

    offsets = [2.0 * random.Random(k).random() for k in range(3)]
    row = asyncio.run(run_streams(server.ws_url, AUDIO, 3, 300, 10, spread_s=2.0))
    assert [s["samples"] for s in row["per_stream"]] == [300] * 3
    assert row["wall_s"] >= max(offsets) - min(offsets) > 1.5


@pytest.mark.parametrize("codec", [MuLaw(), MuLaw("s4"), Linear8()], ids=lambda c: c.name)
def test_every_ids_pcm16_comes_back_as_that_id(codec):
    """All 256 ids → the server's pcm16 (`pcm16_table`, = to_pcm16 of the decode) → ids again, over both
    ways in (WebSocket pcm16 frames; a 16-bit WAV prompt_audio at the model's rate) gives the ids. In the
    "s4" mu-law convention and linear quantization 127 came back one lower (an audit). The int16 → id
    table is non-decreasing, within one id of the codec's encode everywhere, and is its encode in our
    "s4serve" convention."""
    ids = np.arange(256)
    pcm = media.pcm16_table(codec)
    assert media.audio_frame_ids(pcm.tobytes(), "pcm16", codec) == ids.tolist()
    wav = base64.b64encode(wav_bytes(codec.decode(ids), 8000)).decode()
    assert media.prompt_ids("audio", 8000, None, wav, codec=codec) == ids.tolist()
    table = media.pcm16_ids(codec)
    encoded = codec.encode(np.arange(-32768, 32768, dtype=np.float32) / 32768)
    assert (np.diff(table) >= 0).all() and np.abs(table - encoded).max() <= 1
    assert np.array_equal(table, encoded) == (codec == MuLaw())
    x = np.array([0.1, -0.3, 0.123456, 0.5 + 1 / 65536])  # not 16-bit values: the codec's own encode
    assert media.encode_samples(x, codec).tolist() == codec.encode(x.astype(np.float32)).tolist()
