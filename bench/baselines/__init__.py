"""Baselines we compare against (trained with model.train, never shipped)."""
