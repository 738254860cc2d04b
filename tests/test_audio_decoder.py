"""Prompt audio decoded in worker processes (server/decoder.py): read_audio's samples and refusals bit for
bit, while what libsndfile's MP3 decoder (mpg123) writes to stderr becomes one log line of ours."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing.popen_forkserver
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import psutil
import pytest
from server_support import ServerThread, b64, process_ready, wait_for

import server.decoder
from bench.audio_decoder import damaged_mp3, encoded, tone
from model.codecs import AudioTooLong, AudioTruncated, NoSamples, read_audio, wav_bytes
from server import Settings
from server.decoder import AudioDecoder, summary
from server.launch import ROOT, free_port

AUDIO = "tiny-audio"
STDERR_LIMIT = 2048  # bytes a server may write to its stderr while it reads a damaged MP3 prompt


@pytest.fixture(scope="module")
def decoder():
    d = AudioDecoder(max_workers=1)
    yield d
    d.close()


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


FORMATS = [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_24"), ("OGG", "VORBIS"), ("OGG", "OPUS")]
FORMATS += [("MP3", None)]


@pytest.mark.parametrize("fmt, subtype", FORMATS)
@pytest.mark.parametrize("target_rate", [None, 8000])
def test_the_decoders_samples_are_read_audios_bit_for_bit(decoder, fmt, subtype, target_rate):
    rate = 48000 if subtype == "OPUS" else 16000
    data = encoded(tone(1.5, rate), rate, fmt, subtype)
    x, got_rate = decoder.read_audio(data, target_rate, 30)
    want, want_rate = read_audio(data, target_rate, 30)
    assert got_rate == want_rate and len(x) > 0 and same_bits(x, want)


@pytest.mark.parametrize(
    "data, target_rate, limit_s, kind",
    [
        (wav_bytes(tone(2.5, 8000), 8000), 8000, 2.0, AudioTooLong),
        (wav_bytes(tone(1.0, 8000), 8000)[:-4000], 8000, 30, AudioTruncated),
        (wav_bytes(np.zeros(1), 44100), 8000, 30, NoSamples),
        (b"not audio at all" * 8, 8000, 30, ValueError),
    ],
)
def test_the_decoders_refusals_are_read_audios(decoder, data, target_rate, limit_s, kind):
    with pytest.raises(kind) as want:
        read_audio(data, target_rate, limit_s)
    with pytest.raises(kind) as got:
        decoder.read_audio(data, target_rate, limit_s)
    assert type(got.value) is type(want.value) and str(got.value) == str(want.value)
    assert vars(got.value) == vars(want.value)  # (AudioTooLong's seconds and limit, AudioTruncated's frames)


def test_what_the_decoder_writes_is_summarised_in_one_line():
    said = b"[layer3.c:1804] error: dequantization failed!\n" * 3 + b"\n[layer3.c:202] error: big_values\n"
    line = summary(said, len(said))
    assert "\n" not in line and line.startswith(f"4 lines ({len(said)} bytes), 2 distinct; most often (3×)")
    assert "dequantization failed!" in line
    assert "in its first 10 bytes" in summary(said[:10], 5000)
    assert len(summary(b"x" * 10_000 + b"\n", 10_001)) < 300


def _decodes_for_ever_in_c(data, target_rate, max_seconds):
    """A decode that does not end in the test's time, in one C call that lets go of the GIL as libsndfile's
    do through cffi (a decoder's loop on a crafted file: OSS-Fuzz's "timeout" findings): PBKDF2 of 2^31 - 1
    rounds, about 12 minutes here."""
    hashlib.pbkdf2_hmac("sha256", b"s4", b"serve", 2**31 - 1)


def _decodes_for_ever_in_python(data, target_rate, max_seconds):  # (model.codecs' own walkers are Python)
    while True:
        pass


def _exits(data, target_rate, max_seconds):  # (a worker's decode that ends its process, as a crash does)
    os._exit(3)


@pytest.mark.parametrize("decode", ["_exits", "_decodes_for_ever_in_c", "_decodes_for_ever_in_python"])
def test_a_decoder_process_that_ends_refuses_that_file_and_the_next_file_is_read(decode, monkeypatch, caplog):
    """A file that ends its worker (a crash), in the pool and then alone, is refused; so is one the decoder
    would decode for ever (a decoder's endless loop on a crafted file), which held its worker for ever: a few
    such prompts held every worker and every audio prompt after them waited for ever. A worker is now ended
    once a file has taken S4_AUDIO_DECODE_CPU_S CPU seconds (here 0.3), the file tried once more alone and
    then refused. The next file is read bit for bit."""
    d = AudioDecoder(max_workers=1, cpu_s=0.3)
    data = wav_bytes(tone(0.5, 8000), 8000)
    why = (
        r"^the audio decoder's process ended while decoding it \(alone, the second time\): a damaged file\?$"
    )
    if decode != "_exits":  # (its worker was ended for the CPU seconds a file may take: it says so)
        why = (
            r"^the file took more than the 0\.3 CPU seconds a file may take to decode "
            r"\(S4_AUDIO_DECODE_CPU_S\), twice: send a shorter file, or one with fewer channels or a lower "
            "sample rate$"
        )
    try:
        with monkeypatch.context() as m:
            m.setattr(server.decoder, "_decode", globals()[decode])
            with pytest.raises(ValueError, match=why):
                d.read_audio(data, 8000, 30)
        x, rate = d.read_audio(data, 8000, 30)
    finally:
        d.close()
    assert rate == 8000 and same_bits(x, read_audio(data, 8000, 30)[0])
    said = [
        r.getMessage() for r in caplog.records if r.name == "server.decoder" and r.levelno == logging.WARNING
    ]
    assert said[0] == "an audio decoder process ended while decoding a prompt: it is tried again alone", said
    assert said[1:] == [
        "an audio decoder process ended while decoding a prompt alone: refused"
        if decode == "_exits"
        else "a prompt took more than the 0.3 CPU seconds a file may take to decode, alone: refused"
    ], said


def test_a_damaged_mp3_prompt_is_one_log_line_not_mpg123s_text_on_stderr(client, capfd, caplog):
    data = damaged_mp3(20)
    want = len(read_audio(data, 8000, 30)[0])  # (in this process: mpg123 writes here, not counted below)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="server.decoder"):
        r = client.post(
            "/v1/generate", json={"model": AUDIO, "prompt_audio": b64(data), "max_new_tokens": 4, "seed": 1}
        )
    err = capfd.readouterr().err
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want
    assert len(err.encode()) < STDERR_LIMIT, err[:500]
    said = [rec.getMessage() for rec in caplog.records if rec.name == "server.decoder"]
    assert len(said) == 1 and "mpg123" in said[0] and "\n" not in said[0]


@pytest.mark.parametrize("name, kind", [("._", "file"), ("._", "directory"), (".AppleDouble", "directory")])
def test_a_server_started_beside_a_resource_fork_name_reads_mp3_and_keeps_mpg123_out_of_stderr(
    model_dirs, tmp_path, capfd, name, kind
):
    """`python -m server` started in a directory holding a `._` file or directory or an `.AppleDouble`
    directory (what macOS and netatalk leave on shared folders) reads MP3 prompts: libsndfile looked for a
    Sound Designer II resource fork there for data it does not recognise by its first bytes, MP3 included,
    and every MP3 prompt was a 422 ("bad data offset"), other data a resource-fork error. A damaged MP3 adds
    one JSON log line to its stderr, not mpg123's text: every line it writes is one of its log lines."""
    (tmp_path / name).mkdir() if kind == "directory" else (tmp_path / name).write_bytes(b"")
    port, err = free_port(), tmp_path / "stderr.log"
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--checkpoints", str(model_dirs["audio"]),
           "--log-level", "info"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "S4_LOG_FORMAT": "json", "OMP_WAIT_POLICY": "PASSIVE"}
    mp3, damaged = encoded(tone(1.5, 16000), 16000, "MP3"), damaged_mp3(20)
    want = [len(read_audio(mp3, 8000, 30)[0]), len(read_audio(damaged, 8000, 30)[0])]
    capfd.readouterr()  # (what mpg123 wrote as this process read the damaged file: not the server's)
    with err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=stderr)
    try:
        assert wait_for(lambda: process_ready(proc, url), 120, 0.2), "the server did not become ready"
        body = {"model": AUDIO, "max_new_tokens": 1, "seed": 1}
        r = httpx.post(url + "/v1/generate", json={**body, "prompt_audio": b64(mp3)}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want[0], r.text
        r = httpx.post(url + "/v1/generate", json={**body, "prompt_audio": b64(b"not audio at all" * 8)})
        assert r.status_code == 422 and "Format not recognised. (send WAV" in r.json()["error"]["message"], (
            r.text
        )
        before = err.stat().st_size
        r = httpx.post(url + "/v1/generate", json={**body, "prompt_audio": b64(damaged)}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == want[1], r.text
        assert wait_for(lambda: b"prompt_audio: the audio decoder wrote" in err.read_bytes(), 10, 0.1)
        written = err.stat().st_size - before
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert written < STDERR_LIMIT, err.read_text()[-2000:]
    assert all(json.loads(line) for line in err.read_text().splitlines())  # (raises on a line of mpg123's)
    since = [json.loads(line) for line in err.read_bytes()[before:].splitlines()]
    said = [x["message"] for x in since if x["logger"] == "server.decoder"]
    assert len(said) == 1 and "error: " in said[0] and "libmpg123" in said[0]


def test_a_ctrl_c_to_the_process_group_leaves_the_decoder_workers_decoding(caplog):
    """A terminal's Ctrl+C sends SIGINT to the whole process group: the server drains, and its decoder
    workers must still decode the prompts it sends them (a worker ended by KeyboardInterrupt broke the
    pool: its next file was tried again on a new one, with a warning)."""

    def workers() -> set[psutil.Process]:  # (the fork server's children: every pool's workers)
        return {
            w
            for p in psutil.Process().children()
            if "forkserver" in " ".join(p.cmdline())
            for w in p.children()
        }

    d = AudioDecoder(max_workers=1)
    data = wav_bytes(tone(0.5, 8000), 8000)
    others = workers()
    try:
        d.start()
        ours = workers() - others
        assert len(ours) == 1
        for p in ours:
            os.kill(p.pid, signal.SIGINT)
        psutil.wait_procs(ours, timeout=1)  # (gone within a second, had it ended)
        with caplog.at_level(logging.WARNING, logger="server.decoder"):
            x, rate = d.read_audio(data, 8000, 30)
    finally:
        d.close()
    assert rate == 8000 and same_bits(x, read_audio(data, 8000, 30)[0])
    assert [r.getMessage() for r in caplog.records if r.name == "server.decoder"] == []


def _cannot_start():  # (a worker's start that fails, as an unguarded main module's import would)
    raise RuntimeError("no worker here")


def test_a_decoder_whose_worker_cannot_start_decodes_in_this_process_and_says_so(monkeypatch, caplog):

    monkeypatch.setattr(server.decoder, "_start_worker", _cannot_start)
    d = AudioDecoder(max_workers=1)
    data = wav_bytes(tone(0.5, 8000), 8000)
    try:
        d.start()
        x, rate = d.read_audio(data, 8000, 30)
    finally:
        d.close()
    assert rate == 8000 and same_bits(x, read_audio(data, 8000, 30)[0])
    said = [r for r in caplog.records if r.name == "server.decoder"]
    assert [r.levelname for r in said] == ["ERROR"] and "did not start" in said[0].getMessage()


def test_the_decoder_workers_and_their_fork_server_end_when_the_server_is_killed():
    """A server ended by SIGKILL (the OOM killer, a supervisor's last resort) left its decoder worker and
    the fork server waiting for ever (a worker holds both ends of its queue's pipes, and the fork server's
    liveness pipe): each killed test server left two processes behind."""
    # (the decoder kept: a pool that is garbage is shut down, its worker with it, which under load came before
    # the count below)
    start = (
        "from server.decoder import AudioDecoder; d = AudioDecoder(1); d.start(); print('ready', flush=True)"
    )
    cmd = [sys.executable, "-c", f"import sys; {start}; sys.stdin.read()"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    left = []
    try:
        assert proc.stdout.readline() == b"ready\n"
        left = psutil.Process(proc.pid).children(recursive=True)  # (the fork server, its worker, the tracker)
        assert len(left) == 3
        proc.kill()
        proc.wait(30)
        gone, alive = psutil.wait_procs(left, timeout=30)
    finally:
        proc.kill()
        for p in left:  # (the processes this test made, and only those: gone already, unless it failed)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert alive == []


def test_an_audio_model_serves_while_its_decoders_first_worker_starts(model_dirs, monkeypatch):
    """The decoder's first worker takes seconds to start (it imports the codecs, torch with them). It was
    awaited before any model served, so an audio server's readiness waited for it; it now starts beside
    serving: here it cannot start at all until the test lets it, and the server is ready, serves an audio
    generation and decodes a prompt (in a worker made on demand), then stops cleanly."""
    release, began = threading.Event(), threading.Event()
    start = AudioDecoder.start

    def held_start(self):
        began.set()
        assert release.wait(60)
        start(self)

    monkeypatch.setattr(AudioDecoder, "start", held_start)
    s = ServerThread(Settings(checkpoints=[str(model_dirs["audio"])])).start()
    try:
        assert began.wait(30) and not release.is_set()
        body = {"model": "tiny-audio", "max_new_tokens": 4, "seed": 1}
        assert httpx.post(s.url + "/v1/generate", json=body, timeout=60).status_code == 200
        wav = wav_bytes(tone(0.1, 8000), 8000)
        r = httpx.post(s.url + "/v1/generate", json={**body, "prompt_audio": b64(wav)}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 800, r.text
    finally:
        release.set()
        s.stop()


@pytest.mark.parametrize("name, kind", [("._", "file"), (".AppleDouble", "directory")])
def test_read_audio_in_a_directory_holding_a_resource_fork_name_says_so(name, kind, tmp_path, monkeypatch):
    """The library's read_audio, in a process of one's own (training data, a script), still meets
    libsndfile's lookup of a Sound Designer II resource fork in the working directory: an MP3 is refused
    there, and the error said only "bad data offset". It now names the file to remove; elsewhere the MP3
    reads. Bytes libsndfile does not know say which formats it reads."""
    mp3 = encoded(tone(0.5, 16000), 16000, "MP3")
    monkeypatch.chdir(tmp_path)
    fork = tmp_path / name
    if kind == "directory":
        fork.mkdir()
    else:
        fork.write_bytes(b"")
    with pytest.raises(ValueError, match=r"bad data offset.*remove it, or decode from another directory"):
        read_audio(mp3, 8000)
    if kind == "directory":
        fork.rmdir()
    else:
        fork.unlink()
    assert len(read_audio(mp3, 8000)[0]) == 4000
    with pytest.raises(ValueError, match=r"Format not recognised\. \(send WAV, FLAC, OGG Vorbis or Opus"):
        read_audio(b"this is no audio file at all, only text" * 4, 8000)


def counted_submits(monkeypatch) -> threading.Semaphore:
    """A semaphore released once for each call any ProcessPoolExecutor takes (its submit), from now on."""
    submitted = threading.Semaphore(0)
    submit = concurrent.futures.ProcessPoolExecutor.submit

    def counted(self, *args, **kwargs):
        future = submit(self, *args, **kwargs)
        submitted.release()
        return future

    monkeypatch.setattr(concurrent.futures.ProcessPoolExecutor, "submit", counted)
    return submitted


def _exits_when_told(data, target_rate, max_seconds):
    """A worker's decode: the file `crash:<fifo>` ends its process, the first time once the test has opened
    and closed that fifo (the files beside it are then in the pool), later at once; other files decode."""
    if not data.startswith(b"crash:"):
        return server.decoder._decode(data, target_rate, max_seconds)  # (the worker's own: the real one)
    fifo = data.removeprefix(b"crash:").decode()
    try:
        os.mkdir(fifo + ".tried")
    except FileExistsError:
        os._exit(3)
    with open(fifo, "rb") as told:
        told.read()
    os._exit(3)


def test_a_file_that_ends_a_worker_costs_the_files_beside_it_a_retry_not_a_refusal(
    tmp_path, monkeypatch, caplog
):
    """A worker's death fails every file its pool holds, not only the one it was decoding: a file that
    crashes libsndfile, sent beside others, made every one of them a 422 ("ended while decoding it (twice):
    a damaged file?"), since they were all in the pool again when it crashed its second time. Each is now
    tried again alone, one at a time: the good files read bit for bit, only the crashing one is refused."""
    fifo = tmp_path / "crash"
    os.mkfifo(fifo)
    monkeypatch.setattr(server.decoder, "_decode", _exits_when_told)
    submitted = counted_submits(monkeypatch)
    d = AudioDecoder(max_workers=1)
    goods = [wav_bytes(tone(0.2 + 0.05 * i, 8000), 8000) for i in range(7)]
    got: dict = {}

    def decode(name, data):
        try:
            got[name] = d.read_audio(data, 8000, 30)
        except ValueError as exc:
            got[name] = exc

    threads = [threading.Thread(target=decode, args=("crash", b"crash:" + str(fifo).encode()))]
    try:
        threads[0].start()
        with open(fifo, "wb"):  # (opens once the worker decoding the crashing file waits on it)
            threads += [threading.Thread(target=decode, args=(i, data)) for i, data in enumerate(goods)]
            for t in threads[1:]:
                t.start()
            for _ in threads:
                assert submitted.acquire(timeout=60)
        for t in threads:
            t.join(120)
    finally:
        d.close()
    assert isinstance(got["crash"], ValueError) and "damaged file?" in str(got["crash"])
    for i, data in enumerate(goods):
        x, rate = got[i]
        assert rate == 8000 and same_bits(x, read_audio(data, 8000, 30)[0])


@pytest.mark.parametrize(
    "failure",
    [
        BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),  # (fork in this process)
        EOFError("unexpected EOF"),  # (fork in the fork server, which then ends: it answers nothing)
        RuntimeError("can't start new thread"),
    ],
)
def test_a_server_where_no_decoder_process_can_be_made_decodes_in_its_own_and_says_so_once(
    model_dirs, monkeypatch, caplog, failure
):
    """A container whose process limit is reached (cgroup pids.max, RLIMIT_NPROC): making a worker fails
    inside ProcessPoolExecutor.submit (fork's EAGAIN here, or the fork server's, which then ends and
    answers EOF). That escaped: every audio prompt was a 500 (the next one could hang), the background
    start's thread died with a traceback. The server now decodes in its own process, with one ERROR line."""

    def cannot_fork(self, process_obj):
        raise failure

    monkeypatch.setattr(multiprocessing.popen_forkserver.Popen, "_launch", cannot_fork)
    wav = wav_bytes(tone(0.1, 8000), 8000)
    body = {"model": AUDIO, "max_new_tokens": 2, "seed": 1, "prompt_audio": b64(wav)}
    with caplog.at_level(logging.WARNING, logger="server.decoder"):
        s = ServerThread(Settings(checkpoints=[str(model_dirs["audio"])])).start()
        try:
            answers = [httpx.post(s.url + "/v1/generate", json=body, timeout=120) for _ in range(3)]
        finally:
            s.stop()
    for r in answers:
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 800, r.text
    said = [r for r in caplog.records if r.name == "server.decoder"]
    assert [r.levelname for r in said] == ["ERROR"], [r.getMessage() for r in said]
    assert "no decoder worker could be started" in said[0].getMessage()


def _waits_then_decodes(data, target_rate, max_seconds):  # (a worker kept waiting: wall time, not CPU)
    time.sleep(1.5)
    return server.decoder._decode(data, target_rate, max_seconds)


def test_the_decode_bound_counts_cpu_seconds_not_wall_seconds(monkeypatch, caplog):
    """A worker that waits (a loaded machine's run queue) is not ended for it: 1.5 s of wall time against a
    0.3 CPU-second bound decodes, in the first worker, with no process ended."""
    monkeypatch.setattr(server.decoder, "_decode", _waits_then_decodes)
    d = AudioDecoder(max_workers=1, cpu_s=0.3)
    data = wav_bytes(tone(0.5, 8000), 8000)
    try:
        x, rate = d.read_audio(data, 8000, 30)
    finally:
        d.close()
    assert rate == 8000 and same_bits(x, read_audio(data, 8000, 30)[0])
    assert not [r for r in caplog.records if r.name == "server.decoder" and "process ended" in r.getMessage()]


def test_a_prompt_that_would_decode_for_ever_is_a_422_naming_prompt_audio_and_the_server_serves_on(
    model_dirs, monkeypatch
):
    """Through the server, with S4_AUDIO_DECODE_CPU_S: the endless file's request is a 422 naming
    prompt_audio, and a prompt sent after it is read."""
    s = ServerThread(Settings(checkpoints=[str(model_dirs["audio"])], audio_decode_cpu_s=0.3)).start()
    body = {"model": AUDIO, "max_new_tokens": 4, "seed": 1}
    wav = b64(wav_bytes(tone(0.1, 8000), 8000))
    try:
        with monkeypatch.context() as m:
            m.setattr(server.decoder, "_decode", _decodes_for_ever_in_c)
            r = httpx.post(s.url + "/v1/generate", json={**body, "prompt_audio": wav}, timeout=120)
        assert r.status_code == 422 and r.json()["error"]["param"] == "prompt_audio", r.text
        assert r.json()["error"]["message"].startswith("prompt_audio: the file took more than the 0.3 CPU"), (
            r.text
        )
        r = httpx.post(s.url + "/v1/generate", json={**body, "prompt_audio": wav}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 800, r.text
    finally:
        s.stop()


def _waits_until_told(data, target_rate, max_seconds):
    """A worker's decode: the file `wait:<fifo>` waits until the test has opened and closed that fifo, then
    decodes a tone; other files decode."""
    if not data.startswith(b"wait:"):
        return server.decoder._decode(data, target_rate, max_seconds)
    with open(data.removeprefix(b"wait:").decode(), "rb") as told:
        told.read()
    return server.decoder._decode(wav_bytes(tone(0.1, 8000), 8000), target_rate, max_seconds)


def test_a_decoder_closes_within_its_wait_and_the_files_it_did_not_decode_get_a_503(tmp_path, monkeypatch):
    """`close` (the server's stop, once its engines have stopped) waited for the file a worker was decoding,
    up to twice S4_AUDIO_DECODE_CPU_S for a hostile file, before the session store's final flush and past
    the stop's documented budget; then the files still queued were decoded in the server's process, with no
    CPU bound (before that they were cancelled: a 500). Now close returns within its wait (here 0.5 s) and
    a kill, the worker ended, and every file it did not decode (the worker's, those in its call queue, those
    cancelled) gets a 503: the engines have stopped, so no decoded prompt could be served. The worker here
    decodes a file that never ends (it waits on a FIFO that the test holds open)."""
    from server.errors import APIError  # noqa: PLC0415

    fifo = tmp_path / "told"
    os.mkfifo(fifo)
    monkeypatch.setattr(server.decoder, "_decode", _waits_until_told)
    submitted = counted_submits(monkeypatch)
    d = AudioDecoder(max_workers=1)
    d.start()  # (the worker ready: the first file is in it when the others queue)
    goods = [wav_bytes(tone(0.2 + 0.05 * i, 8000), 8000) for i in range(4)]
    got: dict = {}

    def decode(name, data):
        try:
            got[name] = d.read_audio(data, 8000, 30)
        except BaseException as exc:  # (CancelledError is not an Exception)
            got[name] = exc

    assert submitted.acquire(timeout=60)  # (start's own call)
    threads = [threading.Thread(target=decode, args=("waits", b"wait:" + str(fifo).encode()))]
    threads += [threading.Thread(target=decode, args=(i, data)) for i, data in enumerate(goods)]
    threads[0].start()
    with open(fifo, "wb"):  # (opens once the worker decodes the waiting file, which then waits for ever)
        for t in threads[1:]:
            t.start()
        for _ in threads:
            assert submitted.acquire(timeout=60)
        pool = d._pool
        worker = next(iter(pool._processes.values()))
        assert wait_for(lambda: pool._call_queue.full() and pool._work_ids.qsize() == 2, timeout=60)
        t0 = time.monotonic()
        closing = threading.Thread(target=d.close, kwargs={"wait_s": 0.5})
        closing.start()
        closing.join(30)
        took = time.monotonic() - t0
        assert not closing.is_alive(), "close waited for the file its worker was decoding"
        for t in threads:
            t.join(60)
        assert not worker.is_alive()
    assert took >= 0.5  # (it gave the file its wait)
    for name in ["waits", *range(len(goods))]:
        err = got[name]
        assert isinstance(err, APIError) and err.status == 503, (name, err)
        assert "shutting down" in err.message and err.retry_after, (name, err.message)
    with pytest.raises(APIError) as e:  # (a file read after close)
        d.read_audio(goods[0], 8000, 30)
    assert e.value.status == 503


def test_prompts_waiting_for_the_decoder_leave_the_servers_other_worker_threads_free(model_dirs):
    """40 audio prompts held in the decoder (more than asyncio's default thread pool holds: min(32, CPUs + 4)
    threads) while a text model's non-streamed OpenAI completion, which serializes its answer in a worker
    thread, answers at once, as do the audio prompts once let go. The waits for the decoder took the default
    pool's threads, which the completions' answers, session store reads and the shutdown share: every such
    answer waited for the prompts' decoding (up to twice S4_AUDIO_DECODE_CPU_S each, a hostile file's)."""
    s = ServerThread(Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])])).start()
    decoder, release, lock = s.state.decoder, threading.Event(), threading.Lock()
    read, held = decoder.read_audio, []

    def held_read(*args):
        with lock:
            held.append(1)
        assert release.wait(120)
        return read(*args)

    decoder.read_audio = held_read
    wav = b64(wav_bytes(tone(0.1, 8000), 8000))
    body = {"model": AUDIO, "max_new_tokens": 4, "seed": 1, "prompt_audio": wav}
    try:
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            try:
                audio = [pool.submit(httpx.post, s.url + "/v1/generate", json=body, timeout=180)
                         for _ in range(40)]  # fmt: skip
                assert wait_for(lambda: len(held) >= 6, timeout=60)  # (the default pool's 6 on 2 CPUs)
                time.sleep(1.0)
                t0 = time.monotonic()
                text = {"model": "tiny-text", "prompt": "hello", "max_tokens": 4, "seed": 1}
                r = httpx.post(s.url + "/v1/completions", json=text, timeout=30)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
                assert time.monotonic() - t0 < 20
                assert len(held) == 40  # every prompt waits in the decoder, none for a thread
            finally:
                release.set()
            assert [f.result().status_code for f in audio] == [200] * 40
    finally:
        s.stop()


def test_the_decoders_waiting_threads_end_at_close_and_a_call_after_it_gets_a_503():
    """`AudioDecoder.call`'s threads are the decoder's own: `close` lets them go (a test process makes many
    servers, each its decoder), and a prompt read after close (the server's stop: its engines have stopped)
    is a 503, not decoded in this process with no CPU bound."""
    import asyncio  # noqa: PLC0415

    from server.errors import APIError  # noqa: PLC0415

    d = AudioDecoder(max_workers=1)
    data = wav_bytes(tone(0.2, 8000), 8000)
    want = read_audio(data, 8000, 30)[0]

    async def read_twice():
        return [await d.call(d.read_audio, data, 8000, 30) for _ in range(2)]

    def waiting() -> set:
        return {t for t in threading.enumerate() if t.name.startswith("s4-decode-wait")}

    before = waiting()
    assert all(same_bits(x, want) for x, _ in asyncio.run(read_twice()))
    assert waiting() - before
    d.close()
    assert wait_for(lambda: not waiting() - before)
    with pytest.raises(APIError) as e:
        asyncio.run(read_twice())
    assert e.value.status == 503 and "shutting down" in e.value.message
