"""ModelConfig checks every field when it is built: a bad value (range or type) raises ValueError naming
the field and the value, before any tensor is made; the shipped checkpoints' configs still load."""

import json
import math
import pydoc
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from model import ModelConfig, SequenceModel
from model.arch import build

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=16, d_model=8, n_layers=1, d_state=8, l_max=64, cauchy_backend="torch")

# (field, bad value, a regular expression the message must match): every field, each kind of fault
BAD = [
    ("vocab_size", 0, r"vocab_size must be an integer ≥ 1, got 0"),
    ("vocab_size", 256.0, r"vocab_size must be an integer ≥ 1, got 256.0"),
    ("vocab_size", True, r"vocab_size must be an integer ≥ 1, got True"),
    ("d_model", 16.5, r"d_model must be an integer ≥ 1, got 16.5"),
    ("d_model", "8", r"d_model must be an integer ≥ 1, got '8'"),
    ("d_model", -2, r"d_model must be an integer ≥ 1, got -2"),
    ("n_layers", 0, r"n_layers must be an integer ≥ 1, got 0"),
    ("d_state", 7, r"d_state must be even .*, got 7"),
    ("d_state", 0, r"d_state must be an integer ≥ 2, got 0"),
    ("d_state", 8.0, r"d_state must be an integer ≥ 2, got 8.0"),
    ("kernel", "s5", r"kernel must be one of \['s4', 's4d'\], got 's5'"),
    ("init", "legz", r"init for kernel 's4' must be one of .*, got 'legz'"),
    ("rank", 3, r"rank must be 1 or 2 for kernel 's4', got 3"),
    ("rank", 1.0, r"rank must be an integer .*, got 1.0"),
    ("rank", 0, r"rank must be 1 or 2 for kernel 's4', got 0"),
    ("disc", "zoh", r"disc for kernel 's4' must be one of .*, got 'zoh'"),
    ("l_max", 1023, r"l_max must be even .*l_kernel.*, got 1023"),
    ("l_max", 0, r"l_max must be an integer ≥ 2, got 0"),
    ("l_max", 64.0, r"l_max must be an integer ≥ 2, got 64.0"),
    ("l_kernel", [64, 0], r"l_kernel must be null or 1 integers"),
    ("d_ff", -3, r"d_ff must be an integer ≥ 0, got -3"),
    ("d_ff", 16.0, r"d_ff must be an integer ≥ 0, got 16.0"),
    ("dropout", 2.0, r"dropout must be in \[0, 1\), got 2.0"),
    ("dropout", 1, r"dropout must be in \[0, 1\), got 1"),
    ("dropout", -0.1, r"dropout must be in \[0, 1\), got -0.1"),
    ("dropout", "0.1", r"dropout must be a finite number, got '0.1'"),
    ("dropout", math.nan, r"dropout must be a finite number, got nan"),
    ("dt_min", 0.0, r"dt_min must be in \[1e-10, 1e\+08\] \(a step size Δ in sampling steps\), got 0.0"),
    ("dt_min", 1e-50, r"dt_min must be in \[1e-10, 1e\+08\] .*, got 1e-50"),  # float32 Δ: 0 (a NaN kernel)
    ("dt_min", 1.0, r"dt_min must be ≤ dt_max, got dt_min=1.0, dt_max=0.1"),
    ("dt_max", math.inf, r"dt_max must be a finite number, got inf"),
    ("dt_max", -0.1, r"dt_max must be in \[1e-10, 1e\+08\] .*, got -0.1"),
    ("dt_max", 1e39, r"dt_max must be in \[1e-10, 1e\+08\] .*, got 1e\+39"),  # float32 Δ: inf
    ("tie_embeddings", 1, r"tie_embeddings must be true or false, got 1"),
    ("head_bias", "yes", r"head_bias must be true or false, got 'yes'"),
    ("re_lambda_max", 0.5, r"re_lambda_max must be null or a negative number, got 0.5"),
    ("dt_tied", False, r"dt_tied must be true for kernel 's4'"),
    ("dt_tied", "no", r"dt_tied must be true or false, got 'no'"),
    ("embed_scale", 0.0, r"embed_scale must be a positive finite number, got 0.0"),
    ("cauchy_backend", "keopz", r"cauchy_backend must be one of \['auto', 'keops', 'torch'\], got 'keopz'"),
    ("modality", "video", r"modality must be one of \['text', 'audio'\], got 'video'"),
    ("sample_rate", 8000.0, r"sample_rate must be an integer ≥ 1, got 8000.0"),
    ("sample_rate", 0, r"sample_rate must be an integer ≥ 1, got 0"),
    ("mulaw", "alaw", r"mulaw must be one of \['s4serve', 's4'\], got 'alaw'"),
    ("quantization", "a-law", r"quantization must be one of \['mu-law', 'linear'\], got 'a-law'"),
    ("arch", "unet", r"arch must be one of \['isotropic', 'sashimi'\], got 'unet'"),
    ("pool", [4, 1], r"pool strides must be integers in \[2, 64\], got \[4, 1\]"),
    ("pool", "44", r"pool must be a list of 1 to 4 strides, got '44'"),
    ("expand", 2.5, r"expand must be an integer in \[1, 8\], got 2.5"),
    ("ff", -1, r"ff must be an integer in \[0, 16\], got -1"),
    ("unet", True, r"unet is an option of arch 'sashimi' \(isotropic: unet false\), got unet=True"),
    ("unet", "no", r"unet must be true or false, got 'no'"),
    ("norm", "batch", r"norm must be 'layer' or 'tln', got 'batch'"),
    ("d_ff", [8, 8], r"d_ff must be an integer ≥ 0 \(at most 131,072\) or a list of 1 \(n_layers\) of them"),
    ("d_model", 10**9, r"d_model must be an integer ≤ 32,768, got 1000000000"),
    ("d_model", 10**400, r"d_model must be an integer ≤ 32,768, got 1000000000000"),
    ("vocab_size", 10**12, r"vocab_size must be an integer ≤ 4,194,304, got 1000000000000"),
    ("n_layers", 10**7, r"n_layers must be an integer ≤ 1,024, got 10000000"),
    ("d_state", 2**13, r"d_state must be an integer ≤ 4,096, got 8192"),
    ("l_max", 10**12, r"l_max must be an integer ≤ 1,048,576, got 1000000000000"),
    ("d_ff", 2**20, r"d_ff must be an integer ≤ 131,072, got 1048576"),
    ("sample_rate", 10**6, r"sample_rate must be an integer ≤ 384,000, got 1000000"),
    (
        "cutoffs",
        [16],
        r"cutoffs must be null or strictly increasing integers in \(0, vocab_size 16\), got \[16\]",
    ),
    ("cutoffs", "8", r"cutoffs must be null or strictly increasing integers .*, got '8'"),
    ("div_val", 2, r"div_val and tie_projs need cutoffs \(an adaptive softmax\), got div_val=2"),
    ("div_val", 0.5, r"div_val must be an integer ≥ 1, got 0.5"),
    ("tie_projs", [True], r"div_val and tie_projs need cutoffs .*tie_projs=\[True\]"),
]


