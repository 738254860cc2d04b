"""Server pieces without a server: settings, text assembly, the state format, checkpoint loading."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from server_support import make_audio_model, wait_for

from model.checkpoint import CheckpointError, save
from server.__main__ import parse_args
from server.config import Settings, default_text, settings_table
from server.launch import free_port
from server.media import TextAssembler
from server.metrics import LATENCY_BUCKETS, Metrics, observe_many
from server.registry import load_models
from server.sessions import SessionTable, StateFormatError, pack_state, unpack_state

ROOT = Path(__file__).resolve().parent.parent


def test_settings_from_env_then_cli_flags(monkeypatch):
    monkeypatch.setenv("S4_MAX_SESSIONS", "7")
    monkeypatch.setenv("S4_CHECKPOINTS", "a, b")
    monkeypatch.setenv("S4_PORT", "9000")
    s = Settings()
    assert (s.max_sessions, s.checkpoints, s.port) == (7, ["a", "b"], 9000)
    assert not s.uses_default_checkpoints()
    s = parse_args(["--max-sessions", "9", "--checkpoints", "c", "d", "--log-level", "debug"])
    assert (s.max_sessions, s.checkpoints, s.port, s.log_level) == (9, ["c", "d"], 9000, "debug")
    assert parse_args(["--checkpoints", "c,d", "e"]).checkpoints == ["c", "d", "e"]  # as the README says
    monkeypatch.setenv("S4_MAX_SESSIONS", "0")
    with pytest.raises(ValueError, match="max_sessions"):
        Settings()
    table = settings_table()
    assert all(f"`S4_{name.upper()}`" in table for name in Settings.model_fields)


def test_help_lists_every_setting_as_a_flag_with_its_env_var(capsys):
    """`python -m server --help` names each setting's env var and default, the README table's
    (argparse %-formats help strings: a '%' in a description crashed it)."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name, field in Settings.model_fields.items():
        shown = default_text(name) or "none"
        assert f"--{name.replace('_', '-')}" in out and f"(env S4_{name.upper()}; default: " in out
        assert "".join(f"S4_{name.upper()}; default: {shown})".split()) in "".join(out.split())  # wrapped
        if "%" in (field.description or ""):
            assert "%" in out
    assert "--model-dtypes MODEL_ID=DTYPE [MODEL_ID=DTYPE ...]" in out and "--api-keys KEY [KEY ...]" in out
    # boolean flags: argparse's type=bool made every non-empty string True ("--cuda-graphs 0" was True)
    for value, want in (("0", False), ("1", True), ("false", False), ("true", True), ("off", False)):
        assert parse_args(["--cuda-graphs", value]).cuda_graphs is want
        assert parse_args(["--require-all-models", value]).require_all_models is want
    with pytest.raises(ValueError, match="cuda_graphs"):
        parse_args(["--cuda-graphs", "maybe"])
    assert "--require-all-models [BOOL]" in out


def test_a_bare_boolean_flag_means_true_and_a_value_still_works():
    """Every boolean setting as a bare flag (the README's table lists them so) is true, before another flag
    or at the end; `--flag false` / `--flag 1` still set it (once, a bare flag was "expected one
    argument")."""
    bools = [name for name, f in Settings.model_fields.items() if f.annotation is bool]
    assert {"require_all_models", "cuda_graphs", "ws_compression"} <= set(bools)
    for name in bools:
        flag = "--" + name.replace("_", "-")
        assert getattr(parse_args([flag]), name) is True
        s = parse_args([flag, "--max-sessions", "3"])
        assert getattr(s, name) is True and s.max_sessions == 3
        assert getattr(parse_args([flag, "false"]), name) is False
        assert getattr(parse_args([flag, "1"]), name) is True
    assert parse_args(["--model-dtypes", "a=bfloat16", "b=float16,c=float32"]).model_dtypes == [
        "a=bfloat16",
        "b=float16",
        "c=float32",
    ]


def test_default_settings_serve_the_shipped_checkpoints_on_loopback(monkeypatch):
    for k in list(os.environ):
        if k.startswith("S4_"):
            monkeypatch.delenv(k)
    s = Settings()
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.checkpoints == [
        "checkpoints/text-shakespeare",
        "checkpoints/audio-digits",
        "checkpoints/audio-digits-s4",
    ]
    assert s.uses_default_checkpoints()


@given(st.lists(st.integers(0, 255), max_size=60), st.integers(1, 7))
def test_streamed_text_pieces_add_up_to_the_final_text(ids, group):
    stops = [b"ab", b"\n\n", "é".encode()]
    whole, pieces = TextAssembler(stops), TextAssembler(stops)
    from model.sampling import find_stop

    stop_at = find_stop(bytes(ids), stops, len(ids))
    if stop_at is not None:  # generation ends at the stop sequence's last byte
        end = min(i + len(s) for s in stops if (i := bytes(ids).find(s)) == stop_at)
        ids = ids[:end]
    whole.feed(ids)
    whole.finish(stop_at)
    out = "".join(pieces.feed(ids[i : i + group]) for i in range(0, len(ids), group)) + pieces.finish(stop_at)
    assert (
        out == whole.text == bytes(ids[: len(ids) if stop_at is None else stop_at]).decode(errors="replace")
    )


def test_a_partial_stop_sequence_is_held_back_until_it_resolves():
    t = TextAssembler([b"END"])
    assert t.feed(list(b"hello E")) == "hello "
    assert t.feed(list(b"N")) == ""
    assert t.feed(list(b"D")) == ""  # complete: never shown
    assert t.finish(stop_at=6) == "" and t.text == "hello "
    t = TextAssembler([b"END"])
    assert t.feed(list(b"EN")) == "" and t.feed(list(b"x")) == "ENx"  # not a stop after all
    t = TextAssembler([])
    assert t.feed(list("é".encode())[:1]) == "" and t.feed(list("é".encode())[1:]) == "é"


def _lines_run(fn, filename: str) -> int:
    """How many lines of `filename` run while `fn()` runs (sys.settrace): a machine-independent count of
    the Python work it does there."""
    count = 0

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != filename:
            return None
        count += event == "line"
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(previous)
    return count


def held_brute_force(buf: bytes, stops: list[bytes]) -> int:
    """The longest tail of buf that is a proper prefix of a stop, by trying every length."""
    return max((k for s in stops for k in range(1, min(len(s) - 1, len(buf)) + 1) if buf.endswith(s[:k])),
               default=0)  # fmt: skip


def test_holding_back_stop_prefixes_costs_the_event_loop_work_in_the_bytes_not_the_stops_length():
    """The text held back as a possible stop's start was searched from each stop's full length at every
    hand-over: 16 stops of 64 four-byte characters (a legal request) cost 0.5 ms of the event loop per
    hand-over, and 64 such streams took /healthz from 10 ms to 160-190 ms. The search now starts at the
    stop's previous match plus the new bytes, so the work of a generation grows with its bytes (and
    hand-overs) per stop: counted in lines run, at most 4 a (byte, stop), where it was 64. The held text
    is the same, at every hand-over, as trying every length (stops that match and break again)."""
    from server import media

    stops = [(chr(0x1F600 + i) * 64).encode() for i in range(16)]  # 16 stops of 256 bytes
    t = TextAssembler(stops)
    lines = _lines_run(lambda: [t.feed(list(b"to be or")) for _ in range(100)], media.__file__)  # 800 B
    assert lines <= 4 * 800 * len(stops), lines
    assert t.text == "to be or" * 100
    stops = [b"ab" * 32, b"abc" * 21, b"b" * 40 + b"c"]  # matched ever longer, then broken
    pieces = [b"ab" * 20, b"b", b"ab" * 31, b"c", b"b" * 39, b"a", b"abab", b"b" * 45]
    t, lines = TextAssembler(stops), 0
    for piece in pieces * 3:
        lines += _lines_run(lambda: t.feed(list(piece)), media.__file__)
        assert max(t.held_by_stop) == held_brute_force(bytes(t.buf), stops), piece
    assert lines <= 4 * (len(t.buf) + 10 * len(pieces) * 3) * len(stops), lines


