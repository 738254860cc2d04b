"""SaShiMi (Goel, Gu, Donahue, Ré, "It's Raw! Audio Generation with State-Space Models", ICML 2022):
S4 and FF residual blocks on a U-shaped stack of levels, each `pool[k]` times slower and `expand`
times wider than the one above it.

    tokens → embed ─ level 0 (H, rate 1) ─ DownPool ─ level 1 (2H, rate 1/4) ─ DownPool ─ center …
    … center (4H, rate 1/16) ─ UpPool ─ level 1 blocks ─ UpPool ─ level 0 blocks ─ LayerNorm → head

As in the official backbone (state-spaces/s4, src/models/sequence/backbones/sashimi.py and
models/sashimi/sashimi.py; read for the facts, not copied):
  * DownPool: fold `stride` consecutive steps into the channels (channel h·stride + j holds step j of
    the block) and apply a linear layer: (B, L, H) → (B, L/stride, H·expand).
  * UpPool: a linear layer to H·stride channels, shifted one coarse step later (the first coarse step
    outputs zeros), unfolded back into `stride` steps: the fine steps of block l see only the coarse
    output of block l − 1, which depends on inputs before block l. So the whole network is causal.
  * Blocks: x + S4(norm(x)) and x + FF(norm(x)) (prenorm residuals), `n_layers` pairs per level.
  * Skips: the center adds its input; each up level adds the level's input to the UpPool output and
    wraps its blocks in one more residual. With `unet`, the down side has blocks too and every up
    layer's output adds the matching down output (U-Net).

Conv mode accepts any length: the input is zero-padded to a multiple of prod(pool) and the
padding's outputs dropped (it cannot reach earlier outputs). The recurrent form is
model/arch/sashimi_recurrent.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.kernel import SSMKernel
from model.layer import S4Layer
from model.network import FeedForward, ModelConfig, SequenceModel, SSMFn, check_conv_tokens
from model.norms import make_norm

MAX_LEVELS = 4


def validate_fields(cfg: ModelConfig) -> None:
    """Check the types and ranges of the SaShiMi fields (pool, expand, ff, norm) of any ModelConfig;
    raises ValueError naming the field and its value."""
    pool = cfg.pool
    if not (isinstance(pool, list | tuple) and 1 <= len(pool) <= MAX_LEVELS):
        raise ValueError(f"pool must be a list of 1 to {MAX_LEVELS} strides, got {pool!r}")
    if not all(type(p) is int and 2 <= p <= 64 for p in pool):
        raise ValueError(f"pool strides must be integers in [2, 64], got {pool!r}")
    cfg.pool = list(pool)
    if not (type(cfg.expand) is int and 1 <= cfg.expand <= 8):
        raise ValueError(f"expand must be an integer in [1, 8], got {cfg.expand!r}")
    if not (type(cfg.ff) is int and 0 <= cfg.ff <= 16):
        raise ValueError(f"ff must be an integer in [0, 16], got {cfg.ff!r}")
    if cfg.norm not in ("layer", "tln"):
        raise ValueError(f"norm must be 'layer' or 'tln', got {cfg.norm!r}")


def validate(cfg: ModelConfig) -> None:
    """Check a ModelConfig with arch 'sashimi' (after `validate_fields`); raises ValueError naming the
    field."""
    if cfg.d_ff:
        raise ValueError(
            f"d_ff must be 0 for arch 'sashimi' (its FF blocks are sized by ff), got {cfg.d_ff!r}"
        )
    if cfg.l_kernel is not None and len(cfg.l_kernel) != len(s4_block_names(cfg)):
        raise ValueError(
            f"l_kernel must be null or one length per S4 block ({len(s4_block_names(cfg))}, in the order of "
            f"SaShiMi.named_s4_blocks), got {len(cfg.l_kernel)}"
        )
    P = math.prod(cfg.pool)
    if cfg.l_max % (2 * P):
        raise ValueError(
            f"l_max must be a multiple of 2·prod(pool) = {2 * P} (each level's length even), got {cfg.l_max}"
        )


def s4_block_names(cfg: ModelConfig) -> list[str]:
    """The S4 blocks' module names in the order of SaShiMi.named_s4_blocks (down levels, the center,
    up levels from the coarsest): the order of `l_kernel`."""
    K, per = len(cfg.pool), (2 if cfg.ff else 1)
    groups = [f"down.{k}.blocks" for k in range(K)] if cfg.unet else []
    groups += ["center"] + [f"up.{k}.blocks" for k in reversed(range(K))]
    return [f"{g}.{i * per}" for g in groups for i in range(cfg.n_layers)]


class S4Block(nn.Module):
    """x + S4Layer(norm(x)): (…, L, d) → (…, L, d). `l_max`: the length of S4's generating function
    (the level's length, or the block's `l_kernel` entry)."""

    def __init__(self, cfg: ModelConfig, d: int, l_max: int):
        super().__init__()
        self.norm = make_norm(cfg.norm, d)
        self.layer = S4Layer(
            d, cfg.d_state, l_max, dropout=cfg.dropout, kind=cfg.kernel, init=cfg.init, rank=cfg.rank,
            disc=cfg.disc, dt_min=cfg.dt_min, dt_max=cfg.dt_max, backend=cfg.cauchy_backend,
            re_lambda_max=cfg.re_lambda_max, dt_tied=cfg.dt_tied,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, ssm: SSMFn | None = None) -> torch.Tensor:
        u = self.norm(x)
        y = self.layer.ssm(u) if ssm is None else ssm(u)
        return x + self.layer.mix(y, u)


class FFBlock(nn.Module):
    """x + FeedForward(norm(x)), hidden size ff·d; pointwise in time (any leading shape)."""

    def __init__(self, cfg: ModelConfig, d: int):
        super().__init__()
        self.norm = make_norm(cfg.norm, d)
        self.ff = FeedForward(d, cfg.ff * d, cfg.dropout)

    def forward(self, x: torch.Tensor, ssm: SSMFn | None = None) -> torch.Tensor:
        return x + self.ff(self.norm(x))


def level_blocks(cfg: ModelConfig, d: int, l_max: int, prefix: str = "") -> nn.ModuleList:
    """n_layers pairs (S4Block, FFBlock), or S4Blocks alone when ff = 0. With `l_kernel`, the S4 block
    named prefix.i takes its entry as its kernel length instead of the level's l_max."""
    lk = dict(zip(s4_block_names(cfg), cfg.l_kernel)) if cfg.l_kernel is not None else {}
    blocks = []
    for _ in range(cfg.n_layers):
        blocks.append(S4Block(cfg, d, lk.get(f"{prefix}.{len(blocks)}", l_max)))
        if cfg.ff:
            blocks.append(FFBlock(cfg, d))
    return nn.ModuleList(blocks)


