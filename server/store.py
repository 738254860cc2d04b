"""Session state store: where session states outlive their slot (idle write-through, TTL eviction,
shutdown) so that a session can resume on another replica or after a restart.

The stored value is the session export format (server/sessions.py: magic, version, header with the
model id, config fingerprint and shape, raw float32 state, pending token, SHA-256), keyed by session id.
`S4_SESSION_STORE=memory` keeps sessions in the process only (no store: nothing outlives the process);
`redis://host:port/db` writes them through to Redis.

Writes never block the engine thread: the engine reads the slot and hands (header, state) to a
`StoreWriter`, whose thread packs and writes them. The writer keeps only the latest operation per
session (a newer write replaces an unwritten older one; a delete replaces a pending write), so its
backlog is bounded by the number of sessions and a delete is never undone by a late write.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Protocol

from server.config import REDIS_STORE_SCHEMES
from server.sessions import pack_state

log = logging.getLogger("server.store")

KEY_PREFIX = "s4:session:"


class StoreError(RuntimeError):
    """The store cannot be reached or refused an operation. str(): for the operator's log, with the
    store's URL less its password (`redact_url`); `public`: for clients (a 503's message, /readyz),
    without the URL or the driver's text, which can name internal hosts."""

    def __init__(self, message: str, public: str) -> None:
        super().__init__(message)
        self.public = public


def redact_url(url: str) -> str:
    """The URL without its secrets, for logs and errors: the password of its userinfo and a `password`
    query parameter become ***. (A redis URL carries its password: redis://:secret@host:6379/0.)"""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # not a URL one can take apart: show none of it
        return "<the configured URL>"
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{user}:***@{host}" + (f":{port}" if port is not None else "")
    query = urllib.parse.urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in urllib.parse.parse_qsl(parts.query, True)],
        safe="*",
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class StateStore(Protocol):
    """Session id → exported state blob. `put` refuses (False) a state older than the stored one."""

    def put(self, session_id: str, blob: bytes, n_tokens: int) -> bool: ...
    def get(self, session_id: str) -> bytes | None: ...
    def delete(self, session_id: str) -> None: ...
    def ids(self) -> list[str]: ...
    def close(self) -> None: ...


class MemoryStateStore:
    """A store in this process (tests, and one process sharing it between several apps)."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._tokens: dict[str, float] = {}
        self._lock = threading.Lock()

    def put(self, session_id: str, blob: bytes, n_tokens: int) -> bool:
        with self._lock:
            if self._tokens.get(session_id, -1) > n_tokens:
                return False
            self._blobs[session_id], self._tokens[session_id] = blob, n_tokens
            return True

    def get(self, session_id: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(session_id)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._blobs.pop(session_id, None)
            self._tokens[session_id] = float("inf")

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._blobs)

    def close(self) -> None:
        pass


# Write a state unless the store holds a later one of the same session: a session's token count only
# grows, so a replica's stale copy (the client moved to another replica, which went on) or a write
# after a delete (the tombstone counts as infinitely late) is refused instead of overwriting it.
_PUT_IF_NOT_OLDER = """
local stored = redis.call('GET', KEYS[2])
if stored and tonumber(stored) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
_TOMBSTONE = str(2**62)


