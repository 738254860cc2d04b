"""ModelConfig and SequenceModel: token embedding → residual pre-norm S4 blocks → norm → logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from model.kernel import S4_INITS, S4D_INITS, SSMKernel
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
    l_max: int = 1024  # the kernel length trained in conv mode
    d_ff: int = 0  # feed-forward hidden size after each S4 layer (0: none)
    dropout: float = 0.0
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    tie_embeddings: bool = False
    cauchy_backend: str = "auto"  # auto (keops when it works), keops, torch
    modality: str = "text"  # text | audio (metadata for serving)
    sample_rate: int | None = None  # audio only
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
        if self.modality not in ("text", "audio"):
            raise ValueError(f"modality must be 'text' or 'audio', got {self.modality!r}")
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
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.down(nn.functional.gelu(self.up(x))))


class Block(nn.Module):
    """x + S4Layer(LN(x)), then x + FF(LN(x)) when d_ff > 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.layer = S4Layer(
            cfg.d_model, cfg.d_state, cfg.l_max, dropout=cfg.dropout, kind=cfg.kernel, init=cfg.init,
            rank=cfg.rank, disc=cfg.disc, dt_min=cfg.dt_min, dt_max=cfg.dt_max,
            backend=cfg.cauchy_backend,
        )  # fmt: skip
        self.ff_norm = nn.LayerNorm(cfg.d_model) if cfg.d_ff else None
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout) if cfg.d_ff else None

    def forward(self, x: torch.Tensor, ssm: SSMFn | None = None) -> torch.Tensor:
        u = self.norm(x)
        y = self.layer.ssm(u) if ssm is None else ssm(u)
        x = x + self.layer.mix(y, u)
        if self.ff is not None:
            x = x + self.ff(self.ff_norm(x))
        return x


class SequenceModel(nn.Module):
    """Autoregressive S4 language model over tokens (bytes or mu-law samples)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor, ssms: list[SSMFn] | None = None) -> torch.Tensor:
        """tokens (B, L) → logits (B, L, V) in conv mode; with `ssms`, any leading shape."""
        if ssms is None and tokens.shape[-1] > self.config.l_max:
            raise ValueError(f"conv mode handles at most l_max={self.config.l_max} tokens")
        x = self.embed(tokens)  # (B, L, H)
        for i, block in enumerate(self.blocks):
            x = block(x, None if ssms is None else ssms[i])
        return self.head(self.norm(x))  # (B, L, V)

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
