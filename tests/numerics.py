"""Helpers shared by the numerical tests (imported like server_support)."""

import torch


def step_all(rec, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens (B, L) one step at a time: logits (B, L, V) and the final state."""
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state


def real_system_with_eigenvalues(H: int, pairs: list[tuple[float, float]], reals: list[float], seed: int):
    """Random real systems (Ā, B̄, γ) float64 (H, N, N), (H, N), (H, N) whose Ā has the given complex
    eigenvalue pairs r·e^{±iθ} and real eigenvalues, in a random basis (V + 3I, well conditioned)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    N = 2 * len(pairs) + len(reals)
    J = torch.zeros(N, N, dtype=f64)
    for j, (r, th) in enumerate(pairs):
        c, s = r * torch.tensor(th, dtype=f64).cos(), r * torch.tensor(th, dtype=f64).sin()
        J[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    for j, lam in enumerate(reals):
        J[2 * len(pairs) + j, 2 * len(pairs) + j] = lam
    V = torch.randn(H, N, N, generator=g, dtype=f64) + 3 * torch.eye(N, dtype=f64)
    Abar = V @ J @ torch.linalg.inv(V)
    return Abar, torch.randn(H, N, generator=g, dtype=f64), torch.randn(H, N, generator=g, dtype=f64)


def scramble_transposed_lns(net: torch.nn.Module, seed: int = 0) -> int:
    """Draw every scalar TransposedLN's m in [−1, 1] and s in [0.5, 2], far from their initial 0 and 1 (as
    training leaves them), so a path that drops either differs; returns how many norms it drew."""
    from model.norms import TransposedLN

    g = torch.Generator().manual_seed(seed)
    norms = [m for m in net.modules() if isinstance(m, TransposedLN)]
    with torch.no_grad():
        for m in norms:
            m.m.copy_(torch.rand(1, generator=g) * 2 - 1)
            m.s.copy_(torch.rand(1, generator=g) * 1.5 + 0.5)
    return len(norms)


# every sampling setting (model.sampling.SamplingParams fields) the samplers handle, alone and together
SAMPLING_FILTERS = [
    {},
    {"top_k": 5},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"repetition_penalty": 1.5},
    {"presence_penalty": 0.8, "frequency_penalty": 0.3},
    {"logit_bias": {3: 5.0, 7: -100.0}},
    {"top_k": 20, "top_p": 0.9, "min_p": 0.02, "repetition_penalty": 0.7, "frequency_penalty": -0.2},
]


def same_top_logprobs(ids: list, vals: list[float], want_ids: list, want_vals: list[float],
                      tol: float) -> bool:  # fmt: skip
    """Two top-k log-probability lists (most likely first) agree up to the order of tied values: the values
    position by position within `tol`, the ids distinct, and an id differs from the reference's only where
    the value the reference gives it ties (within `tol`) with the reference's value at that place (not
    among the reference's k: with its last value, a tie across the k-th place). The C block ranks by the
    raw logits, torch.topk by the rounded log-probabilities in an unspecified order among equal ones
    (measured: 1 equal adjacent pair in 3,200 tiny-model rows' top 20)."""
    if len(ids) != len(want_ids) or len(set(ids)) != len(ids):
        return False
    if any(abs(a - b) > tol for a, b in zip(vals, want_vals)):
        return False
    ref = dict(zip(want_ids, want_vals))
    places = zip(ids, want_ids, want_vals)
    return all(i == w or abs(ref.get(i, want_vals[-1]) - v) <= tol for i, w, v in places)


def block_row_logprobs(res, r: int, k: int) -> list[tuple[float, list[int], list[float]]]:
    """Row r's log-probabilities from a decode block's result (`BlockResult.logprobs`), one entry
    (chosen, top k ids, top k values) for each of its n_out[r] tokens, as the engine appends them."""
    chosen, top_i, top_v = res.logprobs
    return [(float(chosen[i, r]), top_i[i, r, :k].tolist(), top_v[i, r, :k].tolist())
            for i in range(int(res.n_out[r]))]  # fmt: skip


def assert_refused_for_its_step_alone(convert) -> None:
    """`convert()` (a to_recurrent) raises the network check's VerificationError, whose message "(step X,
    prefill Y)" gives the stepped probe's error over 1e-2 and the prefilled one's under 1e-5: a fault that
    only decoding after a prompt shows."""
    import re  # noqa: PLC0415

    import pytest  # noqa: PLC0415

    from model import VerificationError  # noqa: PLC0415

    errs = r"\(step (\S+), prefill (\S+)\)"
    with pytest.raises(VerificationError, match=errs) as err:
        convert()
    step_err, prefill_err = (float(x) for x in re.search(errs, str(err.value)).groups())
    assert step_err > 1e-2 and prefill_err < 1e-5, str(err.value)
