"""save → load round trips exactly; every kind of broken checkpoint fails with a named problem."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from model import ModelConfig, SequenceModel, load, save
from model.checkpoint import CheckpointError


@pytest.fixture
def net():
    cfg = ModelConfig(
        vocab_size=40, d_model=16, n_layers=2, d_state=8, l_max=64, d_ff=32, cauchy_backend="torch"
    )
    return SequenceModel(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_gives_identical_logits(tmp_path, tie):
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, d_state=8, l_max=64, kernel="s4d",
                      init="diag-inv", tie_embeddings=tie, cauchy_backend="torch")  # fmt: skip
    net = SequenceModel(cfg).eval()
    save(net, tmp_path / "ck")
    back = load(tmp_path / "ck").eval()
    assert back.config == net.config
    tokens = torch.randint(0, 40, (2, 64))
    with torch.no_grad():
        assert torch.equal(net(tokens), back(tokens))
    if tie:
        assert back.head.weight is back.embed.weight
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["num_params"] == net.num_params()


def test_corrupt_weights_are_detected(tmp_path, net):
    d = save(net, tmp_path / "ck")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load(d)


def test_truncated_weights_without_checksum(tmp_path, net):
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    del meta["weights_sha256"]
    (d / "config.json").write_text(json.dumps(meta))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CheckpointError, match="unreadable safetensors file"):
        load(d)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m.update(format="pickle"), "not an s4-checkpoint config"),
        (
            lambda m: m["config"].update(d_model=17),
            r"tensor '[a-z0-9_.]+' is torch.float32\[\d*,? ?16\], config expects torch.float32\[\d*,? ?17\]",
        ),
        (lambda m: m["config"].update(flux_capacitor=1), "unknown config fields: \\['flux_capacitor'\\]"),
        (lambda m: m["config"].update(kernel="s5"), "invalid model config: kernel must be"),
    ],
)
def test_config_problems_are_named(tmp_path, net, edit, message):
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    edit(meta)
    (d / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load(d)


def test_missing_files_and_bad_json(tmp_path, net):
    with pytest.raises(CheckpointError, match="^no such file or folder: .*nothing$"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/config.json: missing"):
        load(tmp_path / "empty")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="a-file: a file, not a checkpoint folder"):
        load(tmp_path / "a-file")
    d = save(net, tmp_path / "ck")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(d)
    d = save(net, tmp_path / "ck2")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load(d)


def test_wrong_tensor_set_and_non_finite_values(tmp_path, net):
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    meta.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(meta))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    extra = dict(state, rogue=torch.zeros(1))
    save_file(extra, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected \\['rogue'\\]"):
        load(d)
    state["blocks.0.layer.D"] = torch.full_like(state["blocks.0.layer.D"], float("nan"))
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'blocks.0.layer.D' has non-finite values"):
        load(d)


def test_saved_files_are_readable_by_other_users_whatever_the_umask(tmp_path, net):
    """A checkpoint is mounted into a container that runs as uid 10001: its files must be 0644 (the
    weights came out 0600: safetensors writes through a private temporary file)."""
    import os
    import stat

    old = os.umask(0o077)
    try:
        save(net, tmp_path / "ck")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "ck" / name).stat().st_mode) == 0o644, name
    assert load(tmp_path / "ck").config == net.config


def test_two_saves_of_the_same_weights_are_the_same_bytes(tmp_path, net):
    """weights_sha256 is a model's identity (a session exported from one server imports into another serving
    the same weights by it), so saving is deterministic. The safetensors metadata was a map of two keys,
    which safetensors writes in a random order: 2 of 12 saves differed; and two conversions of one official
    file got different SHA-256s, so a session of one replica was refused by another (a fresh-user trial)."""
    shas = set()
    for i in range(12):
        save(net, tmp_path / str(i))
        shas.add(json.loads((tmp_path / str(i) / "config.json").read_text())["weights_sha256"])
    assert len(shas) == 1
    assert len({(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(12)}) == 1


def test_two_conversions_of_one_official_file_are_the_same_checkpoint(tmp_path):
    from pathlib import Path  # noqa: PLC0415

    from model.convert import convert  # noqa: PLC0415

    src = Path(__file__).resolve().parent / "fixtures" / "official" / "s4_bytes.ckpt"
    metas = []
    for i in range(4):
        convert(src, tmp_path / str(i))
        metas.append(json.loads((tmp_path / str(i) / "config.json").read_text()))
    assert len({m["weights_sha256"] for m in metas}) == 1
    assert len({(tmp_path / str(i) / "model.safetensors").read_bytes() for i in range(4)}) == 1


def test_a_refused_save_leaves_the_checkpoint_there_as_it_was(tmp_path, net):
    """save() checks everything before it touches a file and moves each file over its name (a helper's
    audit: an `extra` that was not JSON failed after model.safetensors was replaced, and the checkpoint
    already there no longer loaded, its checksum mismatched): an `extra` that is not JSON or names a
    field save() writes, or a network with a NaN weight, is a ValueError and leaves the folder's files as
    they were, and no temporary file behind."""
    d = save(net, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    bad = copy.deepcopy(net)
    with torch.no_grad():
        next(bad.parameters()).view(-1)[0] = float("nan")
    for call, words in [
        (lambda: save(net, d, extra={"note": object()}), "must be JSON values"),
        (
            lambda: save(net, d, extra={"weights_sha256": "0" * 64}),
            r"\['weights_sha256'\] are save\(\)'s own",
        ),
        (lambda: save(net, d, extra={"x": float("nan")}), "must be JSON values"),
        (lambda: save(bad, d), "holds non-finite values: not saved"),
    ]:
        with pytest.raises(ValueError, match=words):
            call()
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    load(d)


def test_a_16_bit_network_is_saved_as_float32_exactly_and_loads(tmp_path, net):
    """load() reads float32 weights; a bfloat16 or float16 network's save wrote files it refused. Now its
    weights are stored float32, each value exactly."""
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(net).to(dtype)
        back = load(save(half, tmp_path / str(dtype)))
        for (k, a), b in zip(half.state_dict().items(), back.state_dict().values(), strict=True):
            assert b.dtype == torch.float32 and torch.equal(a.float(), b), k


def test_a_config_json_past_pythons_json_limits_is_a_checkpoint_error(tmp_path, net):
    """Nesting deeper than json's recursion limit, or an integer of over 4,300 digits, in config.json: a
    CheckpointError naming the file (a bare RecursionError / ValueError before)."""
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    for text in ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", '{"a": ' + "9" * 5000 + "}"):
        (d / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
            load(d)
    (d / "config.json").write_text(json.dumps(meta))
    load(d)


def test_the_weights_loaded_are_the_bytes_whose_checksum_was_checked(tmp_path, net, monkeypatch):
    """`load` hashed model.safetensors, built the network, then opened the file again and loaded it: a
    `save` that replaced the checkpoint meanwhile (its files are moved over the old ones) was loaded
    under the old config.json's checksum, unchecked. The file is now opened once and read once, hashed
    as it is read: the network holds the weights whose SHA-256 config.json named (exactly), or the load
    fails. And a file that holds more bytes than its checksum covered is refused."""
    import model.arch

    d = save(net, tmp_path / "ck")
    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    build = model.arch.build

    def build_then_replace(cfg):  # a save of other weights lands while the network is built
        save(other, d)
        return build(cfg)

    monkeypatch.setattr(model.arch, "build", build_then_replace)
    back = load(d)
    monkeypatch.undo()
    for (name, a), b in zip(net.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the weights config.json's checksum was checked against
    assert not torch.equal(load(d).embed.weight, net.embed.weight)  # (the replacement, loaded by itself)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load(d)
