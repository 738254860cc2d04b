"""bench.c_ab: the C library at a git revision against the working tree's, side by side in one process."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench.common import ROOT
from model import fused

pytestmark = pytest.mark.skipif(
    fused.library() is None or shutil.which("git") is None or not (ROOT / ".git").exists(),
    reason="needs the C step and a git checkout",
)


def test_the_ab_benchmark_compares_every_figure_and_the_logits_of_the_two_libraries():
    """Quick sizes against HEAD: every model (DPLR and diagonal stand-ins, the official SaShiMi shape) has its
    step, block and (isotropic) prefill figures, positive, in both libraries; the layer forms are those the
    figures are meant for; and where ssm_step.c is HEAD's, the two libraries' logits are bit for bit the same
    (the same source and flags), else within float32 rounding."""
    from bench import c_ab

    data = c_ab.run(quick=True)
    git = ["git", "-C", str(ROOT), "rev-parse", "HEAD"]
    sha = subprocess.run(git, check=True, capture_output=True, text=True)
    assert data["base"]["sha"] == sha.stdout.strip()
    models = data["models"]
    assert models["s4"]["forms"] == ["dplr"] and models["s4d-ff"]["forms"] == ["diagonal"]
    assert models["sashimi-official"]["forms"] == ["dplr"]
    for kind, m in models.items():
        whats = [r["what"] for r in m["rows"]]
        assert "step 1" in whats and "block 9" in whats, (kind, whats)
        assert ("prefill 1x32" in whats) == (kind != "sashimi-official"), (kind, whats)
        for r in m["rows"]:
            assert all(v > 0 for v in r["tokens_per_s"].values()) and r["ratio"] > 0, (kind, r)
        if data["tree"]["same_source_as_base"]:
            assert m["logits_max_rel_diff"] == 0.0, kind
        else:
            assert m["logits_max_rel_diff"] < 1e-4, kind
    assert data["tree"]["same_source_as_base"] == (not data["tree"]["ssm_step_c_differs_from_HEAD"])
    text = c_ab.summary(data)
    assert f"({data['base']['sha'][:10]}), best of 2 each" in text and "s4 (dplr layers;" in text
    assert ("both sides run the same code" in text) == data["tree"]["same_source_as_base"]


@pytest.mark.parametrize("rev", ["no-such-rev", "", "HEAD:README.md"])
def test_a_base_that_is_not_a_commit_with_the_source_exits_saying_so(rev):
    """An unknown revision, an empty one (`git cat-file -e :path` would read the index) and a path."""
    from bench import c_ab

    with pytest.raises(SystemExit, match=rf"--base '{rev}': no model/csrc/ssm_step.c at that revision"):
        c_ab.main(["--base", rev])


def test_a_base_whose_library_lacks_an_entry_point_this_tree_calls_exits_saying_so(monkeypatch):
    """A base from before an entry point fused.py needs (e.g. decode_block_state) was an AttributeError
    traceback; now one line names the base and the missing symbol."""
    from bench import c_ab

    def missing(path):
        raise AttributeError(f"{path}: undefined symbol: decode_block_state")

    monkeypatch.setattr(fused, "load_library", missing)
    want = r"--base 'HEAD' \(\w{10}\): its C library lacks an entry point this tree calls \(.*decode_block_st"
    with pytest.raises(SystemExit, match=want):
        c_ab.base_library("HEAD")
