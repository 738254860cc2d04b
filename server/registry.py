"""The served models: load a checkpoint, convert it to the recurrent form, verify, warm up, start its
engine. A checkpoint that fails any step is not served; the reason is logged and shown by /readyz."""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from model import VerificationError, fused, load
from model import triton_step as triton_kernel
from model.checkpoint import CONFIG, WEIGHTS, CheckpointError, _sha256, checkpoint_file, read_config
from model.codecs import AudioCodec
from model.convert import SUFFIXES as OFFICIAL_SUFFIXES
from model.convert import VOCAB_DATASETS, ConvertError, MissingConfigError, convert_cached, default_name
from model.cuda_graphs import LARGEST_BUCKET, bucket_sizes
from model.form_cache import STATUSES, FormCache, to_recurrent
from model.form_cache import summary as form_cache_summary
from model.network import ModelConfig
from model.recurrent import RecurrentModel
from model.sampling import SamplingParams, sample
from model.vocab import DATASETS as VOCAB_BUILDS
from model.vocab import Vocab, VocabError, load_vocab
from server.chat import ChatTemplate, ChatTemplateError
from server.config import Settings
from server.engine import Engine
from server.media import replacement_stop
from server.metrics import Metrics
from server.schemas import GenerationConfig
from server.sessions import SessionTable, model_fingerprint

log = logging.getLogger("server.models")


class LoadingStopped(Exception):
    """The server is stopping (SIGTERM while the models load): no further model is loaded."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise LoadingStopped


# the dtype of each layer's kernel check (`model.recurrent.convert_kernel`: the float32 step's impulse
# response against the float64 conv kernel), before the network is cast to the served dtype
KERNEL_CHECK_DTYPE = "float32"

# /v1/models' `tokens` for a model served through a vocabulary, by its kind (model.vocab.VOCABS)
TOKENS = {"words": "words", "bytes": "vocab_bytes", "chars": "characters"}


@dataclass
class ServedModel:
    id: str
    path: Path
    config: ModelConfig
    rec: RecurrentModel
    engine: Engine
    fingerprint: str
    chat: ChatTemplate | None = None  # from config.json's chat_template (POST /v1/chat/completions)
    created: int = 0  # Unix time the weights file was written
    generation: dict = field(default_factory=dict)  # config.json's generation_config (GenerationConfig)
    vocab: Vocab | None = None  # a text model's vocabulary (vocab.txt: words, enwik8's bytes, text8's
    # characters); None: its ids are UTF-8 bytes
    # a model with a vocabulary: the fingerprint it had before the vocabulary counted (config + weights),
    # which an older export carries (refused by name: which vocabulary it was made with is unknown)
    fingerprint_without_vocab: str | None = None

    owned_by = "s4serve"

    def token_bytes(self, ids) -> bytes:
        """A text model's tokens as the UTF-8 bytes of their text: byte ids themselves, or their symbols'
        text (the engine's, which matches stop sequences against them)."""
        return self.engine.token_bytes(ids)

    @property
    def kind(self) -> str:
        return self.config.modality

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's `system_fingerprint` (the OpenAI routes' answers and chunks): what a seed's tokens
        depend on besides the request, as "fp_" + 12 hex digits of SHA-256 over `fingerprint` (config +
        weights' SHA-256, which sessions' exports are checked against) and how they are served (weights'
        dtype, state dtype, device type): the same for every replica serving a checkpoint alike."""
        served = f"{self.fingerprint}/{self.rec.verification['dtype']}/{self.rec.state_dtype}/"
        served += torch.device(self.rec.device).type
        return "fp_" + hashlib.sha256(served.encode()).hexdigest()[:12]

    @property
    def sample_rate(self) -> int | None:
        return self.config.sample_rate if self.kind == "audio" else None

    @property
    def codec(self) -> AudioCodec:
        """The audio tokens' codec (`ModelConfig.codec`)."""
        return self.config.codec

    @property
    def state_bytes(self) -> int:
        return self.rec.state_bytes_per_sequence

    @property
    def state_shape(self) -> list[int]:
        """One session's state shape, as the recurrent form lays it out (the server never looks inside)."""
        return list(self.rec.state_shape)

    def state_header(self, rec, seen: list[int]) -> dict:
        """The export header of a session of this model (export, and the session store)."""
        return {
            "model": self.id,
            "arch": self.config.arch,
            "fingerprint": self.fingerprint,
            "basis": self.rec.basis,  # what the state's coordinates mean (model.recurrent.state_basis)
            "shape": self.state_shape,
            "dtype": "float32",
            "byteorder": "little",
            "n_tokens": rec.n_tokens,
            "pending": rec.pending,
            "seen": seen,
            "utf8_tail": list(rec.utf8_tail),  # text: the unfinished character's bytes (0-3)
            "created": rec.created,  # Unix seconds: a session restored from the store keeps it
            "generated": rec.generated,  # the last request's generated tokens (kept by a restore too)
            "last_used": rec.last_used,  # Unix seconds (a stored session's info shows it)
        }

    def describe(self) -> dict:
        c = self.config
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
            "chat": self.chat is not None,
            "generation_config": self.generation,  # sampling defaults for fields a request leaves out
            "kind": self.kind,
            "arch": c.arch,
            "unet": c.unet,
            "sample_rate": self.sample_rate,
            "vocab_size": c.vocab_size,
            "tokens": "audio" if self.kind == "audio" else TOKENS[self.vocab.kind] if self.vocab else "bytes",
            "dropped_characters": list(self.vocab.drops) if self.vocab else [],
            "audio_codec": self.codec.name if self.kind == "audio" else None,
            "n_layers": c.n_layers,
            "d_model": c.d_model,
            "d_state": c.d_state,
            "kernel": c.kernel,
            "layer_forms": [r["form"] for r in self.rec.report],
            "dtype": self.rec.verification["dtype"],
            "state_dtype": str(self.rec.state_dtype).removeprefix("torch."),
            "verification": verification(self.rec),
            "state_bytes_per_session": self.state_bytes,
            "max_sessions": self.engine.pool.capacity,
        }


