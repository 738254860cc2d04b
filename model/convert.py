"""Convert a checkpoint trained with the official state-spaces/s4 code into an s4serve checkpoint.

    python -m model.convert SRC OUT_DIR [--config CONFIG.yaml] [--name NAME]

SRC is a Lightning `.ckpt` of the official training script (its config inside), a `.pt` state dict
(checkpoints/convert_pl_to_pt.py output) with the run's config.yaml (--config, or SRC.yaml /
config.yaml / .hydra/config.yaml beside it), or a state dict of the standalone models/s4/s4d.py layers
with a JSON description (SRC.json, or --config). Nothing is unpickled (model.official.reader).

OUT_DIR gets model.safetensors + config.json (model.checkpoint.save) and a README.md model card with
the source's SHA-256, the mapping used and the verification errors. Anything the official model does
that ours cannot express exactly is refused: exit status 2 and a message naming the option and value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model.checkpoint import _sha256, save
from model.official.mapping import Imported, Unsupported, map_official
from model.official.reader import OfficialFormatError, config_origin, find_config, read_source

OFFICIAL_COMMIT = "e757cef"  # the state-spaces/s4 commit whose code the mapping follows
SUFFIXES = (".ckpt", ".pt", ".pth")


class ConvertError(ValueError):
    """The source cannot be converted (unreadable, unsupported option, or failed verification)."""


def build(imp: Imported, dtype: torch.dtype = torch.float32):
    """A SequenceModel holding the imported tensors (SSM parameters rounded once, to `dtype`)."""
    from model.arch import build as build_net
    from model.network import ModelConfig

    try:
        cfg = ModelConfig.from_dict(imp.config)
    except (TypeError, ValueError) as exc:
        raise ConvertError(f"the imported config is not valid here: {exc}") from None
    net = build_net(cfg).to(dtype)
    expected = net.state_dict()
    if cfg.tie_embeddings:
        expected.pop("head.weight")
    tensors = dict(imp.tensors)
    if cfg.tie_embeddings:
        tensors.pop("head.weight")
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ConvertError(f"mapping does not fill our model exactly (missing {missing}, unexpected {extra})")
    state = {}
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ConvertError(f"{k}: mapped shape {list(v.shape)}, our model has {list(expected[k].shape)}")
        state[k] = v.to(expected[k].dtype)
    net.load_state_dict(state, strict=not cfg.tie_embeddings)
    return net.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@torch.no_grad()
def verify(imp: Imported, net, tol: float = 1e-4, seed: int = 0) -> dict:
    """Errors of the float32 model we save against the float64 evaluation of the imported parameters:
    conv logits, and the verified recurrent form's prefill + step, on fixed tokens at twice l_max."""
    net64 = build(imp, torch.float64)
    cfg = net.config
    g = torch.Generator().manual_seed(seed)
    L = min(2 * cfg.l_max, 512)
    tokens = torch.randint(0, cfg.vocab_size, (2, L), generator=g)
    ref = net64(tokens)
    conv = net(tokens)
    rec = net.to_recurrent(tol=tol)
    n0 = L // 2
    logits, state = rec.prefill(tokens[:, :n0], rec.init_state(2))
    steps = [logits]
    for t in range(n0, L):
        lt, state = rec.step(tokens[:, t], state)
        steps.append(lt[:, None])
    rec_logits = torch.cat(steps, 1)
    return {
        "tokens": L,
        "conv_logits_rel_err": _rel(conv, ref),
        "recurrent_logits_rel_err": _rel(rec_logits, ref),
        "layers": rec.report,
    }


