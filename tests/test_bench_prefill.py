"""bench.prefill's command line and its JSON: what --help says of --reps, and the machine of each run
kept beside its rows when runs are appended."""

import pytest

from bench import prefill


def test_help_says_the_median_of_the_reps_is_taken(capsys):
    """--help said "best taken" while each figure is the median of the alternated samples."""
    with pytest.raises(SystemExit):
        prefill.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the median is taken" in text and "best taken" not in text


def test_appended_runs_keep_their_own_machine_and_the_committed_file_still_replots(tmp_path, monkeypatch):
    """`--append` re-stamped the whole JSON's `machine` with the latest run's, so rows measured on
    another day (another load, another commit) claimed its machine. Each row now names its run in
    machine_by_run; a section (--contention, …) keeps its own; a file from before is read as it was."""
    import json

    import bench.common

    machine = {"id": "m1"}
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.common, "machine_info", lambda: dict(machine))
    monkeypatch.setattr(prefill, "machine_info", lambda: dict(machine))
    monkeypatch.setattr(prefill, "plot", lambda data, quick: None)
    monkeypatch.setattr(
        prefill,
        "measure",
        lambda lengths, batches, reps, step_max, baseline: {
            "rows": [{"length": n, "batch": b} for n in lengths for b in batches],
            "load_average_before": [0.5, 0.5, 0.5],
        },
    )
    monkeypatch.setattr(prefill, "contention", lambda *a: {"rounds": []})
    path = tmp_path / "quick" / "prefill.json"
    path.parent.mkdir()
    old = {"benchmark": "prefill", "quick": True, "machine": {"id": "old"},
           "rows": [{"length": 1, "batch": 1}], "load_average_before": [1.0, 1.0, 1.0],
           "crossover": {"rows": []}}  # fmt: skip
    path.write_text(json.dumps(old))

    quick = ["--quick", "--no-baseline", "--batches", "1"]
    prefill.main([*quick, "--append", "--lengths", "8"])
    data = json.loads(path.read_text())
    assert [(r["length"], r["run"]) for r in data["rows"]] == [(1, 0), (8, 1)]
    assert data["machine_by_run"] == [{"id": "old"}, {"id": "m1"}] and data["crossover"] == {"rows": []}

    machine = {"id": "m2"}
    prefill.main(["--quick", "--contention"])
    data = json.loads(path.read_text())
    assert data["contention"]["machine"] == {"id": "m2"}
    assert data["machine_by_run"] == [{"id": "old"}, {"id": "m1"}] and len(data["rows"]) == 2

    machine = {"id": "m3"}
    prefill.main([*quick, "--append", "--lengths", "16"])
    data = json.loads(path.read_text())
    assert [(r["length"], r["run"]) for r in data["rows"]] == [(1, 0), (8, 1), (16, 2)]
    assert [m["id"] for m in data["machine_by_run"]] == ["old", "m1", "m3"]
    assert data["contention"]["machine"] == {"id": "m2"} and data["machine"] == {"id": "m3"}

    prefill.main([*quick, "--lengths", "4"])  # a fresh file: one run
    data = json.loads(path.read_text())
    assert data["rows"] == [{"length": 4, "batch": 1, "run": 0}] and data["machine_by_run"] == [{"id": "m3"}]


def test_the_committed_results_still_replot(tmp_path, monkeypatch):
    import bench.common

    committed = bench.common.read_results("prefill")
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    prefill.plot(committed, True)
    assert (tmp_path / "quick" / "prefill.png").stat().st_size > 0


def test_the_baselines_sources_do_not_outlive_the_benchmark(tmp_path):
    """The baseline's model/recurrent.py, model/fused.py and C source (git show of BASELINE_REV) were
    written into a tempfile.mkdtemp() folder that nothing removed: every run of bench.prefill (and of
    --contention) left one in the temp folder. It is removed when the process exits (the modules, and
    the fused library they build from that folder's source, serve until then)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    code = (
        "from bench import prefill\n"
        "mod = prefill._baseline_module()\n"
        "import pathlib, sys\n"
        "folder = pathlib.Path(mod.__file__).parent\n"
        "print(folder, sorted(p.name for p in folder.iterdir()))\n"
    )
    root = Path(prefill.__file__).resolve().parent.parent
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    folder, _, names = r.stdout.strip().partition(" ")
    assert Path(folder).parent == scratch and "recurrent_baseline.py" in names  # (it was there meanwhile)
    assert list(scratch.iterdir()) == []


def test_every_cold_sample_is_a_length_this_process_never_prefilled(monkeypatch):
    """A cold sample prefilled tokens[:, :L + offset] of a tensor only L + reps + 2 columns wide, while the
    offset grows over every (length, batch): from the second configuration on, the slice stopped at the
    tensor's width, so "cold" samples repeated a length already prefilled (the default run's 16,384 × 1
    and × 8 timed 16,389 tokens six times as "cold"). Lengths given out of order (--lengths 2050 2048)
    met the same way. Each cold sample must now be a length no prefill of the process has seen."""
    import torch

    import model
    import model.recurrent

    calls: list[tuple[str, int, int]] = []  # (kind of call, length, batch) in order

    class Net:
        class config:
            vocab_size = 16

    class Rec:
        def __init__(self, net):
            pass

        def init_state(self, batch):
            return torch.zeros(batch)

        def prefill(self, tokens, state):
            calls.append(("prefill", tokens.shape[1], tokens.shape[0]))

        def step(self, tokens, state, out=None):
            return None, state

    monkeypatch.setattr(model, "load", lambda path: Net())
    monkeypatch.setattr(model.recurrent, "RecurrentModel", Rec)
    reps, batches = 3, [1, 2]
    for lengths in ([8, 40], [10, 8]):
        calls.clear()
        out = prefill.measure(lengths, batches, reps=reps, step_max_tokens=0, baseline=False)
        per = 1 + 2 * reps  # a configuration: a warm-up at L, then per rep a warm prefill at L and a cold one
        configs = len(lengths) * len(batches)
        assert len(calls) == per * configs and len(out["rows"]) == configs
        seen: set[int] = set()
        for i, (_, length, _) in enumerate(calls):
            if i % per and i % per % 2 == 0:  # a cold sample
                assert length not in seen, (lengths, i, length, sorted(seen))
            seen.add(length)
