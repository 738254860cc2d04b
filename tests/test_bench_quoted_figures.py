"""Figures the README, docs/performance.md and docs/gpu.md quote from a committed results JSON match that
JSON (they had drifted: the README quoted an earlier prefix-cache run, the docs 11.7 µs a sample for 12.2)."""

import json
import re

import pytest

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


def _num(text):
    """A table cell's figure: "1,939" → 1939, "24.8k" → 24800, "2.58×" → 2.58."""
    text = text.strip().rstrip("×").replace(",", "")
    return float(text[:-1]) * 1e3 if text.endswith("k") else float(text)


def _same(quoted, value):
    """`quoted` (as the docs write it) is `value` rounded as shown: its decimals, or 3 significant figures
    of thousands for "…k"."""
    q = quoted.strip().rstrip("×").replace(",", "")
    if q.endswith("k"):
        return round(value / 1e3, len(q[:-1].partition(".")[2])) == float(q[:-1])
    return round(value, len(q.partition(".")[2])) == float(q)


def _row(path, head, after=""):
    """The cells of the first docs table row that starts with `head` after the text `after`."""
    text = (ROOT / path).read_text()
    text = text[text.index(after) :]
    line = next(x for x in text.splitlines() if x.startswith(f"| {head} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_the_decode_table_rows_are_the_committed_run():
    """docs/performance.md's rerun of bench.decode with one row asking for log-probabilities (2026-12-04)."""
    for r in json.loads((RESULTS / "decode.json").read_text())["results"]:
        wl = r["with_logprobs"]
        want = [r["one-step"], r["native-block"], r["speedup"]]
        want += [wl["one-step"], wl["native-block"], wl["speedup"]]
        got = _row("docs/performance.md", str(r["batch"]), after="**Rerun 2026-12-04 (session 34)")
        assert all(_same(q, w) for q, w in zip(got, want, strict=True)), (r["batch"], got, want)


def test_the_big_batch_table_rows_are_the_committed_run():
    for model, rows in json.loads((RESULTS / "big_batch.json").read_text())["models"].items():
        for r in rows:
            if r["batch"] < 512:  # (the table's rows; 128 and 256 are the sentence after it)
                continue
            s, d = r["step"]["tokens_per_s"], r["decode"]["tokens_per_s"]
            want = [s["c"], s["torch-ops"], r["step_ratio"]]
            want += [d["c-block"], d["torch-ops+sample"], r["decode_ratio"]]
            got = _row("docs/performance.md", f"{model}, {r['batch']}")
            assert all(_same(q, w) for q, w in zip(got, want, strict=True)), (model, r["batch"], got, want)


def test_the_gpu_step_table_is_the_committed_run():
    """docs/gpu.md's table of the H200 run: the text model's step at batch 1 … 1024."""
    rows = json.loads((RESULTS / "gpu.json").read_text())["step"]["rows"]
    plain = [r for r in rows if not r.get("compiled") and not r.get("triton")]
    pick = {(r["dtype"], r["graphs"], r["batch"]): r for r in plain}
    batches = (1, 8, 64, 256, 1024)
    for head, dtype, graphs in (("float32, CUDA graphs: tokens/s (µs a step)", "float32", True),
                                ("float32, plain torch ops", "float32", False),
                                ("bfloat16 weights, CUDA graphs", "bfloat16", True)):  # fmt: skip
        for cell, B in zip(_row("docs/gpu.md", head), batches, strict=True):
            r = pick[dtype, graphs, B]
            tps, _, us = cell.partition(" (")
            ok = _same(tps, r["tokens_per_s"]) if tps.endswith("k") else round(r["tokens_per_s"]) == _num(tps)
            assert ok and (not us or round(r["us_per_step"]) == _num(us.rstrip(")"))), (head, B, cell)
    replay = _row("docs/gpu.md", "the replay alone, float32 (µs)")
    for cell, B in zip(replay, batches, strict=True):
        assert round(pick["float32", True, B]["replay_only_us_per_step"]) == _num(cell), (B, cell)


def test_the_audio_decoder_figures_are_the_committed_run():
    d = json.loads((RESULTS / "audio_decoder.json").read_text())
    m = re.search(
        r"a 30 s MP3 at 16 kHz ([\d.]+) → ([\d.]+) ms, the same MP3 damaged ([\d.]+) → ([\d.]+) ms, a 30 s "
        r"48 kHz WAV \(2\.9 MB to move\) ([\d.]+) → ([\d.]+) ms .*?a worker is (\d+) MB resident",
        _text("docs/reliability.md"),
    )
    assert m, "docs/reliability.md's bench.audio_decoder sentence"
    want = []
    for name in ("30 s MP3, 16 kHz", "30 s damaged MP3, 16 kHz", "30 s WAV, 48 kHz"):
        ms = d["files"][name]["median_ms"]
        want += [ms["in process"], ms["worker"]]
    assert [float(x) for x in m.groups()[:6]] == want
    assert int(m.group(7)) == d["worker_rss_mb"] and d["rounds"] == 31
    assert f"under a load of {d['machine']['load_average_1_5_15min'][0]:.1f})" in _text("docs/reliability.md")


def test_the_audio_decode_cpu_setting_quotes_the_committed_wav_figure():
    """What a 30 s 48 kHz WAV takes to decode, as S4_AUDIO_DECODE_CPU_S's description (the README's settings
    table) and docs/reliability.md quote it beside the 10 s bound, is the committed bench.audio_decoder run's:
    they said "about 0.05 s" (the 2026-12-06 run under a load of 7: 45.2 ms through a worker) where the
    committed run gives 6.6 ms in the server's process and 12.3 ms through a worker (7 ms of CPU here)."""
    from server.config import Settings

    ms = json.loads((RESULTS / "audio_decoder.json").read_text())["files"]["30 s WAV, 48 kHz"]["median_ms"]
    described = " ".join(Settings.model_fields["audio_decode_cpu_s"].description.split())
    m = re.search(r"a 30 s 48 kHz WAV takes ([\d.]+) ms in the server's process and ([\d.]+) ms through a "
                  r"worker \(bench\.audio_decoder\)", described)  # fmt: skip
    assert m, described
    assert [float(m[1]), float(m[2])] == [ms["in process"], ms["worker"]]
    page = _text("docs/reliability.md")
    m = re.search(r"\(10 by default; a 30 s 48 kHz WAV takes about ([\d.]+) s\b", page)
    assert m, "docs/reliability.md's sentence on the decoder's CPU bound"
    assert float(m[1]) == round(ms["in process"] / 1e3, 3)


def _shown(quoted, value):
    """`quoted` is `value` to its decimals, a tie (6.65 as 6.6 or 6.7) either way."""
    q = quoted.strip().rstrip("×").replace(",", "")
    return abs(float(q) - value) <= 0.5 * 10 ** -len(q.partition(".")[2]) + 1e-9


def test_the_state_precision_figures_are_the_committed_run():
    """docs/performance.md's bench.state_precision section: each model's row per state dtype (bits a token,
    the change, total variation mean / p99 / max, how often the most likely token differs) and the orders
    balanced truncation keeps (the range over every layer of the three models at each error bound), as
    bench/results/state_precision.json has them. The orders said 56.0–56.8 and 62.6–63.0 where SaShiMi's
    up blocks need up to 58.0 and 63.2."""
    models = json.loads((RESULTS / "state_precision.json").read_text())["models"]
    text = (ROOT / "docs" / "performance.md").read_text()
    section = text[text.index("## Can a session's state be smaller?") :]
    section = section[: section.index("\n## ", 3)]
    rows, model = {}, None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[1] in ("float32", "float16", "bfloat16"):
            model = cells[0].removesuffix(" (SaShiMi)") or model
            rows[model, cells[1]] = cells[2:]
    assert {m for m, _ in rows} == {m["model"] for m in models}, sorted(rows)
    for m in models:
        base = m["dtypes"]["float32"]["bits_per_token"]
        for dtype, r in m["dtypes"].items():
            bits, delta, tv, differs = rows[m["model"], dtype]
            assert _shown(bits, r["bits_per_token"]), (m["model"], dtype, bits)
            if dtype == "float32":
                continue
            change, _, share = delta.strip("*").partition(" (")
            assert _shown(change.strip("*+"), r["delta_bits"]), (m["model"], dtype, delta)
            assert not share or _shown(share.rstrip(" %)"), 100 * r["delta_bits"] / base), (m["model"], delta)
            quoted = zip([x.strip() for x in tv.split("/")], ("tv_mean", "tv_p99", "tv_max"), strict=True)
            assert all(_shown(q, r[k]) for q, k in quoted), (m["model"], dtype, tv)
            assert _shown(differs.split(" %")[0], 100 * r["argmax_differs"]), (m["model"], dtype, differs)
    truncation = r"ε = 1e-2: ([\d.]+)–([\d.]+) in every layer of the three models; "
    truncation += r"ε = 1e-3: ([\d.]+)–([\d.]+); ε = 1e-4: ([\d.]+)–([\d.]+)\b"
    m = re.search(truncation, " ".join(section.split()))
    assert m, "the balanced truncation sentence"
    want = []
    for eps in ("0.01", "0.001", "0.0001"):
        orders = [layer[eps]["mean"] for x in models for layer in x["balanced_truncation"].values()]
        want += [round(min(orders), 1), round(max(orders), 1)]
    assert [float(x) for x in m.groups()] == want


def test_the_train_speed_command_times_as_many_steps_as_its_committed_run(monkeypatch):
    """docs/performance.md's bench.train_speed section: "Medians of 4 timed steps" (the committed JSON holds
    4 a path) and the command that made them, which left out `--repeat 4`: as written it timed 3, the
    default. Run through the CLI here (the measurement stood in for), it asks for the steps the text and the
    JSON have."""
    import shlex

    import bench.train_speed as ts

    results = json.loads((RESULTS / "train_speed.json").read_text())["results"]
    text = _text("docs/performance.md")
    section = text[text.index("## Conv-mode training step, before vs after") :]
    n = int(re.search(r"Medians of (\d+) timed steps", section)[1])
    assert {len(r[p]["samples_s"]) for r in results.values() for p in ("before", "after")} == {n}
    command = re.search(r"nice -n 10 \.venv/bin/python -m bench\.train_speed ([^#]*)#", section)[1]
    asked = []

    class Stop(Exception):
        pass

    def measure(config, quick, repeat):
        asked.append(repeat)
        raise Stop

    monkeypatch.setattr(ts, "measure", measure)
    with pytest.raises(Stop):
        ts.main(shlex.split(command))
    assert asked == [n], (command, asked)
