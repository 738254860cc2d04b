"""Session state store: where session states outlive their slot (idle write-through, TTL eviction,
shutdown) so that a session can resume on another replica or after a restart.

The stored value is the session export format (server/sessions.py: magic, version, header with the
model id, config fingerprint and shape, raw float32 state, pending token, SHA-256), keyed by session id.
`S4_SESSION_STORE=memory` keeps sessions in the process only (no store: nothing outlives the process);
`redis://host:port/db` writes them through to Redis.

Writes never block the engine thread: the engine reads the slot and hands (header, state) to a
`StoreWriter`, whose thread packs and writes them. The writer keeps only the latest operation per
session (a newer write replaces an unwritten older one; a delete replaces a pending write), so its
backlog is bounded by the number of sessions and a delete is never undone by a late write. The
request that made a change waits for it on the event loop (`StoreWriter.landed`, `service.landed`), so
its answer comes after the write has landed (`S4_SESSION_STORE_WRITE_WAIT_S` at most). A delete the store
could not make is tried again until it lands (backing off to DELETE_RETRY_MAX_S), and meanwhile this
replica reads the session as deleted: its copy is gone here, and the store's must not bring it back.
Those deletes are bounded (DELETES_KEPT): a long outage with sessions created and deleted all along grew
them without bound. Once DELETES_KEPT wait, a delete is refused (503) before the session goes here
(`StoreWriter.deletes_full`), so none is ever dropped: the session stays, here and in the store, until
a DELETE sent again once the store answers.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import Future
from typing import Protocol

from server.config import MAX_STORE_TTL_S, REDIS_STORE_SCHEMES, misread_userinfo
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
    if misread_userinfo(url):  # (a password holding '/', '?' or '#': its rest read as path, query or port)
        return "<the configured URL>"
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = f"[{host}]" if ":" in host else host
        netloc = f"{user}:***@{host}" + (f":{port}" if port is not None else "")
    # the query as written but for a password's value (re-encoding it showed ?ssl_ca_certs=/etc/ca.pem as
    # %2Fetc%2Fca.pem), and the URL put back together by hand: urlunsplit wrote unix:///r.sock as unix:/r.sock
    pairs = parts.query.split("&") if parts.query else []
    query = "&".join(
        f"{p.split('=', 1)[0]}=***"
        if urllib.parse.unquote_plus(p.split("=", 1)[0]).lower() == "password"
        else p
        for p in pairs
    )
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


class StateStore(Protocol):
    """Session id → (exported state blob, version). Every write names the versions its writer may have
    stored (compare-and-set): the one it last read or wrote ("" for none), and those of its writes whose
    outcome it could not know (a timeout: such a write may land later). A write whose stored version is
    not among them (a replica whose copy is older than the stored one) is refused (False)."""

    def put(self, session_id: str, blob: bytes, expected: str | tuple[str, ...], version: str) -> bool: ...
    def get(self, session_id: str, refresh: bool = False) -> tuple[bytes, str] | None: ...
    def version(self, session_id: str, refresh: bool = False) -> str | None: ...
    def delete(self, session_id: str) -> None: ...
    def ids(self) -> list[str]: ...
    def close(self) -> None: ...


# A deleted session's version: no writer ever expects it, so every later write of the session is refused.
TOMBSTONE = "deleted"
PROBE_S = 5.0  # after a failed operation, the writer asks the store again this often while idle
PROBE_KEY = "__probe__"  # the key it asks the version of (no session has this id)
PROBE_TTL_MS = 1000  # the start's write check leaves a tombstone of PROBE_KEY for this long
MAYBE_KEPT = 16  # per session, the latest versions of writes whose outcome is unknown (StoreWriter._maybe)
OLDER_KEPT = 16  # per session, the versions this replica wrote before its latest (StoreWriter._older)


def _versions(expected: str | tuple[str, ...]) -> tuple[str, ...]:
    """A write's expected versions: one ("" for none), or several."""
    return (expected,) if isinstance(expected, str) else tuple(expected)


def new_version() -> str:
    """A fresh version for one write: random, so two replicas never make the same one."""
    return secrets.token_hex(8)