def test_every_field_has_a_bad_value_case():
    assert {f.name for f in fields(ModelConfig)} == {name for name, _, _ in BAD}


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_field_is_refused_naming_the_field_and_value(name, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, name: value})


def test_numpy_scalars_from_a_sweep_are_taken_as_the_python_numbers_they_hold():
    """np.int64 (what numpy's and many tuners' integer choices are) was refused as "not an integer"; it is
    the number it holds, and the config writes plain JSON. A numpy float in an integer field, or a numpy
    bool, is still refused, as Python's are."""
    import numpy as np

    sweep = {"d_model": np.int64(8), "n_layers": np.int32(1), "dropout": np.float32(0.25),
             "dt_max": np.float64(0.05), "arch": "sashimi", "pool": [np.int64(2), 2]}  # fmt: skip
    cfg = ModelConfig(**{**SMALL, **sweep})
    assert (cfg.d_model, cfg.n_layers, cfg.dropout, cfg.dt_max, cfg.pool) == (8, 1, 0.25, 0.05, [2, 2])
    assert type(cfg.d_model) is int and type(cfg.dropout) is float and type(cfg.pool[0]) is int
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"d_model must be an integer ≥ 1, got 8.0"):
        ModelConfig(**{**SMALL, "d_model": np.float32(8)})
    with pytest.raises(ValueError, match=r"tie_embeddings must be true or false"):
        ModelConfig(**{**SMALL, "tie_embeddings": np.bool_(True)})


