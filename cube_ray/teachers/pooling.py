"""Turn per-token hidden states into one sentence vector, using the attention mask so padding never counts."""
from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden: (batch, tokens, width); mask: (batch, tokens) of 0/1. Returns (batch, width).

    mean: average of the unmasked tokens. cls: the first unmasked token (BERT's [CLS] under right padding).
    last: the last unmasked token (what a decoder has read the whole text into), under left or right padding.
    """
    mask = mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    if how == "cls":
        index = torch.where(mask > 0, positions, mask.shape[1]).min(1).values
    elif how == "last":
        index = torch.where(mask > 0, positions, -1).max(1).values
    else:
        raise ValueError(f"unknown pooling {how!r}; expected mean, cls or last")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
