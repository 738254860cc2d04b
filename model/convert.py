"""Convert a checkpoint trained with the official state-spaces/s4 code into an s4serve checkpoint.

    python -m model.convert SRC OUT_DIR [--config CONFIG.yaml] [--name NAME] [--force] [--sample-rate HZ]
        [--vocab DATA_DIR_OR_SYMBOLS_FILE]

SRC is a Lightning `.ckpt` of the official training script (its config inside), a `.pt` state dict
(checkpoints/convert_pl_to_pt.py output) with the run's config.yaml (--config, or SRC.yaml /
config.yaml / .hydra/config.yaml beside it), or a state dict of the standalone models/s4/s4d.py layers
with a JSON description (SRC.json, or --config). Nothing is unpickled (model.official.reader).

OUT_DIR gets model.safetensors + config.json (model.checkpoint.save) and a README.md model card with
the source's SHA-256, the mapping used and the verification errors; with --vocab, the vocabulary of an
official LM dataset (model/vocab.py: WikiText's and PTB's words, enwik8's bytes, text8's characters;
built from its data folder as the official code builds it, or read from a symbols file) as vocab.txt.
Anything the official model does that ours cannot express exactly is refused: exit status 2 and a message
naming the option and value.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path

import torch

from model.checkpoint import _sha256, save
from model.official.mapping import (
    V3_RENAMED_NOTE,
    Imported,
    MissingConfig,
    Unsupported,
    _positive_int,
    map_official,
)
from model.official.reader import (
    OfficialFormatError,
    config_origin,
    dataset_name,
    find_config,
    read_file,
    read_source,
)
from model.vocab import DATASETS as VOCAB_BUILDS
from model.vocab import VOCAB_FILE, VOCABS, Vocab, VocabError, load_vocab

log = logging.getLogger("model.convert")

OFFICIAL_COMMIT = "e757cef"  # the state-spaces/s4 commit whose code the mapping follows
SUFFIXES = (".ckpt", ".pt", ".pth")


# src/dataloaders/lm.py: these LM datasets number tokens by a frequency-ordered Vocab (or BPE), not bytes
VOCAB_DATASETS = ("wt2", "wt103", "ptb", "enwik8", "text8", "lm1b")


class ConvertError(ValueError):
    """The source cannot be converted (unreadable, unsupported option, or failed verification)."""


class MissingConfigError(ConvertError):
    """A .pt state dict without its run's config; `reason` is the message without the advice on where
    to give it (the converter's --config, the server's config.yaml beside the file)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def monitored(src: Path) -> tuple[Path, tuple[str, ...]] | None:
    """For the best checkpoint the official ModelCheckpoint keeps (`filename: ${train.monitor}`, e.g.
    RUN/checkpoints/val/loss.ckpt: the monitor's slash makes a subfolder of checkpoints/): the run's
    checkpoints/ folder and the monitor's parts (("val", "loss")); None for any other file."""
    path = Path(src).resolve()
    for up in (2, 3):  # checkpoints/val/loss.ckpt, or a monitor of two slashes
        if len(path.parents) > up and path.parents[up - 1].name == "checkpoints":
            folder = path.parents[up - 1]
            return folder, path.relative_to(folder).with_suffix("").parts
    return None


def default_name(src: Path) -> str:
    """A source's model name: its stem, or for Lightning's `last.ckpt` (and a `last.pt` made from it) the
    run folder's name (RUN/checkpoints/last.ckpt → RUN), so that two runs do not both serve as 'last'; for
    the official best checkpoint (`monitored`) the run's name and the monitor's (RUN/checkpoints/val/loss.ckpt
    → RUN-val-loss), so that it is neither 'loss' nor the same name as another run's."""
    if (best := monitored(src)) is not None:
        run, parts = best[0].parent.name, best[1]
        name = "-".join((run, *parts))
        return name if re.fullmatch(r"[A-Za-z0-9._=-]+", name) and run else src.stem
    if src.stem != "last":
        return src.stem
    folder = src.resolve().parent
    run = folder.parent if folder.name == "checkpoints" else folder
    return run.name if re.fullmatch(r"[A-Za-z0-9._-]+", run.name or "") else src.stem


