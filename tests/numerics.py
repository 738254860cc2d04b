"""Helpers shared by the numerical tests (imported like server_support)."""

import torch


def step_all(rec, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens (B, L) one step at a time: logits (B, L, V) and the final state."""
    outs = []
    for t in range(tokens.shape[1]):
        logits, state = rec.step(tokens[:, t], state)
        outs.append(logits)
    return torch.stack(outs, 1), state
