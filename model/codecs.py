"""Tokenizers: UTF-8 bytes for text, 8-bit mu-law for audio (256 tokens each)."""

from __future__ import annotations

import codecs
import io
import math
import wave

import numpy as np


class ByteTokenizer:
    """Text ↔ UTF-8 byte ids (vocab 256). Decoding never fails: invalid bytes become U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self, pending: bytes = b""):
        """Incremental decoder: feed(bytes) → the text completed so far (multi-byte chars held back).
        `pending`: the incomplete character held from earlier text (see `utf8_tail`), fed first."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        if dec.decode(pending):
            raise ValueError(f"{pending!r} is not the start of a UTF-8 character")
        return dec


def utf8_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that later bytes could still complete into one character: a
    proper prefix of a valid UTF-8 sequence (0 to 3 bytes), exactly what an incremental decoder holds
    back after `data` (the codec's own state, so the two always agree)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    dec.decode(data)
    return dec.getstate()[0]


class MuLaw:
    """8-bit mu-law companding (μ = 255): float samples in [-1, 1] ↔ ids 0..255."""

    vocab_size = 256
    mu = 255

    def encode(self, x) -> np.ndarray:
        x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
        f = np.sign(x) * np.log1p(self.mu * np.abs(x)) / math.log1p(self.mu)
        return np.floor((f + 1) / 2 * self.mu + 0.5).astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        f = 2 * np.asarray(ids, dtype=np.float64) / self.mu - 1
        return (np.sign(f) * np.expm1(np.abs(f) * math.log1p(self.mu)) / self.mu).astype(np.float32)


def to_pcm16(x) -> bytes:
    """Float samples in [-1, 1] → little-endian signed 16-bit PCM."""
    return (np.clip(np.asarray(x, dtype=np.float64), -1, 1) * 32767).round().astype("<i2").tobytes()


def wav_bytes(x, sample_rate: int) -> bytes:
    """A mono 16-bit WAV file holding the float samples x."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_pcm16(x))
    return buf.getvalue()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 8/16-bit PCM WAV bytes → (float samples, sample rate). Raises ValueError otherwise."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from None
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128) / 128
    else:
        raise ValueError(f"unsupported WAV sample width {width * 8} bits (use 8 or 16)")
    return x.reshape(-1, ch).mean(axis=1), rate
