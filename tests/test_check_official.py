"""`python -m model.check_official`: a converted checkpoint against the official code's own outputs.

CI has no official checkout or venv, so the comparison half runs on the committed references
(tests/fixtures/official/*.ref.safetensors, made by the official code in float64, the same layout the
tool's child writes) through `--reference`; the child half (model/official/reference.py under the
official venv) was run by hand on the fixtures (README, "Check a conversion against the official
code"). Tolerance: 1e-5 max relative error, as tests/test_official_import.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load, save
from model.check_official import main
from model.convert import convert

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "official"
SOURCES = {  # fixture: its source file
    "s4_bytes": "s4_bytes.ckpt",
    "sashimi_sc09": "sashimi_sc09.ckpt",
    "sashimi_sc09_unet": "sashimi_sc09_unet.ckpt",
    "s4d_standalone": "s4d_standalone.pt",
    "trainpy_enwik": "trainpy_enwik.ckpt",  # written by the official train.py itself (trainpy_enwik.md)
    # version 3's code (make_v3_fixtures.py; the child ran by hand against a v3.0.0 checkout too: README)
    "v3_s4": "v3_s4.ckpt",
    "v3_s4d": "v3_s4d.ckpt",
    "v3_s4_transforms": "v3_s4_transforms.ckpt",  # version 3's DPLR relu (no floor), sigmoid, softplus
    "v3_unet": "v3_unet.ckpt",  # version 3's U-Net backbone
    "v3_s4_legt": "v3_s4_legt.ckpt",  # its float32 conv logits failed (2.95e-5) before the float64 S4 kernel
    # written by version 3's train.py itself (trainpy_v3.md; the child ran by hand against v3.0.0)
    "trainpy_v3_s4": "trainpy_v3_s4.ckpt",
    "trainpy_v3_s4d": "trainpy_v3_s4d.ckpt",
}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def errors(stdout: str) -> dict[str, float]:
    """The report's rows: what → max rel. error."""
    rows = re.findall(r"^  (.+?)\s+(\d\.\d\de[-+]\d\d|inf)  (?:ok|FAIL.*)$", stdout, re.M)
    return {what: float(err) for what, err in rows}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("converted")
    for name, src in SOURCES.items():
        convert(FIX / src, base / name)
    return {name: base / name for name in SOURCES}


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_correct_conversion_passes_against_the_official_outputs(converted, name):
    rc, out, err = run(converted[name], "--reference", FIX / f"{name}.ref.safetensors")
    assert rc == 0, out + err
    rows = errors(out)
    # conv (float32 and float64), kernels, conv past the trained length, prefill + step (float64, and each
    # float32 step path): 1e-5, the recurrence 1e-4 (the trained model's diagonal forms: 1.0e-5)
    assert len(rows) >= 6 and all(e <= (1e-4 if w.startswith("recurrent") else 1e-5) for w, e in rows.items())
    assert any("float64, per-layer step" in what for what in rows), rows
    assert any(what.startswith("recurrent prefill") for what in rows) and "SSM kernels" in out
    assert out.rstrip().endswith("ok: the conversion reproduces the official code")


def _perturbed(src: Path, dst: Path, key: str, change) -> Path:
    net = load(src)
    with torch.no_grad():
        p = net.state_dict()[key]
        p.copy_(change(p))
    save(net, dst)
    return dst


WRONG = [  # (fixture, tensor, change, a row that must fail): mappings our own verification accepts
    # Im Λ with the other sign (s4d.py's vs src's): conv == recurrent still, both wrong
    ("s4_bytes", "blocks.0.layer.kernel.im", lambda p: -p, "conv logits, 64 tokens (float32)"),
    ("s4_bytes", "head.bias", lambda p: p + 1e-3 * p.abs().max(), "conv logits, 64 tokens (float32)"),
    ("sashimi_sc09", "center.0.layer.kernel.log_dt", lambda p: p + 0.01, "conv logits, 64 tokens (float32)"),
    # C̄ 1e-4 off in one layer: the logits move by 3e-6 only (under 1e-5); the float64 kernels catch it
    ("s4d_standalone", "blocks.1.layer.kernel.C", lambda p: p * (1 + 1e-4), "SSM kernels"),
]


