"""bench.wt103: a quick run of the whole benchmark (the official WikiText-103 recipe's pattern, narrow)."""

import json

from bench import wt103


def test_quick_run_measures_the_conversion_the_steps_the_sampler_and_the_prefill(tmp_path, monkeypatch):
    from bench import common

    monkeypatch.setattr(common, "ROOT", tmp_path)  # (results are written relative to it)
    monkeypatch.setattr(common, "results_dir", lambda quick: tmp_path)
    wt103.main(["--quick"])
    data = json.loads((tmp_path / "wt103.json").read_text())
    cfg = wt103.recipe(True)
    assert cfg.cutoffs is not None and cfg.d_ff == [0, 512, 0, 512]
    assert data["params"] > 0 and data["to_recurrent_s"] > 0
    assert data["verification"]["step_rel_err"] <= data["verification"]["tol"]
    # the restart from the recurrent-form cache: every layer read, the same network check's figures
    assert data["cached_layers"] == cfg.n_layers and data["verification_cached"] == data["verification"]
    assert data["to_recurrent_cached_s"] > 0 and data["form_cache_mb"] > 0
    assert [r["batch"] for r in data["steps"]] == list(wt103.BATCHES)
    for r in data["steps"]:
        assert 0 < r["head_ms"] < r["step_ms"] and r["head_torch_ms"] > 0  # the head is part of the step
        assert r["c_step"] and r["block_same_tokens"]  # the block's tokens are the one-step loop's
        assert r["block_tokens_per_s"] > 0 and r["loop_tokens_per_s"] > 0 and r["decode_tokens"] == 16
        for shape in ("zipf", "flat"):
            assert r[f"sample_plain_{shape}_ms"] > 0 and r[f"sample_top_p_{shape}_ms"] > 0
    assert data["prefill"]["tokens"] == 128 and data["prefill"]["tokens_per_s"] > 0
    assert (tmp_path / "wt103.png").stat().st_size > 0
