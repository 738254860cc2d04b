"""bench.prefill's command line and its JSON: what --help says of --reps, and the machine of each run
kept beside its rows when runs are appended."""

import pytest

from bench import prefill


def test_help_says_the_median_of_the_reps_is_taken(capsys):
    """--help said "best taken" while each figure is the median of the alternated samples."""
    with pytest.raises(SystemExit):
        prefill.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the median is taken" in text and "best taken" not in text