def verification(rec: RecurrentModel) -> dict:
    """What the load-time checks measured: per-layer kernel errors, and the network's logits errors
    (step, prefill) at the served dtype with the tolerance they met."""
    v = rec.verification
    return {
        "dtype": v["dtype"],
        "tokens": v["tokens"],
        "step_rel_err": v["step_rel_err"],
        "prefill_rel_err": v["prefill_rel_err"],
        "logits_tol": v["tol"],
        "kernel_rel_err": [r["rel_err"] for r in rec.report],
        # S4_STATE_DTYPE=float16: its check against the float32 step (`use_state_dtype`), else None
        "state_dtype_check": rec.state_dtype_check if rec.state_dtype != torch.float32 else None,
    }


def warm_up(rec: RecurrentModel, batch: int) -> None:
    """Touch every code path once (builds the fused step, sizes the allocator) before serving."""
    dev = rec.device
    state = rec.init_state(batch)
    _, state = rec.prefill(torch.zeros(batch, 8, dtype=torch.long, device=dev), state)
    logits, _ = rec.step(torch.zeros(batch, dtype=torch.long, device=dev), state, out=state)
    params = [SamplingParams(seed=0)] * batch
    sample(logits, params, [p.generator(dev) for p in params])


CGROUP = Path("/sys/fs/cgroup")  # the container's memory limit (cgroup v2: memory.max, memory.current)


