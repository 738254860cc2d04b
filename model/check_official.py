"""Check a converted checkpoint against the official state-spaces/s4 code's own outputs.

    python -m model.check_official SRC CONVERTED_DIR --official S4_CHECKOUT --python OFFICIAL_PYTHON
        [--config CONFIG.yaml] [--tokens N] [--seed S] [--save-reference FILE]
    python -m model.check_official CONVERTED_DIR --reference FILE

`model.convert` verifies our conv and recurrent forms against each other; that cannot catch a wrong
mapping. This runs the official code itself: a child process (OFFICIAL_PYTHON, the checkout on its
path; model/official/reference.py) builds the official model from SRC's config, loads SRC, and writes
its float64 outputs on seeded random tokens (the conv forward within the kernels' trained length, the
official recurrence past it, each layer's kernel). Our process never imports the official code nor
unpickles SRC: it reads the child's safetensors file, loads CONVERTED_DIR (model.load) and compares.
`--reference FILE` compares against such a file made earlier (`--save-reference`), or a fixture's.

Exit status: 0 when every max relative error (max |ours − official| / max |official|) is within its
row's tolerance, 1 with the numbers when one is not: 1e-5 (as tests/test_official_import.py) for the
mapping, which the conv logits (float32 and float64) and the float64 kernels check; 1e-4 for the
recurrence (prefill + step, float64 and float32), the bound the server verifies its step by at load
(LOGITS_TOL): an S4 (DPLR) layer's recurrent form is its diagonalization where that reproduces the conv
kernel within that bound, and a trained LegS matrix is far from normal, so its eigenvectors cost digits
(a small model trained by the official train.py: each layer's diagonal form 1.4e-5 from its kernel, the
recurrence's logits 1.0e-5 from the official recurrence in float64 as in float32; a fresh-user trial),
while a wrong mapping moves the logits by far more (and fails the conv rows); 2 on a usage error (a missing
checkout or file, a python that does not run, the child failing: its stderr's tail is shown) or when the
reference is of another model (another vocabulary, number of SSM layers or width, or source file).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from model.network import MAX_SIZE

TOL = 1e-5
STEP_TOL = 1e-4  # the recurrence's rows: LOGITS_TOL of float32 and float64 (the module's docstring)
# --tokens at most twice the longest l_max a model may have (MAX_SIZE); --seed within torch.manual_seed's
# range. Unchecked, --tokens 100000000 ran the official recurrence (token by token, in Python) without
# end, and --seed 2**64 was the child's traceback ("Overflow when unpacking long long"): a helper's audit
MAX_TOKENS = 2 * MAX_SIZE["l_max"]
SEEDS = (-(1 << 63), (1 << 64) - 1)
REFERENCE_SCRIPT = Path(__file__).resolve().parent / "official" / "reference.py"
# what the child's python needs to import the official code (no Lightning, no hydra), and the pip name of a
# module whose package is named otherwise
OFFICIAL_DEPENDENCIES = "torch, einops, omegaconf, scipy and rich (a version-3 checkout opt_einsum too)"
PIP_NAMES = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow"}
# a kernel parameter only version 3 of the official code names so (other_version)
V3_PARAMETERS = r"\.(log_dt|inv_w_real|log_w_real|w_imag|inv_A_real)$"
V3_NAMES = V3_PARAMETERS + r"|\.kernel\.kernel\."
REQUIRED = ("tokens", "logits_conv", "logits_step")


class UsageError(Exception):
    """Exit 2: the check could not run (the message says why)."""


class OtherModel(UsageError):
    """Exit 2: the reference describes another model than CONVERTED_DIR (not a wrong mapping)."""

    def __init__(self, why: str):
        super().__init__(f"cannot check: the reference is of another model ({why})")


def rel(ours: torch.Tensor, official: torch.Tensor) -> float:
    a, b = ours.detach().double(), official.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def read_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A reference file: safetensors (no pickle) holding at least tokens, logits_conv, logits_step."""
    from safetensors import safe_open

    if not path.is_file():
        raise UsageError(f"{path}: no such reference file")
    try:
        with safe_open(str(path), framework="pt") as f:
            ref = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors' own errors (SafetensorError, OSError)
        raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    missing = [k for k in REQUIRED if k not in ref]
    if missing:
        raise UsageError(f"{path}: not a reference file (missing {missing})")
    why = _reference_problem(ref)
    if why is not None:  # (each was a traceback deep in compare, with exit 1: "the conversion differs")
        raise UsageError(f"{path}: not a reference file ({why})")
    return ref, meta


