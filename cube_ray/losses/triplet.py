from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.losses.base import weighted_mean
from cube_ray.losses.infonce import duplicate_mask, own_rows


class TripletLoss(nn.Module):
    """max(0, d(pred_i, target_i) - d(pred_i, target_j) + margin) with d = 1 - cos and negatives j from the batch
    (ctx `candidates` and `offset` as for InfoNCELoss: the whole global batch's targets).

    negatives='hard': j is the other target most similar to pred_i; 'random': j is drawn uniformly from the
    other targets with a seeded generator (reproducible for a given seed and call order). Targets equal to the
    positive are never negatives; a sample with no valid negative contributes 0.

    Example:
        >>> pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> target = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
        >>> TripletLoss(margin=0.5)(pred, target)  # mean of max(0, 0 - 0.707 + 0.5) and max(0, 0.707 - 1 + 0.5)
        tensor(0.1036)
    """

    def __init__(self, margin: float = 0.2, negatives: Literal["hard", "random"] = "hard", seed: int = 0):
        super().__init__()
        self.margin, self.negatives = margin, negatives
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sample_weight: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None, offset: int = 0, **ctx) -> torch.Tensor:
        candidates = target if candidates is None else candidates
        b, c = len(pred), len(candidates)
        sim = F.normalize(pred, dim=-1) @ F.normalize(candidates, dim=-1).T
        own = own_rows(b, c, offset, pred.device)
        invalid = duplicate_mask(target, candidates, offset) | own
        if self.negatives == "hard":
            choice = sim.masked_fill(invalid, float("-inf")).argmax(dim=1)
        else:
            draw = torch.rand(b, c, generator=self.generator).to(pred.device)
            choice = draw.masked_fill(invalid, -1.0).argmax(dim=1)
        has_negative = (~invalid).any(dim=1)
        neg = sim.gather(1, choice[:, None]).squeeze(1)
        pos = sim[own]  # (B,): each prediction against its own target
        per_sample = F.relu(neg - pos + self.margin) * has_negative  # (1-pos) - (1-neg) = neg - pos
        return weighted_mean(per_sample, sample_weight)
