"""bench.server_ab: two servers side by side (environment and/or checkout), the steady WebSocket loop against
each in alternated pairs. The orchestration (which server gets which environment and checkout, the
alternation, the summary's arithmetic) is checked with the servers and the loop stubbed; one quick run
against two real servers checks the whole path."""

import os

import pytest

from bench import server_ab
from bench.common import ROOT


def test_environment_assignments_are_parsed_and_malformed_ones_refused():
    assert server_ab.parse_env(None) == {}
    assert server_ab.parse_env(["S4_DECODE_BLOCK_MS=40", "S4_DTYPE=bfloat16", "X_1=a=b c"]) == {
        "S4_DECODE_BLOCK_MS": "40",
        "S4_DTYPE": "bfloat16",
        "X_1": "a=b c",  # (the first "=" splits)
    }
    for bad in ("S4_DECODE_BLOCK_MS", "=1", "s4_lower=1", "S4-DASH=1", "1ST=x", " S4_X=1"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            server_ab.parse_env([bad])


def test_each_server_gets_its_environment_and_checkout_and_the_pairs_alternate(monkeypatch, tmp_path):
    started, order = [], []
    rates = iter([1000.0, 1200.0, 1300.0, 900.0, 800.0, 1000.0])  # A, B, B, A, A, B: pairs 1.2, 1.0, 1.25

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def terminate(self):
            started[self.pid]["stopped"] = True

        def wait(self, timeout):
            return 0

    def start_server(flags, timeout_s, env, cwd):
        started.append({"flags": flags, "env": env, "cwd": cwd, "stopped": False})
        return Proc(len(started) - 1), f"http://127.0.0.1:{9000 + len(started)}"

    def steady(url, model, n, sz, seconds):
        order.append(url)
        assert n == 3 and seconds == 0.5
        return {"tokens_per_s": next(rates), "ttft_p50_ms": 5.0, "ttft_p99_ms": 9.0}

    cpu = iter(range(0, 100, 1))  # each server's CPU seconds: +1 over each run
    monkeypatch.setattr(server_ab.launch, "start_server", start_server)
    monkeypatch.setattr(server_ab, "websocket_steady", steady)
    monkeypatch.setattr(server_ab, "cpu_seconds", lambda pid: float(next(cpu)))
    out = server_ab.run(
        True,
        a={"S4_X": "1"},
        b={"S4_X": "2", "S4_PREFIX_CACHE_MB": "64"},
        b_root=str(tmp_path),
        pairs=3,
        sessions=3,
        seconds=0.5,
        rounds=2,
    )

    # round 0 starts A then B and runs pair 0; round 1 starts B then A and runs pairs 1 and 2
    # (the prefix cache off unless the arm sets it: the runs repeat their prompts)
    a_env, b_env = {"S4_X": "1", "S4_PREFIX_CACHE_MB": "0"}, {"S4_X": "2", "S4_PREFIX_CACHE_MB": "64"}
    assert [s["env"] for s in started] == [a_env, b_env, b_env, a_env]
    assert [s["cwd"] for s in started] == [ROOT, tmp_path.resolve(), tmp_path.resolve(), ROOT]
    assert all(s["stopped"] for s in started)
    assert all("--max-sessions" in s["flags"] and "3" in s["flags"] for s in started)
    a0, b0, b1, a1 = (f"http://127.0.0.1:{9001 + i}" for i in range(4))
    assert order == [a0, b0, b1, a1, a1, b1]  # A B, then B A, then A B; each round on its own servers
    assert [r["started_first"] for r in out["servers"]["A"]["runs"]] == ["A", "B", "B"]
    assert [r["round"] for r in out["servers"]["B"]["runs"]] == [0, 1, 1]
    runs = {k: [r["tokens_per_s"] for r in out["servers"][k]["runs"]] for k in "AB"}
    assert runs == {"A": [1000.0, 900.0, 800.0], "B": [1200.0, 1300.0, 1000.0]}
    s = out["summary"]
    assert s["pair_ratios"] == pytest.approx([1.2, 1300 / 900, 1.25])
    assert s["b_ahead"] == 3 and s["b_ahead_by_first_started"] == {"A": [1, 1], "B": [2, 2]}
    assert s["median_tokens_per_s"] == {"A": 900.0, "B": 1200.0}
    assert s["ratio_of_medians"] == pytest.approx(1200 / 900)
    for r in out["servers"]["A"]["runs"] + out["servers"]["B"]["runs"]:
        assert r["server_cpu_us_per_token"] == pytest.approx(r["server_cores"] / r["tokens_per_s"] * 1e6)
        assert r["server_cores"] > 0


def test_a_quick_run_against_two_real_servers(tmp_path, monkeypatch):
    monkeypatch.setattr(server_ab, "checkpoint", _tiny_checkpoint)
    # a 2 s window (after a 2 s warm-up): a TTFT needs a request started inside it and a rate a token
    # received in it; with 0.5 s, one request (32 tokens) that took over 0.5 s on a loaded machine left the
    # window without either (tokens/s 0, TTFT nan)
    out = server_ab.run(True, b={"S4_DECODE_BLOCK_MS": "0"}, pairs=1, sessions=2, seconds=2.0)
    assert out["servers"]["B"]["env"] == {"S4_DECODE_BLOCK_MS": "0"} and out["servers"]["A"]["env"] == {}
    for k in "AB":
        (r,) = out["servers"][k]["runs"]
        assert r["tokens_per_s"] > 0 and r["server_cores"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
    s = out["summary"]
    med = s["median_tokens_per_s"]
    assert s["ratio_of_medians"] == pytest.approx(med["B"] / med["A"])
    assert s["pair_ratios"] == pytest.approx([med["B"] / med["A"]])
    assert s["median_server_cpu_us_per_token"]["A"] > 0 and s["median_server_cpu_us_per_token"]["B"] > 0


def test_the_audio_workload_measures_streams_and_compares_samples_per_second(monkeypatch, tmp_path):
    """--workload audio: each server is warmed up once per start, then the pairs run the audio streams;
    the summary compares samples/s (and reports CPU per sample and the first frame's p99)."""
    calls = []
    rates = iter([100.0, 150.0, 120.0, 90.0])  # A, B, then B, A: pairs 150 / 100 and 120 / 90

    class Proc:
        pid = 0

        def terminate(self):
            pass

        def wait(self, timeout):
            return 0

    def start_server(flags, timeout_s, env, cwd):
        assert flags[flags.index("--checkpoints") + 1] == str(tmp_path)
        return Proc(), f"http://127.0.0.1:{9000 + len(calls)}"

    def measure_audio(server, streams, seconds, label, spread_s=0.0):
        assert spread_s == (0.05 if label is not None else 0.0)  # (the warm-up starts them together)
        calls.append((streams, seconds, label))
        rate = next(rates) if label is not None else 1.0
        got = {"samples_per_s": rate, "server_cores": 1.0, "server_cpu_us_per_sample": 1e6 / rate}
        return got | {"realtime_factor_median": rate / 8000, "first_frame_p99_ms": 30.0, "jitter_p99_ms": 5.0}

    monkeypatch.setattr(server_ab.launch, "start_server", start_server)
    monkeypatch.setattr(server_ab, "measure_audio", measure_audio)
    (tmp_path / "config.json").write_text("{}")
    out = server_ab.run(
        False, pairs=2, rounds=1, workload="audio", checkpoint_dir=str(tmp_path), spread_ms=50
    )
    assert [c for c in calls if c[2] is None] == [(16, server_ab.WARMUP_S, None)] * 2  # one warm-up each
    assert [(c[0], c[1]) for c in calls if c[2] is not None] == [(16, 4.0)] * 4  # the audio defaults
    s = out["summary"]
    assert out["spread_ms"] == 50
    assert out["workload"] == "audio" and s["pair_ratios"] == pytest.approx([1.5, 120 / 90])
    assert s["median_samples_per_s"] == {"A": 95.0, "B": 135.0}
    assert s["median_first_frame_p99_ms"] == {"A": 30.0, "B": 30.0}
    assert s["median_server_cpu_us_per_sample"]["A"] == pytest.approx(1e6 / 95.0, rel=0.01)
    with pytest.raises(ValueError, match="workload"):
        server_ab.run(True, workload="video")


def test_a_quick_audio_run_against_two_real_servers():
    out = server_ab.run(True, b={"S4_AUDIO_DECODE_BLOCK_MS": "40"}, workload="audio")  # audio-digits-s4
    for k in "AB":
        (r,) = out["servers"][k]["runs"]
        assert r["samples_per_s"] > 0 and r["server_cpu_us_per_sample"] > 0 and r["first_frame_p99_ms"] > 0
    med = out["summary"]["median_samples_per_s"]
    assert out["summary"]["ratio_of_medians"] == pytest.approx(med["B"] / med["A"])


def _tiny_checkpoint(quick, tmp):
    import torch

    from model import ModelConfig, SequenceModel, save

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=256, d_model=32, n_layers=2, d_state=8, l_max=64, kernel="s4d", cauchy_backend="torch"
    )
    save(SequenceModel(cfg), tmp / "tiny")
    return tmp / "tiny", f"tiny stand-in: {cfg}"


def test_the_cli_refuses_bad_options_before_starting_anything(capsys):
    for argv, said in (
        (["--pairs", "0"], "--pairs must be positive"),
        (["--seconds", "-1"], "--seconds must be positive"),
        (["--rounds", "0"], "--rounds must be positive"),
        (["--pairs", "2", "--rounds", "3"], "more than the pairs"),
        (["--b-root", os.devnull], "is not a checkout of this project"),
        (["--workload", "audio", "--checkpoint", os.devnull], "is not a checkpoint folder"),
        (["--a", "lowercase=1"], "--a/--b"),
    ):
        with pytest.raises(SystemExit) as stop:
            server_ab.main(argv)
        assert said in str(stop.value), (argv, stop.value)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--seconds", "inf"], "--seconds must be positive and finite"),
        (["--workload", "audio", "--seconds", "inf"], "--seconds must be positive and finite"),
        (["--spread-ms", "-1"], "--spread-ms must be ≥ 0 and finite"),
        (["--spread-ms", "inf"], "--spread-ms must be ≥ 0 and finite"),
        (["--spread-ms", "nan"], "--spread-ms must be ≥ 0 and finite"),
    ],
)
def test_the_cli_refuses_endless_or_negative_times_before_starting_anything(argv, said, monkeypatch):
    """`--seconds inf` was taken: the text loop's window never closed (the run never ended; audio: an
    OverflowError after both servers had started). --spread-ms was not checked at all: inf or nan made
    every stream sleep for ever before its request, -1 ran as 0."""

    def run(*args, **kwargs):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(server_ab, "run", run)
    with pytest.raises(SystemExit) as stop:
        server_ab.main(argv)
    assert said in str(stop.value), (argv, stop.value)


