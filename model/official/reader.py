"""Read official state-spaces/s4 files without unpickling anything.

A Lightning `.ckpt` is a torch zip archive whose pickle holds the state dict and, under
`hyper_parameters`, the whole Hydra config as an omegaconf `DictConfig`. It is read with
`torch.load(weights_only=True)`: the restricted unpickler builds tensors and plain containers only, and
the few inert globals an official checkpoint holds (with pytorch-lightning 2.0.4 and omegaconf 2.3,
`torch.serialization.get_unsafe_globals_in_checkpoint` lists exactly `OMEGACONF_GLOBALS` below) are
mapped to stand-ins defined here, which record the pickled state and are then turned into plain
dicts and lists. omegaconf itself is never imported. Any other global is refused by the unpickler and
reported with its name.

A raw pickle (not a zip archive) is refused before torch sees it: torch's legacy loader would run
its payload before failing.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
import yaml

ZIP_MAGIC = b"PK\x03\x04"


class OfficialFormatError(ValueError):
    """The file is not an official checkpoint we can read safely, or it is malformed."""


class _Node:
    """Stand-in for an omegaconf node: NEWOBJ makes it, BUILD hands it the pickled __dict__."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict):
            raise OfficialFormatError(
                f"{type(self).__name__}: unexpected pickled state {type(state).__name__}"
            )
        self.__dict__.update(state)


class _DictConfig(_Node):
    pass


class _ListConfig(_Node):
    pass


class _AnyNode(_Node):
    pass


class _Metadata(_Node):
    pass


class _ContainerMetadata(_Node):
    pass


