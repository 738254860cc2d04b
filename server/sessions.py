"""Sessions: the session table (a pluggable record store), the state slot pool, and the binary state
export format.

A session is a slot in its model's state pool plus a small host record. The record's `pending` token
is the last token of the session's input, not yet fed to the model: the state holds everything before
it, and the next generation starts by stepping it. So "append A, then append B" and "append A+B" leave
the same (state, pending) up to float rounding, and a session continues exactly like one-shot
generation on the concatenated input.

Threads: records are read and claimed by the event loop and updated by the engine thread, under the
table's lock; the pool's tensors are touched only by the engine thread (the lock guards the free list).
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import torch

from server.errors import busy, not_found, over_capacity


@dataclass
class SessionRecord:
    id: str
    model: str
    slot: int
    n_tokens: int = 0  # tokens in the session: ingested + pending
    pending: int | None = None  # last input token, not yet ingested
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False  # a request is running on it
    generated: int = 0  # tokens generated so far by the running request
    ephemeral: bool = False  # a one-shot request's session: deleted when the request ends
    has_state: bool = False  # the engine has set up its slot (a new record's slot holds stale data)

    def info(self, state_bytes: int) -> dict:
        return {
            "session_id": self.id,
            "model": self.model,
            "tokens": self.n_tokens,
            "state_bytes": state_bytes,
            "status": "busy" if self.busy else "idle",
            "generated": self.generated,
            "created": self.created,
            "last_used": self.last_used,
        }


def new_session_id() -> str:
    return "sess-" + uuid.uuid4().hex


class SessionStore(Protocol):
    """Where session records live. In memory now; a shared store (Redis) can implement the same four
    methods later, with states moved through export/import."""

    def get(self, session_id: str) -> SessionRecord | None: ...
    def put(self, record: SessionRecord) -> None: ...
    def delete(self, session_id: str) -> None: ...
    def values(self) -> list[SessionRecord]: ...


class MemorySessionStore:
    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}

    def get(self, session_id: str) -> SessionRecord | None:
        return self._records.get(session_id)

    def put(self, record: SessionRecord) -> None:
        self._records[record.id] = record

    def delete(self, session_id: str) -> None:
        self._records.pop(session_id, None)

    def values(self) -> list[SessionRecord]:
        return list(self._records.values())


class SessionTable:
    """Session records by id, with the claim protocol: one request at a time per session."""

    def __init__(self, store: SessionStore | None = None) -> None:
        self.store: SessionStore = store if store is not None else MemorySessionStore()
        self._lock = threading.Lock()

    def add(self, record: SessionRecord) -> None:
        with self._lock:
            self.store.put(record)

    def get(self, session_id: str) -> SessionRecord:
        with self._lock:
            rec = self.store.get(session_id)
        if rec is None or rec.ephemeral:
            raise not_found(f"no session {session_id!r}", param="session_id")
        return rec

    def claim(self, session_id: str) -> SessionRecord:
        """Mark a session busy for one request; 404 if unknown, 409 if already busy."""
        with self._lock:
            rec = self.store.get(session_id)
            if rec is None or rec.ephemeral:
                raise not_found(f"no session {session_id!r}", param="session_id")
            if rec.busy:
                raise busy(session_id)
            rec.busy, rec.generated = True, 0
            return rec

    def release(self, rec: SessionRecord) -> None:
        with self._lock:
            rec.busy, rec.last_used = False, time.time()

    def remove(self, session_id: str) -> None:
        with self._lock:
            self.store.delete(session_id)

    def claim_expired(self, model: str, ttl_s: float, now: float | None = None) -> list[SessionRecord]:
        """Claim every idle session of `model` unused for more than ttl_s (for deletion)."""
        now = time.time() if now is None else now
        out = []
        with self._lock:
            for rec in self.store.values():
                if rec.model == model and not rec.busy and not rec.ephemeral and now - rec.last_used > ttl_s:
                    rec.busy = True
                    out.append(rec)
        return out

    def has(self, session_id: str) -> bool:
        with self._lock:
            return self.store.get(session_id) is not None

    def records(self, model: str) -> list[SessionRecord]:
        """Every session of `model` (one-shot requests' included)."""
        with self._lock:
            return [r for r in self.store.values() if r.model == model]

    def count(self, model: str) -> int:
        with self._lock:
            return sum(1 for r in self.store.values() if r.model == model)


class SlotPool:
    """Preallocated per-session state on the device: one slot = one sequence's recurrent state
    (n_layers, H, 2, M) plus the set of tokens it has seen (for the repetition penalty).

    `state` is (n_layers, capacity, H, 2, M) float32 and `seen` (capacity, V) bool. Reserving and
    freeing slots is thread-safe; reading or writing the tensors belongs to the engine thread."""

    def __init__(self, state: torch.Tensor, vocab_size: int) -> None:
        self.state = state
        self.capacity = state.shape[1]
        self.seen = torch.zeros(self.capacity, vocab_size, dtype=torch.bool, device=state.device)
        self.bytes_per_slot = state[:, 0].numel() * state.element_size()
        self._free = list(range(self.capacity - 1, -1, -1))
        self._lock = threading.Lock()

    def reserve(self) -> int:
        """A free slot index; 429 when the pool is full."""
        with self._lock:
            if not self._free:
                raise over_capacity(f"all {self.capacity} session slots are in use", retry_after=1.0)
            return self._free.pop()

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    @property
    def in_use(self) -> int:
        with self._lock:
            return self.capacity - len(self._free)

    # engine thread only -------------------------------------------------------------------------

    def clear(self, slot: int) -> None:
        self.state[:, slot].zero_()
        self.seen[slot].zero_()

    def copy(self, src: int, dst: int) -> None:
        self.state[:, dst].copy_(self.state[:, src])
        self.seen[dst].copy_(self.seen[src])


# ---------------------------------------------------------------------------------------------
# State export format:
#   magic "S4STATE\n" | u16 version | u32 header length | header (UTF-8 JSON) | state (raw float32,
#   little-endian, C order) | SHA-256 of everything before it (32 bytes)

MAGIC = b"S4STATE\n"
STATE_VERSION = 1
_PREFIX = struct.Struct("<8sHI")


class StateFormatError(ValueError):
    """An imported state blob is corrupt, of another version, or for another model."""


def pack_state(header: dict, state: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, STATE_VERSION, len(head)) + head + state
    return body + hashlib.sha256(body).digest()


def unpack_state(blob: bytes) -> tuple[dict, bytes]:
    """Check magic, version, checksum, header and payload length; returns (header, state bytes)."""
    if len(blob) < _PREFIX.size + 32:
        raise StateFormatError(f"state blob is {len(blob)} bytes, too short to be an exported state")
    magic, version, head_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise StateFormatError("not an exported S4 session state (bad magic bytes)")
    if version != STATE_VERSION:
        raise StateFormatError(f"state format version {version} is not supported (expected {STATE_VERSION})")
    body, digest = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise StateFormatError("state checksum mismatch (the blob is corrupt or truncated)")
    start = _PREFIX.size
    try:
        header = json.loads(body[start : start + head_len])
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, ints over 4300 digits, deep nesting
        raise StateFormatError(f"state header is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise StateFormatError("state header is not a JSON object")
    state = body[start + head_len :]
    shape = header.get("shape")
    if header.get("dtype") != "float32" or not isinstance(shape, list):
        raise StateFormatError("state header must give dtype float32 and a shape")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise StateFormatError(f"state shape {shape} is not a list of sizes")
    want = 4
    for d in shape:
        want *= d
    if len(state) != want:
        raise StateFormatError(f"state payload is {len(state)} bytes, shape {shape} needs {want}")
    return header, state


def model_fingerprint(config: dict, weights_sha256: str | None) -> str:
    """Identifies the weights a state belongs to: config + weights checksum."""
    text = json.dumps(config, sort_keys=True) + (weights_sha256 or "")
    return hashlib.sha256(text.encode()).hexdigest()[:32]
