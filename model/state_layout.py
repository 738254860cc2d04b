"""StateLayout: named slices of one flat float32 row per sequence (see docs: DESIGN, "one state tensor
per session"). The serving side sees only (rows, layout.numel); the recurrent form names the parts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Slot:
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class StateLayout:
    """An ordered map name → Slot over a row of `numel` float32 values."""

    def __init__(self):
        self.slots: dict[str, Slot] = {}
        self.numel = 0

    def add(self, name: str, shape: tuple[int, ...]) -> Slot:
        if name in self.slots:
            raise ValueError(f"state slot {name!r} is already laid out")
        slot = Slot(self.numel, tuple(int(n) for n in shape))
        self.slots[name] = slot
        self.numel += slot.numel
        return slot

    def view(self, state: torch.Tensor, name: str) -> torch.Tensor:
        """state (R, numel) → the named part as a view (R, *shape); writes go into `state`.
        The state's rows must be contiguous (stride 1 along the row)."""
        slot = self.slots[name]
        return state[:, slot.offset : slot.offset + slot.numel].view(state.shape[0], *slot.shape)

    def describe(self) -> list[dict]:
        """[{name, offset, shape}] in row order (for reports and docs)."""
        return [{"name": n, "offset": s.offset, "shape": list(s.shape)} for n, s in self.slots.items()]
