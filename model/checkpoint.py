"""Checkpoints: model.safetensors + config.json (format version, config, weights checksum).

Nothing is ever unpickled. Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

FILE_MODE = 0o644  # a served checkpoint is read by another uid (the image's 10001, a mounted volume)
FORMAT = "s4-checkpoint"
FORMAT_VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match its config."""


# The network `load` builds from config.json is allocated before its tensors' shapes can be compared with
# the weights file's (the HiPPO initialization needs real values: no meta-device build). Sizes within
# ModelConfig's MAX_SIZE bounds can still describe terabytes (d_model 2^15, d_ff 2^17, n_layers 2^10)
# beside a small weights file, so while it builds, every parameter and buffer a module registers is
# counted and the build stops once they pass BUILD_FACTOR × the file's bytes + BUILD_SLACK bytes: a
# tensor is counted as it is registered, which for a Linear layer is before its initialization writes
# (touches) its pages. A network `save` wrote registers exactly its file's tensors (a tied head once
# more, the embedding's size), so the bound is never near for a checkpoint that matches its config.
BUILD_FACTOR, BUILD_SLACK = 2, 64 << 20
_build = threading.local()  # .limit (bytes) while `build_budget` is on in this thread, .total, .seen


class BuildOverBudget(MemoryError):
    """The network being built registered more parameter and buffer bytes than `build_budget` allows."""


def _count(module, name, tensor):
    limit = getattr(_build, "limit", None)
    if limit is None or tensor is None or tensor.is_meta or id(tensor) in _build.seen:
        return None
    _build.seen.add(id(tensor))
    _build.total += tensor.nelement() * tensor.element_size()
    if _build.total > limit:
        raise BuildOverBudget(f"{_build.total:,} bytes of parameters and buffers, over {limit:,}")
    return None


register_module_parameter_registration_hook(_count)
register_module_buffer_registration_hook(_count)


@contextmanager
def build_budget(limit: int):
    """While on (in this thread only): modules constructed may register at most `limit` bytes of
    parameters and buffers in all (each tensor counted once); the registration past it raises
    BuildOverBudget. Yields a function returning the bytes counted so far."""
    _build.limit, _build.total, _build.seen = limit, 0, set()
    try:
        yield lambda: _build.total
    finally:
        _build.limit = None
        _build.seen = set()


# a safetensors header's most bytes per tensor the config describes (ours: about 100, a name and its
# dtype, shape and offsets), and besides them (the metadata: ours one key)
HEADER_PER_TENSOR, HEADER_SLACK = 1024, 64 << 10


def _safetensors_sizes(f) -> tuple[int, int | None]:
    """(the open file's bytes, its header's bytes), the header's from the file's first 8 bytes
    (little-endian), None when they cannot be one: a file shorter than 8 bytes, or a header past its end."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        return size, None
    header = int.from_bytes(head, "little")
    return size, header if header <= size - 8 else None


def _read_tensors(f, wpath: Path, size: int, want_sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file `wpath` open as `f` (`size` bytes), read once: the bytes hashed
    against `want_sha256` are the bytes the safetensors library parses (`safetensors.torch.load`), so what
    is checked is what is loaded (the file was hashed, then opened again and mapped: a save that replaced
    it between the two was loaded unchecked; and read twice). The read holds the file and its tensors at
    once: `load` has sized the data against the config first. CheckpointError: a checksum mismatch, a file
    that ended early, or the library's reason the bytes are not its format."""
    f.seek(0)
    data = f.read(size)
    if len(data) != size:
        raise CheckpointError(
            f"{wpath}: unreadable safetensors file (the file ended at {len(data):,} of its {size:,} bytes "
            "while it was read)"
        )
    if want_sha256 is not None and hashlib.sha256(data).hexdigest() != want_sha256:
        raise CheckpointError(f"{wpath}: checksum mismatch (file is corrupt or was changed after saving)")
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{wpath}: unreadable safetensors file ({exc})") from None