@pytest.mark.parametrize(
    "fields_,message",
    [
        (dict(kernel="s4d", init="legt"), r"init for kernel 's4d' must be one of .*, got 'legt'"),
        (dict(kernel="s4d", disc="euler"), r"disc for kernel 's4d' must be one of .*, got 'euler'"),
        (dict(arch="sashimi", d_ff=3), r"d_ff must be 0 for arch 'sashimi' .*, got 3"),
        (dict(arch="sashimi", l_max=1000), r"l_max must be a multiple of 2·prod\(pool\) = 32 .*, got 1000"),
        # (a helper's audit: 4 million cutoffs built 4 million shard modules for minutes, in GBs; and with a
        # div_val of 4,000 digits, 20,000 of them made div_val ** len(cutoffs) a power that did not end)
        (
            dict(vocab_size=100_000, cutoffs=list(range(1, 20_000)), head_bias=True, div_val=10**4000),
            r"cutoffs must be null or at most 64 integers .*, got a list of 19,999$",
        ),
        (
            dict(vocab_size=1000, cutoffs=[10, 100], head_bias=True, div_val=10**4000),
            r"div_val must be an integer ≤ d_model 8 \(shard i's width is d_model / div_val\^i\), got 1000",
        ),
        (dict(cutoffs=[4], head_bias=True, div_val=9), r"div_val must be an integer ≤ d_model 8 .*, got 9$"),
    ],
)
def test_fields_that_depend_on_each_other_are_refused_together(fields_, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL, "l_max": 1024, **fields_})


def test_legt_rank_is_what_the_kernel_uses():
    """HiPPO-LegT's low-rank correction has 2 columns: the default rank becomes 2 for it (1 otherwise),
    so config.rank (and config.json) say what the kernel computes; an explicit rank 1 is refused."""
    cfg = ModelConfig(**SMALL, init="legt")
    assert cfg.rank == 2 and cfg.to_dict()["rank"] == 2
    assert SequenceModel(cfg).kernels()[0].P.shape[0] == 2
    assert ModelConfig(**SMALL).rank == 1 and ModelConfig(**SMALL, kernel="s4d", init="diag-lin").rank == 1
    assert ModelConfig(**SMALL, init="legs", rank=2).rank == 2
    with pytest.raises(ValueError, match=r"rank must be 2 for init 'legt' .*, got 1"):
        ModelConfig(**SMALL, init="legt", rank=1)


def test_dt_range_is_where_the_initial_step_sizes_land():
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**{**SMALL, "d_model": 64}, dt_min=0.01, dt_max=0.02))
    dt = net.kernels()[0].log_dt.detach().exp()
    assert 0.01 - 1e-7 <= float(dt.min()) and float(dt.max()) <= 0.02 + 1e-7
    assert ModelConfig(**SMALL, dt_min=0.05, dt_max=0.05).dt_min == 0.05  # one Δ: allowed
    assert ModelConfig(**SMALL, dropout=0, dt_min=1, dt_max=2).dropout == 0  # integers are numbers


MODEL_CHECKPOINTS = [
    p for p in sorted(ROOT.glob("checkpoints/*/config.json")) if json.loads(p.read_text()).get("format")
]  # the digit classifier's config.json is not a model checkpoint's


@pytest.mark.parametrize("path", MODEL_CHECKPOINTS, ids=lambda p: p.parent.name)
def test_shipped_configs_still_build(path):
    saved = json.loads(path.read_text())["config"]
    cfg = ModelConfig.from_dict(saved)
    assert {k: v for k, v in cfg.to_dict().items() if k in saved} == saved  # every saved value as it was
    build(cfg)


