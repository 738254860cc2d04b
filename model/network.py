"""ModelConfig and SequenceModel: token embedding → residual pre-norm S4 blocks → norm → logits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from model.kernel import RE_LAMBDA_MAX, S4_INITS, S4D_INITS, SSMKernel
from model.layer import S4Layer

# An SSM override: maps the normalized block input (…, H) to the SSM output (…, H). The recurrent
# form passes one per layer (step or prefill) instead of the convolution.
SSMFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64  # N: state size per channel (N/2 complex modes are stored)
    kernel: str = "s4"  # "s4" (DPLR) or "s4d" (diagonal)
    init: str = "legs"  # s4: legs, legt, lagt, fout; s4d: legs, diag-lin, diag-inv
    rank: int = 1  # low-rank size of the DPLR term (legt needs 2)
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
    # audio only: the tokens' mu-law convention (model/codecs.py MuLaw): "s4serve" (ours, 2q/255 − 1)
    # or "s4" (state-spaces/s4's, zero at 128, q/128 − 1: official SaShiMi checkpoints)
    mulaw: str = "s4serve"
    # the architecture (model/arch): "isotropic" (SequenceModel) or "sashimi" (model/arch/sashimi.py:
    # n_layers (S4, FF) block pairs per level; pool, expand, ff, unet as in the SaShiMi paper)
    arch: str = "isotropic"
    pool: list[int] = field(default_factory=lambda: [4, 4])  # sashimi: the stride of each DownPool
    expand: int = 2  # sashimi: channels × expand at each coarser level
    ff: int = 2  # sashimi: FF block hidden size = ff × width (0: no FF blocks)
    unet: bool = False  # sashimi: (S4, FF) blocks before each DownPool too, with U-Net skips
    norm: str = "layer"  # sashimi: block norm, "layer" (LayerNorm) or "tln" (official scalar TransposedLN)

    def __post_init__(self):
        inits = {"s4": S4_INITS, "s4d": S4D_INITS}
        if self.kernel not in inits:
            raise ValueError(f"kernel must be 's4' or 's4d', got {self.kernel!r}")
        if self.init not in inits[self.kernel]:
            raise ValueError(f"init for kernel {self.kernel!r} must be one of {inits[self.kernel]}")
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "l_max"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_state % 2 or self.l_max % 2:
            raise ValueError("d_state and l_max must be even")
        if not 1 <= int(self.rank) <= (2 if self.kernel == "s4" else int(self.rank)):  # kernel.woodbury
            raise ValueError(f"rank must be 1 or 2 for s4, at least 1 for s4d; got {self.rank}")
        discs = {"s4": (None, "bilinear"), "s4d": (None, "zoh", "bilinear")}[self.kernel]
        if self.disc not in discs:
            raise ValueError(f"disc for kernel {self.kernel!r} must be one of {discs}, got {self.disc!r}")
        lk = self.l_kernel
        if lk is not None:
            ints = isinstance(lk, list | tuple) and all(type(n) is int and 0 < n <= 2**20 for n in lk)
            n_kernels = self.n_layers if self.arch != "sashimi" else len(lk)  # sashimi: its validate
            if not (ints and len(lk) == n_kernels):
                raise ValueError(f"l_kernel must be null or {self.n_layers} integers in [1, 2**20]: {lk!r}")
            self.l_kernel = list(lk)
        scale = self.embed_scale
        number = isinstance(scale, int | float) and not isinstance(scale, bool)
        if not (number and math.isfinite(scale) and scale > 0):
            raise ValueError(f"embed_scale must be a positive finite number, got {self.embed_scale}")
        if not isinstance(self.head_bias, bool):
            raise ValueError(f"head_bias must be true or false, got {self.head_bias!r}")
        if not isinstance(self.dt_tied, bool) or (self.kernel == "s4" and not self.dt_tied):
            raise ValueError(f"dt_tied must be true or false, and true for kernel 's4'; got {self.dt_tied!r}")
        r = self.re_lambda_max
        if r is not None and (isinstance(r, bool) or not isinstance(r, int | float) or not -math.inf < r < 0):
            raise ValueError(f"re_lambda_max must be null or a negative number, got {r!r}")
        if self.modality not in ("text", "audio"):
            raise ValueError(f"modality must be 'text' or 'audio', got {self.modality!r}")
        if self.mulaw not in ("s4serve", "s4"):
            raise ValueError(f"mulaw must be 's4serve' or 's4', got {self.mulaw!r}")
        if self.arch not in ("isotropic", "sashimi"):
            raise ValueError(f"arch must be 'isotropic' or 'sashimi', got {self.arch!r}")
        if self.arch == "sashimi":
            from model.arch.sashimi import validate  # noqa: PLC0415

            validate(self)
        elif self.unet or self.norm != "layer":
            raise ValueError(
                "unet and norm are options of arch 'sashimi' (isotropic: unet false, norm 'layer')"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


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
    """x + dropout(S4Layer(LN(x))), then x + dropout(FF(LN(x))) when d_ff > 0.

    As the official backbone's layer pattern [s4, ff]: two pre-norm residual blocks
    (SequenceResidualBlock: norm → layer → dropout → add), each with its own LayerNorm (eps 1e-5)."""

    def __init__(self, cfg: ModelConfig, i: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        l_kernel = cfg.l_max if cfg.l_kernel is None else cfg.l_kernel[i]
        self.layer = S4Layer(
            cfg.d_model, cfg.d_state, l_kernel, dropout=cfg.dropout, kind=cfg.kernel, init=cfg.init,
            rank=cfg.rank, disc=cfg.disc, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
            backend=cfg.cauchy_backend, re_lambda_max=cfg.re_lambda_max, dt_tied=cfg.dt_tied,
        )  # fmt: skip
        self.ff_norm = nn.LayerNorm(cfg.d_model) if cfg.d_ff else None
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout) if cfg.d_ff else None
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
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, ssms: list[SSMFn] | None = None, logits: str = "all"):
        """tokens (B, L) → logits (B, L, V) in conv mode, at any L (each layer's kernel is computed for
        the length given); with `ssms`, any leading shape. logits="last": the last position's only,
        (B, 1, V); "none": None (the final norm and head are not run)."""
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
