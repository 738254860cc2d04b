"""The benchmarks' command lines: an option out of range is an argparse error naming it (exit 2) before
anything starts or is written (a server, a results JSON)."""

import pytest

from bench.common import RESULTS


def _refused(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2, stop.value
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: argument " + flag in err[-1], err  # (usage + one line)


@pytest.mark.parametrize("rounds", ["0", "-1", "x"])
def test_parse_stall_refuses_rounds_below_one_before_anything_runs(rounds, monkeypatch, capsys):
    """`--rounds 0` started the server, rewrote bench/results/parse_stall.json with empty lists, then
    crashed plotting it (max() of an empty sequence)."""
    from bench import parse_stall

    def start(root):
        raise AssertionError("a server was started")

    monkeypatch.setattr(parse_stall, "start", start)
    before = (RESULTS / "parse_stall.json").read_bytes()
    _refused(parse_stall.main, ["--rounds", rounds], "--rounds", capsys)
    assert (RESULTS / "parse_stall.json").read_bytes() == before


def test_parse_stall_help_says_quick_runs_one_round(capsys):
    from bench import parse_stall

    with pytest.raises(SystemExit):
        parse_stall.main(["--help"])
    assert "--quick always runs 1" in " ".join(capsys.readouterr().out.split())
