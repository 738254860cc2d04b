"""bench.prefix_cache: one quick run against two real servers (the cache off and on), and its CLI's check."""

import pytest

from bench import prefix_cache


def test_a_quick_run_times_both_servers_and_the_cached_one_reports_its_whole_chunks():
    out = prefix_cache.run(True, requests=2)
    assert list(out["lengths"]) == ["64", "300"]
    for L, r in out["lengths"].items():
        assert len(r["ms"]["A"]) == len(r["ms"]["B"]) == 2 and all(t > 0 for v in r["ms"].values() for t in v)
        # the stand-in's chunks are the server's default 256 tokens: none whole in 64, one in 300
        assert r["cached_tokens"] == [0 if L == "64" else 256] * 2
        assert r["b_over_a"] == pytest.approx(r["median_ms"]["B"] / r["median_ms"]["A"])


def test_the_cli_refuses_a_request_count_under_one():
    with pytest.raises(SystemExit, match="--requests"):
        prefix_cache.main(["--quick", "--requests", "0"])