def _reference_problem(ref: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a reference's tensors, or None: tokens (B, T) of integers ≥ 0, B and T ≥ 1;
    logits_step (B, T, V) and logits_conv (B, T0, V), T0 ≤ T, floating and V ≥ 1; each kernel.i 2-D
    floating."""
    tokens, conv, step = ref["tokens"], ref["logits_conv"], ref["logits_step"]
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool or 0 in tokens.shape:
        return f"tokens must be (batch, length) integers, got {tokens.dtype}{list(tokens.shape)}"
    if int(tokens.min()) < 0:
        return f"tokens must be ≥ 0, got {int(tokens.min())}"
    B, T = tokens.shape
    for name, t in (("logits_step", step), ("logits_conv", conv)):
        if t.dim() != 3 or not t.is_floating_point() or t.shape[0] != B or t.shape[2] < 1:
            return f"{name} must be ({B}, length, vocab) floats, got {t.dtype}{list(t.shape)}"
    if step.shape[1] != T or not 1 <= conv.shape[1] <= T or conv.shape[2] != step.shape[2]:
        return (
            f"logits_step {list(step.shape)} and logits_conv {list(conv.shape)} do not fit tokens "
            f"{list(tokens.shape)} (logits_step: each token; logits_conv: the first 1 to {T})"
        )
    bad = [
        k for k, v in ref.items() if k.startswith("kernel.") and (v.dim() != 2 or not v.is_floating_point())
    ]
    return f"{bad[0]} must be (channels, length) floats" if bad else None


@torch.no_grad()
def compare(
    net, ref: dict[str, torch.Tensor], step: str = "the official recurrence"
) -> list[tuple[str, float, float]]:
    """(what, max rel. error, tolerance) of our model `net` against the official float64 outputs: conv
    logits in float32 (as served) and float64, each SSM kernel in float64 (of the folder's float32
    parameters, so ~1e-7, not the 1e-12 of the unrounded import in tests/test_official_import.py), conv
    logits past the trained length, and recurrent prefill + step in float64 (the per-layer step) and in
    float32 (each step path here), both to STEP_TOL."""
    tokens, official_conv, official_step = ref["tokens"], ref["logits_conv"], ref["logits_step"]
    T0, T = official_conv.shape[1], tokens.shape[1]
    V = net.config.vocab_size
    if official_conv.shape[-1] != V or int(tokens.max()) >= V:
        raise OtherModel(f"a vocabulary of {official_conv.shape[-1]}; CONVERTED_DIR's is {V}")
    kernels = [k for k in sorted(ref) if k.startswith("kernel.")]
    net = net.float().eval()
    ours = net.kernels()
    if kernels and len(kernels) != len(ours):
        raise OtherModel(f"{len(kernels)} SSM kernels; CONVERTED_DIR has {len(ours)}")
    widths = [(ref[f"kernel.{i}"].shape[0], k.H) for i, k in enumerate(ours)] if kernels else []
    if any(a != b for a, b in widths):
        i = next(i for i, (a, b) in enumerate(widths) if a != b)
        raise OtherModel(f"SSM layer {i} has {widths[i][0]} channels; CONVERTED_DIR's has {widths[i][1]}")
    rows = [(f"conv logits, {T0} tokens (float32)", rel(net(tokens[:, :T0]), official_conv), TOL)]
    net64 = copy.deepcopy(net).double()
    rows.append((f"conv logits, {T0} tokens (float64)", rel(net64(tokens[:, :T0]), official_conv), TOL))
    ours = net64.kernels()
    if kernels:
        errs = []
        for i, k in enumerate(ours):
            want = ref[f"kernel.{i}"]
            got = k(want.shape[1], dtype=torch.float64, backend="torch")
            errs.append(rel(got, want) if got.shape == want.shape else float("inf"))
        worst = max(range(len(errs)), key=errs.__getitem__)
        rows.append((f"SSM kernels (float64; worst: layer {worst} of {len(errs)})", errs[worst], TOL))
    rows.append((f"conv logits, {T} tokens, vs {step} (float32)", rel(net(tokens), official_step), TOL))
    n0 = max(1, T0 // 2)
    for model, whole in ((net64, False), (net, True), (net, False)):
        rec = model.to_recurrent(fused_network=whole)  # verified
        if whole and rec._net_step is None:
            continue  # no whole-network step here: the per-layer path below is the served one
        logits, state = rec.prefill(tokens[:, :n0], rec.init_state(tokens.shape[0]))
        out = [logits]
        for t in range(n0, T):
            lt, state = rec.step(tokens[:, t], state)
            out.append(lt[:, None])
        how = "whole-network step" if whole else "per-layer step"
        dtype = "float64" if model is net64 else "float32"
        got = rel(torch.cat(out, 1), official_step)
        rows.append((f"recurrent prefill {n0} + step to {T} ({dtype}, {how})", got, STEP_TOL))
    return rows


def official_reference(src: Path, official: Path, python: str, out: Path, config: Path | None,
                       tokens: int | None, seed: int, beside: bool = True) -> dict:  # fmt: skip
    """Run model/official/reference.py under the official venv's python; its summary (JSON) line. `beside`:
    without `config`, give the config found beside a source not named .ckpt (where the conversion's own
    record does not say which it read: `conversion_config`)."""
    from model.official.reader import find_config

    if src.is_dir():
        raise UsageError(
            f"{src}: a folder, not a checkpoint file: give the .ckpt (e.g. its checkpoints/last.ckpt) or .pt"
        )
    if not src.is_file():
        raise UsageError(f"{src}: no such checkpoint file")
    if not (official / "src" / "models" / "sequence").is_dir():
        raise UsageError(
            f"--official {official}: not a checkout of state-spaces/s4 (no src/models/sequence/)"
        )
    if config is not None and not config.is_file():
        raise UsageError(f"--config {config}: no such file")
    if config is None and beside and src.suffix != ".ckpt":
        config = find_config(src)  # the file model.convert reads beside a .pt (its path only)
    cmd = [python, str(REFERENCE_SCRIPT), str(src.resolve()), "--official", str(official.resolve()),
           "--out", str(out), "--seed", str(seed)]  # fmt: skip
    if config is not None:
        cmd += ["--config", str(config.resolve())]
    if tokens is not None:
        cmd += ["--tokens", str(tokens)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, check=False)
    except OSError as exc:  # not found, not executable
        raise UsageError(f"--python {python}: does not run ({exc})") from None
    if r.returncode != 0 or not out.is_file():
        tail = "\n".join(r.stderr.strip().splitlines()[-25:])
        missing = re.search(r"^ModuleNotFoundError: No module named '([\w.]+)'$", tail, re.MULTILINE)
        top = missing and missing.group(1).split(".")[0]
        if top == "s4d":  # the checkout's own standalone layer (reference.py: models/s4 on the path)
            tail += (
                f"\n{official} has no models/s4/s4d.py, the standalone S4D layer SRC's description names (a "
                "module of the checkout, not a package to install): give --official a checkout that has it, "
                "version 4's (version 3 keeps its copy at src/models/s4/s4d.py, which is not read)"
            )
        elif top and top != "src":  # (src: the checkout's own code, not a package to install)
            pkg = PIP_NAMES.get(top, top)
            tail += (
                f"\n{python} has no module {top}, which the official code imports: install it there "
                f"({python} -m pip install {pkg}); the official code needs {OFFICIAL_DEPENDENCIES}"
            )
        else:
            tail += other_version(src, official)
        raise UsageError(f"the official code failed (exit {r.returncode}) under {python}:\n{tail}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def other_version(src: Path, official: Path) -> str:
    """A line for a child that failed on a checkout of the other official version than SRC's ("" when the
    versions agree or cannot be told): version 3 (tag v3.0.0, src/models/sequence/ss/) names its kernels'
    parameters log_dt, inv_w_real, log_w_real, w_imag, inv_A_real, kernel.kernel.*; version 4
    (src/models/sequence/kernels/) none of them. Each version's code fails on the other's checkpoint with
    a traceback of its own ('measure' and 'init' cannot both be passed; an unexpected 'bidirectional')."""
    from model.official.reader import read_source

    seq = official / "src" / "models" / "sequence"
    checkout = 3 if (seq / "ss").is_dir() else 4 if (seq / "kernels").is_dir() else None
    try:
        keys = list(read_source(src)[0])
    except (OSError, ValueError):  # OfficialFormatError: the child's own error says what is wrong
        return ""
    if not any(k.startswith("model.") for k in keys):  # the standalone s4d.py layers (s4_layers.*): their
        return ""  # log_dt is that file's name in either version, not version 3's training checkpoint's
    named = sorted((k for k in keys if re.search(V3_NAMES, k)), key=lambda k: not re.search(V3_PARAMETERS, k))
    v3 = named[0] if named else None  # a log_dt (…) first, as the more telling name
    if checkout == 4 and v3 is not None:
        return (
            f"\n{src} has version 3's parameter names ({v3}): a version-3 checkpoint needs a checkout of "
            f"version 3 (git -C {official} checkout v3.0.0, or a checkout of its own), and --official "
            f"{official} is of version 4 (it has src/models/sequence/kernels/)"
        )
    if checkout == 3 and v3 is None and any(".kernel." in k for k in keys):
        return (
            f"\n{src} has none of version 3's parameter names (log_dt, inv_w_real, w_imag, inv_A_real, "
            f"kernel.kernel.*): a version-4 checkpoint needs a checkout of version 4 at the commit it was "
            f"trained with (the mapping follows e757cef), and --official {official} is of version 3 (it has "
            "src/models/sequence/ss/)"
        )
    return ""


def converted_from(src: Path, converted: Path) -> None:
    """UsageError when CONVERTED_DIR's config.json names another source (by SHA-256) than SRC's bytes: the
    live check ran the official code first (minutes on a large model) and then said "the reference is of
    another model", a reference the user never gave (a fresh-user trial's two runs, paired the wrong way)."""
    from model.checkpoint import _sha256

    try:
        source = json.loads((converted / "config.json").read_text()).get("source") or {}
        theirs = source.get("sha256") if isinstance(source, dict) else None
    except (OSError, ValueError, AttributeError):
        return  # check() says what is wrong with the folder
    if not isinstance(theirs, str) or not src.is_file():
        return
    try:
        ours = _sha256(src)
    except OSError:
        return  # (the child's read says why)
    if ours != theirs:
        named = f"{source['file']}, " if isinstance(source.get("file"), str) else ""
        raise UsageError(
            f"{converted} was converted from another file ({named}SHA-256 {theirs[:16]}…) than SRC {src} "
            f"(SHA-256 {ours[:16]}…): give the checkpoint it was converted from, or convert this one first "
            f"(python -m model.convert {src} OUT_DIR)"
        )


