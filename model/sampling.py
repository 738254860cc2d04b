"""logits → tokens, batched, with per-row settings and per-sequence generators.

Every row draws exactly one uniform number per step from its own generator, so a seed reproduces a
sequence whatever else is in the batch (and whatever the batch order). `SamplingParams.generator`
gives a counter-based one (`CounterRNG`, Philox4x32-10): the n-th token's uniform is a pure function
of (seed, n), the same in Python, in the C sampler and in the C decode block (model/csrc/ssm_step.c).
A `torch.Generator` is still accepted wherever a generator is.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field

import torch

from model import fused

F32_MAX = float(torch.finfo(torch.float32).max)  # a penalty the float32 sampler can hold


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
    - repetition_penalty: > 0 and at most float32's largest value (1 → off; the sampler holds it in
      float32, where a larger one was inf and a seen logit of 0 became 0 × inf, a NaN). Where a seen
      token's z / p overflows (a tiny p), the limit is taken: those tokens alone, and the largest of their
      z, get all the mass.
    - seed: integer in [0, 2^64): the generator's 64-bit Philox key. Our own routes take [0, 2^63); the
      OpenAI routes take OpenAI's int64 range and key a negative seed s with s + 2^64.
    """

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
        self.temperature = check_number("temperature", self.temperature, ge=0)
        self.top_k = check_number("top_k", self.top_k, ge=0, integer=True)
        self.top_p = check_number("top_p", self.top_p, gt=0, le=1)
        self.repetition_penalty = check_number(
            "repetition_penalty", self.repetition_penalty, gt=0, le=F32_MAX
        )
        if self.seed is not None:
            self.seed = check_number("seed", self.seed, ge=0, le=2**64 - 1, integer=True)
        # (float32's range: the sampler holds them in float32, where 1e39 was inf, and 0 × inf a NaN for
        # every token not yet generated: the row went uniform, the penalised tokens included)
        for name in ("presence_penalty", "frequency_penalty"):
            setattr(self, name, check_number(name, getattr(self, name), ge=-F32_MAX, le=F32_MAX))
        self.min_p = check_number("min_p", self.min_p, ge=0, le=1)
        self.logit_bias = {
            check_number("logit_bias (a token id)", t, ge=0, integer=True): check_number("logit_bias", b)
            for t, b in self.logit_bias.items()
        }
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, check_number(name, getattr(self, name), ge=0, integer=True))
        if isinstance(self.stop, (str, bytes)) or not all(isinstance(s, bytes) for s in self.stop):
            raise ValueError(f"stop must be a list of bytes (each a run of token ids), got {self.stop!r}")
        self.stop = list(self.stop)

    def plain(self, vocab_size: int) -> bool:
        """Temperature sampling alone (what the fused C sampler does); anything else → the torch path."""
        return (
            (self.top_k == 0 or self.top_k >= vocab_size)
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

    def generator(self, device: str | torch.device = "cpu") -> CounterRNG:
        """This sequence's random stream: keyed by `seed` (a random 64-bit key when None), at index 0."""
        return CounterRNG(secrets.randbits(64) if self.seed is None else int(self.seed), device=device)


# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011; Random123's
# constants and round order), as model/csrc/ssm_step.c computes it
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """The Philox4x32-10 block of a 128-bit counter (4 uint32 words) under a 64-bit key (2 words)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = PHILOX_M[0] * c0, PHILOX_M[1] * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _U32, (p0 >> 32) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + PHILOX_W[0]) & _U32, (k1 + PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def philox_uniform(key: int, n: int) -> float:
    """Uniform number n (0 ≤ n < 2⁶⁴) of the stream keyed by `key` (0 ≤ key < 2⁶⁴): counter (n, 0),
    the first output word's top 24 bits × 2⁻²⁴, a float32 in [0, 1)."""
    w = philox4x32_10((n & _U32, n >> 32, 0, 0), (key & _U32, key >> 32))[0]
    return (w >> 8) * 2.0**-24


def philox_uniforms_torch(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`philox_uniform` of every (key, counter) pair in torch int64 ops on the tensors' device (no host
    round trip: for a batch whose streams live on a GPU). keys, counters (B,) int64 holding uint64 bit
    patterns (`uint64_bits`) → (B,) float32 in [0, 1), bit for bit the numbers of `philox_uniform` and
    of the C sampler. The 32 × 32-bit products wrap in int64 and keep their low 64 bits, which are all
    Philox uses (the high word through an arithmetic shift and a mask)."""
    mask = _U32
    c0, c1 = counters & mask, (counters >> 32) & mask
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = keys & mask, (keys >> 32) & mask
    for _ in range(10):
        p0, p1 = c0 * PHILOX_M[0], c2 * PHILOX_M[1]
        c0, c1, c2, c3 = ((p1 >> 32) & mask) ^ c1 ^ k0, p1 & mask, ((p0 >> 32) & mask) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + PHILOX_W[0]) & mask, (k1 + PHILOX_W[1]) & mask
    return (c0 >> 8).to(torch.float32) * 2.0**-24


def counter_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """`philox_uniform` of every (key, counter) pair: keys and counters int64 holding uint64 bit patterns
    (`uint64_bits`), of one shape, on the host → float32 of that shape, in one C call when the library is
    built, else by `philox_uniforms_torch` (the same numbers, bit for bit)."""
    lib = fused.library()
    if lib is None or not keys.numel():
        return philox_uniforms_torch(keys, counters)
    flat = fused.philox_uniforms(lib, keys.contiguous().flatten(), counters.contiguous().flatten())
    return flat.view(keys.shape)


class CounterRNG:
    """A counter-based random stream: uniform number n is `philox_uniform(key, n)`, so the stream is
    a pure function of (key, index): it can be advanced in bulk (the C decode block draws the next
    numbers itself and the caller adds how many it used to `counter`). `device`: where `sample` puts
    the numbers (they are computed on the host). Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel
    random numbers: as easy as 1, 2, 3", SC 2011). Raises ValueError unless key and counter are integers
    in [0, 2^64) (a float key failed later, at the first draw)."""

    def __init__(self, key: int, counter: int = 0, device: str | torch.device = "cpu") -> None:
        ints = all(hasattr(v, "__index__") and not isinstance(v, bool) for v in (key, counter))
        if not (ints and 0 <= key < 2**64 and 0 <= counter < 2**64):
            raise ValueError(f"key and counter must be integers in [0, 2**64), got {key!r}, {counter!r}")
        key, counter = key.__index__(), counter.__index__()
        self.key, self.counter, self.device = key, counter, torch.device(device)

    def uniform(self) -> float:
        """The next number, a float in [0, 1), and the counter advanced by one."""
        u = philox_uniform(self.key, self.counter)
        self.counter += 1
        return u


def uint64_bits(values: list[int]) -> torch.Tensor:
    """uint64 values as int64 bit patterns (the C side reads them as uint64)."""
    return torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.long)


def uniforms(generators: list) -> torch.Tensor:
    """One uniform number from each generator (a CounterRNG or a torch.Generator), (B,) float32 on
    the CPU; counter-based ones alone by `counter_uniforms` (one C call when the library is built)."""
    if generators and all(isinstance(g, CounterRNG) for g in generators):
        counters = []
        for g in generators:  # in order: a generator listed twice gives two successive numbers
            counters.append(g.counter)
            g.counter += 1
        return counter_uniforms(uint64_bits([g.key for g in generators]), uint64_bits(counters))
    return torch.tensor(
        [
            g.uniform() if isinstance(g, CounterRNG) else float(torch.rand((), generator=g, device=g.device))
            for g in generators
        ],
        dtype=torch.float32,
    )


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
    # elsewhere an overflowed z / p stays a finite number (the largest float32), which a +inf logit outranks
    return torch.where(rows, limit, torch.where(over, F32_MAX, penalized))


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
    top_p (B,) float32 in [0, 1] (1 → off; a top_p rounded to 0 keeps the top token only). `rank_by` (B, V):
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
    # (top_p = 1 is off: the float32 sum passes 1 before the tail, and dropped it in every row of a batch
    # in which any row filters)
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, NEG_INF))


def bias_matrix(params: list[SamplingParams], V: int) -> torch.Tensor | None:
    """The rows' logit_bias as a (B, V) float32 host tensor ({token id: bias} per row, 0 elsewhere), or
    None when no row has one. Raises IndexError for an id ≥ V (the server refuses them by name)."""
    if not any(p.logit_bias for p in params):
        return None
    bias = torch.zeros(len(params), V)
    for i, p in enumerate(params):
        if p.logit_bias:
            bias[i, torch.tensor(list(p.logit_bias))] = torch.tensor(
                list(p.logit_bias.values()), dtype=torch.float32
            )
    return bias


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's {token id: bias} added to its logits (B, V). Ids ≥ V are the
    caller's error (the server refuses them by name)."""
    bias = bias_matrix(params, logits.shape[-1])
    return logits if bias is None else logits + bias.to(device=logits.device, dtype=logits.dtype)


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


MAX_LOGPROBS = 20  # the most likely tokens an API request may ask for beside each token (OpenAI's limit);
# what the decode blocks of the CUDA graphs report at most


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list, list]:
    """Log-probabilities under the model: log_softmax of the raw logits (B, V) (before temperature,
    penalties, bias and filtering), of `tokens` (B,), and the k most likely per row. Returns host
    lists: chosen (B,) floats, top ids (B, k) and top log-probabilities (B, k), most likely first.
    On the CPU with the C library: the native decode block's own computation (`fused.logprobs_rows`: the
    normalizer in double, ties the smaller id first), so a row's log-probabilities are the same bits
    whether it decoded in a block or step by step (a word-level model's rows with stop sequences take
    steps, and take the batch with them); elsewhere torch's log_softmax and topk (float32 rounding apart,
    ties in any order)."""
    lib = fused.library() if logits.device.type == "cpu" and logits.shape[0] else None
    if lib is not None:
        return fused.logprobs_rows(lib, logits.float().contiguous(), tokens, k)
    return token_logprobs_torch(logits, tokens, k)