def _some(names: list[str], n: int = 8) -> str:
    """The first `n` of `names` and how many more (an error message of a file from outside stays short)."""
    more = f" and {len(names) - n:,} more" if len(names) > n else ""
    return f"{names[:n]}{more}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


RESERVED = ("format", "format_version", "config", "weights_sha256", "num_params")  # save() writes these


def save(net, directory: str | Path, extra: dict | None = None) -> Path:
    """Write `net` (any `model.build` network) to directory/{model.safetensors, config.json}, both mode
    0644 whatever the umask (safetensors writes its file 0600: through a private temporary file).

    Floating weights are stored float32, what `load` reads: a bfloat16 or float16 network's exactly (it
    wrote files load refused). `extra`: more top-level config.json fields, JSON values, none of RESERVED.
    Everything is checked before a file is touched, and each file is written beside its name and moved
    over it, so a refused save leaves a checkpoint already in `directory` as it was (an `extra` that was
    not JSON failed after the weights were replaced: the old checkpoint's checksum no longer matched).
    Raises ValueError for non-finite weights, a reserved or non-JSON `extra`."""
    d = Path(directory)
    state = {}
    for k, v in net.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point():
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"tensor {k!r} holds non-finite values: not saved (load would refuse it)")
            v = v.float()
        state[k] = v.contiguous()
    if net.config.tie_embeddings:
        state.pop("head.weight", None)  # shared with embed.weight; restored by construction
    clash = sorted(set(extra or {}) & set(RESERVED))
    if clash:
        raise ValueError(f"extra config.json fields {clash} are save()'s own ({', '.join(RESERVED)})")
    try:
        extra_text = json.dumps(extra or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra config.json fields must be JSON values: {exc}") from None
    d.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a map's keys in a random order, and the file's SHA-256 is the
    # model's identity (weights_sha256: sessions are exported and imported by it), so two saves of the same
    # weights must be the same bytes (with two keys, 2 of 12 saves differed)
    weights, config = d / f".{WEIGHTS}.saving", d / f".{CONFIG}.saving"
    try:
        save_file(state, str(weights), metadata={"format": f"{FORMAT}/{FORMAT_VERSION}"})
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": net.config.to_dict(),
            "weights_sha256": _sha256(weights),
            "num_params": net.num_params(),
            **json.loads(extra_text),
        }
        config.write_text(json.dumps(meta, indent=2) + "\n")
        for path in (weights, config):
            path.chmod(FILE_MODE)
        weights.replace(d / WEIGHTS)
        config.replace(d / CONFIG)
    finally:
        for path in (weights, config):
            path.unlink(missing_ok=True)
    return d


# config.json's most bytes: a model's is a few KB (its config, a chat template, a vocabulary's entry); a
# larger one is read no further (a 2 GB one was read whole, and a link to /proc/self/pagemap endlessly)
MAX_CONFIG_BYTES = 16 << 20


def checkpoint_file(directory: str | Path, name: str) -> Path:
    """`directory`/`name`, a file of a checkpoint: a regular file in the folder, or a link to one inside it
    (a Kubernetes ConfigMap's files are links into its own `..data`). CheckpointError naming it when it is
    missing, a link out of the folder (a checkpoint from elsewhere whose model.safetensors or config.json
    was a link to /etc/… or /proc/… was read as its own: a helper's audit) or not a regular file (a FIFO,
    a device, a folder)."""
    d = Path(directory)
    path = d / name
    if not path.exists():  # (a dangling link too)
        raise CheckpointError(f"{path}: missing (a checkpoint is a folder with {CONFIG} and {WEIGHTS})")
    real = path.resolve()
    if not real.is_relative_to(d.resolve()):
        raise CheckpointError(
            f"{path}: a link to {real}, outside the checkpoint folder: refused (copy the file into {d})"
        )
    if not real.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return path