def conversion_config(converted: Path) -> tuple[bool, Path | None]:
    """Where model.convert took CONVERTED_DIR's config (its config.json's source.config_file), for the
    official run to build its model from the same: (True, the file) where it names a file here, (True, None)
    where it was SRC's own (a Lightning checkpoint's hyper_parameters: "inside …"), else (False, None), not
    recorded or a file not here (the run then takes SRC's own, or the one beside a .pt). The run was given the
    file beside a source not named .ckpt only: a state dict saved as .ckpt, or a Lightning checkpoint without
    hyper_parameters, converted with the config beside it, failed with no config; a Lightning checkpoint
    saved as .pt was given the config beside it, which the child reads over the checkpoint's own."""
    try:
        source = json.loads((converted / "config.json").read_text()).get("source") or {}
    except (OSError, ValueError, AttributeError):
        return False, None
    name = source.get("config_file") if isinstance(source, dict) else None
    if not isinstance(name, str):
        return False, None
    if Path(name).is_file():
        return True, Path(name)
    return (True, None) if re.fullmatch(r"inside .+ \(its hyper_parameters\)", name) else (False, None)


def same_source(converted: Path, meta: dict) -> None:
    """OtherModel when the reference's metadata name another file than the one CONVERTED_DIR was converted
    from (its config.json's source): by SHA-256 where both have one (a renamed copy is the same file),
    else by file name where both have one."""
    try:
        source = json.loads((converted / "config.json").read_text()).get("source") or {}
    except (OSError, ValueError, AttributeError):
        return  # load() has read it already; a folder without the record has nothing to compare
    if not isinstance(source, dict):
        return
    for ref_key, ours_key, what in (("sha256", "sha256", "SHA-256 "), ("source", "file", "")):
        theirs, ours = meta.get(ref_key), source.get(ours_key)
        if theirs and ours:
            if theirs != ours:
                raise OtherModel(f"made from {what}{theirs}; CONVERTED_DIR was converted from {what}{ours}")
            return