def test_state_blob_round_trip_and_every_check():
    header = {"model": "m", "fingerprint": "f", "shape": [2, 3, 2, 4], "dtype": "float32", "n_tokens": 1}
    state = bytes(range(192))
    blob = pack_state(header, state)
    assert unpack_state(blob) == (header, state)
    bad = bytearray(blob)
    bad[-40] ^= 0xFF
    for data, needle in [
        (bytes(bad), "checksum"),
        (blob[:10], "too short"),
        (b"NOTMAGIC" + blob[8:], "magic"),
        (pack_state({**header, "shape": [2, 3, 2, 5]}, state), "needs"),
        (pack_state({**header, "dtype": "float16"}, state), "float32"),
        (pack_state({**header, "shape": ["a"]}, state), "sizes"),
    ]:
        with pytest.raises(StateFormatError, match=needle):
            unpack_state(data)


def test_loading_reports_why_a_checkpoint_is_not_served(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default checkpoints do not exist here: skipped quietly
    models, failed = load_models(Settings(max_sessions=2), SessionTable(), Metrics())
    assert models == {} and failed == {}
    settings = Settings(
        checkpoints=[str(model_dirs["audio"]), str(tmp_path / "missing"), str(model_dirs["broken"])],
        max_sessions=2,
    )
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert list(models) == ["tiny-audio"]
    assert "missing" in failed["missing"] and "not valid JSON" in failed["broken"]
    strict = Settings(checkpoints=[str(model_dirs["audio"])], verify_tolerance=1e-12, max_sessions=2)
    models, failed = load_models(strict, SessionTable(), Metrics())
    assert models == {} and failed["tiny-audio"].startswith("VerificationError: layer 0")


def test_the_gil_switch_interval_is_range_checked_and_set_at_load(monkeypatch, tmp_path):
    """S4_GIL_SWITCH_MS (0.05–100 ms, 0.5 by default) becomes the process's switch interval when the
    models load; values out of range are refused by name."""
    import sys

    for bad in ("0", "0.01", "101", "nan"):
        monkeypatch.setenv("S4_GIL_SWITCH_MS", bad)
        with pytest.raises(ValueError, match="gil_switch_ms"):
            Settings()
    monkeypatch.delenv("S4_GIL_SWITCH_MS")
    monkeypatch.chdir(tmp_path)  # no checkpoints here: nothing loads, the setting still applies
    before = sys.getswitchinterval()
    try:
        for ms in (Settings().gil_switch_ms, 2.0):
            load_models(Settings(gil_switch_ms=ms, max_sessions=2), SessionTable(), Metrics())
            assert sys.getswitchinterval() == pytest.approx(ms / 1e3)
        assert Settings().gil_switch_ms == 0.5
    finally:
        sys.setswitchinterval(before)


def _histogram_lines(m: Metrics, name: str) -> dict[str, float]:
    lines = m.render()[0].decode().splitlines()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name) and not line.startswith(f"{name}_created")
    }


TURNS = 20  # event loop turns "at once" may take (collect's wait on two tasks: 4 here)


def test_a_plain_request_whose_client_goes_is_cancelled_at_once_not_at_the_next_poll():
    """service.collect awaits the client's disconnect beside the stream: a request whose client has gone,
    with nothing generated yet, ends with 499 at once (it was noticed by a poll every 0.25 s, so a
    client's retry at a full pool could find the slot still taken: a fresh-user trial). A client still
    there gets the whole generation, and no task is left waiting either way."""
    import asyncio

    from server.engine import Finished, Stream
    from server.errors import APIError
    from server.service import collect

    class Gone:  # a request whose client has gone
        async def receive(self):
            return {"type": "http.disconnect"}

    class There:  # a request whose client waits for the answer
        async def receive(self):
            await asyncio.sleep(3600)

    async def main():
        loop = asyncio.get_running_loop()
        # at once: within a few turns of the event loop, with no timer in between, whatever the clock (it was
        # within 0.2 s of it, a bound a test thread descheduled for 200 ms missed; a poll's 0.25 s timer
        # cannot fire within these turns unless the clock jumps past it)
        gone = asyncio.ensure_future(collect(Stream(loop, 8), Gone()))  # (nothing ever arrives)
        for _ in range(TURNS):
            if gone.done():
                break
            await asyncio.sleep(0)
        assert gone.done()
        with pytest.raises(APIError) as err:
            gone.result()
        assert err.value.status == 499
        stream = Stream(loop, 8)
        stream.queue.put_nowait([1, 2])
        stream.queue.put_nowait([3, Finished("length", 2, 3)])
        ids, final = await asyncio.wait_for(collect(stream, There()), 5)
        assert ids == [1, 2, 3] and final.finish_reason == "length"
        await asyncio.sleep(0)  # (the cancelled tasks finish)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(main()) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_blocks_inter_token_gaps_are_each_rows_token_to_token_times(seed):
    """engine.Gaps (one np.diff per block, a view per row) gives, as a multiset, exactly the gaps of
    each row's tokens in turn: for a row that had tokens before the block, from its last one (`before`)
    to its first of the block, then token to token; for a row whose first token is in the block, token
    to token only. Rows of 1 token, of every token of the block, and a block of one step included."""
    import numpy as np

    from server.engine import Gaps

    rng = np.random.default_rng(seed)
    for steps in (1, 2, 9, 64):
        times = np.cumsum(rng.exponential(1e-3, steps)) + 100.0  # (steps,) seconds, rising
        gaps, want = Gaps(times), []
        for _ in range(20):
            n = int(rng.integers(1, steps + 1))
            if rng.random() < 0.5:  # tokens before the block: its last at `before`
                before = 100.0 - rng.exponential(1e-3)
                gaps.add(n, before)
                want += [times[0] - before] + [times[i] - times[i - 1] for i in range(1, n)]
            else:  # the row's first token is in this block
                gaps.add(n)
                want += [times[i] - times[i - 1] for i in range(1, n)]
        assert gaps.empty == (not want)
        assert sorted(gaps.values().tolist()) == sorted(want)  # the same float subtractions: exact
    assert Gaps(np.array([1.0])).values().size == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_observe_many_counts_like_observe_one_value_at_a_time(seed):
    """Bucket counts equal, the sum to rounding, for values on the bounds, between them, beyond the
    last finite bound, negative, zero, +inf and NaN (in no bucket, as observe)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = np.concatenate([
        np.array(LATENCY_BUCKETS), np.nextafter(np.array(LATENCY_BUCKETS), 1.0), rng.exponential(0.05, 500),
        [0.0, -1.0, 1e9, np.inf, 20.0],
    ])  # fmt: skip
    rng.shuffle(values)
    one, many = Metrics(), Metrics()
    for v in values.tolist():
        one.itl.labels("m").observe(v)
    observe_many(many.itl.labels("m"), values[: len(values) // 3])
    observe_many(many.itl.labels("m"), values[len(values) // 3 :].tolist())  # a list works too
    observe_many(many.itl.labels("m"), [])
    a, b = (_histogram_lines(m, "s4_inter_token_latency_seconds") for m in (one, many))
    assert a.keys() == b.keys() and len(a) == len(LATENCY_BUCKETS) + 3  # buckets + Inf, count, sum
    for k in a:
        if k.endswith("_sum}") or "_sum{" in k:
            assert b[k] == pytest.approx(a[k], rel=1e-12)
        else:
            assert b[k] == a[k], k
    nan_one, nan_many = Metrics(), Metrics()
    nan_one.itl.labels("m").observe(float("nan"))
    observe_many(nan_many.itl.labels("m"), [float("nan")])
    a, b = (_histogram_lines(m, "s4_inter_token_latency_seconds") for m in (nan_one, nan_many))
    assert {k: v for k, v in a.items() if "_sum" not in k} == {k: v for k, v in b.items() if "_sum" not in k}


def test_an_audio_streams_buffer_and_hand_over_period_are_sized_in_time():
    """Text: `stream_buffer` steps; audio: `audio_stream_buffer_ms` of audio at the model's rate when
    that is more (64 samples are 8 ms at 8 kHz: a session would pause before one 20 ms frame)."""
    from types import SimpleNamespace

    from server.service import stream_capacity

    text = SimpleNamespace(kind="text", sample_rate=None)
    audio8k = SimpleNamespace(kind="audio", sample_rate=8000)
    audio16k = SimpleNamespace(kind="audio", sample_rate=16000)
    s = Settings(stream_buffer=64, audio_stream_buffer_ms=250)
    assert stream_capacity(s, text) == 64
    assert stream_capacity(s, audio8k) == 2000 and stream_capacity(s, audio16k) == 4000
    big = Settings(stream_buffer=5000, audio_stream_buffer_ms=250)
    assert stream_capacity(big, audio8k) == 5000  # never below stream_buffer
    assert stream_capacity(Settings(stream_buffer=64, audio_stream_buffer_ms=0), audio8k) == 64
    with pytest.raises(ValueError, match="audio_stream_buffer_ms"):
        Settings(audio_stream_buffer_ms=-1)
    with pytest.raises(ValueError, match="audio_decode_block_ms"):
        Settings(audio_decode_block_ms=201)


def _exit_message(*flags: str) -> str:
    """`python -m server FLAGS` run in this process (server.__main__.main) up to its exit before
    listening: the exit's message. (Each case as its own process cost ~3.5 s of imports in CI.)"""
    from server.__main__ import main as server_main

    with pytest.raises(SystemExit) as stop:
        server_main(list(flags))
    return str(stop.value.code)


