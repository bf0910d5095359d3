"""Curriculum: easy pairs first. Difficulty is how far the answer is from the question in the teacher's space.

A pair whose answer embedding is close to its question's (difficulty = 1 - cos(q, a) small) is easy: the
identity map nearly solves it. Competence grows linearly from `start` at epoch 0 to 1 after `warmup` epochs;
at competence c the easiest fraction c of the samples is in play. Three ways to use it:
- `curriculum_weights`: per-sample loss weights (1 for the easiest fraction c of a batch, 0 for the rest);
  CombinedLoss applies them to every per-sample term when LossConfig.curriculum is on;
- `curriculum_subset`: the indices of the easiest fraction c of a whole split, to choose which samples to train on;
- `step_cap`: a cap on the cube's steps that grows with competence (harder samples may think longer).
It is a weighting, not a loss term, so it has no weight of its own in LossConfig.

Example:
    >>> q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    >>> curriculum_weights(difficulty(q, a), competence(epoch=0, warmup=4, start=0.5))
    tensor([1., 1., 0., 0.])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def difficulty(question: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """(B,) 1 - cos(question, answer), in [0, 2]."""
    return 1 - F.cosine_similarity(question, answer, dim=-1)


def competence(epoch: int, warmup: int, start: float) -> float:
    """The fraction of samples in play at `epoch` (0-based): start, rising linearly to 1 at epoch `warmup`."""
    if warmup <= 0:
        return 1.0
    return min(1.0, start + (1 - start) * epoch / warmup)


def _easiest(difficulty: torch.Tensor, fraction: float) -> torch.Tensor:
    count = max(1, math.ceil(fraction * len(difficulty) - 1e-9))
    return torch.argsort(difficulty, stable=True)[:count]


def curriculum_weights(difficulty: torch.Tensor, competence: float) -> torch.Tensor:
    """(B,) weights: 1 for the easiest ceil(competence * B) samples (at least one), 0 for the others."""
    weights = torch.zeros_like(difficulty)
    weights[_easiest(difficulty, competence)] = 1.0
    return weights


def curriculum_subset(difficulty: torch.Tensor, competence: float) -> torch.Tensor:
    """Indices of the easiest ceil(competence * N) samples of a split, easiest first."""
    return _easiest(difficulty, competence)


def step_cap(competence: float, min_steps: int, max_steps: int) -> int:
    """The cube's step cap at this competence: min_steps at 0, rising linearly to max_steps at 1."""
    return min_steps + round((max_steps - min_steps) * competence)