@pytest.mark.parametrize(("name", "key", "change", "row"), WRONG, ids=[f"{w[0]}-{w[1]}" for w in WRONG])
def test_a_conversion_with_one_weight_wrong_fails_with_the_numbers(
    converted, tmp_path, name, key, change, row
):
    wrong = _perturbed(converted[name], tmp_path / "wrong", key, change)
    rc, out, err = run(wrong, "--reference", FIX / f"{name}.ref.safetensors")
    assert rc == 1, out + err
    rows = errors(out)
    assert len(rows) >= 5 and "FAIL (> 1e-05)" in out, rows
    failed = [what for what, e in rows.items() if e > 1e-5]
    assert any(what.startswith(row) for what in failed), rows  # the numbers are printed, this one fails
    assert out.rstrip().endswith("FAIL: the conversion differs from the official code")


def test_the_reference_files_metadata_and_lengths_are_in_the_header(converted):
    """A fixture's reference carries only a `case`: its lengths are read from the tensors (s4_bytes's
    was made at 80 tokens, not the default 96)."""
    rc, out, err = run(converted["s4_bytes"], "--reference", FIX / "s4_bytes.ref.safetensors")
    assert rc == 0, out + err
    head = out.splitlines()[0]
    assert head.startswith(f"official outputs: {FIX / 's4_bytes.ref.safetensors'}: {{"), head
    meta = json.loads(head.split(": ", 2)[2])
    assert meta == {"conv_tokens": 64, "tokens": 80, "case": "byte-level S4 LM (vocab 256)"}, meta


def _reference_like(src: Path, dst: Path, metadata: dict | None = None, change=None) -> Path:
    """A copy of a reference file with other metadata, or with `change` applied to its tensors."""
    ref = load_file(str(src))
    if change is not None:
        change(ref)
    save_file(ref, str(dst), metadata=metadata)
    return dst


def test_a_reference_of_another_vocabulary_cannot_check_exit_2(converted):
    """Not FAIL (exit 1, a wrong mapping): the reference describes another model."""
    rc, out, err = run(converted["s4d_standalone"], "--reference", FIX / "s4_bytes.ref.safetensors")
    assert rc == 2 and "FAIL" not in out, out + err
    assert "the reference is of another model (a vocabulary of 256; CONVERTED_DIR's is 16)" in err, err
    assert "cannot check: " in err


def test_a_reference_with_another_number_of_layers_cannot_check_exit_2(converted):
    """Same vocabulary (256), 10 SSM layers in the U-Net reference, 3 in the plain SaShiMi."""
    rc, out, err = run(converted["sashimi_sc09"], "--reference", FIX / "sashimi_sc09_unet.ref.safetensors")
    assert rc == 2 and "FAIL" not in out, out + err
    assert "another model (10 SSM kernels; CONVERTED_DIR has 3)" in err, err


def test_a_reference_with_another_width_cannot_check_exit_2(converted, tmp_path):
    def wider(ref):
        ref["kernel.0"] = torch.cat([ref["kernel.0"], ref["kernel.0"]])  # (2H, L)

    ref = _reference_like(FIX / "s4_bytes.ref.safetensors", tmp_path / "r.safetensors", change=wider)
    rc, out, err = run(converted["s4_bytes"], "--reference", ref)
    assert rc == 2 and "another model (SSM layer 0 has 16 channels; CONVERTED_DIR's has 8)" in err, err


def _set(key, value):
    def change(ref):
        ref[key] = value(ref)

    return change


MALFORMED = [  # (the change to s4_bytes's reference, what the error names)
    (_set("tokens", lambda r: r["tokens"][:, :0]), "tokens must be (batch, length) integers"),
    (_set("tokens", lambda r: r["tokens"].double()), "tokens must be (batch, length) integers"),
    (_set("tokens", lambda r: r["tokens"][0]), "tokens must be (batch, length) integers"),
    (_set("tokens", lambda r: r["tokens"] - 1000), "tokens must be ≥ 0"),
    (_set("logits_step", lambda r: r["logits_step"][:, :-3].contiguous()), "do not fit tokens"),
    (_set("logits_conv", lambda r: torch.cat([r["logits_step"], r["logits_step"][:, :2]], 1)), "do not fit"),
    (_set("logits_conv", lambda r: r["logits_conv"][0]), "logits_conv must be (2, length, vocab) floats"),
    (_set("kernel.0", lambda r: r["kernel.0"][0]), "kernel.0 must be (channels, length) floats"),
]


