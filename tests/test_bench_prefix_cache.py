"""bench.prefix_cache: one quick run against two real servers (the cache off and on), and its CLI's check."""

import pytest

from bench import prefix_cache


def test_a_quick_run_times_both_servers_and_the_cached_one_reports_its_whole_chunks_and_prompts_together():
    out = prefix_cache.run(True, requests=2)
    assert list(out["lengths"]) == ["64", "300"]
    for L, r in out["lengths"].items():
        assert len(r["ms"]["A"]) == len(r["ms"]["B"]) == 2 and all(t > 0 for v in r["ms"].values() for t in v)
        # the stand-in's chunks are the server's default 256 tokens: none whole in 64, one in 300
        assert r["cached_tokens"] == [0 if L == "64" else 256] * 2
        assert r["b_over_a"] == pytest.approx(r["median_ms"]["B"] / r["median_ms"]["A"])
    tog = out["together"]  # 3 samples of a new 300-token prompt, then 3 questions at once, 1 time to each
    assert (tog["n"], tog["tokens"]) == (3, 300)
    for w in ("samples", "questions"):
        assert [len(v) for v in tog[w]["ms"].values()] == [1, 1]
        assert tog[w]["b_over_a"] == pytest.approx(tog[w]["median_ms"]["B"] / tog[w]["median_ms"]["A"])


def test_misses_are_several_new_documents_sent_to_both_servers_in_alternated_order(monkeypatch, tmp_path):
    """The cost of a miss (B stores its rows) was read from one request to each server, A's always sent
    first and B's right after it: B's came out 2-11 % slower in every committed run, which the docs read as
    noise "either way". Now each length's misses are the document's first request and new documents after
    it, each to both servers, the order alternated, and their medians are reported beside the hits'."""
    import contextlib

    sent: list[tuple[str, str]] = []  # (server, prompt) in the order sent

    def one(client, model, prompt):
        sent.append((client, prompt))
        return (10.0 if client == "A" else 11.0) + len(sent) / 1000, {
            "prompt_tokens_details": {"cached_tokens": 0}
        }

    @contextlib.contextmanager
    def servers(ckpt, arms):
        yield {name: name for name in arms}

    monkeypatch.setattr(prefix_cache, "one", one)
    monkeypatch.setattr(prefix_cache, "servers", servers)
    monkeypatch.setattr(prefix_cache, "checkpoint", lambda quick, tmp: (tmp / "standin", "stand-in"))
    monkeypatch.setattr(prefix_cache, "together", lambda quick, clients, model: {})
    out = prefix_cache.run(True, requests=2)
    for L, r in out["lengths"].items():
        first_asked = [(c, p) for c, p in sent if p.endswith("Q0: who?\nA:") and f" {L}:" in p]
        # the warm-up's other document to each, then the misses: the document and new ones, to both in turn
        docs = list(dict.fromkeys(p for _, p in first_asked))[1:]
        assert len(docs) >= 2, (L, docs)
        for j, d in enumerate(docs):
            order = [c for c, p in first_asked if p == d]
            assert order == (["A", "B"] if j % 2 == 0 else ["B", "A"]), (L, j, order)
        assert [len(v) for v in r["miss_ms"].values()] == [len(docs), len(docs)]
        assert r["first_ms"] == {k: v[0] for k, v in r["miss_ms"].items()}
        assert r["miss_b_over_a"] == pytest.approx(r["miss_median_ms"]["B"] / r["miss_median_ms"]["A"])


def _refused(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        prefix_cache.main(argv)
    assert stop.value.code == 2  # an argparse error, before any server starts
    assert ": error: argument " + flag in capsys.readouterr().err.strip().splitlines()[-1]


def test_the_cli_refuses_a_request_count_under_one(capsys):
    _refused(["--quick", "--requests", "0"], "--requests", capsys)


def test_the_cli_refuses_a_single_round_before_any_work(capsys, monkeypatch):
    """`--quick --rounds 1 --requests 1` ran the whole benchmark, then crashed printing the rounds after
    the first (there were none: later_median_ms None)."""

    def run(*a, **k):
        raise AssertionError("the benchmark started")

    monkeypatch.setattr(prefix_cache, "run", run)
    _refused(["--quick", "--rounds", "1", "--requests", "1"], "--rounds", capsys)
    with pytest.raises(ValueError, match="at least 2 rounds"):
        prefix_cache.documents(True, rounds=1)


def test_documents_in_a_short_budget_are_found_only_where_spare_rows_go_first():
    """3 documents of 600 tokens asked in turn, a budget of 4 rows: with every chunk's row kept their 6
    rows (2 chunks each) evict each other and no question finds its document; by default each keeps
    its last whole chunk only (3 rows), and every question after the first finds its 512 tokens."""
    out = prefix_cache.documents(True)
    a, b = out["arms"]["A"], out["arms"]["B"]
    assert a["prompt"] == b["prompt"] == [623] * 6
    assert a["cached"] == [0] * 6 and a["hits"] == 0 and a["cached_share"] == 0
    assert b["cached"] == [0] * 3 + [512] * 3 and b["hits"] == 3
    assert b["cached_share"] == pytest.approx(3 * 512 / (6 * 623))


@pytest.mark.parametrize("flag", ["--documents", "--rounds"])
def test_the_cli_refuses_document_and_round_counts_under_one(flag, capsys):
    _refused(["--quick", flag, "0"], flag, capsys)
