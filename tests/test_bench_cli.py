"""The benchmarks' command lines: an option out of range is an argparse error naming it (exit 2) before
anything starts or is written (a server, a results JSON)."""

import pytest

from bench.common import RESULTS


def _refused(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2, stop.value
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: argument " + flag in err[-1], err  # (usage + one line)


@pytest.mark.parametrize("rounds", ["0", "-1", "x"])
def test_parse_stall_refuses_rounds_below_one_before_anything_runs(rounds, monkeypatch, capsys):
    """`--rounds 0` started the server, rewrote bench/results/parse_stall.json with empty lists, then
    crashed plotting it (max() of an empty sequence)."""
    from bench import parse_stall

    def start(root):
        raise AssertionError("a server was started")

    monkeypatch.setattr(parse_stall, "start", start)
    before = (RESULTS / "parse_stall.json").read_bytes()
    _refused(parse_stall.main, ["--rounds", rounds], "--rounds", capsys)
    assert (RESULTS / "parse_stall.json").read_bytes() == before


def test_parse_stall_help_says_quick_runs_one_round(capsys):
    from bench import parse_stall

    with pytest.raises(SystemExit):
        parse_stall.main(["--help"])
    assert "--quick always runs 1" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--streams", "0"),
        ("--streams", "-1"),
        ("--seconds", "-1"),
        ("--seconds", "0"),
        ("--seconds", "31"),  # (over the server's S4_MAX_AUDIO_S, 30 s by default: a 422)
        ("--frame-ms", "-5"),
        ("--frame-ms", "4"),
        ("--frame-ms", "201"),
        ("--spread-ms", "-1"),
        ("--spread-ms", "inf"),  # (each stream slept for ever before its request: the run hung)
        ("--spread-ms", "nan"),
    ],
)
def test_audio_streams_refuses_what_the_server_would_refuse_before_starting_it(
    flag, value, monkeypatch, capsys
):
    """`--streams 0` waited 10 s, then a RuntimeError; `--seconds -1` and `--frame-ms -5` were 422
    tracebacks; `--seconds 0` silently became the default."""
    from bench import audio_streams

    def run(*a, **k):
        raise AssertionError("the benchmark started")

    monkeypatch.delenv("S4_MAX_AUDIO_S", raising=False)
    monkeypatch.setattr(audio_streams, "run", run)
    _refused(audio_streams.main, [flag, value], flag, capsys)


def test_audio_streams_takes_frame_ms_zero_and_the_server_range(monkeypatch):
    from bench import audio_streams

    seen = []

    class Stop(Exception):
        pass

    def run(quick, checkpoint, streams, seconds, frame_ms, spread_ms=0.0):
        seen.append((streams, seconds, frame_ms))
        raise Stop

    monkeypatch.setattr(audio_streams, "run", run)
    for argv in (
        ["--frame-ms", "0"],
        ["--frame-ms", "5"],
        ["--frame-ms", "200", "--streams", "2", "--seconds", "0.5"],
    ):
        with pytest.raises(Stop):
            audio_streams.main(["--quick", *argv])
    assert [s[2] for s in seen] == [None, 5, 200] and seen[2][:2] == ([2], 0.5)


def test_text_baseline_without_its_runs_says_how_they_are_made(tmp_path, monkeypatch, capsys):
    """The README's `bench.text_baseline --s4 runs/…` on a fresh clone (runs/ is not in the repository)
    was a FileNotFoundError traceback."""
    from bench import text_baseline

    monkeypatch.chdir(tmp_path)
    argv = ["--s4", "runs/text-shakespeare", "--transformer", "runs/transformer-shakespeare"]
    _refused(text_baseline.main, argv, "--s4", capsys)
    s4 = tmp_path / "runs" / "text-shakespeare"
    s4.mkdir(parents=True)
    (s4 / "config.json").write_text("{}")
    (s4 / "log.jsonl").write_text("")
    _refused(text_baseline.main, argv, "--transformer", capsys)
    _refused(
        text_baseline.main,
        [*argv[:2], "--transformer", str(s4), "--sweep", "runs/pilot-*"],
        "--sweep",
        capsys,
    )


