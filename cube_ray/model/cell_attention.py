"""The attention mixer: a small pre-norm transformer block over all the lattice's cells (CubeConfig.mixer).

The local rule moves information one cell per step, so a lattice 12 cells deep needs 11 steps before its last face
hears its first. In a `CellAttention` step every cell attends to every cell (one token per cell, C channels, a
learned position per cell, since attention alone cannot tell where a cell is), then a per-cell MLP updates it:
the plan's "cube + attention hybrid". Cost: the scores are cells^2 per sample (768^2 for 8x8x12): 13x a local
step's FLOPs at 8 channels (`cube_ray.model.cost` counts them), and more in time, since a softmax over 590k scores
with a few channels per head is memory-bound (benchmarks/cube.py). The search weighs it against the samples and
steps the same time would buy.

Like the local rule it returns the state's change, which the cube masks (random cell updates in training) and
clamps; its two output layers start at zero, so a cube of these blocks starts as the identity too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.model.config import CubeConfig


class CellAttention(nn.Module):
    def __init__(self, cfg: CubeConfig):
        super().__init__()
        c = cfg.channels
        self.heads = cfg.mixer_heads
        self.skip_input = cfg.skip_input
        self.position = nn.Parameter(torch.randn(cfg.cells, c) * 0.02)  # GPT-2's scale for learned positions
        self.norm_attend = nn.LayerNorm(c)
        self.query_key_value = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.norm_update = nn.LayerNorm(c)
        self.w1 = nn.Linear(c * (1 + cfg.skip_input), cfg.hidden)
        self.w2 = nn.Linear(cfg.hidden, c)
        for last in (self.out, self.w2):  # the block starts as the identity map
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, state: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """state, u (B, cells, C) -> the state's change (B, cells, C): attention among the cells, then the MLP."""
        b, n, c = state.shape
        h = self.heads
        x = self.norm_attend(state) + self.position
        q, k, v = self.query_key_value(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # each (B, heads, n, C/h)
        attended = self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        x = self.norm_update(state + attended)
        if self.skip_input:
            x = torch.cat([x, u], dim=-1)
        return attended + self.w2(F.relu(self.w1(x)))