class DownPool(nn.Module):
    """(…, L, H) → (…, L/stride, H_out): channel h·stride + j of coarse step l is channel h of step
    l·stride + j, then a linear layer W (H_out, H·stride)."""

    def __init__(self, d_in: int, d_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(d_in * stride, d_out)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """(…, L, H) → (…, L/stride, H·stride) in the (h, j) channel order."""
        *lead, L, H = x.shape
        return (
            x.reshape(*lead, L // self.stride, self.stride, H)
            .transpose(-1, -2)
            .reshape(*lead, L // self.stride, H * self.stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.fold(x))


class UpPool(nn.Module):
    """(…, Lc, H_in) → (…, Lc·stride, H_out): a linear layer to H_out·stride channels, unfolded so that
    channel h·stride + j of coarse step l becomes channel h of fine step l·stride + j, and shifted one
    coarse step later (fine steps 0..stride−1 are zeros: the causal shift)."""

    def __init__(self, d_in: int, d_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(d_in, d_out * stride)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(…, Lc, H_in) → (…, Lc, stride, H_out): the `stride` fine outputs each coarse step produces."""
        z = self.linear(x)
        return z.reshape(*z.shape[:-1], -1, self.stride).transpose(-1, -2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.blocks(x)  # (B, Lc, s, H)
        z = F.pad(z[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # one coarse step later
        return z.flatten(-3, -2)  # (B, Lc·s, H)


class DownLevel(nn.Module):
    def __init__(self, cfg: ModelConfig, d: int, l_max: int, stride: int, k: int):
        super().__init__()
        self.blocks = level_blocks(cfg, d, l_max, f"down.{k}.blocks") if cfg.unet else nn.ModuleList()
        self.pool = DownPool(d, d * cfg.expand, stride)


class UpLevel(nn.Module):
    def __init__(self, cfg: ModelConfig, d: int, l_max: int, stride: int, k: int):
        super().__init__()
        self.pool = UpPool(d * cfg.expand, d, stride)
        self.blocks = level_blocks(cfg, d, l_max, f"up.{k}.blocks")


class SaShiMi(nn.Module):
    """Autoregressive SaShiMi over tokens: tokens (B, L) → logits (B, L, V), causal.

    `down[k]`, `up[k]` belong to level k (width H·expand^k, kernel length l_max / prod(pool[:k]));
    `center` is level len(pool)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "sashimi":
            raise ValueError(f"SaShiMi needs arch 'sashimi', got {cfg.arch!r}")
        self.config = cfg
        H, L = cfg.d_model, cfg.l_max
        self.widths, self.lengths = [], []
        for p in cfg.pool:
            self.widths.append(H)
            self.lengths.append(L)
            H, L = H * cfg.expand, L // p
        self.widths.append(H)
        self.lengths.append(L)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.down = nn.ModuleList(
            DownLevel(cfg, self.widths[k], self.lengths[k], p, k) for k, p in enumerate(cfg.pool)
        )
        self.center = level_blocks(cfg, H, L, "center")
        self.up = nn.ModuleList(
            UpLevel(cfg, self.widths[k], self.lengths[k], p, k) for k, p in enumerate(cfg.pool)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def period(self) -> int:
        """prod(pool): the number of samples per center step."""
        return math.prod(self.config.pool)

    def named_s4_blocks(self) -> list[tuple[str, int, S4Block]]:
        """Every S4Block as (module name, level, block), in the order the network runs them."""
        K = len(self.config.pool)
        groups = [(f"down.{k}.blocks", k, lvl.blocks) for k, lvl in enumerate(self.down)]
        groups.append(("center", K, self.center))
        groups += [(f"up.{k}.blocks", k, self.up[k].blocks) for k in reversed(range(K))]
        return [(f"{prefix}.{i}", k, b) for prefix, k, blocks in groups for i, b in enumerate(blocks)
                if isinstance(b, S4Block)]  # fmt: skip

    def kernels(self) -> list[SSMKernel]:
        return [b.layer.kernel for _, _, b in self.named_s4_blocks()]

    num_params = SequenceModel.num_params
    param_groups = SequenceModel.param_groups

    def forward(self, tokens: torch.Tensor, ssms: dict[str, SSMFn] | None = None) -> torch.Tensor:
        """tokens (B, L) integer ids in 0 … V − 1, L ≥ 1 → logits (B, L, V), at any L (each S4 kernel is
        computed for its level's length). `ssms`: {S4Block name: replacement of its convolution} (e.g. a
        float64 reference). Raises ValueError as `SequenceModel.forward` does."""
        tokens = check_conv_tokens(tokens, self.config.vocab_size)
        B, L = tokens.shape
        Lp = -(-L // self.period) * self.period
        x = self.embed(F.pad(tokens, (0, Lp - L))) * self.config.embed_scale  # (B, Lp, H)
        ssms = ssms or {}

        def run(blocks: nn.ModuleList, prefix: str, x: torch.Tensor, skips: list | None = None):
            for i, blk in enumerate(blocks):
                x = blk(x, ssms.get(f"{prefix}.{i}"))
                if skips is not None:
                    skips.append(x)
            return x

        skips = [x]
        for k, lvl in enumerate(self.down):
            x = run(lvl.blocks, f"down.{k}.blocks", x, skips)
            x = lvl.pool(x)
            skips.append(x)
        x = run(self.center, "center", x) + skips.pop()
        for k in reversed(range(len(self.up))):
            lvl = self.up[k]
            x = lvl.pool(x) + skips.pop()
            if self.config.unet:
                for i, blk in enumerate(lvl.blocks):
                    x = blk(x, ssms.get(f"up.{k}.blocks.{i}")) + skips.pop()
            else:
                x = run(lvl.blocks, f"up.{k}.blocks", x) + x  # the level's outer residual
        return self.head(self.norm(x[:, :L]))  # (B, L, V)

    def to_recurrent(self, **kwargs):
        """Frozen, verified recurrent form (see model.arch.sashimi_recurrent.SaShiMiRecurrent)."""
        from model.arch.sashimi_recurrent import SaShiMiRecurrent  # noqa: PLC0415

        return SaShiMiRecurrent(self, **kwargs)
