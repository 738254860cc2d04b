"""Loading a checkpoint never unpickles anything, and a broken one fails with the file and the problem
named: in the library, in /readyz (the others are still served), and as a non-zero exit of
`python -m server` before it listens when no checkpoint at all can be served."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_server_stop import free_port

from model import ModelConfig, SequenceModel, load, save
from model.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this creates the marker file: evidence that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": _Payload(marker)})


@pytest.fixture
def net():
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=2, d_state=8, l_max=64, cauchy_backend="torch")
    return SequenceModel(cfg).eval()


def test_a_pickle_in_place_of_the_weights_is_refused_without_being_unpickled(tmp_path, net):
    marker = tmp_path / "PWNED"
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    meta.pop("weights_sha256")  # so the loader gets as far as parsing the file
    (d / "config.json").write_text(json.dumps(meta))
    (d / "model.safetensors").write_bytes(_malicious_pickle(marker))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file"):
        load(d)
    assert not marker.exists()


def test_pickles_beside_a_checkpoint_are_ignored_and_a_pickle_only_folder_is_refused(tmp_path, net):
    marker = tmp_path / "PWNED"
    d = save(net, tmp_path / "ck")
    for name in ("model.pt", "pytorch_model.bin", "optimizer.pkl"):
        (d / name).write_bytes(_malicious_pickle(marker))
    assert isinstance(load(d), SequenceModel)
    only = tmp_path / "torch-only"
    only.mkdir()
    (only / "model.pt").write_bytes(_malicious_pickle(marker))
    with pytest.raises(CheckpointError, match=r"torch-only/config\.json: missing"):
        load(only)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda v: v.double(), r"is torch\.float64\[.*config expects torch\.float32"),
        (lambda v: v.flatten()[:-1].contiguous(), r"is torch\.float32\[\d+\], config expects"),
        (lambda v: v.to(torch.int32), r"is torch\.int32"),
    ],
    ids=["dtype", "shape", "int"],
)
def test_wrong_dtype_or_shape_names_the_file_and_the_tensor(tmp_path, net, change, message):
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    meta.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(meta))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["embed.weight"] = change(state["embed.weight"])
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'embed\.weight' " + message):
        load(d)


def test_python_m_server_exits_non_zero_before_listening_when_no_checkpoint_loads(tmp_path, net):
    marker = tmp_path / "PWNED"
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    truncated = save(net, tmp_path / "truncated")
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "model.pt").write_bytes(_malicious_pickle(marker))
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--port", str(port), "--log-level", "info",
           "--checkpoints", str(bad_json), str(truncated), str(pickled)]  # fmt: skip
    out = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    err = out.stderr
    assert "bad-json/config.json: not valid JSON" in err
    assert "truncated/model.safetensors: checksum mismatch" in err
    assert "pickled/config.json: missing" in err
    assert "Uvicorn running" not in err and "Application startup" not in err  # it never listened
    assert not marker.exists()


_INFLATE = """
import json, resource, sys
from pathlib import Path
from model import load
from model.checkpoint import CheckpointError
d = Path(sys.argv[1])
meta = json.loads((d / "config.json").read_text())
meta["config"].update(json.loads(sys.argv[2]))
(d / "config.json").write_text(json.dumps(meta))
try:
    load(d)
    out = "loaded"
except CheckpointError as exc:
    out = str(exc)
