"""Prompt audio in: any file libsndfile reads (model.codecs.read_audio), resampled by soxr, header
fields checked before anything is decoded; the model's silence (MuLaw.silence) as the start of audio
generation without a prompt."""

from __future__ import annotations

import base64
import io
import struct
import sys

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.codecs import (
    MAX_CHANNELS,
    MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
    AudioTooLong,
    AudioTruncated,
    MuLaw,
    NonFiniteAudio,
    NoSamples,
    TrailingData,
    read_audio,
    wav_bytes,
)
from model.data import AUDIO_BOS


def tone(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)


def encoded(x: np.ndarray, rate: int, fmt: str, subtype: str, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    data = np.repeat(x[:, None], channels, axis=1) if channels > 1 else x
    soundfile.write(buf, data, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_the_models_silence_is_the_mulaw_code_of_zero():
    m = MuLaw()
    assert m.silence == int(m.encode(0.0)) == 128 == AUDIO_BOS  # every training clip's first input
    # 256 codes have no exact zero: 128 and 127 are the two codes nearest 0.0, symmetric about it
    levels = m.decode(np.arange(256)).astype(np.float64)
    assert abs(levels[128]) == pytest.approx(np.abs(levels).min(), rel=1e-6) and levels[128] > 0
    assert levels[128] == pytest.approx(-levels[127], rel=1e-6) and levels[128] < 1e-4


@pytest.mark.parametrize(
    "fmt,subtype,tol",
    [
        ("WAV", "PCM_U8", 1 / 128),
        ("WAV", "PCM_16", 1 / 32768),
        ("WAV", "PCM_24", 2**-23),
        ("WAV", "PCM_32", 2**-31 * 2),
        ("WAV", "FLOAT", 1e-7),
        ("WAV", "DOUBLE", 1e-7),
        ("FLAC", "PCM_16", 1 / 32768),
        ("FLAC", "PCM_24", 2**-23),
        ("OGG", "VORBIS", 0.05),  # lossy: checked loosely, and by its spectrum below
        ("MP3", "MPEG_LAYER_III", 0.1),
    ],
)
def test_prompt_formats_decode_to_the_same_samples(fmt, subtype, tol):
    x = tone(440, 8000, 0.5)
    y, rate = read_audio(encoded(x, 8000, fmt, subtype), 8000, 30)
    assert rate == 8000 and y.dtype == np.float32 and len(y) == len(x)
    assert np.abs(y - x).max() <= tol + 1e-7
    # the tone's frequency is where the spectrum peaks (lossy codecs included)
    assert np.argmax(np.abs(np.fft.rfft(y))) * 8000 / len(y) == pytest.approx(440, abs=2)


def test_opus_and_stereo_prompts_are_read_and_downmixed():
    x = tone(440, 48000, 0.5)
    y, rate = read_audio(encoded(x, 48000, "OGG", "OPUS"), 8000, 30)
    assert rate == 8000 and abs(len(y) - 4000) <= 1
    assert np.argmax(np.abs(np.fft.rfft(y))) * 8000 / len(y) == pytest.approx(440, abs=4)
    # stereo: the mean of the channels (here equal, so the tone itself)
    z, _ = read_audio(encoded(x[:8000], 8000, "WAV", "PCM_16", channels=2), 8000, 30)
    assert np.abs(z - x[:8000]).max() < 1e-4


def _level_db(y: np.ndarray, freq: float, rate: int) -> float:
    """The amplitude of `freq` in y, in dB relative to full scale (a Hann-windowed DFT bin)."""
    w = np.hanning(len(y))
    spec = np.abs(np.fft.rfft(y * w)) / (w.sum() / 2)
    k = round(freq * len(y) / rate)
    return 20 * np.log10(spec[max(k - 2, 0) : k + 3].max() + 1e-12)


def test_resampling_filters_out_what_is_above_the_new_nyquist_instead_of_aliasing_it():
    """44.1 kHz → 8 kHz: a 6 kHz tone (above the 4 kHz Nyquist frequency) must be removed, not folded
    down to 8 - 6 = 2 kHz as linear interpolation does; a 1 kHz tone must come through unchanged."""
    rate = 44100
    y, r = read_audio(wav_bytes(tone(6000, rate, 1.0), rate), 8000, 30)
    assert r == 8000 and len(y) == 8000
    assert _level_db(y, 2000, 8000) < -60  # no alias at 2 kHz (a 0.5 tone is -6 dB)
    # nothing else either, away from the edges (the tone starts and stops abruptly: a click there)
    assert np.sqrt(np.mean(y[100:-100] ** 2)) < 1e-3  # the input's RMS is 0.35
    # linear interpolation (the old server/media.resample) puts it at 2 kHz, barely attenuated
    x = tone(6000, rate, 1.0)
    lin = np.interp(np.arange(8000) * (rate / 8000), np.arange(len(x)), x)
    assert _level_db(lin, 2000, 8000) > -20

    y, _ = read_audio(wav_bytes(tone(1000, rate, 1.0), rate), 8000, 30)
    assert np.argmax(np.abs(np.fft.rfft(y))) * 8000 / len(y) == pytest.approx(1000, abs=1)
    assert _level_db(y, 1000, 8000) == pytest.approx(20 * np.log10(0.5), abs=0.1)
    # and up: 8 kHz → 16 kHz keeps the tone and the length
    y, r = read_audio(wav_bytes(tone(1000, 8000, 0.5), 8000), 16000, 30)
    assert r == 16000 and len(y) == 8000
    assert np.argmax(np.abs(np.fft.rfft(y))) * 16000 / len(y) == pytest.approx(1000, abs=2)


def test_the_length_limit_is_checked_on_the_header_before_decoding(monkeypatch):
    too_long = wav_bytes(np.zeros(88200), 44100)  # 2 s at 44.1 kHz
    at_limit = wav_bytes(np.zeros(66150), 44100)  # 1.5 s
    # exactly at the limit: accepted, and the resampled length is the limit in samples
    y, _ = read_audio(at_limit, 8000, 1.5)
    assert len(y) == 12000
    # over it: refused from the header (frames / sample rate), before a sample is decoded
    decoded = []
    real_read = soundfile.SoundFile.read
    monkeypatch.setattr(soundfile.SoundFile, "read", lambda *a, **k: decoded.append(1) or real_read(*a, **k))
    with pytest.raises(
        AudioTooLong, match=r"2\.000 s long: 88200 frames at 44100 Hz; the limit is 1\.5 s"
    ) as exc:
        read_audio(too_long, 8000, 1.5)
    assert decoded == [] and exc.value.seconds == 2.0
    # a FLAC header whose STREAMINFO claims 2^35 samples over 800 real ones: refused from the header
    flac = bytearray(encoded(tone(440, 8000, 0.1), 8000, "FLAC", "PCM_16"))
    info = int.from_bytes(flac[18:26], "big")  # after "fLaC" and the block header: bits 28-63 = samples
    flac[18:26] = ((info & ~(2**36 - 1)) | 2**35).to_bytes(8, "big")
    with pytest.raises(AudioTooLong, match="4294967.296 s long"):
        read_audio(bytes(flac), 8000, 30)
    assert decoded == []
    # libsndfile clamps a header's data size to the bytes present: a header claiming 4 GiB of samples
    # over 128 bytes of data gives 32 frames, not a 4 GiB allocation
    y, _ = read_audio(wav_header(2, 8000, 16, 2**32 - 64) + bytes(128), 8000, 30)
    assert len(y) == 32


def test_the_length_limit_in_samples_is_the_decimal_seconds_times_the_rate():
    """max_audio_s 0.29 at 48 kHz is 13,920 samples; the float product 0.29 × 48000 is 13919.999999999998,
    which floor made 13,919: a file of exactly 0.29 s was refused ("0.290 s long: 13920 samples ...; the
    limit is 0.29 s: 13919 samples"), and so was max_new_tokens 13,920. 545 of the settings 0.01 … 29.99 s
    at the six usual rates were one sample short. Now every one is floor(seconds × rate) of the decimal the
    setting is written in, exact: in read_audio's check, AudioTooLong's counts and Settings.audio_samples
    (the prompt and max_new_tokens limits)."""
    from server import Settings

    for cs in range(1, 3000, 7):  # centiseconds
        settings = Settings(max_audio_s=cs / 100)
        for rate in (8000, 11025, 16000, 22050, 44100, 48000):
            assert settings.audio_samples(rate) == cs * rate // 100, (cs, rate)
    exact = wav_bytes(np.zeros(13920), 48000)  # 0.29 s
    assert len(read_audio(exact, None, 0.29)[0]) == 13920
    with pytest.raises(
        AudioTooLong, match=r"13921 samples at 48000 Hz; the limit is 0\.29 s: 13920 samples$"
    ):
        read_audio(wav_bytes(np.zeros(13921), 48000), None, 0.29)
    # resampled: 0.35 s at 44.1 kHz is 15,435 frames, 2,800 samples at 8 kHz (0.35 × 8000 = 2800 exactly)
    assert len(read_audio(wav_bytes(np.zeros(15435), 44100), 8000, 0.35)[0]) == 2800
    with pytest.raises(AudioTooLong, match=r"the limit is 0\.35 s: 15435 frames at that rate \(2800 samples"):
        read_audio(wav_bytes(np.zeros(15436), 44100), 8000, 0.35)
    exact = wav_bytes(np.zeros(30429), 44100)  # 0.69 s at 44.1 kHz: 30,429 (float: 30428.999999999996)
    assert len(read_audio(exact, None, 0.69)[0]) == 30429


def wav_header(channels: int, rate: int, bits: int, data_bytes: int, fmt_tag: int = 1) -> bytes:
    """A canonical 44-byte PCM WAV header (fields as given, unchecked) followed by no data."""
    block = (channels * bits // 8) & 0xFFFF
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
    riff_size = min(36 + data_bytes, 2**32 - 1)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + (b"data" + struct.pack("<I", data_bytes))
    )


@pytest.mark.parametrize(
    "channels,rate,field",
    [(1, 100, "sample rate"), (1, MAX_SAMPLE_RATE + 1, "sample rate"), (MAX_CHANNELS + 1, 8000, "channels")],
)
def test_header_fields_out_of_range_are_named(channels, rate, field):
    data = wav_header(channels, rate, 16, 2 * channels * 10) + b"\x00" * (2 * channels * 10)
    with pytest.raises(ValueError, match=f"^{field}: "):
        read_audio(data, 8000, 30)


def test_refusals_say_what_is_wrong_in_samples_and_words_and_print_nothing(monkeypatch):
    """A prompt one sample over the limit read "the audio is 2.000 s long; the limit is 2 s": the counts
    now show it over. A truncated MP3 was "File does not exist or is not a regular file (possibly a
    pipe?)", libsndfile's words for a file system: now that the data could not be decoded. A 30-byte AIFF
    printed "Exception ignored from cffi callback ... vio_seek ... negative seek value -1" (our bytes
    raised inside soundfile's virtual IO): now nothing. (An audit.)"""
    with pytest.raises(AudioTooLong) as e:
        read_audio(wav_bytes(np.zeros(16001), 8000), 8000, 2)
    assert (
        str(e.value) == "the audio is 2.000 s long: 16001 samples at 8000 Hz; the limit is 2 s: 16000 samples"
    )
    assert len(read_audio(wav_bytes(np.zeros(16000), 8000), 8000, 2)[0]) == 16000
    with pytest.raises(AudioTooLong, match=r"66151 frames at 44100 Hz; the limit is 1\.5 s: 66150 frames at "
                       r"that rate \(12000 samples at 8000 Hz\)$"):  # fmt: skip
        read_audio(wav_bytes(np.zeros(66151), 44100), 8000, 1.5)
    mp3 = encoded(tone(440, 8000, 1.0), 8000, "MP3", "MPEG_LAYER_III")
    with pytest.raises(ValueError) as e:
        read_audio(mp3[: len(mp3) // 3], 8000, 30)
    assert str(e.value).endswith("the data could not be decoded (a damaged or truncated file?)"), e.value
    assert "File does not exist" not in str(e.value) and "pipe" not in str(e.value)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    aiff = encoded(tone(440, 8000, 0.1), 8000, "AIFF", "PCM_16")
    for n in (30, 36, 42):
        with pytest.raises(ValueError, match="the data could not be decoded"):
            read_audio(aiff[:n], 8000, 30)
    assert unraisable == []


def _set(data: bytes, at: int, value: int, order: str = "little") -> bytes:
    return data[:at] + value.to_bytes(4, order) + data[at + 4 :]


def test_a_truncated_wav_or_aiff_is_refused_saying_how_much_is_there():
    """A WAV or AIFF whose header declares more sample data than the file holds was read as the part
    that is there, silently (the first 37 % of an 8,000-frame WAV: 2,946 samples; an audit): AudioTruncated
    now says how many of the declared frames are there (a compressed WAV: its fact chunk's)."""
    x = tone(440, 8000, 1.0)
    with pytest.raises(AudioTruncated, match=r"^the audio is truncated: 2946 of 8000 frames") as e:
        read_audio(wav_bytes(x, 8000)[: 44 + 2 * 2946], 8000, 30)
    assert (e.value.frames, e.value.declared) == (2946, 8000)
    for fmt, subtype, cut, want in [
        ("AIFF", "PCM_16", 2 * 5000, "3000 of 8000"),
        ("WAV", "ULAW", 5000, "3000 of 8000"),
        ("WAV", "FLOAT", 4 * 5000, "3000 of 8000"),
        ("WAV", "IMA_ADPCM", 2000, "of 8080 frames"),
    ]:
        data = encoded(x, 8000, fmt, subtype)
        assert len(read_audio(data, 8000, 30)[0]) == (8080 if subtype == "IMA_ADPCM" else 8000)
        with pytest.raises(AudioTruncated, match=want):
            read_audio(data[:-cut], 8000, 30)


def test_streamed_headers_of_unknown_length_read_to_the_end_of_the_file():
    """Writers that cannot seek back leave the sizes unknown: ffmpeg 0xFFFFFFFF, `sox -t wav -`
    0x7FFFF000 (RIFF 0x7FFFF024), sox's AIFF an SSND of 0x7F000008 and a COMM of 0x3F800000 frames, others
    0: all are read to the end of the file, not refused as truncated. A WAV data size of 0 followed by
    audio was read as no frames (generation then started from silence: an audit); an empty data chunk
    followed by another chunk is still empty."""
    x = tone(440, 8000, 0.5)
    wav = wav_bytes(x, 8000)
    want = read_audio(wav, 8000, 30)[0]
    assert len(want) == 4000
    for riff, size in [(0xFFFFFFFF, 0xFFFFFFFF), (0x7FFFF024, 0x7FFFF000), (0, 0), (36, 0), (0xFFFFFFFF, 0)]:
        y, _ = read_audio(_set(_set(wav, 4, riff), 40, size), 8000, 30)
        assert np.array_equal(y, want), (hex(riff), hex(size))
    aiff = encoded(x, 8000, "AIFF", "PCM_16")
    ssnd, comm = aiff.index(b"SSND"), aiff.index(b"COMM")
    piped = _set(
        _set(_set(aiff, 4, 0x7F000050, "big"), ssnd + 4, 0x7F000008, "big"), comm + 10, 0x3F800000, "big"
    )
    assert np.array_equal(read_audio(piped, 8000, 30)[0], read_audio(aiff, 8000, 30)[0])
    empty = wav_bytes(np.zeros(0), 8000)
    listed = _set(empty, 4, 36 + 12) + b"LIST" + struct.pack("<I", 4) + b"INFO"
    assert len(read_audio(listed, 8000, 30)[0]) == 0 and len(read_audio(empty, 8000, 30)[0]) == 0


def test_frames_that_resample_to_no_sample_are_refused():
    """One frame at 44.1 kHz is no sample at 8 kHz: NoSamples (it gave an empty prompt, so generation
    started from silence: an audit). At its own rate it is one sample."""
    one = encoded(np.array([0.5]), 44100, "WAV", "PCM_16")
    with pytest.raises(NoSamples, match=r"^the audio holds no samples at 8000 Hz \(1 frame at 44100 Hz\)"):
        read_audio(one, 8000, 30)
    assert len(read_audio(one, 44100, 30)[0]) == 1


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_or_infinite_float_sample_is_refused_naming_where(subtype, bad):
    """Float WAV samples NaN and ±inf were read as silence (nan_to_num) or full scale, silently (a
    fresh-user trial): a ValueError (NonFiniteAudio) now names the value, the frame and the channel,
    in any read block. Finite samples beyond ±1 are still clipped."""
    for frames, at, channels in [(1000, 7, 1), (40_000, 35_000, 2)]:  # the second: past the first block
        x = np.repeat(tone(440, 8000, frames / 8000)[:, None], channels, axis=1)
        x[at, channels - 1] = bad
        buf = io.BytesIO()
        soundfile.write(buf, x, 8000, format="WAV", subtype=subtype)
        with pytest.raises(NonFiniteAudio) as e:
            read_audio(buf.getvalue(), 8000, 30)
        assert f"{bad} at frame {at}, channel {channels - 1}" in str(e.value)
        assert str(e.value).startswith("the audio data holds a sample that is not a finite number")
    loud = encoded(np.array([0.0, 3.0, -3e38, 0.5]), 8000, "WAV", subtype, channels=4)
    y, _ = read_audio(loud, 8000, 30)  # four equal channels of -3e38 do not overflow the mean
    assert y.tolist() == [0.0, 1.0, -1.0, 0.5]


VALID = [
    wav_bytes(tone(440, 8000, 0.01), 8000),
    encoded(tone(440, 44100, 0.01), 44100, "WAV", "PCM_24"),
    encoded(tone(440, 16000, 0.01), 16000, "WAV", "FLOAT", channels=2),
    encoded(tone(440, 8000, 0.05), 8000, "FLAC", "PCM_16"),
    _set(encoded(tone(440, 8000, 0.05), 8000, "FLAC", "PCM_16"), 22, 0, "big"),  # (a length unknown: 0)
]


def _check(data: bytes) -> None:
    """read_audio either returns bounded, finite samples or raises a ValueError with a message."""
    try:
        y, rate = read_audio(data, 8000, 2.0)
    except ValueError as exc:
        assert str(exc), "a refusal must say why"
        return
    assert rate == 8000 and y.dtype == np.float32 and y.ndim == 1
    assert len(y) <= 16000 + 1 and np.isfinite(y).all() and np.abs(y).max(initial=0) <= 1.0 + 1e-6


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_arbitrary_bytes_are_refused_with_a_value_error(data):
    _check(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, 200)),
)
def test_mutated_valid_headers_are_refused_or_read_within_bounds(valid, edits, cut):
    """Random byte edits in the first 64 bytes (RIFF sizes, format tag, channels, rate, bits, chunk
    sizes), optionally truncated: never a crash, a non-ValueError or an unbounded result."""
    data = bytearray(valid)
    for pos, value in edits:
        data[pos] = value
    _check(bytes(data if cut is None else data[: 44 + cut]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64, 65535]),
    st.integers(0, 2**32 - 1),
)
def test_any_wav_header_fields_are_validated_before_allocation(fmt_tag, channels, rate, bits, size):
    """Every combination of the fields a WAV header gives: refused with the field named, or read
    within the limit (2 s at 8 kHz), never a crash or an allocation the size of the claimed data."""
    data = wav_header(channels, rate, bits, size, fmt_tag) + b"\x01\x02" * 64
    try:
        y, r = read_audio(data, 8000, 2.0)
    except ValueError as exc:
        msg = str(exc)
        assert msg.startswith(("sample rate: ", "channels: ", "frames: ", "not an audio file", "the audio"))
        assert " object at 0x" not in msg and "BytesIO" not in msg  # libsndfile's reason, not our objects
        return
    assert r == 8000 and len(y) <= 16000 + 1
    assert MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE and 1 <= channels <= MAX_CHANNELS


def _mpeg_frames(mp3: bytes) -> list[tuple[bytes, int]]:
    """An MP3's MPEG-1/2/2.5 layer III frames as (bytes, kbit/s), by their headers' own arithmetic."""
    kbps = {True: (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
            False: (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}  # fmt: skip
    out, p = [], 0
    while p + 4 <= len(mp3):
        h = int.from_bytes(mp3[p : p + 4], "big")
        version, index, pad = (h >> 19) & 3, (h >> 12) & 15, (h >> 9) & 1
        assert h >> 21 == 0x7FF and (h >> 17) & 3 == 1, "a layer III frame header"
        rate = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}[version][
            (h >> 10) & 3
        ]
        k = kbps[version == 3][index - 1]
        size = (144_000 if version == 3 else 72_000) * k // rate + pad
        out.append((mp3[p : p + size], k))
        p += size
    assert p == len(mp3)
    return out


def test_an_mp3_without_a_length_header_is_read_whole_or_refused_never_cut_short_silently():
    """libsndfile counts an MP3's frames from its Xing/Info header or, without one, estimates them from the
    first frame's bitrate and reads no further: a VBR MP3 without the header (older encoders, `lame -t`,
    a stream cut from a broadcast) was read as 23-51 % of its length, silently (an audit: 3 s of audio at
    8 kHz read as 12,240 of its 25,344 samples). It is refused now, saying why; one whose bitrate is
    constant (the estimate is exact) is read whole, and so is one with its length header."""
    from server.errors import APIError
    from server.media import prompt_ids

    rng = np.random.default_rng(0)
    x = np.concatenate([0.5 * rng.standard_normal(8000).clip(-1, 1), np.zeros(8000), tone(440, 8000, 1.0)])
    mp3 = encoded(x, 8000, "MP3", "MPEG_LAYER_III")  # VBR, with a Xing header in its first frame
    frames = _mpeg_frames(mp3)
    assert b"Xing" in frames[0][0] and len({k for _, k in frames[1:]}) > 1  # (the bitrate varies)
    assert len(read_audio(mp3, 8000, 30)[0]) == 24000
    bare = b"".join(f for f, _ in frames[1:])  # the same stream without its length header
    walked = 576 * (len(frames) - 1)
    with pytest.raises(ValueError) as e:
        read_audio(bare, 8000, 30)
    assert str(e.value).startswith(
        f"an MP3 without a length header (a Xing, Info or VBRI frame) whose bitrate varies: its "
        f"{len(frames) - 1} MPEG frames hold {walked} samples, but libsndfile estimates "
    ), e.value
    with pytest.raises(ValueError, match="whose bitrate varies"):  # an ID3v1 tag after it changes nothing
        read_audio(bare + b"TAG" + bytes(125), 8000, 30)
    with pytest.raises(APIError) as api:
        prompt_ids("audio", 8000, None, base64.b64encode(bare).decode(), 30, 240000)
    assert api.value.status == 422 and api.value.param == "prompt_audio" and "Xing" in api.value.message
    # constant bitrate without the header: the estimate is the count, and it is read whole
    common = max({k for _, k in frames[1:]}, key=[k for _, k in frames[1:]].count)
    cbr = [f for f, k in frames[1:] if k == common]
    y, _ = read_audio(b"".join(cbr), 8000, 30)
    assert len(y) == 576 * len(cbr) and len(cbr) > 5


def test_a_flac_of_unknown_length_is_read_whole_and_held_to_the_limit_from_its_frames():
    """A FLAC whose STREAMINFO gives 0 samples ("unknown": libFLAC writing to a pipe leaves it so,
    `... | sox -t raw ... - -t flac - | ...`) was refused, "frames: the header gives no usable frame count
    (9223372036854775807)" (an audit; libsndfile itself reads such a file only as far as its first blocks).
    Its length is now found from its last frame (the frame header whose CRC-16 ends the file), so it is
    read whole, and one over the limit is a 413 from that length, before anything is decoded."""
    from server.errors import APIError
    from server.media import prompt_ids

    def unknown_length(data: bytes) -> bytes:
        flac = bytearray(data)
        info = int.from_bytes(flac[18:26], "big")  # bits 28-63 after "fLaC" and the block header: samples
        assert info & (2**36 - 1)
        flac[18:26] = (info & ~(2**36 - 1)).to_bytes(8, "big")
        return bytes(flac)

    cases = [
        (44100, 1.0, "PCM_16", 1),
        (8000, 0.77, "PCM_24", 2),
        (16000, 0.3, "PCM_16", 6),
        (8000, 0.01, "PCM_16", 1),
    ]
    for rate, seconds, subtype, channels in cases:
        whole = encoded(tone(440, rate, seconds), rate, "FLAC", subtype, channels)
        for target in (rate, 8000):
            y, r = read_audio(unknown_length(whole), target, 30)
            assert r == target and np.array_equal(y, read_audio(whole, target, 30)[0]), (rate, subtype)
    # over the limit: refused from the length found, before a sample is decoded
    piped = unknown_length(encoded(tone(440, 8000, 3.0), 8000, "FLAC", "PCM_16"))
    with pytest.raises(AudioTooLong, match=r"^the audio is 3\.000 s long: 24000 samples at 8000 Hz"):
        read_audio(piped, 8000, 2.0)
    with pytest.raises(APIError) as api:
        prompt_ids("audio", 8000, None, base64.b64encode(piped).decode(), 2.0, 16000)
    assert api.value.status == 413 and api.value.param == "prompt_audio"
    # a file whose last frame cannot be found (bytes after it) is still refused, naming the frame count
    with pytest.raises(ValueError, match="^frames: the header gives no usable frame count"):
        read_audio(piped + b"junk", 8000, 30)


def test_resampling_streams_block_by_block_exactly_as_one_shot_and_matches_the_analytic_signal():
    """The decoded audio is resampled block by block as it is decoded, so memory is the output at the
    model's rate, not the file's: 20 s of 384 kHz silence, a 26 KB FLAC, peaked at 59 MB (two buffers
    of 7.7 M samples; at S4_MAX_AUDIO_S=3600 a 4.7 MB FLAC asked for 11 GB: an audit). The samples are
    bit for bit soxr's one-shot resampling of the whole mono signal, and within 1e-4 of the analytic
    float64 signal at the new rate (soxr HQ), with the same mu-law ids."""
    import tracemalloc

    import soxr

    silence = encoded(np.zeros(384000 * 20), 384000, "FLAC", "PCM_16")
    assert len(silence) < 64_000
    tracemalloc.start()
    try:
        y, _ = read_audio(silence, 8000, 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(y) == 160_000 and not y.any()
    assert peak < 8 * 2**20, peak  # the 640 KB output, its blocks, one decode block (it was 59 MB)
    for rate, channels in [(44100, 2), (48000, 1), (11025, 1), (384000, 3)]:
        t = np.arange(round(rate * 2.5)) / rate  # (several read blocks)
        x = 0.5 * np.sin(2 * np.pi * 1000 * t + 0.3) + 0.2 * np.sin(2 * np.pi * 3000 * t)
        data = encoded(x, rate, "WAV", "DOUBLE", channels)
        y, r = read_audio(data, 8000, 30)
        whole = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)[0].mean(
            axis=1, dtype=np.float64
        )
        one_shot = soxr.resample(np.clip(whole.astype(np.float32), -1, 1), rate, 8000, quality="HQ")
        assert r == 8000 and np.array_equal(y, np.clip(one_shot, -1, 1)), rate
        t8 = np.arange(len(y)) / 8000
        ref = 0.5 * np.sin(2 * np.pi * 1000 * t8 + 0.3) + 0.2 * np.sin(2 * np.pi * 3000 * t8)
        assert len(y) == 20_000 and np.abs(y - ref)[400:-400].max() < 1e-4, rate  # (away from the edges)
        assert np.array_equal(MuLaw().encode(y)[400:-400], MuLaw().encode(ref)[400:-400]), rate


@pytest.mark.parametrize("subtype,rate", [("VORBIS", 8000), ("OPUS", 48000)])
def test_a_chained_ogg_is_refused_not_cut_to_its_first_stream(subtype, rate):
    """OGG files joined end to end (`cat a.ogg b.ogg`, a radio stream's dump) are one chained file of
    several logical streams; libsndfile reads the first and stops, so the rest was dropped, silently (an
    audit: 2 s + 0.5 s of Vorbis read as the first 2 s). Refused now, saying why; each part alone is read
    whole, and a prompt of them is a 422 naming prompt_audio."""
    from server.errors import APIError
    from server.media import prompt_ids

    first = encoded(tone(440, rate, 2.0), rate, "OGG", subtype)
    second = encoded(tone(660, rate, 0.5), rate, "OGG", subtype)
    assert len(read_audio(first, 8000, 30)[0]) == 16000 and len(read_audio(second, 8000, 30)[0]) == 4000
    for chain, n in [(first + second, 2 * rate), (second + first + second, rate // 2)]:
        streams = 2 if len(chain) == len(first) + len(second) else 3
        with pytest.raises(ValueError) as e:
            read_audio(chain, 8000, 30)
        assert str(e.value) == (
            f"a chained OGG of {streams} logical streams (files joined end to end, or several at once): "
            f"libsndfile reads only the first ({n} frames); send one stream (re-encode the whole)"
        )
    with pytest.raises(APIError) as api:
        prompt_ids("audio", 8000, None, base64.b64encode(first + second).decode(), 30, 240000)
    assert (
        api.value.status == 422 and api.value.param == "prompt_audio" and "chained OGG" in api.value.message
    )


def test_mp3_files_joined_end_to_end_are_refused_not_cut_to_the_first():
    """`cat a.mp3 b.mp3`: libsndfile reads as many frames as the first file's Xing header counts, so the
    second was dropped, silently (an audit: 2 s + 0.5 s read as the first 2 s). Refused now, saying
    why; each file alone is read whole."""
    first = encoded(tone(440, 8000, 2.0), 8000, "MP3", "MPEG_LAYER_III")
    second = encoded(tone(660, 8000, 0.5), 8000, "MP3", "MPEG_LAYER_III")
    assert len(read_audio(first, 8000, 30)[0]) == 16000 and len(read_audio(second, 8000, 30)[0]) == 4000
    a, b = len(_mpeg_frames(first)) - 1, len(_mpeg_frames(second)) - 1  # (audio frames, after the header's)
    for chain, counted, n in [(first + second, a, 16000), (second + first, b, 4000)]:
        with pytest.raises(ValueError) as e:
            read_audio(chain, 8000, 30)
        assert str(e.value) == (
            f"an MP3 of {a + b + 1} MPEG frames whose length header (Xing, Info or VBRI) counts {counted} "
            f"(files joined end to end?): libsndfile would read only those ({n} frames); send one file "
            "(re-encode the whole)"
        )


def test_a_truncated_au_or_rf64_is_refused_as_a_truncated_wav_is():
    """AU and RF64 headers give their data size as WAV's do (AU in its header, RF64 in its ds64 chunk),
    and libsndfile read a truncated one as the part that is there, silently (an audit: 60 % of the
    file, 4,795 of 8,000 frames): AudioTruncated now says how much is there. A whole file, and an AU
    of unknown size (0xFFFFFFFF, what a writer to a pipe leaves), are read whole."""
    x = tone(440, 8000, 1.0)
    for fmt in ("AU", "RF64"):
        data = encoded(x, 8000, fmt, "PCM_16")
        assert len(read_audio(data, 8000, 30)[0]) == 8000
        with pytest.raises(AudioTruncated, match=r"^the audio is truncated: 3000 of 8000 frames") as e:
            read_audio(data[: len(data) - 2 * 5000], 8000, 30)
        assert (e.value.frames, e.value.declared) == (3000, 8000), fmt
    au = encoded(x, 8000, "AU", "PCM_16")
    assert au[:4] == b".snd" and int.from_bytes(au[8:12], "big") == 16000
    unknown = _set(au, 8, 0xFFFFFFFF, "big")
    assert np.array_equal(read_audio(unknown, 8000, 30)[0], read_audio(au, 8000, 30)[0])
    assert len(read_audio(unknown[:-2000], 8000, 30)[0]) == 7000  # (of unknown size: what is there)


# (format, subtype, bytes per frame, bytes after the data in the file libsndfile writes: VOC's terminator)
LENGTH_FIELDS = [
    ("W64", "PCM_16", 2, 0),
    ("W64", "FLOAT", 4, 0),
    ("NIST", "PCM_16", 2, 0),
    ("NIST", "ULAW", 1, 0),
    ("AVR", "PCM_16", 2, 0),
    ("SVX", "PCM_16", 2, 0),
    ("MAT4", "PCM_16", 2, 0),
    ("MAT4", "DOUBLE", 8, 0),
    ("MAT5", "PCM_16", 2, 0),
    ("MPC2K", "PCM_16", 2, 0),
    ("WVE", "ALAW", 1, 0),
    ("VOC", "PCM_16", 2, 1),
]


def test_a_w64_or_caf_that_sox_wrote_to_a_pipe_is_refused_not_misread():
    """sox cannot seek back in a pipe (`sox ... -t w64 - | ...`), so it writes a first header whose data
    chunk is a placeholder, then a whole second header before the samples. A W64 whose data chunk declared
    23 bytes (less than its own 24-byte header) was read to the end of the file, the second header's 104
    bytes as 52 frames of noise at 0.9 of full scale before the 4,000 real ones; a CAF whose data declared
    no frames was read as none, so the request generated from silence with a 200. Both are refused now:
    the W64's size named, the CAF's second header found after its declared data. Built here as sox writes
    them (checked by hand against sox 14.4's output): a first header cut at its data chunk, then the file."""
    x = tone(440, 8000, 0.5)
    w64 = encoded(x, 8000, "W64", "PCM_16")
    at = w64.index(b"data")  # (its GUID's first 4 bytes)
    with pytest.raises(ValueError, match="W64 data chunk declares 23 bytes, less than the chunk's own"):
        read_audio(w64[: at + 16] + (23).to_bytes(8, "little") + w64, 8000, 30)
    caf = encoded(x, 8000, "CAF", "PCM_16")
    at = caf.index(b"data")
    with pytest.raises(TrailingData, match="after the 0 frames its header declares .*files joined") as e:
        read_audio(caf[: at + 4] + (4).to_bytes(8, "big") + bytes(4) + caf, 8000, 30)
    assert e.value.joined and e.value.extra == len(caf)
    empty = caf[: at + 4] + (4).to_bytes(8, "big") + bytes(4)  # (a CAF of no frames, alone: no samples)
    assert len(read_audio(empty, 8000, 30)[0]) == 0
    assert len(read_audio(w64, 8000, 30)[0]) == len(read_audio(caf, 8000, 30)[0]) == 4000


@pytest.mark.parametrize("channels", [1, 2])
def test_a_voc_that_sox_wrote_is_read_whole(channels):
    """sox (14.4) writes a VOC's sound block (type 9: 16-bit or stereo) with a size field 8 bytes short of
    its data (`sox -n -r 8000 -b 16 x.voc synth 0.5 sine 300`: 8,004 for 8,000 bytes of samples and 12 of
    block header; libsndfile writes 8,012), and libsndfile reads to the end of the file anyway. Holding
    VOC to its header refused every such file (TrailingData: "9 bytes after the 3996 frames"); those 8
    bytes before the terminator are now read as the block's. A file cut short is still truncated."""
    x = tone(440, 8000, 0.5)
    libsndfile = encoded(x, 8000, "VOC", "PCM_16", channels)
    pos = int.from_bytes(libsndfile[20:22], "little")
    size = int.from_bytes(libsndfile[pos + 1 : pos + 4], "little")
    assert libsndfile[pos] == 9 and size == 12 + 4000 * 2 * channels and libsndfile[-1] == 0
    sox = libsndfile[: pos + 1] + (size - 8).to_bytes(3, "little") + libsndfile[pos + 4 :]
    want, _ = read_audio(libsndfile, 8000, 30)
    got, _ = read_audio(sox, 8000, 30)
    assert len(want) == 4000 and np.array_equal(got, want)
    with pytest.raises(AudioTruncated):
        read_audio(sox[:-1001], 8000, 30)


@pytest.mark.parametrize("fmt,subtype,width,after", LENGTH_FIELDS)
def test_containers_whose_length_libsndfile_ignores_are_held_to_their_headers(fmt, subtype, width, after):
    """libsndfile reads W64, NIST SPHERE, AVR, SVX, MPC2K, WVE and VOC data to the end of the file whatever
    its header's length field says, and a MAT4 only as far as the file goes: a truncated file was read
    short (a W64 cut to 60 %: 4,779 of 8,000 frames), and another file joined after it, or any bytes, were
    read as more samples (a W64 joined to itself: 16,052 frames, the second header among them), silently
    (an audit). Now a truncated one is AudioTruncated (frames of declared), bytes after the declared data
    that are not metadata or zero padding are TrailingData, and zero padding is not read as samples."""
    x = tone(440, 8000, 1.0)
    whole = encoded(x, 8000, fmt, subtype)
    want, _ = read_audio(whole, 8000, 30)
    assert len(want) == 8000 and np.abs(want - x).max() <= (0.02 if width == 1 else 1e-4)
    with pytest.raises(AudioTruncated, match=r"^the audio is truncated: 4?\d+ of 8000 frames") as e:
        read_audio(whole[: len(whole) - after - 3000 * width], 8000, 30)  # (5000 frames left)
    # (libsndfile's count of what is there: VOC's takes the last byte for its terminator)
    assert e.value.declared == 8000 and e.value.frames == (4999 if fmt == "VOC" else 5000)
    if fmt == "SVX":  # (libsndfile refuses this one itself: its FORM size is not the file's)
        with pytest.raises(ValueError, match="no 'FORM' marker"):
            read_audio(whole + whole, 8000, 30)
    else:
        with pytest.raises(TrailingData, match="files joined end to end") as e:
            read_audio(whole + whole, 8000, 30)
        assert (e.value.extra, e.value.declared, e.value.joined) == (len(whole), 8000, True)
    noise = np.random.default_rng(0).integers(1, 256, 3000, dtype=np.uint8).tobytes()  # (audio, no zeros)
    with pytest.raises(TrailingData, match="not metadata: audio beyond a length field") as e:
        read_audio(whole + noise, 8000, 30)
    assert (e.value.extra, e.value.joined) == (3000, False)
    assert np.array_equal(read_audio(whole + bytes(64), 8000, 30)[0], want)  # zero padding: no samples


def test_a_caf_is_read_to_its_declared_data_with_chunks_after_it_but_not_another_file():
    """libsndfile reads the data a CAF's data chunk declares and drops what follows: two CAFs joined end to
    end were read as the first, silently (an audit; ALAC's too). TrailingData now; a chunk after the data
    (CAF allows them where the data size is known) is metadata, and zeros padding: read whole."""
    x = tone(440, 8000, 1.0)
    for subtype in ("PCM_16", "ALAC_16"):
        caf = encoded(x, 8000, "CAF", subtype)
        want, _ = read_audio(caf, 8000, 30)
        assert len(want) == 8000 and np.abs(want - x).max() <= 1e-4
        with pytest.raises(TrailingData, match="files joined end to end") as e:
            read_audio(caf + caf, 8000, 30)
        assert (e.value.extra, e.value.joined) == (len(caf), True)
        info = b"info" + struct.pack(">q", 12) + struct.pack(">I", 1) + b"title\0abcd\0"[:8]
        for after in (info, bytes(16)):
            assert np.array_equal(read_audio(caf + after, 8000, 30)[0], want)


def test_a_w64_chunk_after_its_data_is_metadata_not_samples():
    """W64 files may carry chunks after `data` (GUID, 64-bit size): libsndfile read them as samples (a
    40-byte chunk: 20 more 16-bit frames of noise), silently (an audit). Now the declared frames alone."""
    whole = encoded(tone(440, 8000, 1.0), 8000, "W64", "PCM_16")
    chunk = b"levl" + bytes(12) + struct.pack("<Q", 40) + b"\x7f" * 16
    y, _ = read_audio(whole + chunk, 8000, 30)
    assert np.array_equal(y, read_audio(whole, 8000, 30)[0])


def test_a_wav_is_read_to_its_declared_data_with_metadata_after_it_but_not_audio():
    """A WAV whose data size says 1,000 frames before 8,000 frames of audio was read as 1,000, silently, and
    AU or RF64 files joined end to end as the first (an audit): TrailingData now. Chunks after the data
    (LIST, id3), ID3v2 and ID3v1 tags appended by taggers, and zero padding are metadata: read whole."""
    x = tone(440, 8000, 1.0)
    wav = wav_bytes(x, 8000)
    want, _ = read_audio(wav, 8000, 30)
    lst = b"LIST" + struct.pack("<I", 26) + b"INFO" + b"ISFT" + struct.pack("<I", 14) + b"Lavf58.76.100\0"
    id3 = b"id3 " + struct.pack("<I", 10) + b"ID3\x03\x00" + bytes(5)
    tags = [lst, id3, lst + id3, b"ID3\x04\x00\x00\x00\x00\x00\x05abcde", b"TAG" + b"x" * 125, bytes(300)]
    for after in tags:
        assert np.array_equal(read_audio(_set(wav, 4, len(wav) - 8 + len(after)) + after, 8000, 30)[0], want)
    for fmt in ("AIFF", "AU"):
        data = encoded(x, 8000, fmt, "PCM_16")
        after = b"ANNO" + struct.pack(">I", 4) + b"abcd" if fmt == "AIFF" else b"TAG" + bytes(125)
        assert np.array_equal(read_audio(data + after, 8000, 30)[0], read_audio(data, 8000, 30)[0])
    with pytest.raises(TrailingData) as e:
        read_audio(_set(wav, 40, 2000), 8000, 30)  # (a data size of 1,000 frames)
    assert (e.value.extra, e.value.declared, e.value.joined) == (14000, 1000, False)
    assert str(e.value).startswith("the audio file holds 14000 bytes after the 1000 frames its header")
    for fmt in ("WAV", "RF64", "AU", "AIFF"):
        data = encoded(x, 8000, fmt, "PCM_16")
        with pytest.raises(TrailingData, match="files joined end to end") as e:
            read_audio(data + data, 8000, 30)
        assert (e.value.extra, e.value.joined) == (len(data), True), fmt


def test_flac_files_joined_or_whose_streaminfo_length_lies_are_refused_not_cut_short():
    """libsndfile reads as many samples as a FLAC's STREAMINFO declares and stops: `cat a.flac b.flac` was
    read as a.flac, and a STREAMINFO of 1,000 samples over 8,000 as 1,000, silently (an audit). Now the
    file's last frame (the one whose CRC-16 ends the file) must end at the declared count: joined files
    are TrailingData, more samples a ValueError, fewer AudioTruncated, bytes after the last frame a
    ValueError. An ID3v1 tag after the last frame is metadata: read whole."""

    def declaring(data: bytes, samples: int) -> bytes:
        info = int.from_bytes(data[18:26], "big")  # after "fLaC" and the block header: bits 28-63 = samples
        return data[:18] + ((info & ~(2**36 - 1)) | samples).to_bytes(8, "big") + data[26:]

    first = encoded(tone(440, 8000, 1.0), 8000, "FLAC", "PCM_16")
    second = encoded(tone(660, 8000, 0.5), 8000, "FLAC", "PCM_16")
    want, _ = read_audio(first, 8000, 30)
    assert len(want) == 8000 and len(read_audio(second, 8000, 30)[0]) == 4000
    for chain, after, declared in [(first + second, second, 8000), (second + first, first, 4000)]:
        with pytest.raises(TrailingData, match="files joined end to end") as e:
            read_audio(chain, 8000, 30)
        assert (e.value.extra, e.value.declared, e.value.joined) == (len(after), declared, True)
    with pytest.raises(ValueError, match="^a FLAC whose frames hold 8000 samples but whose STREAMINFO"):
        read_audio(declaring(first, 1000), 8000, 30)
    with pytest.raises(AudioTruncated) as e:
        read_audio(declaring(first, 9000), 8000, 30)
    assert (e.value.frames, e.value.declared) == (8000, 9000)
    with pytest.raises(ValueError, match="^a FLAC that does not end with a whole frame"):
        read_audio(first + b"junk" * 10, 8000, 30)
    assert np.array_equal(read_audio(first + b"TAG" + b"x" * 125, 8000, 30)[0], want)


def test_tags_before_a_flac_stream_and_after_its_last_frame_are_read_past():
    """Taggers put an ID3v2 tag before a FLAC stream (libFLAC skips it) and ID3v1, APEv2 or footed ID3v2
    tags after its last frame: such a file is read whole, not refused as joined files or as bytes after the
    last frame (an ID3v2-prefixed FLAC was, by the check against joined FLACs; an APE tag after it too).
    An appended ID3v2 tag after an MP3's last frame is likewise a tag, not a gap."""
    first = encoded(tone(440, 8000, 1.0), 8000, "FLAC", "PCM_16")
    want, _ = read_audio(first, 8000, 30)
    id3 = b"ID3\x04\x00\x00\x00\x00\x00\x0a" + b"\x00" * 10  # (a syncsafe size of 10, padding)
    ape = b"APETAGEX" + struct.pack("<IIII", 2000, 32, 0, 0) + bytes(8)  # (a footer alone: 32 bytes)
    footed = b"ID3\x04\x00\x10\x00\x00\x00\x05abcde3DI\x04\x00\x10\x00\x00\x00\x05"
    for data in (id3 + first, first + ape, first + footed, id3 + first + ape + b"TAG" + bytes(125)):
        assert np.array_equal(read_audio(data, 8000, 30)[0], want)
    with pytest.raises(TrailingData, match="files joined end to end"):
        read_audio(id3 + first + first, 8000, 30)
    mp3 = encoded(tone(440, 8000, 1.0), 8000, "MP3", "MPEG_LAYER_III")
    assert np.array_equal(read_audio(mp3 + footed, 8000, 30)[0], read_audio(mp3, 8000, 30)[0])


def test_an_mp3_with_bytes_between_its_frames_is_refused_before_the_decoder_prints_a_line_for_each(capfd):
    """libsndfile's MP3 decoder (mpg123) skips bytes that are no frame, resyncing, and writes three lines
    straight to the process's stderr for each place ("Note: Illegal Audio-MPEG-Header ... Trying to
    resync... Skipped 1 bytes in input."): one byte after each frame of a 30 s, 121 KB file put 168 KB on
    the server's log, and the file was read as the rest, silently (an audit). Refused now, before
    anything is decoded, and nothing is printed; an ID3v1 tag or zeros after the last frame are still
    read past."""
    for rate in (48000, 8000):  # (at 8 kHz libsndfile's open itself decodes past the first gap)
        mp3 = encoded(tone(440, rate, 2.0), rate, "MP3", "MPEG_LAYER_III")
        frames = [f for f, _ in _mpeg_frames(mp3)]
        want, _ = read_audio(mp3, 8000, 30)
        gapped = frames[0] + b"".join(f + b"\x01" for f in frames[1:])
        capfd.readouterr()
        with pytest.raises(ValueError) as e:
            read_audio(gapped, 8000, 30)
        at = len(frames[0]) + len(frames[1])  # (the first is the Xing header's frame: no audio)
        assert str(e.value).startswith(
            f"an MP3 with bytes that are no MPEG frame at offset {at}, after 1 frames"
        )
        assert capfd.readouterr().err == ""
        for after in (b"TAG" + b"x" * 125, bytes(64)):
            assert np.array_equal(read_audio(mp3 + after, 8000, 30)[0], want)


@pytest.mark.parametrize("fmt", ["WAV", "AIFF", "AU", "W64", "CAF", "MAT4"])
def test_finite_double_samples_beyond_the_float32_range_are_clipped_not_called_infinite(fmt):
    """A DOUBLE file's finite samples beyond float32's range (1e39, -1e300) were decoded to float32 as ±inf
    and refused, "not a finite number: inf" (an audit), though finite samples beyond ±1 are clipped.
    Now they are decoded in float64 and clipped to ±1; channels of ±1.7e308 average to their true mean
    (0, where a sum would give inf - inf = NaN), and a true NaN or inf is still refused."""
    x = np.array([0.0, 0.5, 1e39, -1e300, 0.25])
    y, _ = read_audio(encoded(x, 8000, fmt, "DOUBLE"), 8000, 30)
    assert y.tolist() == [0.0, 0.5, 1.0, -1.0, 0.25]
    big = np.array(
        [[1.7e308, 1.7e308, -1.7e308, -1.7e308], [0.5, 0.5, 0.5, 0.5], [1.7e308, 1.7e308, 1e308, 1e308]]
    )
    y, _ = read_audio(encoded(big, 8000, fmt, "DOUBLE"), 8000, 30)  # (encoded: a 2-D array is the frames)
    assert y.tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(NonFiniteAudio, match="inf at frame 1, channel 0"):
        read_audio(encoded(np.array([0.0, np.inf]), 8000, fmt, "DOUBLE"), 8000, 30)


def test_a_damaged_truncated_or_joined_midi_sample_dump_is_refused_and_prints_nothing(capfd):
    """libsndfile decoded an SDS (MIDI Sample Dump) data packet whose F0 7E ... F7 frame or checksum is
    wrong anyway, and printed "Error A : 00" or "Error 1 : 00" on the process's stdout for each: a
    zeroed F0 in 197 packets of a 1 s dump put 197 lines on the server's stdout and was read as 8,000
    frames (an audit); two dumps joined end to end were read as the first, silently. Now, before
    libsndfile opens it: a damaged packet is a ValueError naming it, too few packets AudioTruncated,
    bytes after them TrailingData."""
    x = tone(440, 8000, 1.0)
    sds = encoded(x, 8000, "SDS", "PCM_16")  # 16-bit: 40 samples a 127-byte packet, 200 packets
    y, _ = read_audio(sds, 8000, 30)
    assert len(y) == 8000 and np.abs(y - x).max() <= 1e-4
    damaged = bytearray(sds)
    for k in range(21 + 127 * 3, len(sds), 127):
        damaged[k] = 0  # (a packet's F0)
    capfd.readouterr()
    with pytest.raises(ValueError, match=r"^an SDS whose data packet 3 \(of 200, at byte 402\) is damaged"):
        read_audio(bytes(damaged), 8000, 30)
    assert capfd.readouterr() == ("", "")
    checksum = bytearray(sds)
    checksum[21 + 127 * 7 + 125] ^= 1
    with pytest.raises(ValueError, match=r"^an SDS whose data packet 7 "):
        read_audio(bytes(checksum), 8000, 30)
    with pytest.raises(AudioTruncated) as e:
        read_audio(sds[: 21 + 127 * 150], 8000, 30)
    assert (e.value.frames, e.value.declared) == (150 * 40, 8000)
    with pytest.raises(TrailingData, match="files joined end to end") as e:
        read_audio(sds + sds, 8000, 30)
    assert (e.value.extra, e.value.declared) == (len(sds), 8000)


def _ogg_pages(data: bytes) -> list[int]:
    """The offsets of an OGG's pages, walked by their lengths."""
    starts, p = [], 0
    while p < len(data):
        assert data[p : p + 4] == b"OggS"
        starts.append(p)
        count = data[p + 26]
        p += 27 + count + sum(data[p + 27 : p + 27 + count])
    return starts


@pytest.mark.parametrize("subtype,rate", [("VORBIS", 8000), ("OPUS", 48000)])
def test_a_truncated_ogg_is_refused_not_read_as_no_prompt_or_short(subtype, rate):
    """libsndfile read a Vorbis file cut to 60 % as no frames at all, which a request takes as no prompt
    (generation started from silence, a 200), and an Opus one cut so as the pages that are there (46,728 of
    144,000 frames), silently (an audit). Now an OGG whose last page is cut short, or that lacks the
    end-of-stream page (cut at a page boundary), is a ValueError (a 422 naming prompt_audio), and bytes
    after its last page that are not a tag or zeros are TrailingData."""
    from server.errors import APIError
    from server.media import prompt_ids

    x = tone(440, rate, 3.0)
    ogg = encoded(x, rate, "OGG", subtype)
    want, _ = read_audio(ogg, rate, 30)
    assert len(want) == len(x)
    last = _ogg_pages(ogg)[-1]
    for cut in (ogg[: len(ogg) * 6 // 10], ogg[: len(ogg) - 10], ogg[:last]):
        with pytest.raises(ValueError, match="^an OGG whose last page is cut short or missing"):
            read_audio(cut, rate, 30)
        with pytest.raises(APIError) as api:
            prompt_ids("audio", 8000, None, base64.b64encode(cut).decode(), 30.0, 240000)
        assert api.value.status == 422 and api.value.param == "prompt_audio"
    with pytest.raises(TrailingData, match="not metadata"):
        read_audio(ogg + b"junk" * 100, rate, 30)
    for after in (b"TAG" + b"x" * 125, bytes(100)):
        assert np.array_equal(read_audio(ogg + after, rate, 30)[0], want)


def test_a_header_sample_rate_of_zero_or_nan_is_named_not_called_an_internal_error():
    """A WAV, AU, CAF, NIST or IRCAM header whose sample rate is 0 (or NaN, a float field's) was refused as
    "Internal error : SF_INFO struct incomplete.", libsndfile's words, which read as the server's own
    failure (an audit); "Internal psf_fseek() failed." likewise. Now the reason says what the header
    holds, and the second is "the data could not be decoded"."""
    x = tone(440, 8000, 0.1)
    wav, au, caf = (encoded(x, 8000, fmt, "PCM_16") for fmt in ("WAV", "AU", "CAF"))
    nist, ircam = (encoded(x, 8000, fmt, "PCM_16") for fmt in ("NIST", "IRCAM"))
    at = caf.index(b"desc") + 12  # (its sample rate: a big-endian double)
    for data in [
        _set(wav, 24, 0),
        _set(au, 16, 0, "big"),
        caf[:at] + struct.pack(">d", 0.0) + caf[at + 8 :],
        nist.replace(b"sample_rate -i 8000", b"sample_rate -i 0000"),
        ircam[:4] + struct.pack("<f", float("nan")) + ircam[8:],
    ]:
        with pytest.raises(ValueError) as e:
            read_audio(data, 8000, 30)
        assert str(e.value) == (
            "not an audio file libsndfile can read: the header gives a sample rate or channel count below 1 "
            "(0, negative or not a number) or a negative length"
        )
    piped_dwvw = encoded(x, 8000, "AIFF", "DWVW_16")  # (libsndfile cannot seek in it: "psf_fseek")
    with pytest.raises(ValueError, match="the data could not be decoded") as e:
        read_audio(piped_dwvw, 8000, 30)
    assert "Internal" not in str(e.value)


def test_the_walk_of_chunks_after_the_data_is_bounded():
    """The chunks after a WAV's data were walked one by one to the end of the file: 12 MB of empty 8-byte
    chunks (1.5 million) cost 3 s of a worker's time per request (an audit). At most 256 are walked now;
    a file with more after its data is TrailingData, one with a few is read whole."""
    wav = wav_bytes(tone(440, 8000, 0.1), 8000)
    junk = b"JUNK" + struct.pack("<I", 0)
    assert np.array_equal(read_audio(wav + junk * 255, 8000, 30)[0], read_audio(wav, 8000, 30)[0])
    with pytest.raises(TrailingData, match="not metadata") as e:
        read_audio(wav + junk * 300, 8000, 30)
    assert e.value.extra == 8 * (300 - 256)


def test_the_walk_of_chunks_before_the_data_is_bounded():
    """The chunks before a WAV's data were walked one by one: 12 MB of empty 8-byte chunks cost 2.7 s
    of a worker's time per request (an audit), and a W64's, SVX's or CAF's likewise. More than 256 are
    refused now, naming why; fewer are read."""
    wav = wav_bytes(tone(440, 8000, 0.1), 8000)
    junk = b"JUNK" + struct.pack("<I", 0)

    def with_chunks(k: int) -> bytes:
        data = wav[:36] + junk * k + wav[36:]  # (after "fmt ", before "data")
        return _set(data, 4, len(data) - 8)

    assert np.array_equal(read_audio(with_chunks(250), 8000, 30)[0], read_audio(wav, 8000, 30)[0])
    with pytest.raises(ValueError, match="^a WAV of more than 256 chunks before its sample data"):
        read_audio(with_chunks(300), 8000, 30)
    # the containers whose chunks `_extent` walks: W64 (24-byte GUID chunks), SVX (IFF), CAF (12-byte)
    x = tone(440, 8000, 0.1)
    for fmt, at, chunk in [
        ("W64", 40, b"junk" + bytes(12) + struct.pack("<Q", 24)),
        ("SVX", 40, b"ANNO" + struct.pack(">I", 0)),  # (after its VHDR)
        ("CAF", 52, b"free" + struct.pack(">q", 0)),  # (after its desc)
    ]:
        data = encoded(x, 8000, fmt, "PCM_16")
        want, _ = read_audio(data, 8000, 30)
        assert np.array_equal(read_audio(data[:at] + chunk * 250 + data[at:], 8000, 30)[0], want), fmt
        with pytest.raises(ValueError, match=f"^a {fmt} of more than 256 chunks before its sample data"):
            read_audio(data[:at] + chunk * 300 + data[at:], 8000, 30)


def test_the_flac_crc16_in_lanes_is_the_byte_by_byte_crc():
    """The search for a FLAC's last frame computes its CRC-16 over up to 8 candidates' tails: byte by byte
    in Python a crafted 1.6 MB file (8 channels, 24 bits, 65,535-sample blocks) took 2.5 s of a worker
    per request (an audit). `_crc16` computes 1,024-byte lanes at once and combines them; it must give
    exactly the byte-by-byte CRC at every length, across the lane boundary and the 16 KB threshold."""
    from model.codecs import _CRC16, _crc, _crc16

    rng = np.random.default_rng(0)
    for n in (0, 1, 1023, 16383, 16384, 16385, 20_000, 1 << 17, 300_007):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _crc16(data) == _crc(data, _CRC16, 16), n
    flac = encoded(tone(440, 8000, 1.0), 8000, "FLAC", "PCM_16") + bytes(40_000)
    assert _crc16(flac) == _crc(flac, _CRC16, 16)


def test_a_compressed_wav_is_read_to_its_fact_chunks_count_not_its_last_blocks_padding():
    """libsndfile ignores a compressed WAV's fact chunk (the encoder's frame count) and reads every frame
    of the last block: a 1 s GSM 6.10 WAV was read as 8,320 frames, its last 320 up to full scale, a
    G.721 one as 8,040 (an audit). Now the fact chunk's count is read where the rest is a block's padding,
    and a fact chunk that counts a block or more fewer frames than the data holds is a ValueError."""
    x = tone(440, 8000, 1.0)
    for subtype in ("GSM610", "G721_32", "MS_ADPCM"):
        wav = encoded(x, 8000, "WAV", subtype)
        y, _ = read_audio(wav, 8000, 30)
        assert len(y) == 8000, subtype  # (the fact chunk's count: the samples written)
        # lossy codecs: the same tone, where the spectrum peaks (1 Hz bins)
        assert np.argmax(np.abs(np.fft.rfft(y))) == 440, subtype
        at = wav.index(b"fact") + 8
        with pytest.raises(ValueError, match=r"^a WAV whose fact chunk counts 1000 frames but whose data"):
            read_audio(wav[:at] + struct.pack("<I", 1000) + wav[at + 4 :], 8000, 30)


def test_an_ircam_pvf_or_paf_cut_inside_a_frame_is_refused():
    """IRCAM, PVF and PAF headers give no length: their data is the rest of the file, so a truncation shows
    only where the file ends inside a frame, and libsndfile dropped that partial frame, silently (an IRCAM
    cut by one byte: 7,999 frames; an audit). Refused now. A file cut at a frame's end still cannot be told
    from a whole one: it reads as the frames that are there (the limit of what these headers say)."""
    x = tone(440, 8000, 1.0)
    for fmt, channels in [("IRCAM", 1), ("PVF", 2), ("PAF", 1)]:
        data = encoded(x, 8000, fmt, "PCM_16", channels)
        assert len(read_audio(data, 8000, 30)[0]) == 8000
        with pytest.raises(ValueError, match=rf"^an? {fmt} whose data ends inside a frame \(1 of its"):
            read_audio(data[: len(data) - 2 * channels + 1], 8000, 30)
        assert len(read_audio(data[: len(data) - 2 * channels], 8000, 30)[0]) == 7999  # (at a frame's end)


def test_a_wav_aiff_or_au_of_unknown_length_cut_inside_a_frame_is_refused():
    """A WAV, RF64, AIFF or AU whose header leaves its data size unknown (0, or from 0x7F000000 up: ffmpeg
    or sox writing to a pipe) is read to the end of the file, so, as for IRCAM, PVF and PAF, a truncation
    shows only where the file ends inside a frame; libsndfile dropped that partial frame, silently (ffmpeg's
    WAV cut by one byte: 7,999 frames; a stereo one cut 2 bytes into its last frame: 7,999). Refused now;
    cut at a frame's end it reads as the frames that are there. A frame is libsndfile's, the sample width
    times the channels: a WAV whose fmt block_align is wrong (3 for 16-bit mono), which libsndfile reads
    whole, is not refused for it."""
    x = tone(440, 8000, 1.0)
    for channels in (1, 2):
        wav = encoded(x, 8000, "WAV", "PCM_16", channels)
        for riff, size in [(0xFFFFFFFF, 0xFFFFFFFF), (0x7FFFF024, 0x7FFFF000), (0, 0)]:
            piped = _set(_set(wav, 4, riff), 40, size)
            assert len(read_audio(piped, 8000, 30)[0]) == 8000
            for cut in range(1, 2 * channels):
                left = f"{2 * channels - cut} of its {2 * channels} bytes"
                with pytest.raises(ValueError, match=rf"^a WAV whose data ends inside a frame \({left}\)"):
                    read_audio(piped[:-cut], 8000, 30)
            assert len(read_audio(piped[: -2 * channels], 8000, 30)[0]) == 7999  # (at a frame's end)
    wav = encoded(x, 8000, "WAV", "PCM_16")
    at = wav.index(b"fmt ") + 20
    wrong = _set(_set(wav[:at] + struct.pack("<H", 3) + wav[at + 2 :], 4, 0xFFFFFFFF), 40, 0xFFFFFFFF)
    assert len(read_audio(wrong, 8000, 30)[0]) == 8000  # (16,000 bytes: not whole 3-byte blocks)
    ext = encoded(x, 8000, "WAVEX", "PCM_24", 2)  # (libsndfile's 24-bit WAVEX: 3-byte samples)
    fmt_at = ext.index(b"fmt ")
    assert struct.unpack_from("<H", ext, fmt_at + 20)[0] == 6  # block_align: 2 channels of 3 bytes
    data_at = ext.index(b"data")
    piped = _set(_set(ext, 4, 0xFFFFFFFF), data_at + 4, 0xFFFFFFFF)
    with pytest.raises(ValueError, match=r"^a WAV whose data ends inside a frame \(4 of its 6 bytes\)"):
        read_audio(piped[:-2], 8000, 30)
    rf64 = encoded(x, 8000, "RF64", "PCM_16")
    ds64, data_at = rf64.index(b"ds64"), rf64.index(b"data")
    piped = rf64[: ds64 + 16] + (0x7F000000).to_bytes(8, "little") + rf64[ds64 + 24 :]  # (its data size)
    assert rf64[data_at + 4 : data_at + 8] == b"\xff" * 4  # (the data chunk's size: ds64's)
    assert len(read_audio(piped, 8000, 30)[0]) == 8000
    with pytest.raises(ValueError, match=r"^an RF64 whose data ends inside a frame \(1 of its 2 bytes\)"):
        read_audio(piped[:-1], 8000, 30)
    aiff = encoded(x, 8000, "AIFF", "PCM_24")
    ssnd, comm = aiff.index(b"SSND"), aiff.index(b"COMM")
    piped = _set(
        _set(_set(aiff, 4, 0x7F000050, "big"), ssnd + 4, 0x7F000008, "big"), comm + 10, 0x3F800000, "big"
    )
    assert len(read_audio(piped, 8000, 30)[0]) == 8000
    with pytest.raises(ValueError, match=r"^an AIFF whose data ends inside a frame \(2 of its 3 bytes\)"):
        read_audio(piped[:-1], 8000, 30)
    au = _set(encoded(x, 8000, "AU", "PCM_16"), 8, 0xFFFFFFFF, "big")
    assert len(read_audio(au, 8000, 30)[0]) == 8000
    with pytest.raises(ValueError, match=r"^an AU whose data ends inside a frame \(1 of its 2 bytes\)"):
        read_audio(au[:-1], 8000, 30)
    assert len(read_audio(au[:-2], 8000, 30)[0]) == 7999


def test_prompt_audio_is_resampled_to_a_model_rate_under_1_khz():
    """A model may have any sample rate from 1 Hz (ModelConfig); a prompt file is resampled to it. A rate
    under 1 kHz was refused as read_audio's `target_rate` ("not an integer in [1000, 384000]"), so every
    prompt_audio to such a model was a 422 blaming the file. From a file's rates (1-384 kHz) to one under
    1 kHz soxr only downsamples: the samples are its one-shot resampling's, its length round(n x rate /
    file rate); a rate of 0 or past 384 kHz is still refused."""
    import soxr

    x = tone(50, 8000, 1.0)
    data = wav_bytes(x, 8000)
    for rate in (1, 100, 500, 999):
        y, got = read_audio(data, rate, 30)
        decoded = read_audio(data)[0]
        want = np.clip(soxr.resample(decoded, 8000, rate, quality="HQ"), -1, 1)
        assert got == rate and len(y) == round(8000 * rate / 8000) == rate
        np.testing.assert_array_equal(y, want)
    from server.media import prompt_ids

    ids = prompt_ids("audio", 500, None, base64.b64encode(data).decode(), 30)
    assert ids == MuLaw().encode(read_audio(data, 500, 30)[0]).tolist() and len(ids) == 500
    for bad in (0, MAX_SAMPLE_RATE + 1):
        with pytest.raises(ValueError, match=rf"^target_rate: {bad} Hz is not an integer in \[1, 384000\]"):
            read_audio(data, bad, 30)