def test_error_frames_are_counted_recorded_and_fail_the_run(tmp_path, monkeypatch):
    """`--b S4_MAX_NEW_TOKENS=8`: every B request got a 422 error frame, read like "done": the run
    printed B 0 tok/s, B ÷ A 0.000, wrote the JSON and exited 0. The failed run is kept in failed/, and
    the results a run that worked wrote are left as they were (it wrote over them)."""
    import json

    import bench.common

    monkeypatch.setattr(server_ab, "checkpoint", _tiny_checkpoint)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    kept = tmp_path / "quick" / "server_ab.json"
    kept.parent.mkdir()
    kept.write_text('{"benchmark": "server_ab", "a run that worked": true}\n')
    with pytest.raises(SystemExit) as stop:
        server_ab.main(["--quick", "--b", "S4_MAX_NEW_TOKENS=8", "--sessions", "2", "--seconds", "0.5"])
    msg = str(stop.value.code)
    assert "\n" not in msg and "error frames" in msg and "422" in msg and "B: 422" in msg, msg
    assert "quick/failed/server_ab.json" in msg, msg
    assert kept.read_text() == '{"benchmark": "server_ab", "a run that worked": true}\n'
    assert not (tmp_path / "quick" / "server_ab.png").exists()
    data = json.loads((tmp_path / "quick" / "failed" / "server_ab.json").read_text())
    assert data["failed"] is True
    s = data["summary"]
    assert s["errors"]["A"] == 0 and s["errors"]["B"] > 0 and s["first_error"].startswith("B: 422")
    (a,), (b,) = data["servers"]["A"]["runs"], data["servers"]["B"]["runs"]
    assert a["errors"] == 0 and a["tokens_per_s"] > 0 and a["server_cpu_us_per_token"] > 0
    assert b["errors"] > 0 and b["tokens_per_s"] == 0 and b["server_cpu_us_per_token"] is None
    assert s["median_server_cpu_us_per_token"]["B"] is None  # (was 0 µs/token)