class _TypeName:
    """A class object in the config metadata (typing.Any, dict, list, int): kept as its name only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<type {self.name}>"


def _empty_defaultdict(*args) -> dict:
    """collections.defaultdict(factory) in ContainerMetadata.resolver_cache: an inert empty dict."""
    return {}


OMEGACONF_GLOBALS: list[tuple[Any, str]] = [
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_ListConfig, "omegaconf.listconfig.ListConfig"),
    (_AnyNode, "omegaconf.nodes.AnyNode"),
    (_Metadata, "omegaconf.base.Metadata"),
    (_ContainerMetadata, "omegaconf.base.ContainerMetadata"),
    (_TypeName("typing.Any"), "typing.Any"),
    (_empty_defaultdict, "collections.defaultdict"),
    (_TypeName("dict"), "builtins.dict"),
    (_TypeName("list"), "builtins.list"),
    (_TypeName("int"), "builtins.int"),
]


MAX_NODES = 1_000_000  # values a checkpoint's or a config's tree may expand to (an official one: thousands)


class _Budget:
    """Counts the values a tree copy makes: a pickle's memo, or YAML's anchors and aliases, let a small
    file name one object many times over, and a copy expands each reference (9 levels of 9 shared
    references: 387 million values from a 1.8 kB file, `model.convert` and a server's start-up held for
    minutes and gigabytes: a helper's audit). Raises OfficialFormatError past MAX_NODES."""

    def __init__(self, what: str) -> None:
        self.left, self.what = MAX_NODES, what

    def take(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise OfficialFormatError(
                f"{self.what} expands to more than {MAX_NODES:,} values (shared references copied out): "
                "not an official run's"
            )


def to_plain(obj: Any, budget: _Budget | None = None) -> Any:  # noqa: PLR0911
    """Stand-in omegaconf nodes → plain dicts, lists and values (interpolations stay strings). Raises
    OfficialFormatError past MAX_NODES values (`_Budget`), or for a tree nested deeper than Python's
    recursion limit."""
    if budget is None:
        budget = _Budget("the checkpoint's content")
        try:
            return to_plain(obj, budget)
        except RecursionError:
            raise OfficialFormatError("the checkpoint's content is nested too deeply") from None
    budget.take()
    if isinstance(obj, (_DictConfig, _ListConfig)):
        content = obj.__dict__.get("_content")
        if isinstance(content, dict):
            return {str(k): to_plain(v, budget) for k, v in content.items()}
        if isinstance(content, list):
            return [to_plain(v, budget) for v in content]
        return content  # None (a null container), or a string: '???' (missing) or an interpolation
    if isinstance(obj, _AnyNode):
        return to_plain(obj.__dict__.get("_val"), budget)
    if isinstance(obj, dict):
        return {k: to_plain(v, budget) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v, budget) for v in obj]
    if isinstance(obj, _Node | _TypeName):
        raise OfficialFormatError(f"unexpected omegaconf object {type(obj).__name__} in the config")
    return obj


def _clean_cut(msg: str, limit: int = 400) -> str:
    """A long message cut at its last sentence (or word) end within `limit`, never inside a word."""
    if len(msg) <= limit:
        return msg
    cut = msg[:limit]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > 0 else cut[: cut.rfind(" ")] + " …"


def safe_torch_load(path: str | Path, data: bytes | None = None) -> Any:
    """torch.load(weights_only=True) of a torch zip archive, with only the omegaconf stand-ins allowed.
    `data`: the file's bytes, when the caller read them (and hashed them: `model.convert`), so that what is
    loaded is what was hashed; else the file is read here. Raises OfficialFormatError naming the file and,
    for a refused global, its name."""
    path = Path(path)
    size = path.stat().st_size if data is None else len(data)
    if size == 0:
        raise OfficialFormatError(f"{path}: the file is empty (0 bytes): not written, or truncated?")
    if data is None:
        with open(path, "rb") as f:
            head = f.read(4)
    else:
        head = data[:4]
    if head != ZIP_MAGIC:
        raise OfficialFormatError(
            f"{path}: not a torch zip archive (first bytes {head!r}); a raw pickle is refused without "
            "being loaded (loading it could run code)"
        )
    if not zipfile.is_zipfile(path if data is None else io.BytesIO(data)):  # a zip's directory is at its
        raise OfficialFormatError(  # end: torch says "failed finding central directory" or "[Errno 22] …"
            f"{path}: a torch zip archive without its end ({size} bytes): truncated, not fully written or "
            "copied? Copy the checkpoint again (compare its SHA-256 with the original's)"
        )
    _check_crcs(path, data)
    try:
        with torch.serialization.safe_globals(OMEGACONF_GLOBALS):
            if data is None:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
            else:
                obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler's own errors: UnpicklingError, RuntimeError, ...
        raise _refused(path, exc) from None
    return to_plain(obj)


def _check_crcs(path: Path, data: bytes | None) -> None:
    """OfficialFormatError naming the first record of the torch zip archive whose bytes do not match the
    CRC-32 that torch.save wrote for it. torch.load does not check them, so a flipped byte in a tensor's
    record loaded as a changed weight, and the import passed its own checks (which compare our forms with
    each other): a corrupt copy converted and served silently wrong (a helper's audit)."""
    try:
        with zipfile.ZipFile(path if data is None else io.BytesIO(data)) as z:
            bad = z.testzip()  # reads every record: 0.4 s for 512 MB on this 2-core VM
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as exc:
        bad = f"? ({exc})"
    if bad is not None:
        raise OfficialFormatError(
            f"{path}: record {bad} of the torch zip archive does not match its CRC-32: the file is corrupt "
            "(damaged in copying or storage?). Copy the checkpoint again (compare its SHA-256 with the "
            "original's)"
        )


def _check_file(src: Path) -> None:
    """OfficialFormatError for a folder or a missing file, named as such."""
    if src.is_dir():
        raise OfficialFormatError(
            f"{src}: a folder, not a checkpoint file: give the .ckpt (e.g. its checkpoints/last.ckpt) or .pt"
        )
    if not src.is_file():
        raise OfficialFormatError(f"{src}: no such file")


def read_file(src: str | Path) -> bytes:
    """The bytes of an official file (OfficialFormatError for a folder, a missing or unreadable file)."""
    src = Path(src)
    _check_file(src)
    try:
        return src.read_bytes()
    except OSError as exc:
        raise OfficialFormatError(f"{src}: unreadable ({exc.strerror or exc})") from None


def _refused(path: Path, exc: Exception) -> OfficialFormatError:
    """The safe loader's refusal of `path`, naming the global it holds when that was the reason."""
    msg = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"unrecognized function ([^\s]+)", msg)
    what = f"it holds {m.group(1)}, which is not allowed" if m else _clean_cut(msg.splitlines()[0])
    return OfficialFormatError(f"{path}: refused by the safe loader: {what}")


class _CachedVocab(_Node):
    """Stand-in for the official src.dataloaders.utils.vocabulary.Vocab pickled in a data folder's cache.pt:
    its __dict__ only (idx2sym, sym2idx, counter, ...); no method of it is ever called."""