@pytest.mark.parametrize(("change", "words"), MALFORMED, ids=[w for _, w in MALFORMED])
def test_a_malformed_reference_is_a_usage_error_exit_2_not_a_failed_conversion(converted, tmp_path, change,
                                                                               words):  # fmt: skip
    """Exit 1 says the conversion differs from the official code: a reference file whose tensors do not
    fit one another (empty, float, 1-D or negative tokens; logits of another length) gave a traceback deep
    in the comparison with exit 1 (a helper's audit). Now exit 2 naming what is wrong, and a metadata
    value that str.isdigit takes but int() does not ("²") is shown as it is."""
    ref = _reference_like(FIX / "s4_bytes.ref.safetensors", tmp_path / "r.safetensors", change=change)
    rc, out, err = run(converted["s4_bytes"], "--reference", ref)
    assert rc == 2 and "FAIL" not in out, out + err
    assert f"{ref}: not a reference file (" in err and words in err, err
    sup = _reference_like(FIX / "s4_bytes.ref.safetensors", tmp_path / "sup.safetensors", {"case": "²"})
    rc, out, err = run(converted["s4_bytes"], "--reference", sup)
    assert rc == 0 and r'"case": "\u00b2"' in out.splitlines()[0], out + err


def test_a_reference_made_from_another_file_cannot_check_exit_2(converted, tmp_path):
    """The reference's `source` / `sha256` against CONVERTED_DIR's config.json source: the SHA-256 decides
    where both have one (a renamed copy is the same file), else the file name."""
    source = json.loads((converted["s4_bytes"] / "config.json").read_text())["source"]
    fix = FIX / "s4_bytes.ref.safetensors"
    other = "cannot check: the reference is of another model (made from "
    cases = [  # (metadata, exit status, what stderr says)
        ({"source": "s4_bytes.ckpt", "sha256": source["sha256"]}, 0, ""),
        ({"source": "renamed.ckpt", "sha256": source["sha256"]}, 0, ""),
        ({"source": "s4_bytes.ckpt", "sha256": "0" * 64}, 2, f"{other}SHA-256 {'0' * 64}; CONVERTED_DIR"),
        ({"source": "other.ckpt"}, 2, f"{other}other.ckpt; CONVERTED_DIR was converted from s4_bytes.ckpt)"),
    ]
    for i, (meta, want, says) in enumerate(cases):
        ref = _reference_like(fix, tmp_path / f"r{i}.safetensors", meta)
        rc, out, err = run(converted["s4_bytes"], "--reference", ref)
        assert rc == want and says in err and "FAIL" not in out, (meta, out + err)


def test_usage_errors_exit_2_saying_why(converted, tmp_path):
    ref = FIX / "s4_bytes.ref.safetensors"
    rc, _, err = run(converted["s4_bytes"], "--reference", tmp_path / "none.safetensors")
    assert rc == 2 and "no such reference file" in err
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    rc, _, err = run(converted["s4_bytes"], "--reference", tmp_path / "bad.safetensors")
    assert rc == 2 and "not a readable safetensors file" in err
    rc, _, err = run(tmp_path / "nowhere", "--reference", ref)
    assert rc == 2 and "not a loadable checkpoint folder" in err
    rc, _, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--reference", ref)
    assert rc == 2 and "--reference takes CONVERTED_DIR only" in err
    rc, _, err = run(converted["s4_bytes"], "--reference", ref, "--tokens", "8", "--seed", "3")
    assert rc == 2 and "--tokens, --seed: options of the official run, not of --reference" in err, err
    rc, _, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"])
    assert rc == 2 and "--official S4_CHECKOUT --python PYTHON" in err
    rc, _, err = run(
        FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", tmp_path, "--python", "python3"
    )
    assert rc == 2 and "not a checkout of state-spaces/s4" in err


def test_arguments_given_the_wrong_way_say_what_to_give(converted, tmp_path, capsys):
    """A fresh-user trial: SRC and CONVERTED_DIR swapped said "SRC: no such folder" of a file, a run's folder
    as SRC "no such checkpoint file" of a folder, and --help's usage offered several SRC CONVERTED_DIR pairs,
    which are refused ("give SRC CONVERTED_DIR ..."). Each now says what to give."""
    co = _fake_checkout(tmp_path / "s4")
    rc, _, err = run(
        converted["s4_bytes"], FIX / "s4_bytes.ckpt", "--official", co, "--python", sys.executable
    )
    assert (
        rc == 2
        and (
            f"CONVERTED_DIR {FIX / 's4_bytes.ckpt'}: a file, not a folder: give SRC, the official "
            "checkpoint, first, then the folder python -m model.convert wrote from it"
        )
        in err
    ), err
    rc, _, err = run(tmp_path, converted["s4_bytes"], "--official", co, "--python", sys.executable)
    assert rc == 2 and f"{tmp_path}: a folder, not a checkpoint file: give the .ckpt" in err, err
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = " ".join(capsys.readouterr().out.split("\n\n")[0].split())
    assert usage == (
        "usage: python -m model.check_official SRC CONVERTED_DIR --official S4_CHECKOUT --python PYTHON "
        "[--config CONFIG] [--tokens N] [--seed S] [--save-reference FILE] python -m model.check_official "
        "CONVERTED_DIR --reference FILE"
    ), usage