class MemoryStateStore:
    """A store in this process (tests, and one process sharing it between several apps)."""

    def __init__(self) -> None:
        self._blobs: dict[str, bytes] = {}
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def put(self, session_id: str, blob: bytes, expected: str | tuple[str, ...], version: str) -> bool:
        with self._lock:
            stored = self._versions.get(session_id)
            if stored is not None and stored not in _versions(expected):
                return False
            self._blobs[session_id], self._versions[session_id] = blob, version
            return True

    def get(self, session_id: str, refresh: bool = False) -> tuple[bytes, str] | None:
        with self._lock:
            blob = self._blobs.get(session_id)
            return None if blob is None else (blob, self._versions[session_id])

    def version(self, session_id: str, refresh: bool = False) -> str | None:
        with self._lock:
            return self._versions.get(session_id)

    def delete(self, session_id: str) -> None:
        with self._lock:
            self._blobs.pop(session_id, None)
            self._versions[session_id] = TOMBSTONE

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._blobs)

    def close(self) -> None:
        pass


# A session is one Redis hash, `state` (the blob) and `v` (its version), so that it expires, and is
# evicted under maxmemory, as one key. A write is a compare-and-set: refused (0) when the stored version
# is not the one the writer last read or wrote (another replica went on with the session, or deleted it:
# the tombstone is a hash with `v` only). No stored version (a new session, or one expired or evicted
# from Redis while a replica held it) accepts the write. A string value is a state stored before versions
# existed: it is read as version "" and replaced by the first write.
_PUT_LUA = """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'hash' then
  local v = redis.call('HGET', KEYS[1], 'v')
  if v then
    local ok = false
    for e in string.gmatch(ARGV[2], '%S+') do
      if e == v then ok = true end
    end
    if not ok then return 0 end
  end
elseif t ~= 'none' then
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'v', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""
# `get` and `version` with ARGV[1] > 0 (`refresh`: a replica about to use the session) first extend a stored
# state's expiry to ARGV[1] ms from now (never shorten it; a tombstone keeps its own): without it the key
# expired S4_SESSION_STORE_TTL_S after its last write while a replica that had restored it later, or kept
# using its copy without a turn (exports, forks), still held it: the other replicas answered 404 for it.
_REFRESH_LUA = """
local function refresh(t)
  local ttl = tonumber(ARGV[1])
  if ttl and ttl > 0 and (t == 'string' or redis.call('HEXISTS', KEYS[1], 'state') == 1) then
    local left = redis.call('PTTL', KEYS[1])
    if left >= 0 and left < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
  end
end
"""
_GET_LUA = (
    _REFRESH_LUA
    + """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' then refresh(t); return {redis.call('GET', KEYS[1]), ''} end
