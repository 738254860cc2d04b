"""Tokenizers: UTF-8 bytes for text, 8-bit mu-law or linear quantization for audio (256 tokens each);
audio files in (any format libsndfile reads, through `soundfile`) and WAV out."""

from __future__ import annotations

import codecs
import io
import itertools
import math
import os
import re
import wave
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import soundfile
import soxr
import torch


class ByteTokenizer:
    """Text ↔ UTF-8 byte ids (vocab 256). Decoding any byte ids succeeds: bytes that are not valid UTF-8
    become U+FFFD."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Byte ids → text (U+FFFD for invalid UTF-8). Raises ValueError for an id that is not an integer
        in 0 … 255 (1.5 was read as 1)."""
        ids = ids if hasattr(ids, "__len__") else list(ids)
        return bytes(checked_ids(ids, "byte").astype(np.uint8)).decode("utf-8", errors="replace")

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


MULAW_CONVENTIONS = ("s4serve", "s4")


class MuLaw:
    """8-bit mu-law companding (μ = 255): float samples in [-1, 1] ↔ ids 0..255. The companded value
    f = sign(x)·ln(1 + μ|x|)/ln(1 + μ) ∈ [-1, 1] is quantized by one of two conventions:

    * "s4serve" (ours, the default): q = floor((f + 1)/2 · 255 + 1/2), dequantized f = 2q/255 − 1.
    * "s4" (state-spaces/s4, src/dataloaders/audio.py `mu_law_encode`/`mu_law_decode`, which official
      SC09 and YouTubeMix SaShiMi checkpoints were trained on): q = floor((f + 1)/2 · (256 − 0.01) +
      0.005) with f computed from |x + 1e-8|, dequantized f = q/128 − 1, so 128 is exactly 0.0. Both run in
      float32 torch arithmetic, operation for operation as the official code runs on its float32 audio, so
      every id and decoded sample is the official code's (float64 arithmetic gave another id to 191 of the
      2^24 24-bit PCM values, none of the 16-bit ones, and decoded 68 of the 256 ids 1 ulp away). (Its
      per-clip min-max scaling before companding is a dataset step, not part of the code of one sample:
      not applied.)

    decode then encode gives every id back in "s4serve"; in "s4" ids 0 … 129 come back and 130 … 255 one
    lower (its decode gives a bin's lower edge, which its 0.01 margin quantizes into the bin below; 129's
    edge rounds the other way in float32), as in the official code. Raises ValueError for another
    convention. (`Linear8`: the official linear quantization.)"""

    vocab_size = 256
    mu = 255

    def __init__(self, convention: str = "s4serve") -> None:
        if convention not in MULAW_CONVENTIONS:
            raise ValueError(f"mu-law convention must be one of {MULAW_CONVENTIONS}, got {convention!r}")
        self.convention = convention
        self.name = f"mu-law {convention}"  # (a codec's name: `Linear8.name` is "linear")

    def __eq__(self, other) -> bool:  # codecs are values: equal by name, hashable (a cache's key)
        return isinstance(other, AudioCodec) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def encode(self, x) -> np.ndarray:
        """Samples (any shape, floats; clipped to [-1, 1]) → int64 ids 0 … 255. Raises ValueError for
        NaN or infinite samples."""
        x = np.clip(finite_samples(x), -1.0, 1.0)
        if self.convention == "s4":  # float32, in the official operations' order (see the class docstring)
            t = torch.from_numpy(np.asarray(x, dtype=np.float32))  # (np.clip made a fresh array: one cast)
            mu = torch.tensor(float(self.mu))
            f = torch.sign(t) * (torch.log1p(mu * torch.abs(t + 1e-8)) / torch.log1p(mu))
            q = ((f + 1) / 2) * (256 - 0.01) + 0.01 / 2
            return np.clip(q.long().numpy(), 0, 255)  # (.long() truncates: q ≥ 0.005 here)
        f = np.sign(x) * np.log1p(self.mu * np.abs(x)) / math.log1p(self.mu)
        return np.floor((f + 1) / 2 * self.mu + 0.5).astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        """Ids 0 … 255 (any shape, integers) → float32 samples in [-1, 1]. Raises ValueError for an id
        outside 0 … 255 or not an integer."""
        q = checked_ids(ids, "mu-law")
        if self.convention == "s4":  # float32, as the official mu_law_decode: sign(f)·(256^|f| − 1)/255
            f = torch.from_numpy(q).float() / 128 - 1
            return (torch.sign(f) * ((self.mu + 1) ** torch.abs(f) - 1) / self.mu).numpy()
        f = 2 * q / self.mu - 1
        return (np.sign(f) * np.expm1(np.abs(f) * math.log1p(self.mu)) / self.mu).astype(np.float32)

    @property
    def silence(self) -> int:
        """The model's silence: the code of the sample 0.0, `encode(0.0)` = floor(255/2 + 1/2) = 128
        (also 128 in the "s4" convention, where it decodes to exactly 0.0).

        In ours 256 codes have no exact zero: 128 decodes to +8.6e-5 (127 to -8.6e-5). Every training clip
        starts with this code as its first input (model/data.py, AUDIO_BOS), and silence-padded clips
        end with it, so a generation from [silence] is the model's unconditional start."""
        return int(self.encode(0.0))


class Linear8:
    """8-bit linear quantization as state-spaces/s4 trains on it (src/dataloaders/audio.py `quantize` /
    `dequantize` / `linear_decode`, `dataset.quantization: linear`: the official Beethoven SaShiMi's):
    float samples in [-1, 1] ↔ ids 0..255, q = floor((x + 1)/2 · (256 − 0.01) + 0.005), decoded
    x = q/128 − 1 (so 128 is exactly 0.0, and 255 decodes to 127/128). (Its per-clip min-max scaling to
    [0, 1] before quantizing is a dataset step, not part of the code of one sample: not applied, as for
    `MuLaw`.) decode then encode gives ids 0 … 128 back and 129 … 255 one lower (q/128 − 1 is a bin's
    lower edge, which the 0.01 margin quantizes into the bin below), as the official formulas do. The same
    interface as MuLaw: `encode`, `decode`, `silence`, `vocab_size`, and `name` ("linear")."""

    vocab_size = 256
    name = "linear"
    __eq__, __hash__ = MuLaw.__eq__, MuLaw.__hash__

    def encode(self, x) -> np.ndarray:
        """Samples (any shape, floats; clipped to [-1, 1]) → int64 ids 0 … 255. Raises ValueError for
        NaN or infinite samples."""
        x = np.clip(finite_samples(x), -1.0, 1.0).astype(np.float32)  # (float32 arithmetic, as the official
        f = (x + np.float32(1)) / np.float32(2)  # code's on its float32 audio: the same code at a bin's edge)
        q = np.floor(f * np.float32(256 - 0.01) + np.float32(0.01 / 2))
        return np.clip(q, 0, 255).astype(np.int64)

    def decode(self, ids) -> np.ndarray:
        """Ids 0 … 255 (any shape, integers) → float32 samples in [-1, 127/128]. Raises ValueError for an id
        outside 0 … 255 or not an integer."""
        return (checked_ids(ids, "linear") / 128 - 1).astype(np.float32)

    @property
    def silence(self) -> int:
        """The code of the sample 0.0, 128 (the official `q_zero`), which decodes to exactly 0.0."""
        return int(self.encode(0.0))


QUANTIZATIONS = ("mu-law", "linear")  # the official dataset.quantization names
AudioCodec = MuLaw | Linear8  # an audio model's codec (`audio_codec`)


def audio_codec(quantization: str = "mu-law", mulaw: str = "s4serve") -> AudioCodec:
    """The codec of an audio model's tokens (ModelConfig `quantization`, and for mu-law its `mulaw`
    convention). Raises ValueError for another quantization or convention."""
    if quantization == "linear":
        return Linear8()
    if quantization != "mu-law":
        raise ValueError(f"audio quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    return MuLaw(mulaw)


def checked_ids(ids, what: str, n: int = 256) -> np.ndarray:
    """Ids (any shape) as float64, each an integer in 0 … n − 1; raises ValueError naming the first that is
    not (`what`: whose ids, "mu-law", "byte", ...)."""
    q = np.asarray(ids, dtype=np.float64)
    bad = ~((q >= 0) & (q <= n - 1) & (q == np.floor(q)))
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"{what} id {float(q[i]):g} at index {list(i)} is not an integer in 0 … {n - 1}")
    return q