def check(converted: Path, ref: dict[str, torch.Tensor], meta: dict) -> list[tuple[str, float, float]]:
    from model.checkpoint import CheckpointError, load

    try:
        net = load(converted)
    except (CheckpointError, OSError) as exc:
        raise UsageError(f"{converted}: not a loadable checkpoint folder ({exc})") from None
    same_source(converted, meta)
    return compare(net, ref, meta.get("logits_step", "the official recurrence"))


def describe(ref: dict[str, torch.Tensor], meta: dict) -> str:
    """A reference file's metadata for the header, with its lengths read from the tensors when the
    metadata leaves them out (the fixtures' files carry only a `case`)."""
    lengths = {"conv_tokens": ref["logits_conv"].shape[1], "tokens": ref["tokens"].shape[1]}
    values = {k: int(v) if v.isascii() and v.isdigit() else v for k, v in meta.items()}  # (strings; "²" is
    # a digit to str.isdigit, not to int)
    head = {k: values.pop(k) for k in ("source", "sha256") if k in values}
    return json.dumps({**head, **lengths, **{k: v for k, v in values.items() if k not in lengths}})


def report(rows: list[tuple[str, float, float]]) -> bool:
    """Print each row (what, error, its tolerance); whether every error is within its tolerance."""
    width = max(len(what) for what, _, _ in rows)
    ok = True
    for what, err, tol in rows:
        good = err <= tol
        ok &= good
        print(f"  {what:{width}s}  {err:.2e}  {'ok' if good else f'FAIL (> {tol:.0e})'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    usage = (
        "%(prog)s SRC CONVERTED_DIR --official S4_CHECKOUT --python PYTHON [--config CONFIG] [--tokens N] "
        "[--seed S] [--save-reference FILE]\n       %(prog)s CONVERTED_DIR --reference FILE"
    )
    ap = argparse.ArgumentParser(
        prog="python -m model.check_official", usage=usage, description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="SRC CONVERTED_DIR",
        help="the official checkpoint and its conversion (with --reference: CONVERTED_DIR only)",
    )
    ap.add_argument(
        "--official", type=Path, help="a checkout of state-spaces/s4 (the commit SRC was trained with)"
    )
    ap.add_argument(
        "--python", help=f"a python with the official code's dependencies: {OFFICIAL_DEPENDENCIES}"
    )
    ap.add_argument(
        "--config", type=Path, default=None, help="the run's config.yaml, as given to model.convert"
    )
    ap.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="length of the recurrence check (default 1.5 × the trained length; the official recurrence "
        "steps token by token in Python: lower it for a quicker check). The conv check always takes the "
        "whole trained length; N is raised to one pool frame (one token) past it and rounded up to whole "
        "frames, with a line saying so",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default 0)")
    ap.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="compare against this reference file instead of running the official code",
    )
    ap.add_argument(
        "--save-reference",
        type=Path,
        default=None,
        metavar="FILE",
        help="keep the official outputs in FILE (for a later --reference)",
    )
    args = ap.parse_args(argv)
    try:
        if args.reference is not None:
            if len(args.paths) != 1 or args.official or args.python:
                raise UsageError("--reference takes CONVERTED_DIR only (no SRC, --official or --python)")
            given = [f"--{k.replace('_', '-')}" for k in ("config", "tokens", "save_reference")
                     if getattr(args, k) is not None] + (["--seed"] if args.seed != 0 else [])  # fmt: skip
            if given:
                raise UsageError(f"{', '.join(given)}: options of the official run, not of --reference")
            converted = args.paths[0]
            ref, meta = read_reference(args.reference)
            print(f"official outputs: {args.reference}: {describe(ref, meta)}")
        else:
            if len(args.paths) != 2 or not args.official or not args.python:
                raise UsageError(
                    "give SRC CONVERTED_DIR --official S4_CHECKOUT --python PYTHON (or --reference)"
                )
            if args.tokens is not None and not 1 <= args.tokens <= MAX_TOKENS:
                raise UsageError(f"--tokens {args.tokens}: expected 1 to {MAX_TOKENS:,}")
            if not SEEDS[0] <= args.seed <= SEEDS[1]:
                raise UsageError(f"--seed {args.seed}: expected {SEEDS[0]:,} to {SEEDS[1]:,} (torch's seeds)")
            src, converted = args.paths
            if converted.is_file():  # (the two given the other way round, say)
                raise UsageError(
                    f"CONVERTED_DIR {converted}: a file, not a folder: give SRC, the official checkpoint, "
                    "first, then the folder python -m model.convert wrote from it"
                )
            if not converted.is_dir():
                raise UsageError(f"{converted}: no such folder (convert first: python -m model.convert)")
            converted_from(src, converted)  # before the official run (minutes on a large model)
            if args.save_reference is not None:  # before the official run (minutes): its write failing
                # after it was an OSError traceback, exit 1, the status of a wrong mapping (a helper's audit)
                if not args.save_reference.parent.is_dir() or args.save_reference.is_dir():
                    raise UsageError(
                        f"--save-reference {args.save_reference}: "
                        + ("a folder, not a file" if args.save_reference.is_dir()
                           else f"no such folder {args.save_reference.parent}")
                    )  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="s4-check-") as tmp:
                out = Path(tmp) / "official.safetensors"
                recorded, config = (
                    (True, args.config) if args.config is not None else conversion_config(converted)
                )
                meta = official_reference(
                    src, args.official, args.python, out, config, args.tokens, args.seed, beside=not recorded
                )
                ref, _ = read_reference(out)
                if args.save_reference is not None:
                    try:
                        args.save_reference.write_bytes(out.read_bytes())
                    except OSError as exc:
                        raise UsageError(
                            f"--save-reference {args.save_reference}: not written ({exc.strerror or exc})"
                        ) from None
            note = meta.pop("note", None)
            if note:
                print(note)
            print(
                f"official outputs: {src} under {args.python}, checkout {args.official}: " + json.dumps(meta)
            )
        rows = check(converted, ref, meta)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{converted} against the official outputs (max relative error; tolerance {TOL:.0e}, the "
        f"recurrence {STEP_TOL:.0e}):"
    )
    ok = report(rows)
    print(
        "ok: the conversion reproduces the official code"
        if ok
        else "FAIL: the conversion differs from the official code"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
