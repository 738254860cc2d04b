"""bench.linear runs end to end on a small size set: every variant timed in every round (the order
rotated), the row tiles checked bit for bit against the row loop, and the figures it writes consistent
(the median round within the fastest and slowest, GFLOP/s from the same times)."""

import pytest
import torch

from bench import linear


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(linear.SIZES, True, {"batches": [1, 5, 8], "seconds": 0.001, "rounds": 3})


def test_every_variant_is_timed_in_every_round_and_the_figures_agree(small, monkeypatch):
    calls = []
    real = linear._median_us

    def spy(fn, seconds):
        calls.append(fn)
        return real(fn, seconds)

    monkeypatch.setattr(linear, "_median_us", spy)
    data = linear.run(quick=True)
    rows = data["results"]
    assert [(r["shape"], r["batch"]) for r in rows] == [(s, b) for s in linear.SHAPES for b in (1, 5, 8)]
    assert len(calls) == len(rows) * 3 * len(linear.VARIANTS)
    for r in rows:
        K, N = linear.SHAPES[r["shape"]]
        for v in linear.VARIANTS:
            lo, hi = r["us_range"][v]
            assert 0 < lo <= r["us"][v] <= hi
            assert r["gflops"][v] == pytest.approx(2 * r["batch"] * K * N / r["us"][v] / 1e3)
            glo, ghi = r["gflops_range"][v]
            assert glo == pytest.approx(2 * r["batch"] * K * N / hi / 1e3) and glo <= r["gflops"][v] <= ghi
        assert r["fastest"] == min(r["us"], key=r["us"].get)


def test_the_rounds_rotate_the_order_of_the_variants(small, monkeypatch):
    """Round k starts at variant k (mod 5): a burst of load does not always fall on the same one. (The two
    torch variants are one function on 1 thread and on torch's default, here 2.)"""
    order = []
    monkeypatch.setattr(
        linear, "_median_us", lambda fn, seconds: order.append((fn, torch.get_num_threads())) or 1.0
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setitem(linear.SIZES, True, {"batches": [1], "seconds": 0.001, "rounds": 3})
    monkeypatch.setattr(linear, "SHAPES", {"out (256→512)": (256, 512)})
    try:
        linear.run(quick=True)
    finally:
        torch.set_num_threads(threads)
    n = len(linear.VARIANTS)
    rounds = [order[k * n : (k + 1) * n] for k in range(3)]
    assert all(len({(id(fn), t) for fn, t in r}) == n for r in rounds)  # each round times all five
    assert rounds[1] == rounds[0][1:] + rounds[0][:1] and rounds[2] == rounds[0][2:] + rounds[0][:2]