def training_length(cfg: dict | None) -> tuple[int, str] | None:
    """The length of the sequences a run trained on, and the config key that says it: the dataset's
    `__l_max` (what the layers' `l_max` defaults to), the loader's `l_max` (the LM loader's), the
    dataset's `l_max` or its `sample_len` (the audio datasets' clip); None when the config says none."""
    ds = cfg.get("dataset") if isinstance(cfg, dict) else None
    loader = cfg.get("loader") if isinstance(cfg, dict) else None
    keys = (
        (ds, "dataset", "__l_max"),
        (loader, "loader", "l_max"),
        (ds, "dataset", "l_max"),
        (ds, "dataset", "sample_len"),
    )
    for section, where, key in keys:
        if isinstance(section, dict) and _positive_int(n := section.get(key)):
            return n, f"{where}.{key}"
    return None


def length_warning(cfg: dict | None, unit: str) -> str | None:
    """Why the served model may not be the one its run trained: a layer's `l_max` (model.layer.l_max)
    shorter than the training length. The official FFTConv convolves with a kernel of min(L, l_max) taps
    (src/models/sequence/kernels/fftconv.py, FFTConv.forward: l_kernel = min(L, round(self.L / rate))), so a
    run with a shorter l_max than its sequences trained a model that sees
    no further back than l_max steps; the recurrent form (as the official generate.py's step) sees the
    whole context, so from step l_max on its outputs differ from the official forward's. `unit`: what a
    step is (tokens, samples)."""
    trained = training_length(cfg)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    layers = model.get("layer") if isinstance(model, dict) else None
    layers = layers if isinstance(layers, list) else [layers]
    kernels = [lc["l_max"] for lc in layers if isinstance(lc, dict) and _positive_int(lc.get("l_max"))]
    name = "model.layer.l_max"
    levels = isinstance(model, dict) and model.get("_name_") in ("sashimi", "unet")
    if levels and _positive_int(model.get("l_max")):
        # version 3's Sashimi and SequenceUNet (version 4's take no l_max) give their top level's layers
        # model.l_max (each lower level that over the strides before it, for its shorter sequences): the layer
        # config's own is not read (a version-3 U-Net's was, warning of a length no layer had)
        kernels, name = [model["l_max"]], "model.l_max"
    if trained is None or not kernels or min(kernels) >= trained[0]:
        return None
    k, (n, key) = min(kernels), trained
    return (
        f"{name} = {k} is shorter than the sequences it trained on ({key} = {n}): the official "
        f"forward convolves with kernels of {k} taps, so the run trained a model that sees no further back "
        f"than {k} {unit}; served in its recurrent form (as the official generate.py steps it) it sees the "
        f"whole context, so once its context is longer than {k} {unit} its outputs differ from the official "
        "forward's, with which its training and validation losses were measured (python -m "
        f"model.check_official compares the two up to {k} {unit} only)"
    )


def token_warning(dataset: str | None, vocab_size: int) -> str | None:
    """Why a text model's ids may not be bytes: fewer than 256 of them (the server refuses such a text
    model: its text routes send UTF-8 bytes as ids), or an official dataset that numbers tokens by a
    vocabulary."""
    words = dataset in VOCAB_BUILDS  # a vocabulary --vocab builds (or reads) for the server
    library = "use it through the library (model.load) by its token ids"
    reasons = []
    if vocab_size < 256:
        reasons.append(
            f"vocab {vocab_size} < 256: the server's text routes send UTF-8 bytes as ids (id = byte), so "
            "the server refuses to serve it" + (" without its vocabulary" if words else f"; {library}")
        )
    if dataset in VOCAB_DATASETS:
        reasons.append(
            f"trained on dataset {dataset!r}, whose token ids are the official code's frequency-ordered "
            f"vocabulary (vocab {vocab_size}), not UTF-8 bytes"
            + (
                ""  # (the reason before says how the server reads ids)
                if vocab_size < 256
                else ": the server's text routes send bytes as ids (id = byte), so served as text it reads "
                "and writes garbage"
            )
            + (
                "; give it its vocabulary (--vocab; or the symbols file beside it as vocab.txt, which "
                "model.convert and a server given the file read: python -m model.vocab DATA_DIR CKPT "
                "vocab.txt)"
                if words
                else f"; the server reads only the vocabularies of {', '.join(sorted(VOCAB_BUILDS))} "
                f"(--vocab), not {dataset}'s" + ("" if vocab_size < 256 else f": {library}")
            )
        )
    return "; ".join(reasons) or None


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
        expected.pop("head.weight", None)
    tensors = dict(imp.tensors)
    if cfg.tie_embeddings:
        tensors.pop("head.weight", None)
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


