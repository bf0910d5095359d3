from __future__ import annotations

import torch
from torch import nn


class ThinkingCost(nn.Module):
    """The thinking cost: E[steps] of the adaptive cube, averaged over the batch (ctx `expected_steps`, (B,)).

    Its weight in the loss mix is lambda in L_total = L_task + lambda * E[steps]; a larger lambda pushes the
    halting head to stop earlier. pred and target are unused.

    Example:
        >>> ThinkingCost()(None, None, expected_steps=torch.tensor([3.0, 5.0]))
        tensor(4.)
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor, expected_steps: torch.Tensor | None = None,
                **ctx) -> torch.Tensor:
        if expected_steps is None:
            raise ValueError("ThinkingCost needs expected_steps=<(B,) tensor>, e.g. Pondered.expected_steps")
        return expected_steps.mean()
