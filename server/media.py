"""Requests' text and audio ↔ token ids (no tensors): prompts in, streamed text and audio out.

Text models read UTF-8 bytes; audio models read 8-bit mu-law samples at the model's sample rate.
A prompt audio file is decoded by libsndfile and resampled by soxr (model.codecs.read_audio); an audio
request without a prompt starts from the model's silence (MuLaw.silence, the code of 0.0).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import re

import numpy as np

from model.codecs import AudioCodec as Codec
from model.codecs import (
    AudioTooLong,
    AudioTruncated,
    ByteTokenizer,
    Linear8,
    MuLaw,
    NoSamples,
    read_audio,
    to_pcm16,
    wav_bytes,
)
from model.sampling import find_stop
from model.vocab import ByteVocab, Vocab, VocabError
from server.errors import APIError, invalid, prompt_too_long

TEXT, MULAW = ByteTokenizer(), MuLaw()
AUDIO_ENCODINGS = ("pcm16", "mulaw")  # WebSocket binary frames: s16le samples, or mu-law bytes (= ids)


_WHITESPACE = {ord(c): None for c in " \t\r\n"}  # what line-wrapped base64 holds besides its alphabet
_DATA_URI = re.compile(r"data:([^,]*),", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def b64decode(data: str, param: str) -> bytes:
    """A base64 string's bytes: standard base64 (RFC 4648, `+/`, padded), optionally line-wrapped (ASCII
    spaces, tabs, CR and LF anywhere are dropped: `base64`'s 76-column lines, Python's encodebytes) and
    optionally a data URI's (`data:<media type>;base64,...`, a browser FileReader's readAsDataURL; the
    media type is not checked). Anything else is a 422 naming `param` and what is wrong: a data URI
    that is not base64, the first character outside the alphabet and where, or a length (without
    whitespace) that is not a multiple of 4."""
    if m := _DATA_URI.match(data):
        if "base64" not in (p.strip().lower() for p in m.group(1).split(";")[1:]):
            raise invalid(param, f"{param} is a data URI without ;base64 (send data:<type>;base64,<base64>)")
        data = data[m.end() :]
    data = data.translate(_WHITESPACE)
    if (m := _BASE64.match(data)).end() < len(data):
        at = m.end()
        if "=" in data[: at + 1]:
            what = f"its = padding is misplaced or too long (from character {data.index('=')}"
        else:
            hint = ": - and _ are base64url's, send standard base64" if data[at] in "-_" else ""
            what = f"{data[at]!r} is not a base64 character (character {at}{hint}"
        raise invalid(param, f"{param} is not valid base64: {what}; whitespace not counted)")
    if len(data) % 4:
        raise invalid(
            param,
            f"{param} is not valid base64: its length, {len(data)} characters without whitespace, is not a "
            "multiple of 4 (cut short, or its = padding left out)",
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, f"{param} is not valid base64") from None


def quality(accept: str | None, media_type: str, any_type: bool = True) -> float:
    """The q (0 … 1) an Accept header gives `media_type` (type/subtype), RFC 9110 12.5.1: that of the most
    specific media range matching it, type/subtype over type/* over (with `any_type`) */* (the largest
    among equally specific ones); 0 when none matches. No header (or a blank one) gives 1 with
    `any_type`, else 0. Parameters other than q are ignored; a q that is not a number in [0, 1] counts
    as 0. any_type=False asks what the header gives the type itself (`*/*`, curl's, does not count)."""
    if accept is None or not accept.strip():
        return 1.0 if any_type else 0.0
    media_type = media_type.lower()
    ranks = {media_type: 3, media_type.split("/", maxsplit=1)[0] + "/*": 2}
    if any_type:
        ranks["*/*"] = 1
    best = (0, 0.0)  # (specificity, q)
    for item in accept.split(","):
        media_range, *params = (p.strip() for p in item.split(";"))
        rank = ranks.get(media_range.lower())
        if rank is None:
            continue
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0 <= q <= 1 else 0.0  # (NaN too)
        best = max(best, (rank, q))
    return best[1]


def accepts(accept: str | None, media_type: str, any_type: bool = True) -> bool:
    """Whether an Accept header takes `media_type`: `quality` > 0 (no header takes anything).
    `Accept: audio/wav` takes audio/wav, not application/json; `audio/wav;q=0, */*` does not take
    audio/wav (its most specific range refuses it)."""
    return quality(accept, media_type, any_type) > 0


def audio_answer(accept: str | None) -> str | None:
    """The answer a plain (not streamed) audio generation gives for an Accept header: "audio/wav" when
    the header gives audio/wav (named, or audio/*: `*/*` does not count, so curl gets JSON) a higher q
    than application/json, "application/json" when JSON's q is positive and at least WAV's (a tie is
    JSON), else "audio/wav" when JSON's q is 0 and a `*/*` takes WAV, else None (a 406).
    `application/json, audio/wav;q=0.1` → JSON; `audio/wav` or `audio/wav, */*;q=0.5` → WAV;
    `application/json;q=0, */*` → WAV."""
    wav, json_q = quality(accept, "audio/wav", any_type=False), quality(accept, "application/json")
    if wav > json_q:
        return "audio/wav"
    if json_q > 0:
        return "application/json"
    return "audio/wav" if quality(accept, "audio/wav") > 0 else None


REPLACEMENT = "\ufffd"  # what a text route writes for generated bytes that are not UTF-8


def replacement_stop(vocab: Vocab | None, stops: list[str]) -> int | None:
    """The index of the first of `stops` holding U+FFFD on a model whose text is decoded from bytes (`vocab`
    None, or enwik8's ByteVocab), else None: such a text writes U+FFFD for every generated byte that is not
    UTF-8, and stop sequences are matched on the generated bytes, where one holding U+FFFD matches only a
    literal U+FFFD (EF BF BD), so it never ends the text there. A word or character vocabulary writes whole
    characters: no U+FFFD of its own. (A request's stop: a 422, `service.check_stops`; a checkpoint's
    chat_stop: its load fails, `registry.load_model`.)"""
    if vocab is not None and not isinstance(vocab, ByteVocab):
        return None
    return next((i for i, s in enumerate(stops) if REPLACEMENT in s), None)


READ_PAST_LIMIT = 2  # a vocabulary reads a prompt of at most this many times max_prompt_tokens (text_ids)


def text_ids(
    text: str, param: str = "prompt", max_tokens: int | None = None, vocab: Vocab | None = None
) -> list[int]:
    """A text prompt as token ids: UTF-8 bytes, or with a `vocab` as it reads text (model.vocab: a word
    vocabulary's words, `<eos>` for each newline, a word it lacks `<unk>`; enwik8's bytes, text8's
    characters); what it cannot read is a 422 naming `param` and the word or characters. One longer
    than `max_tokens` is a 413 naming `param`, found before it is converted for bytes
    (by its length in characters, each at least one byte, then in bytes); for a vocabulary, one of more
    than READ_PAST_LIMIT times `max_tokens` is found before it is read (`Vocab.least_tokens`): a
    vocabulary reads a text in Python, in time that grows with its length, and the event loop waited
    (16 MiB of newlines: 12 s with a word vocabulary, every stream paused). Text that is not valid
    Unicode (a lone surrogate from JSON's "\\ud800") is a 422."""

    def too_long(n: int | str) -> APIError:
        return prompt_too_long(f"{param} is {n} tokens; the limit is {max_tokens} (max_prompt_tokens)", param)

    if vocab is None and max_tokens is not None and len(text) > max_tokens:
        raise too_long(f"at least {len(text)}")
    if vocab is not None and max_tokens is not None:  # (one nearer the limit is read: its count is named)
        if (least := vocab.least_tokens(text, READ_PAST_LIMIT * max_tokens)) > READ_PAST_LIMIT * max_tokens:
            raise too_long(f"at least {least}")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(param, f"{param} is not valid Unicode text: {exc.reason}") from None
    if vocab is not None:
        try:
            ids = vocab.encode(text)
        except VocabError as exc:
            raise invalid(param, f"{param}: {exc}") from None
    else:
        ids = list(data)
    if max_tokens is not None and len(ids) > max_tokens:
        raise too_long(len(ids))
    return ids


def prompt_ids(
    kind: str,
    sample_rate: int | None,
    prompt: str | None,
    prompt_audio: str | None,
    max_audio_s: float | None = None,
    max_tokens: int | None = None,
    codec: Codec = MULAW,
    vocab: Vocab | None = None,
    decode=read_audio,
) -> list[int]:
    """A request's prompt as token ids for a model of this kind (422 naming the wrong field); audio is
    decoded by `decode` (read_audio, or the server's worker processes' `AudioDecoder.read_audio`) and
    encoded by the model's `codec` (its quantization, and mu-law's convention).

    Text: a prompt longer than `max_tokens` is a 413 naming it; byte tokens are counted before the prompt
    is converted to ids (its length in characters, each at least one UTF-8 byte, one token, then in
    bytes), a vocabulary's words or symbols after it is encoded (`text_ids`).
    Audio: `prompt_audio` is a base64 audio file (any format libsndfile reads), resampled to the model's
    rate; a file longer than `max_audio_s` (its header's frames / sample rate, checked before it is
    decoded) is a 413; an empty string, a truncated file of a container with a length field (WAV, RF64,
    AIFF, AU, W64, NIST, ...: "prompt_audio is truncated: N of M frames"), bytes after the declared data
    that are not metadata (`TrailingData`) and a file whose frames give no sample at the model's rate
    ("prompt_audio holds no samples") a 422. No prompt, or a file of no frames, gives no ids (the engine's
    caller starts from silence)."""
    if kind == "text":
        if prompt_audio is not None:
            raise invalid("prompt_audio", "this is a text model: send `prompt` (a string)")
        return text_ids(prompt or "", "prompt", max_tokens, vocab)
    if prompt is not None:
        raise invalid("prompt", "this is an audio model: send `prompt_audio` (a base64 audio file)")
    if prompt_audio is None:
        return []
    data = b64decode(prompt_audio, "prompt_audio")
    if not data:  # (libsndfile's answer, "Format not recognised", did not say it was empty)
        raise invalid("prompt_audio", "prompt_audio is empty: send a base64 audio file, or leave it out")
    try:
        x, _ = decode(data, sample_rate, max_audio_s)
    except AudioTooLong as exc:
        raise prompt_too_long(f"prompt_audio: {exc} (max_audio_s)", "prompt_audio") from None
    except AudioTruncated as exc:
        raise invalid(
            "prompt_audio",
            f"prompt_audio is truncated: {exc.frames} of {exc.declared} frames (its header declares more "
            "data than the file holds: send the whole file)",
        ) from None
    except NoSamples as exc:
        msg = f"prompt_audio {str(exc).removeprefix('the audio ')}: leave it out to start from silence"
        raise invalid("prompt_audio", msg) from None
    except ValueError as exc:
        raise invalid("prompt_audio", f"prompt_audio: {exc}") from None
    return encode_samples(x, codec).tolist()


def audio_frame_ids(data: bytes, encoding: str, codec: Codec = MULAW) -> list[int]:
    """A binary WebSocket frame of prompt samples → the model's ids (mulaw frames are the ids themselves: a
    mu-law model's, `check_encoding`); pcm16 frames by `pcm16_ids`, so the server's own pcm16 output
    comes back as the ids it was made from."""
    if encoding == "mulaw":
        return list(data)
    if len(data) % 2:
        raise invalid("audio", f"a pcm16 frame must hold whole 2-byte samples, got {len(data)} bytes")
    return pcm16_ids(codec)[np.frombuffer(data, dtype="<i2").astype(np.int64) + 32768].tolist()


def encode_samples(x: np.ndarray, codec: Codec = MULAW) -> np.ndarray:
    """Float samples in [-1, 1] (a decoded prompt file) → int64 ids of `codec`: a sample that is a 16-bit
    value v / 32768 exactly (a 16-bit file at the model's rate: the server's WAV output sent back) by
    `pcm16_ids`, any other by `codec.encode`."""
    x = np.asarray(x, dtype=np.float32)
    v = x.astype(np.float64) * 32768
    exact = (v == np.round(v)) & (v >= -32768) & (v <= 32767)
    ids = np.empty(x.shape, dtype=np.int64)
    ids[exact] = pcm16_ids(codec)[v[exact].astype(np.int64) + 32768]
    if not exact.all():  # (each sample encoded once: a 16-bit file's are all looked up)
        ids[~exact] = codec.encode(x[~exact])
    return ids


@functools.cache
def pcm16_table(codec: Codec = MULAW) -> np.ndarray:
    """(256,) little-endian int16: the pcm16 sample of each id of `codec` (a mu-law convention or linear),
    computed once per codec by the per-sample path (to_pcm16 of its decode), so a lookup is bit-identical
    to it."""
    table = np.frombuffer(to_pcm16(codec.decode(np.arange(256))), dtype="<i2")
    table.flags.writeable = False
    return table


@functools.cache
def pcm16_ids(codec: Codec = MULAW) -> np.ndarray:
    """(65536,) int64, non-decreasing: the id of each 16-bit sample value (index v + 32768) for `codec`:
    `codec.encode` of v / 32768 (the codec's own rule), except that each id's own pcm16 value
    (`pcm16_table`) and the values above it up to where the codec's rule reaches that id are that id.
    So pcm16 the server sent comes back as the same ids: in the official "s4" mu-law convention and in
    linear quantization a decoded id is its bin's lower edge, which their encode (its 0.01 margin) put
    one bin lower for 127 of the 256 ids; the values changed (249 of 65,536 in "s4", 217 in linear, each
    by one id) are nearer to the id's own sample than to the one below's. In our "s4serve" convention
    the table is exactly the encode. Built once per codec."""
    table = codec.encode(np.arange(-32768, 32768, dtype=np.float32) / 32768)
    own = pcm16_table(codec).astype(np.int64) + 32768
    if not (np.diff(own) > 0).all():  # (never so for the three codecs: each id has its own 16-bit value)
        raise ValueError(f"{codec.name}: the ids' pcm16 values do not increase")
    table[own] = np.arange(256)
    table = np.maximum.accumulate(table)
    table.flags.writeable = False
    return table


def check_encoding(encoding: str, codec: Codec, model_id: str) -> None:
    """422 naming audio_encoding for `mulaw` frames (the ids as bytes) from or to a model whose ids are not
    mu-law: a client would read linear ids as mu-law."""
    if encoding == "mulaw" and isinstance(codec, Linear8):
        raise invalid(
            "audio_encoding",
            f"model {model_id}'s audio tokens are 8-bit linear (quantization linear), not mu-law: use pcm16",
        )


def audio_bytes(ids, encoding: str, codec: Codec = MULAW) -> bytes:
    """Generated ids (a list or an integer array of values 0..255) → the client's binary encoding:
    `mulaw` the ids as bytes, `pcm16` s16le samples by a table lookup (one numpy gather)."""
    x = np.asarray(ids, dtype=np.uint8)
    if encoding == "mulaw":
        return x.tobytes()
    return pcm16_table(codec)[x].tobytes()


def frame_samples(frame_ms: int, sample_rate: int) -> int:
    """Samples in one frame of `frame_ms` milliseconds at `sample_rate` Hz: round(ms × rate / 1000),
    at least 1 (20 ms: 160 at 8 kHz, 320 at 16 kHz, 882 at 44.1 kHz)."""
    return max(1, round(frame_ms * sample_rate / 1000))


class AudioFramer:
    """Generated mu-law ids → frames of exactly `samples` samples each, for streaming: whole blocks of
    ids go in (as the engine hands them over), whole frames come out, the rest waits for the next
    block; `flush` gives the last, shorter frame. No per-sample Python: ids are gathered into one
    uint8 array per block and encoded by `audio_bytes` per frame. Holds fewer than `samples` ids."""

    def __init__(self, samples: int, encoding: str = "pcm16", codec: Codec = MULAW) -> None:
        if samples < 1:
            raise ValueError(f"a frame holds at least one sample, got {samples}")
        self.samples, self.encoding, self.codec = samples, encoding, codec
        self.rest = np.empty(0, dtype=np.uint8)
        self.frames = 0  # frames given out, the last short one included
        self.total = 0  # samples given out

    def feed(self, ids) -> list[np.ndarray]:
        """The complete frames that `ids` (list or array of ids 0..255) finishes: uint8 arrays of
        `samples` ids each (possibly none)."""
        x = np.asarray(ids, dtype=np.uint8)
        if self.rest.size:
            x = np.concatenate([self.rest, x])
        whole = len(x) - len(x) % self.samples
        self.rest = x[whole:].copy()
        frames = np.split(x[:whole], whole // self.samples) if whole else []
        self.frames += len(frames)
        self.total += whole
        return frames

    def flush(self) -> np.ndarray | None:
        """The last frame (fewer than `samples` ids), or None when nothing is left."""
        if not self.rest.size:
            return None
        last, self.rest = self.rest, np.empty(0, dtype=np.uint8)
        self.frames += 1
        self.total += len(last)
        return last

    def encode(self, frame: np.ndarray) -> bytes:
        """One frame in the client's binary encoding (mulaw: the ids; pcm16: s16le)."""
        return audio_bytes(frame, self.encoding, self.codec)


def wav(ids: list[int], sample_rate: int, codec: Codec = MULAW) -> bytes:
    return wav_bytes(codec.decode(ids), sample_rate)


class TextAssembler:
    """Generated byte ids → text pieces, for streaming. Multi-byte characters are held back until
    complete, and so is any tail that could be the start of a stop sequence, so the pieces always
    add up to the final text (which ends before the stop sequence)."""

    def __init__(self, stops: list[bytes], carry: bytes = b"", ends: bool = True, token_bytes=None) -> None:
        """carry: an unfinished character from the session's earlier output (its first bytes), where this
        text begins: a stop sequence it begins ends the text before it (stops are matched on carry + the
        generated bytes, as the engine matches them: `Engine._stop_at`);
        ends: `finish` ends the text (U+FFFD for an unfinished character) rather than holding it back
        for a later generation on the same session. A stop sequence always ends the text. token_bytes:
        ids → the UTF-8 bytes of their text (a vocabulary's); None: each id is its byte."""
        TEXT.stream_decoder(carry)  # (ValueError unless carry begins a character and does not end it)
        self.stops = [s for s in stops if s]
        self.held_by_stop = [0] * len(self.stops)  # each stop's longest prefix that buf ends with (< len)
        self.token_bytes = token_bytes
        self.ends_at: list[int] = []  # (word tokens) each token's end in buf
        self.buf = bytearray(carry)  # the text's bytes: the carried ones, then the generated ones
        self.carried = len(carry)
        self.emitted = 0
        self.decoder = TEXT.stream_decoder()
        self.ends = ends
        self.parts: list[str] = []
        self._held(self.carried)

    def _held(self, new: int) -> int:
        """Length of the longest tail of buf that is a proper prefix of a stop sequence, after `new` more
        bytes. A stop's longest such prefix is at most its previous one plus the new bytes (the part of
        it before them was a tail that was such a prefix then), so its search starts there: the
        endswith checks of a generation add up to its bytes plus its hand-overs per stop (KMP's
        argument). Searching from each stop's full length made every hand-over cost the stops' total
        length: 16 stops of 64 four-byte characters, 0.5 ms of the event loop per hand-over, and 64
        such streams took /healthz from 10 ms to 160-190 ms (p50)."""
        for i, s in enumerate(self.stops):
            k = min(len(s) - 1, len(self.buf), self.held_by_stop[i] + new)
            while k and not self.buf.endswith(s[:k]):
                k -= 1
            self.held_by_stop[i] = k
        return max(self.held_by_stop, default=0)

    def _emit(self, end: int, final: bool = False) -> str:
        piece = self.decoder.decode(bytes(self.buf[self.emitted : end]), final=final)
        self.emitted = max(self.emitted, end)
        self.parts.append(piece)
        return piece

    def feed(self, ids: list[int]) -> str:
        start = len(self.buf)
        if self.token_bytes is None:
            self.buf.extend(i & 0xFF for i in ids)
        else:
            for i in ids:
                self.buf += self.token_bytes([i])
                self.ends_at.append(len(self.buf))
        end = len(self.buf) - self._held(len(self.buf) - start)
        # a stop that ends in the new bytes (a word's text is several: counting tokens missed a stop that
        # starts early in a long word, and its text went out)
        stop = find_stop(bytes(self.buf), self.stops, len(self.buf) - start)
        return self._emit(end if stop is None else min(end, stop))

    def finish(self, stop_at: int | None) -> str:
        """The rest of the text, up to the stop sequence (when one ended the generation; `stop_at` in the
        text's bytes, the carried ones first: `Finished.stop_at`); an unfinished
        character at its end is held back when the text goes on in a later generation (not `ends`, no
        stop sequence), else it becomes U+FFFD."""
        if stop_at is None:
            return self._emit(len(self.buf), final=self.ends)
        return self._emit(stop_at, final=True)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def tokens_emitted(self) -> int:
        """Tokens whose text has all been emitted."""
        if self.token_bytes is None:
            return max(0, self.emitted - self.carried)
        return bisect.bisect_right(self.ends_at, self.emitted)