def model_card(
    name: str, src: Path, sha: str, kind: str, imp: Imported, ver: dict, config_file: str | None
) -> str:
    c = imp.config
    lines = [
        f"# {name}",
        "",
        "Imported from a checkpoint trained with the official "
        "[state-spaces/s4](https://github.com/state-spaces/s4) code by `python -m model.convert` "
        f"(the mapping follows its code at {OFFICIAL_COMMIT}).",
        "",
        "| | |",
        "|---|---|",
        f"| source file | `{src.name}` ({kind}) |",
        f"| source SHA-256 | `{sha}` |",
        f"| config read | `{config_file}` |" if config_file else "| config read | (none) |",
        f"| model | {c['kernel']}, {c['n_layers']} layers, d_model {c['d_model']}, d_state {c['d_state']}, "
        f"d_ff {c['d_ff']}, vocab {c['vocab_size']} |"
        if c.get("arch", "isotropic") == "isotropic"
        else f"| model | SaShiMi pool {c['pool']}, expand {c['expand']}, ff {c['ff']}, {c['kernel']}, "
        f"{c['n_layers']} (S4, FF) pairs per level, d_model {c['d_model']}, d_state {c['d_state']}, "
        f"vocab {c['vocab_size']}, {c['sample_rate']} Hz audio, mu-law {c['mulaw']!r} |",
        f"| embed_scale | {c['embed_scale']:.6g} |",
        f"| l_kernel per layer | {c.get('l_kernel')} |",
        "",
        "## Verification",
        "",
        f"On {ver['tokens']} fixed tokens, against the float64 evaluation of the imported parameters:",
        "",
        f"- conv-mode logits (float32): max rel. error {ver['conv_logits_rel_err']:.2e}",
        f"- recurrent prefill + step logits (float32): max rel. error {ver['recurrent_logits_rel_err']:.2e}",
        "- recurrent form per layer (impulse response vs conv kernel): "
        + ", ".join(f"{r['layer']}: {r['form']} {r['rel_err']:.1e}" for r in ver["layers"]),
        "",
        "## Options read",
        "",
        *[f"- {n}" for n in imp.notes],
        "",
        "## Mapping",
        "",
        "| ours | official | how |",
        "|---|---|---|",
        *[f"| `{a}` | `{b}` | {h} |" for a, b, h in imp.mapping],
    ]
    return "\n".join(lines) + "\n"


def convert(src: str | Path, out_dir: str | Path, config: str | Path | None = None, name: str | None = None,
            tol: float = 1e-4) -> dict:  # fmt: skip
    """SRC → OUT_DIR (model.safetensors, config.json, README.md). Returns the summary written to
    config.json's "source". Raises ConvertError (unreadable, refused, or failed verification)."""
    from model.recurrent import VerificationError

    src, out = Path(src), Path(out_dir)
    try:
        sd, cfg, kind = read_source(src, config)
        imp = map_official(sd, cfg, kind)
    except OfficialFormatError as exc:
        raise ConvertError(str(exc)) from None
    except Unsupported as exc:
        raise ConvertError(f"{src}: {exc}") from None
    net = build(imp)
    try:
        ver = verify(imp, net, tol)
    except VerificationError as exc:
        raise ConvertError(f"{src}: verification failed: {exc}") from None
    sha = _sha256(src)
    name = name or src.stem
    summary = {
        "from": "state-spaces/s4",
        "file": src.name,
        "sha256": sha,
        "kind": kind,
        "config_file": config_origin(src, config, kind),
        "verification": {k: v for k, v in ver.items() if k != "layers"},
    }
    save(net, out, extra={"name": name, "source": summary})
    (out / "README.md").write_text(model_card(name, src, sha, kind, imp, ver, summary["config_file"]))
    return summary


def cache_key(src: Path, config: Path | None) -> str:
    """The cache entry of a source: its SHA-256 (and its separate config file's, when there is one)."""
    key = _sha256(src)
    if config is not None:
        key += "-" + hashlib.sha256(Path(config).read_bytes()).hexdigest()[:16]
    return key


def convert_cached(src: str | Path, cache_dir: str | Path, config: str | Path | None = None,
                   name: str | None = None) -> Path:  # fmt: skip
    """Convert SRC once into CACHE/<sha256>/ and return that folder (reused while the source's bytes,
    and its config's, are unchanged). Written to a temporary folder and renamed, so a crash never
    leaves a half-written entry."""
    src = Path(src)
    if config is None and src.suffix != ".ckpt":
        config = find_config(src)
    cache = Path(cache_dir).expanduser()
    entry = cache / cache_key(src, config)
    if (entry / "config.json").is_file() and (entry / "model.safetensors").is_file():
        return entry
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        convert(src, tmp, config=config, name=name)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process made it first
            if not (entry / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="official .ckpt, .pt state dict, or standalone state dict")
    ap.add_argument("out_dir", type=Path, help="output checkpoint folder")
    ap.add_argument("--config", type=Path, default=None, help="the run's config.yaml (or a JSON description)")
    ap.add_argument("--name", default=None, help="model name for the card (default: SRC's stem)")
    args = ap.parse_args(argv)
    try:
        summary = convert(args.src, args.out_dir, args.config, args.name)
    except (ConvertError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v = summary["verification"]
    print(
        f"wrote {args.out_dir} (source sha256 {summary['sha256'][:16]}…; conv rel. err "
        f"{v['conv_logits_rel_err']:.1e}, recurrent {v['recurrent_logits_rel_err']:.1e})"
    )
    print(json.dumps(summary["verification"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