def test_a_checkpoint_that_is_not_the_converted_folders_source_is_refused_before_the_official_code_runs(
    converted, tmp_path
):
    """SRC and a CONVERTED_DIR converted from another file: the official code ran first (30 s for a 2-layer
    model, minutes for a large one), then "cannot check: the reference is of another model", of a reference
    never given (a fresh-user trial). Now refused at once, naming both files; the stand-in python that
    would run the official code is never started."""
    co = _fake_checkout(tmp_path / "s4")
    ran = tmp_path / "ran"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake.chmod(0o755)
    rc, _, err = run(FIX / "trainpy_enwik.ckpt", converted["s4_bytes"], "--official", co, "--python", fake)
    theirs = hashlib.sha256((FIX / "s4_bytes.ckpt").read_bytes()).hexdigest()[:16]
    ours = hashlib.sha256((FIX / "trainpy_enwik.ckpt").read_bytes()).hexdigest()[:16]
    src = FIX / "trainpy_enwik.ckpt"
    assert rc == 2 and not ran.exists(), err
    assert (
        f"{converted['s4_bytes']} was converted from another file (s4_bytes.ckpt, SHA-256 {theirs}…) than "
        f"SRC {src} (SHA-256 {ours}…): give the checkpoint it was converted from, or convert this one first "
        f"(python -m model.convert {src} OUT_DIR)"
    ) in err, err
    rc, _, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co, "--python", fake)
    assert rc == 2 and ran.exists() and "the official code failed (exit 1)" in err, (
        err
    )  # its own source: runs


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--tokens", "0", "--tokens 0: expected 1 to 2,097,152"),
        ("--tokens", "100000000", "--tokens 100000000: expected 1 to 2,097,152"),
        ("--seed", str(1 << 64), f"--seed {1 << 64}: expected -9,223,372,036,854,775,808 to "
         "18,446,744,073,709,551,615 (torch's seeds)"),
        ("--seed", str(-(1 << 63) - 1), f"--seed {-(1 << 63) - 1}: expected"),
    ],
)  # fmt: skip
def test_out_of_range_tokens_and_seeds_are_usage_errors_before_the_official_code_runs(
    converted, tmp_path, option, value, says
):
    """--tokens 100000000 ran the official recurrence (token by token, in Python) without end, and a seed
    past torch's range was the child's traceback ("Overflow when unpacking long long"): each is now refused
    before the child starts (a checkout that does not import is given: it is never reached)."""
    checkout = _fake_checkout(tmp_path / "s4")
    rc, out, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", checkout,
                       "--python", sys.executable, option, value)  # fmt: skip
    assert rc == 2 and f"error: {says}" in err, (rc, err)
    assert "official outputs" not in out and "Traceback" not in err


def test_a_save_reference_that_cannot_be_written_is_a_usage_error_before_the_official_code_runs(
    converted, tmp_path
):
    """--save-reference into a folder that does not exist was written after the official run (minutes on
    a long model) and failed there: an OSError traceback and exit 1, the status of a wrong mapping. Now
    it is exit 2 saying why, before the child starts (a checkout that does not import: never reached)."""
    checkout = _fake_checkout(tmp_path / "s4")
    (tmp_path / "a_folder").mkdir()
    for target, says in (
        (tmp_path / "nowhere" / "ref.safetensors", f"no such folder {tmp_path / 'nowhere'}"),
        (tmp_path / "a_folder", "a folder, not a file"),
    ):
        rc, out, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", checkout,
                           "--python", sys.executable, "--save-reference", target)  # fmt: skip
        assert rc == 2 and f"error: --save-reference {target}: {says}" in err, (rc, err)
        assert "official outputs" not in out and "Traceback" not in err


def _fake_checkout(root: Path) -> Path:
    """A folder laid out like a checkout whose code does not import (src/ is not a package here)."""
    (root / "src" / "models" / "sequence").mkdir(parents=True)
    return root