def finite_samples(x) -> np.ndarray:
    """x as float64; raises ValueError naming the first NaN or infinite sample (they have no code: NaN
    was cast to an arbitrary integer)."""
    x = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        raise ValueError(f"sample {x[i]} at index {list(i)} is not finite")
    return x


def to_pcm16(x) -> bytes:
    """Float samples in [-1, 1] (clipped) → little-endian signed 16-bit PCM. Raises ValueError for NaN or
    infinite samples."""
    return (np.clip(finite_samples(x), -1, 1) * 32767).round().astype("<i2").tobytes()


def wav_bytes(x, sample_rate: int) -> bytes:
    """A mono 16-bit WAV file holding the float samples x."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(to_pcm16(x))
    return buf.getvalue()


def samples_in(seconds: float, rate: int) -> int:
    """floor(seconds × rate): the whole samples in `seconds` at `rate` Hz, of the decimal `seconds` is
    written in (its shortest repr: a setting's 0.29), exactly. The float product is not: 0.29 × 48000 is
    13919.999999999998, which floor made 13,919 of 13,920 samples."""
    return math.floor(Fraction(repr(float(seconds))) * rate)


class AudioTooLong(ValueError):
    """An audio file longer than the caller's limit (checked on its header, before decoding): `frames` at
    `rate` Hz against `limit_s` seconds at `out_rate` Hz (the rate it is resampled to; `rate` when it
    is not), whose floor(limit_s × out_rate) samples are the limit (`samples_in`). The message gives the
    counts, so a file one sample over reads as over ("2.000 s long: 16001 samples at 8000 Hz; the limit is
    2 s: 16000 samples"). `seconds` is frames / rate."""

    def __init__(self, frames: int, rate: int, limit_s: float, out_rate: int | None = None) -> None:
        out_rate = out_rate or rate
        limit = samples_in(limit_s, out_rate)  # samples at out_rate
        seconds = frames / rate
        if out_rate == rate:
            counts = f"{frames} samples at {rate} Hz; the limit is {limit_s:g} s: {limit} samples"
        else:  # (the frames it may have: frames × out_rate ≤ limit × rate)
            counts = (f"{frames} frames at {rate} Hz; the limit is {limit_s:g} s: {limit * rate // out_rate} "
                      f"frames at that rate ({limit} samples at {out_rate} Hz)")  # fmt: skip
        super().__init__(f"the audio is {seconds:.3f} s long: {counts}")
        self.seconds, self.limit_s, self.frames, self.limit = seconds, limit_s, frames, limit


MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384_000  # Hz: what a prompt's header may say
MAX_CHANNELS = 16
READ_BLOCK_FRAMES = 1 << 15  # frames decoded at a time: bounds the buffer whatever the channel count


_UNREADABLE = (  # libsndfile's reasons that speak of a file system, or of nothing, for bytes it cannot decode
    "File does not exist or is not a regular file (possibly a pipe?).",  # (a truncated MP3)
    "Unspecified internal error.",
    "Internal psf_fseek() failed.",  # (a truncated DWVW AIFF, a FLAC header claiming more than it holds)
)
_INTERNAL = {  # libsndfile's reasons that read as the server's failure for a header's values
    # (its check of the header's fields: a sample rate or channel count below 1, or a negative length)
    "Internal error : SF_INFO struct incomplete.": "the header gives a sample rate or channel count below 1 "
    "(0, negative or not a number) or a negative length",
    "Internal malloc () failed.": "the header asks the decoder for more memory than it could allocate",
}


_FORMATS = "WAV, FLAC, OGG Vorbis or Opus, MP3, AIFF, AU or another format libsndfile reads"
_FORKS = ("._", ".AppleDouble")  # where libsndfile looks for a Sound Designer II resource fork, in the cwd


def _hint(exc: BaseException) -> str:
    """What to do about libsndfile's refusal, where its reason does not say: a format it does not know
    ("Format not recognised.") → the formats it reads; "bad data offset" or "bad resource fork" with a
    `._` or `.AppleDouble` in the working directory (libsndfile, given bytes with no path, takes them for
    a Sound Designer II file's resource fork when it does not know the data by its first bytes: every MP3
    without an ID3v2 tag) → say so. The server decodes in workers that work in an empty directory
    (server/decoder.py); this is for the library used in a process of one's own."""
    msg = str(exc)
    if "Format not recognised" in msg:
        return f" (send {_FORMATS})"
    if ("bad data offset" in msg or "bad resource fork" in msg) and any(os.path.lexists(n) for n in _FORKS):
        return (
            " (libsndfile read the `._` or `.AppleDouble` in the working directory as a Sound Designer II "
            "resource fork of these bytes: remove it, or decode from another directory)"
        )
    return ""


def _sndfile_message(exc: BaseException) -> str:
    """libsndfile's reason without the Python object it names ("Error opening <_io.BytesIO object at
    0x…>: Format not recognised." → "Format not recognised."): a client's error message must not
    show the server's internals. Its reasons that say nothing of data (`_UNREADABLE`: "File does not
    exist or is not a regular file (possibly a pipe?)" for a truncated MP3) become "the data could not
    be decoded (a damaged or truncated file?)", and those that read as the server's own failure
    (`_INTERNAL`: "Internal error : SF_INFO struct incomplete." for a sample rate of 0) say what the
    header holds."""
    msg = re.sub(r"^Error opening <[^<>]*>: ", "", str(exc))
    if msg.strip() in _UNREADABLE:
        return "the data could not be decoded (a damaged or truncated file?)"
    if msg.strip() in _INTERNAL:
        return _INTERNAL[msg.strip()]
    return re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>", "the data", msg)


class _Bytes(io.BytesIO):
    """The bytes libsndfile reads through soundfile's virtual IO. A seek before the start (a 30-byte AIFF's
    header walk asks for offset -1) makes the next tell() -1, the virtual IO's failure (lseek's), where
    BytesIO raised inside soundfile's cffi callback `vio_seek`, which printed "Exception ignored from cffi
    callback ... negative seek value -1" on the server's stderr and answered 0."""

    _failed = False

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return super().seek(offset, whence)
        except ValueError:  # (a negative position)
            self._failed = True
            return -1

    def tell(self) -> int:
        if self._failed:
            self._failed = False
            return -1
        return super().tell()


class NonFiniteAudio(ValueError):
    """An audio file holds a sample that is NaN or infinite (a float WAV can): not a sound to read as
    silence or full scale."""

    def __init__(self, value: float, frame: int, channel: int) -> None:
        super().__init__(
            f"the audio data holds a sample that is not a finite number: {float(value)} at frame {frame}, "
            f"channel {channel} (float samples must be finite)"
        )


class AudioTruncated(ValueError):
    """An audio file whose header declares more sample data than the file holds (a WAV's `data` chunk, an
    AIFF's frame count): `frames` of `declared` frames are there."""

    def __init__(self, frames: int, declared: int) -> None:
        super().__init__(f"the audio is truncated: {frames} of {declared} frames (the header declares more "
                         "data than the file holds)")  # fmt: skip
        self.frames, self.declared = frames, declared


class NoSamples(ValueError):
    """An audio file with frames that gives no sample at the rate asked (1 frame at 44.1 kHz is none at
    8 kHz)."""

    def __init__(self, frames: int, rate: int, target_rate: int) -> None:
        s = "" if frames == 1 else "s"
        super().__init__(f"the audio holds no samples at {target_rate} Hz ({frames} frame{s} at {rate} Hz)")


STREAMED_SIZE = 0x7F000000  # a declared data size from here up means "to the end of the file"
# chunks walked before a container's sample data (`_data_chunk`, `_extent`) and after it (`_trailing`)
_MAX_TRAILING = 256


def _too_many_chunks(container: str) -> ValueError:
    """The refusal of a file with more than _MAX_TRAILING chunks before its sample data: walking them one
    by one in Python cost seconds for a crafted file of tiny chunks."""
    return ValueError(
        f"a {container} of more than {_MAX_TRAILING} chunks before its sample data (files carry a few): "
        "re-save it without them"
    )


_CHUNK_ID = re.compile(rb"[ -~]{4}")  # a chunk id: four printable ASCII characters
_PCM_TAGS = (1, 3, 6, 7, 0xFFFE)  # WAV format tags of one block_align per frame (PCM, float, A/mu-law)


class _DataChunk(NamedTuple):
    """A WAV or AIFF file's sample data chunk as its header declares it (`_data_chunk`)."""

    kind: str  # "wav" or "aiff"
    size: int  # the declared bytes (its 32-bit size field)
    present: int  # the bytes the file holds after the chunk's 8-byte header
    size_at: int  # the offset of the size field
    frames: int | None  # the declared frames: WAV size / block_align (PCM-like formats) or its fact chunk's;
    # AIFF the COMM chunk's
    order: str  # the header's byte order
    fact: int | None = None  # a compressed WAV's fact chunk's frames (the encoder's count, before padding)
    block_align: int = 0  # a WAV's fmt block_align (a compressed format's bytes per block)


def _data_chunk(data: bytes) -> _DataChunk | None:
    """The sample data chunk of a WAV (RIFF, RIFX, RF64) or AIFF (AIFF, AIFC) file, found by walking its
    chunks (an RF64's size from its ds64 chunk), or of a Sun AU file (its header's data size); None for
    another format, or a header this walk does not reach it in (libsndfile judges those). Raises ValueError
    for more than _MAX_TRAILING chunks before it (files carry a few: 12 MB of empty 8-byte chunks took
    2.7 s to walk)."""
    if data[:4] == b".snd" and len(data) >= 24:  # AU: data offset and size, big-endian; ~0 is "unknown"
        offset, size = int.from_bytes(data[4:8], "big"), int.from_bytes(data[8:12], "big")
        return _DataChunk("au", size, max(len(data) - offset, 0), 8, None, "big")
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX", b"FORM", b"RF64"):
        return None
    if data[8:12] not in ((b"WAVE",) if data[:4] != b"FORM" else (b"AIFF", b"AIFC")):
        return None
    wav, order = data[8:12] == b"WAVE", "big" if data[:4] in (b"RIFX", b"FORM") else "little"
    pos, frames, align = 12, None, None  # (WAV: its fact chunk's frames, its fmt's PCM block_align)
    block_align = 0  # (WAV: its fmt's block_align, for any format)
    ds64 = None  # (RF64: the data size its ds64 chunk gives)
    for walked in itertools.count():
        if pos + 8 > len(data):
            return None
        if walked == _MAX_TRAILING:
            raise _too_many_chunks("WAV" if wav else "AIFF")
        cid, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], order)
        body = data[pos + 8 : pos + 8 + min(size, 22)]
        if cid == b"ds64" and data[:4] == b"RF64" and len(body) >= 16:
            ds64 = int.from_bytes(body[8:16], order)
        if cid == (b"data" if wav else b"SSND"):
            if size == 0xFFFFFFFF and ds64 is not None:
                size = ds64
            if wav and align:
                frames = size // align
            fact = frames if wav and not align else None
            chunk = _DataChunk("wav" if wav else "aiff", size, len(data) - pos - 8, pos + 4, frames, order)
            return chunk._replace(fact=fact, block_align=block_align)
        if wav and cid == b"fmt " and len(body) >= 14:
            tag, block = int.from_bytes(body[:2], order), int.from_bytes(body[12:14], order)
            align, block_align = block if tag in _PCM_TAGS else None, block
        if wav and cid == b"fact" and len(body) >= 4:  # (a compressed format's frame count)
            frames = int.from_bytes(body[:4], order)
        if not wav and cid == b"COMM" and len(body) >= 6:
            frames = int.from_bytes(body[2:6], "big")
        if not _CHUNK_ID.fullmatch(cid) or size >= STREAMED_SIZE:
            return None
        pos += 8 + size + (size & 1)


