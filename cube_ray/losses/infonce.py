from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.losses.base import weighted_mean


def duplicate_mask(target: torch.Tensor) -> torch.Tensor:
    """(B, B): True where j != i holds the same target as i (up to float noise); such j are not negatives."""
    t = F.normalize(target, dim=-1)
    same = t @ t.T > 1 - 1e-6
    return same & ~torch.eye(len(t), dtype=torch.bool, device=t.device)


class InfoNCELoss(nn.Module):
    """Contrastive loss with in-batch negatives: the prediction for i must pick target i among the batch's targets.

    logits_ij = cos(pred_i, target_j) / temperature; loss_i = cross-entropy(logits_i, i). A target equal to the
    positive (the same answer twice in a batch) is masked out rather than counted as a negative.

    Example:
        >>> pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> InfoNCELoss(temperature=1.0)(pred, pred)  # -log(e / (e + 1))
        tensor(0.3133)
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                **ctx) -> torch.Tensor:
        logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / self.temperature
        logits = logits.masked_fill(duplicate_mask(target), float("-inf"))
        labels = torch.arange(len(pred), device=pred.device)
        return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), sample_weight)