def _recording_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in python that writes its arguments to a file and fails: (the stand-in, the file)."""
    argv, fake = tmp_path / "argv", tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" > {argv}\nexit 1\n')
    fake.chmod(0o755)
    return fake, argv


def test_the_official_run_gets_the_config_the_conversion_read(converted, tmp_path):
    """A .ckpt holding no config of its own (a state dict saved as .ckpt; a Lightning checkpoint saved without
    hyper_parameters) converts with the config found beside it (config.json's source.config_file names it),
    but the official run was given one beside a file not named .ckpt only: its child found none and failed
    ('no config (a .pt needs its run's config.yaml: --config)'), and a .pt converted with --config X got
    whatever lay beside it. Now the official run gets the config file the conversion read (the stand-in
    python records its arguments); a Lightning .ckpt with a config of its own gets none (it reads it)."""
    co = _fake_checkout(tmp_path / "s4")
    fake, argv = _recording_python(tmp_path)
    src = tmp_path / "run" / "m.ckpt"
    src.parent.mkdir()
    src.write_bytes((FIX / "s4d_zoh.pt").read_bytes())  # a state dict saved as .ckpt
    (src.parent / "m.yaml").write_bytes((FIX / "s4d_zoh.yaml").read_bytes())
    convert(src, tmp_path / "out")
    rc, _, err = run(src, tmp_path / "out", "--official", co, "--python", fake)
    assert rc == 2 and f" --config {(src.parent / 'm.yaml').resolve()}" in argv.read_text(), err
    given = tmp_path / "elsewhere" / "run.yaml"  # a .pt converted with --config
    given.parent.mkdir()
    given.write_bytes((FIX / "s4d_zoh.yaml").read_bytes())
    pt = tmp_path / "pt" / "model.pt"
    pt.parent.mkdir()
    pt.write_bytes((FIX / "s4d_zoh.pt").read_bytes())
    convert(pt, tmp_path / "out-pt", config=given)
    rc, _, err = run(pt, tmp_path / "out-pt", "--official", co, "--python", fake)
    assert rc == 2 and f" --config {given.resolve()}" in argv.read_text(), err
    rc, _, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co, "--python", fake)
    assert rc == 2 and "--config" not in argv.read_text(), err


def test_the_official_run_of_a_lightning_checkpoint_named_pt_reads_its_own_config(tmp_path):
    """A Lightning checkpoint saved as .pt converts with its own config (config_file 'inside last.pt'), but
    the official run was given the config.yaml found beside any file not named .ckpt, which the child reads
    over the checkpoint's own: another run's config there checked the conversion against another model.
    Where CONVERTED_DIR's config.json says the conversion read SRC's own config, none is given now."""
    co = _fake_checkout(tmp_path / "s4")
    fake, argv = _recording_python(tmp_path)
    src = tmp_path / "run" / "last.pt"
    src.parent.mkdir()
    src.write_bytes((FIX / "s4_bytes.ckpt").read_bytes())  # a Lightning checkpoint saved as .pt
    (src.parent / "config.yaml").write_bytes((FIX / "s4d_zoh.yaml").read_bytes())  # another run's
    assert convert(src, tmp_path / "out")["config_file"] == "inside last.pt (its hyper_parameters)"
    rc, _, err = run(src, tmp_path / "out", "--official", co, "--python", fake)
    assert rc == 2 and "--config" not in argv.read_text(), (err, argv.read_text())


def test_a_python_that_does_not_run_exits_2(converted, tmp_path):
    co = _fake_checkout(tmp_path / "s4")
    argv = (FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co)
    rc, _, err = run(*argv, "--python", tmp_path / "no-such-python")
    assert rc == 2 and "does not run" in err, err


def test_the_child_failing_exits_2_with_its_stderr_tail(converted, tmp_path):
    """The child (model/official/reference.py, here under this venv's python) imports the official code
    before it loads the checkpoint: a checkout that does not import fails there, with its traceback."""
    co = _fake_checkout(tmp_path / "s4")
    rc, _, err = run(
        FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co, "--python", sys.executable
    )
    assert rc == 2 and "the official code failed (exit 1)" in err, err
    assert "ModuleNotFoundError" in err and "src.models" in err, err


def test_a_python_without_a_module_the_official_code_imports_is_told_what_to_install(converted, tmp_path):
    """A python that lacks one of the official code's dependencies (a fresh-user trial: the project's own
    venv, without einops) failed with the child's traceback and nothing more; now the error names the
    module, the python, the command that installs it there, and every dependency the official code needs."""
    co = _fake_checkout(tmp_path / "s4")
    (co / "src/models/nn").mkdir()
    for pkg in ("src", "src/models"):
        (co / pkg / "__init__.py").write_text("")
    (co / "src/models/nn/__init__.py").write_text("from s4_test_missing_dependency import rearrange\n")
    rc, _, err = run(
        FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co, "--python", sys.executable
    )
    assert rc == 2 and "No module named 's4_test_missing_dependency'" in err, err
    assert (
        f"{sys.executable} has no module s4_test_missing_dependency, which the official code imports: "
        f"install it there ({sys.executable} -m pip install s4_test_missing_dependency); the official code "
        "needs torch, einops, omegaconf, scipy and rich (a version-3 checkout opt_einsum too)"
    ) in err, err


def test_a_standalone_layer_the_checkout_lacks_is_not_a_package_to_install(tmp_path):
    """The standalone s4d.py description (s4d_standalone.pt + .json) against a checkout without
    models/s4/s4d.py (version 3's, which keeps it at src/models/s4/s4d.py) failed with 'No module named
    s4d', and the error then said '... has no module s4d, which the official code imports: install it there
    (PYTHON -m pip install s4d)', a package of PyPI, not the official code's. Now it names the checkout's
    missing file."""
    co = _fake_checkout(tmp_path / "s4")
    for mod in ("src/__init__", "src/models/__init__", "src/models/nn/__init__", "src/models/nn/utils",
                "src/utils/__init__", "src/utils/registry"):  # fmt: skip
        (co / f"{mod}.py").parent.mkdir(parents=True, exist_ok=True)
        (co / f"{mod}.py").write_text("")
    # (the child reads a .json description without omegaconf's help, which this venv lacks: a stand-in)
    (co / "omegaconf.py").write_text("class OmegaConf:\n    has_resolver = staticmethod(lambda name: True)\n")
    (co / "src/models/s4").mkdir()
    (co / "src/models/s4/s4d.py").write_text("")  # (version 3's place: not on the child's path)
    out = tmp_path / "converted"
    convert(FIX / "s4d_standalone.pt", out)
    rc, _, err = run(FIX / "s4d_standalone.pt", out, "--official", co, "--python", sys.executable)
    assert rc == 2 and "No module named 's4d'" in err, err
    assert "pip install" not in err, err
    assert f"{co} has no models/s4/s4d.py, the standalone S4D layer SRC's description names" in err, err


@pytest.mark.parametrize(("src", "layout", "says"), [
    ("trainpy_v3_s4.ckpt", "kernels", "has version 3's parameter names "
     "(model.layers.0.layer.kernel.kernel.log_dt): a version-3 checkpoint needs a checkout of version 3"),
    ("v3_sashimi.ckpt", "kernels", "has version 3's parameter names"),
    ("trainpy_enwik.ckpt", "ss", "has none of version 3's parameter names (log_dt, inv_w_real, w_imag, "
     "inv_A_real, kernel.kernel.*): a version-4 checkpoint needs a checkout of version 4"),
])  # fmt: skip
def test_a_checkpoint_checked_against_the_other_versions_checkout_is_told_which_it_needs(
    converted, tmp_path, src, layout, says
):
    """A fresh-user trial gave a version-3 train.py checkpoint the version-4 checkout (the child failed:
    "AssertionError: 'measure' and 'init' cannot both be passed into SSMKernel") and a version-4 one the
    version-3 checkout ("SequenceModel.__init__() got an unexpected keyword argument 'bidirectional'"):
    the traceback alone, exit 2. Now the error says which version SRC is and which the checkout is. A
    stand-in python fails as the official code did; the checkouts are laid out as each version's."""
    co = _fake_checkout(tmp_path / "s4")
    (co / "src" / "models" / "sequence" / layout).mkdir()
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\necho 'AssertionError: the official code failed on this checkpoint' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    (tmp_path / "conv").mkdir()  # (its conversion: the child fails before CONVERTED_DIR is read)
    rc, _, err = run(FIX / src, tmp_path / "conv", "--official", co, "--python", fake)
    version = {"kernels": 4, "ss": 3}[layout]
    assert rc == 2 and "the official code failed on this checkpoint" in err, err
    assert f"{FIX / src} {says}" in err, err
    assert f"--official {co} is of version {version} (it has src/models/sequence/{layout}/)" in err, err


@pytest.mark.parametrize(("src", "layout"), [
    ("trainpy_enwik.ckpt", "kernels"),
    # the standalone s4d.py layers (s4_layers.*.kernel.log_dt, that file's name in either version): before,
    # 'has version 3's parameter names ...: a version-3 checkpoint needs a checkout of version 3' of a file
    # whose layer the child reads from models/s4/s4d.py, version 4's layout (on version 3's layout: none)
    ("s4d_standalone.pt", "kernels"),
    ("s4d_standalone.pt", "ss"),
])  # fmt: skip
def test_a_child_failing_on_a_checkout_of_its_own_version_gets_no_version_line(
    converted, tmp_path, src, layout
):
    co = _fake_checkout(tmp_path / "s4")
    (co / "src" / "models" / "sequence" / layout).mkdir()
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ValueError: something else' >&2\nexit 1\n")
    fake.chmod(0o755)
    (tmp_path / "conv").mkdir()
    rc, _, err = run(FIX / src, tmp_path / "conv", "--official", co, "--python", fake)
    assert rc == 2 and err.rstrip().endswith("ValueError: something else"), err


def _reference_module():
    """model/official/reference.py, imported by path (it is the child's script, not part of the package's
    imports; importing it imports neither the official code nor a checkpoint)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ref_child", ROOT / "model" / "official" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FRAME = "the conv check takes the trained length, 64 tokens; the recurrence goes one pool frame, 16 tokens, "
FRAME += "past it"
LENGTHS = [  # (trained length, pools' product, --tokens) → (conv check, recurrence, what the line says)
    (64, 1, None, 64, 96, None),  # default: 1.5 × the trained length
    (64, 16, None, 64, 96, None),
    (27, 1, None, 27, 40, None),
    (64, 1, 10, 64, 65, "--tokens 10: raised to 65 (the conv check takes the trained length, 64 tokens;"),
    (64, 1, 64, 64, 65, "--tokens 64: raised to 65"),  # exactly the trained length: nothing past it
    (64, 1, 70, 64, 70, None),
    (64, 16, 10, 64, 80, "--tokens 10: raised to 80"),
    (64, 16, 70, 64, 80, f"--tokens 70: raised to 80 ({FRAME})"),  # exactly the trained length, rounded down
    (64, 16, 96, 64, 96, None),
    (64, 16, 100, 64, 112, "--tokens 100: rounded up to 112 (whole pool frames of 16 tokens)"),
]


@pytest.mark.parametrize(("limit", "P", "tokens", "T0", "T", "says"), LENGTHS)
def test_tokens_never_shorten_the_conv_check_and_the_recurrence_goes_past_it(limit, P, tokens, T0, T, says):
    """The child's lengths: the conv check at the whole trained length whatever --tokens says; the
    recurrence at least one pool frame (one token) past it, in whole frames; a changed N said in a line."""
    got_T0, got_T, note = _reference_module().reference_lengths(limit, P, tokens)
    assert (got_T0, got_T) == (T0, T) and got_T % P == 0 and got_T >= T0 + P
    assert (note is None) if says is None else (note is not None and note.startswith(says)), note


def test_the_childs_note_on_the_tokens_is_printed_in_one_line(converted, tmp_path):
    """The parent half of the live mode, with a stand-in for the official python that writes a fixture's
    reference and the child's summary line with its note: the note is printed alone, before the header."""
    co = _fake_checkout(tmp_path / "s4")
    note = "--tokens 10: raised to 65 (the conv check takes the trained length, 64 tokens; ...)"
    summary = json.dumps({"source": "s4_bytes.ckpt", "conv_tokens": 64, "tokens": 80, "note": note})
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done\n'
        f'cp "{FIX / "s4_bytes.ref.safetensors"}" "$out"\n'
        f"echo '{summary}'\n"
    )
    fake.chmod(0o755)
    rc, out, err = run(FIX / "s4_bytes.ckpt", converted["s4_bytes"], "--official", co, "--python", fake,
                       "--tokens", "10")  # fmt: skip
    assert rc == 0, out + err
    lines = out.splitlines()
    assert lines[0] == note and out.count("raised to") == 1, out
    assert lines[1].startswith("official outputs: ") and '"tokens": 80' in lines[1], out


def test_the_childs_safetensors_writer_is_read_back_exactly(tmp_path):
    """reference.py writes safetensors without the package (an official venv need not have it)."""
    mod = _reference_module()
    g = torch.Generator().manual_seed(0)
    tensors = {
        "tokens": torch.randint(0, 256, (2, 7), generator=g),
        "logits_conv": torch.randn(2, 5, 3, generator=g, dtype=torch.float64),
        "kernel.0": torch.randn(4, 9, generator=g, dtype=torch.float64).t(),  # not contiguous
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    mod.save_safetensors(tensors, tmp_path / "r.safetensors", {"tokens": 7, "source": "x.ckpt"})
    back = load_file(str(tmp_path / "r.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as f:
        assert f.metadata() == {"tokens": "7", "source": "x.ckpt"}


def test_a_checkpoint_the_official_train_py_wrote_loads_safely_with_only_the_inert_stand_ins():
    """trainpy_enwik.ckpt, written by Lightning 2.0.4 under the official train.py (not by our fixture
    scripts): every global its pickle names is one of OMEGACONF_GLOBALS (torch's own scan, without
    loading), and the safe loader reads the whole file, optimizer and scheduler states, callbacks and
    loops included, its config as plain dicts; the converter takes the task's Linear at decoder.1 (the
    pipeline's `decoder: sequence` comes first)."""
    from model.official.reader import OMEGACONF_GLOBALS, safe_torch_load

    src = FIX / "trainpy_enwik.ckpt"
    allowed = {name for _, name in OMEGACONF_GLOBALS}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(src)) <= allowed
    ckpt = safe_torch_load(src)
    assert ckpt["pytorch-lightning_version"] == "2.0.4"
    assert {"optimizer_states", "lr_schedulers", "callbacks", "loops", "hyper_parameters"} <= set(ckpt)
    assert ckpt["optimizer_states"][0]["state"] and ckpt["callbacks"]
    cfg = ckpt["hyper_parameters"]
    assert isinstance(cfg, dict) and cfg["decoder"] == "sequence" and cfg["dataset"]["_name_"] == "enwik8"
    assert {"decoder.1.weight", "decoder.1.bias"} <= set(ckpt["state_dict"])
    assert not any(k.startswith("decoder.0.") for k in ckpt["state_dict"])


@pytest.mark.parametrize("name,mode", [("trainpy_v3_s4", "nplr"), ("trainpy_v3_s4d", "diag")])
def test_a_checkpoint_version_3s_train_py_wrote_loads_safely_and_imports_as_version_3(name, mode, tmp_path):
    """trainpy_v3_*.ckpt, written by Lightning 1.5.10 under version 3's train.py (trainpy_v3.md): every
    global its pickle names is one of OMEGACONF_GLOBALS, the safe loader reads the whole file (optimizer,
    scheduler and callback states; Lightning 1.5 saves no loops), its config as plain dicts with version 3's
    layer options (no real_type key); the import renames version 3's kernel names and takes the task's
    Linear at decoder.1."""
    from model.official.reader import OMEGACONF_GLOBALS, read_source, safe_torch_load

    src = FIX / f"{name}.ckpt"
    allowed = {n for _, n in OMEGACONF_GLOBALS}
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(src)) <= allowed
    ckpt = safe_torch_load(src)
    assert ckpt["pytorch-lightning_version"] == "1.5.10" and "loops" not in ckpt
    assert {"optimizer_states", "lr_schedulers", "callbacks", "hyper_parameters"} <= set(ckpt)
    assert ckpt["optimizer_states"][0]["state"] and ckpt["callbacks"] and ckpt["global_step"] == 60
    cfg = ckpt["hyper_parameters"]
    layer = cfg["model"]["layer"]
    assert cfg["decoder"] == "sequence" and cfg["dataset"]["_name_"] == "enwik8"
    assert layer["mode"] == mode and layer["measure"] == "legs" and "real_type" not in layer
    v3_names = ".kernel.kernel.inv_A_real" if mode == "diag" else ".kernel.kernel.inv_w_real"
    assert any(k.endswith(v3_names) for k in ckpt["state_dict"]), sorted(ckpt["state_dict"])
    from model.official.mapping import map_official

    spec = map_official(*read_source(src))
    assert any("version-3 names renamed" in n for n in spec.notes), spec.notes
    # the card says its official names are the renamed ones (it said "the mapping follows its code at
    # e757cef" and listed ...layer.layer.kernel.inv_dt, a name the file does not have: a fresh-user trial)
    convert(src, tmp_path / "v3", vocab=FIX / "trainpy_v3.vocab.txt")
    card = (tmp_path / "v3" / "README.md").read_text()
    assert "(version 3 of it, the v3.0.0 tag: its parameter names renamed as the official " in card, card
    assert "model.layers.0.layer.layer.kernel.inv_dt" in card and "follows its code at e757cef)" not in card
    convert(FIX / "trainpy_enwik.ckpt", tmp_path / "v4", vocab=FIX / "trainpy_enwik.vocab.txt")
    assert "(the mapping follows its code at e757cef)." in (tmp_path / "v4" / "README.md").read_text()
    assert {"decoder.1.weight", "decoder.1.bias"} <= set(ckpt["state_dict"])
