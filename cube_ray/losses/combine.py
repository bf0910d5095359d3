"""The loss mix: sum of weight * term over the terms of LossConfig with a positive weight."""
from __future__ import annotations

import torch
from torch import nn

from cube_ray.losses.cosine import CosineLoss
from cube_ray.losses.curriculum import competence, curriculum_weights, difficulty
from cube_ray.losses.diversity import DiversityLoss
from cube_ray.losses.infonce import InfoNCELoss
from cube_ray.losses.mse import MSELoss
from cube_ray.losses.think import ThinkingCost
from cube_ray.losses.triplet import TripletLoss
from cube_ray.model.config import LossConfig


class CombinedLoss(nn.Module):
    """`total, parts = loss(pred, target, expected_steps=..., question=..., epoch=...)`.

    parts maps each computed term to its unweighted value (a float, for logging). Terms with weight 0 are not
    built or computed. With LossConfig.curriculum the per-sample terms are weighted easy -> hard, which needs
    ctx `question` (the input embeddings) and `epoch`; the thinking cost needs `expected_steps`.

    Example:
        >>> loss = CombinedLoss(LossConfig(cosine=1.0, think=0.01))
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> loss(x, x, expected_steps=torch.tensor([4.0]))
        (tensor(0.0400), {'cosine': 0.0, 'think': 4.0})
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        build = {
            "cosine": CosineLoss,
            "mse": MSELoss,
            "infonce": lambda: InfoNCELoss(cfg.infonce_temperature),
            "triplet": lambda: TripletLoss(cfg.triplet_margin, cfg.triplet_negatives, cfg.seed),
            "diversity": DiversityLoss,
            "think": ThinkingCost,
        }
        self.weights = {name: w for name, w in cfg.weights().items() if w > 0}
        self.terms = nn.ModuleDict({name: build[name]() for name in self.weights})

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **ctx) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cfg.curriculum:
            if ctx.get("question") is None or ctx.get("epoch") is None:
                raise ValueError("curriculum weighting needs question=<(B, d) inputs> and epoch=<int>")
            c = competence(ctx["epoch"], self.cfg.curriculum_warmup, self.cfg.curriculum_start)
            ctx["sample_weight"] = curriculum_weights(difficulty(ctx["question"], target), c)
        values = {name: term(pred, target, **ctx) for name, term in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.item() for name, value in values.items()}
