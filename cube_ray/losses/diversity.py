from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean of cos(x_i, x_j) over pairs i != j, in O(B d): sum_{i != j} n_i . n_j = |sum_i n_i|^2 - B."""
    b = len(x)
    n = F.normalize(x, dim=-1)
    return (n.sum(0).pow(2).sum() - b) / (b * (b - 1))


class DiversityLoss(nn.Module):
    """Penalises predictions that collapse toward one vector (e.g. the mean answer).

    Collapse shows as predictions that are all alike: a high mean pairwise cosine. Teacher embeddings are
    themselves anisotropic (answers of a decoder model can have mean pairwise cosine ~0.8), so the floor is the
    targets' own value: loss = max(0, mean_pairwise_cos(pred) - mean_pairwise_cos(target)). It is 0 while the
    predictions are as spread as the answers and needs batches of at least 2.

    Example:
        >>> pred = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # collapsed: pairwise cosine 1
        >>> target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # pairwise cosine 0
        >>> DiversityLoss()(pred, target)
        tensor(1.)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **ctx) -> torch.Tensor:
        if len(pred) < 2:
            return pred.sum() * 0
        return F.relu(mean_pairwise_cosine(pred) - mean_pairwise_cosine(target).detach())