if t ~= 'hash' then return {false, false} end
refresh(t)
return redis.call('HMGET', KEYS[1], 'state', 'v')
"""
)
_VERSION_LUA = (
    _REFRESH_LUA
    + """
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'string' then refresh(t); return '' end
if t ~= 'hash' then return false end
refresh(t)
return redis.call('HGET', KEYS[1], 'v')
"""
)
_DELETE_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
VERSION_TIMEOUT_S = 1.0  # the version check before a turn: a store that does not answer in time is skipped
WRITE_TIMEOUT_S = 5.0  # every other call (a write, a delete, a read to restore): then it has failed


class RedisStateStore:
    """States in Redis, a hash under `s4:session:<id>` each (fields `state` and `v`), expiring `ttl_s`
    after its last write."""

    def __init__(self, url: str, ttl_s: int) -> None:
        import redis  # noqa: PLC0415  (only needed when configured)

        if not 1 <= ttl_s <= MAX_STORE_TTL_S or ttl_s != int(ttl_s):
            raise ValueError(f"the store TTL must be whole seconds in [1, {MAX_STORE_TTL_S}], not {ttl_s!r}")
        self.url, self.ttl_ms = redact_url(url), int(ttl_s) * 1000
        self._errors = (redis.RedisError, OSError)
        try:  # an option of the URL that redis-py cannot use fails here, at the latest at the first ping
            self._redis = redis.Redis.from_url(
                url, socket_timeout=WRITE_TIMEOUT_S, socket_connect_timeout=WRITE_TIMEOUT_S
            )
            # the per-turn version check waits less: a store that hangs costs a turn 1 s, not 5
            self._quick = redis.Redis.from_url(
                url, socket_timeout=VERSION_TIMEOUT_S, socket_connect_timeout=VERSION_TIMEOUT_S
            )
            self._call("cannot connect", self._redis.ping)
        except (TypeError, ValueError, OverflowError) as exc:  # (`?foo=1`: an unexpected keyword argument)
            raise StoreError(
                f"session store {self.url}: redis-py cannot use the URL ({type(exc).__name__}: {exc})",
                "the session store's URL is not usable",
            ) from None
        self._put = self._redis.register_script(_PUT_LUA)
        self._get = self._redis.register_script(_GET_LUA)
        self._version = self._quick.register_script(_VERSION_LUA)
        self._delete = self._redis.register_script(_DELETE_LUA)
        self._check_access(redis.exceptions.OutOfMemoryError)

    def _check_access(self, full: type[Exception]) -> None:
        """At start: this connection may run the store's scripts on the session keys, reading and writing
        (an ACL user without `~s4:*` or without write commands, a URL naming a read-only replica answered
        PING, and the server then served while every operation failed). The write is a tombstone of
        PROBE_KEY that expires in PROBE_TTL_MS; a Redis at maxmemory (`full`) refuses it for want of room,
        not of rights: the server starts, as it serves on while the store is full."""
        probe = [KEY_PREFIX + PROBE_KEY]
        read = self._redis.register_script(_VERSION_LUA)  # (the 5 s client, as the ping: not the 1 s one)
        self._call("cannot read the session keys", lambda: read(keys=probe, args=[0]))

        def write() -> None:
            try:
                self._delete(keys=probe, args=[TOMBSTONE, PROBE_TTL_MS])
            except full as exc:
                log.warning("session store %s is full (%s): sessions are not written until it has room",
                            self.url, exc)  # fmt: skip

        self._call("cannot write the session keys", write)

    def _call(self, reason: str, fn):
        """fn(), with its Redis errors raised as StoreError saying `reason` ("read failed")."""
        try:
            return fn()
        except self._errors as exc:
            kind, detail = type(exc).__name__, str(exc)
            if kind == "AuthenticationError" and "***" not in self.url:  # (redis-py: "HELLO must be called")
                detail = "the Redis server requires a password: give it in the URL, redis://:PASSWORD@host/db"
            raise StoreError(f"session store {self.url}: {reason} ({detail})", f"{reason} ({kind})") from None

    def put(self, session_id: str, blob: bytes, expected: str | tuple[str, ...], version: str) -> bool:
        keys = [KEY_PREFIX + session_id]
        args = [blob, " ".join(v for v in _versions(expected) if v), version, self.ttl_ms]  # (hex: no space)
        return bool(self._call("write failed", lambda: self._put(keys=keys, args=args)))

    def get(self, session_id: str, refresh: bool = False) -> tuple[bytes, str] | None:
        """The stored state and its version; `refresh`: its expiry extended to the store TTL from now."""
        keys, args = [KEY_PREFIX + session_id], [self.ttl_ms if refresh else 0]
        blob, version = self._call("read failed", lambda: self._get(keys=keys, args=args))
        return None if blob is None else (blob, (version or b"").decode())

    def version(self, session_id: str, refresh: bool = False) -> str | None:
        """The stored version; `refresh`: a stored state's expiry extended to the store TTL from now."""
        keys, args = [KEY_PREFIX + session_id], [self.ttl_ms if refresh else 0]
        v = self._call("version check failed", lambda: self._version(keys=keys, args=args))
        return None if v is None else v.decode()

    def delete(self, session_id: str) -> None:
        keys = [KEY_PREFIX + session_id]
        self._call("delete failed", lambda: self._delete(keys=keys, args=[TOMBSTONE, self.ttl_ms]))

    def ids(self) -> list[str]:
        def scan():
            out = []
            for key in self._redis.scan_iter(KEY_PREFIX + "*", count=1000):
                if self._redis.type(key) == b"string" or self._redis.hexists(key, "state"):
                    out.append(key.decode()[len(KEY_PREFIX) :])
            return out

        return self._call("scan failed", scan)

    def close(self) -> None:
        self._redis.close()
        self._quick.close()


def open_store(spec: str, ttl_s: int) -> StateStore | None:
    """`memory` → None (sessions live in the process only); `redis://…` → a connected RedisStateStore."""
    if spec == "memory":
        return None
    if spec.startswith(REDIS_STORE_SCHEMES):
        return RedisStateStore(spec, ttl_s)
    raise ValueError(f"session_store must be 'memory' or a redis:// URL, not {redact_url(spec)!r}")


