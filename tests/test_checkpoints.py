"""The shipped checkpoints: load, convert + verify, and reproduce the metric on their eval slice."""

import json
import math
from pathlib import Path

import pytest
import torch

from model import load
from model.card import recurrent_nll_bits
from model.data import Dataset
from model.train import evaluate

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["text-shakespeare", "audio-digits", "audio-digits-s4"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_verifies_and_reproduces_its_card(name):
    ckpt = ROOT / "checkpoints" / name
    meta = json.loads((ckpt / "config.json").read_text())
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert size < 25 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
    net = load(ckpt)
    net.eval()
    rec = net.to_recurrent()  # raises VerificationError if the recurrent form is off
    # one verified form per S4 layer (SaShiMi: n_layers S4 blocks at each of its levels)
    n_s4 = len(list(net.named_s4_blocks())) if hasattr(net, "named_s4_blocks") else net.config.n_layers
    assert len(rec.report) == n_s4
    sl = meta["eval_slice"]
    data = Dataset(ckpt / sl["path"])
    test = data.split("test")
    with torch.no_grad():
        res = evaluate(net, data, test, sl["seq_len"], 8, sl["eval_stride"])
    assert res["tokens"] == sl["tokens"]
    assert res["bits_per_token"] == pytest.approx(sl["bits_per_token"], abs=1e-3)
    assert recurrent_nll_bits(rec, data, test, sl["seq_len"]) == pytest.approx(
        sl["recurrent_bits_per_token"], abs=1e-3
    )
    # the card states the recorded full test metric, and it is a real model (far below uniform: 8 bits)
    card = (ckpt / "README.md").read_text()
    test_bits = meta["training"]["metrics"]["test"]["bits_per_token"]
    assert f"{test_bits:.4f}" in card
    assert test_bits < 0.5 * math.log2(net.config.vocab_size)
    assert (net.config.modality == "audio") == name.startswith("audio")


def test_the_text_card_claims_validation_only_for_the_choices_made_on_validation():
    """The text card headed its sweep "How the shape, learning rate and budget were chosen (validation plays
    only)", and the sweep script said every choice was made on validation, never on test. The budget was not:
    the first phase (1,000 steps) met the 2.2 bits/byte goal on validation (2.184) and missed it on test
    (2.225), and only then were both runs doubled. No claim of "validation only" may cover the budget, and
    the card, the sweep script and the README's table must say the test plays informed it."""
    card = (ROOT / "checkpoints" / "text-shakespeare" / "README.md").read_text()
    claims = [line for line in card.splitlines() if "validation plays only" in line]
    assert claims, "the card no longer says what was chosen on validation"
    for line in claims:
        assert "budget" not in line.split("validation plays only")[0], line
    assert "the test plays informed" in card and "2.225" in card
    sweep = (ROOT / "bench" / "baselines" / "shakespeare-sweep.sh").read_text()
    assert "saw the test plays" in sweep
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `text-"))
    assert "the test plays informed" in row, row


def test_the_transformer_baselines_config_trains_on_the_s4_configs_token_budget():
    """bench/baselines/transformer-shakespeare.toml says it has configs/text-shakespeare.toml's token budget,
    and the text card compares the shipped S4 with a Transformer that saw as many bytes as it (16,384,000:
    4,000 steps resumed to 8,000). The S4 config was raised to 2,000 steps (16,384,000 bytes) when the runs
    were doubled; the Transformer's stayed at 4,000 steps (8,192,000 bytes, its comment too), so running the
    two configs gave a baseline with half S4's bytes. steps × batch × context must be the same for both and
    equal the shipped model's recorded tokens."""
    import tomllib

    def budget(path: Path) -> int:
        cfg = tomllib.loads(path.read_text())
        return cfg["train"]["steps"] * cfg["data"]["batch_size"] * cfg["data"]["seq_len"]

    s4 = budget(ROOT / "configs" / "text-shakespeare.toml")
    tf_path = ROOT / "bench" / "baselines" / "transformer-shakespeare.toml"
    shipped = json.loads((ROOT / "checkpoints" / "text-shakespeare" / "config.json").read_text())
    assert budget(tf_path) == s4 == shipped["training"]["metrics"]["tokens_seen"], (budget(tf_path), s4)
    assert f"budget ({s4:,} bytes)" in tf_path.read_text()
