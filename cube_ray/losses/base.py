"""What every loss shares: `forward(pred, target, **ctx) -> scalar`, and per-sample weights (curriculum)."""
from __future__ import annotations

import torch


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch mean of per-sample values, or sum(w * v) / sum(w) when weights are given."""
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)
