"""Architectures: one module per network shape, each built from a ModelConfig by `build`."""

from __future__ import annotations

from torch import nn


def build(cfg) -> nn.Module:
    """ModelConfig → the untrained network its `arch` names: "isotropic" → SequenceModel,
    "sashimi" → SaShiMi."""
    if cfg.arch == "sashimi":
        from model.arch.sashimi import SaShiMi  # noqa: PLC0415

        return SaShiMi(cfg)
    from model.network import SequenceModel  # noqa: PLC0415

    return SequenceModel(cfg)