def test_help_lists_every_field_with_its_meaning():
    """help(ModelConfig) is a reference: one entry per field (name, then its meaning and allowed values)."""
    doc = pydoc.render_doc(ModelConfig, renderer=pydoc.plaintext)
    listed = set()
    for m in re.finditer(r"^ {4}(\w+(?:, \w+)*) {2,}\S", ModelConfig.__doc__, re.M):
        listed |= set(m.group(1).split(", "))
    assert listed == {f.name for f in fields(ModelConfig)}
    assert "1e-10 ≤ dt_min ≤ dt_max ≤ 1e8" in doc and "raises ValueError" in doc


@pytest.mark.parametrize("arch", ["isotropic", "sashimi"])
def test_conv_mode_refuses_tokens_it_cannot_embed_naming_the_problem(arch):
    """Conv mode's input is (B, L) integer ids in 0 … V − 1 with L ≥ 1: a 1-D tensor (a raw IndexError
    before), an empty length ("kernel length must be positive"), float ids and an id past the vocabulary
    are ValueErrors saying which (found by a fresh-user trial)."""
    extra = {"arch": "sashimi", "pool": [4, 4]} if arch == "sashimi" else {}
    net = build(ModelConfig(vocab_size=64, d_model=16, n_layers=1, d_state=8, l_max=64,
                            cauchy_backend="torch", **extra))  # fmt: skip
    for bad, what in ((torch.tensor([1, 2]), r"must be \(B, L\) with L ≥ 1, got shape \(2,\)"),
                      (torch.zeros(2, 0, dtype=torch.long), r"got shape \(2, 0\)"),
                      (torch.tensor([[1.0, 2.0]]), "must be integer token ids"),
                      (torch.tensor([[1, 64]]), r"token id 64 at index \[0, 1\] is outside the vocabulary"),
                      (torch.tensor([[-1, 3]]), r"token id -1 at index \[0, 0\]")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            net(bad)
    assert net(torch.tensor([[0, 63, 5]])).shape == (1, 3, 64)


def test_a_field_added_later_is_left_out_at_its_default_so_fingerprints_hold():
    """`quantization` (2026-12-06) at its default, mu-law, is not written: a model saved or converted again
    (an official checkpoint re-converted into an empty convert cache) writes the config.json the version
    before wrote, every other field included (model_fingerprint hashes it: sessions exported before still
    import); "linear" is written and reads back."""
    shipped = json.loads((ROOT / "checkpoints/audio-digits-s4/config.json").read_text())["config"]
    again = ModelConfig.from_dict(shipped).to_dict()
    assert set(again) == {f.name for f in fields(ModelConfig)} - {"quantization"}
    assert {k: again[k] for k in shipped} == shipped
    lin = ModelConfig(modality="audio", sample_rate=16000, quantization="linear")
    assert lin.to_dict()["quantization"] == "linear"
    assert ModelConfig.from_dict(json.loads(json.dumps(lin.to_dict()))) == lin


@pytest.mark.parametrize("dt", [1e-10, 1e8])
@pytest.mark.parametrize("kernel, init", [("s4", m) for m in ("legs", "legt", "lagt", "fout")]
                         + [("s4d", i) for i in ("legs", "diag-lin", "diag-inv")])  # fmt: skip
def test_at_the_ends_of_the_step_size_range_conv_mode_and_its_gradients_are_finite(kernel, init, dt):
    """DT_RANGE's ends: a float32 training step (the kernel, the logits, the gradients) is finite. Past them
    such configs were accepted: Δ = 1e-50 is 0 in float32 and 1e39 inf, and the S4 kernel was NaN from
    the first step (S4D's at 1e39 too)."""
    torch.manual_seed(0)
    net = SequenceModel(ModelConfig(**SMALL, kernel=kernel, init=init, dt_min=dt, dt_max=dt))
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 32))
    logits = net(tokens)
    logits.float().pow(2).mean().backward()
    assert bool(logits.isfinite().all())
    assert all(bool(p.grad.isfinite().all()) for p in net.parameters() if p.grad is not None)