print(json.dumps({"error": out, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.parametrize(
    "arch, sizes",
    [
        ("s4", {"d_model": 2**15, "d_ff": 2**17}),  # one Linear of 2^32 floats (16 GiB)
        ("s4", {"d_model": 2048, "n_layers": 2**10}),  # ~64 MiB a layer, 1,024 of them
        ("s4", {"vocab_size": 2**22, "d_model": 2**15}),  # a 512 GiB embedding: no allocation is possible
        ("sashimi", {"d_model": 4096, "n_layers": 2**9}),
    ],
    ids=["wide", "deep", "vocab", "sashimi"],
)
def test_a_config_describing_a_network_far_larger_than_its_weights_is_refused_before_it_is_built(
    tmp_path, arch, sizes
):
    """config.json sizes within ModelConfig's MAX_SIZE bounds beside a small weights file (a helper's
    audit: `load` allocated the whole network before comparing shapes): load stops building once the
    registered parameters and buffers pass 2 × the file's tensors + 64 MiB, or when torch cannot allocate
    one, and raises CheckpointError naming config.json. Measured in a fresh process: its peak RSS stays
    under 1.5 GiB (the interpreter, torch and the refused layer's work, not the network)."""
    from model import build

    common = {"d_state": 8, "l_max": 64, "cauchy_backend": "torch"}
    small = {"s4": ModelConfig(vocab_size=40, d_model=16, n_layers=2, **common),
             "sashimi": ModelConfig(arch="sashimi", vocab_size=256, d_model=8, n_layers=1, pool=[2], expand=2,
                                    modality="audio", sample_rate=8000, **common)}[arch]  # fmt: skip
    d = save(build(small).eval(), tmp_path / "ck")
    r = subprocess.run([sys.executable, "-c", _INFLATE, str(d), json.dumps(sizes)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (
        "config.json: its config describes a network larger than its weights file allows" in got["error"]
    ), got
    assert got["peak_kib"] < 1.5 * 2**20, got


def test_every_shipped_checkpoint_registers_no_more_than_its_weights_file_holds():
    """The bound's other side: building each shipped network registers exactly the bytes of its weights
    file's tensors (plus a tied head's, once, before it is tied), far inside the build budget."""
    from safetensors.torch import load_file

    from model import build
    from model.checkpoint import build_budget

    for cfg_path in sorted((ROOT / "checkpoints").glob("*/config.json")):
        meta = json.loads(cfg_path.read_text())
        if "config" not in meta:
            continue  # (the digit classifier: its own format)
        cfg = ModelConfig.from_dict(meta["config"])
        have = sum(
            v.nelement() * v.element_size()
            for v in load_file(str(cfg_path.parent / "model.safetensors")).values()
        )
        with build_budget(10 * have) as counted:
            build(cfg)
            total = counted()
        head = cfg.vocab_size * cfg.d_model * 4 if cfg.tie_embeddings else 0
        assert total == have + head, (cfg_path, total, have)


def test_a_link_out_of_the_folder_or_a_special_file_is_refused_naming_it(tmp_path, net):
    """A checkpoint from elsewhere whose model.safetensors is a link out of its folder was loaded from
    wherever it pointed, and one whose config.json or model.safetensors linked to /proc/self/mem was an
    OSError traceback (EIO); a FIFO config.json was "missing". Each is a CheckpointError naming the file
    now; a link to a file inside the folder (a Kubernetes ConfigMap's) still loads."""
    import os

    out = save(net, tmp_path / "out")
    outside = tmp_path / "elsewhere.safetensors"
    (out / "model.safetensors").rename(outside)
    (out / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=r"out/model\.safetensors: a link to .*elsewhere\.safetensors, "
                       r"outside the checkpoint folder"):  # fmt: skip
        load(out)
    for name in ("config.json", "model.safetensors"):
        d = save(net, tmp_path / f"proc-{name}")
        (d / name).unlink()
        (d / name).symlink_to("/proc/self/mem")
        with pytest.raises(CheckpointError, match=rf"{name}: a link to /proc/.*outside the checkpoint"):
            load(d)
    fifo = save(net, tmp_path / "fifo")
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    with pytest.raises(CheckpointError, match=r"fifo/config\.json: not a regular file"):
        load(fifo)
    inside = save(net, tmp_path / "inside")
    (inside / "..data").mkdir()
    for name in ("config.json", "model.safetensors"):
        (inside / name).rename(inside / "..data" / name)
        (inside / name).symlink_to(Path("..data") / name)
    assert isinstance(load(inside), SequenceModel)


def test_a_config_json_of_more_than_16_mib_is_refused_unread(tmp_path, net):
    """config.json was read whole whatever its size (2 GB of it, 2 GB of memory and more to parse): over
    MAX_CONFIG_BYTES (16 MiB; a model's is a few KB) it is refused, naming the file and the bound."""
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "notes": "x" * (17 << 20)}))
    with pytest.raises(CheckpointError, match=r"ck/config\.json: over 16,777,216 bytes"):
        load(d)


def test_a_weights_header_far_larger_than_the_configs_tensors_is_refused_before_it_is_parsed(tmp_path, net):
    """20,000 extra empty tensors in model.safetensors (1.3 MB of header): each was made a tensor before the
    names were compared (1.4 million, the format's 100 MB header bound, took 3 GB and 20 s), and the error
    listed every name (300 KB of message, in /readyz and the log). The header is measured against the
    config's tensors before it is parsed; a few extra tensors are named, the first 8 and how many more."""
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    meta.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(meta))
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file({**state, **{f"x{i:05d}": torch.zeros(0) for i in range(20_000)}}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a safetensors header of [\d,]+ bytes, "
                       rf"where the config's {len(state)} tensors need at most") as exc:  # fmt: skip
        load(d)
    assert len(str(exc.value)) < 500
    save_file({**state, **{f"x{i:05d}": torch.zeros(0) for i in range(20)}}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected \['x00000', .*'x00007'\] and 12 more\)$"):
        load(d)
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable safetensors file \(0 bytes"):
        load(d)


def test_a_server_serves_the_good_checkpoints_beside_one_that_links_out_and_readyz_says_why(tmp_path):
    """One checkpoint whose weights are a link out of its folder, among good ones: the good one serves and
    /readyz names the refused one and why."""
    import httpx
    from server_support import TINY, ServerThread

    from server.config import Settings

    net = SequenceModel(ModelConfig(**TINY))  # (a text model the server takes: byte ids)
    good = save(net, tmp_path / "good")
    bad = save(net, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(good / "model.safetensors")
    settings = Settings(checkpoints=[str(good), str(bad)], device="cpu", max_sessions=2)
    srv = ServerThread(settings).start()
    try:
        body = httpx.get(srv.url + "/readyz", timeout=60).json()
    finally:
        srv.stop()
    assert body["ready"] and body["models"] == ["good"]
    assert "bad/model.safetensors: a link to" in body["failed"]["bad"]
    assert "outside the checkpoint folder" in body["failed"]["bad"]


def test_the_layers_of_a_network_share_one_hippo_eigendecomposition(monkeypatch):
    """Each S4 layer computed HiPPO's DPLR form, an N × N float64 eigendecomposition, again (2 s at N =
    2,048, 15 s at 4,096): a config.json of 1,024 layers at d_state 4,096 beside a small weights file kept
    `model.load` building for hours (the build budget counts bytes, and these layers are small) before it
    could compare a shape. One measure, size and rank is now computed once per process; the networks built
    from it are what they were (the same seed, the same weights)."""
    from model import kernel

    calls = []
    real = kernel.dplr
    monkeypatch.setattr(kernel, "dplr", lambda *args: calls.append(args) or real(*args))
    cfg = ModelConfig(vocab_size=40, d_model=4, n_layers=6, d_state=46, l_max=64, cauchy_backend="torch")
    torch.manual_seed(0)
    a = SequenceModel(cfg).state_dict()
    torch.manual_seed(0)
    b = SequenceModel(cfg).state_dict()
    assert calls == [("legs", 46, 1)]  # (N = 46: no other test's size, so not computed before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    Lambda, P, B, _ = real("legs", 46, 1)
    got = kernel.init_ssm("legs", 3, 46, 1)
    assert torch.equal(got[0], Lambda.expand(3, 23)) and torch.equal(got[2], B.expand(3, 23))
    got[0].add_(1)  # (a caller's change does not reach the next layer's start)
    assert torch.equal(kernel.init_ssm("legs", 3, 46, 1)[0], Lambda.expand(3, 23))


def _crafted(tensors: dict, data: bytes) -> bytes:
    """A safetensors file of this header (padded to 8 bytes, as the format's writer pads it) and data."""
    head = json.dumps(tensors).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data


@pytest.mark.parametrize(
    "tensors,data,message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "not fully covered"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown variant `X9`"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "integer `-1`"),
        ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4, "floating point `1.5`"),
        ({"a": "F32"}, b"", "expected struct TensorInfo"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "offset for tensor `a`"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "offset for tensor `b`"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "not fully covered"),
        ([1, 2], b"", "expected struct HashMetadata"),
    ],
    ids=["short", "long", "dtype", "negative", "float-shape", "not-an-entry", "hole", "overlap", "tail",
         "list"],
)  # fmt: skip
def test_a_crafted_safetensors_header_is_refused_naming_what_is_wrong(tmp_path, net, tensors, data, message):
    """`load` reads the weights file once and hands those bytes to the safetensors library
    (model/checkpoint.py `_read_tensors`): every header that is not the format's (offsets outside the
    data or not the values' size, an unknown dtype, a negative or fractional dimension, a hole, an
    overlap, bytes past the last tensor) is a CheckpointError naming the file and the library's reason,
    never another exception."""
    d = save(net, tmp_path / "ck")
    meta = json.loads((d / "config.json").read_text())
    meta.pop("weights_sha256")
    (d / "config.json").write_text(json.dumps(meta))
    (d / "model.safetensors").write_bytes(_crafted(tensors, data))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: unreadable safetensors file \(.*" + message
    ):
        load(d)