def _streamed(data: bytes, chunk: _DataChunk | None) -> tuple[bytes, _DataChunk | None]:
    """(`data`, its data chunk (`_data_chunk(data)`)), with a WAV `data` chunk size of 0 that audio follows
    (a writer that could not seek back to fill it in) made 0xFFFFFFFF, libsndfile's "to the end of the
    file": it read such a file as 0 frames, silently. (An empty data chunk followed by another chunk stays
    as it is.)"""
    if chunk is None or chunk.kind != "wav" or chunk.size != 0 or chunk.present == 0:
        return data, chunk
    after = data[chunk.size_at + 4 : chunk.size_at + 12]
    if len(after) == 8 and _CHUNK_ID.fullmatch(after[:4]):
        if int.from_bytes(after[4:], chunk.order) <= chunk.present - 8:
            return data, chunk
    data = data[: chunk.size_at] + b"\xff\xff\xff\xff" + data[chunk.size_at + 4 :]
    return data, chunk._replace(size=0xFFFFFFFF)


def _fact_frames(chunk: _DataChunk | None, frames: int) -> int:
    """The frames to read of the `frames` libsndfile counts in a compressed WAV: its fact chunk's count
    where that is less by padding in the last block (libsndfile ignores the fact chunk: a GSM 6.10 WAV of
    8,000 frames was read as 8,320, the last 320 up to full scale, a G.721 one as 8,040). Raises ValueError
    where the fact chunk counts a block or more fewer frames than the data holds (a length that lies)."""
    if chunk is None or chunk.fact is None or chunk.fact >= frames or chunk.size == 0:
        return frames
    per_block = -(-frames * chunk.block_align // chunk.size)  # (frames a block holds, at most)
    if frames - chunk.fact < per_block:
        return chunk.fact
    raise ValueError(
        f"a WAV whose fact chunk counts {chunk.fact} frames but whose data holds {frames} (more than a "
        f"block's {per_block} of padding): a header that says less than the file holds; send a whole file"
    )


def _check_whole(chunk: _DataChunk | None, frames: int) -> None:
    """Raises AudioTruncated when a WAV, AIFF or AU header declares more sample data (`chunk`: the file's data
    chunk, `_data_chunk`) than the file holds (libsndfile reads the `frames` that are there, silently). A
    declared size of 0 or from STREAMED_SIZE (2 GiB) up is a writer's "unknown length" (sox piped:
    0x7FFFF000, AIFF 0x7F000008; ffmpeg: 0xFFFFFFFF), not a truncation."""
    if chunk is None or chunk.size == 0 or chunk.size >= STREAMED_SIZE or chunk.size <= chunk.present:
        return
    declared = chunk.frames
    if declared is None:  # (a compressed WAV without a fact chunk: in proportion)
        declared = frames * chunk.size // max(chunk.present, 1)
    raise AudioTruncated(frames, max(declared, frames + 1))


class TrailingData(ValueError):
    """An audio file holding bytes after the sample data its header declares that are neither the
    container's metadata (chunks, tags) nor zero padding: audio beyond a length field that is too small, or
    files joined end to end (libsndfile read only the declared data, or the rest as samples, silently)."""

    def __init__(self, extra: int, declared: int | None, joined: bool) -> None:
        why = (
            "another file's header: files joined end to end"
            if joined
            else "not metadata: audio beyond a length field that is too small, or files joined end to end?"
        )
        data = "sample data" if declared is None else f"{declared} frames"
        super().__init__(
            f"the audio file holds {extra} bytes after the {data} its header declares ({why}); "
            "send one whole file"
        )
        self.extra, self.declared, self.joined = extra, declared, joined


class _Extent(NamedTuple):
    """The sample data a header declares (`_extent`), for the containers whose length libsndfile does not
    check against the file's: it reads W64, NIST, AVR, SVX, MAT5, MPC2K, WVE and VOC to the end of the
    file whatever the header says (a truncated file read short; another file or metadata after the data
    read as samples), and a MAT4 short, silently; a CAF's it checks, but drops what follows."""

    offset: int  # where the sample data starts
    size: int  # the bytes the header declares
    block: int  # bytes per frame; 0 for a compressed W64 or CAF (frames not in proportion to bytes)
    end: int  # where the data ends: what follows must be metadata (`chunks`) or zeros
    chunks: str | None  # what may follow: "w64" (GUID chunks), "iff" (big-endian chunks), "caf" (64-bit)


_W64_RIFF = b"riff" + bytes.fromhex("2e91cf11a5d628db04c10000")
_W64_SUFFIX = bytes.fromhex("f3acd3118cd100c04f8edb8a")  # the GUID tail of its "fmt " and "data" chunks


def _int(data: bytes, at: int, n: int, order: str = "big") -> int:
    return int.from_bytes(data[at : at + n], order)


SOX_VOC_SHORT = 8  # sox (14.4) writes a VOC's sound block (type 9) size 8 bytes short of its data


def _extent(data: bytes, fmt: str) -> _Extent | None:
    """The sample data a W64, NIST SPHERE, AVR, SVX (8SVX, 16SV), MAT4, MAT5, MPC2K, WVE, VOC or CAF header
    (`fmt`: libsndfile's name of the file's format) declares; None for another format, a header this does
    not parse, or a declared size of 0 (unknown: to the end of the file, as for WAV; a CAF's -1). IRCAM,
    PVF and PAF headers give no length: their data is the rest of the file, whatever it holds."""
    ext, n = None, len(data)
    if fmt == "W64" and data[:16] == _W64_RIFF:
        pos, align = 40, None
        for _ in range(_MAX_TRAILING):
            if pos + 24 > n:
                break
            guid, size = data[pos : pos + 16], _int(data, pos + 16, 8, "little")
            if guid == b"fmt " + _W64_SUFFIX and size >= 38:
                tag, block = _int(data, pos + 24, 2, "little"), _int(data, pos + 36, 2, "little")
                align = block if tag in _PCM_TAGS else 0  # (0: a compressed format's)
            if guid == b"data" + _W64_SUFFIX:
                if 0 < size < 24:  # (sox's header when it writes to a pipe: another header follows)
                    raise ValueError(
                        f"its W64 data chunk declares {size} bytes, less than the chunk's own 24-byte header "
                        "(a W64 written to a pipe: write it to a file, or send WAV or FLAC)"
                    )
                if align is not None and size >= 24:
                    ext = _Extent(pos + 24, size - 24, align, pos + size, "w64")
                break
            if size < 24:
                break
            pos += size + (-size % 8)
        else:
            raise _too_many_chunks(fmt)
    elif fmt == "NIST" and data[8:16].strip().isdigit():
        offset = int(data[8:16])
        fields = dict(re.findall(rb"^(\w+) -(?:i|s\d) (\d{1,12})$", data[16:offset], re.MULTILINE))
        count, width = fields.get(b"sample_count"), fields.get(b"sample_n_bytes")
        if count is not None and width is not None and int(fields.get(b"channel_count", b"1")):
            block = int(fields.get(b"channel_count", b"1")) * int(width)
            ext = _Extent(offset, int(count) * block, block, offset + int(count) * block, None)
    elif fmt == "AVR" and n >= 128:  # 128 bytes: stereo flag, bits, ..., frames (big-endian)
        block = (2 if _int(data, 12, 2) else 1) * (_int(data, 14, 2) // 8)
        ext = _Extent(128, _int(data, 26, 4) * block, block, 128 + _int(data, 26, 4) * block, None)
    elif fmt == "SVX":  # IFF chunks: the samples are the BODY chunk's (mono, 8 or 16 bits)
        pos, block = 12, 1 if data[8:12] == b"8SVX" else 2
        for _ in range(_MAX_TRAILING):
            if pos + 8 > n or not _CHUNK_ID.fullmatch(cid := data[pos : pos + 4]):
                break
            size = _int(data, pos + 4, 4)
            if cid == b"BODY":
                ext = _Extent(pos + 8, size, block, pos + 8 + size, "iff")
                break
            pos += 8 + size + (size & 1)
        else:
            raise _too_many_chunks(fmt)
    elif fmt == "MAT4" and n >= 20:  # a 1 x 1 matrix (the sample rate), then channels x frames samples
        order = "little" if data[:4] == b"\0\0\0\0" else "big"
        pos = 20 + _int(data, 16, 4, order) + 8  # (after the rate's name and value)
        width = {0: 8, 10: 4, 20: 4, 30: 2}.get(_int(data, pos, 4, order) % 1000)
        if width is not None and pos + 20 <= n:
            rows, cols = _int(data, pos + 4, 4, order), _int(data, pos + 8, 4, order)
            offset = pos + 20 + _int(data, pos + 16, 4, order)
            ext = _Extent(offset, rows * cols * width, rows * width, offset + rows * cols * width, None)
    elif fmt == "MPC2K" and n >= 42:  # 42 bytes: a stereo flag, ..., frames (little-endian); 16 bits
        block, count = 4 if data[21] else 2, _int(data, 30, 4, "little")
        ext = _Extent(42, count * block, block, 42 + count * block, None)
    elif fmt == "WVE" and n >= 32:  # 32 bytes, the data size at 18; one A-law byte per frame
        ext = _Extent(32, _int(data, 18, 4), 1, 32 + _int(data, 18, 4), None)
    elif fmt == "VOC" and n >= 26:  # its first block (libsndfile reads one), then a terminator byte 0
        pos = _int(data, 20, 2, "little")
        kind, size = data[pos : pos + 1], _int(data, pos + 1, 3, "little")
        end = pos + 4 + size + (data[pos + 4 + size : pos + 5 + size] == b"\0")  # (and the terminator)
        if kind == b"\x01" and size >= 2:  # (8-bit mono)
            ext = _Extent(pos + 6, size - 2, 1, end, None)
        elif kind == b"\x09" and size >= 12 and pos + 10 <= n:  # (rate, bits, channels, codec)
            if n - 1 - (pos + 4 + size) == SOX_VOC_SHORT and data[n - 1 :] == b"\0":
                size, end = size + SOX_VOC_SHORT, n  # (sox's writer: the rest is this block's data)
            block = data[pos + 8] // 8 * data[pos + 9]
            ext = _Extent(pos + 16, size - 12, block, end, None) if block else None
    elif fmt == "CAF" and data[:4] == b"caff":  # chunks of 12-byte headers (a 64-bit size); data: edits first
        pos, block = 8, 0
        for _ in range(_MAX_TRAILING):
            if pos + 12 > n or not _CHUNK_ID.fullmatch(cid := data[pos : pos + 4]):
                break
            size = _int(data, pos + 4, 8)
            if cid == b"desc" and size >= 32:  # (rate, format, flags, bytes and frames per packet, ...)
                per_packet, frames_per = _int(data, pos + 28, 4), _int(data, pos + 32, 4)
                block = per_packet if frames_per == 1 else 0
            if cid == b"data":
                if 4 <= size < 2**63:  # (-1: to the end of the file)
                    ext = _Extent(pos + 16, size - 4, block, pos + 12 + size, "caf")
                break
            pos += 12 + size
        else:
            raise _too_many_chunks(fmt)
    elif fmt == "MAT5" and n >= 136:  # a sample rate matrix, then the samples' (flags, dims, name, data)
        order = "little" if data[126:128] == b"IM" else "big"
        pos = 128 + 8 + _int(data, 132, 4, order)  # (the rate's)
        rows, q = _int(data, pos + 32, 4, order), pos + 40  # (after the tag, the flags and the dimensions)
        name = _int(data, q, 4, order)
        q += 8 if name >> 16 else 8 + _int(data, q + 4, 4, order) + (-_int(data, q + 4, 4, order) % 8)
        width = {9: 8, 7: 4, 5: 4, 3: 2, 2: 1}.get(_int(data, q, 4, order))
        if width is not None and rows and _int(data, pos, 4, order) == 14:
            size = _int(data, q + 4, 4, order)
            ext = _Extent(q + 8, size, rows * width, q + 8 + size, None)
    # (a CAF's empty data is declared so, its unknown length is -1: what follows it is checked)
    return ext if ext is not None and (ext.size > 0 or ext.chunks == "caf") else None


_JOINED = (
    b"RIFF",
    b"RIFX",
    b"RF64",
    b"FORM",
    b"fLaC",
    b"OggS",
    b".snd",
    b"NIST",
    b"riff",
    b"caff",
)  # file starts


def _trailing(data: bytes, pos: int, chunks: str | None) -> tuple[int, bool] | None:
    """(bytes, whether they begin another file) of what follows the sample data (`pos`: where it ends, with
    its padding) and is no metadata: chunks of the container's kind ("riff": little-endian sizes, "iff":
    big-endian, "w64": GUID chunks), each whole in the file, an ID3v2 tag or a last ID3v1 one, or zeros
    to the end (padding); None where all of it is. A chunk that is another file's header (RIFF, FORM, a
    W64 riff) is another file. At most _MAX_TRAILING items are walked (files carry a few: 12 MB of empty
    8-byte chunks took 3 s); bytes after more are no metadata."""
    n, align = len(data), {"w64": 8, "riff": 2, "iff": 2}.get(chunks, 1)
    head_size = 12 if chunks == "caf" else 8
    for _ in range(_MAX_TRAILING):
        if pos >= n:
            return None
        if not data[pos : pos + (-pos % align)].strip(b"\0"):  # (zeros to the next chunk's alignment)
            pos += -pos % align
        head = data[pos : pos + 24]
        if chunks == "w64" and len(head) == 24 and head[:16] != _W64_RIFF:
            size = _int(head, 16, 8, "little")
            if 24 <= size <= n - pos:
                pos += size + (-size % 8)
                continue
        if chunks in ("riff", "iff", "caf") and len(head) >= head_size and _CHUNK_ID.fullmatch(head[:4]):
            size = _int(head, 4, head_size - 4, "little" if chunks == "riff" else "big")
            if head_size + size <= n - pos and head[:4] not in _JOINED:
                pos += head_size + size + (size & 1 if chunks != "caf" else 0)
                continue
        if head[:3] == b"ID3" and len(head) >= 10:  # ID3v2: a syncsafe size, 10 more with a footer
            pos += 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10]))
            pos += 10 if head[5] & 0x10 else 0
            continue
        if head[:3] == b"TAG" and n - pos == 128 or not data[pos:].strip(b"\0"):  # ID3v1; zeros
            return None
        starts = (head[:4], data[pos : pos + 16].lstrip(b"\0")[:4])  # (at once, or after a few zeros)
        return n - pos, any(s in _JOINED or s == data[:4] for s in starts)
    return (n - pos, False) if pos < n else None