def available_memory(device: torch.device) -> int:
    """Bytes a new allocation may take on `device`: free GPU memory on CUDA; on the CPU the system's
    available memory (psutil), or less when the process's cgroup (a container's memory limit) leaves less:
    memory.max less what memory.current counts but the page cache the kernel reclaims first (memory.stat's
    inactive_file, which the kubelet's working set leaves out too; memory.current counts it, so a pool that
    fit was refused in a container that had read its checkpoints and libraries)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = psutil.virtual_memory().available
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            used = int((CGROUP / "memory.current").read_text()) - cgroup_inactive_file()
            free = min(free, int(limit) - max(used, 0))
    except (OSError, ValueError):  # no cgroup v2 memory controller here
        pass
    return free


def cgroup_inactive_file() -> int:
    """memory.stat's inactive_file of this cgroup, in bytes (0 where it cannot be read)."""
    try:
        lines = (CGROUP / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "inactive_file" and value.strip().isdigit():
            return int(value)
    return 0


def state_pool_problem(rec: RecurrentModel, settings: Settings, name: str, reserved: int = 0) -> str | None:
    """Why the model's state slot pool (S4_MAX_SESSIONS rows of its state, and of its seen-token set) and
    its prefix cache (S4_PREFIX_CACHE_MB, in whole state rows, allocated as prompts are ingested) do not
    fit in the memory available, checked before the pool is allocated (a raw allocator error named no
    setting: a fresh-user trial); else None. `reserved`: bytes the prefix caches of the models loaded
    before may still take (`cache_reserve`), which the memory available does not show yet."""
    per_slot = rec.state_bytes_per_sequence + rec.config.vocab_size  # the state, and `seen` (one bool per id)
    row = rec.state_bytes_per_sequence
    cache = settings.prefix_cache_rows(row) * row
    device = torch.device(rec.device)
    pool, free = settings.max_sessions * per_slot, available_memory(device) - reserved
    if pool + cache <= free:
        return None
    if pool > free:
        return (
            f"S4_MAX_SESSIONS={settings.max_sessions}: model {name}'s state pool needs {pool:,} bytes "
            f"({settings.max_sessions:,} sessions x {per_slot:,} bytes), more than the {free:,} bytes of "
            f"{device.type} memory available; at most {max(free, 0) // per_slot:,} sessions fit"
        )
    beside = f" beside the prefix caches of the models loaded before ({reserved:,} bytes)" if reserved else ""
    return (
        f"S4_PREFIX_CACHE_MB={settings.prefix_cache_mb:.12g}: model {name}'s prefix cache ({cache:,} bytes) "
        f"and state pool ({pool:,} bytes: S4_MAX_SESSIONS={settings.max_sessions:,}) need more than the "
        f"{free:,} bytes of {device.type} memory available{beside}; at most "
        f"{max(free - pool, 0) / (1 << 20):.1f} MiB fit beside the pool"
    )


def cache_reserve(models: dict[str, ServedModel]) -> int:
    """Bytes the prefix caches of `models` (loaded, on the device the next one loads on) may still take: each
    one's budget less the rows it holds now (they serve while the next one loads). Their rows are allocated
    as prompts come, so the memory available at the next model's check does not show them (the pools are
    allocated by then)."""
    caches = [m.engine.prefix_cache for m in models.values() if m.engine.prefix_cache is not None]
    return sum(max(c.capacity * c.row_bytes - c.bytes, 0) for c in caches)


def use_triton_step(settings: Settings, device, name: str) -> bool:
    """`S4_TRITON_STEP`: whether model `name` on `device` steps its diagonal layers with the Triton kernel
    (model/triton_step.py): on a CUDA device, with the setting on, when the kernel runs there
    (`triton_step.probe`); a kernel that does not run (no triton, no C compiler for its launcher, …) is
    logged as a warning and the torch step serves."""
    if not (settings.triton_step and torch.device(device).type == "cuda"):
        return False
    why = triton_kernel.probe(device)
    if why is not None:
        log.warning("model %s: S4_TRITON_STEP is on but the Triton kernel does not run here (%s): the torch "
                    "step serves", name, why)  # fmt: skip
        return False
    log.info("model %s: its diagonal layers step with the Triton kernel (S4_TRITON_STEP)", name)
    return True


def compile_step(rec, settings: Settings, name: str) -> bool:
    """`S4_COMPILE_STEP`: torch.compile the decode step (`RecurrentModel.compile_step`) when the model is on
    a CUDA device and has the torch step (SaShiMi has not); True when set. The compile itself happens at
    the first steps (the graphs' warm-up, or `warm_up`)."""
    if not (settings.compile_step and rec.device.type == "cuda" and hasattr(rec, "compile_step")):
        if settings.compile_step:
            why = "not on a CUDA device" if rec.device.type != "cuda" else "no torch step to compile"
            log.info("model %s: S4_COMPILE_STEP ignored (%s)", name, why)
        return False
    rec.compile_step(True)
    log.info("model %s: the decode step runs through torch.compile (compiled at its first steps)", name)
    return True


def use_state_dtype(rec, settings: Settings, name: str) -> bool:
    """`S4_STATE_DTYPE=float16`: the decode batch's states stored in float16 (`use_state_dtype`, checked
    against the float32 step first) when the model is on a CUDA device and its step reads and writes
    them at 16 bits (`state16_native`: diagonal layers with the Triton kernel); True when they are. A
    model whose check fails is logged as an error, one without a 16-bit step (a DPLR layer, SaShiMi,
    S4_COMPILE_STEP, no Triton) as a warning, and both keep float32 states (widened and rounded around
    the float32 step, a 16-bit state would move more bytes, not fewer); on CPU the setting is logged as
    ignored (the C step keeps float32). float16 is applied only where no state the model can reach
    overflows it (`state16_bound`, proven=True): a model whose bound passes 65,504 keeps float32, logged as
    an error. Call it before `use_cuda_graphs` (the buffers take the dtype)."""
    if settings.state_dtype == "float32":
        return False
    if rec.device.type != "cuda":
        log.info("model %s: S4_STATE_DTYPE=%s ignored on CPU (the C step keeps float32 states)", name,
                 settings.state_dtype)  # fmt: skip
        return False
    if not getattr(rec, "state16_native", False):
        log.warning("model %s: S4_STATE_DTYPE=%s not used: its step has no 16-bit path (the Triton kernel "
                    "steps diagonal layers, not with S4_COMPILE_STEP, and not SaShiMi's), so a 16-bit state "
                    "would be widened and rounded around the float32 step, moving more bytes, not fewer; "
                    "its states stay float32", name, settings.state_dtype)  # fmt: skip
        return False
    try:
        r = rec.use_state_dtype(settings.state_dtype)
    except (ValueError, VerificationError) as exc:
        log.error("model %s: S4_STATE_DTYPE=%s not used (%s); its states stay float32", name,
                  settings.state_dtype, exc)  # fmt: skip
        return False
    log.info("model %s: decode states stored in %s (S4_STATE_DTYPE): next-token distributions %.1e from "
             "the float32 step's (mean total variation, %d rows × %d random tokens; at most %.1e), largest "
             "|state| %.3g, at most %.4g on any input (every rounding included; float16 holds 65504)", name,
             r["dtype"], r["tv_mean"], r["rows"], r["steps"], r["tol"], r["state_max_abs"],
             r["state_bound_max"])  # fmt: skip
    return True


def use_cuda_graphs(rec, settings: Settings, name: str) -> bool:
    """Capture the decode step's CUDA graphs (model/cuda_graphs.py) when the model is on a CUDA device,
    `S4_CUDA_GRAPHS` is on (SaShiMi's graphs: its dense step); True when captured. A capture that
    fails (a RuntimeError from CUDA), or graphs whose step differs from the eager step
    (`check_graphs`), are logged and the model serves with the plain torch step."""
    if not (settings.cuda_graphs and rec.device.type == "cuda" and hasattr(rec, "use_cuda_graphs")):
        return False
    buckets = bucket_sizes(min(settings.max_batch_size, LARGEST_BUCKET))
    try:
        seconds = rec.use_cuda_graphs(buckets)
    except RuntimeError as exc:
        rec.use_cuda_graphs(None)
        log.error(
            "model %s: CUDA graphs not used: the capture failed or its step differs from the eager "
            "step (%s); serving with the plain torch step",
            name,
            exc,
        )
        return False
    log.info("model %s: CUDA graphs captured for batch buckets %s in %.2f s", name, buckets, seconds)
    return True


def untrained_default(entry: str, settings: Settings) -> bool:
    """Whether `entry` is one of the default list's checkpoints that does not exist (not trained yet):
    skipped, not refused, by the preflight, `load_models` and `expected_ids`. One whose path cannot be
    looked at (`looked_at`) is not skipped: its load names why."""
    return settings.uses_default_checkpoints() and not looked_at(parse_entry(entry)[1], Path.exists, True)


def looked_at(path: Path, check: Callable[[Path], bool], otherwise: bool) -> bool:
    """`check(path)` (Path.exists, Path.is_dir), or `otherwise` where the path cannot be looked at: pathlib
    (Python 3.11) raises for a stat error but "no such file" (a folder not ours to read, a name too long),
    which was a traceback where the settings and the default list are read; `resolve_entry`, under the
    load's error handling, then names the error with its entry."""
    try:
        return check(path)
    except OSError:
        return otherwise


def expected_ids(settings: Settings) -> list[str]:
    """The ids of the models `load_models` will try to load, in its order (an entry of the default list
    whose folder does not exist is skipped, as it skips it; an id named twice once)."""
    ids = []
    for entry in settings.checkpoints:
        if untrained_default(entry, settings):
            continue
        if (model_id := model_id_of(entry)) not in ids:
            ids.append(model_id)
    return ids


def parse_entry(entry: str) -> tuple[str | None, Path]:
    """An S4_CHECKPOINTS entry: PATH, or NAME=PATH, an entry with a '=' before any '/' (NAME: MODEL_ID,
    checked by Settings, as is a PATH that is not empty); a path with a '=' in its first part is written
    with a '/' before it (./run=3). A NAME that is not an id was read as part of a path ("no such file or
    folder: bad name!=checkpoints/...")."""
    name, sep, rest = entry.partition("=")
    if sep and "/" not in name:
        return name, Path(rest)
    return None, Path(entry)


def resolve_entry(entry: str, settings: Settings) -> tuple[str, Path]:
    """(model id, checkpoint folder) of an entry. An official state-spaces/s4 file (.ckpt, .pt) is
    converted into S4_CONVERT_CACHE/<its SHA-256>/ first, or found there from an earlier start.
    Raises CheckpointError for a path that does not exist, ConvertError (a ValueError) naming what is
    refused (an S4_CONVERT_CACHE that cannot hold the conversion too: that entry is not served, the
    others are)."""
    name, path = parse_entry(entry)
    if not path.exists():  # before anything is looked for inside it ("PATH/config.json: missing" misled)
        raise CheckpointError(
            f"no such file or folder: {path} (an entry is a checkpoint folder, with {CONFIG} and {WEIGHTS}, "
            f"or an official {' or '.join(sorted(OFFICIAL_SUFFIXES))} file; relative paths are from the "
            "current directory)"
        )
    if path.is_file() and path.suffix in OFFICIAL_SUFFIXES:
        model_id = name or default_name(path)
        if problem := convert_cache_problem(settings.convert_cache):
            raise ConvertError(problem)
        try:
            return model_id, convert_cached(path, settings.convert_cache, name=model_id)
        except MissingConfigError as exc:  # the converter's advice (--config) is no option of the server
            raise ConvertError(
                f"{exc.reason}; put the run's config.yaml (its .hydra/config.yaml) beside the file as "
                f"config.yaml or {path.stem}.yaml, or convert it first (python -m model.convert {path} OUT "
                "--config CONFIG.yaml) and serve OUT"
            ) from None
    if path.is_dir() and not (path / CONFIG).exists() and (found := official_files(path)):
        raise CheckpointError(
            f"{path}: no {CONFIG}: not a checkpoint folder, but it holds official checkpoints: name the file "
            f"({', '.join(str(f) for f in found[:3])}{', …' if len(found) > 3 else ''}), which the server "
            "converts"
        )
    return name or path.name, path


def official_files(folder: Path) -> list[Path]:
    """The Lightning checkpoints (.ckpt) of an official run folder (FOLDER/checkpoints/**, else FOLDER/*),
    last.ckpt first. (Not a .pt: a folder of one is as likely a torch.save pickle, which is refused.)"""
    found = sorted(p for p in (folder / "checkpoints").rglob("*.ckpt") if p.is_file())
    found = found or sorted(p for p in folder.glob("*.ckpt") if p.is_file())
    return sorted(found, key=lambda p: p.name != "last.ckpt")


def convert_cache_problem(folder: str) -> str | None:
    """Why S4_CONVERT_CACHE = `folder` cannot hold an official checkpoint's conversion (a file is there, or
    the folder cannot be made), naming the setting; None when it can (the folder made)."""
    cache, where = Path(folder).expanduser(), f"S4_CONVERT_CACHE (--convert-cache) = {folder}"
    if cache.exists() and not cache.is_dir():
        return f"{where}: not a folder (a file is there); point it at a folder for the converted checkpoints"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{where}: cannot make the folder ({exc.strerror or exc})"
    return None


def model_id_of(entry: str) -> str:
    """The model id an entry serves under (NAME=, else as resolve_entry names it), without converting: a
    folder's name, even one ending in an official file's suffix (it was named by its stem, which is not the
    id it serves under)."""
    name, path = parse_entry(entry)
    official = path.suffix in OFFICIAL_SUFFIXES and not looked_at(path, Path.is_dir, False)
    return name or (default_name(path) if official else path.name)


def served_vocab(
    path: Path, config: ModelConfig, source: Path | None = None, meta: dict | None = None
) -> Vocab | None:
    """The vocabulary a text model is served through (its folder's vocab.txt), or None: its ids are
    UTF-8 bytes (or it is an audio model). `source`: the official file it was converted from (named in
    the errors). Raises CheckpointError for a vocabulary that is wrong or of another size, for a text
    model without one whose ids cannot be bytes (fewer than 256), and for an audio model whose vocab_size
    is not its codec's 256 codes (its prompts' codes and its silence, 128, would be fed to it as ids
    outside a smaller vocabulary, which crashed its engine thread; ids past 255 have no sample). A model
    converted from an official dataset that numbers tokens by a vocabulary (WikiText, PTB, …) without it is
    served as bytes, with the conversion's warning (`model.convert.token_warning`: the dataset's name alone
    does not prove its ids are not bytes). `meta`: the folder's config.json (`read_config`), when the
    caller read it already."""
    where = f"{source} (converted into {path})" if source else str(path)
    if config.modality != "text":
        codec = config.codec
        if config.vocab_size != codec.vocab_size:
            raise CheckpointError(
                f"{where}: an audio model's vocab_size must be its codec's {codec.vocab_size} "
                f"({codec.name}), this one has {config.vocab_size}: its ids are the codec's codes (a "
                f"prompt's samples, the silence {codec.silence} a generation without one starts from, the "
                "samples it generates)"
            )
        return None
    meta = read_config(path) if meta is None else meta
    try:
        vocab = load_vocab(path, meta)
    except VocabError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    if vocab is not None:
        if len(vocab) != config.vocab_size:
            raise CheckpointError(f"{where}: vocab.txt has {len(vocab)} words, the model {config.vocab_size}")
        return vocab
    if config.vocab_size < 256:  # text prompts arrive as UTF-8 bytes (ids 0-255): each must be a token
        dataset = (meta.get("source") or {}).get("dataset")
        if dataset in VOCAB_DATASETS and dataset not in VOCAB_BUILDS:  # (lm1b)
            raise CheckpointError(
                f"{where}: a text model must have vocab_size >= 256 (byte tokens), this one has "
                f"{config.vocab_size}: its ids are the official {dataset!r} vocabulary's, which the server "
                f"does not read (only the vocabularies of {', '.join(sorted(VOCAB_BUILDS))}); use it "
                "through the library (model.load) by its token ids"
            )
        fix = (
            f"put its vocabulary's symbols file beside {source.name} as vocab.txt (python -m model.vocab "
            f"DATA_DIR {source} {source.parent / 'vocab.txt'})" if source is not None
            else "convert it with its vocabulary (python -m model.convert SRC OUT --vocab DATA_DIR_OR_FILE)"
        )  # fmt: skip
        others = [] if source is None else sorted(
            p.name for p in source.parent.iterdir() if p.suffix in OFFICIAL_SUFFIXES and p != source
        )  # fmt: skip
        if others:  # a vocab.txt there is every official file's of that folder
            named = f"{len(others)} other{'' if len(others) == 1 else 's'}: " + ", ".join(others[:3])
            fix += (
                f"; that vocab.txt would be read for every official file of {source.parent} ({named}"
                f"{', …' if len(others) > 3 else ''}), so give {source.name} a folder of its own first"
            )
        raise CheckpointError(
            f"{where}: a text model must have vocab_size >= 256 (byte tokens), this one has "
            f"{config.vocab_size} (a model of a vocabulary, words or enwik8's or text8's symbols, needs it: "
            f"{fix})"
        )
    return None


def step_path(rec) -> str:
    """How a recurrent model's decode step runs, for its log line: the whole network in C with native
    decode blocks (CPU; an adaptive input and softmax included), CUDA graphs, or torch ops (around the C
    SSM steps on CPU)."""
    net_step = getattr(rec, "_net_step", None)
    if net_step is not None:
        if getattr(net_step, "adaptive", None) is not None:
            return "in C, the whole network and its adaptive softmax (native decode blocks)"
        return "in C, the whole network (native decode blocks)"
    if getattr(rec, "_graphs", None) is not None:
        return "by CUDA graphs"
    return "by torch ops" + (" around the C SSM steps" if getattr(rec, "_fused", None) is not None else "")


@dataclass
class Built:
    """A configured entry resolved and its network built, what `load_model` goes on from: python -m
    server's preflight builds each entry once (`build_entry`) and `load_models` takes it from there (each
    was built twice, ~50-100 ms apiece for the shipped checkpoints, more for a large one)."""

    model_id: str
    folder: Path
    source: Path | None  # the official file converted into `folder`, or None
    # config.json, read once: the network's config, the weights' checksum, the vocabulary's entry and the
    # fingerprint are all that read's (a save that replaced the checkpoint meanwhile cannot mix two)
    meta: dict
    net: torch.nn.Module
    vocab: Vocab | None
    # s4_model_load_seconds' first phases: "official" (an official file converted into S4_CONVERT_CACHE
    # or found there; a folder's path checked), "read" (config.json, the weights, the network built)
    seconds: dict[str, float]
    # Unix time the weights file read was written (ServedModel.created): taken as it is read, not at the
    # end of the load, when the folder may have been moved away or saved over
    created: int = 0


def build_entry(entry: str, settings: Settings) -> Built:
    """An S4_CHECKPOINTS entry resolved (`resolve_entry`: an official file converted) and built. Raises
    what `resolve_entry` and `build_folder` raise."""
    t0 = time.perf_counter()
    model_id, folder = resolve_entry(entry, settings)
    path = parse_entry(entry)[1]
    source = path if folder != path else None
    official = time.perf_counter() - t0
    built = build_folder(folder, model_id, source)
    built.seconds["official"] = official
    return built


def build_folder(folder: Path, model_id: str, source: Path | None = None) -> Built:
    """A checkpoint folder's config.json read, its network built (float32, CPU) and its vocabulary read
    (`served_vocab`). Raises CheckpointError naming what is wrong."""
    t0 = time.perf_counter()
    meta = read_config(folder)
    created = int(checkpoint_file(folder, WEIGHTS).stat().st_mtime)
    net = load(folder, meta=meta)
    if not meta.get("weights_sha256"):  # (`save` writes it; a folder made otherwise may lack it) the
        # fingerprint must still name the weights: two such folders of one config took each other's exports
        meta = {**meta, "weights_sha256": _sha256(checkpoint_file(folder, WEIGHTS))}
    vocab = served_vocab(folder, net.config, source, meta)
    seconds = {"official": 0.0, "read": time.perf_counter() - t0}
    return Built(model_id, folder, source, meta, net, vocab, seconds, created)


def load_model(
    path: Path,
    settings: Settings,
    sessions: SessionTable,
    metrics: Metrics,
    device: str,
    model_id: str | None = None,
    source: Path | None = None,
    stop: threading.Event | None = None,
    cache: FormCache | None = None,
    built: Built | None = None,
    loaded: dict[str, ServedModel] | None = None,
) -> ServedModel:
    """Checkpoint → verified recurrent form → warmed-up engine (not yet started). `source`: the official
    file `path` was converted from (named in the errors); `cache`: the layers' verified forms are read from
    it and written to it (`model.form_cache`); `built`: the checkpoint already built (`build_entry`), else
    it is built here. Raises CheckpointError or VerificationError with the reason, ValueError for an audio
    model at whose sample rate S4_MAX_AUDIO_S is under one sample (found before it is converted),
    LoadingStopped when `stop` is set between two steps (load, convert and verify, CUDA graphs, warm-up).
    `loaded`: the models loaded before on the device, whose prefix caches may still take memory
    (`cache_reserve`, counted in `state_pool_problem` as the pool is about to be allocated).
    Sets s4_model_load_seconds: its phases (`Built.seconds`, then "convert" and "warm_up": the rest)
    add up to "total"."""
    name = model_id or path.name
    built = built or build_folder(path, name, source)
    t0 = time.perf_counter()
    meta, net, vocab, source = built.meta, built.net, built.vocab, built.source
    built.net = None  # (this load's from now on: the network is not kept twice)
    chat = ChatTemplate.from_config(meta)
    if chat is not None and (i := replacement_stop(vocab, chat.stop)) is not None:  # (a request's: a 422)
        raise ChatTemplateError(
            f"chat_stop.{i} holds U+FFFD, which this byte model's text writes for generated bytes that are "
            "not UTF-8; stop sequences are matched on the generated bytes, so it would never end a reply: "
            "leave U+FFFD out"
        )
    generation = GenerationConfig.from_config(meta)
    _check_stop(stop)
    if net.config.modality == "audio" and settings.audio_samples(net.config.sample_rate) < 1:
        rate = net.config.sample_rate
        raise ValueError(
            f"S4_MAX_AUDIO_S={settings.max_audio_s:g} s is under one sample at model {name}'s {rate} Hz "
            f"(0 samples): its prompts and generations could hold none; set S4_MAX_AUDIO_S to at least "
            f"1/{rate} s"
        )
    src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if vocab is None and source is None and isinstance(src.get("warning"), str):  # (an official file
        # served directly: model.convert logged its warning)
        log.warning("model %s (%s): %s", name, path, src["warning"])
    wanted = settings.dtype_for(name)
    dtype = getattr(torch, wanted)
    triton_step = use_triton_step(settings, device, name)
    t_convert = time.perf_counter()
    rec = to_recurrent(net, cache, device=device, tol=settings.verify_tolerance, dtype=dtype,
                       triton_step=triton_step)  # fmt: skip
    t_convert = time.perf_counter() - t_convert
    _check_stop(stop)
    if dtype != torch.float32 and device == "cpu":
        ops = str(rec.compute_dtype).removeprefix("torch.")
        log.warning(
            "%s serves %s weights on CPU (%s): %s; %s computes in %s (docs/"
            "reliability.md: Conversion coverage and reduced precision)",
            name,
            wanted,
            settings.dtype_source(name),
            "the C step reads them as they are and computes in float32"
            if rec.decode_block_ready(1)
            else f"no C step was built (no C compiler, or a layer over its limits): the torch ops in {ops} "
            "serve every step",
            "its prefill (every prompt: SaShiMi has no C prefill)"
            if net.config.arch == "sashimi"
            else "a long prompt's parallel prefill",
            f"{ops} (this CPU multiplies {wanted} natively)"
            if ops == wanted
            else "float32 on widened weights (this CPU has no native 16-bit matmul)",
        )
    if hasattr(rec, "prefill_threads"):  # RecurrentModel: its parallel prefill's torch threads
        rec.prefill_threads = settings.prefill_threads
    compile_step(rec, settings, name)
    state16 = use_state_dtype(rec, settings, name)
    use_cuda_graphs(rec, settings, name)
    _check_stop(stop)
    warm_up(rec, min(8, settings.max_batch_size))
    _check_stop(stop)
    model_id = model_id or path.name
    if problem := state_pool_problem(rec, settings, model_id, cache_reserve(loaded or {})):
        raise ValueError(problem)
    mm = metrics.for_model(model_id, audio=rec.config.modality == "audio")
    engine = Engine(model_id, rec, settings, sessions, mm, None if vocab is None else vocab.token_bytes)
    mm.pool_bytes.set(engine.pool.capacity * engine.pool.bytes_per_slot)
    v = rec.verification
    for check, err in (("step", v["step_rel_err"]), ("prefill", v["prefill_rel_err"])):
        metrics.verification_error.labels(model_id, v["dtype"], check).set(err)
    for r in rec.report:  # each layer's form was checked in float32, whatever dtype then serves it
        metrics.verification_error.labels(model_id, KERNEL_CHECK_DTYPE, f"kernel_layer_{r['layer']}").set(
            r["rel_err"]
        )
    if state16:  # S4_STATE_DTYPE=float16 applied: its check against the float32 step
        sc = rec.state_dtype_check
        gauge = metrics.verification_error.labels(model_id, v["dtype"], f"state_{sc['dtype']}")
        gauge.set(sc["logits_rel_err"])
    forms = ", ".join(f"{r['form']} {r['rel_err']:.1e}" for r in rec.report)
    cached = sum(r["cached"] for r in rec.report)
    metrics.recurrent_form_layers.labels(model_id, "cache").set(cached)
    metrics.recurrent_form_layers.labels(model_id, "converted").set(len(rec.report) - cached)
    t_model = time.perf_counter() - t0  # (from the network built to the engine ready)
    phases = {**built.seconds, "convert": t_convert, "warm_up": t_model - t_convert}
    total = sum(phases.values())
    for phase, seconds in (*phases.items(), ("total", total)):
        metrics.load_seconds.labels(model_id, phase).set(seconds)
    converted = "recurrent-form cache off"
    if cache is not None:
        converted = f"{cached} of {len(rec.report)} layers from the recurrent-form cache"
    c = net.config
    if c.arch == "sashimi":  # SaShiMi: its levels' widths and blocks per level
        shape = (f"SaShiMi {c.kernel}, pool {list(c.pool)}, unet {str(c.unet).lower()}, "
                 f"widths {'/'.join(map(str, net.widths))}, "
                 f"{c.n_layers} {'(S4, FF) pairs' if c.ff else 'S4 blocks'} per level")  # fmt: skip
    else:
        shape = f"{c.kernel}, {c.n_layers} layer{'s' if c.n_layers != 1 else ''}, d_model {c.d_model}"
    prefix = engine.prefix_cache  # (None: off, or a budget under one state row)
    kept = "off" if prefix is None else f"{prefix.capacity} rows"
    if prefix is not None and prefix.interval:
        kept += f", a row kept every {prefix.interval} tokens"
    log.info(
        "model %s: %s %s, d_state %d; converted in %.1f s (%s), verified (%s; %s logits: step %.1e, prefill "
        "%.1e, tol %.1e); steps %s; %d B state/session, %d slots, prefix cache %s; ready in %.1f s",
        model_id, c.modality + (f" at {c.sample_rate} Hz" if c.modality == "audio" else ""), shape, c.d_state,
        t_convert, converted, forms, v["dtype"], v["step_rel_err"],
        v["prefill_rel_err"], v["tol"], step_path(rec), rec.state_bytes_per_sequence, settings.max_sessions,
        kept, total,
    )  # fmt: skip
    # (a vocabulary's checksum: config.json's, which `load_vocab` checked against vocab.txt's bytes)
    vocab_sha256 = meta["vocab"]["sha256"] if vocab is not None else None
    fingerprint = model_fingerprint(meta["config"], meta.get("weights_sha256"), vocab_sha256)
    served = ServedModel(
        model_id, path, net.config, rec, engine, fingerprint, chat, built.created, generation, vocab,
        model_fingerprint(meta["config"], meta.get("weights_sha256")) if vocab is not None else None,
    )  # fmt: skip
    limit, setting = settings.new_tokens_limit(served.sample_rate)
    if (n := generation.get("max_new_tokens")) is not None and n > limit:
        log.warning(
            "%s: generation_config max_new_tokens %d is above this server's limit (%d, %s): a request that "
            "names no length generates %d",
            model_id, n, limit, setting, limit,
        )  # fmt: skip
    return served


def load_models(
    settings: Settings,
    sessions: SessionTable,
    metrics: Metrics,
    stop: threading.Event | None = None,
    on_loaded: Callable[[ServedModel], None] | None = None,
    on_failed: Callable[[str, str, str], None] | None = None,
    built: dict[str, Built | Exception] | None = None,
) -> tuple[dict[str, ServedModel], dict[str, str]]:
    """Every configured checkpoint that loads and verifies → {id: model}; the others → {id: why}. When
    `stop` is set (the server is stopping), loading ends at the next step's boundary and what is loaded
    so far is returned. `on_loaded(model)` is called as each model is loaded (before the next one is
    begun: the server serves it from then on), `on_failed(key, model id, why)` as each entry fails.
    `built`: entry → what python -m server's preflight made of it (`build_entry`: the built checkpoint, or
    the exception it raised), taken from the dict as it is used; an entry not in it is built here."""
    device = settings.resolved_device()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    # process-wide: an engine thread returning from a native block waits for the GIL at most this long
    sys.setswitchinterval(settings.gil_switch_ms / 1e3)
    models: dict[str, ServedModel] = {}
    failed: dict[str, str] = {}
    if device == "cpu":  # built (or loaded) here, so that no model's load time counts its compilation
        fused.library()
    folder = settings.recurrent_cache.strip()
    cache = FormCache(folder) if folder else None
    log.info("recurrent-form cache: %s", cache.folder if cache else "off (S4_RECURRENT_CACHE is empty)")
    for entry in settings.checkpoints:
        if stop is not None and stop.is_set():
            log.info("stopping: checkpoint %s and those after it not loaded", entry)
            break
        if untrained_default(entry, settings):
            log.warning("default checkpoint %s does not exist yet: skipped", parse_entry(entry)[1])
            continue
        model_id = model_id_of(entry)
        if model_id in models:
            failed[entry] = f"model id {model_id!r} is already served (from {models[model_id].path})"
            log.error("checkpoint %s not served: %s", entry, failed[entry])
            if on_failed is not None:
                on_failed(entry, model_id, failed[entry])
            continue
        try:
            made = (built or {}).pop(entry, None)
            if isinstance(made, Exception):  # (the preflight logged it; not built again)
                raise made
            made = made or build_entry(entry, settings)
            model_id = made.model_id
            models[model_id] = load_model(made.folder, settings, sessions, metrics, device, model_id,
                                          made.source, stop, cache, made, models)  # fmt: skip
        except LoadingStopped:
            log.info("stopping: checkpoint %s and those after it not loaded", entry)
            break
        except Exception as exc:  # whatever it is, this model is not served and the others are
            failed[model_id] = f"{type(exc).__name__}: {exc}"
            expected = isinstance(
                exc, (CheckpointError, VerificationError, ValueError, OSError, RuntimeError)
            )
            log.error("checkpoint %s not served: %s", entry, failed[model_id], exc_info=not expected)
            if on_failed is not None:
                on_failed(model_id, model_id, failed[model_id])
            continue
        if on_loaded is not None:
            on_loaded(models[model_id])
    if cache is not None:
        by, line = form_cache_summary(cache.folder)
        log.info("recurrent-form cache %s: %s", cache.folder, line)
        for status in STATUSES:
            metrics.recurrent_cache_bytes.labels(status).set(by.get(status, (0, 0))[1])
    untrained = {model_id_of(e) for e in settings.checkpoints if untrained_default(e, settings)}
    for model_id in settings.model_dtype_overrides():
        if model_id in untrained:  # (counts as its checkpoint does: not until it is trained)
            continue
        if model_id not in models and model_id not in failed:
            alike = [k for k in (*models, *failed) if k.casefold() == model_id.casefold()]
            failed[model_id] = f"S4_MODEL_DTYPES names {model_id!r}, which no S4_CHECKPOINTS entry serves"
            if alike:  # (its model was served in S4_DTYPE's dtype instead)
                failed[model_id] += f" (ids are case-sensitive: the entry's model is {alike[0]})"
            log.error("%s", failed[model_id])
    return models, failed
