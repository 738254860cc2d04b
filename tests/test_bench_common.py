"""bench.common's timing and machine record: what a results JSON says of how its figures were taken."""

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