def read_vocab_cache(path: str | Path) -> list[str]:
    """The symbols (`idx2sym`, in id order) of the vocabulary the official LM datasets cache in their data
    folder (src/dataloaders/lm.py `_save_to_cache`: torch.save((vocab, train, valid, test), cache.pt)),
    which the official code trains on whenever that file exists. Read with torch.load(weights_only=True,
    mmap=True): the Vocab object is an inert stand-in (`_CachedVocab`), its token tensors are mapped, not
    read. Raises OfficialFormatError for a file that is not such a cache (or holds any other class)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([(_CachedVocab, "src.dataloaders.utils.vocabulary.Vocab")]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # the unpickler's own errors, as safe_torch_load's
        raise _refused(path, exc) from None
    vocab = obj[0] if isinstance(obj, tuple) and obj else None
    symbols = vocab.__dict__.get("idx2sym") if isinstance(vocab, _CachedVocab) else None
    if not (isinstance(symbols, list) and all(isinstance(x, str) for x in symbols)):
        raise OfficialFormatError(f"{path}: not the official dataset cache (vocab, train, valid, test)")
    return symbols


def _resolve(cfg: dict, value: Any, root: dict, depth: int, budget: _Budget, path: tuple = ()) -> Any:  # noqa: PLR0911
    """Resolve the simple interpolations the official configs use: ${a.b} and ${oc.select:a.b,default},
    absolute or relative to the node holding them, as omegaconf reads them (`path`: where `value` sits):
    ${.x} is x beside it, each further dot one container up (a run's .hydra/config.yaml holds them
    unresolved: the audio datasets' `__l_max: ${.sample_len}`, which the S4 layers' `l_max` selects,
    the layer patterns' `dropout: ${...dropout}`); a list's items are named by their index (${a.0.b}).
    Anything else stays an unresolved string (and is refused if an option we need holds it)."""
    budget.take()
    if isinstance(value, dict):
        return {k: _resolve(cfg, v, root, depth, budget, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(cfg, v, root, depth, budget, (*path, i)) for i, v in enumerate(value)]
    if not (isinstance(value, str) and value.startswith("${") and value.endswith("}")) or depth > 8:
        return value
    inner = value[2:-1]
    default: Any = value
    if inner.startswith("oc.select:"):
        inner, _, d = inner[len("oc.select:") :].partition(",")
        try:
            default = None if d.strip() in ("", "null") else yaml.safe_load(d)
        except yaml.YAMLError:
            return value
    key = inner.lstrip(".")
    dots = len(inner) - len(key)  # 0: from the root; 1: the node's own container; each more: one up
    if not key or (dots and dots > len(path)):
        return default
    node: Any = root
    at: tuple = ()  # the keys and indices taken: where the node found sits
    for part in (*(path[: len(path) - dots] if dots else ()), *key.split(".")):
        if isinstance(node, dict) and part in node:
            node, at = node[part], (*at, part)
        elif isinstance(node, list) and str(part).isdigit() and int(part) < len(node):
            node, at = node[int(part)], (*at, int(part))
        else:
            return default
    return _resolve(cfg, node, root, depth + 1, budget, at)


def dataset_name(cfg: dict | None) -> str | None:
    """The official dataset a run's (resolved) config names, its `dataset._name_`, or None."""
    ds = cfg.get("dataset") if isinstance(cfg, dict) else None
    return ds.get("_name_") if isinstance(ds, dict) else None


def resolve_config(cfg: dict) -> dict:
    """`cfg` with its interpolations resolved (`_resolve`), copied out. Raises OfficialFormatError past
    MAX_NODES values (YAML aliases, interpolations of large subtrees) or for a tree nested too deeply."""
    try:
        return _resolve(cfg, cfg, cfg, 0, _Budget("the config"))
    except RecursionError:
        raise OfficialFormatError("the config is nested too deeply") from None


def read_yaml(path: str | Path) -> dict:
    """A Hydra config.yaml (yaml.safe_load: plain data only)."""
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise OfficialFormatError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(cfg, dict):
        raise OfficialFormatError(f"{path}: expected a mapping at the top level")
    return cfg


def read_json(path: str | Path) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, ints over 4300 digits, deep nesting
        raise OfficialFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise OfficialFormatError(f"{path}: expected a JSON object")
    return cfg


def find_config(src: Path) -> Path | None:
    """The run config beside a .pt: SRC.yaml, SRC.json, config.yaml, .hydra/config.yaml; else, for a .pt in
    an official run's checkpoints/ folder (checkpoints/convert_pl_to_pt.py writes RUN/checkpoints/last.pt,
    or RUN/checkpoints/val/loss.pt for the best checkpoint), that run's RUN/.hydra/config.yaml, which Hydra
    writes beside checkpoints/ (it was not looked for: a helper's audit)."""
    run = next((d.parent for d in list(src.parents)[:2] if d.name == "checkpoints"), None)
    for cand in (src.with_suffix(".yaml"), src.with_suffix(".json"), src.parent / "config.yaml",
                 src.parent / ".hydra" / "config.yaml",
                 *((run / ".hydra" / "config.yaml",) if run is not None else ())):  # fmt: skip
        if cand.is_file():
            return cand
    return None


def config_origin(src: str | Path, config: str | Path | None, kind: str) -> str | None:
    """Where read_source(src, config) took the config from (its `kind` says how it read src): the given
    or found file's path, or the Lightning checkpoint's own hyper_parameters; None when there was none."""
    if config is not None:
        return str(config)
    if kind == "lightning":
        return f"inside {Path(src).name} (its hyper_parameters)"
    found = find_config(Path(src))
    return str(found) if found is not None else None


def _tensors(sd: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict) or not sd:
        raise OfficialFormatError(f"{where}: expected a non-empty state dict, got {type(sd).__name__}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OfficialFormatError(f"{where}: entries that are not named tensors: {bad[:5]}")
    return _unwrapped(dict(sd), where)


WRAPPER_PREFIX = "module."  # torch's DistributedDataParallel and DataParallel: every key under it
COMPILED = "_orig_mod."  # torch.compile's OptimizedModule: the compiled module's keys under it


def _unwrapped(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`sd` with the names torch's wrappers add taken out: a `module.` before every key (a model saved
    while wrapped in DistributedDataParallel or DataParallel), and `_orig_mod.` wherever torch.compile put
    it (`model._orig_mod.layers.0…`). They hold no weight of their own; such a file was refused with
    "model.layers indices [] are not 0..n-1" (a helper's audit). Raises OfficialFormatError when taking
    them out makes two keys one."""
    out = sd
    while out and all(k.startswith(WRAPPER_PREFIX) for k in out):
        out = {k.removeprefix(WRAPPER_PREFIX): v for k, v in out.items()}
    if any(COMPILED in k for k in out):
        out = {k.replace(COMPILED, ""): v for k, v in out.items()}
    if len(out) != len(sd):
        raise OfficialFormatError(
            f"{where}: keys with and without torch's {WRAPPER_PREFIX!r} or {COMPILED!r} name the same weight"
        )
    return out


def read_source(
    src: str | Path, config: str | Path | None = None, data: bytes | None = None
) -> tuple[dict, dict | None, str]:
    """(state dict, plain config or None, kind) from an official file (`data`: its bytes, when the caller
    read them: `read_file`).

    kind: "lightning" (a .ckpt: its own hyper_parameters, unless `config` is given), "state_dict" (a
    .pt state dict, or a Lightning checkpoint saved without hyper_parameters; config from `config` or found
    beside it), "standalone" (a state dict of the standalone models/s4 modules with a JSON description; see
    model.official.mapping)."""
    src = Path(src)
    if data is None:
        _check_file(src)
    obj = safe_torch_load(src, data)
    cfg_path = Path(config) if config is not None else None
    lightning = isinstance(obj, dict) and "state_dict" in obj
    hp = obj.get("hyper_parameters") if lightning else None
    if lightning and (cfg_path or (isinstance(hp, dict) and hp)):
        sd = _tensors(obj["state_dict"], f"{src}: state_dict")
        cfg = read_yaml(cfg_path) if cfg_path else hp
        kind = "lightning"
    else:  # (a Lightning checkpoint without its config too: the refusal's advice, a config beside it, holds)
        sd = _tensors(obj["state_dict"], f"{src}: state_dict") if lightning else _tensors(obj, str(src))
        cfg_path = cfg_path or find_config(src)
        cfg = None
        if cfg_path is not None:
            cfg = read_json(cfg_path) if cfg_path.suffix == ".json" else read_yaml(cfg_path)
        kind = (
            "standalone" if isinstance(cfg, dict) and cfg.get("format") == "s4-standalone" else "state_dict"
        )
    return sd, (resolve_config(cfg) if cfg is not None else None), kind
