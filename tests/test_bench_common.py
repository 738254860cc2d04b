"""bench.common's timing and machine record: what a results JSON says of how its figures were taken."""

import contextlib
import json
import time

import pytest

from bench import common, kernel


def test_a_warm_up_call_over_the_budget_is_the_sample_and_says_so():
    """time_samples returned the warm-up call as the only sample when it alone exceeded max_seconds,
    while the JSON said the warm-up is excluded: the rows now carry warmup_timed."""
    slow = common.time_samples(lambda: time.sleep(0.02), warmup=1, repeat=3, max_seconds=0.01)
    assert len(slow) == 1 and slow[0] >= 0.02 and slow.warmup_timed is True
    fast = common.time_samples(lambda: None, warmup=1, repeat=3, max_seconds=10.0)
    assert len(fast) == 3 and fast.warmup_timed is False
    assert common.time_samples(lambda: None, warmup=0, repeat=2).warmup_timed is False

    spec = {"method": "s4-torch", "mode": "fwd", "H": 2, "N": 4, "L": 16, "warmup": 1, "repeat": 2}
    assert kernel.child({**spec, "max_seconds": 0.0})["warmup_timed"] is True
    row = kernel.child({**spec, "max_seconds": 60.0})
    assert row["warmup_timed"] is False and len(row["samples_s"]) == 2


def test_the_committed_kernel_rows_timed_by_their_warm_up_are_marked():
    """The two rows whose single sample took longer than the budget (dense fwd N = 512, dense fwd+bwd
    N = 256) were measured by their warm-up call; they say so, and no other row does."""
    data = json.loads((common.RESULTS / "kernel.json").read_text())
    budget = data["sizes"]["max_seconds"]
    marked = {(r["method"], r["mode"], r["N"]) for r in data["results"] if r.get("warmup_timed")}
    over = {(r["method"], r["mode"], r["N"]) for r in data["results"]
            if len(r.get("samples_s", [])) == 1 and r["samples_s"][0] > budget}  # fmt: skip
    assert marked == over == {("dense", "fwd", 512), ("dense", "fwd+bwd", 256)}


