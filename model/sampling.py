"""logits → tokens, batched, with per-row settings and per-sequence generators.

Every row draws exactly one uniform number per step from its own `torch.Generator`, so a seed
reproduces a sequence whatever else is in the batch (and whatever the batch order).
"""

from __future__ import annotations

import math
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
    # OpenAI's logit processing (see `apply_logit_bias`, `apply_presence_frequency`), vLLM's min_p
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in the tokens generated so far
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one (0 → off)
    # what to report beside each token (see `token_logprobs`); None → nothing
    logprobs: int | None = None  # the sampled token's log-probability and the `logprobs` most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be ≥ 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        if not (0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not all(isinstance(t, int) and t >= 0 and math.isfinite(b) for t, b in self.logit_bias.items()):
            raise ValueError("logit_bias must map token ids ≥ 0 to finite numbers")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0 or None, got {getattr(self, name)}")

    @property
    def plain(self) -> bool:
        """Temperature sampling alone (what the fused C sampler does); anything else → the torch path."""
        return (
            self.top_k == 0
            and self.top_p == 1
            and self.repetition_penalty == 1
            and not self.logit_bias
            and self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.min_p == 0
        )

    @property
    def counts_output(self) -> bool:
        """Needs the counts of the tokens generated so far (presence/frequency penalties)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

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


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's {token id: bias} added to its logits (B, V). Ids ≥ V are the
    caller's error (the server refuses them by name)."""
    if not any(p.logit_bias for p in params):
        return logits
    bias = torch.zeros_like(logits)
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
            bias[i, ids] = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    return logits + bias


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: μ[j] − c[j]·α_frequency − [c[j] > 0]·α_presence, where c (B, V) counts the
    tokens generated so far in this completion (not the prompt); presence and frequency (B,).
    Source: platform.openai.com/docs/advanced-usage (frequency and presence penalties)."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def filter_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """vLLM's min_p: mask (to −inf) tokens whose probability is below min_p × the row's largest
    (logits (B, V) after temperature; min_p (B,), 0 → off). The most likely token always stays."""
    probs = logits.softmax(-1)
    drop = probs < min_p[:, None] * probs.amax(-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list, list]:
    """Log-probabilities under the model: log_softmax of the raw logits (B, V) (before temperature,
    penalties, bias and filtering), of `tokens` (B,), and the k most likely per row. Returns host
    lists: chosen (B,) floats, top ids (B, k) and top log-probabilities (B, k), most likely first."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0]
    if k > 0:
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        return chosen.tolist(), top_i.tolist(), top_v.tolist()
    return chosen.tolist(), [[] for _ in range(len(tokens))], [[] for _ in range(len(tokens))]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) → tokens (B,) int64 on the logits' device. `seen` (B, V) bool: the tokens in each
    row's context (repetition_penalty); `counts` (B, V) float: the tokens generated so far
    (presence/frequency penalties). On the CPU, rows with plain temperature sampling go through the
    fused C sampler and the others through torch; either way each row draws one uniform from its own
    generator, so a row's token never depends on the path or on the other rows."""
    B = logits.shape[0]
    logits = logits.float()
    lib = fused.library() if logits.device.type == "cpu" and B else None
    if lib is None:
        return _sample_torch(logits, params, generators, seen, counts)
    plain = [i for i, p in enumerate(params) if p.plain]
    if len(plain) == B:
        return _sample_fused(lib, logits, params, generators)
    if not plain:
        return _sample_torch(logits, params, generators, seen, counts)
    rest = [i for i in range(B) if i not in set(plain)]
    out = torch.empty(B, dtype=torch.long)
    pi, ri = torch.tensor(plain), torch.tensor(rest)
    out[pi] = _sample_fused(lib, logits[pi], [params[i] for i in plain], [generators[i] for i in plain])
    out[ri] = _sample_torch(
        logits[ri],
        [params[i] for i in rest],
        [generators[i] for i in rest],
        None if seen is None else seen[ri],
        None if counts is None else counts[ri],
    )
    return out


def _sample_fused(lib, logits, params, generators) -> torch.Tensor:
    """Plain temperature sampling in one C pass, the same draws as the torch path."""
    u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float32)
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    return fused.sample_rows(lib, logits.contiguous(), temp, u)


def _sample_torch(logits, params, generators, seen, counts) -> torch.Tensor:
    B = logits.shape[0]
    dev = logits.device
    logits = apply_logit_bias(logits, params)
    pen = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if seen is not None and bool((pen != 1).any()):
        logits = apply_repetition_penalty(logits, seen, pen)
    if counts is not None and any(p.counts_output for p in params):
        presence = torch.tensor([p.presence_penalty for p in params], device=dev, dtype=logits.dtype)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=dev, dtype=logits.dtype)
        logits = apply_presence_frequency(logits, counts.to(logits.dtype), presence, frequency)
    temp = torch.tensor([p.temperature for p in params], device=dev)
    greedy = temp == 0
    logits = logits / torch.where(greedy, 1.0, temp)[:, None]
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if bool((top_k > 0).any() or (top_p < 1).any()):
        logits = filter_logits(logits, top_k, top_p)
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=logits.dtype)
    if bool((min_p > 0).any()):
        logits = filter_min_p(logits, min_p)
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