def test_a_device_that_cannot_be_used_stops_the_server_before_it_listens(model_dirs, monkeypatch):
    """S4_DEVICE is checked before anything loads: a name that is no device is an invalid setting, and
    cuda on a torch without CUDA (CI's, this machine's), or on a CUDA build without a GPU (PyPI's torch on
    a CPU machine: failed there before), is refused, naming S4_DEVICE. (gpu was refused only after the
    server listened, with torch's message; cuda left /readyz at "loading" for ever, with
    nothing logged: found by a fresh-user trial.)"""
    ckpt = ["--checkpoints", str(model_dirs["text"]), "--port", str(free_port())]
    for device in ("gpu", "cuda:x", "cuda:1234", "CPU"):
        with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
            Settings(device=device)
    monkeypatch.setenv("S4_DEVICE", "gpu")
    assert "invalid settings: S4_DEVICE (--device): must be auto, cpu" in _exit_message(*ckpt)
    monkeypatch.delenv("S4_DEVICE")
    if not torch.cuda.is_available():  # a CPU build of torch (CI's), or a CUDA build without a GPU (PyPI's)
        why = "this torch has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        assert f"S4_DEVICE=cuda: {why}" in _exit_message("--device", "cuda", *ckpt)


def test_a_port_in_use_stops_the_server_before_anything_loads(model_dirs, monkeypatch, caplog):
    """Checked first, not after the models have loaded (seconds to minutes for a converted checkpoint).
    And an S4_* variable that is no setting (a typo) is named in a warning before that."""
    import server.registry

    monkeypatch.setattr(server.registry, "resolve_entry", lambda *a: pytest.fail("a checkpoint was read"))
    monkeypatch.setenv("S4_MAX_SESION", "3")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level("WARNING", logger="server"):
            message = _exit_message("--port", str(port), "--checkpoints", str(model_dirs["text"]))
    assert f"cannot listen on 127.0.0.1:{port} (S4_HOST, S4_PORT)" in message and "in use" in message
    assert "S4_MAX_SESION is not a setting" in caplog.text


def test_no_checkpoint_to_serve_says_why(monkeypatch):
    """An empty S4_CHECKPOINTS is named as such (it said "none of the configured folders exists", though
    none was configured: a fresh-user trial)."""
    monkeypatch.setenv("S4_CHECKPOINTS", "")
    message = _exit_message("--port", str(free_port()))
    assert "no checkpoint to serve: S4_CHECKPOINTS (--checkpoints) names none" in message, message


def test_missing_default_checkpoints_name_the_current_directory_and_the_setting(monkeypatch, tmp_path):
    """The default checkpoints are folders relative to the current directory: started elsewhere, the
    message says so, names that directory and the setting that names other checkpoints (it said only
    "none of the default folders exists": a fresh-user trial)."""
    monkeypatch.delenv("S4_CHECKPOINTS", raising=False)
    monkeypatch.chdir(tmp_path)
    message = _exit_message("--port", str(free_port()))
    assert "no checkpoint to serve: none of the default folders (checkpoints/text-shakespeare" in message
    assert f"exists in the current directory, {tmp_path} (they are relative to it" in message, message
    assert "S4_CHECKPOINTS (--checkpoints)" in message


def test_a_checkpoint_path_that_does_not_exist_is_named_as_such(tmp_path):
    """An entry whose file or folder does not exist: "no such file or folder: PATH", before python -m server
    listens and in what /readyz reports, not "PATH/config.json: missing (a checkpoint is a folder ...)",
    which misled for a mistyped .ckpt (a fresh-user trial)."""
    from server.registry import resolve_entry

    ckpt, folder = tmp_path / "nope.ckpt", tmp_path / "no-folder"
    message = _exit_message("--port", str(free_port()), "--checkpoints", f"mine={ckpt}", str(folder))
    assert (
        f"checkpoint mine={ckpt}: no such file or folder: {ckpt} (an entry is a checkpoint folder" in message
    )
    assert f"checkpoint {folder}: no such file or folder: {folder} (" in message
    assert "config.json: missing" not in message, message
    with pytest.raises(CheckpointError, match="^no such file or folder: .*no-folder "):
        resolve_entry(str(folder), Settings())
    models, failed = load_models(Settings(checkpoints=[f"mine={ckpt}"]), SessionTable(), Metrics())
    assert not models and failed["mine"].startswith(f"CheckpointError: no such file or folder: {ckpt} (")


