"""Prompt audio files decoded in worker processes (model.codecs.read_audio in a process pool), so that what
libsndfile does to its process stays there:

* libmpg123, its MP3 decoder, writes to file descriptor 2 for each damaged frame it decodes (two lines a
  frame: 316 KB for a 30 s prompt), past the server's logging, and libsndfile gives no way to quiet it.
  A worker's stdout and stderr are a file of its own, read back after each file: what the decoder wrote
  becomes one INFO line of ours (`summary`), or none.
* libsndfile looks for a Sound Designer II resource fork beside the file it reads; bytes given from memory
  have no path, so for any data it does not recognise by its first bytes, MP3 included, it opens `._` and
  `.AppleDouble/` in the working directory (and `/..namedfork/rsrc`): a `._` file or directory, or an
  `.AppleDouble` directory (macOS and netatalk leave both on shared folders), in the server's directory
  made every MP3 prompt a 422 ("bad data offset"), and other data was parsed as SD2 with it as the
  resource fork. A worker works in a directory of its own that it removed at start: nothing can be found
  there. (`/..namedfork/rsrc`, at the root, which only root can make, is still looked up.)
* a file that crashes libsndfile ends a worker, not the server, and so does one it would decode for ever
  (fuzzers find such inputs in decoders: OSS-Fuzz's "timeout" findings): a file may take
  `S4_AUDIO_DECODE_CPU_S` CPU seconds (`_watched`).

The samples are read_audio's own (the same code and libraries, in another process): bit for bit."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures.process import BrokenProcessPool

from model.codecs import read_audio
from server.errors import APIError, unavailable

log = logging.getLogger("server.decoder")

# worker processes at most: each decodes one file at a time; they are started as files come
MAX_WORKERS = min(4, os.cpu_count() or 1)
SUMMARY_LINE_CHARS = 200  # of the decoder's line quoted in the log line
_CAPTURED = 1 << 20  # bytes of a worker's output read back to summarise (the count is of all of it)
SUBMIT_TRIES = 3  # pools a call is offered to when another thread's broken pool refuses it
DECODE_CPU_S = 10.0  # CPU seconds a file may take to decode (S4_AUDIO_DECODE_CPU_S)
WATCH_INTERVAL_S = 0.05  # how often a worker's watchdog reads its CPU time
OVER_CPU_EXIT = 124  # a worker's exit status when a file took more than its CPU seconds (timeout(1)'s)
# threads of its own that wait for the decoder on the requests' behalf (`AudioDecoder.call`): more than its
# workers, so that no prompt waits for a thread while a worker is free
WAITING_THREADS = 64
CLOSE_WAIT_S = 1.0  # at `close`: how long a file a worker is decoding may take to finish before it is ended


def _shutting_down() -> APIError:
    """What a prompt gets when the decoder closed before its file was decoded (the server's stop, after its
    engines stopped: a decoded prompt could not be served there anyway)."""
    return unavailable("the server is shutting down: the audio prompt was not decoded (send it again)")


def _start_worker(over_cpu=None) -> None:
    """A worker's start: its stdout and stderr go to a file of its own (read back after each file), it
    works in an empty directory that it has removed (no path relative to it can be opened; `/` where no
    temporary directory can be made), it ignores SIGINT (a terminal's Ctrl+C reaches the whole process
    group: the server drains, its workers decode what it still sends them), and it ends when the server's
    process does (`_exit_with`). `over_cpu`: its pool's flag in shared memory, which its watchdog sets
    before it ends the worker for a file past its CPU seconds (`_watch`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _over_cpu[0] = over_cpu
    try:
        sink = os.memfd_create("s4serve-decoder-output")  # (Linux: a file in memory)
    except (AttributeError, OSError):
        with tempfile.TemporaryFile() as f:
            sink = os.dup(f.fileno())
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    os.close(sink)
    try:
        empty = tempfile.mkdtemp(prefix="s4serve-decoder-")
        os.chdir(empty)
        os.rmdir(empty)
    except OSError:
        os.chdir("/")
    if (server := multiprocessing.parent_process()) is not None:
        threading.Thread(target=_exit_with, args=(server.sentinel,), daemon=True).start()


def _exit_with(sentinel: int) -> None:
    """A worker's end when the server's process ends, however it ends (SIGKILL, the OOM killer): its
    queue's pipes never report that (a worker holds both ends), so the worker, and the fork server it
    holds open, waited for ever."""
    multiprocessing.connection.wait([sentinel])
    os._exit(0)


def _libc_flush() -> None:
    """C stdio's buffers written out (a C library's printf to stdout is buffered in a file)."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # (no C library loaded by that name: nothing of it to flush)
        pass


def summary(said: bytes, total: int) -> str:
    """What a decoder wrote (`said`: its first bytes; `total`: how many it wrote) as one line: its lines
    and bytes, the line it wrote most often and how often, and how many distinct lines there were."""
    lines = [s.strip() for s in said.decode("utf-8", errors="replace").splitlines() if s.strip()]
    if not lines:
        return f"{total:,} bytes of blank lines"
    counts = collections.Counter(lines)
    line, n = counts.most_common(1)[0]
    if len(line) > SUMMARY_LINE_CHARS:
        line = line[:SUMMARY_LINE_CHARS] + "…"
    more = "" if total <= len(said) else f" in its first {len(said):,} bytes"
    return (
        f"{len(lines):,} lines ({total:,} bytes), {len(counts):,} distinct{more}; most often ({n:,}×): "
        f"{line!r}"
    )


def _decode(data: bytes, target_rate: int | None, max_seconds: float | None):
    """read_audio in a worker: ("ok", samples, rate, said) or ("error", its ValueError's class, args and
    attributes, said), `said` the summary of what the decoder wrote (None: nothing). An exception is sent
    as its parts: pickle rebuilds one by calling its class with `args`, which the codecs' own exceptions
    (AudioTooLong(frames, rate, ...)) do not take."""
    os.lseek(2, 0, os.SEEK_SET)
    os.ftruncate(2, 0)
    try:
        x, rate = read_audio(data, target_rate, max_seconds)
        result = ("ok", x, rate)
    except ValueError as exc:
        result = ("error", type(exc), exc.args, vars(exc))
    sys.stdout.flush()
    sys.stderr.flush()
    _libc_flush()
    total = os.fstat(2).st_size
    said = os.pread(2, min(total, _CAPTURED), 0) if total else b""
    return (*result, summary(said, total) if total else None)


# a worker's watchdog (`_watched`): the CPU time (time.process_time) past which the file it decodes ends it
_deadline: list[float | None] = [None]
_decoding = threading.Event()  # set while the worker decodes a file
_watchdog: list[threading.Thread] = []  # started at the worker's first file
_over_cpu: list = [None]  # its pool's flag (`_Pool.over_cpu`), set before it ends the worker


def _watch() -> None:
    """A worker's watchdog: while a file is decoded, the process's CPU time read every WATCH_INTERVAL_S, and
    the process ended (os._exit(OVER_CPU_EXIT)) once it is past `_deadline`."""
    while True:
        _decoding.wait()
        deadline = _deadline[0]
        if deadline is not None and time.process_time() > deadline:
            if _over_cpu[0] is not None:
                _over_cpu[0].value = 1
            os._exit(OVER_CPU_EXIT)
        time.sleep(WATCH_INTERVAL_S)


def _watched(cpu_s: float, fn, *args):
    """fn(*args) in a worker, which its watchdog (`_watch`) ends once fn has taken more than `cpu_s` CPU
    seconds of this process: a decoder's loop that never ends holds no worker for ever. The watchdog is a
    thread; it runs while the decoder runs, as libsndfile's and soxr's calls are made through cffi, which
    lets go of the GIL, and Python's own loops (model.codecs' chunk walkers) let it go every few
    milliseconds. CPU time, not wall time: a worker kept waiting by a loaded machine is not ended for it."""
    if not _watchdog:
        _watchdog.append(threading.Thread(target=_watch, name="s4-decode-watchdog", daemon=True))
        _watchdog[0].start()
    _deadline[0] = time.process_time() + cpu_s
    _decoding.set()
    try:
        return fn(*args)
    finally:
        _decoding.clear()
        _deadline[0] = None


class _Pool(concurrent.futures.ProcessPoolExecutor):
    """A pool of workers with a flag in shared memory (`over_cpu`) that a worker's watchdog sets before it
    ends the worker for a file past its CPU seconds: a broken pool says only that a worker ended."""

    def __init__(self, max_workers: int, ctx) -> None:
        self.over_cpu = ctx.RawValue("b", 0)
        super().__init__(max_workers, mp_context=ctx, initializer=_start_worker, initargs=(self.over_cpu,))


def _rebuilt(cls: type[ValueError], args: tuple, attrs: dict) -> ValueError:
    """A worker's exception made again from its parts (`_decode`), without calling its class's __init__."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(attrs)
    return exc


