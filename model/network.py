"""ModelConfig and SequenceModel: token embedding → residual pre-norm S4 blocks → norm → logits."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from model.cauchy import BACKENDS
from model.codecs import MULAW_CONVENTIONS, QUANTIZATIONS, AudioCodec, audio_codec
from model.kernel import RE_LAMBDA_MAX, S4_INITS, S4D_INITS, SSMKernel
from model.layer import S4Layer
from model.norms import make_norm

# An SSM override: maps the normalized block input (…, H) to the SSM output (…, H). The recurrent
# form passes one per layer (step or prefill) instead of the convolution.
SSMFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ModelConfig:
    """The shape and options of a model: saved as `config` in a checkpoint's config.json, the [model]
    table of a training config. Every field is checked on construction (`__post_init__`): a bad value
    raises ValueError naming the field and the value (types included: 16.5 is not an integer, "yes"
    not a boolean). Lengths are in tokens (bytes, or mu-law samples); times Δ in sampling steps. Each
    size has an upper bound too (`MAX_SIZE`: vocab_size 2^22, d_model 2^15, n_layers 2^10, d_state 2^12,
    l_max 2^20, d_ff 2^17, sample_rate 384,000), beyond any trained S4 model.

    vocab_size      int ≥ 1: tokens (256 for bytes and 8-bit mu-law).
    d_model         int ≥ 1: H, channels (independent SSMs) per layer; sashimi: level 0's width.
    n_layers        int ≥ 1: S4 blocks; sashimi: (S4, FF) block pairs per level.
    d_state         even int ≥ 2: N, state size per channel (N/2 complex modes are stored).
    kernel          "s4" (DPLR, bilinear) or "s4d" (diagonal).
    init            s4: "legs", "legt", "lagt", "fout" (HiPPO measures); s4d: "legs", "diag-lin", "diag-inv".
    rank            int or None: the DPLR low-rank size. s4: 1 or 2, at least the measure's (legt: 2);
                    None (the default) becomes that least rank (2 for legt, else 1), so config.rank is
                    always what the kernel uses. s4d (no low-rank term): any int ≥ 1, unused.
    disc            None (the kernel's default), s4: "bilinear"; s4d: "zoh" (default) or "bilinear".
    l_max           even int ≥ 2: the length trained in conv mode and the S4 kernel's generating-function
                    length (conv mode itself runs at any length). Even because the kernel is computed
                    at rfft bins of an even length; odd lengths belong to `l_kernel`.
    l_kernel        None or one int in [1, 2**20] per S4 layer (odd allowed): each layer's own length of
                    S4's C̃ = C̄(I − Ā^L) (imported official models); None: l_max for every layer.
    d_ff            int ≥ 0: feed-forward hidden size after each S4 layer (0: none; isotropic only); or a
                    list of n_layers such ints, one per block (official layer patterns such as
                    [s4, s4, ffn]: 0 for the first S4 layer of each repeat).
    dropout         float in [0, 1): dropout probability (S4 output, FF hidden, residual branches).
    dt_min, dt_max  floats, 1e-10 ≤ dt_min ≤ dt_max ≤ 1e8 (`DT_RANGE`): the range of the log-uniform
                    initial step size Δ.
    tie_embeddings  bool: the output head shares the embedding matrix (adaptive: its tables).
    head_bias       bool: the output head has a bias (official checkpoints do).
    re_lambda_max   negative float or None: Re Λ is clamped ≤ it (None: no clamp, for imported models).
    dt_tied         bool: False gives S4D one Δ per mode, (H, N/2); S4 requires True.
    embed_scale     finite float > 0: the embedding is multiplied by it (official `lm` rescale: √d_model).
    cauchy_backend  "auto" (keops when it works), "keops" or "torch".
    modality        "text" or "audio" (metadata for serving).
    sample_rate     None or int ≥ 1: Hz, audio only (None for text).
    quantization    audio tokens' quantization: "mu-law" or "linear" (8-bit linear as state-spaces/s4's
                    `dataset.quantization: linear`, the official Beethoven SaShiMi's; model.codecs.Linear8).
    mulaw           audio tokens' mu-law convention: "s4serve" (2q/255 − 1) or "s4" (official SaShiMi).
    arch            "isotropic" (SequenceModel) or "sashimi" (model/arch/sashimi.py).
    pool            sashimi: list of 1–4 ints in [2, 64], each DownPool's stride.
    expand          sashimi: int in [1, 8], channels × expand at each coarser level.
    ff              sashimi: int in [0, 16], FF hidden size = ff × width (0: no FF blocks).
    unet            sashimi: bool, (S4, FF) blocks before each DownPool too, with U-Net skips.
    norm            "layer" (LayerNorm) or "tln" (official scalar TransposedLN): the blocks' norm;
                    isotropic: the final norm's too (official `transposed: true` backbones);
                    sashimi: its final norm stays a LayerNorm (as the official SaShiMi's).
    cutoffs         None, or 1 to 64 strictly increasing ints in (0, vocab_size): an adaptive input embedding
                    and adaptive softmax head over these shards (model/adaptive.py; isotropic only).
                    The head's "logits" are then the full log-probabilities.
    div_val         int in [1, d_model], with cutoffs: shard i's embedding width is d_model / div_val^i
                    (1: one table, no projections); d_model must be divisible by div_val^(len(cutoffs)).
    tie_projs       None, or with cutoffs and div_val > 1 one bool per shard (len(cutoffs) + 1): the
                    head's projection of that shard is the embedding's (official tie_projs, whose
                    first entry is always false). None: none tied.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64  # N: state size per channel (N/2 complex modes are stored)
    kernel: str = "s4"  # "s4" (DPLR) or "s4d" (diagonal)
    init: str = "legs"  # s4: legs, legt, lagt, fout; s4d: legs, diag-lin, diag-inv
    rank: int | None = None  # low-rank size of the DPLR term; None: the init's least (legt 2, else 1)
    disc: str | None = None  # s4: bilinear; s4d: zoh (default) or bilinear
    l_max: int = 1024  # the length trained in conv mode (conv mode itself runs at any length)
    # per-layer length L of S4's generating function C̃ = C̄(I − Ā^L) (official: each layer's l_kernel
    # buffer; odd allowed); None: l_max for every layer
    l_kernel: list[int] | None = None
    d_ff: int = 0  # feed-forward hidden size after each S4 layer (0: none)
    dropout: float = 0.0
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    tie_embeddings: bool = False
    head_bias: bool = False  # the output head (decoder) Linear has a bias (official checkpoints do)
    re_lambda_max: float | None = RE_LAMBDA_MAX  # clamp Re Λ ≤ it (None: none; imported models)
    dt_tied: bool = True  # False: one Δ per mode, (H, N/2) (S4D only; official dt_tie=False)
    embed_scale: float = 1.0  # the embedding is multiplied by it (official task `lm` rescale: √d_model)
    cauchy_backend: str = "auto"  # auto (keops when it works), keops, torch
    modality: str = "text"  # text | audio (metadata for serving)
    sample_rate: int | None = None  # audio only
    # audio only: the tokens' quantization, "mu-law" or "linear" (model/codecs.py audio_codec; linear as
    # state-spaces/s4's, the official Beethoven SaShiMi's); mu-law's convention (MuLaw): "s4serve" (ours,
    # 2q/255 − 1) or "s4" (state-spaces/s4's, zero at 128, q/128 − 1: official SaShiMi checkpoints)
    quantization: str = "mu-law"
    mulaw: str = "s4serve"
    # the architecture (model/arch): "isotropic" (SequenceModel) or "sashimi" (model/arch/sashimi.py:
    # n_layers (S4, FF) block pairs per level; pool, expand, ff, unet as in the SaShiMi paper)
    arch: str = "isotropic"
    pool: list[int] = field(default_factory=lambda: [4, 4])  # sashimi: the stride of each DownPool
    expand: int = 2  # sashimi: channels × expand at each coarser level
    ff: int = 2  # sashimi: FF block hidden size = ff × width (0: no FF blocks)
    unet: bool = False  # sashimi: (S4, FF) blocks before each DownPool too, with U-Net skips
    # the blocks' norm, "layer" (LayerNorm) or "tln" (official scalar TransposedLN); isotropic: the final
    # norm's too (the official backbone builds both from one `norm` option)
    norm: str = "layer"
    # adaptive input and softmax (model/adaptive.py): the vocabulary's shard bounds, the width divisor
    # and which shards' head projections are the embedding's
    cutoffs: list[int] | None = None
    div_val: int = 1
    tie_projs: list[bool] | None = None

    def __post_init__(self):
        for f in fields(self):  # numpy scalars (a sweep's np.int64, np.float32) as Python numbers
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                setattr(self, f.name, type(value)(_plain(v) for v in value))
            else:
                setattr(self, f.name, _plain(value))
        for name in ("vocab_size", "d_model", "n_layers"):
            _check_int(name, getattr(self, name), 1)
        _check_int("d_state", self.d_state, 2)
        if self.d_state % 2:
            raise ValueError(f"d_state must be even (N/2 conjugate pairs are stored), got {self.d_state}")
        _check_choice("kernel", self.kernel, ("s4", "s4d"))
        inits = {"s4": S4_INITS, "s4d": S4D_INITS}
        if self.init not in inits[self.kernel]:
            raise ValueError(
                f"init for kernel {self.kernel!r} must be one of {inits[self.kernel]}, got {self.init!r}"
            )
        least = 2 if (self.kernel, self.init) == ("s4", "legt") else 1  # hippo.rank_correction's columns
        if self.rank is None:
            self.rank = least
        if type(self.rank) is not int:
            raise ValueError(f"rank must be an integer (or null: the init's least), got {self.rank!r}")
        if self.kernel == "s4d":
            _check_int("rank", self.rank, 1)
        if self.kernel == "s4" and not least <= self.rank <= 2:  # kernel.woodbury: ranks 1 and 2
            if least == 2:
                raise ValueError(
                    f"rank must be 2 for init 'legt' (its low-rank correction has 2 columns), got {self.rank}"
                )
            raise ValueError(f"rank must be 1 or 2 for kernel 's4', got {self.rank}")
        discs = {"s4": (None, "bilinear"), "s4d": (None, "zoh", "bilinear")}[self.kernel]
        if self.disc not in discs:
            raise ValueError(f"disc for kernel {self.kernel!r} must be one of {discs}, got {self.disc!r}")
        _check_int("l_max", self.l_max, 2)
        if self.l_max % 2:
            raise ValueError(
                f"l_max must be even (the S4 kernel is computed at an even length; a layer's odd length "
                f"goes in l_kernel), got {self.l_max}"
            )
        lk = self.l_kernel
        if lk is not None:
            ints = isinstance(lk, list | tuple) and all(type(n) is int and 0 < n <= 2**20 for n in lk)
            n_kernels = self.n_layers if self.arch != "sashimi" else len(lk)  # sashimi: its validate
            if not (ints and len(lk) == n_kernels):
                raise ValueError(f"l_kernel must be null or {self.n_layers} integers in [1, 2**20]: {lk!r}")
            self.l_kernel = list(lk)
        if isinstance(self.d_ff, list | tuple):
            ok = all(type(d) is int and 0 <= d <= MAX_SIZE["d_ff"] for d in self.d_ff)
            if len(self.d_ff) != self.n_layers or not ok:
                raise ValueError(
                    f"d_ff must be an integer ≥ 0 (at most {MAX_SIZE['d_ff']:,}) or a list of "
                    f"{self.n_layers} (n_layers) of them, got {self.d_ff!r}"
                )
            self.d_ff = list(self.d_ff)
        else:
            _check_int("d_ff", self.d_ff, 0)
        _check_number("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        lo, hi = DT_RANGE
        for name in ("dt_min", "dt_max"):
            _check_number(name, getattr(self, name))
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(
                    f"{name} must be in [{lo:g}, {hi:g}] (a step size Δ in sampling steps), got "
                    f"{getattr(self, name)!r}"
                )
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min must be ≤ dt_max, got dt_min={self.dt_min!r}, dt_max={self.dt_max!r}")
        for name in ("tie_embeddings", "head_bias", "dt_tied", "unet"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        scale = self.embed_scale
        number = isinstance(scale, int | float) and not isinstance(scale, bool)
        if not (number and math.isfinite(scale) and scale > 0):
            raise ValueError(f"embed_scale must be a positive finite number, got {self.embed_scale!r}")
        if self.kernel == "s4" and not self.dt_tied:
            raise ValueError(
                f"dt_tied must be true for kernel 's4' (one Δ per channel), got {self.dt_tied!r}"
            )
        r = self.re_lambda_max
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not -math.inf < r < 0):
            raise ValueError(f"re_lambda_max must be null or a negative number, got {r!r}")
        _check_choice("cauchy_backend", self.cauchy_backend, BACKENDS)
        _check_choice("modality", self.modality, ("text", "audio"))
        if self.sample_rate is not None:
            _check_int("sample_rate", self.sample_rate, 1)
        _check_choice("quantization", self.quantization, QUANTIZATIONS)
        _check_choice("mulaw", self.mulaw, MULAW_CONVENTIONS)
        _check_choice("arch", self.arch, ("isotropic", "sashimi"))
        self._check_adaptive()
        from model.arch.sashimi import validate, validate_fields  # noqa: PLC0415

        validate_fields(self)  # pool, expand, ff, norm: checked whatever the arch
        if self.arch == "sashimi":
            validate(self)
        elif self.unet:
            raise ValueError(
                f"unet is an option of arch 'sashimi' (isotropic: unet false), got unet={self.unet!r}"
            )

    def block_d_ff(self, i: int) -> int:
        """Block i's feed-forward hidden size (0: no FF block)."""
        return self.d_ff[i] if isinstance(self.d_ff, list) else self.d_ff

    def _check_adaptive(self) -> None:
        c = self.cutoffs
        _check_int("div_val", self.div_val, 1)
        if c is None:
            if self.div_val != 1 or self.tie_projs is not None:
                raise ValueError(
                    "div_val and tie_projs need cutoffs (an adaptive softmax), "
                    f"got div_val={self.div_val!r}, "
                    f"tie_projs={self.tie_projs!r}"
                )
            return
        V = self.vocab_size
        if isinstance(c, list | tuple) and len(c) > MAX_CUTOFFS:  # (before a look at each: a 4M-long list)
            raise ValueError(
                f"cutoffs must be null or at most {MAX_CUTOFFS} integers (shards of an adaptive softmax), "
                f"got a list of {len(c):,}"
            )
        ok = isinstance(c, list | tuple) and len(c) >= 1 and all(type(x) is int for x in c)
        if not (ok and all(a < b for a, b in itertools.pairwise([0, *c, V]))):
            raise ValueError(
                f"cutoffs must be null or strictly increasing integers in (0, vocab_size {V}), got {c!r}"
            )
        self.cutoffs = list(c)
        if not self.head_bias:
            raise ValueError("head_bias must be true with cutoffs (the adaptive softmax has biases)")
        if self.arch != "isotropic":
            raise ValueError(
                f"cutoffs (an adaptive softmax) are an option of arch 'isotropic', not {self.arch!r}"
            )
        if self.div_val > self.d_model:  # (its power below would be a number of millions of digits)
            raise ValueError(
                f"div_val must be an integer ≤ d_model {self.d_model} (shard i's width is d_model / "
                f"div_val^i), got {self.div_val!r}"
            )
        if self.d_model % self.div_val ** len(c):
            raise ValueError(
                f"d_model {self.d_model} must be divisible by div_val^{len(c)} = {self.div_val ** len(c)} "
                "(the last shard's embedding width)"
            )
        t = self.tie_projs
        if t is not None:
            if self.div_val == 1:
                raise ValueError(
                    f"tie_projs needs div_val > 1 (with div_val 1 there are no projections), got {t!r}"
                )
            if not (
                isinstance(t, list | tuple) and len(t) == len(c) + 1 and all(isinstance(x, bool) for x in t)
            ):
                raise ValueError(
                    f"tie_projs must be null or {len(c) + 1} booleans (one per shard), got {t!r}"
                )
            self.tie_projs = list(t)

    @property
    def codec(self) -> AudioCodec:
        """The audio tokens' codec (model.codecs.audio_codec of `quantization` and `mulaw`)."""
        return audio_codec(self.quantization, self.mulaw)

    def to_dict(self) -> dict:
        """Every field, but those of OMIT_AT_DEFAULT at their default: a model saved (or converted) again
        writes the config.json the version before wrote, so its fingerprint, and its sessions' exports,
        hold."""
        d = asdict(self)
        return {k: v for k, v in d.items() if not (k in OMIT_AT_DEFAULT and v == OMIT_AT_DEFAULT[k])}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config from a dict of its fields (a checkpoint's `config`, a [model] table); raises
        ValueError for an unknown field or a bad value."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


# fields added after checkpoints were first written, with the value every earlier checkpoint means:
# `to_dict` leaves them out at it (model_fingerprint hashes config.json as written)
OMIT_AT_DEFAULT = {"quantization": "mu-law"}


def _plain(value):
    """A numpy integer or float scalar as the Python int or float it holds (a config must read back from its
    JSON); anything else (bool, int, float, str, numpy bool) as given, to be checked as it is."""
    if isinstance(value, bool | int | float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


# the most each size may be: beyond any trained S4 model (the official WikiText-103 recipe: vocab 267,735,
# d_model 1,024, 16 layers, l_max 8,192; SaShiMi's YouTubeMix 131,072 samples), and bounds on what a
# config.json from outside makes `load` allocate before it compares the weights' shapes (d_model 10**9 was
# a 64 GB allocation, 10**400 an overflow deep in torch, n_layers 10**7 a hang: a helper's audit; within
# them, `load` stops a build past its weights file's size: model.checkpoint.build_budget)
MAX_SIZE = {"vocab_size": 2**22, "d_model": 2**15, "n_layers": 2**10, "d_state": 2**12, "l_max": 2**20,
            "d_ff": 2**17, "sample_rate": 384_000}  # fmt: skip
# The initial step sizes Δ a config may ask for (dt_min, dt_max). Past them a model cannot be trained or
# served: Δ is exp(log Δ) in float32 in training, 0 below 1.4e-45 and inf above 3.4e38 (a NaN S4 kernel,
# the loss NaN from the first step: dt_min = 1e-50 and dt_max = 1e39 were accepted), and the float64
# conversion to the recurrent form failed its check from Δ = 1e-11 (S4 lagt, N 16) and at Δ = 1e20 (S4
# legs). Within them every init converted at N 16 and 64 (but S4 fout at N 64, L 1,024, refused by the
# check at Δ from 1e-9 to 1e-7: the check, not the config, is what guards the conversion).
DT_RANGE = (1e-10, 1e8)
# the most `cutoffs` (adaptive softmax shard bounds) may hold: official recipes use 3 or 4; each is a module
# with its own parameters, and a config.json of 4 million built them for minutes before any check (a
# helper's audit)
MAX_CUTOFFS = 64


def _check_int(name: str, value, least: int) -> None:
    if type(value) is not int or value < least:  # bool is not an int here; neither is 16.0
        raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
    most = MAX_SIZE.get(name)
    if most is not None and value > most:
        raise ValueError(f"{name} must be an integer ≤ {most:,}, got {value!r}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this process can put tensors on. Raises ValueError naming it for a name
    torch does not know ("gpu"), a CUDA device where torch has none (a CPU build, no GPU), or a CUDA
    index past the devices present (torch raised its own AssertionError or RuntimeError deep in the
    first copy, or listed every device type it knows)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r}: not a torch device (cpu, cuda, cuda:N, ...)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: this torch sees no CUDA device (torch.cuda.is_available() "
                             f"is False; torch {torch.__version__})")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def check_token_dtype(tokens: torch.Tensor) -> torch.Tensor:
    """`tokens` as ids every path indexes by: int64 or int32 as given, another integer dtype (uint8, int8,
    int16, the unsigned ones) as int64 (torch's embedding takes int64 and int32 only: uint8 bytes failed
    deep in it on the parallel prefill, conv mode, SaShiMi and float64 paths). Raises ValueError unless
    `tokens` is a tensor of integer ids (a float or bool tensor would be truncated or read as 0/1 without
    a word; a list or an array is not a tensor)."""
    if not isinstance(tokens, torch.Tensor):
        raise ValueError(f"tokens must be a torch tensor of integer ids, got {type(tokens).__name__}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer token ids (int64), got {tokens.dtype}")
    return tokens if tokens.dtype in (torch.int64, torch.int32) else tokens.long()


def token_range_error(tokens: torch.Tensor, V: int) -> ValueError:
    """The ValueError for `tokens` (any shape) holding an id outside 0 … V − 1: names the first one and
    its index."""
    bad = ((tokens < 0) | (tokens >= V)).nonzero()
    where = [int(i) for i in bad[0]] if len(bad) else []
    value = int(tokens[tuple(where)]) if where else None
    return ValueError(f"token id {value} at index {where} is outside the vocabulary: ids are 0 … {V - 1}")


def check_token_ids(tokens: torch.Tensor, V: int) -> None:
    """Raise `token_range_error` unless every id of `tokens` (integer, any shape) is in 0 … V − 1. For the
    paths that index the embedding in torch (on a CUDA device this synchronizes); the C entry points
    check their ids themselves (`fused.TOKEN_RANGE`) at no cost."""
    if tokens.numel():
        lo, hi = torch.aminmax(tokens)
        if int(lo) < 0 or int(hi) >= V:
            raise token_range_error(tokens, V)


def check_conv_tokens(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """`tokens` as ids (`check_token_dtype`); ValueError unless it is a (B, L) integer tensor, L ≥ 1, of ids
    in 0 … V − 1 (conv mode's input: an empty length has no kernel)."""
    tokens = check_token_dtype(tokens)
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (B, L) with L ≥ 1, got shape {tuple(tokens.shape)}")
    check_token_ids(tokens, V)
    return tokens


class FeedForward(nn.Module):
    """down(dropout(GELU(up(x)))): (…, H) → (…, H); exact (erf) GELU, both linears with bias. The
    official `ff` layer (state-spaces/s4 src/models/sequence/modules/ffn.py, FFN with expand =
    d_ff / H, activation 'gelu') computes the same, with its dropout in the same place."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.down(self.dropout(nn.functional.gelu(self.up(x))))


class Block(nn.Module):
    """x + dropout(S4Layer(norm(x))), then x + dropout(FF(norm(x))) when its d_ff > 0.

    As the official backbone's layer pattern [s4, ff]: two pre-norm residual blocks
    (SequenceResidualBlock: norm → layer → dropout → add), each with its own norm: LayerNorm (eps 1e-5),
    or with cfg.norm "tln" the scalar TransposedLN of official `transposed: true` backbones."""

    def __init__(self, cfg: ModelConfig, i: int = 0):
        super().__init__()
        self.norm = make_norm(cfg.norm, cfg.d_model)
        l_kernel = cfg.l_max if cfg.l_kernel is None else cfg.l_kernel[i]
        self.layer = S4Layer(
            cfg.d_model, cfg.d_state, l_kernel, dropout=cfg.dropout, kind=cfg.kernel, init=cfg.init,
            rank=cfg.rank, disc=cfg.disc, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
            backend=cfg.cauchy_backend, re_lambda_max=cfg.re_lambda_max, dt_tied=cfg.dt_tied,
        )  # fmt: skip
        d_ff = cfg.block_d_ff(i)
        self.ff_norm = make_norm(cfg.norm, cfg.d_model) if d_ff else None
        self.ff = FeedForward(cfg.d_model, d_ff, cfg.dropout) if d_ff else None
        self.dropout = nn.Dropout(cfg.dropout)  # on each residual branch

    def forward(self, x: torch.Tensor, ssm: SSMFn | None = None) -> torch.Tensor:
        u = self.norm(x)
        y = self.layer.ssm(u) if ssm is None else ssm(u)
        x = x + self.dropout(self.layer.mix(y, u))
        if self.ff is not None:
            x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x


class SequenceModel(nn.Module):
    """Autoregressive S4 language model over tokens (bytes or mu-law samples)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # (built in this order, embedding first: a seed gives the same initial weights as it always has)
        if cfg.cutoffs is not None:  # adaptive input and softmax; the head returns log-probabilities
            from model.adaptive import AdaptiveEmbedding  # noqa: PLC0415

            self.embed = AdaptiveEmbedding(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.div_val)
        else:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.d_model)  # the official backbone's final norm is the blocks' kind
        if cfg.cutoffs is not None:
            from model.adaptive import AdaptiveLogSoftmax  # noqa: PLC0415

            self.head = AdaptiveLogSoftmax(cfg.vocab_size, cfg.d_model, cfg.cutoffs, cfg.div_val,
                                           cfg.tie_embeddings, cfg.tie_projs, self.embed)  # fmt: skip
            return
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, ssms: list[SSMFn] | None = None, logits: str = "all"):
        """tokens (B, L) integer ids in 0 … V − 1, L ≥ 1 → logits (B, L, V) in conv mode, at any L (each
        layer's kernel is computed for the length given); with `ssms` (the recurrent form's layers), any
        leading shape, unchecked. logits="last": the last position's only, (B, 1, V); "none": None (the
        final norm and head are not run). The logits' dtype is the weights'. Raises ValueError for another
        shape, a float or bool tensor, an id outside the vocabulary, or another `logits` (one was read as
        "last", where RecurrentModel.prefill refused it)."""
        if logits not in ("all", "last", "none"):
            raise ValueError(f'logits must be "all", "last" or "none", got {logits!r}')
        if ssms is None:
            tokens = check_conv_tokens(tokens, self.config.vocab_size)
        x = self.embed(tokens) * self.config.embed_scale  # (B, L, H)
        for i, block in enumerate(self.blocks):
            x = block(x, None if ssms is None else ssms[i])
        if logits == "none":
            return None
        return self.head(self.norm(x if logits == "all" else x[..., -1:, :]))  # (B, L or 1, V)

    def kernels(self) -> list[SSMKernel]:
        return [b.layer.kernel for b in self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, lr: float, weight_decay: float, ssm_lr: float | None = None) -> list[dict]:
        """AdamW groups: SSM parameters (Δ, Λ, P, B) with their own lr and no weight decay;
        matrices (dim ≥ 2) with weight decay; vectors (biases, norms, D) without."""
        ssm_ids = {id(getattr(k, n)) for k in self.kernels() for n in SSMKernel.SSM_PARAMS if hasattr(k, n)}
        ssm, decay, no_decay = [], [], []
        for p in self.parameters():  # parameters() yields a tied weight once
            if not p.requires_grad:
                continue
            (ssm if id(p) in ssm_ids else decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": ssm, "lr": lr if ssm_lr is None else ssm_lr, "weight_decay": 0.0, "name": "ssm"},
            {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        ]

    def to_recurrent(self, **kwargs):
        """Frozen, verified recurrent form (see model.recurrent.RecurrentModel)."""
        from model.recurrent import RecurrentModel  # noqa: PLC0415

        return RecurrentModel(self, **kwargs)
