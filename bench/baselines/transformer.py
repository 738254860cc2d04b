"""A plain causal Transformer LM (pre-norm, learned positions, GELU MLP) with a KV cache: the
baseline S4 is compared against at equal parameter count, data, steps and batch.

    python -m bench.baselines.transformer bench/baselines/transformer-shakespeare.toml
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 1024
    dropout: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.up, self.down = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = cfg.dropout

    def attend(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None):
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # (B, heads, T, d_head) each: decode appends to it
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or L > 1, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, L, H)), (k, v)

    def forward(self, x, cache=None):
        a, cache = self.attend(self.norm1(x), cache)
        x = x + F.dropout(a, self.dropout, self.training)
        x = x + F.dropout(self.down(F.gelu(self.up(self.norm2(x)))), self.dropout, self.training)
        return x, cache


class TransformerLM(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 · layers)
            for lin in (block.proj, block.down):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        """GPT-2 initialization (N(0, 0.02) weights, zero biases): with PyTorch's defaults (unit
        embeddings) this small model stalled at 2.5 nats in our first baseline run."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @classmethod
    def from_dict(cls, d: dict) -> TransformerLM:
        return cls(TransformerConfig(**d))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, caches=None, offset: int = 0):
        """tokens (B, L) → logits (B, L, V); with `caches` (list per layer, or [None]*n for an
        empty cache) also returns the updated caches: prefill with L > 1, decode with L = 1."""
        B, L = tokens.shape
        pos = torch.arange(offset, offset + L, device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)  # (B, L, H)
        new = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, None if caches is None else caches[i])
            new.append(c)
        logits = self.head(self.norm(x))
        return logits if caches is None else (logits, new)

    def param_groups(self, lr: float, weight_decay: float, ssm_lr: float | None = None) -> list[dict]:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        ]


def main(argv: list[str] | None = None) -> None:
    from model.train import main as train_main

    train_main(argv, build_model=TransformerLM.from_dict)


if __name__ == "__main__":
    main()