class AudioDecoder:
    """read_audio in a pool of worker processes (`MAX_WORKERS`, started as files come; `start` starts one
    ahead). The pool is made on first use and again after a worker died (`BrokenProcessPool`). A worker's
    death fails every file the pool held then, not only the one it was decoding, so each of them is tried
    once more alone, in a worker of its own (one file at a time): only a file that ends that worker too is
    refused, and a file that crashes libsndfile costs the files decoded beside it a retry, not a refusal.
    Where no process can be made (no /dev/shm for multiprocessing's locks, a process limit reached:
    `_no_workers`) it decodes in this process, as read_audio does, and says so once in the log."""

    def __init__(self, max_workers: int = MAX_WORKERS, cpu_s: float = DECODE_CPU_S) -> None:
        self.max_workers = max_workers
        self.cpu_s = cpu_s  # CPU seconds a file may take in a worker (`_watched`)
        self._pool: _Pool | None = None
        self._alone: _Pool | None = None  # one worker: files tried alone
        self._alone_turn = threading.Lock()  # one file at a time in it
        self._lock = threading.Lock()
        self._in_process = False  # (no worker process could be made)
        self._closed = False  # (`close`: every file not decoded yet is refused)
        self._waiting = concurrent.futures.ThreadPoolExecutor(WAITING_THREADS, "s4-decode-wait")  # (`call`)

    async def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), a request's work that waits for this decoder (media.prompt_ids with its
        `read_audio`), awaited in a thread of the decoder's own (`WAITING_THREADS`), in the caller's context
        (its log lines keep the request's id). Not asyncio.to_thread: the prompts waiting for their decoding
        (a hostile file's up to twice `cpu_s`) took the default pool's threads (min(32, CPUs + 4)), which the
        OpenAI routes' answers, the session store's reads and the shutdown wait for too."""
        run = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        try:
            waiting = asyncio.get_running_loop().run_in_executor(self._waiting, run)
        except RuntimeError:  # (closed: its threads let go; a call after `close` gets `read_audio`'s 503)
            return await asyncio.to_thread(run)
        return await waiting

    def _current(self, alone: bool = False) -> _Pool | None:
        """The shared pool (or with `alone`, the one-worker pool), made if there is none; None where files
        are decoded in this process."""
        with self._lock:
            pool = self._alone if alone else self._pool
            if pool is not None or self._in_process:
                return pool
            try:
                ctx = multiprocessing.get_context("forkserver" if os.name == "posix" else "spawn")
                if ctx.get_start_method() == "forkserver":
                    ctx.set_forkserver_preload(["model.codecs"])  # (workers fork with it imported)
                pool = _Pool(1 if alone else self.max_workers, ctx)
            except (OSError, ImportError, NotImplementedError) as exc:
                failed = exc
            else:
                if alone:
                    self._alone = pool
                else:
                    self._pool = pool
                return pool
        self._in_this_process(f"no worker process: {failed}")
        return None

    def _run(self, alone: bool, fn, *args):
        """fn(*args) in a worker of the shared pool (or with `alone`, of the one-worker pool): its result, or
        None where files are decoded in this process (no worker process could be made). Raises APIError 503
        once the decoder is closed: a call after `close`, one it cancelled while queued (a CancelledError out
        of the request was a 500), one whose worker it ended. Raises BrokenProcessPool where a worker of that
        pool ended otherwise while the pool held the call (the pool is let go: the next call makes a new one;
        its `over_cpu`: whether that was a worker ended for a file past its CPU seconds)."""
        for _ in range(SUBMIT_TRIES):
            if self._closed:
                raise _shutting_down()
            if (pool := self._current(alone)) is None:
                return None
            try:
                future = pool.submit(fn, *args)
            except BrokenProcessPool:  # (broken by another thread's file meanwhile)
                self._drop(pool)
                continue
            except (OSError, EOFError, RuntimeError) as exc:
                with self._lock:
                    closed = pool is not self._pool and pool is not self._alone
                if closed:  # (shut down by another thread meanwhile: `_drop`, or `close`)
                    continue
                self._no_workers(pool, exc)  # (no process or thread could be made for it)
                return None
            try:
                return future.result()
            except BrokenProcessPool as exc:
                if self._closed:  # (its worker ended by `close`: not a file's fault, not tried again)
                    raise _shutting_down() from None
                self._drop(pool)
                exc.over_cpu = bool(pool.over_cpu.value)
                raise
            except concurrent.futures.CancelledError:  # (queued when `close` cancelled what its pool held)
                raise _shutting_down() from None
        raise BrokenProcessPool(f"its pool broke {SUBMIT_TRIES} times before it took the file")

    def start(self) -> None:
        """One worker started and ready (the first takes seconds: it imports the codecs, torch with them),
        so the first prompt does not wait for it. Where it cannot start (a worker imports the server's main
        module, as multiprocessing does: a script that starts the server unguarded by `if __name__ ==
        "__main__"` fails there) files are decoded in this process, and the log says so."""
        try:
            self._run(False, int)
        except BrokenProcessPool as exc:  # (the server's main module failed to import in it, say)
            self._in_this_process(f"its decoder worker did not start: {exc}")

    def _in_this_process(self, why: str, pool: _Pool | None = None, cancel: bool = False) -> None:
        """Files are decoded in this process from now on, as read_audio does (no worker process could be
        made, or started: `why`), and the log says so once; the pools (and `pool`, one let go meanwhile)
        are shut down, with `cancel` their queued files cancelled."""
        with self._lock:
            said, self._in_process = self._in_process, True
            pools, self._pool, self._alone = {self._pool, self._alone, pool} - {None}, None, None
        if not said:
            log.error(
                "audio prompts are decoded in the server's process (%s): libsndfile's decoder may write to "
                "its stderr, and a `._` file or `.AppleDouble` directory in its working directory fails MP3 "
                "prompts",
                why,
            )
        for p in pools:
            p.shutdown(wait=False, cancel_futures=cancel)

    def _no_workers(self, pool: _Pool, exc: BaseException) -> None:
        """No worker process (or the pool's thread) could be made (a container's process limit, cgroup
        pids.max or RLIMIT_NPROC, reached; the fork server ended by fork's EAGAIN): `_in_this_process`.
        (submit raised, an EOFError, an OSError or "can't start new thread", out of the request: a 500, and
        the next prompt hung.)"""
        self._in_this_process(f"no decoder worker could be started ({type(exc).__name__}: {exc})", pool, True)

    def _drop(self, pool: _Pool) -> None:
        """A broken pool let go (the next call makes a new one)."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
            if self._alone is pool:
                self._alone = None
        pool.shutdown(wait=False)

    def read_audio(self, data: bytes, target_rate: int | None = None, max_seconds: float | None = None):
        """model.codecs.read_audio(data, target_rate, max_seconds), in a worker: the same samples and rate
        and the same exceptions; what the decoder wrote to its stdout or stderr is one INFO line of this
        log (`summary`). A file whose decoding ends a worker, and then the worker it was tried in alone
        (it crashes libsndfile, or takes more than `cpu_s` CPU seconds there), raises ValueError."""
        args = (data, target_rate, max_seconds)
        try:
            result = self._run(False, _watched, self.cpu_s, _decode, *args)
        except BrokenProcessPool:
            log.warning("an audio decoder process ended while decoding a prompt: it is tried again alone")
            with self._alone_turn:
                try:
                    result = self._run(True, _watched, self.cpu_s, _decode, *args)
                except BrokenProcessPool as exc:
                    if getattr(exc, "over_cpu", False):
                        log.warning(
                            "a prompt took more than the %g CPU seconds a file may take to decode, alone: "
                            "refused",
                            self.cpu_s,
                        )
                        raise ValueError(
                            f"the file took more than the {self.cpu_s:g} CPU seconds a file may take to "
                            "decode (S4_AUDIO_DECODE_CPU_S), twice: send a shorter file, or one with fewer "
                            "channels or a lower sample rate"
                        ) from None
                    log.warning("an audio decoder process ended while decoding a prompt alone: refused")
                    raise ValueError(
                        "the audio decoder's process ended while decoding it (alone, the second time): a "
                        "damaged file?"
                    ) from None
        if result is None:
            return read_audio(*args)
        if result[-1] is not None:
            log.info("prompt_audio: the audio decoder wrote %s", result[-1])
        if result[0] == "error":
            raise _rebuilt(*result[1:4])
        return result[1], result[2]

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Its workers stopped, within `wait_s` seconds: the files queued for them are cancelled, a file a
        worker is decoding gets `wait_s` to finish, then its worker is ended (SIGKILL). A file not decoded
        by then, and any call after close, raises APIError 503 (the server is shutting down; its engines
        have stopped, so a decoded prompt could not be served). Close waited for the files being decoded,
        up to twice S4_AUDIO_DECODE_CPU_S, before the session store's final flush, past the stop's
        documented budget; and decoded the cancelled files in the server's process, with no CPU bound."""
        with self._lock:
            pools, self._pool, self._alone, self._closed = (self._pool, self._alone), None, None, True
        workers = []
        for pool in pools:
            if pool is not None:
                workers += list((getattr(pool, "_processes", None) or {}).values())  # (before shutdown)
                pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + wait_s
        for worker in workers:  # (an idle worker ends at once: shutdown sent it its sentinel)
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                log.warning("an audio decoder process still decoding %g s after the server's stop began: "
                            "ended", wait_s)  # fmt: skip
                worker.kill()
                worker.join(5)
        self._waiting.shutdown(wait=False)  # (its idle threads end; a call waiting in one finishes)