def _vocab(src: Path, vocab, dataset: str | None, V: int, text: bool) -> Vocab | None:
    """--vocab's vocabulary (None without it): built from a data folder as the official code builds the
    dataset's (`model.vocab.DATASETS`), or read from a symbols file as the dataset's kind of symbol (words
    for a dataset not listed there); ConvertError unless it is a text model's and has V symbols."""
    if vocab is None:
        return None
    if not text:
        raise ConvertError(f"{src}: --vocab is a text model's option; this is an audio model")
    try:
        if Path(vocab).is_dir():
            if dataset not in VOCAB_BUILDS:
                raise ConvertError(
                    f"{src}: --vocab {vocab} is a data folder, but the dataset {dataset!r} is not one whose "
                    f"vocabulary is built from its files ({sorted(VOCAB_BUILDS)}); give a symbols file"
                )
            words = Vocab.from_dataset(vocab, dataset)
            if words.warning:
                log.warning("--vocab %s: %s", vocab, words.warning)
        else:
            _, lower, kind = VOCAB_BUILDS.get(dataset, ((), False, "words"))
            words = VOCABS[kind].read(vocab, lower_case=lower)
    except VocabError as exc:
        raise ConvertError(f"--vocab: {exc}") from None
    if len(words) != V:
        raise ConvertError(
            f"--vocab {vocab}: {len(words)} {words.unit}s, but the model's vocabulary has {V}: not this "
            "model's data?"
        )
    return words


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
    name: str, src: Path, sha: str, kind: str, imp: Imported, ver: dict, config_file: str | None,
    warning: str | None = None, vocab: str | None = None,
) -> str:  # fmt: skip
    c = imp.config
    # a version-3 checkpoint's names are renamed first (model.official.mapping._v3_to_v4 says so in a note):
    # the Mapping table's official column holds the renamed ones, which the file does not
    v3 = V3_RENAMED_NOTE in imp.notes
    lines = [
        f"# {name}",
        "",
        "Imported from a checkpoint trained with the official "
        "[state-spaces/s4](https://github.com/state-spaces/s4) code by `python -m model.convert` "
        + (
            "(version 3 of it, the v3.0.0 tag: its parameter names renamed as the official "
            "`checkpoints/convert_v3_to_v4.py` renames them, which the Mapping table's official column "
            f"shows, then mapped as its code at {OFFICIAL_COMMIT} reads them)."
            if v3
            else f"(the mapping follows its code at {OFFICIAL_COMMIT})."
        ),
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
        f"vocab {c['vocab_size']}, {c['sample_rate']} Hz audio, "
        + ("8-bit linear |" if c.get("quantization") == "linear" else f"mu-law {c['mulaw']!r} |"),
        f"| embed_scale | {c['embed_scale']:.6g} |",
        f"| l_kernel per layer | {c.get('l_kernel')} |",
        "",
        *(
            [f"**Tokens:** {warning}. Use it through its token ids, with that vocabulary.", ""]
            if warning
            else []
        ),
        *(
            [
                f"**Vocabulary:** {vocab}; `model.vocab.load_vocab(folder)` encodes text to its ids and "
                "decodes them as the official data were written (model/vocab.py: WikiText's words with "
                "`<eos>` for a newline, enwik8's bytes, text8's characters).",
                "",
            ]
            if vocab
            else []
        ),
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


def _check_not_an_input(out: Path, src: Path, config, vocab) -> None:
    """ConvertError when OUT_DIR is, or holds, a file the conversion reads (SRC, its config, given or found
    beside it, its vocabulary): `--force` replaced OUT_DIR whole, so `convert RUN/checkpoints/last.ckpt RUN
    --force` deleted the run folder, the checkpoint in it, and `convert X.ckpt X.ckpt --force` the
    checkpoint itself, after converting it (a helper's audit)."""
    if not out.exists():
        return
    found = find_config(src) if config is None else None  # (read beside any file but a Lightning .ckpt)
    target = out.resolve()
    for p in (src, config, found, vocab):
        if p is not None and (target == Path(p).resolve() or target in Path(p).resolve().parents):
            raise ConvertError(
                f"{out}: {'is' if target == Path(p).resolve() else 'holds'} {p}, which this conversion "
                "reads (--force would delete it): give another OUT_DIR"
            )


def convert(src: str | Path, out_dir: str | Path, config: str | Path | None = None, name: str | None = None,
            tol: float = 1e-4, force: bool = False, sample_rate: int | None = None,
            vocab: str | Path | None = None, vocab_found: bool = False) -> dict:  # fmt: skip
    """SRC → OUT_DIR (model.safetensors, config.json, README.md). Returns the summary written to
    config.json's "source" ("warning": why its ids may not be bytes, or None). An existing OUT_DIR that
    is not empty is replaced only with `force` (whole: nothing of it is left). `vocab`: the dataset's data
    folder (its vocabulary built as the official code builds it for the config's dataset: wt103, wt2,
    ptb, enwik8, text8) or a symbols file (one per line), written as vocab.txt. `vocab_found`: `vocab` is
    the vocab.txt found beside SRC (`find_vocab`), not one the user named: an audio model, which has no
    vocabulary, converts without it (refused for a named one). Raises ConvertError
    (unreadable, refused, OUT_DIR not empty, or failed verification; MissingConfigError for a .pt
    without its config)."""
    from model.recurrent import VerificationError

    src, out = Path(src), Path(out_dir)
    _check_not_an_input(out, src, config, vocab)
    if not force and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: exists and is not empty; --force replaces it (all of it)")
    try:
        data = read_file(src)  # read once: the SHA-256 (the card's, the cache entry's) is of what is read
        sd, cfg, kind = read_source(src, config, data)
        sha, data = hashlib.sha256(data).hexdigest(), None  # (its tensors are in `sd` now)
        imp = map_official(sd, cfg, kind, sample_rate=sample_rate)
    except OfficialFormatError as exc:
        raise ConvertError(str(exc)) from None
    except MissingConfig as exc:
        raise MissingConfigError(
            f"{src}: {exc}; pass the run's config.yaml (its .hydra/config.yaml) with --config, or put it "
            f"beside the file as config.yaml or {src.stem}.yaml",
            f"{src}: {exc}",
        ) from None
    except Unsupported as exc:
        raise ConvertError(f"{src}: {exc}") from None
    train = cfg.get("train") if isinstance(cfg, dict) else None  # (read for train.ema alone)
    if train is not None and not isinstance(train, dict):  # (an AttributeError traceback before)
        raise ConvertError(f"{src}: train = {train!r}: expected a mapping (the run's train config)")
    ema = train.get("ema") if train else None
    ema = ema if isinstance(ema, (int, float)) and not isinstance(ema, bool) and ema > 0 else None
    if ema is not None:
        imp.notes.append(
            f"train.ema = {ema:g}: the run also kept an exponential moving average of its weights (in its "
            "optimizer's state; its /ema validation metrics are that average's); converted are the weights "
            "of state_dict, the ones the official load_from_checkpoint loads"
        )
    net = build(imp)
    try:
        ver = verify(imp, net, tol)
    except VerificationError as exc:
        raise ConvertError(f"{src}: verification failed: {exc}") from None
    name = name or default_name(src)
    dataset = dataset_name(cfg)
    text = imp.config.get("modality", "text") == "text"
    if text and sample_rate is not None:
        raise ConvertError(f"{src}: --sample-rate is a SaShiMi (audio) import's option; this is a text model")
    warning = token_warning(dataset, imp.config["vocab_size"]) if text else None
    if vocab_found and not text:  # (a vocab.txt beside an audio model is another model's)
        log.info("%s: an audio model: %s beside it is not its vocabulary (not read)", src, vocab)
        vocab = None
    words = _vocab(src, vocab, dataset, imp.config["vocab_size"], text)
    if words is not None:  # its ids are served through the vocabulary: the token warning no longer holds
        warning = None
    if (memory := length_warning(cfg, "tokens" if text else "samples")) is not None:
        warning = memory if warning is None else f"{warning}; {memory}"
    summary = {
        "from": "state-spaces/s4",
        "file": src.name,
        "sha256": sha,
        "kind": kind,
        "config_file": config_origin(src, config, kind),
        "dataset": dataset,
        "warning": warning,
        "ema": ema,
        "verification": {k: v for k, v in ver.items() if k != "layers"},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # (a conversion into OUT_DIR killed while it wrote left its temporary folder beside it: a day on, gone)
    drop_stale_temps(out.parent, patterns=temp_patterns(f".{out.name}.tmp-"))
    tmp = _new_folder(out.parent, f".{out.name}.tmp-")
    try:  # written beside OUT_DIR, then swapped in: an old OUT_DIR is replaced whole, never mixed
        extra = {"name": name, "source": summary}
        if words is not None:
            extra["vocab"] = {**words.describe(), "sha256": words.write(tmp / VOCAB_FILE)}
            how = f"read from `{vocab}`" if Path(vocab).is_file() else f"{dataset}'s, {words.origin}"
            summary["vocab"] = f"`{VOCAB_FILE}`, {len(words)} {words.unit}s ({how})"
            if words.warning:
                summary["vocab"] += f"; warning: {words.warning}"
        save(net, tmp, extra=extra)
        card = model_card(
            name, src, sha, kind, imp, ver, summary["config_file"], warning, summary.get("vocab")
        )
        (tmp / "README.md").write_text(card)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


# Part of every cache entry's name: raise it when a change to the conversion could change an entry or
# refuse a source it accepted (2: configs that contradict the weights, non-'lm' tasks are refused; 3: a
# backbone config without model.residual or model.norm, read as 'R' and LayerNorm before, and malformed
# task and dataset sections are refused; 4: a source whose zip records fail their CRC-32, a corrupt copy
# converted with a changed weight before, and layer options of other official versions, force_real, shift,
# hyper_act and linear, are refused; 5: config.json's init is the official init, not "legs" for every
# import, a standalone description's sizes must be integers, and an audio model beside a vocab.txt converts
# without it; 6: a version-3 DPLR checkpoint renamed by convert_v3_to_v4.py takes its transform from
# real_type, read as exp before whatever it said, and an S4D model's verification figures come from a
# float64 conv kernel; 7: a backbone pool named other than pool, avg or sample, a spectral one read as the
# identity before, is refused, a version-3 SaShiMi of S4D layers has model.l_max as its l_max, not 1024,
# and an S4 model's verification figures come from a float64 conv kernel; 8: a model.decoder other than a
# per-token sequence decoder, ignored before, is refused, and so is an audio dataset config without bits
# over weights of other than 256 tokens; the lm task on an audio dataset imports as audio, not text; a
# music run has its dataset.sample_rate; a server's conversion of a Lightning checkpoint named .pt reads its
# own config, not one beside it, under the same key), so entries an older converter wrote are not reused.
CONVERTER_VERSION = 8


# official files this process has hashed, (device, inode, mtime, size) → SHA-256: a server resolves each
# entry twice at a start (its preflight, then the load), so a source of 1 GB was read whole three or four
# times (as `_INTACT` does for the converted weights); `convert` hashes the bytes it reads itself
_SOURCE_SHA256: dict[tuple[int, int, int, int], str] = {}


def source_sha256(src: Path) -> str:
    """The SHA-256 of an official file, hashed once per process while its inode, mtime and size stay."""
    st = os.stat(src)
    mark = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if mark not in _SOURCE_SHA256:
        _SOURCE_SHA256[mark] = _sha256(src)
    return _SOURCE_SHA256[mark]


def cache_key(src: Path, config: Path | None, vocab: Path | None = None, sha256: str | None = None) -> str:
    """The cache entry of a source: its SHA-256 (`sha256`, the hash of the bytes a conversion read; else
    the file's now), and its separate config file's, and its vocabulary's, when there are, then `-v`
    CONVERTER_VERSION."""
    key = sha256 or source_sha256(src)
    if config is not None:
        key += "-" + hashlib.sha256(Path(config).read_bytes()).hexdigest()[:16]
    if vocab is not None:
        key += "-w" + hashlib.sha256(Path(vocab).read_bytes()).hexdigest()[:16]
    return f"{key}-v{CONVERTER_VERSION}"


def find_vocab(src: Path) -> Path | None:
    """The vocabulary served with an official file: a symbols file named vocab.txt beside it (one symbol
    per line, in id order, as the official `vocab_file`; `python -m model.vocab` writes one from a dataset's
    folder), or for the official best checkpoint (RUN/checkpoints/val/loss.ckpt, `monitored`) in the
    run's checkpoints/ folder, beside its last.ckpt; else None."""
    best = monitored(src)
    for folder in (Path(src).parent, *((best[0],) if best is not None else ())):
        if (folder / VOCAB_FILE).is_file():
            return folder / VOCAB_FILE
    return None


def convert_cached(src: str | Path, cache_dir: str | Path, config: str | Path | None = None,
                   name: str | None = None) -> Path:  # fmt: skip
    """Convert SRC once into CACHE/<sha256>/ and return that folder (reused while the source's bytes,
    and its config's and vocabulary's, are unchanged), with the vocabulary beside it (`find_vocab`) when
    there is one. Written to a temporary folder and renamed, so a crash never leaves a half-written
    entry; an entry changed since (its weights' or vocabulary's checksum) is logged and converted again."""
    src = Path(src)
    # the key holds the hash of the config found beside SRC whatever its name: read_source reads it for any
    # file that is not a Lightning checkpoint with its own, which it tells by content (a state dict saved as
    # .ckpt too), and a key without it served the conversion of an edited config's old text ever after. The
    # conversion itself is given `config` as the caller gave it, as the command line is: handed the config
    # found beside a .pt, it replaced a Lightning checkpoint's own (a last.ckpt saved as .pt)
    keyed = config if config is not None else find_config(src)
    vocab = find_vocab(src)
    cache = Path(cache_dir).expanduser()
    entry = cache / cache_key(src, keyed, vocab)
    if entry.exists():
        if (damage := _entry_damage(entry)) is None:
            _report(src, entry, "%s: its conversion (converter v%d%s) read from %s", src, CONVERTER_VERSION,
                    _read_vocab(entry, vocab), entry)  # fmt: skip
            return entry
        log.warning("%s: %s; converting %s again", entry, damage, src)
        shutil.rmtree(entry, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    drop_stale_temps(cache)
    t0 = time.perf_counter()
    tmp = _new_folder(cache, ".tmp-")
    try:
        try:
            summary = convert(src, tmp, config=config, name=name, vocab=vocab, vocab_found=True)
        except ConvertError as exc:
            if vocab is None or "--vocab" not in str(exc):
                raise
            where = "beside" if vocab.parent == src.parent else "in the run's checkpoints folder of"
            raise ConvertError(
                f"{vocab}, {where} {src.name}, is read as its vocabulary: {exc} (the vocabulary of the run's "
                f"data: python -m model.vocab DATA_DIR {src} {vocab} writes it; a checkpoint of another run "
                "needs a folder of its own)"
            ) from None
        # under the hash of the bytes converted: a source replaced after `cache_key` hashed it (a copy
        # landing, a training run saving last.ckpt) was converted from its new bytes, which the old
        # hash's entry would have served for the old file ever after
        read = cache / cache_key(src, keyed, vocab, sha256=summary["sha256"])
        if read.name.split("-", 1)[1] != entry.name.split("-", 1)[1]:  # (its config's or vocabulary's hash)
            # read by the converter from their paths: which bytes it read is not known, so nothing is kept
            changed = " or ".join(str(p) for p in (keyed, vocab) if p is not None)
            raise ConvertError(
                f"{changed} changed while {src} was converted: nothing was cached; start again"
            )
        if read != entry:
            log.warning("%s changed while it was converted: its conversion is of the bytes read, kept as %s",
                        src, read)  # fmt: skip
            entry = read
        try:
            os.replace(tmp, entry)
        except OSError:  # another process made it first
            if not (entry / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(src, entry, "%s: converted (converter v%d%s) and verified in %.1f s into %s (its model card: "
            "README.md there)", src, CONVERTER_VERSION, _read_vocab(entry, vocab), time.perf_counter() - t0,
            entry)  # fmt: skip
    return entry


def _read_vocab(entry: Path, vocab: Path | None) -> str:
    """For a log line: ', its vocabulary VOCAB' when the entry holds the vocabulary found beside SRC (an
    audio model's holds none: the file is another model's, not read), else the empty string."""
    return f", its vocabulary {vocab}" if vocab is not None and (entry / VOCAB_FILE).is_file() else ""


_REPORTED: set[Path] = set()  # cache entries whose conversion or reuse this process has logged


def _report(src: Path, entry: Path, *args) -> None:
    """Once per process for each cache entry used (a server resolves each entry twice at a start: its
    checks, then its load): log.info(*args), then the conversion's token warning (`token_warning`), as the
    command line prints it, so a server given SRC directly says it too."""
    if entry in _REPORTED:
        return
    _REPORTED.add(entry)
    log.info(*args)
    try:
        warning = json.loads((entry / "config.json").read_text())["source"]["warning"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if warning:
        log.warning("%s: %s", src, warning)


# weights files this process has found intact, as (path, mtime, size, SHA-256): a server resolves each
# entry twice at a start (its preflight, then the load), and hashing 1 GB of weights takes seconds
_INTACT: set[tuple[Path, int, int, str]] = set()


def _entry_damage(entry: Path) -> str | None:
    """What is wrong with a conversion cache entry (its weights or vocab.txt changed since it was written:
    their SHA-256 against config.json's), or None."""
    try:
        meta = json.loads((entry / "config.json").read_text())
        weights = entry / "model.safetensors"
        st = weights.stat()
        mark = (weights, st.st_mtime_ns, st.st_size, meta.get("weights_sha256"))
        if mark not in _INTACT:
            if _sha256(weights) != meta.get("weights_sha256"):
                return "its weights' checksum does not match"
            _INTACT.add(mark)
        load_vocab(entry)  # (None without one; VocabError for a vocab.txt changed or missing)
    except (OSError, ValueError, AttributeError, VocabError) as exc:
        return f"unusable ({exc})"
    return None


STALE_TMP_S = 86_400  # a conversion's temporary folder older than this is a killed one's (they take minutes)
# the random part of a temporary folder's name: `_new_folder`'s 12 hex digits, or the 8 characters of
# tempfile.mkdtemp, which made them before ff488aa (2026-12-02): a killed conversion of then left those
TEMP_SUFFIXES = ("[0-9a-f]" * 12, "[a-z0-9_]" * 8)


def temp_patterns(prefix: str) -> tuple[str, ...]:
    """Glob patterns naming exactly the temporary folders made with `prefix` (`_new_folder`; mkdtemp
    before it): the prefix, literally, then one of TEMP_SUFFIXES, nothing more."""
    return tuple(glob.escape(prefix) + suffix for suffix in TEMP_SUFFIXES)


# a conversion cache's temporary folders (`drop_stale_temps`): an entry's .tmp-*, and the ..tmp-*.tmp-* that
# `convert` writes the entry's model into
CACHE_TEMPS = (
    *temp_patterns(".tmp-"),
    *(f"..tmp-{a}.tmp-{b}" for a in TEMP_SUFFIXES for b in TEMP_SUFFIXES),
)


def drop_stale_temps(
    cache: Path, now: float | None = None, patterns: tuple[str, ...] = CACHE_TEMPS
) -> list[Path]:
    """Remove the temporary folders in a conversion cache that conversions killed midway left (older than
    STALE_TMP_S), each up to a model's size, which nothing removed (a helper's audit): an entry's `.tmp-*`,
    and the `..tmp-*.tmp-*` that `convert` writes the model into beside it before swapping it in (a kill
    while the weights were written left them there, missed by `.tmp-*`); `patterns`: other names (glob;
    `temp_patterns`) in `cache`. A younger one may be another process's conversion under way and is left.
    Only what a conversion of this user's made is removed: a folder (not a symlink to one) that this
    user owns, named as `_new_folder` names them (a '.tmp-notes' of the user's, in a cache that is a
    shared volume or beside OUT_DIR, stays, as does another user's). Returns those removed (logged)."""
    now = time.time() if now is None else now
    gone = []
    for path in sorted({p for pattern in patterns for p in cache.glob(pattern)}):
        try:
            st = path.lstat()  # (a symlink's own: never followed)
            ours = stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            if ours and now - st.st_mtime > STALE_TMP_S:
                shutil.rmtree(path)
                gone.append(path)
                log.info("%s: removed, the temporary folder of a conversion that did not finish", path)
        except OSError:  # (another process removing it too, or not ours to remove)
            continue
    return gone


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in `parent` with the process's umask applied, like any folder it makes
    (tempfile.mkdtemp's are 0700: a converted checkpoint renamed from one could not be read by the
    container's user, uid 10001, nor by any other)."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free temporary name")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="official .ckpt, .pt state dict, or standalone state dict")
    ap.add_argument("out_dir", type=Path, help="output checkpoint folder")
    ap.add_argument("--config", type=Path, default=None, help="the run's config.yaml (or a JSON description)")
    ap.add_argument("--name", default=None, help="model name for the card (default: SRC's stem; the run "
                    "folder's name for Lightning's last.ckpt)")  # fmt: skip
    ap.add_argument("--force", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    rate_help = "a SaShiMi import's audio rate (default: its dataset's; 16000 when unknown)"
    ap.add_argument("--sample-rate", type=int, default=None, metavar="HZ", help=rate_help)
    vocab_help = (
        "a text model's vocabulary: the dataset's data folder (built as the official code builds it: "
        "wt103, wt2, ptb, enwik8, text8) or a symbols file, one per line; written as vocab.txt (default: "
        "SRC's vocab.txt beside it, or beside its run's last.ckpt, when there is one, as a server reads it)"
    )
    ap.add_argument("--vocab", type=Path, default=None, metavar="DATA_DIR_OR_FILE", help=vocab_help)
    args = ap.parse_args(argv)
    if args.sample_rate is not None and not 1000 <= args.sample_rate <= 384000:
        print(f"error: --sample-rate = {args.sample_rate}: expected 1000 to 384000 Hz", file=sys.stderr)
        return 2
    vocab = args.vocab
    found = vocab is None and (vocab := find_vocab(args.src)) is not None  # as a server given SRC reads it
    if found:
        where = "beside" if vocab.parent == args.src.parent else "in the run's checkpoints folder of"
        note = (f"note: {vocab}, {where} {args.src.name}, is read as its vocabulary (a text model's), as a "
                f"server given {args.src.name} reads it (--vocab names another)")  # fmt: skip
    try:
        summary = convert(args.src, args.out_dir, args.config, args.name, force=args.force,
                          sample_rate=args.sample_rate, vocab=vocab, vocab_found=found)  # fmt: skip
    except (ConvertError, OSError) as exc:
        if found:
            print(note, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if found and summary.get("vocab"):
        print(note, file=sys.stderr)
    if summary["warning"]:
        print(f"warning: {args.src}: {summary['warning']}", file=sys.stderr)
    if summary["ema"]:
        print(f"note: {args.src}: the run kept an exponential moving average of its weights (train.ema = "
              f"{summary['ema']:g}); converted are the weights of its state_dict, not that average (the "
              "model card says so)", file=sys.stderr)  # fmt: skip
    v = summary["verification"]
    print(
        f"wrote {args.out_dir} (source sha256 {summary['sha256'][:16]}…; conv rel. err "
        f"{v['conv_logits_rel_err']:.1e}, recurrent {v['recurrent_logits_rel_err']:.1e})"
    )
    print(json.dumps(summary["verification"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
