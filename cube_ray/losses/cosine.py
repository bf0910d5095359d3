from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.losses.base import weighted_mean


class CosineLoss(nn.Module):
    """1 - cos(pred, target), averaged over the batch (weighted by ctx `sample_weight` if given).

    Example:
        >>> CosineLoss()(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 2.0]]))
        tensor(0.5000)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                **ctx) -> torch.Tensor:
        return weighted_mean(1 - F.cosine_similarity(pred, target, dim=-1), sample_weight)