def _check_after_chunk(data: bytes, chunk: _DataChunk | None) -> None:
    """Raises TrailingData where bytes that are not metadata follow the sample data a WAV, RF64, AIFF or AU
    header declares (`chunk`: its data chunk, `_data_chunk`), as `_check_extent` does for other containers:
    libsndfile read the declared data and dropped the rest (a WAV data size of 1,000 frames before 8,000
    frames of audio: 1,000), or refused two WAVs joined end to end as "No 'RIFF' chunk marker". Not for a
    file of unknown length (0, or from STREAMED_SIZE up: to the end of the file) or a truncated one."""
    if chunk is None or chunk.size == 0 or chunk.size >= STREAMED_SIZE or chunk.size > chunk.present:
        return
    chunks = {"wav": "riff", "aiff": "iff"}.get(chunk.kind)  # (an AU has no chunks)
    if (extra := _trailing(data, len(data) - chunk.present + chunk.size, chunks)) is not None:
        raise TrailingData(extra[0], chunk.frames, extra[1])


def _check_sds(data: bytes) -> None:
    """For a MIDI Sample Dump (SDS: libsndfile's test, F0 7E .. 01), before libsndfile opens it: raises
    AudioTruncated where it holds fewer 127-byte data packets than its header's frame count needs,
    ValueError where one of those is damaged (F0 7E ... checksum F7: libsndfile decoded it anyway, and
    printed "Error A : 00" and "Error 1 : 00" on the server's stdout for each), and TrailingData where
    bytes that are no padding follow them (another dump joined on: libsndfile read the first)."""
    if len(data) < 21 or data[:2] != b"\xf0\x7e" or data[3] != 1 or data[6] < 2:
        return  # (not an SDS, or a bit width libsndfile refuses)
    frames = (data[10] & 0x7F) | (data[11] & 0x7F) << 7 | (data[12] & 0x7F) << 14
    per = 60 if data[6] < 14 else 40 if data[6] < 21 else 30  # samples a packet holds (libsndfile's)
    packets = -(-frames // per)
    end = 21 + 127 * packets
    if len(data) < end:
        raise AudioTruncated(min(frames, (len(data) - 21) // 127 * per), frames)
    p = np.frombuffer(data, dtype=np.uint8, count=end - 21, offset=21).reshape(packets, 127)
    bad = (p[:, 0] != 0xF0) | (p[:, 1] != 0x7E) | (p[:, 126] != 0xF7)
    bad |= np.bitwise_xor.reduce(p[:, 1:125], axis=1) & 0x7F != p[:, 125]
    if bad.any():
        k = int(np.argmax(bad))
        raise ValueError(
            f"an SDS whose data packet {k} (of {packets}, at byte {21 + 127 * k}) is damaged: its F0 7E ... "
            "F7 frame or checksum is wrong; send an undamaged file"
        )
    if (extra := _trailing(data, end, None)) is not None:
        raise TrailingData(extra[0], frames, extra[1])


def _check_extent(data: bytes, fmt: str, frames: int) -> int:
    """The frames to read of the `frames` libsndfile counts: those the header declares (`_extent`), where
    libsndfile counts to the end of the file (W64 ... VOC: the rest is padding or metadata). Raises
    AudioTruncated where the file holds fewer bytes than such a header declares, and TrailingData where
    bytes that are not metadata follow its declared data."""
    if (ext := _extent(data, fmt)) is None:
        return frames
    present = len(data) - ext.offset
    if present < ext.size:  # (a compressed W64 without a block per frame: in proportion, as for WAV)
        there = min(frames, max(present, 0) // ext.block) if ext.block else frames
        raise AudioTruncated(
            there, ext.size // ext.block if ext.block else frames * ext.size // max(present, 1)
        )
    declared = ext.size // ext.block if ext.block else None
    if (extra := _trailing(data, ext.end, ext.chunks)) is not None:
        raise TrailingData(extra[0], declared, extra[1])
    return frames if declared is None else min(frames, declared)


def _crc_table(poly: int, bits: int) -> tuple[int, ...]:
    top, mask = 1 << (bits - 1), (1 << bits) - 1
    table = []
    for byte in range(256):
        c = byte << (bits - 8)
        for _ in range(8):
            c = ((c << 1) ^ poly) & mask if c & top else (c << 1) & mask
        table.append(c)
    return tuple(table)


_CRC8, _CRC16 = _crc_table(0x07, 8), _crc_table(0x8005, 16)  # FLAC's frame header and frame CRCs


def _crc(data: bytes, table: tuple[int, ...], bits: int) -> int:
    c, shift, mask = 0, bits - 8, (1 << bits) - 1
    for b in data:
        c = ((c << 8) & mask) ^ table[(c >> shift) ^ b]
    return c


_CRC16_BLOCK = 1024  # bytes a lane of `_crc16` takes


def _crc16_after_block() -> tuple[np.ndarray, np.ndarray]:
    """The map v -> v * x^(8 * _CRC16_BLOCK) mod FLAC's CRC-16 polynomial (a register v after a block of
    zeros), linear over GF(2), as two 256-entry tables: of v's low and of its high byte."""
    basis = []
    for bit in range(16):
        v = 1 << bit
        for _ in range(_CRC16_BLOCK):
            v = ((v << 8) & 0xFFFF) ^ _CRC16[v >> 8]
        basis.append(v)
    lo, hi = np.zeros(256, dtype=np.int64), np.zeros(256, dtype=np.int64)
    for k in range(256):
        for bit in range(8):
            if k >> bit & 1:
                lo[k] ^= basis[bit]
                hi[k] ^= basis[bit + 8]
    return lo, hi


_CRC16_SHIFT = _crc16_after_block()
_CRC16_TABLE = np.array(_CRC16, dtype=np.int64)


def _crc16(data: bytes) -> int:
    """FLAC's frame CRC-16 of `data`, exactly `_crc(data, _CRC16, 16)`, in lanes: the CRC of each
    _CRC16_BLOCK-byte block at once (numpy), then combined, crc(X + Y) = crc(X) x^(8|Y|) + crc(Y) (the
    register is linear in its state and the data). 1.6 MB took 0.6 s byte by byte in Python."""
    blocks = len(data) // _CRC16_BLOCK
    if blocks < 16:  # (below 16 KB byte by byte is as fast)
        return _crc(data, _CRC16, 16)
    head = len(data) - blocks * _CRC16_BLOCK
    lanes = np.frombuffer(data, dtype=np.uint8, count=blocks * _CRC16_BLOCK, offset=head)
    lanes = lanes.reshape(blocks, _CRC16_BLOCK).astype(np.int64)
    c = np.zeros(blocks, dtype=np.int64)
    for j in range(_CRC16_BLOCK):
        c = ((c << 8) & 0xFFFF) ^ _CRC16_TABLE[(c >> 8) ^ lanes[:, j]]
    lo, hi = _CRC16_SHIFT
    acc = _crc(data[:head], _CRC16, 16)
    for v in c.tolist():
        acc = int(lo[acc & 0xFF] ^ hi[acc >> 8]) ^ v
    return acc


def _flac_header(data: bytes, p: int) -> tuple[int, int, int] | None:
    """(blocking strategy bit, frame or sample number, block size) of the FLAC frame header at p, or None
    where there is none (its CRC-8 included: a sync code inside audio data passes 1 time in 256)."""
    if data[p : p + 1] != b"\xff" or data[p + 1 : p + 2] not in (b"\xf8", b"\xf9") or len(data) < p + 6:
        return None
    code, rate_code, b3 = data[p + 2] >> 4, data[p + 2] & 15, data[p + 3]
    if code == 0 or rate_code == 15 or b3 >> 4 >= 11 or b3 & 1:
        return None
    lead, q = data[p + 4], p + 5  # the number, UTF-8 coded: 1-7 bytes
    ones = next((k for k in range(8) if not lead & (0x80 >> k)), 8)  # its leading 1 bits: the length
    if ones in (1, 8):
        return None
    number = lead & (0x7F >> ones)
    for _ in range(max(ones - 1, 0)):
        if q >= len(data) or data[q] >> 6 != 2:
            return None
        number, q = (number << 6) | (data[q] & 63), q + 1
    size = {
        1: 192,
        **{k: 576 << (k - 2) for k in range(2, 6)},
        **{k: 256 << (k - 8) for k in range(8, 16)},
    }.get(code)
    if code in (6, 7):
        size, q = int.from_bytes(data[q : q + code - 5], "big") + 1, q + code - 5
    q += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if q >= len(data) or _crc(data[p:q], _CRC8, 8) != data[q]:
        return None
    return data[p + 1] & 1, number, size


def _flac_last_frame(data: bytes) -> int | None:
    """The sample number after a FLAC's last frame (its first sample + its block size), the last frame
    being the frame header nearest the end whose CRC-16 covers the data up to the file's last two bytes
    (its footer); None where none is found (bytes after the last frame, or a frame cut short)."""
    info = int.from_bytes(data[18:26], "big")
    block = int.from_bytes(data[10:12], "big")  # STREAMINFO's max block size: a fixed-size stream's
    channels, bits = ((info >> 41) & 7) + 1, ((info >> 36) & 31) + 1
    # the largest frame: each channel's samples stored verbatim (a side channel has one bit more), plus
    # the headers; the search for the last frame's header goes no further back, and checks at most 8
    # candidates' CRC-16, so a crafted file cannot make it slow
    largest = 32 + channels * ((bits + 1) * max(block, 1) + 64) // 8
    footer, left = int.from_bytes(data[-2:], "big"), 8
    syncs = [m.start() for m in _FLAC_SYNC.finditer(data, max(42, len(data) - largest), len(data) - 2)]
    for p in reversed(syncs):
        if (head := _flac_header(data, p)) is None:
            continue
        if _crc16(data[p:-2]) == footer:
            variable, number, size = head
            return (number if variable else number * block) + size
        if (left := left - 1) == 0:
            break
    return None


_FLAC_SYNC = re.compile(rb"\xff[\xf8\xf9]")  # a frame header's sync code and blocking strategy bit
_FLAC_STREAM = re.compile(rb"fLaC[\x00\x80]\x00\x00\x22")  # a stream's start: its STREAMINFO block


def _flac_with_length(data: bytes) -> bytes:
    """A FLAC whose STREAMINFO gives 0 samples ("unknown", what libFLAC leaves when it writes to a pipe),
    with its total filled in: the sample after its last frame (`_flac_last_frame`). libsndfile reads such
    a file only as far as its first blocks ("Internal psf_fseek() failed"), so it was refused. `data`
    unchanged for any other file, or where no last frame is found."""
    if (
        data[:4] != b"fLaC"
        or len(data) < 42
        or data[4] & 0x7F != 0
        or int.from_bytes(data[18:26], "big") & (2**36 - 1)
    ):
        return data
    total = _flac_last_frame(data)
    if total is None or total >= 2**36:
        return data
    return data[:18] + (int.from_bytes(data[18:26], "big") | total).to_bytes(8, "big") + data[26:]


def _without_end_tags(data: bytes) -> bytes:
    """`data` less the tags taggers append to a file (an ID3v1 tag, an APEv2 tag with its footer, an
    appended ID3v2 tag with its footer: "3DI"), at most one of each. (Not zeros: a FLAC frame's CRC-16 may
    end in one.)"""
    if data[-128:-125] == b"TAG":
        data = data[:-128]
    if data[-32:-24] == b"APETAGEX":  # (the footer: size with the footer, a flag for a 32-byte header)
        data = data[: -_int(data, len(data) - 20, 4, "little") - 32 * (data[-9] >> 7)]
    if data[-10:-7] == b"3DI":  # (ID3v2's footer: its syncsafe size, then the 10-byte header and footer)
        data = data[: -20 - sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[-4:]))]
    return data


def _check_flac(data: bytes, frames: int) -> None:
    """Raises TrailingData for a FLAC that another FLAC stream follows (files joined end to end: libsndfile
    read the first, silently), AudioTruncated where its frames end before the `frames` its STREAMINFO
    declares, and ValueError where they hold more (libsndfile read only the declared samples, silently)
    or the file does not end with a whole frame (tags appended after it aside: `_without_end_tags`)."""
    if data[:3] == b"ID3" and len(data) >= 10:  # (an ID3v2 tag before the stream, which libFLAC skips)
        data = data[10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10])) :]
    if data[:4] != b"fLaC" or len(data) < 42:
        return  # (a stream libsndfile found elsewhere: nothing known beyond what it says)
    if (joined := _FLAC_STREAM.search(data, 4)) is not None:
        raise TrailingData(len(data) - joined.start(), frames, True)
    end = _flac_last_frame(_without_end_tags(data))
    if end is None:
        raise ValueError(
            "a FLAC that does not end with a whole frame (a truncated file, or bytes after its last frame): "
            "send the whole file"
        )
    if end < frames:
        raise AudioTruncated(end, frames)
    if end > frames:
        raise ValueError(
            f"a FLAC whose frames hold {end} samples but whose STREAMINFO declares {frames} (a length field "
            "that is too small): libsndfile would read only those; re-encode it"
        )


