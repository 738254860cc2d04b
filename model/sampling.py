"""logits → tokens, batched, with per-row settings and per-sequence generators.

Every row draws exactly one uniform number per step from its own `torch.Generator`, so a seed
reproduces a sequence whatever else is in the batch (and whatever the batch order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model import fused


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    repetition_penalty: float = 1.0  # 1 → off (CTRL-style: positive logits ÷ p, negative × p)
    seed: int | None = None
    stop: list[bytes] = field(default_factory=list)  # stop sequences (token-id bytes)

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool (tokens in the context); penalty (B,)."""
    p = penalty[:, None]
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to −inf) all but the top_k largest and the smallest set with mass ≥ top_p (per row)."""
    V = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep token i while the mass before it is < top_p
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) → tokens (B,) int64 on the logits' device."""
    B = logits.shape[0]
    dev = logits.device
    logits = logits.float()
    if (
        dev.type == "cpu"
        and B
        and all(p.top_k == 0 and p.top_p == 1 and p.repetition_penalty == 1 for p in params)
    ):
        lib = fused.library()
        if lib is not None:  # plain temperature sampling in one C pass, the same draws
            u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float32)
            temp = torch.tensor([p.temperature for p in params], dtype=torch.float32)
            return fused.sample_rows(lib, logits.contiguous(), temp, u)
    pen = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if seen is not None and bool((pen != 1).any()):
        logits = apply_repetition_penalty(logits, seen, pen)
    temp = torch.tensor([p.temperature for p in params], device=dev)
    greedy = temp == 0
    logits = logits / torch.where(greedy, 1.0, temp)[:, None]
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if bool((top_k > 0).any() or (top_p < 1).any()):
        logits = filter_logits(logits, top_k, top_p)
    probs = logits.softmax(-1)
    u = torch.stack([torch.rand((), generator=g, device=g.device).to(dev) for g in generators])
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return torch.where(greedy, logits.argmax(-1), drawn) if B else drawn


def find_stop(output: bytes, stops: list[bytes], new: int) -> int | None:
    """Index where the first stop sequence starts in `output`, looking only at matches that end in
    the last `new` bytes (incremental check); None if no stop sequence has appeared."""
    best = None
    for s in stops:
        if not s:
            continue
        start = max(0, len(output) - new - len(s) + 1)
        i = output.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