def test_text_baseline_errors_name_the_script_that_makes_the_runs(capsys):
    from bench import text_baseline

    with pytest.raises(SystemExit):
        text_baseline.main(["--s4", "runs/nowhere", "--transformer", "runs/nowhere"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "runs/nowhere" in line and "bench/baselines/shakespeare-sweep.sh" in line


def test_gpu_on_the_cpu_writes_gpu_cpu_json_not_the_committed_gpu_results(tmp_path, monkeypatch):
    """`python -m bench.gpu --device-cpu` wrote its CPU figures over the committed H200 gpu.json."""
    import bench.common
    from bench import gpu

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    for section in ("bench_audio", "bench_step", "bench_ttft"):
        monkeypatch.setattr(gpu, section, lambda sz, device, budget, tmp: {"rows": []})
    plotted = []
    monkeypatch.setattr(gpu, "plot", lambda data, quick: plotted.append(data["device"]))
    gpu.main(["--device-cpu", "--quick"])
    assert sorted(p.name for p in (tmp_path / "quick").iterdir()) == ["gpu-cpu.json"] and plotted == ["cpu"]
    assert gpu.results_name("cpu") == "gpu-cpu" and gpu.results_name("cuda") == "gpu"


def test_sashimi_refuses_unet_with_phases(monkeypatch, capsys):
    """`bench.sashimi --unet --phases` ran only --unet, silently."""
    from bench import sashimi

    def started(*a, **k):
        raise AssertionError("a benchmark started")

    for fn in ("run", "run_unet", "run_phases"):
        monkeypatch.setattr(sashimi, fn, started)
    _refused(sashimi.main, ["--quick", "--unet", "--phases"], "--phases", capsys)


def test_audio_streams_says_what_a_server_that_lists_no_models_answered(monkeypatch):
    """GET /v1/models answers 503 while a server loads its models (or drains): bench.audio_streams read
    its body's "data" anyway and stopped on a KeyError. Now a RuntimeError quotes the status and message."""
    import httpx

    from bench import audio_streams

    loading = {"error": {"message": "models are still loading", "type": "service_unavailable", "code": 503}}
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(503, json=loading))
    with pytest.raises(RuntimeError, match="answered GET /v1/models with 503: .*models are still loading"):
        audio_streams.audio_model("http://127.0.0.1:9")
    served = {"data": [{"id": "t", "kind": "text"}, {"id": "a", "kind": "audio", "sample_rate": 8000}]}
    monkeypatch.setattr(httpx, "get", lambda url, timeout: httpx.Response(200, json=served))
    assert audio_streams.audio_model("http://127.0.0.1:9") == ("a", 8000)
    # each model serves once loaded: the text model listed while the audio one loads is not "no audio model"
    loading = {"ready": False, "reason": "loading", "models": ["t"], "loading": ["a"]}
    answers = {"/v1/models": (200, {"data": served["data"][:1]}), "/readyz": (503, loading)}

    def answer(url: str, timeout: float) -> httpx.Response:
        status, body = answers[url.removeprefix("http://x")]
        return httpx.Response(status, json=body)

    monkeypatch.setattr(httpx, "get", answer)
    with pytest.raises(RuntimeError, match="serves no audio model yet: still loading a$"):
        audio_streams.audio_model("http://x")


def test_parse_stall_stops_the_first_server_when_the_baselines_does_not_start(tmp_path, monkeypatch):
    """With --baseline-root, `run` started this checkout's server, then the baseline's, outside its
    try: a baseline that did not start (a wrong folder, an old checkout whose server stops) raised past
    the `finally`, and this checkout's server (a ~1 GB process on a loopback port) ran on after the
    benchmark had exited, and the bodies' temporary files stayed. Both are cleaned up now."""
    import tempfile

    from bench import parse_stall

    class Server:
        def __init__(self) -> None:
            self.stopped = False

        def terminate(self) -> None:
            self.stopped = True

        def wait(self, timeout=None) -> int:
            return 0

    started = []

    def start(root):
        if root != parse_stall.ROOT:
            raise RuntimeError(f"the server did not become ready (planted: {root})")
        started.append(Server())
        return started[-1], "http://127.0.0.1:9"

    bodies_dir = tmp_path / "bodies"
    bodies_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(bodies_dir))
    monkeypatch.setattr(parse_stall, "start", start)
    with pytest.raises(RuntimeError, match="planted"):
        parse_stall.run(True, baseline_root=str(tmp_path / "baseline"))
    assert len(started) == 1 and started[0].stopped
    assert list(bodies_dir.iterdir()) == []
