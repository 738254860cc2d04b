"""Conv-mode training CLI.

    python -m model.train configs/text-shakespeare.toml [section.key=value ...]
    torchrun --nproc_per_node 2 -m model.train CONFIG ...        # data parallel (gloo / NCCL)
    python -m model.train CONFIG --time-budget 600                # as many steps as fit in ~600 s

A config has three tables: [model] (ModelConfig fields), [data] (prepared dataset folder, sequence
length, global batch size: DataConfig) and [train] (see TrainConfig); it is a TOML file, or the
config.json of an earlier run (the same tables, as run). Every value is checked before anything is
trained or written: a wrong one is one line on stderr naming `section.key` and the value, exit status 2.
Ctrl-C prints one line (the step reached, the step saved) and exits with 130. Runs are
deterministic: the batch and the dropout seed of step t depend only on (seed, t), so a resumed run
takes exactly the steps an uninterrupted run would. Everything the run writes lives in [train].out:
    config.json    the config as run (rewritten when a resume changes it)
    log.jsonl      one JSON line per logged step / evaluation (a resume drops the lines past the step it
                   resumes from, which it logs again), and one per resume that changed the
                   config: {"step", "resumed": true, "changed": {"section.key": [old, new]}}, and
                   one for a --time-budget re-plan: {"step", "replanned": {"steps": [old, new]},
                   "step_s", "time_budget_s", "exact"} (exact: made inside the warmup, so the
                   schedule is the one a run planned for the new steps from the start would take)
    last/          the newest resumable state (weights, AdamW moments, step, training tokens so far, each
                   step's at its own batch; safetensors + JSON), the
                   training split's SHA-256 (a resume on other bytes is refused), and train.init's
                   record (its model config, where its weights came from): a resume reads no
                   train.init folder
    metrics.json   final validation and test metrics
and, when [train].export is set, the trained model is saved there as a servable checkpoint.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.codecs import audio_codec
from model.data import Dataset, DatasetError, meta_codec
from model.kernel import training_arithmetic


class ConfigError(ValueError):
    """A wrong training config or command line (the user's to fix, not a bug): one line naming
    `section.key`, the value and what is allowed. The CLI prints it and exits with status 2."""


class TrainingInterrupted(Exception):
    """Ctrl-C (KeyboardInterrupt) during `train`: `step` steps were done, `saved` of them are in
    `out`/last, from which the same command resumes. The CLI prints one line and exits with 130."""

    def __init__(self, step: int, saved: int, out: Path):
        super().__init__(f"interrupted after step {step}")
        self.done, self.saved, self.out = step, saved, out


class Diverged(Exception):
    """The loss or the gradient norm of step `step` is not finite (the step is not taken), or its update
    left a weight that is not (`weights`: a weight decay of 1e300); nothing is saved after it (out/last
    keeps `saved`, the last good state). The CLI prints one line and exits 1."""

    def __init__(self, step: int, saved: int, out: Path, loss: float, gnorm: float, weights: bool = False):
        super().__init__(f"step {step}: loss {loss}, gradient norm {gnorm}" + ", weights inf/NaN" * weights)
        self.step, self.saved, self.out, self.loss, self.gnorm = step, saved, out, loss, gnorm
        self.weights = weights


def finite_weights(net: nn.Module) -> bool:
    """Whether every parameter of `net` is finite: one fused max-abs per parameter (NaN and ±inf survive
    it, a large finite value does not overflow), and one read back."""
    params = [p.detach() for p in net.parameters()]
    if not params:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, math.inf))).all())


def _is_int(v) -> bool:
    return type(v) is int  # not bool; not 3.0 (a float where a count is meant is a typo)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


@dataclass
class DataConfig:
    """[data]: the prepared dataset and how it is cut into batches. Checked when built: a bad value
    raises ConfigError naming `data.<field>` and the value."""

    path: str = "data/shakespeare"  # a folder written by `python -m model.data`
    seq_len: int = 1024  # ≥ 1 tokens. text: window length; audio: the clip length is used
    batch_size: int = 16  # ≥ 1 sequences: the global batch (split across processes)
    eval_stride: int = 0  # text evaluation: window hop ≤ seq_len (0: seq_len // 2, ≥ 1); new tokens count

    def __post_init__(self):
        _require(isinstance(self.path, str) and self.path != "", "data.path", self.path, "a folder path")
        _require(_is_int(self.seq_len) and self.seq_len >= 1, "data.seq_len", self.seq_len, "an integer ≥ 1")
        _require(
            _is_int(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH,
            "data.batch_size",
            self.batch_size,
            f"an integer in [1, {MAX_BATCH:,}] (sequences per step, all processes together)",
        )
        _require(
            _is_int(self.eval_stride) and 0 <= self.eval_stride <= self.seq_len,
            "data.eval_stride",
            self.eval_stride,
            f"an integer in [0, data.seq_len = {self.seq_len}] (0: seq_len // 2, at least 1)",
        )


# bounds beyond any run, checked with the rest (each crashed late before: a seed of 10^14 overflowed the
# dropout seed's 64 bits at the first step, 100,000 threads was a SIGSEGV, a batch of 10^20 a traceback and
# 10^8 an unbounded allocation: a helper's audit)
MAX_SEED, MAX_THREADS, MAX_BATCH = 2**32 - 1, 1024, 65_536
# train.steps and --time-budget: far past any run (10^12 steps is 11 days at a microsecond a step; 10^8 s is
# 3 years). 10^309 steps was an OverflowError traceback at the first progress line (its ETA, a float), and
# --time-budget 1e308 one at the first re-plan (the steps that fit: infinite): a helper's audit
MAX_STEPS, MAX_TIME_BUDGET = 10**12, 1e8
# the most a peak learning rate may be: far past any AdamW run (1e-4 … 1e-2); 1e38 was a RuntimeError
# traceback at the first step (AdamW's step, lr / (1 − β1^t), past float32's range), as was 1e33 with
# β1 = 0.99999 (a helper's audit). At most 10, the step stays far inside it for every β1 < 1.
MAX_LR = 10.0


@dataclass
class TrainConfig:
    """[train]: optimizer, schedule, logging and output. Checked when built: a bad value (range or
    type) raises ConfigError naming `train.<field>` and the value. Counts are in optimizer steps."""

    steps: int = 1000  # in [1, 10^12]: optimizer steps of the whole run
    lr: float = 2e-3  # in (0, 10]: peak learning rate of every parameter but the SSM's
    ssm_lr: float = 1e-3  # in [0, 10]: peak learning rate of the SSM parameters (Δ, Λ, P, B); 0 freezes them
    weight_decay: float = 0.05  # ≥ 0: AdamW weight decay of the matrices (never the SSM's)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW (β1, β2), each in [0, 1)
    warmup: int = 100  # ≥ 0: steps of linear warmup (past `steps`: the peak lr is not reached)
    min_lr_ratio: float = 0.05  # in [0, 1]: cosine decays to lr · min_lr_ratio
    grad_clip: float = 1.0  # ≥ 0: clip the global gradient norm to it (0: no clipping)
    eval_every: int = 250  # ≥ 0: validate every this many steps and at the end (0: never during the run)
    eval_tokens: int = 65536  # ≥ 0: validation tokens per periodic evaluation (0: all; the final: all)
    ckpt_every: int = 250  # ≥ 0: save out/last every this many steps (0: only at the end or --stop-at)
    log_every: int = 10  # ≥ 1: a log.jsonl line (and non-terminal progress line) every this many steps
    seed: int = 0  # ≥ 0: initial weights, batches and dropout
    threads: int = 0  # ≥ 0: torch intra-op threads per process (0: leave torch's default)
    out: str = "runs/default"  # the run folder
    export: str = ""  # where to save the final servable checkpoint ("" = don't)
    init: str = ""  # a checkpoint folder (model.save, model.convert) to start from ("" = fresh weights)
    final_eval: bool = True  # score the whole validation and test splits at the end

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        k = "train."
        _require(_is_int(self.steps) and self.steps >= 1, k + "steps", self.steps, "an integer ≥ 1")
        _require(self.steps <= MAX_STEPS, k + "steps", self.steps, f"at most 10^12 = {MAX_STEPS:,}")
        _require(_is_number(self.lr) and 0 < self.lr <= MAX_LR, k + "lr", self.lr,
                 f"a finite number > 0, at most {MAX_LR:g}")  # fmt: skip
        _require(
            _is_number(self.ssm_lr) and 0 <= self.ssm_lr <= MAX_LR,
            k + "ssm_lr",
            self.ssm_lr,
            f"a finite number ≥ 0, at most {MAX_LR:g} (0 freezes the SSM parameters)",
        )
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0,
            k + "weight_decay",
            self.weight_decay,
            "a finite number ≥ 0",
        )
        b = self.betas
        ok = isinstance(b, tuple) and len(b) == 2 and all(_is_number(x) and 0 <= x < 1 for x in b)
        _require(ok, k + "betas", list(b) if isinstance(b, tuple) else b, "two numbers in [0, 1)")
        self.betas = (float(b[0]), float(b[1]))  # (TOML's `[0, 0]` are ints: AdamW refused them, a traceback)
        _require(  # (more than train.steps is allowed: a quick run of a config; the peak is then not reached)
            _is_int(self.warmup) and self.warmup >= 0, k + "warmup", self.warmup, "an integer ≥ 0 (steps)"
        )
        _require(
            _is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1,
            k + "min_lr_ratio",
            self.min_lr_ratio,
            "a number in [0, 1]",
        )
        _require(
            _is_number(self.grad_clip) and self.grad_clip >= 0,
            k + "grad_clip",
            self.grad_clip,
            "a finite number > 0, or 0 for no clipping",
        )
        zero_means = {"eval_every": "never during the run", "eval_tokens": "all", "ckpt_every": "at the end",
                      "threads": "torch's default"}  # fmt: skip
        for name, allowed in zero_means.items():
            v = getattr(self, name)
            _require(_is_int(v) and v >= 0, k + name, v, f"an integer ≥ 1, or 0 ({allowed})")
        _require(self.threads <= MAX_THREADS, k + "threads", self.threads, f"at most {MAX_THREADS}")
        _require(
            _is_int(self.log_every) and self.log_every >= 1, k + "log_every", self.log_every, "an integer ≥ 1"
        )
        _require(_is_int(self.seed) and 0 <= self.seed <= MAX_SEED, k + "seed", self.seed,
                 f"an integer in [0, 2^32 − 1 = {MAX_SEED}]")  # fmt: skip
        _require(isinstance(self.out, str) and self.out != "", k + "out", self.out, "a folder path")
        _require(isinstance(self.export, str), k + "export", self.export, 'a folder path, or "" (no export)')
        _require(
            isinstance(self.init, str), k + "init", self.init, 'a checkpoint folder, or "" (fresh weights)'
        )
        _require(isinstance(self.final_eval, bool), k + "final_eval", self.final_eval, "true or false")


def parse_value(text: str):
    """A TOML value (number, bool, string, array); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """The config with `section.key=value` overrides applied: a TOML file (configs/), or the
    config.json a run writes (runs/NAME/config.json: the same tables, as run). Raises ConfigError
    for an unreadable file, a bad override or an unknown table."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config {str(path)!r}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    try:
        cfg = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config {str(path)!r}: not valid {kind} ({exc})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {str(path)!r}: expected tables [model], [data], [train]")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        table = cfg.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a table")
        table[name] = parse_value(value)
    unknown = set(cfg) - {"model", "data", "train"}
    if unknown:
        hint = " (a checkpoint's config.json is not a training config: use its run's)" * ("format" in cfg)
        raise ConfigError(f"unknown config tables: {sorted(unknown)}{hint}")
    for section, table in cfg.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config {section!r} must be a table of key = value, got {table!r}")
    return cfg


def _dataclass(cls, d: dict):
    known = {f.name for f in fields(cls)}
    if unknown := set(d) - known:
        section = {"TrainConfig": "train", "DataConfig": "data"}.get(cls.__name__, cls.__name__)
        raise ConfigError(
            f"{section}: unknown config fields: {sorted(unknown)} (help({cls.__name__}) lists them)"
        )
    return cls(**d)


def run_configs(cfg: dict) -> tuple[DataConfig, TrainConfig]:
    """A run config's [data] and [train] tables as model.train runs them: checked, every key left out at
    its default. ConfigError for a bad value or a table that is not one."""
    tables = {k: cfg.get(k, {}) for k in ("data", "train")}
    for k, t in tables.items():
        if not isinstance(t, dict):
            raise ConfigError(f"config {k!r} must be a table of key = value, got {t!r}")
    return _dataclass(DataConfig, tables["data"]), _dataclass(TrainConfig, tables["train"])


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to min_lr_ratio at `steps`."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_s4(model_cfg: dict) -> nn.Module:
    """The network of a [model] table (ModelConfig fields); raises ConfigError naming `model.<field>`."""
    from model.arch import build
    from model.network import ModelConfig

    try:
        cfg = ModelConfig.from_dict(model_cfg)
    except ValueError as exc:  # ModelConfig's messages begin with the field's name
        msg = str(exc)
        named = msg.split(" ", 1)[0] in {f.name for f in fields(ModelConfig)}
        raise ConfigError(("model." if named else "model: ") + msg) from None
    return build(cfg)  # SequenceModel or SaShiMi, by [model].arch


# ---------------------------------------------------------------------------------------------
# Distributed helpers (a single process is world size 1)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_sum(x: float, device) -> float:
    """x summed over the processes (x itself without torch.distributed): a collective every process calls."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def all_mean(x: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    return all_sum(x, device) / dist.get_world_size()


def share_refusal(refusal: str, main_proc: bool, device) -> None:
    """ConfigError on every process when the main process refused the run (`refusal`: its message; "" for
    none; the others pass ""): one collective, which every process reaches. A check the main process alone
    makes (the folders it writes) raised there before the next collective, and the other processes died
    in it with a gloo traceback ("Connection reset by peer"), or waited."""
    if round(all_sum(1.0 if main_proc and refusal else 0.0, device)):
        raise ConfigError(refusal or "the main process refused the run (its message says why)")


def on_main(check: Callable[[], None], main_proc: bool, device, said: Callable[[str], str] = str) -> None:
    """Run `check` on the main process alone, and raise its ConfigError on every process
    (`share_refusal`); `said` words the refusal from the main process's message."""
    refusal = ""
    if main_proc:
        try:
            check()
        except ConfigError as exc:
            refusal = said(str(exc))
    share_refusal(refusal, main_proc, device)


# ---------------------------------------------------------------------------------------------
# Batches, loss, evaluation


def step_batch(data: Dataset, split: np.ndarray, cfg: DataConfig, seed: int, step: int, rank: int,
               world: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """This process's share of the global batch of `step` (identical on every process count)."""
    rng = np.random.default_rng([seed, step])
    idx = data.sample_index(split, cfg.batch_size, cfg.seq_len, rng)
    return data.batch(split, idx[rank::world], cfg.seq_len)


def loss_fn(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = net(x)  # (B, L, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def cpu_model() -> str:
    """This machine's CPU as a model card states it ("AMD EPYC, 2 cores"; the architecture where
    /proc/cpuinfo names none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


@torch.no_grad()  # (scores only: a graph per batch cost time and memory, and torch warned at each score)
def evaluate(net: nn.Module, data: Dataset, split: np.ndarray, seq_len: int, batch_size: int,
             stride: int = 0, max_tokens: int = 0, device="cpu") -> dict:  # fmt: skip
    """Mean next-token NLL (nats and bits) over a split.

    Text: windows of seq_len hopping by `stride`; each scores only the tokens the previous window
    did not, so every token after the first window has at least seq_len − stride of context.
    Audio: every clip, whole. `max_tokens` > 0 evaluates a prefix (cheap periodic validation). The SSM
    kernels are computed as training computes them (model/kernel.py `training_arithmetic`: float32, not the
    no-grad default float64)."""
    with training_arithmetic():
        return _evaluate(net, data, split, seq_len, batch_size, stride, max_tokens, device)


def eval_hop(seq_len: int, stride: int = 0) -> int:
    """How far a text evaluation's windows of `seq_len` tokens hop: `stride` (data.eval_stride), or 0 for
    seq_len // 2, at least 1 (seq_len 1: a hop of 0 was a ValueError, late)."""
    return stride or max(1, seq_len // 2)


def _evaluate(net, data, split, seq_len, batch_size, stride, max_tokens, device) -> dict:
    was_training = net.training
    net.eval()
    total, count = 0.0, 0
    if data.kind == "audio":
        n = len(split) if not max_tokens else max(1, min(len(split), max_tokens // split.shape[1]))
        jobs = [(np.arange(i, min(i + batch_size, n)), 0) for i in range(0, n, batch_size)]
    else:
        stride = eval_hop(seq_len, stride)
        T = len(split) if not max_tokens else min(len(split), max_tokens + 1)
        starts = list(range(0, T - seq_len - 1 + 1, stride)) or [0]
        if starts[-1] + seq_len + 1 < T:
            starts.append(T - seq_len - 1)  # the tail
        scored_from, prev_end = [], 0
        for s in starts:
            scored_from.append(max(0, prev_end - s))
            prev_end = s + seq_len
        jobs = [(np.array(starts[i : i + batch_size]), scored_from[i : i + batch_size])
                for i in range(0, len(starts), batch_size)]  # fmt: skip
    for idx, skip in jobs:
        x, y = data.batch(split, idx, seq_len)
        logits = net(x.to(device)).float()
        nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # (B, L)
        if data.kind == "audio":
            total += float(nll.sum())
            count += nll.numel()
        else:
            for row, k in zip(nll, skip):
                total += float(row[k:].sum())
                count += row.numel() - k
    net.train(was_training)
    nats = total / max(count, 1)
    return {"nll_nats": nats, "bits_per_token": nats / math.log(2), "tokens": count}


# ---------------------------------------------------------------------------------------------
# Resumable state: safetensors for tensors, JSON for the rest (nothing is pickled)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk (a power loss then leaves it whole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """`obj` as JSON in `path`, atomically: written beside it, synced, moved over it (a run's config.json
    written in place and cut short, by a crash or a full disk, failed every later resume)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, path)


def save_state(out: Path, net: nn.Module, opt: torch.optim.Optimizer, step: int, meta: dict) -> None:
    """Write the weights, AdamW moments and `step` to `out`/last, never leaving it missing or half
    written: written to last.tmp, then last → last.old, last.tmp → last, last.old removed. A crash or
    Ctrl-C between the renames leaves last.old, which `recover_last` puts back."""
    tmp = out / "last.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()},
              str(tmp / "model.safetensors"))  # fmt: skip
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, **meta}
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    for f in (*tmp.iterdir(), tmp):  # on the disk before the renames make it `last`
        _fsync(f)
    final, old = out / "last", out / "last.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync(out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """A Ctrl-C during the block takes effect at its end (KeyboardInterrupt raised then), so a checkpoint
    save and the step count that says what it holds are not cut apart. Main thread only (elsewhere, and
    when SIGINT is ignored, the block runs as is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: got.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler: raises KeyboardInterrupt here


def recover_last(out: Path) -> None:
    """Put back `out`/last.old when a save was stopped between its renames (last is then missing)."""
    final, old = out / "last", out / "last.old"
    if not final.exists() and (old / "state.json").is_file():
        old.rename(final)


def read_last_state(out: Path):
    """A run's last/state.json, parsed: read once per resume, and the split's checksum, train.init's record
    and the step, the optimizer's scalars and groups all come from that one read (it was read three
    times). ConfigError naming the folder when it cannot be read or is not JSON."""
    try:
        return json.loads((out / "last" / "state.json").read_text())
    except (OSError, ValueError) as exc:  # (a JSONDecodeError and a UnicodeDecodeError are ValueErrors)
        raise ConfigError(
            f"{out / 'last'} cannot be read ({type(exc).__name__}: {exc}): restore it, or start over with "
            "--fresh"
        ) from None


def load_state(out: Path, net: nn.Module, opt: torch.optim.Optimizer, device, state) -> tuple[int, float]:
    """Restore `out/last` into net and opt, `state` its state.json (`read_last_state`); returns (step to
    continue from, wall seconds so far). The optimizer's moments and step counts are last/'s; its
    hyperparameters (each group's peak lr, weight decay, betas) stay those `opt` was built with, this run's
    config: a resume that changes train.lr, ssm_lr, weight_decay or betas applies them (the saved groups'
    values were restored over them, while the log and the export said the new ones: a helper's audit)."""
    hyper = [{k: g[k] for k in ("base_lr", "weight_decay", "betas")} for g in opt.param_groups]
    d = out / "last"
    step, elapsed = (state.get("step"), state.get("elapsed_s", 0.0)) if isinstance(state, dict) else (None, 0)
    for name, value, ok in (("step", step, _is_int(step) and step >= 0),
                            ("elapsed_s", elapsed, _is_number(elapsed) and elapsed >= 0)):  # fmt: skip
        if not ok:  # (-3, null, 1e400 were tracebacks; 1.5 resumed at step 1: a helper's audit)
            raise ConfigError(
                f"{d / 'state.json'}: {name} must be {'an integer' if name == 'step' else 'a finite number'} "
                f"≥ 0, got {value!r}: restore it, or start over with --fresh"
            )
    net.load_state_dict({k: v.to(device) for k, v in load_file(str(d / "model.safetensors")).items()})
    per_param: dict[int, dict] = {}
    for key, v in load_file(str(d / "optimizer.safetensors")).items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v.to(device) if name != "step" else v
    for key, v in state["scalars"].items():
        pid, name = key.split(".", 1)
        per_param.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    for g, h in zip(opt.param_groups, hyper, strict=True):
        g.update(h)
    return step, float(elapsed)


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One status line: step, loss, tokens/s, the last validation, ETA. Redrawn on a terminal,
    printed every `every` steps otherwise (logs); each periodic validation also gets a line."""

    def __init__(self, total: int, start: int, every: int, enabled: bool):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.val: float | None = None  # bits per token of the last periodic validation

    def validated(self, step: int, ev: dict) -> None:
        """A periodic validation after `step` (0-based): its own line, and the status line's `val`."""
        self.val = ev["bits_per_token"]
        if not self.enabled:
            return
        n = ev["tokens"]
        line = f"step {step + 1}/{self.total} validation: {self.val:.4f} bits/token over {n:,} tokens"
        _say(("\r\033[K" if self.tty else "") + line + "\n")

    def update(self, step: int, loss: float, tok_s: float) -> None:
        if not self.enabled:
            return
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step - 1)
        bar = "#" * int(20 * (step + 1) / self.total)
        val = "" if self.val is None else f" val {self.val:.4f} bits"
        line = (f"[{bar:<20}] {step + 1}/{self.total} loss {loss:.4f}{val} {tok_s:,.0f} tok/s "
                f"elapsed {_hms(elapsed)} eta {_hms(eta)}")  # fmt: skip
        if self.tty:
            _say("\r" + line)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            _say(line + "\n")

    def close(self) -> None:
        if self.enabled and self.tty:
            _say("\n")


def _say(text: str) -> None:
    """Write `text` to stderr in one write, flushed. `print` writes a line and its newline in two, and a
    Ctrl-C landing between them put the "interrupted after step N" line on the end of the status line
    (a fresh-clone CI run: `… eta 0:09:03interrupted after step 20; …`)."""
    sys.stderr.write(text)
    sys.stderr.flush()


def describe_split(data: Dataset, split: np.ndarray) -> str:
    """The training split in its own units: text tokens (bytes), or audio clips and their samples."""
    if data.kind == "audio":
        clips, n = split.shape
        rate = data.meta["sample_rate"]
        hours = clips * n / rate / 3600
        return f"{clips:,} train clips of {n:,} samples ({clips * n:,} tokens, {hours:.2f} h)"
    return f"{len(split):,} train tokens"


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------


def config_changes(before: dict, after: dict) -> dict[str, list]:
    """{"section.key": [old, new]} for every value of two run configs that differs (None where absent)."""
    out = {}
    for sec in sorted(set(before) | set(after)):
        a, b = before.get(sec) or {}, after.get(sec) or {}
        if not isinstance(a, dict) or not isinstance(b, dict):
            if a != b:
                out[sec] = [a, b]
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out[f"{sec}.{key}"] = [a.get(key), b.get(key)]
    return out


def _init_from(folder: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """`train.init`: a checkpoint folder's model config, weights (checked as `model.load` checks them:
    format, checksum, config) and provenance (`init_provenance`); ConfigError naming train.init otherwise."""
    from model.checkpoint import CheckpointError, load, read_config
    from model.convert import VOCAB_DATASETS

    try:
        net = load(folder)
        meta = read_config(folder)
    except (CheckpointError, OSError) as exc:
        raise ConfigError(f"train.init {folder!r}: {exc}") from None
    if isinstance(meta.get("vocab"), dict):  # (model.data writes UTF-8 bytes and mu-law codes only)
        raise ConfigError(
            f"train.init {folder!r}: a model of a vocabulary (its vocab.txt: {meta['vocab'].get('kind')}); "
            "training data here is bytes or audio"
        )
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    if source.get("warning") and source.get("dataset") in VOCAB_DATASETS:  # converted without its --vocab
        raise ConfigError(
            f"train.init {folder!r}: converted from an official model trained on {source['dataset']!r}, "
            "whose token ids are the official code's vocabulary (by frequency), not UTF-8 bytes (its "
            "conversion's warning); training data here is bytes or audio, so the run would read its ids as "
            "other tokens"
        )
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return net.config.to_dict(), state, init_provenance(folder, meta)


# config.json's serving settings, kept from `train.init` into a fine-tune's export (the server checks them)
SERVING_KEYS = ("chat_template", "chat_stop", "generation_config")


def _text(v) -> str | None:
    return v if isinstance(v, str) else None


def init_provenance(folder: str, meta: dict) -> dict:
    """Where a `train.init` checkpoint's weights came from, from its config.json `meta`: {"path",
    "weights_sha256"} and, when it has one, "source" (an official import's from, file, sha256, dataset)
    or "training" (its run's data, steps, test bits/token and the run's own "init", so a fine-tune of a
    fine-tune keeps the chain), and "serving": its SERVING_KEYS, which the export keeps. Only values of the
    expected kinds are kept (the file is the user's)."""
    rec = {"path": folder, "weights_sha256": _text(meta.get("weights_sha256"))}
    serving = {k: meta[k] for k in SERVING_KEYS if k in meta}
    if serving:
        rec["serving"] = serving
    src = meta.get("source")
    if isinstance(src, dict):
        rec["source"] = {k: _text(src.get(k)) for k in ("from", "file", "sha256", "dataset")}
    tr = meta.get("training")
    if isinstance(tr, dict):
        cfg = tr.get("config") if isinstance(tr.get("config"), dict) else {}
        metrics = tr.get("metrics") if isinstance(tr.get("metrics"), dict) else {}
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        test = metrics.get("test") if isinstance(metrics.get("test"), dict) else {}
        summary = {"data": data.get("path"), "steps": metrics.get("steps"),
                   "test_bits_per_token": test.get("bits_per_token"), "init": tr.get("init")}  # fmt: skip
        rec["training"] = _checked_training(summary, 0)
    return rec


def _checked_training(t: dict, depth: int) -> dict:
    init, steps, bits = t.get("init"), t.get("steps"), t.get("test_bits_per_token")
    return {
        "data": _text(t.get("data")),
        "steps": steps if _is_int(steps) else None,
        "test_bits_per_token": bits if _is_number(bits) else None,
        "init": checked_init_record(init, depth + 1) if isinstance(init, dict) and depth < 8 else None,
    }


def checked_init_record(rec: dict, depth: int = 0) -> dict | None:
    """A provenance record as `init_provenance` writes it, read back from a file: the same keys, each of
    its kind (None otherwise); None for one without a path."""
    if not isinstance(rec.get("path"), str):
        return None
    out = {"path": rec["path"], "weights_sha256": _text(rec.get("weights_sha256"))}
    if isinstance(rec.get("source"), dict):
        out["source"] = {k: _text(rec["source"].get(k)) for k in ("from", "file", "sha256", "dataset")}
    if isinstance(rec.get("training"), dict):
        out["training"] = _checked_training(rec["training"], depth)
    if isinstance(rec.get("serving"), dict):
        out["serving"] = {k: v for k, v in rec["serving"].items() if k in SERVING_KEYS}
    return out


def _saved(run: Path | dict, key: str):
    """The entry `key` of a run's last/state.json (`run`: the run's folder, or its state.json already
    read); None where it has none, or is not well formed."""
    if isinstance(run, dict):
        return run.get(key)
    try:
        return json.loads((Path(run) / "last" / "state.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def saved_train_sha256(run: Path | dict) -> str | None:
    """The SHA-256 of the training split a run's last/state.json records (`run`: as `_saved` takes it;
    None: a run saved before it was recorded, or a state.json not well formed)."""
    sha = _saved(run, "train_sha256")
    return sha if isinstance(sha, str) else None


def saved_init(run: Path | dict) -> dict | None:
    """The `train.init` record a run's last/state.json keeps (path, provenance, the checkpoint's model
    config), so a resume needs no train.init folder (`run`: as `_saved` takes it); None when it has none
    or it is not well formed."""
    rec = _saved(run, "init")
    if not isinstance(rec, dict) or not isinstance(rec.get("model"), dict):
        return None
    checked = checked_init_record(rec, 0)
    return None if checked is None else {**checked, "model": rec["model"]}


# what a checkpoint's tokens mean: a [model] key may not change them under train.init (its weights were
# trained on them; the refusal of another code than the data's was passed by relabelling the model)
KEPT_FORMAT = ("modality", "sample_rate", "quantization", "mulaw")


def check_kept_format(init: str, init_cfg: dict, overrides: dict) -> None:
    """ConfigError naming train.init when a [model] key (`overrides`) changes what the checkpoint's tokens
    mean (KEPT_FORMAT: modality, sample rate, audio quantization, mu-law convention) from its config
    (`init_cfg`, a field absent there at ModelConfig's default)."""
    from model.network import ModelConfig  # noqa: PLC0415

    defaults = {f.name: f.default for f in fields(ModelConfig)}
    for key in KEPT_FORMAT:
        if key in overrides and overrides[key] != init_cfg.get(key, defaults[key]):
            raise ConfigError(
                f"train.init {init!r}: [model] {key} = {overrides[key]!r} would relabel the checkpoint's "
                f"{key} ({init_cfg.get(key, defaults[key])!r}), which its weights were trained on: leave it "
                "out (prepare the data in the checkpoint's format instead: python -m model.data audio "
                "--sample-rate, --quantization, --mulaw)"
            )


def check_splits(
    data, dcfg, tcfg, train_split: np.ndarray, val_split: np.ndarray, test_split: np.ndarray
) -> None:
    """ConfigError, before anything is trained or written, when a split is too small for what the run does
    with it: the training split (text: seq_len + 2 tokens, one window start at least; audio: a clip), the
    validation split when the run validates (train.eval_every, train.final_eval) and the test split when it
    scores it at the end (train.final_eval): 2 tokens (one prediction) or 1 clip. They failed with
    tracebacks at the first validation, or after the whole run (a helper's audit)."""
    if data.kind != "audio" and len(train_split) < dcfg.seq_len + 2:
        raise ConfigError(
            f"data.seq_len must be ≤ the training split's {len(train_split):,} tokens − 2, got {dcfg.seq_len}"
        )
    unit, least = ("clips", 1) if data.kind == "audio" else ("tokens", 2)
    uses = [("train", train_split, "it trains on it")] if data.kind == "audio" else []  # (text: above)
    if tcfg.eval_every or tcfg.final_eval:
        uses.append(("val", val_split, "train.eval_every or train.final_eval validates on it"))
    if tcfg.final_eval:
        uses.append(("test", test_split, "train.final_eval scores it"))
    for name, split, why in uses:
        if len(split) < least:
            raise ConfigError(
                f"data.path {dcfg.path!r}: its {name} split has {len(split)} {unit}, fewer than the {least} "
                f"{why} needs (prepare more data; validation and the final scores can be turned off: "
                "train.eval_every=0, train.final_eval=false)"
            )


def check_model_fits_data(model_cfg, data, where: str, splits: list | None = None) -> None:
    """ConfigError, before anything is trained or written, unless the model (`model_cfg`: its ModelConfig,
    or a dict) can be trained on `data`: its modality is the data's, an audio model's sample rate the data's,
    and its vocabulary holds every token id of the data's splits. `where` names the setting at fault
    (`model.modality`, or `train.init '…'` for a checkpoint's own config). `splits`: the data's token
    arrays, where the caller has read them (default: its train, val and test splits, each read once)."""
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda k, d=None: getattr(model_cfg, k, d)
    kind, have = ("audio" if data.kind == "audio" else "text"), get("modality", "text")
    if have != kind:
        article = "an" if have[:1] in "aeiou" else "a"
        raise ConfigError(
            f"{where or 'model.modality'}: {article} {have} model; the data ({data.path}) is {kind}"
        )
    if kind == "audio" and get("sample_rate") != data.meta["sample_rate"]:
        raise ConfigError(f"{where or 'model.sample_rate'}: a {get('sample_rate')} Hz model; the data "
                          f"({data.path}) is {data.meta['sample_rate']} Hz")  # fmt: skip
    if kind == "audio":  # the same code for the same sound: an official SaShiMi's ids are not ours
        try:
            codec = audio_codec(get("quantization", "mu-law"), get("mulaw", "s4serve"))
        except ValueError:
            codec = None  # (a bad value: the model's own check names it)
        ours = meta_codec(data.meta)
        if codec is not None and codec != ours:
            quant = get("quantization", "mu-law")
            flags = f"--quantization {quant}" + (
                f" --mulaw {get('mulaw', 's4serve')}" if quant == "mu-law" else ""
            )
            raise ConfigError(
                f"{where or 'model.quantization'}: the model's audio tokens are {codec.name}; the data "
                f"({data.path}) is {ours.name} (prepare it in the model's: python -m model.data audio "
                f"{flags} --sample-rate {get('sample_rate')})"
            )
    V = get("vocab_size")
    arrays = splits if splits is not None else [data.split(name) for name in ("train", "val", "test")]
    top = max((int(a.max()) for a in arrays if a.size), default=-1)
    if isinstance(V, int) and top >= V:
        raise ConfigError(f"{where or 'model.vocab_size'}: {V} token ids (0 … {V - 1}); the data "
                          f"({data.path}) holds ids up to {top}")  # fmt: skip


def trim_log(path: Path, start: int) -> None:
    """A resume at step `start`: drop log.jsonl's step and validation lines past it (the interrupted run
    logged them after its last saved state; the resumed run logs those steps again, the same values), so the
    log reads as one run's. Resume and re-plan lines are kept; a line that is not JSON is kept as it is.
    Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        past = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > start
        if not past or "resumed" in rec or "replanned" in rec:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")  # (log.jsonl.tmp: one of RUN_ENTRIES, as write_json's are)
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def check_writable(flag: str, folder: Path) -> None:
    """ConfigError naming `flag` unless `folder` can be made and written to: the nearest part of it that
    exists is a folder this process may write (an export to /proc/x failed with a traceback after the
    whole run, a train.out under a file at its first write: a helper's audit)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{flag} {str(folder)!r}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(folder)!r}: {probe} is not writable by this process")


RUN_ENTRIES = frozenset({"config.json", "config.json.tmp", "log.jsonl", "log.jsonl.tmp", "metrics.json",
                         "metrics.json.tmp", "last", "last.tmp", "last.old", "run_id"})  # fmt: skip


def run_id(out: Path) -> str | None:
    """The run's id (`out`/run_id: written by its first fresh start, kept by later ones, recorded in its
    exports' `training.run_id`); None for a folder no run has started in since ids were written."""
    try:
        return (out / "run_id").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def export_stamp(export: Path) -> tuple[int, int] | None:
    """`export`/config.json's (mtime in ns, size), None when missing: whether the folder was written since."""
    try:
        st = (export / "config.json").stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def check_out_folder(out: Path) -> None:
    """ConfigError unless `train.out` may be emptied for a fresh start: missing, empty, or a training run's
    folder (RUN_ENTRIES, and exports this run wrote there). A fresh start deleted whatever folder it
    named: a dataset's, a shipped checkpoint's, a folder of notes (a helper's audit)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"train.out {str(out)!r} is a file, not a folder")
    foreign = []
    for entry in sorted(out.iterdir()):
        if entry.name in RUN_ENTRIES:
            continue
        try:
            check_export_folder(entry, out)  # a folder this run exported to is the run's own
            own = entry.is_dir() and (entry / "config.json").is_file()
        except ConfigError:
            own = False
        if not own:
            foreign.append(entry.name)
    cfg = out / "config.json"
    try:
        run_cfg = json.loads(cfg.read_text()) if cfg.is_file() else {}
        checkpoint = not isinstance(run_cfg, dict) or "format" in run_cfg or "kind" in run_cfg
    except (OSError, ValueError):
        checkpoint = False  # (a run's config.json cut short: still the run's)
    if foreign or checkpoint:
        what = (
            f"holds {', '.join(foreign[:5])}{', …' if len(foreign) > 5 else ''}"
            if foreign
            else ("is a checkpoint folder (its config.json is a model's)")
        )
        raise ConfigError(
            f"train.out {str(out)!r} {what}: not a training run's folder, which a fresh start empties; name "
            "a new or empty folder (train.out=runs/NAME), or move those files away"
        )


def check_export_place(export: Path, out: Path) -> None:
    """ConfigError naming train.export when the export would be written over the run's own files: train.out
    itself (its config.json is the run's config, which a resume and model.card read: the export replaced it
    with the checkpoint's, and the resume failed with "unknown config tables") or a folder of its saves
    (last, last.tmp, last.old: each save replaces them)."""
    e, o = export.resolve(), out.resolve()
    saves = [n for n in ("last", "last.tmp", "last.old") if e.is_relative_to(o / n)]
    if e == o or saves:
        where = (f"train.out itself ({str(out)!r}): the checkpoint's config.json would replace the run's, "
                 "which a resume and model.card read" if e == o else
                 f"inside train.out's {saves[0]}/ ({str(out)!r}), which each save replaces")  # fmt: skip
        raise ConfigError(
            f"train.export {str(export)!r} is {where}; export beside the run's files "
            "(train.export=RUN/export) or elsewhere"
        )


def check_export_folder(export: Path, out: Path) -> None:
    """ConfigError, before anything is trained or written, when `train.export` already holds a checkpoint
    that another run wrote, or none did (a shipped, converted or copied model: config.json without this
    run's `training.config.train.out`): the export would replace it. A folder this run (`train.out`)
    exported before, or one without a config.json, is written over. "This run" is the run folder's
    (`run_id`): the shipped checkpoints record their configs' own train.out (runs/text-shakespeare), so
    the train.out alone took a fresh clone's `configs/text-shakespeare.toml
    train.export=checkpoints/text-shakespeare` for the run that wrote the shipped model, and it was
    replaced at the end (a new user's trial). An export without an id is this run's only where the run
    folder has no id either and has run before (its config.json: a run from before ids)."""
    if not (export / "config.json").is_file():
        return
    try:
        training = json.loads((export / "config.json").read_text())["training"]
        prior = training["config"]["train"]["out"]
    except (OSError, ValueError, KeyError, TypeError):
        training, prior = {}, None
    mine, theirs = run_id(out), training.get("run_id") if isinstance(training, dict) else None
    same_out = isinstance(prior, str) and Path(prior).resolve() == out.resolve()
    if same_out and theirs == mine and (mine is not None or (out / "config.json").is_file()):
        return
    who = (f"the export of another run (train.out {prior!r}"
           f"{', not the run in that folder now' if same_out else ''})" if isinstance(prior, str)
           else "a checkpoint no training run wrote (shipped, converted or copied)")  # fmt: skip
    raise ConfigError(
        f"train.export {str(export)!r} holds {who}: this run (train.out {str(out)!r}) would replace it; "
        "export elsewhere (train.export=runs/NAME/export) or remove that folder first"
    )


def _load_init(net: nn.Module, state: dict[str, torch.Tensor], folder: str) -> None:
    """Put `train.init`'s weights into the network built from its config and the [model] overrides: every
    tensor, each of the same shape, else ConfigError naming what differs."""
    where = f"train.init {folder!r}"
    own = net.state_dict()
    missing, extra = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or extra or shapes:
        if missing or extra:
            what = f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}"
        else:
            k = shapes[0]
            what = f"{k}: {list(state[k].shape)} in the checkpoint, {list(own[k].shape)} here"
        raise ConfigError(
            f"{where}: its weights do not fit the model its config and [model] describe ({what}); a "
            "[model] key that changes a shape cannot override the checkpoint's"
        )
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def replan_steps(done: int, step_s: float, left_s: float, eval_every: int = 0, eval_s: float = 0.0) -> int:
    """The run's new `train.steps` for a time budget: the steps taken plus as many more as fit in
    `left_s` seconds at `step_s` seconds a step (checkpoints included) and `eval_s` seconds a validation
    (every `eval_every` steps and one at the plan's last step, counted for the steps planned: a plan made
    late in the budget would otherwise miss the validations left in it), less a `BUDGET_MARGIN` share for
    drift; at least `done` (no more steps when none fit)."""
    if not (step_s > 0 and math.isfinite(step_s)):
        raise ValueError(f"step_s must be a finite number > 0, got {step_s}")
    room = max(0.0, left_s) * (1 - BUDGET_MARGIN)

    def cost(n: int) -> float:
        if n == 0:
            return 0.0
        evals = (done + n) // eval_every - done // eval_every if eval_every else 0
        if eval_every and (done + n) % eval_every:  # the plan's last step validates too
            evals += 1
        return n * step_s + evals * eval_s

    hi = int(min(room / step_s, MAX_STEPS - done))  # (no plan past train.steps' bound: a resumable config)
    lo = 0  # the most that fit: cost(lo) <= room (cost grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= room else (lo, mid - 1)
    return done + lo


BUDGET_WARM, BUDGET_TIMED = 3, 10  # --time-budget: steps not timed (allocator, FFT plans), then timed
BUDGET_MARGIN = 0.04  # share of the remaining time left unplanned (drift)
BUDGET_REPLAN_AT = (0.25, 0.5, 0.75, 0.9)  # shares of the budget after which the plan is made again


RUN_HELD, RUN_IN_USE, RUN_UNOPENED = 0, 1, 2  # `RunLock.acquire`'s outcome on the main process
LOCK_TRIES = 100  # `RunLock._hold`: opens of train.out whose folder was removed before its lock was taken


class RunLock:
    """The exclusive hold of one run on its `train.out`: an flock on the folder itself, taken before the
    first write (recovering last/, emptying the folder) and held to the end of the run, export included.
    Two runs into one folder overwrote each other: the second's fresh start emptied the first's folder
    under it, its log went to a deleted file, config.json said the second's config while last/ and the
    export held the first's weights, and the second died with a SafetensorError traceback when the first
    removed its last.tmp (a helper's audit). The kernel drops the lock when the process ends, a SIGKILL
    too, so no stale lock is ever left behind."""

    def __init__(self):
        self.fd, self.made = None, []  # made: the folders acquire made, train.out first

    def acquire(self, out: Path, main_proc: bool, device) -> None:
        """Hold `out` (making it if missing) on the main process; ConfigError on every process when another
        run holds it or it cannot be opened (all processes agree: one collective, which every process
        reaches, so none waits there for a main process that raised). A filesystem that has no flock (an
        NFS mount without its lock daemon: ENOLCK; some FUSE and CIFS mounts: EOPNOTSUPP) is a warning on
        stderr, and the run goes on unguarded, as every run did before the lock."""
        code, why = RUN_HELD, ""
        if main_proc:
            code, why = self._hold(out)
        code = round(all_sum(code if main_proc else 0.0, device))  # (the main process's: the others add 0)
        if code == RUN_UNOPENED:
            raise ConfigError(f"train.out {str(out)!r}: cannot open it ({why or 'on the main process'})")
        if code == RUN_IN_USE:
            raise ConfigError(
                f"train.out {str(out)!r} is in use: another training run is writing into it (two runs in one "
                "folder overwrite each other's saves, log and config); wait for it to end, or name another "
                "folder (train.out=runs/NAME)"
            )

    def _hold(self, out: Path) -> tuple[int, str]:
        """`acquire` on the main process: its outcome (RUN_*) and, for RUN_UNOPENED, why. The lock is on the
        folder's inode, not its name: a folder removed between this run's open and its flock (by a run that
        made it and was refused: `release`) is locked in vain, so the lock is taken again on the folder now
        at `out` until the two are one. A run refused here leaves the folders it saw missing: another run
        made them too, and holds them."""
        for _ in range(LOCK_TRIES):
            missing = out
            while not missing.exists() and missing != missing.parent:
                if missing not in self.made:  # (made again on a later try: once)
                    self.made.append(missing)
                missing = missing.parent
            try:
                out.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as exc:
                return RUN_UNOPENED, exc.strerror or str(exc)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd, self.made = None, []  # (held by another run, which made them as well)
                return RUN_IN_USE, ""
            except OSError as exc:  # no locks on this filesystem (ENOLCK, EOPNOTSUPP, ...)
                os.close(self.fd)
                self.fd = None
                print(f"warning: train.out {str(out)!r}: its filesystem cannot lock it "
                      f"({exc.strerror or exc}): a second run into it at once is not refused; run one "
                      "at a time there", file=sys.stderr, flush=True)  # fmt: skip
                return RUN_HELD, ""
            try:
                if os.path.samestat(os.fstat(self.fd), os.stat(out)):
                    return RUN_HELD, ""
            except FileNotFoundError:
                pass
            os.close(self.fd)  # (a folder removed under this run's open: out is made, or opened, again)
            self.fd = None
        return RUN_UNOPENED, f"it was removed and made again {LOCK_TRIES} times while this run took it"

    def release(self) -> None:
        """Let go of the folder; the folders `acquire` made and a refused config left empty are removed, while
        the lock is still held (removed after it, one another run had just taken was removed under it)."""
        for folder in self.made:
            try:
                folder.rmdir()  # (only when empty: a run's files stay)
            except OSError:
                break
        self.made = []
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def start_afresh(out: Path, init: str, cfg: dict) -> None:
    """A fresh start's writes, on the main process (it holds the lock): train.out emptied, the run's
    config.json written. ConfigError, before anything is written, for a folder that is not a run's
    (`check_out_folder`) or that holds the run's train.init, and for one that cannot be written."""
    check_out_folder(out)
    if init and Path(init).resolve().is_relative_to(out.resolve()):
        raise ConfigError(  # (it emptied the folder, the checkpoint it was fine-tuning from with it)
            f"train.init {init!r} is inside train.out {str(out)!r}, which a fresh start empties: the "
            "checkpoint would be deleted; copy it out first (cp -r), or name another train.out"
        )
    try:
        kept = run_id(out)  # (a run started over keeps its id: its exports stay its own)
        empty_folder(out)  # (not removed and made again: the lock is held on it)
        (out / "run_id").write_text((kept or uuid.uuid4().hex) + "\n")
        write_json(out / "config.json", cfg)
    except OSError as exc:
        raise ConfigError(f"train.out {str(out)!r}: cannot write it ({exc.strerror or exc})") from None


def empty_folder(folder: Path) -> None:
    """Remove everything inside `folder`, keeping the folder itself (and so the RunLock held on it)."""
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def train(cfg: dict, build_model: Callable[[dict], nn.Module] = build_s4, fresh: bool = False,
          dump_grads: str | None = None, stop_at: int = 0, time_budget: float = 0.0) -> dict:  # fmt: skip
    """Run (or resume) the training described by `cfg`; returns the final metrics.

    `dump_grads`: compute the first step's (all-reduced) gradient, write it as safetensors and
    stop — a debugging aid that also lets the tests compare data-parallel and single-process runs.
    `stop_at` > 0: stop after that step as if interrupted (resume later by running again).
    `time_budget` > 0: seconds of training steps this call may take (the final evaluation and export
    come after it). After BUDGET_WARM + BUDGET_TIMED steps the run re-plans `train.steps` to what fits
    (`replan_steps`, from the mean time of the timed steps so far; all processes agree on it), and
    again once each share of the budget in BUDGET_REPLAN_AT has passed (a first estimate was 12 % fast
    on an H200 beside other work and the run met its deadline short of its plan); each writes the plan
    into `cfg` and the run's config.json (resume with that file) and logs {"replanned": …} in log.jsonl.
    A re-plan inside the warmup leaves the schedule exactly that of a run planned for the new steps
    from the start (the warmup does not depend on `steps`); later, the cosine is stretched from there.
    If the deadline still comes first, the run stops there as `stop_at` would (resumable).
    Raises ConfigError for a wrong config (before anything is written or trained) and
    TrainingInterrupted on Ctrl-C. Two runs into one train.out at once: the second is refused (RunLock)."""
    lock = RunLock()
    try:
        return _train(cfg, build_model, fresh, dump_grads, stop_at, time_budget, lock)
    finally:
        lock.release()


def _train(cfg: dict, build_model: Callable[[dict], nn.Module], fresh: bool, dump_grads: str | None,
           stop_at: int, time_budget: float, lock: RunLock) -> dict:  # fmt: skip
    """`train`'s body, `lock` taken before the run's first write to train.out."""
    dcfg, tcfg = run_configs(cfg)
    rank, world, device = setup_distributed()
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if dcfg.batch_size % world:
        raise ConfigError(
            f"data.batch_size must be divisible by the {world} processes, got {dcfg.batch_size}"
        )
    out = Path(tcfg.out)
    main_proc = rank == 0
    if tcfg.export:
        check_export_place(Path(tcfg.export), out)
        check_export_folder(Path(tcfg.export), out)
    export_seen = export_stamp(Path(tcfg.export)) if tcfg.export else None  # (as checked just now)
    folders = (("train.out", out), ("train.export", tcfg.export and Path(tcfg.export)),
               ("--dump-grads", dump_grads and Path(dump_grads).parent))  # fmt: skip

    def writable() -> None:
        for flag, folder in folders:
            if folder:
                check_writable(flag, folder)

    on_main(writable, main_proc, device)
    try:
        data = Dataset(dcfg.path)
        train_split, val_split, test_split = (data.split(name) for name in ("train", "val", "test"))
    except (FileNotFoundError, DatasetError) as exc:
        raise ConfigError(f"data.path {dcfg.path!r}: {exc}") from None
    check_splits(data, dcfg, tcfg, train_split, val_split, test_split)
    model_cfg = dict(cfg.get("model", {}))
    if dump_grads is None:  # (a debugging aid that writes nothing there)
        lock.acquire(out, main_proc, device)
    if main_proc:  # (the lock's holder: every process renamed it at once, and the losers died)
        recover_last(out)
    if world > 1:
        dist.barrier()  # the other processes read last/ once the main one has put it back
    resuming = not fresh and (out / "last" / "state.json").is_file()
    last = read_last_state(out) if resuming else None  # (each use below reads this one parse)
    kept = last if isinstance(last, dict) else {}
    # the training split's bytes: a resume must draw its batches from the split the run trained on
    train_sha256 = hashlib.sha256(np.ascontiguousarray(train_split).data).hexdigest()
    if resuming and (was := saved_train_sha256(kept)) not in (None, train_sha256):
        raise ConfigError(
            f"data.path {dcfg.path!r}: its training split is not the one {out} trained on (SHA-256 "
            f"{was[:12]}… in {out / 'last' / 'state.json'}, {train_sha256[:12]}… now: prepared again or "
            "changed), so the resume would not take the steps the run would have; start over with --fresh, "
            "or fine-tune the run's export on this data (train.init)"
        )
    init_state, init = None, None  # train.init's weights (a fresh start only) and its record
    saved = saved_init(kept) if resuming else None
    same = (
        (Path(saved["path"]).resolve() == Path(tcfg.init).resolve())
        if saved and tcfg.init
        else (not saved and not tcfg.init)
    )
    if resuming and not same:  # (the weights are last/'s either way)
        was = f"train.init {saved['path']!r}" if saved else "fresh weights (no train.init)"
        raise ConfigError(
            f"train.init {tcfg.init!r}: {out} was started from {was}, and a resume goes on from its last/: "
            "its weights descend from that start whatever train.init says now (the export would name the "
            "other checkpoint as its origin); leave train.init as it was, or start over with --fresh"
        )
    if tcfg.init:  # the checkpoint's model; [model] keys override its config (a shape too: refused below)
        if saved is not None:  # a resume: the weights are last/'s
            init = saved
        else:
            init_cfg, init_state, provenance = _init_from(tcfg.init)
            init = {**provenance, "model": init_cfg}
        check_kept_format(tcfg.init, init["model"], model_cfg)
        model_cfg = {**init["model"], **model_cfg}
    if data.kind == "audio":
        dcfg.seq_len = data.clip_len
        model_cfg.setdefault("modality", "audio")
        model_cfg.setdefault("sample_rate", data.meta["sample_rate"])

    torch.manual_seed(tcfg.seed)  # identical initial weights on every process
    try:
        net = build_model(model_cfg).to(device)
    except ConfigError as exc:
        if not init:
            raise
        keys = ", ".join(sorted(cfg.get("model", {}))) or "none"
        raise ConfigError(
            f"train.init {tcfg.init!r}: its model config with the [model] table's keys ({keys}) over it "
            f"is not a model ({exc}); a [model] key that changes a shape cannot override the checkpoint's: "
            "leave the [model] table out (a shipped config's describes its own model), or keep keys such "
            "as dropout"
        ) from None
    # (train.init's own config named when the [model] table does not set the key at fault)
    at_fault = f"train.init {tcfg.init!r}" if init else ""
    splits = [train_split, val_split, test_split]
    check_model_fits_data(getattr(net, "config", model_cfg), data, at_fault, splits)
    if init_state is not None:
        try:
            _load_init(net, init_state, tcfg.init)
        except ConfigError as exc:  # name the [model] keys that differ from the checkpoint's config
            diff = {k: v for k, v in cfg.get("model", {}).items() if init["model"].get(k, v) != v}
            keys = ", ".join(f"{k} = {v!r} (the checkpoint's {init['model'][k]!r})" for k, v in diff.items())
            raise ConfigError(f"{exc}: [model] {keys}" if keys else str(exc)) from None
    # what last/state.json keeps besides the step
    meta = {"config": cfg, "train_sha256": train_sha256, **({"init": init} if init else {})}
    groups = net.param_groups(tcfg.lr, tcfg.weight_decay, tcfg.ssm_lr)
    for g in groups:
        g["base_lr"] = g["lr"]
        # a group at lr 0 (train.ssm_lr = 0) is frozen as the official code freezes a tensor of lr 0 (a
        # buffer: no gradient), not merely left in place by AdamW: its gradients counted in the clipped
        # global norm and the divergence check. It stays in its group: a resume may change ssm_lr either way
        for p in g["params"] if g["lr"] == 0 else ():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(groups, lr=tcfg.lr, betas=tcfg.betas)
    start, wall_before = 0, 0.0
    changed = None  # a resume's config changes (e.g. train.steps re-planned), logged below
    if resuming:
        try:
            start, wall_before = load_state(out, net, opt, device, last)
        except ConfigError:  # (a ValueError: named as it is, not as another model)
            raise
        except (SafetensorError, OSError) as exc:  # (before ValueError: a JSONDecodeError is one too)
            raise ConfigError(
                f"{out / 'last'} cannot be read ({type(exc).__name__}: {exc}): restore it, or start over "
                "with --fresh"
            ) from None
        except (RuntimeError, ValueError, KeyError):  # another model (or optimizer groups) in `last`
            saved_cfg = kept.get("config") or {}
            diff = {k: v for k, v in config_changes(saved_cfg, cfg).items() if k.startswith("model")}
            what = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in diff.items()) or "its tensors differ"
            raise ConfigError(
                f"{out / 'last'} holds another model ({what}): start over with --fresh or another train.out"
            ) from None
        if 0 < stop_at <= start:
            if main_proc:
                print(
                    f"{out} is already at step {start} (--stop-at {stop_at}): nothing done", file=sys.stderr
                )
            return {}
        if start > tcfg.steps:  # e.g. the TOML again after a --time-budget plan trained past its steps
            raise ConfigError(
                f"{out} is at step {start}, past this config's train.steps {tcfg.steps} (a --time-budget "
                f"plan or a larger train.steps trained it further): resume it with `python -m model.train "
                f"{out / 'config.json'}` (its own plan), ask for train.steps={start} or more, or start over "
                "with --fresh; nothing was changed"
            )
        if main_proc and start == tcfg.steps:  # (a --time-budget is then unused: no step is left to plan)
            again = " and the export" if tcfg.export else ""
            unused = f"; --time-budget {time_budget:g} is unused" if time_budget > 0 else ""
            print(f"{out} already finished its train.steps {tcfg.steps}: nothing to train; the final "
                  f"evaluation{again} run again (--fresh starts over, train.steps above {start} continues)"
                  f"{unused}", file=sys.stderr)  # fmt: skip
        elif main_proc:
            print(f"resuming {out} at step {start}", file=sys.stderr)
        if main_proc and dump_grads is None:
            try:
                before = json.loads((out / "config.json").read_text())
            except (OSError, ValueError):  # missing, or cut short by a crash: written again
                before = {}
            changed = config_changes(before, cfg)
            if changed:
                write_json(out / "config.json", cfg)
    elif dump_grads is None:
        on_main(lambda: start_afresh(out, tcfg.init, cfg), main_proc, device)
    model = nn.parallel.DistributedDataParallel(net) if world > 1 else net
    n_params = sum(p.numel() for p in net.parameters())
    if main_proc and start == 0 and dump_grads is None:
        print(f"{n_params:,} parameters, {world} process(es) on {device}, data {data.kind}: "
              f"{describe_split(data, train_split)}", file=sys.stderr)  # fmt: skip

    if main_proc and dump_grads is None and start > 0:
        trim_log(out / "log.jsonl", start)
    log = (out / "log.jsonl").open("a") if main_proc and dump_grads is None else None
    if log is not None and changed:
        log.write(json.dumps({"step": start, "resumed": True, "changed": changed}) + "\n")
    progress = Progress(tcfg.steps, start, tcfg.log_every, main_proc and dump_grads is None)
    tokens_per_step = dcfg.batch_size * dcfg.seq_len
    # training tokens before this process's steps, each step counted at its own batch (a resume may change
    # data.batch_size: the total was steps × the last batch); a save before it was recorded: at this batch
    seen = kept.get("tokens_seen") if resuming else 0
    tokens_before = seen if _is_int(seen) and seen >= 0 else start * tokens_per_step

    def tokens_at(n: int) -> int:
        """Training tokens once `n` steps are done (this process's steps at this batch)."""
        return tokens_before + (n - start) * tokens_per_step

    t_start = time.perf_counter()
    model.train()
    end = min(tcfg.steps, stop_at) if stop_at > 0 else tcfg.steps
    done = saved = start  # steps taken; the step out/last holds
    budgeted = time_budget > 0 and dump_grads is None
    timed_from = 0.0  # perf_counter when the timed steps of --time-budget began
    eval_timed, eval_last = 0.0, 0.0  # validations' seconds since then, the last one's (the main process)
    k_replan = 0  # the next of BUDGET_REPLAN_AT
    replanned = False  # whether --time-budget made a plan
    over_time = False  # whether its deadline stopped the run
    try:
        for step in itertools.count(start):
            if step >= end:
                break
            t0 = time.perf_counter()
            scale = lr_scale(step, tcfg)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            x, y = step_batch(data, train_split, dcfg, tcfg.seed, step, rank, world)
            torch.manual_seed(tcfg.seed * 1_000_003 + step * 1009 + rank)  # dropout of this step
            loss = loss_fn(model, x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if dump_grads is not None:
                if main_proc:
                    # (a frozen parameter, train.ssm_lr = 0, has no gradient)
                    named = [(n, p.grad) for n, p in net.named_parameters() if p.grad is not None]
                    grads = {n: g.detach().cpu().contiguous() for n, g in named}
                    save_file(grads, dump_grads)
                return {"loss": all_mean(loss.item(), device)}
            gnorm = float(nn.utils.clip_grad_norm_(net.parameters(), tcfg.grad_clip or math.inf))  # 0: off
            loss_v = all_mean(loss.item(), device)  # (the same on every process, as gnorm: one decision)
            if not (math.isfinite(loss_v) and math.isfinite(gnorm)):  # diverged: not stepped, not saved
                progress.close()
                raise Diverged(step + 1, saved, out, loss_v, gnorm)
            opt.step()
            if not finite_weights(net):  # the update itself overflowed: not saved, not exported (a weight
                # decay of 1e300 saved inf weights in last/ as "the last good state", or, at the last step,
                # was a ValueError traceback from the export after the final evaluation of NaN)
                progress.close()
                raise Diverged(step + 1, saved, out, loss_v, gnorm, weights=True)
            done = step + 1
            dt = time.perf_counter() - t0
            if budgeted:
                now = time.perf_counter()
                if done == start + BUDGET_WARM:
                    timed_from = now
                # one collective a step: every decision below is taken from the same elapsed time on
                # every process (a process-local one could differ, and a collective one process skips
                # while another calls it hangs both)
                elapsed = all_mean(now - t_start, device)
                passed = sum(elapsed >= f * time_budget for f in BUDGET_REPLAN_AT)  # shares of the budget
                timed = done - start - BUDGET_WARM  # steps timed so far
                if timed == BUDGET_TIMED or (timed > BUDGET_TIMED and passed > k_replan):
                    k_replan = passed  # (a share the first re-plan already passed is not redone)
                    # the mean over every timed step so far, contention and checkpoints included, the
                    # validations (the main process's; the others wait for it) counted apart
                    evals = all_mean(world * eval_timed if main_proc else 0.0, device)
                    one_eval = all_mean(world * eval_last if main_proc else 0.0, device)
                    step_s = all_mean((now - timed_from) / timed, device) - evals / timed
                    step_s = max(step_s, 1e-9)
                    new_steps = replan_steps(done, step_s, time_budget - elapsed, tcfg.eval_every, one_eval)
                    before, tcfg.steps = tcfg.steps, max(new_steps, done)
                    cfg.setdefault("train", {})["steps"] = tcfg.steps
                    end = min(tcfg.steps, stop_at) if stop_at > 0 else tcfg.steps
                    progress.total = tcfg.steps
                    rec = {"step": done, "replanned": {"steps": [before, tcfg.steps]},
                           "step_s": step_s, "time_budget_s": time_budget,
                           "exact": done <= tcfg.warmup}  # fmt: skip
                    replanned = True
                    if main_proc:
                        write_json(out / "config.json", cfg)
                        if log:
                            log.write(json.dumps(rec) + "\n")
                        if tcfg.steps != before:  # (a plan that stays is logged, not printed)
                            where = out / "config.json"
                            print(f"--time-budget {time_budget:g} s: {step_s:.3f} s a step, train.steps "
                                  f"{before} -> {tcfg.steps} (in {where})", file=sys.stderr)  # fmt: skip
                if elapsed >= time_budget and done < end:  # over time: stop here
                    end, over_time = done, True
            progress.update(step, loss_v, tokens_per_step / dt)
            if log and ((step + 1) % tcfg.log_every == 0 or step == 0):  # (a resume's log reads as one run's)
                # elapsed_s: training wall time across resumes
                rec = {"step": step + 1, "loss": loss_v, "lr": tcfg.lr * scale, "grad_norm": gnorm,
                       "tok_s": tokens_per_step / dt,
                       "elapsed_s": wall_before + time.perf_counter() - t_start}  # fmt: skip
                log.write(json.dumps(rec) + "\n")
                log.flush()
            last = step + 1 == tcfg.steps
            if tcfg.eval_every and ((step + 1) % tcfg.eval_every == 0 or last) and main_proc:
                t_eval = time.perf_counter()
                ev = evaluate(net, data, val_split, dcfg.seq_len, dcfg.batch_size, dcfg.eval_stride,
                              tcfg.eval_tokens, device)  # fmt: skip
                eval_last = time.perf_counter() - t_eval
                if timed_from:
                    eval_timed += eval_last
                progress.validated(step, ev)
                if log:
                    log.write(json.dumps({"step": step + 1, "val": ev}) + "\n")
                    log.flush()
            if (tcfg.ckpt_every and (step + 1) % tcfg.ckpt_every == 0) or last:
                if main_proc:
                    elapsed = wall_before + time.perf_counter() - t_start
                    with sigint_deferred():  # (the message then names the step last/ holds)
                        now = {**meta, "elapsed_s": elapsed, "tokens_seen": tokens_at(step + 1)}
                        save_state(out, net, opt, step + 1, now)
                        saved = step + 1
                if world > 1:
                    dist.barrier()
    except KeyboardInterrupt:
        progress.close()
        raise TrainingInterrupted(done, saved, out) from None
    progress.close()
    wall = wall_before + time.perf_counter() - t_start
    metrics = {}
    if end < tcfg.steps:
        if main_proc:
            if not (tcfg.ckpt_every and end % tcfg.ckpt_every == 0):  # else the loop just saved it
                save_state(out, net, opt, end, {**meta, "elapsed_s": wall, "tokens_seen": tokens_at(end)})
            if over_time:  # the same command would start another budget and plan from the TOML's steps
                plan = (f"resume the plan (train.steps {tcfg.steps}) with `python -m model.train "
                        f"{out / 'config.json'}`" if replanned else
                        f"no plan was made (the first comes after {BUDGET_WARM + BUDGET_TIMED} steps): "
                        f"{out / 'config.json'} still says train.steps {tcfg.steps}")  # fmt: skip
                print(f"--time-budget {time_budget:g} s reached at step {end}, before the plan's end: the "
                      f"state is saved in {out / 'last'}, nothing was exported; {plan}",
                      file=sys.stderr)  # fmt: skip
            else:
                print(f"stopped after step {end}; run again to resume", file=sys.stderr)
        return metrics
    if main_proc:
        metrics = {
            "steps": tcfg.steps,
            "num_params": n_params,
            "tokens_seen": tokens_at(tcfg.steps),
            "train_wall_s": wall,
            "processes": world,
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),  # (a card states where it trained: it may be written on another machine)
        }
        if tcfg.final_eval:
            for split, arr in (("val", val_split), ("test", test_split)):  # (read once, at the start)
                metrics[split] = evaluate(net, data, arr, dcfg.seq_len, dcfg.batch_size, dcfg.eval_stride, 0,
                                          device)  # fmt: skip
        write_json(out / "metrics.json", metrics)
    if tcfg.export:  # checked at the start; another run may have exported there while this one trained

        def export_unchanged_or_ours() -> None:
            if export_stamp(Path(tcfg.export)) != export_seen:  # (else as checked at the start)
                check_export_folder(Path(tcfg.export), out)

        again = f"python -m model.train {out / 'config.json'} train.export=DIR"
        late = f" (written while this run trained; its model is in {out}/last: `{again}`)"
        on_main(export_unchanged_or_ours, main_proc, device, lambda exc: exc + late)
    if main_proc:
        if tcfg.export:
            from model.checkpoint import save

            training = {"config": cfg, "metrics": metrics}
            if rid := run_id(out):  # (whose export it is: check_export_folder)
                training["run_id"] = rid
            serving = {}
            if init:  # where the weights came from (train.init may be gone by the time anyone asks)
                training["init"] = {k: v for k, v in init.items() if k not in ("model", "serving")}
                serving = init.get("serving") or {}
            save(net, tcfg.export, extra={"training": training, **serving})
            if serving and main_proc:
                print(f"{tcfg.export}: keeps train.init's {', '.join(serving)}", file=sys.stderr)
    if log:
        log.close()
    return metrics


def main(argv: list[str] | None = None, build_model: Callable[[dict], nn.Module] = build_s4) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="TOML config (see configs/), or a run's config.json")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    ap.add_argument("--fresh", action="store_true", help="start over even if out/last exists")
    ap.add_argument("--dump-grads", metavar="FILE", help="write the first step's gradients and stop")
    ap.add_argument(
        "--stop-at",
        type=int,
        default=0,
        metavar="STEP",
        help="stop after STEP (saving a resumable state), e.g. to train in time-boxed chunks",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="train for about SECONDS of steps (the final evaluation and export come after): train.steps "
        "is replaced by a plan made from the measured step time after 13 steps and again at 25/50/75/90 %% "
        "of the budget (written to the run's config.json: resume with that file), and the run stops at the "
        "deadline regardless (resumable, not exported); a run that ends within 13 steps is not re-planned, "
        "but still stops at the deadline",
    )
    args = ap.parse_intermixed_args(argv)  # options before or after the section.key=value overrides
    if not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        ap.error(f"--time-budget must be a finite number of seconds ≥ 0 (0: none), got {args.time_budget}")
    if args.time_budget > MAX_TIME_BUDGET:
        ap.error(f"--time-budget must be at most {MAX_TIME_BUDGET:g} seconds, got {args.time_budget:g}")
    if args.stop_at < 0:
        ap.error(f"--stop-at must be ≥ 0 (0: run to train.steps), got {args.stop_at}")
    # A user's error (ConfigError) is one line on stderr and exit status 2, Ctrl-C one line and 130;
    # anything else is a bug and keeps its traceback.
    first = os.environ.get("RANK", "0") == "0"  # under torchrun every process fails alike: one says it
    out, status, metrics = "the run folder", 0, {}
    try:
        cfg = load_config(args.config, args.overrides)
        out = (cfg.get("train") or {}).get("out", TrainConfig.out)
        metrics = train(cfg, build_model, fresh=args.fresh, dump_grads=args.dump_grads, stop_at=args.stop_at,
                        time_budget=args.time_budget)  # fmt: skip
    except ConfigError as exc:
        status, line = 2, f"{ap.prog}: error: {exc}"
    except TrainingInterrupted as exc:
        where = (f"{exc.out}/last holds step {exc.saved}: the same command resumes from there" if exc.saved
                 else "nothing was saved yet: the same command starts over")  # fmt: skip
        status, line = 130, f"interrupted after step {exc.done}; {where}"
    except Diverged as exc:
        where = (f"{exc.out}/last holds step {exc.saved}, the last good state (nothing was saved after it)"
                 if exc.saved else "nothing was saved")  # fmt: skip
        if exc.weights:
            what = (f"training diverged at step {exc.step}: its update left non-finite weights (loss "
                    f"{exc.loss}, gradient norm {exc.gnorm} before it); {where}; lower train.lr or "
                    "train.weight_decay")  # fmt: skip
        else:
            what = (f"training diverged at step {exc.step} (loss {exc.loss}, gradient norm {exc.gnorm}): the "
                    f"step was not taken; {where}; lower train.lr (or set train.grad_clip)")  # fmt: skip
        status, line = 1, f"{ap.prog}: error: {what}, then resume or start over with --fresh"
    except KeyboardInterrupt:
        status, line = 130, f"interrupted; the same command resumes from {out}/last if it was saved"
    finally:
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            if status == 0 and sys.exc_info()[0] is None:
                dist.barrier()  # no rank tears down gloo while its peer may still be talking to it
            dist.destroy_process_group()
    if status:
        if first:
            print(line, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if distributed:
            os._exit(status)  # as below: no interpreter finalization with gloo threads about
        raise SystemExit(status)
    if metrics:
        keep = ("val", "test", "train_wall_s")
        print(json.dumps({k: v for k, v in metrics.items() if k in keep}, indent=1))
    if distributed:
        # Everything is written (checkpoints synchronously, the log flushed per line). Skip the
        # interpreter's finalization: destroy_process_group() drops only the registry's reference
        # to the gloo group, and a gloo worker thread that is still freeing its last all-reduce
        # work item decrefs a Python object in it; if that happens while Py_FinalizeEx holds the
        # GIL, the thread is unwound mid-destructor and libstdc++ aborts the process ("terminate
        # called without an active exception", SIGABRT after a successful run; a core dump's
        # backtrace: ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> ~ThreadLocalState ->
        # gil_scoped_acquire -> PyThread_exit_thread). About 1 run in 20-40 on 2 loaded cores.
        # os._exit runs no atexit handlers; model/ registers none and logs nothing through `logging`
        # (whose handlers atexit would flush): a custom build_model must not rely on them here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