def test_the_machine_record_holds_the_load_average_from_before_the_benchmark_ran():
    """README (Performance): "the 1-minute load average before each run ... it is recorded in every JSON".
    The machine block read it when the results were written, after the run: a benchmark that kept both cores
    busy for a minute recorded its own load (about 2 on the 2-core VM), whatever the load before it. The
    block now also holds the load average read when the benchmark's process started (bench.common's import,
    before any measurement): here the load reads 7 at the start and 1 once the run is done."""
    import subprocess
    import sys

    code = (
        "import json, os\n"
        "os.getloadavg = lambda: (7.0, 6.0, 5.0)  # (before the benchmark: a busy machine)\n"
        "from bench import common\n"
        "os.getloadavg = lambda: (1.0, 2.0, 3.0)  # (when its results are written)\n"
        "m = common.machine_info()\n"
        "print(json.dumps([m.get('load_average_1_5_15min_before'), m['load_average_1_5_15min']]))\n"
    )

    def loads(script: str) -> list:
        """The [before, after] load averages `script` printed, run in a process of its own (bench.common's
        import is the moment `before` is read)."""
        r = subprocess.run([sys.executable, "-c", script], cwd=common.ROOT, capture_output=True, text=True,
                           timeout=120, check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    assert loads(code) == [[7.0, 6.0, 5.0], [1.0, 2.0, 3.0]]
    # (where the system gives none, os.getloadavg's OSError: both None, and the import still works)
    none = (
        "import json, os\n"
        "def none():\n"
        "    raise OSError('no load average')\n"
        "os.getloadavg = none\n"
        "from bench import common\n"
        "m = common.machine_info()\n"
        "print(json.dumps([m['load_average_1_5_15min_before'], m['load_average_1_5_15min']]))\n"
    )
    assert loads(none) == [None, None]


def test_the_machine_record_says_when_any_tracked_file_differs_from_the_commit(tmp_path, monkeypatch):
    """machine.model_dir_modified looked at model/ only: a figure taken with server/ or bench/ edited
    said the tree was clean. tree_modified covers every tracked file but the results folders."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)  # fmt: skip

    for path in ("model/a.py", "server/b.py", "bench/results/c.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    monkeypatch.setattr(common, "ROOT", tmp_path)

    def flags():
        m = common.machine_info()
        return m["tree_modified"], m["model_dir_modified"]

    assert flags() == (False, False)
    (tmp_path / "bench/results/c.json").write_text("x = 2\n")  # a benchmark's own output
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert flags() == (False, False)
    (tmp_path / "server/b.py").write_text("x = 2\n")
    assert flags() == (True, False)
    (tmp_path / "model/a.py").write_text("x = 2\n")
    assert flags() == (True, True)


def test_the_p99_of_the_latency_benchmarks_is_the_nearest_rank_not_one_above():
    """bench.server, bench.tail_latency and bench.audio_streams took `xs[int(q * n)]` for the q-quantile,
    one rank above the nearest rank wherever q·n is whole: the p99 of 100 samples was their maximum. Each
    now reports the ⌈q·n⌉-th smallest sample."""
    import math

    from bench import audio_streams, server, tail_latency

    for n in (1, 2, 10, 50, 99, 100, 101, 200, 300, 1000):
        xs = [float(k) for k in range(n, 0, -1)]  # (unsorted: n … 1; the k-th smallest is k)
        for q in (0.5, 0.9, 0.99):
            rank = max(1, math.ceil(round(q * n, 9)))
            assert audio_streams._pct(xs, q) == rank, (n, q)
        p99 = max(1, math.ceil(round(0.99 * n, 9)))
        assert server._pcts("ttft", [x / 1e3 for x in xs])["ttft_p99_ms"] == pytest.approx(p99)
        assert tail_latency._pcts([x / 1e3 for x in xs])["p99_ms"] == pytest.approx(p99)
    assert server._pcts("ttft", [k / 1e3 for k in range(1, 101)])["ttft_p99_ms"] == pytest.approx(99)


def _free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def _serving(handler, url: str):
    """A stand-in WebSocket server running `handler` on a free loopback port, for as long as the context
    lasts: yields `url` with its port."""
    from websockets.asyncio.server import serve

    async with serve(handler, "127.0.0.1", 0) as srv:
        yield url.format(port=srv.sockets[0].getsockname()[1])


def _fake_stream_server(fails=None):
    """A stand-in for WS /v1/stream on loopback (an async context manager giving its http:// URL): binds
    sessions, answers each `generate` with max_new_tokens token frames and `done`; a `generate` m that is
    its socket's turn-th for which fails(m, turn) holds gets a 500 error frame instead."""
    import asyncio

    async def handler(ws):
        turns = 0
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == "session":
                await ws.send(json.dumps({"type": "session", "session_id": "s", "model": "m"}))
                continue
            turns += 1
            if fails is not None and fails(m, turns):
                await ws.send(json.dumps({"type": "error", "code": 500, "message": "engine failed"}))
                continue
            for _ in range(m["max_new_tokens"]):
                await ws.send(json.dumps({"type": "token", "ids": [97], "text": "a"}))
                await asyncio.sleep(0.002)
            await ws.send(json.dumps({"type": "done", "finish_reason": "length"}))

    return _serving(handler, "http://127.0.0.1:{port}")


TAIL_SIZES = {"sessions": 2, "probes": 1, "decode_tokens": 4, "probe_every_s": 0.05, "baseline_s": 0.2}


def test_a_tail_latency_round_whose_clients_cannot_connect_fails_instead_of_waiting_for_ever():
    """bench.tail_latency waited for its decoding sessions' frames with no end: a server gone (or a session
    refused) left the round, and `make bench`, spinning for ever. The clients' error now ends it."""
    import asyncio

    from bench import tail_latency

    async def round_():
        url = f"http://127.0.0.1:{_free_port()}"
        return await asyncio.wait_for(tail_latency.measure(url, "m", TAIL_SIZES, "X" * 64, False), 20)

    try:
        asyncio.run(round_())
        got = None
    except Exception as exc:  # noqa: BLE001  (what the round ended with, asserted below)
        got = exc
    assert not isinstance(got, TimeoutError), "the round waited 20 s for frames that never came"
    assert isinstance(got, OSError), repr(got)  # (the refused connection)


def test_a_tail_latency_round_whose_decoding_sessions_failed_reports_no_figures():
    """Decoding sessions that got error frames (here every session after its second turn) were cancelled
    and their errors swallowed at the end of the round (gather(..., return_exceptions=True)): the round
    reported its TTFT and inter-token figures as if `sessions` sessions had been decoding."""
    import asyncio

    from bench import tail_latency

    async def round_():
        async with _fake_stream_server(lambda m, turn: m["prompt"].islower() and turn >= 3) as url:
            return await asyncio.wait_for(tail_latency.measure(url, "m", TAIL_SIZES, "X" * 64, False), 20)

    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(round_())


def test_a_fake_servers_round_measures_while_every_session_decodes():
    """(The stand-in server above is a fair one: with no failure the same round gives its figures.)"""
    import asyncio

    from bench import tail_latency

    async def round_():
        async with _fake_stream_server() as url:
            return await asyncio.wait_for(tail_latency.measure(url, "m", TAIL_SIZES, "X" * 64, False), 20)

    out = asyncio.run(round_())
    assert out["baseline"]["itl"]["n"] > 0 and out["baseline"]["short_ttft"]["n"] > 0
    assert out["long_prompt_ttft_ms"] > 0


def test_bench_server_burst_whose_clients_cannot_connect_fails_instead_of_waiting_for_ever():
    """bench.server's burst (websocket_rate) waited for every client to bind a session with no end: one
    that could not connect (a server gone) left it spinning for ever. Its error now ends the burst."""
    import threading

    from bench import server

    got: list[BaseException] = []

    def burst() -> None:
        try:
            server.websocket_rate(f"http://127.0.0.1:{_free_port()}", "m", 2, {"prompt": 4, "tokens": 2})
        except BaseException as exc:  # noqa: BLE001  (what the burst ended with)
            got.append(exc)

    t = threading.Thread(target=burst, daemon=True)  # (daemon: the old code's spin must not outlive pytest)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the burst waited for clients that had failed to connect"
    assert len(got) == 1 and isinstance(got[0], OSError), got


def test_the_summary_names_each_sections_machine_and_commit(monkeypatch):
    """bench/results/summary.md's header named one machine and commit for every section, the first
    section's (kernel's: AMD EPYC at e0de34e324, 2026-11-23), while its sections came from 12 commits and
    three CPUs (decode's from an Intel Xeon at 0e8528d4). Each section's line now names its own, and the
    header names one only when every section shares it."""
    from bench import run_all

    committed = {name: common.read_results(name) for name in ("step", "decode")}
    machines = {name: d["machine"] for name, d in committed.items()}
    assert machines["step"]["git_commit"] != machines["decode"]["git_commit"]  # (the case at hand)
    monkeypatch.setattr(run_all, "read_results", lambda name, quick: committed.get(name))
    text = run_all.summary(False)
    head = text.split("\n## ")[0]
    for name, m in machines.items():
        line = next(x for x in text.splitlines() if x.startswith(f"_{name}: "))
        assert m["git_commit"][:10] in line and m["cpu"] in line and m["date"] in line, line
        assert m["git_commit"][:10] not in head, head
    one = {"step": committed["step"]}  # a single section: the header names its machine and commit
    monkeypatch.setattr(run_all, "read_results", lambda name, quick: one.get(name))
    head = run_all.summary(False).split("\n## ")[0]
    assert machines["step"]["git_commit"][:10] in head and machines["step"]["cpu"] in head, head


@pytest.mark.parametrize("name", ["kernel", "train", "memory", "generation"])
def test_a_run_whose_configurations_failed_fails_and_keeps_the_committed_results(name, tmp_path, monkeypatch):
    """The benchmarks that run each configuration in a child process recorded a child's failure in the row
    ({"error": ...}) and went on, which is by design; but a run whose children failed then wrote its JSON
    over the results a run that worked wrote, and exited 0 (bench.memory without a word; bench.run_all
    reported it "ok"). It now exits non-zero naming the failures, its data in results/failed/ as
    bench.server_ab keeps its failed runs."""
    import importlib

    module = importlib.import_module(f"bench.{name}")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(module, "run_child", lambda *a, **k: {"error": "exit code 1: MemoryError"})
    monkeypatch.setattr(common, "matmul_gflops_by_size", lambda *a, **k: {"n=8": 1.0})
    if hasattr(module, "matmul_gflops_by_size"):
        monkeypatch.setattr(module, "matmul_gflops_by_size", lambda *a, **k: {"n=8": 1.0})
    kept = tmp_path / "quick" / f"{name}.json"
    kept.parent.mkdir()
    kept.write_text('{"a run that worked": true}\n')
    with pytest.raises(SystemExit) as stop:
        module.main(["--quick"])
    msg = str(stop.value.code)
    assert stop.value.code != 0 and "MemoryError" in msg and f"quick/failed/{name}.json" in msg, msg
    assert kept.read_text() == '{"a run that worked": true}\n'
    assert not (tmp_path / "quick" / f"{name}.png").exists()
    failed = json.loads((tmp_path / "quick" / "failed" / f"{name}.json").read_text())
    assert failed["failed"] is True and failed["errors"] and "MemoryError" in failed["errors"][0]


def _fake_audio_server(frame_samples: int):
    """A stand-in for an audio model's WS /v1/stream: binds sessions (8 kHz), answers each `generate` with
    an audio_header and its samples in binary frames of `frame_samples` (the last: the rest), then done."""
    import asyncio

    async def handler(ws):
        async for raw in ws:
            m = json.loads(raw)
            if m["type"] == "session":
                await ws.send(json.dumps({"type": "session", "session_id": "s", "sample_rate": 8000}))
                continue
            n = m["max_new_tokens"]
            await ws.send(json.dumps({"type": "audio_header", "sample_rate": 8000, "encoding": "mulaw",
                                      "frame_samples": frame_samples}))  # fmt: skip
            for k in range(0, n, frame_samples):
                await ws.send(bytes(min(frame_samples, n - k)))
                await asyncio.sleep(0.001)
            await ws.send(json.dumps({"type": "done", "finish_reason": "length"}))

    return _serving(handler, "ws://127.0.0.1:{port}/v1/stream")


def test_audio_streams_of_one_frame_each_fail_instead_of_writing_no_real_time_factor():
    """A stream that got one frame has no real-time factor (it needs the time between two): 2 streams of
    100 samples in 160-sample frames (`--seconds 0.0125`) gave RTF NaN for each, "0 % at real time", NaN
    medians and jitters, written to the results as a measurement (and NaN is not JSON)."""
    import asyncio

    from bench import audio_streams

    async def streams(samples, warm_up=False):
        async with _fake_audio_server(160) as url:
            kw = {"warm_up": True} if warm_up else {}  # (the parent's run_streams had no warm_up)
            run = audio_streams.run_streams(url, "m", 2, samples, 20, **kw)
            return await asyncio.wait_for(run, 20)

    row = asyncio.run(streams(800))  # (five frames each: measured)
    assert row["realtime_share"] in (0.0, 0.5, 1.0) and row["realtime_factor_min"] > 0
    assert row["samples_per_s"] > 0 and [s["frames"] for s in row["per_stream"]] == [5, 5]
    with pytest.raises(RuntimeError, match="one frame"):
        asyncio.run(streams(100))
    asyncio.run(streams(100, warm_up=True))  # (a warm-up's figures are not used: one frame will do)


def test_audio_streams_total_rate_is_timed_from_the_first_request_not_from_the_start_signal():
    """bench.audio_streams' samples/s is "all samples ÷ the wall time from the first request to the last
    frame", but the wall time ran from the start signal: with --spread-ms each stream sends its request a
    seeded delay after it, and the delay before the first request counted as streaming time (one stream at
    --spread-ms 500: 422 ms idle before a stream of a few ms, its samples/s that many times too low; a
    16-stream run at --spread-ms 100, 11 ms of 4 s). Here the one stream's request goes 422 ms after the
    signal and its 5 frames arrive within milliseconds."""
    import asyncio
    import random

    from bench import audio_streams

    delay = 0.5 * random.Random(0).random()  # (stream 0's seeded share of the spread)
    assert 0.4 < delay < 0.45

    async def stream():
        async with _fake_audio_server(160) as url:
            return await asyncio.wait_for(audio_streams.run_streams(url, "m", 1, 800, 20, spread_s=0.5), 20)

    row = asyncio.run(stream())
    first_frame_s = row["per_stream"][0]["first_frame_ms"] / 1e3
    assert row["wall_s"] < delay and row["wall_s"] >= first_frame_s, row  # (the request → its last frame)
    assert row["samples_per_s"] == pytest.approx(800 / row["wall_s"], rel=1e-9)


def test_the_server_plots_legend_names_the_steady_loop(monkeypatch):
    """bench/results/server.png drew the steady WebSocket loop (the issue-18 goal's figure) after the
    throughput panel's legend was made: its line had no entry, so the plot did not say which line it was."""
    from bench import server

    figures = []
    monkeypatch.setattr(server, "save_figure", lambda fig, *a, **k: figures.append(fig))
    server.plot(common.read_results("server"), False)
    (fig,) = figures
    for ax in fig.axes:
        labels = ax.get_legend_handles_labels()[1]
        if labels:
            assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    assert "WebSocket, steady loop" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_a_parse_stall_stream_answered_by_error_frames_fails_the_measurement(monkeypatch):
    """bench.parse_stall's two streams read an error frame as the end of a turn and sent the next: a stream
    whose turns all failed (here the second, seed 1) made no frames, and the longest pause was taken from
    the other alone (two staggered streams are what makes every pause show), reported as measured. With
    both failing, an IndexError. An error frame now ends the measurement, naming it."""
    import asyncio

    from bench import parse_stall

    monkeypatch.setattr(parse_stall, "IDLE_S", 0.5)

    async def measure(fails):
        async with _fake_stream_server(fails) as url:
            return await asyncio.wait_for(parse_stall.one(url, "", None), 20)

    out = asyncio.run(measure(None))  # (every turn answered: measured)
    assert out["gaps"] > 0 and out["max_gap_ms"] >= out["p50_gap_ms"] > 0
    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(measure(lambda m, turn: m["seed"] == 1))