def token_logprobs_torch(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[list, list, list]:
    """`token_logprobs` by torch's log_softmax and topk, on any device: the CUDA graphs' decode block
    computes these ops (model/cuda_graphs.py)."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, tokens[:, None].to(lp.device))[:, 0]
    if k > 0:
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        return chosen.tolist(), top_i.tolist(), top_v.tolist()
    return chosen.tolist(), [[] for _ in range(len(tokens))], [[] for _ in range(len(tokens))]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) (any float dtype, any device; NaN/±inf allowed, see `sanitize_logits`) → tokens
    (B,) int64 on the logits' device, each in [0, V).

    Per row: logit_bias → repetition penalty (when `seen`, (B, V) bool: the tokens in the row's
    context) → presence/frequency penalties (when `counts`, (B, V) float: the tokens generated so far)
    → temperature (T = 0: argmax) → top-k → top-p → min_p → one uniform from the row's generator,
    inverted through the CDF. On the CPU every row takes one C pass (model/csrc/ssm_step.c
    `sample_rows_full`: the same steps and limits; the plain-temperature rows with the torch ops'
    arithmetic, the others with their softmax sums in double), which is also the native decode
    block's sampler; elsewhere, or without the C library, the torch ops. Every row draws exactly one
    uniform from its own generator, so a row's token does not depend on the other rows, and a seed
    reproduces a sequence whatever the batch. Raises ValueError unless logits is 2-D with one entry of
    `params` and of `generators` (CounterRNG or torch.Generator) per row, each row's logit_bias ids are
    below V, and `seen`/`counts`, when given, are (B, V) on the logits' device."""
    if logits.dim() != 2 or logits.shape[1] == 0:  # (V = 0 gave token 0, outside [0, V))
        raise ValueError(f"logits must be (B, V) with V ≥ 1, got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"one SamplingParams and one generator per row: {B} rows, got {len(params)} params "
                         f"and {len(generators)} generators")  # fmt: skip
    for name, t in (("seen", seen), ("counts", counts)):  # (another device's reached the C pass as a pointer)
        if t is not None and (tuple(t.shape) != (B, V) or t.device != logits.device):
            raise ValueError(f"{name} must be (B, V) = ({B}, {V}) on the logits' device ({logits.device}), "
                             f"got {tuple(t.shape)} on {t.device}")  # fmt: skip
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not isinstance(g, (CounterRNG, torch.Generator)):
            raise ValueError(f"generators[{i}] must be a CounterRNG (SamplingParams.generator) or a "
                             f"torch.Generator, got {type(g).__name__}")  # fmt: skip
        if p.logit_bias and max(p.logit_bias) >= V:
            raise ValueError(f"params[{i}].logit_bias names token id {max(p.logit_bias)}: the vocabulary has "
                             f"{V} (ids 0 … {V - 1})")  # fmt: skip
    logits = logits.float()
    lib = fused.library() if logits.device.type == "cpu" and B else None
    if lib is None:
        return _sample_torch(logits, params, generators, seen, counts)
    settings = row_settings(params, V, seen is not None, counts is not None)
    seen_c = seen.contiguous() if settings.penalized else None
    counts_c = counts.float().contiguous() if settings.counted else None
    return fused.sample_rows_full(lib, logits.contiguous(), settings, seen_c, counts_c, uniforms(generators))


def row_settings(params: list[SamplingParams], V: int, seen: bool = True, counts: bool = True):
    """The rows' settings as the C sampler reads them (fused.RowSettings), rounded as the torch ops
    round them (float32 tensors). `seen`/`counts`: whether those inputs will be given. Raises
    IndexError for a logit_bias id ≥ V, as the torch ops do."""
    f32 = torch.float32
    return fused.RowSettings(
        temperature=torch.tensor([p.temperature for p in params], dtype=torch.float64),
        top_k=torch.tensor([min(p.top_k, V) for p in params], dtype=torch.long),
        kind=torch.tensor([0 if p.plain(V) else 1 for p in params], dtype=torch.long),
        top_p=torch.tensor([p.top_p for p in params], dtype=f32),
        min_p=torch.tensor([p.min_p for p in params], dtype=f32),
        repetition_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=f32),
        presence_penalty=torch.tensor([p.presence_penalty for p in params], dtype=f32),
        frequency_penalty=torch.tensor([p.frequency_penalty for p in params], dtype=f32),
        bias=bias_matrix(params, V),
        penalized=seen and any(p.repetition_penalty != 1 for p in params),
        counted=counts and any(p.counts_output for p in params),
    )