def _ogg_streams(data: bytes) -> int:
    """How many logical streams an OGG file begins (pages with the beginning-of-stream flag), counted by
    walking its pages from the first to the end or to bytes that are no page."""
    p = streams = 0
    while data[p : p + 4] == b"OggS" and p + 27 <= len(data):
        count = data[p + 26]
        streams += bool(data[p + 5] & 2)
        p += 27 + count + sum(data[p + 27 : p + 27 + count])
    return streams


_WIDTHS = {"PCM_S8": 1, "PCM_U8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4, "DOUBLE": 8}
_WIDTHS |= {"ULAW": 1, "ALAW": 1}  # (bytes a sample of these subtypes takes)


def _check_whole_frames(
    data: bytes, fmt: str, subtype: str, channels: int, chunk: _DataChunk | None = None
) -> None:
    """Raises ValueError for an IRCAM, PVF or PAF file, or a WAV, RF64, AIFF or AU of unknown length
    (`chunk`, its data chunk: a declared size from STREAMED_SIZE up, which `_streamed` made of a WAV's 0),
    whose data ends inside a frame. Their data is the rest of the file (the headers give no length), so a
    truncation shows only there: libsndfile dropped the partial frame, silently; one cut at a frame's end
    cannot be told from a whole file. A frame is the subtype's width times the channels, as libsndfile
    reads it (a WAV's fmt block_align, which it checks against that and ignores, may be wrong)."""
    offset = {"IRCAM": 1024, "PAF": 2048}.get(fmt)
    if fmt == "PVF" and data.count(b"\n", 0, 64) >= 2:  # ("PVF1\n<channels> <rate> <bits>\n")
        offset = data.index(b"\n", data.index(b"\n") + 1) + 1
    width = _WIDTHS.get(subtype)
    if width is not None:
        width *= channels
    if offset is None and chunk is not None and chunk.size >= STREAMED_SIZE:  # (unknown: to the end)
        offset = len(data) - chunk.present  # (after the chunk's header; an AU's: its data offset)
        fmt = {"wav": "RF64" if data[:4] == b"RF64" else "WAV", "aiff": "AIFF", "au": "AU"}[chunk.kind]
        if chunk.kind == "aiff":  # (SSND: its offset and block size fields, then `offset` bytes)
            offset += 8 + _int(data, offset, 4)
    if offset is None or not width or (fmt == "PAF" and width == 3 * channels):  # (PAF's 24-bit: blocks)
        return
    if (extra := (len(data) - offset) % width) and len(data) > offset:
        raise ValueError(
            f"{'an' if fmt[0] in 'AIR' else 'a'} {fmt} whose data ends inside a frame ({extra} of its "
            f"{width} bytes): a truncated "
            "file (its header gives no length, so how much is missing cannot be told); send the whole file"
        )


def _check_ogg_end(data: bytes, frames: int) -> None:
    """Raises ValueError for an OGG whose pages (walked by their lengths from the first) end in a page cut
    short, or without the end-of-stream page (a truncated file: libsndfile read a Vorbis one as no frames,
    which a prompt takes as none, an Opus one as the pages that are there, silently), and TrailingData
    for bytes after the last page that are not a tag or zeros."""
    p, n, flags = 0, len(data), 0
    while p + 27 <= n and data[p : p + 4] == b"OggS" and p + 27 + data[p + 26] <= n:
        count, flags = data[p + 26], data[p + 5]
        p += 27 + count + sum(data[p + 27 : p + 27 + count])
    if p > n or (p < n and b"OggS".startswith(data[p : p + 4])) or (p == n and not flags & 4):
        raise ValueError(
            f"an OGG whose last page is cut short or missing (a truncated file: libsndfile would read "
            f"{frames} frames); send the whole file"
        )
    if (extra := _trailing(data, p, None)) is not None:
        raise TrailingData(extra[0], None, extra[1])


_MP3_KBPS = {  # kbit/s of bitrate indices 1-14 by (MPEG-1, layer); MPEG-2 and 2.5 layers II, III: one
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version
_MP3_LENGTH_TAGS = (b"Xing", b"Info", b"VBRI")  # a first frame that says how long the stream is
_MP3_TRAILERS = (b"TAG", b"APETAGEX", b"LYRICS", b"ID3")  # tags that may follow the last frame


def mp3_frame(h: int) -> tuple[int, int] | None:
    """(bytes, samples) of the MPEG audio frame (MPEG-1, 2 or 2.5, layer I, II or III) whose 4-byte header,
    read big-endian, is `h`; None where `h` is no frame header (no sync, a reserved field, or a free-format
    or bad bitrate index)."""
    version, layer, index = (h >> 19) & 3, 4 - ((h >> 17) & 3), (h >> 12) & 15
    if h >> 21 != 0x7FF or version == 1 or layer == 4 or not 1 <= index <= 14 or (h >> 10) & 3 == 3:
        return None
    mpeg1, rate = version == 3, _MP3_RATES[version][(h >> 10) & 3]
    kbps, pad = _MP3_KBPS[(mpeg1, min(layer, 2) if not mpeg1 else layer)][index - 1], (h >> 9) & 1
    if layer == 1:
        return (12_000 * kbps // rate + pad) * 4, 384
    size = (144_000 if mpeg1 or layer == 2 else 72_000) * kbps // rate + pad
    return size, 576 if layer == 3 and not mpeg1 else 1152


def _mp3_header_frames(frame: bytes) -> int | None:
    """The frame count a length header (Xing or Info: LAME's; VBRI: Fraunhofer's) in this first MPEG frame
    gives, -1 for a header without one; None when the frame holds none."""
    for tag in (b"Xing", b"Info"):
        if (at := frame.find(tag)) >= 0:
            flags = int.from_bytes(frame[at + 4 : at + 8], "big")
            return int.from_bytes(frame[at + 8 : at + 12], "big") if flags & 1 else -1
    if (at := frame.find(b"VBRI")) >= 0:
        return int.from_bytes(frame[at + 14 : at + 18], "big")
    return None


def _mp3_samples(data: bytes) -> tuple[int, int, int | None, int | None] | None:
    """(MPEG frames, samples they hold, the frames its first frame's length header (Xing, Info or VBRI)
    gives or None without one: that frame then not counted, the offset of the first bytes after a frame
    that are no frame header, or None) of an MP3, counted by walking its frame headers from the first
    (after an ID3v2 tag) to the end of the data (or an ID3v1, APE or Lyrics tag, or zeros, there); the
    counts then end at that offset (a header that changes version, layer or rate is no frame of this
    stream). None when the walk finds no frame (a free-format bitrate): then nothing is known beyond what
    libsndfile says."""
    p = 0
    if data[:3] == b"ID3" and len(data) >= 10:  # ID3v2: a syncsafe size, 10 more with a footer
        p = (
            10
            + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
            + (10 if data[5] & 0x10 else 0)
        )
    frames = samples = 0
    first, header = None, None
    while p + 4 <= len(data):
        h = int.from_bytes(data[p : p + 4], "big")
        if (frame := mp3_frame(h)) is None:
            break
        if first is None:
            first = h & 0xFFFE0C00  # (sync, version, layer, sample rate: the same in every frame)
        elif h & 0xFFFE0C00 != first:
            break
        size, n = frame
        if frames == 0 and header is None and (header := _mp3_header_frames(data[p : p + size])) is not None:
            p += size  # (the header's frame holds no audio)
            continue
        frames, samples, p = frames + 1, samples + n, p + size
    if first is None:
        return None
    junk = p + 4 <= len(data) and not data[p:].startswith(_MP3_TRAILERS) and data[p:].strip(b"\0")
    return frames, samples, header, p if junk else None


def read_audio(data: bytes, target_rate: int | None = None, max_seconds: float | None = None):
    """Audio file bytes (any format libsndfile reads: WAV 8/16/24/32-bit PCM and float, mu-law, FLAC,
    OGG Vorbis/Opus, MP3, ...) → (mono float32 samples in [-1, 1], sample rate in Hz).

    Channels are averaged. With `target_rate` the samples are resampled to it by soxr (a
    band-limited resampler, 'HQ' quality: content above the target's Nyquist frequency is filtered
    out, not aliased) and the rate returned is `target_rate`. The header's fields are validated
    before any sample is decoded: sample rate in [1000, 384000] Hz, 1-16 channels, a known frame
    count; and with `max_seconds` the duration frames / rate (before resampling) must be at most
    that. Decoding goes block by block, each mixed to mono and resampled as it comes, into the output
    alone (at `target_rate`: max_seconds × target_rate samples at most, whatever the file's rate), so a
    header cannot make it allocate more than that and one block.

    Samples beyond ±1 (a float file's, or a resampler's overshoot at a full-scale edge: a square wave's
    went to 1.2) are clipped, a DOUBLE file's beyond float32's range too (decoded in float64); a NaN or
    infinite one is refused.

    A WAV, RF64, AIFF or AU whose header declares more sample data than the bytes hold is refused
    (AudioTruncated; libsndfile read the part that is there, silently), except a declared size of 0 or
    from 0x7F000000 up, what a writer that cannot seek back leaves (`sox -t wav -`: 0x7FFFF000; ffmpeg to
    a pipe: 0xFFFFFFFF): the data then runs to the end of the file (a WAV data size of 0 followed by audio
    was read as no frames). So is a W64, NIST SPHERE, AVR, SVX, MAT4, MAT5, MPC2K, WVE or VOC whose header
    declares more than the file holds (libsndfile reads their data to the end of the file, or a MAT4's as
    far as it goes, whatever the header says), and bytes after such a header's declared data that are
    neither the container's chunks nor zero padding (another file joined on, or audio past a length field
    that is too small, which libsndfile read as samples) raise TrailingData (a ValueError); padding and
    chunks after the data are not read as samples. (IRCAM, PVF and PAF headers give no length: read to
    the end; one that ends inside a frame raises ValueError, `_check_whole_frames`, as does a WAV, RF64,
    AIFF or AU of unknown length.) The same holds after
    a CAF's data (libsndfile read the declared data and dropped the rest) and a WAV's, RF64's, AIFF's or
    AU's (a data size smaller than the audio after it was read as that much; two WAVs joined end to end
    were "No 'RIFF' chunk marker"): its chunks (LIST, id3, ...), ID3v2 and ID3v1 tags and zero padding
    may follow; other bytes raise TrailingData. A MIDI Sample Dump (SDS)
    is checked before libsndfile opens it (`_check_sds`): a damaged data packet raises ValueError
    (libsndfile decoded it and printed a line on stdout), too few AudioTruncated. A file of no frames
    gives no samples; one whose frames resample to none (1 frame at 44.1 kHz to 8 kHz) raises NoSamples.
    An MP3 without a length header (Xing, Info, VBRI) whose MPEG frames hold more or fewer samples than
    libsndfile estimates from its first frame's bitrate (a VBR one: libsndfile reads only its estimate,
    23-51 % of such a file) raises ValueError.
    An OGG whose last page is cut short or missing (`_check_ogg_end`: libsndfile read a truncated Vorbis
    file as no frames) raises ValueError, bytes after its last page that are not a tag or zeros
    TrailingData. A chained OGG (more than one logical stream) raises ValueError: libsndfile reads only the
    first; so does an MP3 of more frames than its length header counts (files joined end to end), and one
    with bytes after a frame that are no frame (a damaged file: mpg123 skipped them, printing three lines
    to stderr for each gap; an ID3v1, ID3v2, APE or Lyrics tag or zeros after the last frame are read
    past). (Damage inside
    a frame's data still makes mpg123 print to stderr as it decodes, two lines a frame: 316 KB for 30 s of
    layer III frames, 677 KB of layer I; libsndfile gives no way to quiet it. And for data it does not
    recognise by its first bytes, MP3 included, libsndfile looks for a Sound Designer II resource fork at
    `._` and `.AppleDouble/` in the working directory: a file or directory of either name there fails every
    MP3 ("bad data offset"). The server decodes prompts in worker processes whose stderr is their own and
    whose working directory is empty, server/decoder.py.)
    A FLAC whose STREAMINFO gives no length (0: libFLAC writing to a pipe) gets the one its last frame
    gives (`_flac_with_length`), then is read and limited as any file. Any other FLAC's last frame must
    end at the count its STREAMINFO declares (`_check_flac`; libsndfile reads that many samples and stops):
    FLAC files joined end to end raise TrailingData, frames beyond the declared count or bytes after the
    last frame (appended tags aside) ValueError, frames that end before it AudioTruncated.

    Raises ValueError (not an audio file, a header field out of range: the message names it, or a
    `target_rate` that is not an integer in [1, 384000]: a model's rate may be under 1 kHz),
    AudioTooLong (a ValueError) for a file longer than `max_seconds`, NonFiniteAudio (a ValueError)
    for a NaN or infinite sample, AudioTruncated (a ValueError: `frames` of `declared`) for a truncated
    file, TrailingData (a ValueError) for bytes after the declared data that are not metadata, NoSamples
    (a ValueError) for frames that resample to no sample.
    """
    if target_rate is not None and not (
        isinstance(target_rate, int | np.integer) and 1 <= target_rate <= MAX_SAMPLE_RATE
    ):  # (a model's rate, ModelConfig's: from 1 Hz; below a file's 1 kHz soxr only downsamples)
        raise ValueError(f"target_rate: {target_rate!r} Hz is not an integer in [1, {MAX_SAMPLE_RATE}]")
    data = _flac_with_length(data)  # (a FLAC of unknown length: the length its last frame gives)
    data, chunk = _streamed(data, _data_chunk(data))  # (the header's chunks walked once)
    _check_after_chunk(data, chunk)
    _check_sds(data)
    mp3 = _mp3_samples(data) if data[:3] == b"ID3" or data[:2] >= b"\xff\xe0" else None  # (frame sync)
    if mp3 is not None and mp3[3] is not None:  # (before libsndfile's open, which decodes the first frames)
        # mpg123 skips them, resyncing, and prints three lines on the server's stderr for each place it does
        # ("Note: Illegal Audio-MPEG-Header ... Trying to resync... Skipped 1 bytes"): 168 KB of them for
        # a 121 KB file of 1-byte gaps, read as the rest, silently (an audit)
        raise ValueError(
            f"an MP3 with bytes that are no MPEG frame at offset {mp3[3]}, after {mp3[0]} frames (a damaged "
            "file, or other data joined to it): send an undamaged file"
        )
    try:
        f = soundfile.SoundFile(_Bytes(data))
    except (soundfile.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        why = _sndfile_message(exc) + _hint(exc)
        raise ValueError(f"not an audio file libsndfile can read: {why}") from None
    with f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise ValueError(f"sample rate: {rate} Hz is out of range [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels: {channels} is out of range [1, {MAX_CHANNELS}]")
        if not 0 <= frames < 2**62:  # libsndfile says SF_COUNT_MAX when it cannot tell
            raise ValueError(f"frames: the header gives no usable frame count ({frames})")
        _check_whole(chunk, frames)
        frames = _fact_frames(chunk, frames)
        frames = _check_extent(data, f.format, frames)
        if f.format == "OGG" and (streams := _ogg_streams(data)) > 1:
            # libsndfile reads the first and stops: the rest of a chain (files joined end to end) was
            # dropped, silently (an audit)
            raise ValueError(
                f"a chained OGG of {streams} logical streams (files joined end to end, or several at once): "
                f"libsndfile reads only the first ({frames} frames); send one stream (re-encode the whole)"
            )
        if f.format == "OGG":
            _check_ogg_end(data, frames)
        _check_whole_frames(data, f.format, f.subtype, channels, chunk)
        walked = (mp3 or _mp3_samples(data)) if f.format == "MP3" else None
        if walked is not None and walked[2] is None and abs(walked[1] - frames) > 2304:
            # libsndfile's frame count for an MP3 without a length header is an estimate from its first
            # frame's bitrate, and it reads no further: a VBR file was cut to 23-51 % of its length,
            # silently (an audit); one that it overestimates reads as truncated
            raise ValueError(
                f"an MP3 without a length header (a Xing, Info or VBRI frame) whose bitrate varies: its "
                f"{walked[0]} MPEG frames hold {walked[1]} samples, but libsndfile estimates {frames} from "
                f"the first frame's bitrate and would read only that much; re-encode it with a length "
                "header (LAME writes one unless told not to) or send WAV or FLAC"
            )
        if walked is not None and walked[2] is not None and walked[2] >= 0 and walked[0] > walked[2] + 1:
            # MP3 files joined end to end: libsndfile reads as many frames as the first one's header says
            raise ValueError(
                f"an MP3 of {walked[0]} MPEG frames whose length header (Xing, Info or VBRI) counts "
                f"{walked[2]} (files joined end to end?): libsndfile would read only those ({frames} "
                "frames); send one file (re-encode the whole)"
            )
        if max_seconds is not None:
            # the limit in samples at the rate used; soxr gives round(frames * out_rate / rate) samples,
            # which is within the limit exactly when frames * out_rate <= limit * rate
            out_rate = target_rate or rate
            if frames * out_rate > samples_in(max_seconds, out_rate) * rate:
                raise AudioTooLong(frames, rate, max_seconds, out_rate)
        if f.format == "FLAC":  # (after the limit: a header's claim of 2^35 samples is over it)
            _check_flac(data, frames)
        # Resampled block by block as decoded, so the only whole buffer is the output, at the target rate:
        # the buffers at the file's own rate (up to 384 kHz: 48x an 8 kHz model's prompt) had been the peak:
        # 20 s of 384 kHz silence, a 26 KB FLAC, took 59 MB (1.5 MB now); at S4_MAX_AUDIO_S=3600 a 4.7 MB
        # FLAC asked for 11 GB. soxr's stream gives exactly its one-shot `resample`.
        resample = target_rate is not None and target_rate != rate
        stream = (
            soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ") if resample else None
        )
        x = np.empty(0 if resample else frames, dtype=np.float32)
        out: list[np.ndarray] = []  # (resampled blocks)
        # (float64: a DOUBLE file's finite 1e39 was inf in float32, refused as "not a finite number")
        buf = np.empty((min(READ_BLOCK_FRAMES, max(frames, 1)), channels), dtype=np.float64)
        n, bad = 0, None
        try:
            while n < frames:
                got = f.read(dtype="float64", always_2d=True, out=buf[: min(len(buf), frames - n)])
                if len(got) == 0:  # the data ends before libsndfile said (a truncated compressed file)
                    bad = AudioTruncated(n, frames)
                    break
                if not np.isfinite(got).all():  # a float file's NaN or ±inf is no sample (it was read as 0)
                    frame, channel = (int(i) for i in np.argwhere(~np.isfinite(got))[0])
                    bad = NonFiniteAudio(got[frame, channel], n + frame, channel)
                    break
                # averaged as the sum of x / channels, which cannot overflow (a DOUBLE file's channels
                # 1.7e308, 1.7e308, -1.7e308, -1.7e308 summed to inf - inf = NaN); clipped: float files may
                # hold |x| > 1
                mono = np.clip((got / channels).sum(axis=1), -1.0, 1.0).astype(np.float32)
                if stream is not None:
                    out.append(stream.resample_chunk(mono))
                else:
                    x[n : n + len(got)] = mono
                n += len(got)
        except (soundfile.SoundFileError, RuntimeError, ValueError) as exc:
            raise ValueError(f"the audio data cannot be decoded: {_sndfile_message(exc)}") from None
    if bad is not None:
        raise bad
    if stream is None or n == 0:
        return x[:n], target_rate or rate
    out.append(stream.resample_chunk(np.empty(0, dtype=np.float32), last=True))
    y = np.concatenate(out).astype(np.float32, copy=False)
    if len(y) == 0:
        raise NoSamples(n, rate, target_rate)
    return np.clip(y, -1.0, 1.0, out=y), target_rate  # (band-limited overshoot past ±1)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """An audio file's mono float samples and sample rate (read_audio without resampling or limit)."""
    return read_audio(data)
