"""What every loss shares: `forward(pred, target, **ctx) -> scalar`, and per-sample weights (curriculum)."""
from __future__ import annotations

import torch


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The batch mean of per-sample values, or sum(w * v) / sum(w) when weights are given.

    Example:
        >>> weighted_mean(torch.tensor([1.0, 3.0]))
        tensor(2.)
        >>> weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]))  # (3 + 3) / 4
        tensor(1.5000)
    """
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1e-12)