def read_config(directory: str | Path) -> dict:
    """Parse and validate config.json; returns the whole metadata dict."""
    if not Path(directory).exists():
        raise CheckpointError(f"no such file or folder: {directory}")
    if not Path(directory).is_dir():
        raise CheckpointError(
            f"{directory}: a file, not a checkpoint folder (one with {CONFIG} and {WEIGHTS})"
        )
    path = checkpoint_file(directory, CONFIG)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(
            f"{path}: over {MAX_CONFIG_BYTES:,} bytes, not a checkpoint's config (a model's is a few KB)"
        )
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, integers of over 4,300 digits, nesting
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} config (field 'format' is {meta.get('format')!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
        )
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: field 'config' is missing or not an object")
    return meta


def load(directory: str | Path, device: str | torch.device = "cpu", meta: dict | None = None):
    """Load a network saved by `save`, of the class its config's `arch` names (SequenceModel or
    SaShiMi), float32, on `device`, in eval mode (dropout off: `net(tokens)` is deterministic; `.train()`
    to train it; it was returned in training mode); raises CheckpointError naming any problem of the
    checkpoint, ValueError for a device this process cannot use (`model.network.usable_device`). `meta`:
    the folder's config.json as `read_config` returned it, when the caller read it already (the config
    and the checksum it holds are then the ones the caller uses too; else it is read here)."""
    from model.network import ModelConfig, usable_device  # noqa: PLC0415

    device = usable_device(device)
    d = Path(directory)
    meta = read_config(d) if meta is None else meta
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{d / CONFIG}: invalid model config: {exc}") from None
    wpath = checkpoint_file(d, WEIGHTS)
    try:
        with open(wpath, "rb") as f:  # one open file: its size and header checked, then read once
            return _load_from(f, wpath, d, cfg, meta.get("weights_sha256"), device)
    except OSError as exc:
        raise CheckpointError(f"{wpath}: unreadable ({exc.strerror or exc})") from None


def _load_from(f, wpath: Path, d: Path, cfg, want: str | None, device):
    """`load`'s network from the weights file open as `f` (CheckpointError naming what is wrong)."""
    from model.arch import build  # noqa: PLC0415

    size, header = _safetensors_sizes(f)
    if header is None:
        raise CheckpointError(
            f"{wpath}: unreadable safetensors file ({size:,} bytes: not an 8-byte header length and a "
            "header within the file)"
        )
    limit = BUILD_FACTOR * size + BUILD_SLACK
    try:
        with build_budget(limit):
            net = build(cfg)
    except (MemoryError, RuntimeError) as exc:  # BuildOverBudget; or one tensor torch could not allocate
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise CheckpointError(
            f"{d / CONFIG}: its config describes a network larger than its weights file allows "
            f"({exc}; the file holds {size:,} bytes): not built"
        ) from None
    expected = net.state_dict()
    if cfg.tie_embeddings:
        expected.pop("head.weight", None)
    most = HEADER_PER_TENSOR * len(expected) + HEADER_SLACK
    if header > most:  # (unparsed: 1.4 million tensors' names made 3 GB of tensors and a 20 MB message)
        raise CheckpointError(
            f"{wpath}: a safetensors header of {header:,} bytes, where the config's {len(expected)} tensors "
            f"need at most {most:,}: not read"
        )
    # the file is read into memory whole: at most what the build allowed it beside the network
    need = sum(t.nelement() * t.element_size() for t in expected.values())
    if size - 8 - header > BUILD_FACTOR * need + BUILD_SLACK:
        raise CheckpointError(
            f"{wpath}: {size - 8 - header:,} bytes of tensor data, where the config's {len(expected)} "
            f"tensors hold {need:,}: not read"
        )
    state = _read_tensors(f, wpath, size, want)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{wpath}: tensors do not match the config (missing {_some(missing)}, unexpected "
            f"{_some(unexpected)})"
        )
    for k in expected:  # (the network's order: the first tensor a wrong width changes is named)
        v = state[k]
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise CheckpointError(
                f"{wpath}: tensor {k!r} is {v.dtype}{list(v.shape)}, config expects "
                f"{expected[k].dtype}{list(expected[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{wpath}: tensor {k!r} has non-finite values")
    net.load_state_dict(state, strict=not cfg.tie_embeddings)
    return net.to(device).eval()
