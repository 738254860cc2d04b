"""Adaptive input embeddings and the adaptive softmax, for word-level vocabularies.

The vocabulary is cut into shards by `cutoffs` (ids are frequency-ordered: shard 0 holds the most
frequent words): shard i holds ids [c_i, c_{i+1}), with c_0 = 0 and a last bound of V.

- Input (Baevski & Auli, "Adaptive Input Representations for Neural Language Modeling", 2019): a
  token of shard i is looked up in that shard's table of width d_i = H / div_val^i and projected to H
  by P_i (H, d_i). With div_val 1 there is one (V, H) table and no projection.
- Output (Grave et al., "Efficient softmax approximation for GPUs", 2017; the projected form of
  Transformer-XL, Dai et al. 2019): a head softmax over shard 0's words and one entry per tail cluster;
  a word of tail shard i has log p = log p_head(cluster i) + log p_i(word), p_i a softmax over its
  shard from the hidden state projected to d_i.

The layout and conventions are those of state-spaces/s4 (`src/models/nn/adaptive_softmax.py`, the
`adaptivelm` task of its WikiText-103 experiment), read for facts only: the head's cluster entries
are its last n_clusters columns, tail shard i taking column −i (so the last cluster row serves shard
1); the tail shards' projections may be the embedding's (`tie_projs`), and their weights the
embedding's tables (`tie_embeddings`); the embedding is scaled by √H outside this module
(`ModelConfig.embed_scale`). `AdaptiveLogSoftmax` returns the full (…, V) log-probabilities, which the
rest of the stack takes as logits: softmax(log p) = p, so sampling, log-probabilities and perplexity
are the distribution's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shard_bounds(vocab_size: int, cutoffs: list[int]) -> list[tuple[int, int]]:
    """[(c_i, c_{i+1})]: the id range of each shard (cutoffs strictly increasing in (0, V))."""
    ends = [0, *cutoffs, vocab_size]
    return list(zip(ends[:-1], ends[1:], strict=True))


def shard_widths(d_model: int, n_shards: int, div_val: int) -> list[int]:
    """d_i = d_model // div_val^i: each shard's embedding width (all d_model when div_val is 1)."""
    return [d_model // div_val**i for i in range(n_shards)]


class AdaptiveEmbedding(nn.Module):
    """tokens (…) int64, ids in [0, V) → (…, H) in the weights' dtype: shard i's table row, projected
    by P_i (div_val > 1). Every shard is looked up for every token (ids clamped into its range) and
    the token's own shard is kept by `torch.where`: no data-dependent shapes, so it runs inside CUDA
    graphs and costs Σ d_i·H multiply-adds a token, small beside the network."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: list[int], div_val: int):
        super().__init__()
        self.bounds = shard_bounds(vocab_size, cutoffs) if div_val > 1 else [(0, vocab_size)]
        widths = shard_widths(d_model, len(self.bounds), div_val)
        self.layers = nn.ModuleList(
            nn.Embedding(r - l, d) for (l, r), d in zip(self.bounds, widths, strict=True)
        )
        self.projs = nn.ParameterList(
            nn.Parameter(torch.empty(d_model, d)) for d in (widths if div_val > 1 else [])
        )
        for table, d in zip(self.layers, widths, strict=True):
            nn.init.normal_(table.weight, std=d**-0.5)
        for p in self.projs:
            nn.init.normal_(p, std=d_model**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if len(self.layers) == 1:
            return self.layers[0](tokens)
        out = None
        for i, ((lo, hi), table) in enumerate(zip(self.bounds, self.layers, strict=True)):
            e = F.linear(table((tokens - lo).clamp(0, hi - lo - 1)), self.projs[i])  # (…, H)
            out = e if out is None else torch.where(((tokens >= lo) & (tokens < hi)).unsqueeze(-1), e, out)
        return out


class AdaptiveLogSoftmax(nn.Module):
    """hidden (…, H) → log-probabilities (…, V) in its dtype (they sum to 1 over V).

    Parameters: `cluster_weight` (n_clusters, H) and `cluster_bias` (n_clusters,), the head's cluster
    entries; per shard i a bias `biases.i` (n_i,), a weight `weights.i` (n_i, d_i) unless tied to the
    embedding's table (div_val 1: the rows [c_i, c_{i+1}) of its one table), and with div_val > 1 a
    projection `projs.i` (H, d_i) unless `tie_projs[i]` (then the embedding's P_i). The hidden state is
    projected by hidden @ P_i, the transpose of the embedding's use of P_i.

    The embedding is held unregistered (tied tensors are read from it, not stored twice, so a state
    dict has each tensor once); `copy.deepcopy` and `.to()` of the whole network keep the tie."""

    def __init__(self, vocab_size: int, d_model: int, cutoffs: list[int], div_val: int,
                 tie_weights: bool, tie_projs: list[bool] | None, embed: AdaptiveEmbedding):  # fmt: skip
        super().__init__()
        self.bounds = shard_bounds(vocab_size, cutoffs)
        self.div_val = div_val
        n = len(self.bounds)
        widths = shard_widths(d_model, n, div_val)
        self.tie_weights = tie_weights
        self.tie_projs = list(tie_projs) if tie_projs is not None else [False] * n
        self.__dict__["embed"] = embed  # not a submodule: the embedding's own parameters stay its own
        self.cluster_weight = nn.Parameter(torch.zeros(n - 1, d_model))
        self.cluster_bias = nn.Parameter(torch.zeros(n - 1))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(r - l)) for l, r in self.bounds)
        self.weights = nn.ParameterDict()
        self.projs = nn.ParameterDict()
        for i, ((lo, hi), d) in enumerate(zip(self.bounds, widths, strict=True)):
            if not tie_weights:
                self.weights[str(i)] = nn.Parameter(torch.randn(hi - lo, d) * d**-0.5)
            if div_val > 1 and not self.tie_projs[i]:
                self.projs[str(i)] = nn.Parameter(torch.randn(d_model, d) * d_model**-0.5)

    def shard(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shard i's output weight (n_i, d_i) and projection (H, d_i) or None."""
        if not self.tie_weights:
            w = self.weights[str(i)]
        elif self.div_val > 1:
            w = self.embed.layers[i].weight
        else:
            lo, hi = self.bounds[i]
            w = self.embed.layers[0].weight[lo:hi]
        if self.div_val == 1:
            return w, None
        return w, self.embed.projs[i] if self.tie_projs[i] else self.projs[str(i)]

    def _logits(self, hidden: torch.Tensor, i: int, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        proj = self.shard(i)[1]
        return F.linear(hidden if proj is None else hidden @ proj, w, b)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # the head's logits: shard 0's words, then the clusters' entries, both of the projected hidden state
        # (two products and a cat of their logits: a cat of the weights copied shard 0's table, 82 MB for
        # the WikiText-103 recipe, at every call: the head took 30.6 ms at batch 1, 7.5 ms now)
        w0, proj = self.shard(0)
        h0 = hidden if proj is None else hidden @ proj
        clusters = F.linear(h0, self.cluster_weight, self.cluster_bias)
        logits = torch.cat([F.linear(h0, w0, self.biases[0]), clusters], dim=-1)
        head = F.log_softmax(logits, dim=-1)  # (…, n_0 + n_clusters)
        n0 = self.bounds[0][1]
        parts = [head[..., :n0]]
        for i in range(1, len(self.bounds)):
            tail = F.log_softmax(self._logits(hidden, i, self.shard(i)[0], self.biases[i]), dim=-1)
            parts.append(head[..., -i : head.shape[-1] - i + 1] + tail)  # column −i: cluster i's log p
        return torch.cat(parts, dim=-1)
