"""bench.sampler: `sample` per step against the RowSampler, side by side, and the plot of it."""

import json


def test_quick_run_measures_both_variants_per_batch_and_plots(tmp_path, monkeypatch):
    from bench import common, sampler

    monkeypatch.setattr(common, "ROOT", tmp_path)  # results/quick under tmp
    monkeypatch.setattr(common, "results_dir", lambda quick: tmp_path)
    sampler.main(["--quick"])
    data = json.loads((tmp_path / "sampler.json").read_text())
    assert [(r["device"], r["batch"]) for r in data["rows"]][:2] == [("cpu", 1), ("cpu", 64)]
    for r in data["rows"]:
        for name in ("sample (torch ops)", "RowSampler", "uniforms in torch ops"):
            assert r[name]["us_per_step"] > 0 and len(r[name]["samples_us"]) == data["sizes"]["repeat"]
        assert (
            r["ratio_before_over_after"]
            == r["sample (torch ops)"]["us_per_step"] / r["RowSampler"]["us_per_step"]
        )
    assert (tmp_path / "sampler.png").stat().st_size > 10_000
