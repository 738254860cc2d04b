"""Figures the README and docs/performance.md quote from a committed results JSON match that JSON (they
had drifted: the README quoted an earlier prefix-cache run, the docs 11.7 µs a sample for 12.2)."""

import json
import re

from bench.common import RESULTS, ROOT


def _text(path):
    return " ".join((ROOT / path).read_text().split())


def test_the_readme_prefix_cache_figures_are_the_committed_runs():
    d = json.loads((RESULTS / "prefix_cache.json").read_text())["lengths"]
    m = re.search(
        r"\*\*(\d+) ms without the cache and ([\d.]+) ms with it after an 8,000-token document "
        r"\(([\d.]+)×\)\*\*, "
        r"(\d+) against ([\d.]+) ms after 4,096 tokens \(([\d.]+)×\), (\d+) against ([\d.]+) ms after 1,024 "
        r"\(([\d.]+)×\)\. A miss costs what it cost before \(the document's first request: (\d+) / (\d+) ms",
        _text("README.md"),
    )
    assert m, "the README's prefix-cache sentence"
    got = [float(x) for x in m.groups()]
    want = []
    for n in ("8000", "4096", "1024"):
        a, b = d[n]["median_ms"]["A"], d[n]["median_ms"]["B"]
        want += [a, b, a / b]
    want += [d["8000"]["first_ms"]["A"], d["8000"]["first_ms"]["B"]]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        decimals = len(m.group(i + 1).partition(".")[2])
        assert round(w, decimals) == g, (i, g, w)


def test_the_audio_streams_table_row_is_the_committed_run():
    rows = {r["streams"]: r for r in json.loads((RESULTS / "audio_streams.json").read_text())["results"]}
    m = re.search(r"\| 19:44 \| ([\d,]+), ([\d.]+) \| \*\*([\d,]+), ([\d.]+)\*\* \| ([\d.]+) \|",
                  _text("docs/performance.md"))  # fmt: skip
    assert m, "the 19:44 row"
    eight, sixteen = rows[8], rows[16]
    assert int(m[1].replace(",", "")) == round(eight["samples_per_s"])
    assert float(m[2]) == round(eight["realtime_factor_median"], 2)
    assert int(m[3].replace(",", "")) == round(sixteen["samples_per_s"])
    assert float(m[4]) == round(sixteen["realtime_factor_median"], 2)
    assert float(m[5]) == round(sixteen["server_cpu_us_per_sample"], 1)