class ThrottledLog:
    """One logger line per `interval` seconds at most for a recurring condition, the session store
    unreachable, whose every request and every write otherwise logs a line of its own (a fresh-user trial:
    683 lines in 12 s from 4 clients); the first line after a quiet spell says how many were left out. The
    Prometheus counters still count each error. One per server (`StoreWriter.errors`)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger, self.interval = logger, interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._skipped = 0

    def log(self, level: int, msg: str, *args) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next:
                self._skipped += 1
                return
            skipped, self._skipped, self._next = self._skipped, 0, now + self.interval
        if skipped:
            msg += f" ({skipped} more session store error line{'s' * (skipped != 1)} left out before it)"
        self.logger.log(level, msg, *args)


_DELETE = object()
DELETE_RETRY_S = 0.5  # a failed delete is tried again after this, then twice as long each time ...
DELETE_RETRY_MAX_S = 10.0  # ... up to this
DELETES_KEPT = 10_000  # deletes waiting for the store at most (~150 B each here; a full round of tries at
# DELETE_RETRY_MAX_S is 1,000 a second): beyond it a delete is refused before it is made (`deletes_full`)


class StoreWriter:
    """A thread that applies the latest write (or delete) of each session to the store.

    It also keeps the version of each session's state that this replica last read (`adopt`, at a
    restore) or wrote: every write names it (compare-and-set), and `is_current` tells whether a stored
    version is one of this replica's. A write the store refuses (another replica went on with the
    session, or deleted it) is counted `stale`, logged, and `on_stale(session_id, expected)` drops this
    replica's copy if it still builds on `expected`, the version the refused write named (`builds_on`):
    not if the copy was reloaded while the write was in flight, or since.

    A copy this replica lets go of unchanged since its last write (`let_go`) is written "only if missing":
    the writer asks the store for the session's version and writes it only when the store has none (its
    TTL ran out, or it lost the data: a restart without persistence, a flush), so an unchanged copy is
    not written again (refused as stale where another replica went on with it) and is not lost either.
    A delete the store could not make is tried again until it lands (`deleting`)."""

    def __init__(self, store: StateStore, counter=None, on_stale=None, held=None, up=None,
                 error_counter=None) -> None:  # fmt: skip
        self.store = store
        self._pending: dict[str, object] = {}  # id → (header, state, only_if_missing) or _DELETE; in order
        self._retry: dict[str, float] = {}  # id → when a delete the store failed is tried again (not pending)
        self._tries: dict[str, int] = {}  # id → the tries so far of such a delete (waiting or queued again)
        self._cv = threading.Condition()
        self._busy: str | None = None  # the session whose operation is being applied
        self._busy_op: object = None  # that operation
        self._waiting: dict[str, list[Future]] = {}  # session id → `landed` futures of its queued operation
        self._waiting_busy: list[Future] = []  # those of the operation being applied
        self._inflight: str | None = None  # the version that operation writes
        self._superseded: set[str] = set()  # sessions reloaded (adopt, discard) while being written
        self._versions: dict[str, str] = {}  # session id → the version this replica last read or wrote
        # session id → the versions of its writes since whose outcome is unknown (an error: a timed-out
        # write may still land, after a Redis stall): each later write accepts them as well, `is_current`
        # counts them as this replica's (else a late landing read as another replica's reloaded the older
        # state, and the turns written since were lost)
        self._maybe: dict[str, list[str]] = {}
        # session id → the versions that this replica's landed writes of the copy it holds replaced (the
        # latest OLDER_KEPT): one of them stored again means Redis went back in time (restarted from an
        # older snapshot), not that another replica went on: the copy here is newer and is kept and written
        # (it was dropped, and the session rolled back to the snapshot: the turns since lost)
        self._older: dict[str, list[str]] = {}
        self._landed: set[str] = set()  # sessions whose last operation was a write that landed, none since
        self._answering = True  # whether the store answered the last operation (`answered`: gauge, probes)
        self._writes_ok = True  # whether the writer's last write or delete landed (`may_evict`: a store at
        # maxmemory answers reads and refuses writes)
        self._probed = 0.0  # when the idle writer last asked a failing store (`_probe`)
        self._stopping = False
        self.written = self.deleted = self.failed = self.stale = self.unchanged = 0
        self._final: dict | None = None  # the shutdown flush's counts (begin_final)
        self._counter = counter  # a Prometheus counter by op (write, stale, delete, error, unchanged)
        self._error_counter = error_counter  # a Prometheus counter of failures by op (write, delete)
        self._on_stale = on_stale  # session id → drop this replica's copy (any thread)
        self._held = held  # session id → is it held here (its version is kept only while it is)
        self.errors = ThrottledLog(log)  # the store's errors, here and in the routes (service.py)
        self.up = up  # a Prometheus gauge: 1 after an operation the store answered, 0 after one it failed
        self._thread = threading.Thread(target=self._loop, name="session-store", daemon=True)
        self._thread.start()

    def write(self, session_id: str, header: dict, state: bytes, only_if_missing: bool = False) -> Future:
        """Queue a write of the session's state (`only_if_missing`: only if the store holds no version of
        it, for a copy `let_go` says is unchanged since its last write). Returns its `landed` future."""
        return self._queue(session_id, (header, state, only_if_missing))

    def delete(self, session_id: str) -> Future:
        """Queue a delete of the session (a tombstone). Returns its `landed` future."""
        return self._queue(session_id, _DELETE)

    def _queue(self, session_id: str, op) -> Future:
        """Queue `op` for the session at the end, in place of any it had (a failed delete's tries too).
        Returns its `landed` future, taken with the operation: a `landed` asked for after it could find the
        operation applied already ("none")."""
        fut: Future = Future()
        with self._cv:
            self._landed.discard(session_id)
            self._retry.pop(session_id, None)
            self._tries.pop(session_id, None)
            self._pending.pop(session_id, None)  # move to the end: operations stay in order
            self._pending[session_id] = op
            if self._stopping:
                fut.set_result("dropped")
            else:
                self._waiting.setdefault(session_id, []).append(fut)
            self._cv.notify()
        return fut

    def _retry_now(self, session_id: str) -> None:
        """(under _cv) Queue a failed delete waiting for its next try now (its tries kept)."""
        if self._retry.pop(session_id, None) is not None:
            self._pending.setdefault(session_id, _DELETE)
            self._cv.notify()

    def deleting(self, session_id: str) -> bool:
        """Whether a delete of the session is queued, being applied, or waiting to be tried again after
        the store failed it: this replica then reads the session as deleted, whatever the store holds."""
        with self._cv:
            return (
                session_id in self._retry
                or self._pending.get(session_id) is _DELETE
                or (self._busy == session_id and self._busy_op is _DELETE)
            )

    @property
    def deletes_kept(self) -> int:
        """The most deletes that may wait for the store (DELETES_KEPT)."""
        return DELETES_KEPT

    def deletes_full(self) -> bool:
        """Whether DELETES_KEPT deletes wait for the store (queued, being applied, or to be tried again
        after it failed them): the routes then refuse a delete (503) before the session goes here, since a
        delete left out of those the writer tries could let the store's copy come back."""
        with self._cv:
            if len(self._retry) + len(self._pending) + 1 < DELETES_KEPT:  # (the usual case: no count)
                return False
            queued = sum(op is _DELETE for op in self._pending.values())
            busy = self._busy_op is _DELETE and self._busy not in (*self._pending, *self._retry)
            return len(self._retry) + queued + busy >= DELETES_KEPT

    def adopt(self, session_id: str, version: str) -> None:
        """This replica now holds the stored state of `version` (a restore): its writes build on it."""
        with self._cv:
            self._versions[session_id] = version
            self._maybe.pop(session_id, None)
            self._older.pop(session_id, None)
            self._landed.discard(session_id)
            if self._busy == session_id:
                self._superseded.add(session_id)

    def landed(self, session_id: str) -> Future:
        """A future that resolves once the operation of `session_id` queued or being applied now (or a
        later one that replaces it) has been tried against the store, with its outcome: "write",
        "stale" (refused: the store holds a newer state), "delete" or "error"; "dropped" when it is not
        tried (`discard`, the end of the shutdown flush). Resolved already ("none") when there is none.
        The write-through of a turn is queued before its request is answered (the engine thread), so a
        route that waits on this answers once its session is in the store (README "Session store")."""
        fut: Future = Future()
        with self._cv:
            if not self._stopping:
                self._retry_now(session_id)  # (a failed delete: tried again now)
            if session_id in self._pending and not self._stopping:
                self._waiting.setdefault(session_id, []).append(fut)
            elif self._busy == session_id:
                self._waiting_busy.append(fut)
            else:
                fut.set_result("none")
        return fut

    def discard(self, session_id: str) -> None:
        """This replica drops its copy (the store holds a newer state): its unwritten state is not
        written, and its version is forgotten."""
        with self._cv:
            if self._pending.get(session_id) is not _DELETE:
                if self._pending.pop(session_id, None) is not None:
                    _resolve(self._waiting.pop(session_id, ()), "dropped")
            self._versions.pop(session_id, None)
            self._maybe.pop(session_id, None)
            self._older.pop(session_id, None)
            self._landed.discard(session_id)
            if self._busy == session_id:
                self._superseded.add(session_id)

    def let_go(self, session_id: str) -> bool:
        """(engine thread) This replica is about to let go of its copy of a session (idle-TTL eviction,
        shutdown). True when that copy is the one its last write-through stored: it landed and no
        operation came since (every change to a session is written through when it goes idle, so only a
        failed or refused write leaves one unwritten; the engine asks only for a copy no job has changed
        since its last write-through: `Engine._persist_unless_stored`); the caller then writes it only if
        missing (`write(..., only_if_missing=True)`: at a rolling restart the final flush wrote every
        session anew, and a copy that another replica had since gone on from was refused and logged as
        stale), or if the store holds one of the versions that write replaced (`_older`: Redis went back
        in time), and its version is forgotten (a restore reads it anew). False: the caller writes it."""
        with self._cv:
            if session_id not in self._landed:
                return False
            self._landed.discard(session_id)
            self._versions.pop(session_id, None)
            return True

    def is_current(self, session_id: str, stored: str | None) -> bool:
        """Whether `stored` (the store's version of the session, None: nothing stored) leaves this
        replica's copy the latest: nothing stored (new, expired or evicted), or a version this replica
        last read or wrote, or is writing now, or wrote without learning the outcome (`_maybe`), or wrote
        before those on this copy (`_older`: the store went back in time, and the copy here is newer)."""
        with self._cv:
            return stored is None or stored in (
                self._versions.get(session_id, ""),
                self._inflight if self._busy == session_id else None,
                *self._maybe.get(session_id, ()),
                *self._older.get(session_id, ()),
            )

    def builds_on(self, session_id: str, version: str) -> bool:
        """Whether this replica's copy of the session is still the one whose write named `version` (no
        restore or reload since: `adopt`, `discard`)."""
        with self._cv:
            return self._versions.get(session_id, "") == version

    def settle(self, session_id: str, timeout: float) -> None:
        """Wait (up to timeout) until no operation of `session_id` is queued or being applied: a restore
        then reads the version this replica's last write made, not one a write in flight replaces."""
        self._wait(lambda: session_id not in self._pending and self._busy != session_id, timeout)

    def _wait(self, done, timeout: float) -> bool:
        """Wait until done() (called under the lock) is true (True), or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
        return True

    @property
    def backlog(self) -> int:
        """Operations queued or being applied (a failed delete waiting to be tried again included)."""
        with self._cv:
            return len(self._pending) + len(self._retry) + (self._busy is not None)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued operation is applied (True), or timeout (False)."""
        return self._wait(lambda: not self._pending and self._busy is None, timeout)

    def begin_final(self) -> None:
        """The shutdown flush starts: count its operations apart from the lifetime counts; the deletes
        waiting to be tried again are tried now, once more."""
        with self._cv:
            self._final = {"write": 0, "stale": 0, "delete": 0, "error": 0, "first_error": "", "unchanged": 0,
                           "missing": 0, "delete_error": 0, "first_delete_error": ""}  # fmt: skip
            for session_id in list(self._retry):
                self._retry_now(session_id)

    def stop(self, timeout: float) -> tuple[bool, str]:
        """Flush (up to `timeout` in all), then stop the thread and close the store. Returns (whether
        everything was applied, the flush's report: "final flush: N of M sessions written, ...").
        Operations left at the deadline are not attempted."""
        deadline = time.monotonic() + timeout
        ok = self.flush(timeout)
        with self._cv:
            # (a session queued again while written counts once; deletes apart from the sessions to write)
            busy_delete = self._busy is not None and self._busy_op is _DELETE
            unanswered = int(self._busy is not None and not busy_delete)
            queued = [op for sid, op in self._pending.items() if sid != self._busy]
            left = sum(op is not _DELETE for op in queued)
            deletes_left = sum(op is _DELETE for op in queued) + len(self._retry) + busy_delete
            self._pending.clear()
            for futures in self._waiting.values():
                _resolve(futures, "dropped")
            self._waiting.clear()
            self._stopping = True
            self._cv.notify_all()
            self._retry.clear()
            final = self._final or {"write": self.written, "stale": self.stale, "delete": self.deleted,
                                    "error": self.failed, "first_error": "", "unchanged": self.unchanged,
                                    "missing": 0, "delete_error": 0, "first_delete_error": ""}  # fmt: skip
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.store.close()
        ok = ok and not final["error"] and not final["delete_error"] and not deletes_left
        return ok, _report(final, unanswered, left, timeout, deletes_left)

    def _probe(self) -> None:
        """(writer thread) After a failed operation, with nothing else to do: one version read, so that
        `s4_session_store_up` learns the store answers again on a replica that makes no operation of its own
        (it said down until one did: a helper's audit). (`may_evict` waits for a write that lands.)"""
        try:
            self.store.version(PROBE_KEY)
        except Exception:  # (still down: the next probe in PROBE_S)
            self.answered(False)
        else:
            self.answered(True)

    def answered(self, ok: bool) -> None:
        """Record whether the store answered an operation (`up`): the writer's, or a route's read. A failed
        one was an ask: the idle writer's next probe is PROBE_S later (it probed at once after the first
        failure, `_probed` being 0, and the gauge said up again before a scrape could see the failure)."""
        if not ok:
            self._probed = time.monotonic()
        self._answering = ok
        if self.up is not None:
            self.up.set(int(ok))

    def may_evict(self, session_id: str) -> bool:
        """(engine thread) Whether this replica may let go of its copy of the session (idle-TTL or
        slots-full eviction): the store holds that copy (its last write landed and nothing came since:
        `_landed`), or the writer's last write or delete landed, so the eviction's write should too. False
        while the store fails writes and the copy is not known to be stored: it is then the only one, and
        stays here (the README: while the store is down, sessions live on in memory). An eviction let a
        failing store's write go and freed the copy: the session came back from the store older, or not at
        all. (Reads do not count: Redis at maxmemory answers them and refuses writes.)"""
        with self._cv:
            return session_id in self._landed or self._writes_ok

    def _due_retries(self) -> float | None:
        """(under _cv) Queue the failed deletes whose time has come; the seconds until the next one."""
        now, wait = time.monotonic(), None
        for session_id, when in list(self._retry.items()):
            if when <= now:
                self._retry_now(session_id)
            else:
                wait = when - now if wait is None else min(wait, when - now)
        return wait

    def _apply(self, session_id: str, op, tries: int, expected: tuple[str, ...], version: str
               ) -> tuple[str, str, bool]:  # fmt: skip
        """Apply one operation to the store (writer thread, not under _cv): (its outcome, the error's text
        or "", whether it wrote a copy let go of unchanged that the store no longer held)."""
        try:
            if op is _DELETE:
                self.store.delete(session_id)
                if tries:
                    log.info("session %s: its delete landed in the session store at try %d", session_id,
                             tries + 1)  # fmt: skip
                return "delete", "", False
            header, state, only_if_missing = op
            # (a copy let go: its expected versions are "" and `_older`, the ones its last write replaced)
            if only_if_missing and self.store.version(session_id) not in (None, *expected[1:]):
                return "unchanged", "", False  # (this copy, another replica's newer one, or a tombstone)
            ok = self.store.put(session_id, pack_state(header, state), expected, version)
            if ok and only_if_missing:
                log.info("session %s: unchanged since its last write, but no longer in the session store, or "
                         "older there (its TTL ran out, the store lost it, or it went back to an older "
                         "snapshot): written again", session_id)  # fmt: skip
            return ("write" if ok else "stale"), "", ok and only_if_missing
        except Exception as exc:  # the store is down (or a bug): the session lives on in memory
            if op is not _DELETE:
                self.errors.log(logging.WARNING, "session %s not persisted: %s", session_id, exc)
            elif self._final is not None or self._stopping:
                log.warning("session %s: the session store did not delete it: %s", session_id, exc)
            else:  # its copy is gone here: the store's must go too, or another replica serves it
                delay = min(DELETE_RETRY_S * 2**tries, DELETE_RETRY_MAX_S)
                with self._cv:
                    if session_id not in self._pending:  # (no later operation replaced it)
                        self._retry[session_id], self._tries[session_id] = time.monotonic() + delay, tries + 1
                why = "session %s: the store did not delete it (%s); trying again in %g s, until it lands"
                if tries == 0:
                    self.errors.log(logging.WARNING, why, session_id, exc, delay)
                else:
                    log.debug(why, session_id, exc, delay)
            return "error", str(exc), False

    def _loop(self) -> None:
        while True:
            probe = False
            with self._cv:
                while not self._stopping:
                    wait = self._due_retries()
                    if self._pending:
                        break
                    if not self._answering:  # (the store failed last: ask it again every PROBE_S)
                        due = self._probed + PROBE_S - time.monotonic()
                        if due <= 0:
                            probe = True
                            break
                        wait = due if wait is None else min(wait, due)
                    self._cv.wait(wait)
                if probe:
                    self._probed = time.monotonic()
                elif not self._pending:
                    return
                else:
                    session_id = next(iter(self._pending))
                    op = self._pending.pop(session_id)
                    tries = self._tries.pop(session_id, 0) if op is _DELETE else 0
                    expected = (self._versions.get(session_id, ""), *self._maybe.get(session_id, ()),
                                *self._older.get(session_id, ()))  # fmt: skip
                    self._busy, self._busy_op, self._inflight = session_id, op, new_version()
                    self._waiting_busy = self._waiting.pop(session_id, [])
                    self._superseded.discard(session_id)
                    version = self._inflight
            if probe:
                self._probe()
                continue
            done, error, missing = self._apply(session_id, op, tries, expected, version)
            held = done == "write" and (self._held is None or self._held(session_id))  # (not under _cv)
            with self._cv:
                superseded = session_id in self._superseded
                self._superseded.discard(session_id)
                if done in ("write", "delete", "stale"):  # (the outcome is known: earlier unknown ones are
                    self._maybe.pop(session_id, None)  # settled, a late landing now refused by the store)
                elif done == "error" and op is not _DELETE and not superseded:  # (it may land yet)
                    self._maybe[session_id] = [*self._maybe.get(session_id, ()), version][-MAYBE_KEPT:]
                if done == "delete" or (done == "unchanged" and not superseded):
                    self._versions.pop(session_id, None)
                    self._older.pop(session_id, None)
                elif done == "write" and not superseded:
                    if held or session_id in self._pending:
                        if replaced := self._versions.get(session_id):
                            older = [*self._older.get(session_id, ()), replaced]
                            self._older[session_id] = older[-OLDER_KEPT:]
                        self._versions[session_id] = version
                        if session_id not in self._pending:
                            self._landed.add(session_id)
                    else:  # evicted or dropped here: a restore reads the version anew
                        self._versions.pop(session_id, None)
                        self._older.pop(session_id, None)
                # recorded before the operation counts as applied (`flush`, the waiters): a test that broke
                # the store right after a flush saw this write's answer set the gauge back to 1
                self.answered(done != "error")
                if done in ("write", "stale", "delete", "error"):  # (a write or delete tried)
                    self._writes_ok = done != "error"
                self._busy = self._busy_op = self._inflight = None
                counts = {"write": "written", "stale": "stale", "delete": "deleted", "error": "failed",
                          "unchanged": "unchanged"}  # fmt: skip
                setattr(self, counts[done], getattr(self, counts[done]) + 1)
                if self._final is not None:  # (a delete that failed: counted apart from the writes)
                    kind = "delete_error" if done == "error" and op is _DELETE else done
                    self._final[kind] += 1
                    self._final["missing"] += missing
                    first = "first_delete_error" if kind == "delete_error" else "first_error"
                    self._final[first] = self._final[first] or error
                # counted (the counts above, the Prometheus counters) before the waiters learn the outcome
                # (a landed future, flush): one reading the counters after them saw it not counted yet
                if self._counter is not None:
                    self._counter.labels(done).inc()
                if done == "error" and self._error_counter is not None:
                    self._error_counter.labels("delete" if op is _DELETE else "write").inc()
                _resolve(self._waiting_busy, done)
                self._waiting_busy = []
                self._cv.notify_all()
            if done == "stale":
                log.warning(
                    "session %s: the store holds a newer state (another replica went on with it, or deleted "
                    "it); this replica's copy is not written%s",
                    session_id,
                    "" if superseded else " and is dropped",
                )
                if not superseded and self._on_stale is not None:
                    try:
                        self._on_stale(session_id, expected[0])  # (the version it last read or wrote)
                    except Exception:  # never the writer thread's end
                        log.exception("session %s: dropping the stale copy failed", session_id)


def _resolve(futures, outcome: str) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(outcome)


def _report(final: dict, unanswered: int, left: int, timeout: float, deletes_left: int = 0) -> str:
    """The shutdown flush's one line (`unanswered`: a write still waiting for the store at the deadline;
    `left`: writes not attempted; `deletes_left`: deletes not attempted or unanswered). The sessions it
    counts are those to write; deletes are counted apart: one the store did not take (`delete_error`, a
    delete failed at the flush, or `deletes_left`) was counted as a session whose write failed, while it
    means a deleted session the store may still serve."""
    written, failed, stale, deleted = final["write"], final["error"], final["stale"], final["delete"]
    total = written + failed + stale + unanswered + left
    line = f"final flush: {written} of {total} sessions written"
    if final.get("missing"):
        line += (
            f" ({final['missing']} of them unchanged since their last write but no longer in the store, or "
        )
        line += "older there)"
    line += f", {failed} failed"
    if failed:
        line += f" (first: {final['first_error']})"
    if stale:
        line += f", {stale} refused (the store holds a newer state)"
    if unanswered or left:
        line += f", {unanswered} without an answer and {left} not attempted when its {timeout:g} s were up"
    if deleted:
        line += f"; {deleted} deleted"
    if not_made := final.get("delete_error", 0) + deletes_left:
        line += f"; {not_made} delete{'s' * (not_made != 1)} not made"
        if final.get("delete_error"):
            line += f" (first: {final['first_delete_error']})"
        line += f": the store may still serve th{'ose sessions' if not_made != 1 else 'at session'}"
    if final.get("unchanged"):
        line += f"; {final['unchanged']} unchanged since their last write and still stored, not written again"
    return line
