"""logits → tokens, batched, with per-row settings and per-sequence generators.

Every row draws exactly one uniform number per step from its own `torch.Generator`, so a seed
reproduces a sequence whatever else is in the batch (and whatever the batch order).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from model import fused


def check_number(
    name: str,
    value,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    integer: bool = False,
):
    """Range-check one numeric sampling setting from outside; returns it as an int (`integer`) or a
    float (so an int past 2**63 never reaches a tensor as an int).

    `value` must be a real number (an int where `integer`; never a bool), finite (no NaN, no ±inf)
    and within the given bounds (ge ≤ value, gt < value, value ≤ le; None → unbounded). Raises
    ValueError naming `name` otherwise. The server's schemas state the same bounds (server/schemas.py:
    `finite`, `count`), so HTTP gets a 422 naming the field before a SamplingParams is made."""
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    try:
        number = int(value) if integer else float(value)  # float(10**400) raises OverflowError
    except (OverflowError, TypeError, ValueError):
        number = None
    if (
        isinstance(value, bool)
        or not ok_type
        or number is None
        or (not integer and not math.isfinite(number))
    ):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    for bound, holds, words in (
        (ge, lambda b: value >= b, "≥"),
        (gt, lambda b: value > b, ">"),
        (le, lambda b: value <= b, "≤"),
    ):
        if bound is not None and not holds(bound):
            raise ValueError(f"{name} must be {words} {bound}, got {value!r}")
    return number


@dataclass
class SamplingParams:
    """One sequence's sampling settings (checked here: ValueError naming the field).

    - temperature: finite, ≥ 0. 0 is greedy (the argmax); any T > 0, however tiny (denormals
      included), draws from softmax(z / T) computed as exp((z − max z) / T), so a tiny T gives its
      mathematical limit, the argmax (uniform among exactly tied maxima), never an overflow.
    - top_k: integer ≥ 0 (0 → off); any k ≥ the vocabulary size keeps everything (also off).
    - top_p: finite, in (0, 1] (1 → off); a tiny top_p keeps only the most likely token.
    - repetition_penalty: finite, > 0 (1 → off). Where a seen token's z / p overflows (a tiny p), the
      limit is taken: those tokens alone, and the largest of their z, get all the mass.
    """

    temperature: float = 1.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    repetition_penalty: float = 1.0  # 1 → off (CTRL-style: positive logits ÷ p, negative × p)
    seed: int | None = None
    stop: list[bytes] = field(default_factory=list)  # stop sequences (token-id bytes)

    def __post_init__(self):
        self.temperature = check_number("temperature", self.temperature, ge=0)
        self.top_k = check_number("top_k", self.top_k, ge=0, integer=True)
        self.top_p = check_number("top_p", self.top_p, gt=0, le=1)
        self.repetition_penalty = check_number("repetition_penalty", self.repetition_penalty, gt=0)
        if self.seed is not None:
            self.seed = check_number("seed", self.seed, ge=0, le=2**63 - 1, integer=True)

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


NEG_INF = float("-inf")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): a seen token's logit z becomes z / p if z > 0, else z · p.

    logits (B, V) float32; seen (B, V) bool (tokens in the context); penalty (B,) float32, > 0.
    Returns (B, V) float32. Rows where some finite z / p overflows to +inf (a tiny p) take the p → 0
    limit: all their mass on the overflowed tokens with the largest z (0), the rest −inf (unless the
    row has a +inf logit of its own, which outranks every finite one: see `sanitize_logits`)."""
    p = penalty[:, None]
    up = seen & (logits > 0)
    penalized = torch.where(up, logits / p, torch.where(seen, logits * p, logits))
    over = up & torch.isposinf(penalized) & torch.isfinite(logits)  # (B, V)
    top = torch.where(over, logits, NEG_INF).amax(-1, keepdim=True)
    limit = torch.where(over & (logits == top), 0.0, NEG_INF)
    rows = over.any(-1, keepdim=True) & ~torch.isposinf(logits).any(-1, keepdim=True)
    return torch.where(rows, limit, penalized)


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) float32 → the same with a well-defined softmax in every row: NaN → −inf (never
    drawn); a row with +inf entries puts all its mass on them (they become 0, the rest −inf, the limit
    of a huge logit); a row with nothing above −inf becomes uniform (0). Row by row: one row's values
    never change another's."""
    z = torch.nan_to_num(logits, nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)
    pos = torch.isposinf(z)
    z = torch.where(pos.any(-1, keepdim=True), torch.where(pos, 0.0, NEG_INF), z)
    return torch.where(torch.isneginf(z).all(-1, keepdim=True), 0.0, z)


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(z − max z) / T per row, in float64 (no float32 logit difference overflows there, and every
    finite T > 0 is exact): logits (B, V) float32 sanitized (see `sanitize_logits`), temperature (B,)
    float64 > 0 → (B, V) float32 in [−inf, 0], the row maxima exactly 0, −inf kept."""
    z = logits.double()
    top = z.amax(-1, keepdim=True)
    scaled = (z - top) / temperature[:, None]
    return torch.where(z == top, 0.0, torch.where(torch.isneginf(z), NEG_INF, scaled)).float()


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, rank_by: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask (to −inf) all but the top_k largest and the smallest set with mass ≥ top_p (per row).
    logits (B, V) float32 with a finite maximum per row; top_k (B,) int64 (0 → off; ≤ V);
    top_p (B,) float32 in [0, 1] (a top_p rounded to 0 keeps the top token only). `rank_by` (B, V):
    the values that order the tokens (default: logits), e.g. the logits before a temperature whose
    division rounds distinct values together; equal values rank by token id (as argmax does)."""
    V = logits.shape[-1]
    _, order = (logits if rank_by is None else rank_by).sort(dim=-1, descending=True, stable=True)
    sorted_logits = logits.gather(-1, order)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = rank >= k
    probs = sorted_logits.masked_fill(drop, NEG_INF).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep token i while the mass before it is < top_p
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, NEG_INF))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) (any float dtype, any device; NaN/±inf allowed, see `sanitize_logits`) → tokens
    (B,) int64 on the logits' device, each in [0, V).

    Per row: repetition penalty (when `seen`, (B, V) bool, is given) → temperature (T = 0: argmax) →
    top-k → top-p → one uniform from the row's generator, inverted through the CDF. Rows with plain
    temperature on the CPU take one C pass (model/csrc/ssm_step.c `sample_rows`: the same arithmetic
    and the same draws). Every row draws exactly one uniform, so a seed reproduces a sequence whatever
    else is in the batch."""
    B, V = logits.shape
    dev = logits.device
    logits = logits.float()
    if (
        dev.type == "cpu"
        and B
        and all((p.top_k == 0 or p.top_k >= V) and p.top_p == 1 and p.repetition_penalty == 1 for p in params)
    ):
        lib = fused.library()
        if lib is not None:  # plain temperature sampling in one C pass, the same draws
            u = torch.tensor([float(torch.rand((), generator=g)) for g in generators], dtype=torch.float32)
            temp = torch.tensor([p.temperature for p in params], dtype=torch.float64)
            return fused.sample_rows(lib, logits.contiguous(), temp, u)
    pen = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if seen is not None and bool((pen != 1).any()):
        logits = apply_repetition_penalty(logits, seen, pen)
    z = sanitize_logits(logits)
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float64, device=dev)
    greedy = temp == 0
    logits = scale_logits(z, torch.where(greedy, 1.0, temp))
    top_k = torch.tensor([min(p.top_k, V) for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if bool((top_k > 0).any() or (top_p < 1).any()):  # ranked before the temperature (a huge T ties all)
        logits = filter_logits(logits, top_k, top_p, rank_by=z)
    probs = logits.softmax(-1)
    u = torch.stack([torch.rand((), generator=g, device=g.device).to(dev) for g in generators])
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp_(max=V - 1)
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