def test_library_warnings_are_timestamped_log_lines(model_dirs):
    """A warning of the model library (here the fused CPU step's: S4_CFLAGS with unbalanced quotes, so
    the torch ops serve) is a log line of `python -m server`, timestamped like the others, not a bare
    `file:line: RuntimeWarning` on stderr (the KeOps fallback's warning is another)."""
    import re

    port = str(free_port())
    cmd = [sys.executable, "-m", "server", "--checkpoints", str(model_dirs["text"]), "--port", port,
           "--log-level", "info"]  # fmt: skip
    env = {**os.environ, "S4_CFLAGS": "'-DS4_VW=16", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:  # up to "ready", then a stop
            lines.append(line)
            if "ready: serving" in line:
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    out = "".join(lines)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.search(rf"^{stamp} WARNING py\.warnings: .*fused CPU step unavailable", out, re.M), out
    assert not re.search(r"^\S+\.py:\d+: RuntimeWarning", out, re.M), out
    assert "ready: serving tiny-text" in out


def test_an_unexpected_error_while_loading_is_reported_not_left_loading(model_dirs, monkeypatch):
    """Any exception a model's loading raises (an AssertionError from a library, a bug) marks that model
    failed, named with the reason in /readyz, and the others are served; if loading as a whole fails the
    server says so and stops being "loading"."""
    import asyncio

    from server import registry, state
    from server.state import ServerState

    real = registry.load_model

    def flaky(folder, *args, **kw):
        if Path(folder).name == "tiny-audio":
            raise AssertionError("Torch not compiled with CUDA enabled")
        return real(folder, *args, **kw)

    monkeypatch.setattr(registry, "load_model", flaky)
    s = ServerState(Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])]))
    asyncio.run(s.load())
    try:
        assert list(s.models) == ["tiny-text"] and s.fatal is None
        assert s.failed == {"tiny-audio": "AssertionError: Torch not compiled with CUDA enabled"}
    finally:
        for m in s.models.values():
            m.engine.stop()

    def broken(*args, **kw):
        raise AssertionError("a bug")

    monkeypatch.setattr(state, "load_models", broken)
    s = ServerState(Settings(checkpoints=[str(model_dirs["text"])]))
    asyncio.run(s.load())
    assert s.loaded and s.fatal == "loading the models failed: AssertionError: a bug"


def test_api_keys_set_to_nothing_refuse_to_start_instead_of_failing_open(monkeypatch, model_dirs):
    """S4_API_KEYS present but holding no key (empty, commas, spaces: an unset variable in a template)
    stops the server; it used to serve every route without a key, with no log line."""
    for value in ("", ",", " , "):
        monkeypatch.setenv("S4_API_KEYS", value)
        with pytest.raises(ValueError, match="S4_API_KEYS .* holds no key"):
            Settings()
    assert "holds no key" in _exit_message("--checkpoints", str(model_dirs["text"]))
    monkeypatch.setenv("S4_API_KEYS", " k1, ,k2 ")
    assert Settings().api_keys == ["k1", "k2"]
    monkeypatch.delenv("S4_API_KEYS")
    assert Settings().api_keys == []


