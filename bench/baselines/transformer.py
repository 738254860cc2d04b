"""A plain causal Transformer LM (pre-norm, learned positions, GELU MLP) with a preallocated KV cache:
the baseline S4 is compared against at equal parameter count, data, steps and batch (training), and
for generation speed and memory (bench.generation).

    python -m bench.baselines.transformer bench/baselines/transformer-shakespeare.toml
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

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


MATCHED = Path(__file__).parent / "transformer-shakespeare.toml"  # issue 15's baseline, matched to the S4


def matched_config(max_len: int | None = None) -> TransformerConfig:
    """The parameter-matched baseline of `checkpoints/text-shakespeare` (MATCHED's [model]: 1,978,116
    parameters at its trained 256 positions against S4's 1,977,856), its position table sized to `max_len`
    rows (a lookup: no FLOPs per token; default: the trained length, where the counts are matched)."""
    cfg = TransformerConfig(**tomllib.loads(MATCHED.read_text())["model"])
    return cfg if max_len is None else dataclasses.replace(cfg, max_len=max_len)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.up, self.down = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = cfg.dropout

    def attend(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, H // self.n_heads).permute(2, 0, 3, 1, 4)
        mask, causal = None, True  # q, k, v: (B, heads, L, d_head)
        if cache is not None:  # write this chunk's keys/values in place, attend to the filled prefix
            k, v, mask, causal = cache.write(layer, k, v)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(B, L, H))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + F.dropout(self.attend(self.norm1(x), cache, layer), self.dropout, self.training)
        x = x + F.dropout(self.down(F.gelu(self.up(self.norm2(x)))), self.dropout, self.training)
        return x


class KVCache:
    """Preallocated keys and values, (n_layers, B, heads, capacity, d_head) each, filled up to
    `length`: a decode step writes one position per layer in place and attends to a view of the
    filled prefix (no concatenation, no allocation that grows with the context)."""

    def __init__(self, cfg: TransformerConfig, batch: int, capacity: int, device=None, dtype=torch.float32):
        if capacity > cfg.max_len:
            raise ValueError(f"capacity {capacity} exceeds the model's max_len {cfg.max_len}")
        shape = (cfg.n_layers, batch, cfg.n_heads, capacity, cfg.d_model // cfg.n_heads)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled (the same for every layer once a forward pass is over)
        self._pending = 0  # positions being written by the forward pass in progress

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bytes_per_sequence(self, context: int) -> int:
        """Keys + values of one sequence holding `context` positions."""
        n_layers, _, heads, _, d_head = self.k.shape
        return 2 * n_layers * heads * context * d_head * self.k.element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, heads, L, d_head) after the filled prefix; returns the keys and values to
        attend to (views of the cache), and the attention mask and is_causal flag for SDPA."""
        L, start = k.shape[2], self.length
        if start + L > self.capacity:
            raise ValueError(f"KV cache full: {start} + {L} > capacity {self.capacity}")
        self.k[layer, :, :, start : start + L] = k
        self.v[layer, :, :, start : start + L] = v
        self._pending = L
        mask = None  # one new position (decode) sees the whole prefix; a first chunk is plain causal
        if L > 1 and start > 0:  # a later chunk: query i (at position start + i) sees keys ≤ start + i
            mask = torch.ones(L, start + L, dtype=torch.bool, device=k.device).tril(start)
        causal = L > 1 and start == 0
        return self.k[layer, :, :, : start + L], self.v[layer, :, :, : start + L], mask, causal

    def advance(self) -> None:
        self.length += self._pending
        self._pending = 0

    def fill_(self, source: KVCache, length: int | None = None) -> KVCache:
        """Copy the first `length` positions of `source` (batch 1 or the same batch) into every row."""
        n = source.length if length is None else length
        self.k[:, :, :, :n] = source.k[:, :, :, :n]
        self.v[:, :, :, :n] = source.v[:, :, :, :n]
        self.length = n
        return self


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

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens (B, L) → logits (B, L, V). With a `KVCache`, the tokens continue the cached
        sequence (positions from cache.length on) and their keys/values are added to it in place:
        prefill with L > 1, decode with L = 1."""
        B, L = tokens.shape
        offset = 0 if cache is None else cache.length
        pos = torch.arange(offset, offset + L, device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)  # (B, L, H)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance()
        return self.head(self.norm(x))  # (B, L, V)

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch, capacity or self.config.max_len, p.device, p.dtype)

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
