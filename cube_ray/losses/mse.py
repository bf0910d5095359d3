from __future__ import annotations

import torch
from torch import nn

from cube_ray.losses.base import weighted_mean


class MSELoss(nn.Module):
    """Mean squared error per sample (mean over dimensions), averaged over the batch.

    Sensitive to norms, unlike the cosine loss; use it when the prediction's scale matters (reconstruction).

    Example:
        >>> MSELoss()(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
        tensor(0.5000)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                **ctx) -> torch.Tensor:
        return weighted_mean((pred - target).pow(2).mean(dim=-1), sample_weight)