def test_an_empty_key_variable_beside_a_keys_file_is_refused_with_advice_that_holds(monkeypatch, tmp_path):
    """S4_API_KEYS set to nothing stops the server (an unset variable in a template: never fail open), and
    its line said "unset it to serve without keys"; beside an S4_API_KEYS_FILE, unsetting it serves with
    the file's keys, not without any. The advice now says what unsetting it does there."""
    keys = tmp_path / "keys"
    keys.write_text("k3y-0123456789abcdef\n")
    for name in [k for k in os.environ if k.upper().startswith("S4_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("S4_API_KEYS", "")
    monkeypatch.setenv("S4_API_KEYS_FILE", str(keys))
    with pytest.raises(ValueError, match="holds no key") as refused:
        Settings()
    message = str(refused.value)
    assert "serve without keys" not in message and "S4_API_KEYS_FILE" in message, message
    monkeypatch.delenv("S4_API_KEYS")  # (the advice followed)
    assert Settings().api_keys == ["k3y-0123456789abcdef"]
    monkeypatch.delenv("S4_API_KEYS_FILE")
    monkeypatch.setenv("S4_API_KEYS", "")
    with pytest.raises(ValueError, match="unset it to serve without keys"):  # (no file: as it was)
        Settings()


def test_api_keys_can_come_from_a_file_kept_out_of_the_environment_and_the_command_line(
    monkeypatch, model_dirs, tmp_path
):
    """S4_API_KEYS_FILE (a mounted secret): one key per line, blank lines and # comments skipped, added to
    S4_API_KEYS; a file that cannot be read, or holds no key, stops the server naming the setting (never
    serving without keys), and its keys are in no message."""
    keys = tmp_path / "keys"
    keys.write_text("# ops\n\nk-file-1\n  k with=odd chars  \n#k-commented\n")
    assert Settings(api_keys_file=str(keys)).api_keys == ["k-file-1", "k with=odd chars"]
    monkeypatch.setenv("S4_API_KEYS", "k-env")
    monkeypatch.setenv("S4_API_KEYS_FILE", str(keys))
    assert Settings().api_keys == ["k-env", "k-file-1", "k with=odd chars"]
    monkeypatch.delenv("S4_API_KEYS")
    ckpt = ["--checkpoints", str(model_dirs["text"])]
    empty, latin1 = tmp_path / "empty", tmp_path / "latin1"
    empty.write_text("# none yet\n \n")
    latin1.write_bytes(b"caf\xe9\n")
    for path, why in ((tmp_path / "missing", "No such file or directory"), (tmp_path, "Is a directory"),
                      (empty, "holds no key"), (latin1, "UnicodeDecodeError")):  # fmt: skip
        monkeypatch.setenv("S4_API_KEYS_FILE", str(path))
        message = _exit_message(*ckpt)
        assert "S4_API_KEYS_FILE (--api-keys-file): " in message and why in message, message
        assert "k-file" not in message and "caf" not in message.replace(str(path), "")
    monkeypatch.delenv("S4_API_KEYS_FILE")
    assert "holds no key" in _exit_message("--api-keys-file", str(empty), *ckpt)


def test_a_keys_file_written_on_windows_or_far_too_large_is_read_right_or_refused(
    monkeypatch, model_dirs, tmp_path
):
    """A keys file saved by Windows Notepad (UTF-8 with a byte-order mark, CRLF lines) made its first key
    "\\ufeffk-1", which no client sends: that key was refused with 401 and nothing said why. The mark is
    not part of the key now. A file past a million characters (/dev/zero, a log named by mistake) was
    read whole into memory (or for ever); it now stops the server, naming the setting."""
    windows = tmp_path / "keys.txt"
    windows.write_bytes("k-1\r\n# ops\r\n\r\n  k-2 \r\n".encode("utf-8-sig"))
    assert Settings(api_keys_file=str(windows)).api_keys == ["k-1", "k-2"]
    big = tmp_path / "big"
    big.write_text("k\n" * (1 << 20))
    with pytest.raises(ValueError, match="is over 1,048,576 characters: not a file of keys"):
        Settings(api_keys_file=str(big))
    monkeypatch.setenv("S4_API_KEYS_FILE", "/dev/zero")
    message = _exit_message("--checkpoints", str(model_dirs["text"]))
    assert "S4_API_KEYS_FILE (--api-keys-file): /dev/zero is over" in message, message


def test_a_key_variable_the_server_does_not_read_stops_it_instead_of_serving_without_keys(
    monkeypatch, model_dirs
):
    """S4_API_KEY (what vLLM's users write for VLLM_API_KEY; the client scripts' variable) or a typo of
    the key settings (S4_API_KEY_FILE, Docker's `_FILE` habit) set on a server without S4_API_KEYS: it
    served every route without a key (warning nothing for S4_API_KEY, a line among the others for a
    typo). It now stops before listening, naming the variable and the settings it reads, never the key;
    with server keys configured, or an empty variable, nothing changes."""
    from server.__main__ import misnamed_keys

    monkeypatch.delenv("S4_API_KEYS", raising=False)
    monkeypatch.delenv("S4_API_KEYS_FILE", raising=False)
    ckpt = ["--checkpoints", str(model_dirs["text"]), "--port", str(free_port())]
    for name, what in (("S4_API_KEY", "the client scripts' key"), ("s4_api_key", "the client scripts' key"),
                       ("S4_API_KEY_FILE", "not a setting"), ("S4_APIKEYS", "not a setting"),
                       ("VLLM_API_KEY", "vLLM's setting")):  # fmt: skip
        monkeypatch.setenv(name, "sk-secret-1")
        message = _exit_message(*ckpt)
        assert message.startswith(f"not serving: {name} is set ({what}), but the server reads its keys from "
                                  "S4_API_KEYS (--api-keys) or S4_API_KEYS_FILE"), message  # fmt: skip
        assert "sk-secret" not in message
        monkeypatch.delenv(name)
    assert misnamed_keys({"S4_API_KEY": "k"}, Settings(api_keys="k2")) is None
    assert misnamed_keys({"S4_API_KEY": " "}, Settings()) is None
    assert misnamed_keys({"S4_MAX_SESSIONS": "3", "OPENAI_API_KEY": "sk-1"}, Settings()) is None
    both = misnamed_keys({"S4_API_KEY": "k", "VLLM_API_KEY": "k"}, Settings())
    assert both is not None and both.startswith("S4_API_KEY, VLLM_API_KEY are set (not settings)")


def test_servers_the_tools_launch_do_not_inherit_the_client_key(monkeypatch):
    """The benchmarks' and the load test's own server (server.launch) has no keys: an S4_API_KEY exported
    for a keyed server's clients is not passed on to it, where it would stop it (above)."""
    from server import launch

    class Launched(Exception):
        pass

    def popen(cmd, cwd, env):
        raise Launched(env)

    monkeypatch.setenv("s4_api_key", "k-client")
    monkeypatch.setenv("VLLM_API_KEY", "k-vllm")
    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    with pytest.raises(Launched) as e:
        launch.start_server([], env={"S4_MAX_SESSIONS": "3"})
    env = e.value.args[0]
    assert env["S4_MAX_SESSIONS"] == "3" and not [
        k for k in env if k.upper() in ("S4_API_KEY", "VLLM_API_KEY")
    ]


def test_unknown_s4_variables_are_found_and_log_levels_take_any_case(monkeypatch):
    from server.__main__ import unknown_env

    env = {"S4_MAX_SESION": "3", "S4_MAX_SESSIONS": "3", "S4_CFLAGS": "-O2", "S4_FUZZ_API_EXAMPLES": "9",
           "S4_API_KEY": "k", "S4_DTYPE": "float32", "PATH": "/bin", "S4_PROT": "1"}  # fmt: skip
    assert unknown_env(env) == ["S4_MAX_SESION", "S4_PROT"]
    monkeypatch.setenv("S4_LOG_LEVEL", "DEBUG")
    assert Settings().log_level == "debug"


def test_a_stop_while_the_checks_run_exits_0_at_once(tmp_path):
    """SIGTERM while the checks before listening run (here an official checkpoint's conversion, seconds):
    exit 0 with a log line, not 143 (the default handler's death by the signal)."""
    fixture = ROOT / "tests" / "fixtures" / "official" / "s4_bytes.ckpt"
    cmd = [sys.executable, "-m", "server", "--port", str(free_port()), "--checkpoints", str(fixture),
           "--convert-cache", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while "checking the settings" not in (line := proc.stderr.readline()):
            assert line, "".join(lines)
            lines.append(line)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "SIGTERM before listening: not serving" in err and "Traceback" not in err, err
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_modules_are_imported_exits_0_with_a_line(sig):
    """SIGTERM (or Ctrl-C) in the first second of a start, while torch and the server's modules are imported
    and before logging is set up (a rolling update or a crash loop's restart can send it then): one line on
    stderr and exit 0, not a silent 143 (the default handler's death by the signal) or a KeyboardInterrupt
    traceback. Sent once the process catches SIGTERM (its handlers, SIGTERM's then SIGINT's, are the first
    thing it installs; `import torch` alone takes over a second after). A fixed 0.5 s was not enough on a
    loaded machine, where the interpreter's start took as long: the signal killed it (-15), or Python's
    own SIGINT handler raised KeyboardInterrupt. The handler exits by os._exit: a SystemExit raised into
    the imports once let a start go on past the signal (CI)."""

    def catches_sigterm() -> bool:  # (Linux: the process's caught-signal mask)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        mask = int(re.search(r"(?m)^SigCgt:\s*([0-9a-f]+)$", status).group(1), 16)
        return bool(mask & 1 << (signal.SIGTERM - 1))

    cmd = [sys.executable, "-m", "server", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(catches_sigterm, 60, 0.002)
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert f"python -m server: {sig.name} while starting: not serving" in err, err
        assert "Traceback" not in err, err
    finally:
        proc.kill()


def test_a_build_cache_on_a_noexec_mount_stops_the_server_naming_s4_build_cache(
    model_dirs, monkeypatch, tmp_path
):
    """The fused C step compiled into a folder mounted noexec (Docker's and podman's default for a tmpfs, as
    compose's `tmpfs: - /tmp` was) cannot be loaded ("failed to map segment from shared object"): the server
    served on torch ops, ~7x slower, with only a warning (a fresh-user trial). It now stops before it
    listens, naming S4_BUILD_CACHE and the fix; the library's own warning says the same."""
    import warnings

    from model import fused

    cache = tmp_path / "noexec" / "s4serve-build"  # not made yet: its parent's mount decides
    real_statvfs = os.statvfs

    class NoExec:  # os.statvfs of a folder on a noexec mount: f_flag has ST_NOEXEC
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | (
                os.ST_NOEXEC if str(path).startswith(str(tmp_path)) else 0
            )

    monkeypatch.setattr(os, "statvfs", NoExec)
    monkeypatch.setenv("S4_BUILD_CACHE", str(cache))
    fallback = tmp_path / "noexec-tmp" / "s4serve-build"  # (the temp dir's fallback: noexec too here)
    monkeypatch.setattr(fused, "fallback_folder", lambda: fallback)
    message = _exit_message("--checkpoints", str(model_dirs["text"]), "--port", str(free_port()))
    assert message.startswith(f"not serving: S4_BUILD_CACHE = {cache} is on a file system mounted noexec; "
                              f"the fallback = {fallback} is on a file system mounted noexec: ")  # fmt: skip
    assert "/tmp:exec" in message and "\n" not in message
    monkeypatch.setattr(fused, "_lib", {})
    monkeypatch.setattr(fused, "compile_library", lambda out, flags: None)  # built; its load then fails
    monkeypatch.setattr(fused, "load_library", lambda path: (_ for _ in ()).throw(OSError("failed to map")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused.library() is None
    assert any("S4_BUILD_CACHE" in str(w.message) and "mounted noexec" in str(w.message) for w in caught)
    monkeypatch.setattr(os, "statvfs", real_statvfs)  # an ordinary folder: no problem
    assert fused.build_cache_problem() is None


def test_loading_stops_at_the_next_step_once_the_server_stops(model_dirs, monkeypatch):
    """The stop event (set by the drain) ends loading at the next step's boundary: here it is set during
    the first model's warm-up, so that model is not returned and the second is never read."""
    import threading

    from model import load
    from server import registry

    stop = threading.Event()
    real_warm_up, loaded = registry.warm_up, []
    monkeypatch.setattr(registry, "warm_up", lambda rec, batch: (real_warm_up(rec, batch), stop.set()))
    monkeypatch.setattr(registry, "load", lambda path, **kw: (loaded.append(path), load(path, **kw))[1])
    settings = Settings(checkpoints=[str(model_dirs["text"]), str(model_dirs["audio"])], max_sessions=2)
    assert load_models(settings, SessionTable(), Metrics(), stop) == ({}, {})
    assert loaded == [model_dirs["text"]]


def test_a_state_pool_larger_than_memory_is_refused_naming_s4_max_sessions(model_dirs, monkeypatch, tmp_path):
    """S4_MAX_SESSIONS × a session's state is checked against the memory available before the pool is
    allocated: S4_MAX_SESSIONS=1000000 stopped the server with the allocator's "tried to allocate
    262144000000 bytes", naming no setting (a fresh-user trial). A container's cgroup limit counts (here a
    1 GB one: the largest S4_MAX_SESSIONS of the tiny model, 1,048,576, needs several GB)."""
    from server import registry

    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("0\n")
    monkeypatch.setattr(registry, "CGROUP", tmp_path)
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=1 << 20)
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert not models
    (why,) = failed.values()
    assert why.startswith("ValueError: S4_MAX_SESSIONS=1048576: model tiny-text's state pool needs ")
    assert "bytes of cpu memory available; at most " in why and "\n" not in why
    (tmp_path / "memory.max").write_text("3000000\n")  # a 3 MB container with 1 MB in use
    (tmp_path / "memory.current").write_text("1000000\n")
    assert registry.available_memory(torch.device("cpu")) == 2_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert registry.available_memory(torch.device("cpu")) > 2_000_000


def test_a_containers_reclaimable_page_cache_is_memory_a_state_pool_may_take(
    model_dirs, monkeypatch, tmp_path
):
    """A container's memory.current counts the page cache of every file the process read or mapped (the
    checkpoints, torch's libraries) with its own allocations, and the kernel reclaims the inactive part of
    that cache when an allocation needs it (cgroup-v2.rst; the kubelet's working set and `docker stats`
    subtract memory.stat's inactive_file for that reason). The memory check took memory.max -
    memory.current as what a new allocation may take, so a pool that fits was refused naming
    S4_MAX_SESSIONS: here a 3 MB container using 2.5 MB, 1.9 MB of it inactive page cache, and a 1.1 MB
    pool (256 sessions of the tiny model) refused as more than the 500,000 bytes available."""
    from server import registry

    (tmp_path / "memory.max").write_text("3000000\n")
    (tmp_path / "memory.current").write_text("2500000\n")
    stat = "anon 500000\nfile 2000000\nactive_file 100000\ninactive_file 1900000\n"  # (bytes)
    (tmp_path / "memory.stat").write_text(stat)
    monkeypatch.setattr(registry, "CGROUP", tmp_path)
    assert registry.available_memory(torch.device("cpu")) == 3_000_000 - (2_500_000 - 1_900_000)
    settings = Settings(checkpoints=[str(model_dirs["text"])], max_sessions=256, prefix_cache_mb=0)
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert list(models) == ["tiny-text"] and not failed, failed
    pool = models["tiny-text"].engine.pool
    assert 1_000_000 < pool.capacity * (pool.bytes_per_slot + 256) < 2_400_000  # (state and seen set)
    (tmp_path / "memory.stat").write_text("anon 500000\nfile 2000000\nactive_file 2000000\ninactive_file 0\n")
    assert registry.available_memory(torch.device("cpu")) == 500_000  # (active cache: not counted)


def test_a_checkpoint_changed_after_it_was_read_serves_as_read(model_dirs, tmp_path):
    """python -m server reads each checkpoint before it listens (the preflight's `build_entry`) and loads
    the models from what it read, seconds to minutes later; but the model's `created` (GET /v1/models:
    when its weights were written) was taken from the folder at the end of that load. A folder moved or
    removed meanwhile (a deploy swapping releases) made a model read, converted and verified fail with
    "FileNotFoundError: .../model.safetensors", not served; one saved over meanwhile (`model.save` replaces
    the files) listed the new file's time for the weights read before. `created` is now the weights'
    time as they were read."""
    from server.registry import build_entry

    folder = tmp_path / "mine"
    shutil.copytree(model_dirs["text"], folder)
    os.utime(folder / "model.safetensors", (1_000_000_000, 1_000_000_000))  # (written in 2001)
    settings = Settings(checkpoints=[str(folder)], max_sessions=2, prefix_cache_mb=0)
    built = {str(folder): build_entry(str(folder), settings)}  # (read before the server listens)
    save(make_audio_model(), folder)  # saved over meanwhile: the served model is still the one read
    models, failed = load_models(settings, SessionTable(), Metrics(), built=built)
    assert not failed and models["mine"].created == 1_000_000_000 and models["mine"].kind == "text"
    built = {str(folder): build_entry(str(folder), settings)}
    written = int((folder / "model.safetensors").stat().st_mtime)
    folder.rename(tmp_path / "replaced")  # moved away meanwhile
    models, failed = load_models(settings, SessionTable(), Metrics(), built=built)
    assert not failed, failed
    assert models["mine"].created == written and models["mine"].kind == "audio"


def test_a_dtype_for_a_default_checkpoint_not_trained_yet_counts_no_more_than_the_checkpoint(
    model_dirs, tmp_path, monkeypatch
):
    """S4_REQUIRE_ALL_MODELS: "a default checkpoint not trained yet never counts" (the default list is
    skipped where a folder does not exist). But an S4_MODEL_DTYPES entry for it (audio-digits=bfloat16 in a
    deployment's environment, before that model was trained) was listed in /readyz as failed, "which no
    S4_CHECKPOINTS entry serves" (the default list names it), and with S4_REQUIRE_ALL_MODELS the server
    stayed unready for ever. The entry now counts as its checkpoint does: not at all until it is trained;
    an id that no entry names at all is still reported."""
    shutil.copytree(model_dirs["text"], tmp_path / "checkpoints" / "text-shakespeare")
    monkeypatch.chdir(tmp_path)  # (audio-digits and audio-digits-s4: not trained here)
    settings = Settings(model_dtypes=["audio-digits=bfloat16", "nowhere=float16"], max_sessions=2)
    assert settings.uses_default_checkpoints() and settings.require_all_models is False
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert list(models) == ["text-shakespeare"]
    assert list(failed) == ["nowhere"] and "no S4_CHECKPOINTS entry serves" in failed["nowhere"], failed


def test_an_older_uvicorn_is_refused_at_import_with_the_floor_named():
    """server/connections.py extends internals of uvicorn's WebSocket protocol that 0.35–0.52 lack or
    handle otherwise (the server tests failed with each: check_uvicorn's docstring); the floor is the
    pyproject's."""
    import tomllib

    import uvicorn

    from server.connections import UVICORN_MIN, check_uvicorn

    for old in ("0.35.0", "0.49.0", "0.52.4", "0.9.0"):
        with pytest.raises(ImportError, match=rf"uvicorn>=0\.53 .*uvicorn {old} is installed"):
            check_uvicorn(old)
    for ok in ("0.53.0", "0.55.0", "0.100.1", "1.0", "0.60.0.dev1", "main"):
        check_uvicorn(ok)
    check_uvicorn(uvicorn.__version__)
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    floor = next(d for d in deps if d.startswith("uvicorn[standard]>="))
    assert floor == "uvicorn[standard]>=" + ".".join(map(str, UVICORN_MIN)), floor


def test_a_session_id_is_128_random_bits():
    """A session id is the capability that reaches the session (README, API keys): "sess-" + 32 hex digits,
    each of them random. Over 400 ids every digit takes at least 12 of its 16 values (a uniform digit
    misses 5 with probability < 1e-60); a uuid4 would fix the version digit (always 4) and narrow the
    variant digit to 8-b."""
    from server.sessions import new_session_id

    ids = [new_session_id() for _ in range(400)]
    assert len(set(ids)) == 400
    assert all(re.fullmatch(r"sess-[0-9a-f]{32}", i) for i in ids)
    seen = [len({i[5 + k] for i in ids}) for k in range(32)]
    assert min(seen) >= 12, seen


def test_the_middlewares_json_bytes_are_a_routes():
    """server.errors.json_bytes renders as Starlette's JSONResponse: compact, UTF-8 (not \\u escapes);
    NaN refused as there."""
    from fastapi.responses import JSONResponse

    from server.errors import json_bytes

    payload = {"error": {"code": 413, "message": "1 … 64 rows, ≥ 1 “quoted”", "param": None, "n": [1, 2.5]}}
    assert json_bytes(payload) == JSONResponse(payload).body
    assert b" " not in json_bytes({"a": [1, 2], "b": {"c": None}})
    with pytest.raises(ValueError):
        json_bytes({"x": float("nan")})


FLOAT_SETTINGS = [name for name, f in Settings.model_fields.items() if f.annotation in (float, float | None)]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_setting_takes_nan_or_an_infinity(name, value, monkeypatch):
    """Every float setting refuses NaN and ±infinity as "a finite number", by name: NaN was refused as
    above or below a bound (whichever the field had), and an infinite timeout (S4_DRAIN_TIMEOUT_S,
    S4_HEADER_TIMEOUT_S, S4_SESSION_TTL_S, …) was accepted."""
    assert len(FLOAT_SETTINGS) >= 15, FLOAT_SETTINGS
    monkeypatch.setenv(f"S4_{name.upper()}", value)
    with pytest.raises(ValueError, match=f"(?s){name}.*finite number"):
        Settings()


def test_a_models_load_line_says_an_audio_models_sample_rate(model_dirs, caplog):
    """The start-up line of each model says what it is; an audio model's, its sample rate (a fresh-user
    trial served an official SaShiMi .ckpt, whose rate is assumed from its dataset, and the log never said
    which)."""
    settings = Settings(checkpoints=[str(model_dirs[k]) for k in ("text", "audio")], max_sessions=2)
    with caplog.at_level("INFO", logger="server.models"):
        models, failed = load_models(settings, SessionTable(), Metrics())
    assert not failed and set(models) == {"tiny-text", "tiny-audio"}
    lines = [r.getMessage() for r in caplog.records if r.name == "server.models"]
    assert any(m.startswith("model tiny-audio: audio at 8000 Hz s4d, ") for m in lines), lines
    assert any(m.startswith("model tiny-text: text ") for m in lines), lines


def test_the_decode_batch_sizes_help_says_its_unit():
    """s4_decode_batch_size keeps its name (dashboards query it), which names no unit: its HELP says
    the unit, sessions, as the README's Metrics table does."""
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    (family,) = [f for f in text_string_to_metric_families(Metrics().render()[0].decode())
                 if f.name == "s4_decode_batch_size"]  # fmt: skip
    assert family.type == "histogram" and family.documentation.endswith("unit: sessions")


def test_each_reasons_counters_help_names_every_reason_it_counts():
    """The HELP of a counter labelled by a reason names each reason it counts, as the README's Metrics table
    does: s4_connections_closed_total's listed every close reason but pipeline_full (308211e), and
    s4_rejections_total's named none ("for capacity or limits")."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from server import metrics

    families = {f.name: f for f in text_string_to_metric_families(metrics.Metrics().render()[0].decode())}
    missing = {}
    for name, values in [
        ("s4_connections_closed", metrics.CLOSE_REASONS),
        ("s4_connections_refused", metrics.CONNECTION_REFUSALS),
        ("s4_requests_refused", metrics.REQUEST_REFUSALS),
        ("s4_session_evictions", metrics.EVICTION_REASONS),
        ("s4_rejections", metrics.REJECTION_REASONS),
        ("s4_generations", metrics.FINISH_REASONS),
        ("s4_session_store_errors", metrics.STORE_ERROR_OPS),
    ]:
        help_text = families[name].documentation
        if absent := [v for v in values if not re.search(rf"\b{v}\b", help_text)]:
            missing[name] = absent
    assert missing == {}, missing


def test_start_server_tries_another_free_port_where_another_process_took_the_first(monkeypatch):
    """free_port() releases the port it found before the server binds it: a process that took it in
    between made the server exit ("in use") and start_server raise. It now tries another free port where
    the one it chose is taken; a server that exits for another reason is still an error at once, and a
    port the caller gave is never replaced."""
    import httpx

    from server import launch

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    chosen = iter([busy, launch.free_port()])
    started = []

    class Proc:
        def __init__(self, cmd, cwd, env):
            self.port = int(cmd[cmd.index("--port") + 1])
            started.append(self.port)
            self.returncode = 1 if self.port == busy else None  # (exits at once: its port is in use)

        def poll(self):
            return self.returncode

        def kill(self):
            pass

    monkeypatch.setattr(launch.subprocess, "Popen", Proc)
    monkeypatch.setattr(launch, "free_port", lambda: next(chosen))
    monkeypatch.setattr(httpx, "get", lambda url, **kw: httpx.Response(200))
    try:
        proc, url = launch.start_server([], timeout_s=5)
        assert started[0] == busy and url == f"http://127.0.0.1:{started[1]}" and len(started) == 2
        with pytest.raises(launch.ServerExited, match="exited with status 1"):
            launch.start_server([], timeout_s=5, port=busy)  # given: not replaced
        taken.close()
        monkeypatch.setattr(launch, "free_port", lambda: busy)  # free now: the exit had another reason
        with pytest.raises(launch.ServerExited):
            launch.start_server([], timeout_s=5)
        assert started[2:] == [busy, busy]
    finally:
        taken.close()


def test_start_server_waits_for_the_server_it_started_not_a_proxy_the_environment_names(monkeypatch):
    """start_server polled the server's /readyz with httpx, which sends an http:// request through the
    proxy HTTP_PROXY or ALL_PROXY names (NO_PROXY's `127.0.0.0/8`, as Docker documents it, is no host it
    matches): on a machine behind a proxy every benchmark, the load test and the reliability script waited
    out their 600 s for a server that had been ready all along, then killed it. It asks the loopback
    server it started directly."""
    import http.server
    import threading

    from server import launch

    class Proc:  # a stand-in `python -m server`: ready (/readyz 200) on the port it was given
        def __init__(self, cmd, cwd, env):
            port = int(cmd[cmd.index("--port") + 1])

            class Ready(http.server.BaseHTTPRequestHandler):
                def do_GET(self):  # noqa: N802  (http.server's name)
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

                def log_message(self, *args):
                    pass

            self.http = http.server.ThreadingHTTPServer(("127.0.0.1", port), Ready)
            threading.Thread(target=self.http.serve_forever, daemon=True).start()
            self.returncode = None

        def poll(self):
            return self.returncode

        def kill(self):
            self.http.shutdown()
            self.http.server_close()

    proxy = f"http://127.0.0.1:{free_port()}"  # (nothing listens there)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")
    monkeypatch.setattr(launch.subprocess, "Popen", Proc)
    proc, url = launch.start_server([], timeout_s=10)
    try:
        assert url == f"http://127.0.0.1:{proc.http.server_address[1]}"
    finally:
        proc.kill()


def _binds(host: str, port: int) -> str | None:
    """What uvicorn meets when it listens on host:port (asyncio's create_server, which binds every address
    the name resolves to, an IPv6 one IPv6-only): None, or its error."""
    import asyncio

    async def listen() -> str | None:
        try:
            srv = await asyncio.get_running_loop().create_server(asyncio.Protocol, host=host, port=port)
        except OSError as exc:
            return str(exc)
        srv.close()
        await srv.wait_closed()
        return None

    return asyncio.run(listen())


def test_the_port_check_binds_what_uvicorn_will_bind(monkeypatch):
    """The port check before anything loads bound the first address S4_HOST resolves to, dual-stack, where
    uvicorn (asyncio's create_server) binds every address, an IPv6 one IPv6-only. So S4_HOST=:: was refused
    "in use" while another program listened on 127.0.0.1 at that port, though the server would have served
    on [::]; and a name of two addresses (localhost, ::1 and 127.0.0.1 in Docker's /etc/hosts) passed the
    check with its second address taken, then the server failed to listen after its models had begun to
    load (exit status 3). The check now agrees with the bind, and names the address that is taken."""
    from server.__main__ import port_problem

    with socket.socket() as ipv4:  # another program, on 127.0.0.1 only
        ipv4.bind(("127.0.0.1", 0))
        ipv4.listen()
        port = ipv4.getsockname()[1]
        assert _binds("::", port) is None  # (uvicorn would listen: [::] is IPv6 only)
        assert port_problem("::", port) is None
    real = socket.getaddrinfo

    def two_addresses(host, port, *args, **kwargs):  # a name that resolves to 127.0.0.1 and 127.0.0.2
        if host != "two.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("127.0.0.1", "127.0.0.2")]

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    with socket.socket() as second:  # another program on the second address
        second.bind(("127.0.0.2", 0))
        second.listen()
        port = second.getsockname()[1]
        assert "address already in use" in (_binds("two.test", port) or "")  # (uvicorn could not listen)
        problem = port_problem("two.test", port)
        assert (problem or "").startswith(f"cannot listen on two.test:{port} (S4_HOST, S4_PORT)")
        assert "127.0.0.2" in problem and "in use" in problem, problem
    with socket.socket() as first:  # and on the first: still found
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        assert _binds("two.test", port) is not None and "in use" in (port_problem("two.test", port) or "")
    # an empty S4_HOST (an unset variable in a template) is refused, not read as every interface as asyncio
    # reads it: a server meant for one address is not exposed on all
    assert (port_problem("", free_port()) or "").startswith("cannot listen on :")


def _denied(monkeypatch, *paths: Path) -> None:
    """Stat of `paths` (and what is under them) fails as for a folder the server's user may not read:
    PermissionError, what a non-root server meets (these tests may run as root, whom nothing is denied)."""
    real = Path.stat

    def stat(self, *args, **kwargs):
        where = self.absolute()
        if any(where == p or p in where.parents for p in paths):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)


def test_an_entry_whose_path_cannot_be_looked_at_is_named_in_one_line_not_a_traceback(
    model_dirs, tmp_path, monkeypatch
):
    """pathlib (Python 3.11) raises for every stat error but "no such file", and two checks asked it
    outside any error handling: whether an entry ending in .ckpt/.pt/.pth is a folder (its model id is a
    file's stem, a folder's name), while the settings were checked, and whether a default checkpoint
    exists (skipped if not). A path the file system refuses (a name too long; a folder the server's user
    may not read: a .ckpt on a root-only mount in a container, the default checkpoints/ of another user)
    stopped `python -m server` with an OSError or PermissionError traceback naming no entry. Each is now
    one line naming its entry, as a path that does not exist is, and the checkpoints beside it serve."""
    too_long = tmp_path / ("x" * 300 + ".ckpt")  # (a name past NAME_MAX: ENAMETOOLONG, whoever asks)
    message = _exit_message("--port", str(free_port()), "--checkpoints", str(too_long))
    assert message.startswith(f"not serving: checkpoint {too_long}: "), message[:300]
    assert "File name too long" in message and "\n" not in message, message[:300]
    settings = Settings(checkpoints=[str(model_dirs["text"]), str(too_long)], max_sessions=2)
    models, failed = load_models(settings, SessionTable(), Metrics())
    assert list(models) == ["tiny-text"]
    (why,) = failed.values()
    assert why.startswith("OSError: [Errno 36] File name too long"), why[:200]

    mount = tmp_path / "mnt"  # a root-only folder holding an official checkpoint
    _denied(monkeypatch, mount)
    entry = f"{mount}/run.ckpt"
    message = _exit_message("--port", str(free_port()), "--checkpoints", entry)
    assert message == f"not serving: checkpoint {entry}: [Errno 13] Permission denied: '{entry}'", message

    from server.__main__ import preflight  # (the default list: one of its folders not ours to read)
    from server.registry import expected_ids

    shutil.copytree(model_dirs["text"], tmp_path / "checkpoints" / "text-shakespeare")
    monkeypatch.chdir(tmp_path)
    _denied(monkeypatch, tmp_path / "checkpoints" / "audio-digits")
    settings, built = Settings(port=free_port(), max_sessions=2), {}
    assert settings.uses_default_checkpoints() and preflight(settings, built) == []
    assert str(built["checkpoints/audio-digits"]).startswith("[Errno 13] Permission denied")
    assert expected_ids(settings) == ["text-shakespeare", "audio-digits"]  # (audio-digits-s4: not there)
    models, failed = load_models(settings, SessionTable(), Metrics(), built=built)
    assert list(models) == ["text-shakespeare"] and failed["audio-digits"].startswith("PermissionError: ")