def test_name_picks_the_results_file_and_replot_reads_it(tmp_path, monkeypatch, capsys):
    """server_ab always wrote server_ab.json, whatever it compared: docs/performance.md cites the files of
    two comparisons under names they got by hand. `--name` writes (and --replot reads) NAME.json, .png."""
    import bench.common

    def run(quick, **options):
        runs = [{"tokens_per_s": 100.0, "server_cpu_us_per_token": 50.0, "ttft_p99_ms": 9.0, "errors": 0}]
        data = {"workload": "text", "sessions": 2, "seconds": 0.5, "model": "stub",
                "servers": {k: {"env": {}, "commit": "x", "runs": runs} for k in "AB"}}  # fmt: skip
        return {**data, "summary": server_ab.summary(data)}

    monkeypatch.setattr(server_ab, "run", run)
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    server_ab.main(["--quick", "--name", "server_ab-mine"])
    assert sorted(p.name for p in (tmp_path / "quick").iterdir()) == [
        "server_ab-mine.json",
        "server_ab-mine.png",
    ]
    (tmp_path / "quick" / "server_ab-mine.png").unlink()
    server_ab.main(["--quick", "--replot", "--name", "server_ab-mine"])
    assert (tmp_path / "quick" / "server_ab-mine.png").exists()
    with pytest.raises(SystemExit) as stop:
        server_ab.main(["--quick", "--name", "../elsewhere"])
    assert stop.value.code == 2 and "--name" in capsys.readouterr().err.splitlines()[-1]


def test_the_documented_comparisons_name_the_files_they_cite():
    """Each `python -m bench.server_ab … --name NAME` in docs/performance.md is followed by the results
    file it cites, and that file is committed."""
    import re

    text = (ROOT / "docs" / "performance.md").read_text()
    for cited in ("server_ab-prefix-cache", "server_ab-sashimi-phases-16"):
        at = text.index(f"`bench/results/{cited}.json`")
        commands = re.findall(
            r"python -m bench\.server_ab[^`]*?(?:--name ([A-Za-z0-9_.-]+))", text[:at].replace("\\\n", "")
        )
        assert commands and commands[-1] == cited, (cited, commands[-1:])
        assert (ROOT / "bench" / "results" / f"{cited}.json").exists()
