"""bench.sashimi --phases: the rows it builds sit at the phases it says, and a quick run writes both paths'
figures for both arrangements; --prefill: a quick run times both prefill paths."""

import json

from bench import sashimi


def test_phase_rows_are_at_one_phase_or_at_every_phase():
    from model import load

    rec = load(sashimi.ROOT / "checkpoints" / "audio-digits").to_recurrent()
    mixed = sashimi.phase_rows(rec, 20, mixed=True)
    aligned = sashimi.phase_rows(rec, 20, mixed=False)
    start = int(rec.phases(rec.init_state(1))[0])
    assert rec.phases(mixed.state).tolist() == [(start + r % 16) % 16 for r in range(20)]
    assert set(rec.phases(aligned.state).tolist()) == {start}


def test_a_quick_phases_run(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "results_dir", lambda quick: tmp_path)
    sashimi.main(["--phases", "--quick"])
    data = json.loads((tmp_path / "sashimi_phases.json").read_text())
    want = [(p, b) for p in ("step", "block") for b in sashimi.PHASES_SIZES[True]["batches"]]
    assert [(r["path"], r["batch"]) for r in data["rows"]] == want
    for r in data["rows"]:
        assert r["aligned"]["samples_per_s"] > 0 and r["mixed"]["samples_per_s"] > 0
        assert r["aligned_over_mixed"] == r["aligned"]["samples_per_s"] / r["mixed"]["samples_per_s"]
    assert (tmp_path / "sashimi_phases.png").stat().st_size > 10_000


def test_a_quick_prefill_run(tmp_path, monkeypatch):
    """bench.sashimi --prefill: both paths timed for each shape, their outputs within float32 rounding."""
    from bench import common

    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common, "results_dir", lambda quick: tmp_path)
    sashimi.main(["--prefill", "--quick"])
    data = json.loads((tmp_path / "sashimi_prefill.json").read_text())
    shapes = sashimi.PREFILL_SIZES[True]["shapes"]
    assert [(r["threads"], r["prompts"], r["tokens"]) for r in data["rows"]] == [
        (n, B, T) for n in data["threads"] for B, T in shapes
    ]
    for r in data["rows"]:
        assert r["row by row"]["best_ms"] > 0 and r["batched"]["best_ms"] > 0
        assert r["row_by_row_over_batched"] == r["row by row"]["best_ms"] / r["batched"]["best_ms"]
        assert r["max_abs_diff_logits"] <= 1e-4 and r["max_abs_diff_state"] <= 1e-4
    assert (tmp_path / "sashimi_prefill.png").stat().st_size > 10_000