class RedisStateStore:
    """States in Redis under `s4:session:<id>` (their token counts under `…:tokens`), each expiring
    `ttl_s` after its last write."""

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis  # noqa: PLC0415  (only needed when configured)

        self.url, self.ttl_ms = redact_url(url), max(1, int(ttl_s * 1000))
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._errors = (redis.RedisError, OSError)
        self._put = self._redis.register_script(_PUT_IF_NOT_OLDER)
        self._call("cannot connect", self._redis.ping)

    def _call(self, reason: str, fn):
        """fn(), with its Redis errors raised as StoreError saying `reason` ("read failed")."""
        try:
            return fn()
        except self._errors as exc:
            raise StoreError(
                f"session store {self.url}: {reason} ({exc})", f"{reason} ({type(exc).__name__})"
            ) from None

    def put(self, session_id: str, blob: bytes, n_tokens: int) -> bool:
        keys = [KEY_PREFIX + session_id, KEY_PREFIX + session_id + ":tokens"]
        return bool(
            self._call("write failed", lambda: self._put(keys=keys, args=[blob, n_tokens, self.ttl_ms]))
        )

    def get(self, session_id: str) -> bytes | None:
        return self._call("read failed", lambda: self._redis.get(KEY_PREFIX + session_id))

    def delete(self, session_id: str) -> None:
        key = KEY_PREFIX + session_id

        def tombstone():
            with self._redis.pipeline() as p:  # MULTI/EXEC: both or neither
                p.delete(key)
                p.set(key + ":tokens", _TOMBSTONE, px=self.ttl_ms)
                p.execute()

        self._call("delete failed", tombstone)

    def ids(self) -> list[str]:
        keys = self._call("scan failed", lambda: list(self._redis.scan_iter(KEY_PREFIX + "*", count=1000)))
        return [k.decode()[len(KEY_PREFIX) :] for k in keys if not k.endswith(b":tokens")]

    def close(self) -> None:
        self._redis.close()


def open_store(spec: str, ttl_s: float) -> StateStore | None:
    """`memory` → None (sessions live in the process only); `redis://…` → a connected RedisStateStore."""
    if spec == "memory":
        return None
    if spec.startswith(REDIS_STORE_SCHEMES):
        return RedisStateStore(spec, ttl_s)
    raise ValueError(f"session_store must be 'memory' or a redis:// URL, not {redact_url(spec)!r}")


_DELETE = object()


class StoreWriter:
    """A thread that applies the latest write (or delete) of each session to the store."""

    def __init__(self, store: StateStore, counter=None) -> None:
        self.store = store
        self._pending: dict[str, object] = {}  # session id → (header, state) or _DELETE; insertion order
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self.written = self.deleted = self.failed = self.stale = 0
        self._counter = counter  # a Prometheus counter labelled by op (write, stale, delete, error)
        self._thread = threading.Thread(target=self._loop, name="session-store", daemon=True)
        self._thread.start()

    def write(self, session_id: str, header: dict, state: bytes) -> None:
        with self._cv:
            self._pending.pop(session_id, None)  # move to the end: operations stay in order
            self._pending[session_id] = (header, state)
            self._cv.notify()

    def delete(self, session_id: str) -> None:
        with self._cv:
            self._pending.pop(session_id, None)
            self._pending[session_id] = _DELETE
            self._cv.notify()

    @property
    def backlog(self) -> int:
        with self._cv:
            return len(self._pending) + self._busy

    def flush(self, timeout: float) -> bool:
        """Wait until every queued operation is applied (True), or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    def stop(self, timeout: float) -> bool:
        """Flush (up to timeout), then stop the thread and close the store."""
        ok = self.flush(timeout)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(1.0)
        self.store.close()
        return ok

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if not self._pending:
                    return
                session_id = next(iter(self._pending))
                op = self._pending.pop(session_id)
                self._busy = True
            try:
                if op is _DELETE:
                    self.store.delete(session_id)
                    self.deleted += 1
                    done = "delete"
                else:
                    header, state = op
                    if self.store.put(session_id, pack_state(header, state), header["n_tokens"]):
                        self.written += 1
                        done = "write"
                    else:  # another replica went on with the session, or it was deleted
                        self.stale += 1
                        done = "stale"
                        log.warning(
                            "session %s: the store holds a later state; this copy is not written", session_id
                        )
            except Exception as exc:  # the store is down (or a bug): the session lives on in memory
                self.failed += 1
                done = "error"
                log.warning("session %s not persisted: %s", session_id, exc)
            if self._counter is not None:
                self._counter.labels(done).inc()
            with self._cv:
                self._busy = False
                self._cv.notify_all()