@dataclass
class RowTensors:
    """Per-row sampling settings as tensors on one device, and which optional steps any row needs
    (decided on the host from the params: no device sync). Made by `row_tensors`."""

    temperature: torch.Tensor  # (B,) float64; 0 for greedy rows is replaced by 1 (see `greedy`)
    greedy: torch.Tensor  # (B,) bool
    top_k: torch.Tensor  # (B,) int64, ≤ V
    top_p: torch.Tensor  # (B,) float32
    min_p: torch.Tensor  # (B,) float32
    penalty: torch.Tensor  # (B,) float32 (repetition)
    presence: torch.Tensor  # (B,) float32
    frequency: torch.Tensor  # (B,) float32
    bias: torch.Tensor | None  # (B, V) float32, or None when no row has a logit_bias
    any_penalty: bool
    any_counted: bool
    any_filter: bool  # top-k or top-p
    any_min_p: bool


def row_tensors(params: list[SamplingParams], V: int, device: str | torch.device) -> RowTensors:
    """The rows' settings for the torch sampler on `device`: `row_settings`' tensors (the C sampler's,
    rounded as the torch ops round them), copied there once; the flags from those float32 values (a
    top_p of 1 - 1e-9 rounds to 1: no filter, as the ops would find)."""
    return settings_tensors(row_settings(params, V), device)


