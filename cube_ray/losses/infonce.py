from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.losses.base import weighted_mean


def duplicate_mask(target: torch.Tensor, candidates: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """(B, C): True where candidate j is not target i's own row (offset + i) but holds the same target (up to float
    noise); such j are not negatives. candidates: the targets ranked against (default: `target` itself)."""
    candidates = target if candidates is None else candidates
    same = F.normalize(target, dim=-1) @ F.normalize(candidates, dim=-1).T > 1 - 1e-6
    return same & ~own_rows(len(target), len(candidates), offset, target.device)


def own_rows(b: int, c: int, offset: int, device) -> torch.Tensor:
    """(B, C): True at (i, offset + i), each sample's own target among the candidates."""
    return torch.arange(c, device=device)[None, :] == (offset + torch.arange(b, device=device))[:, None]


class InfoNCELoss(nn.Module):
    """Contrastive loss with in-batch negatives: the prediction for i must pick target i among the batch's targets.

    logits_ij = cos(pred_i, candidate_j) / temperature; loss_i = cross-entropy(logits_i, offset + i). The candidates
    are the batch's targets (ctx `candidates`: the whole global batch's, this batch's starting at `offset`; default:
    `target` itself). A candidate equal to the positive (the same answer twice in a batch) is masked out rather
    than counted as a negative.

    Example:
        >>> pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> InfoNCELoss(temperature=1.0)(pred, pred)  # -log(e / (e + 1))
        tensor(0.3133)
        >>> InfoNCELoss(temperature=1.0)(pred[:1], pred[:1], candidates=pred, offset=0)  # the same first row
        tensor(0.3133)
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        self.temperature = temperature

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None, offset: int = 0, **ctx) -> torch.Tensor:
        candidates = target if candidates is None else candidates
        logits = F.normalize(pred, dim=-1) @ F.normalize(candidates, dim=-1).T / self.temperature
        logits = logits.masked_fill(duplicate_mask(target, candidates, offset), float("-inf"))
        labels = offset + torch.arange(len(pred), device=pred.device)
        return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), sample_weight)