def settings_tensors(s, device: str | torch.device) -> RowTensors:
    """`row_tensors` from the rows' settings as the C sampler reads them (`row_settings`, host tensors):
    the same tensors on `device`, the same flags."""
    greedy = s.temperature == 0
    return RowTensors(
        temperature=torch.where(greedy, 1.0, s.temperature).to(device),
        greedy=greedy.to(device),
        top_k=s.top_k.to(device),
        top_p=s.top_p.to(device),
        min_p=s.min_p.to(device),
        penalty=s.repetition_penalty.to(device),
        presence=s.presence_penalty.to(device),
        frequency=s.frequency_penalty.to(device),
        bias=None if s.bias is None else s.bias.to(device),
        any_penalty=bool((s.repetition_penalty != 1).any()),
        any_counted=s.counted,
        any_filter=bool((s.top_k > 0).any() or (s.top_p < 1).any()),
        any_min_p=bool((s.min_p > 0).any()),
    )


def sample_with(logits: torch.Tensor, rows: RowTensors, u: torch.Tensor, seen: torch.Tensor | None = None,
                counts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The torch sampler's steps (see `sample`) for logits (B, V) float32 with the rows' settings
    `rows` and one uniform per row `u` (B,) float32, all on one device → tokens (B,) int64 there.
    No host sync: the optional steps are chosen by `rows`' host flags."""
    B, V = logits.shape
    if rows.bias is not None:
        logits = logits + rows.bias
    if seen is not None and rows.any_penalty:
        logits = apply_repetition_penalty(logits, seen, rows.penalty)
    if counts is not None and rows.any_counted:
        logits = apply_presence_frequency(logits, counts.to(logits.dtype), rows.presence, rows.frequency)
    z = sanitize_logits(logits)
    logits = scale_logits(z, rows.temperature)
    if rows.any_filter:  # ranked before the temperature (a huge T ties all)
        logits = filter_logits(logits, rows.top_k, rows.top_p, rank_by=z)
    if rows.any_min_p:
        logits = filter_min_p(logits, rows.min_p)
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    # the first token whose CDF reaches u · total and whose own probability adds to it (as the C
    # sampler): at u = 0 a leading zero-probability token is never drawn
    added = torch.diff(cdf, dim=-1, prepend=torch.zeros_like(cdf[:, :1])) > 0
    ok = (cdf >= (u * cdf[:, -1])[:, None]) & added
    drawn = torch.where(ok.any(-1), ok.int().argmax(-1), V - 1)
    return torch.where(rows.greedy, logits.argmax(-1), drawn) if B else drawn


def _sample_torch(logits, params, generators, seen, counts) -> torch.Tensor:
    rows = row_tensors(params, logits.shape[1], logits.device)
    return sample_with(logits, rows, uniforms(generators).to(logits.device), seen, counts)


class RowSampler:
    """`sample` for a fixed set of rows whose settings stay on the device: they are copied there once
    (`row_tensors`), and each step draws the rows' uniforms in one call from (key, counter) arrays
    kept on the host (the C library's Philox, else `philox_uniforms_torch` there), advances the
    counters there, and sends the uniforms over in one copy. So a step costs no per-row Python, no
    host sync and one host-to-device copy before the tokens come back. The same tokens as `sample`
    with the same generators, bit for bit: the same uniforms, the same torch ops.

    (The uniforms are not drawn on the device: Philox's 10 rounds in torch ops are ~200 small ops, which
    cost more than the one copy: `bench.sampler`'s "uniforms in torch ops".)

    generators: one CounterRNG per row (a row listed twice is refused: its two draws would be one).
    `sync()` writes the counters back into the generators; call it before the rows change or their
    generators are used elsewhere. Raises TypeError for a generator that is not a CounterRNG, ValueError
    for a length mismatch or a repeated generator."""

    def __init__(self, params: list[SamplingParams], generators: list, V: int, device: str | torch.device):
        if len(params) != len(generators):
            raise ValueError(
                f"one SamplingParams per generator: {len(params)} params, {len(generators)} generators"
            )
        if not all(isinstance(g, CounterRNG) for g in generators):
            raise TypeError("RowSampler needs a CounterRNG per row (SamplingParams.generator)")
        if len({id(g) for g in generators}) != len(generators):
            raise ValueError("a generator appears in two rows: each row needs its own stream")
        self.generators = list(generators)
        self.device = torch.device(device)
        self.rows = row_tensors(params, V, self.device)
        self.keys = uint64_bits([g.key for g in generators])  # host, int64 bit patterns
        self.counters = uint64_bits([g.counter for g in generators])
        self.steps = 0  # draws since the last sync

    def uniforms(self) -> torch.Tensor:
        """The rows' next uniform numbers (B,) float32 on the host; advances the counters."""
        u = counter_uniforms(self.keys, self.counters)
        self.counters += 1  # int64 wraps as uint64 does (2^64 draws are out of reach anyway)
        self.steps += 1
        return u

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """logits (B, V) of this sampler's B rows (any float dtype, on its device) → tokens (B,) int64."""
        if logits.dim() != 2 or logits.shape[0] != len(self.generators):
            raise ValueError(f"logits must be ({len(self.generators)}, V), got shape {tuple(logits.shape)}")
        u = self.uniforms()
        if self.device.type != "cpu":
            u = u.pin_memory().to(self.device, non_blocking=True)
        return sample_with(logits.float(), self.rows, u, seen, counts)

    def sync(self) -> None:
        """Each generator's counter := this sampler's (the draws made here count as its own)."""
        if self.steps:
            for g, c in zip(self.generators, self.counters.tolist()):
                g.counter = c % 2**64
            self.steps = 0


def first_stop_end(history: bytes, new: bytes, stops: list[bytes]) -> int | None:
    """The fewest of the `new` bytes after which `history` + them ends with one of `stops` (a match that
    ends within `new`; empty stops never match), or None: where a row that checks its stops after every
    token stops (`find_stop`). The CUDA graphs' decode block checks a row's block of tokens with it."""
    output, best = history + new, None
    for s in stops:
        if not s:
            continue
        i = output.find(s, max(0, len(history) - len(s) + 1))
        if i != -1:
            end = i + len(s) - len(history)
            best = end if best is None else min(best, end)
    return best


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
