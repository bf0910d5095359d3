"""The cube written the obvious way: channels-first (B, C, D, H, W), one conv3d call per operation.

It computes the same function as `Cube`, on the same parameters, and exists to check it (tests compare outputs
and gradients) and to time it (benchmarks/cube.py reports the speed-up as measured, not assumed).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cube_ray.model.cell_attention import CellAttention
from cube_ray.model.cube import Cube, GlobalAttention, Rule, update_mask


def _attend(attn: GlobalAttention, x: torch.Tensor, grid: int) -> torch.Tensor:
    """Every cell attends to the block means of the lattice; x (B, C, D, H, W) -> (B, C, D, H, W)."""
    b, c = x.shape[:2]
    h, dh = attn.heads, c // attn.heads
    tokens = F.adaptive_avg_pool3d(x, grid).flatten(2)  # (B, C, T)
    q = torch.einsum("oc,bcn->bon", attn.query.weight, x.flatten(2)).view(b, h, dh, -1)
    kv = torch.einsum("oc,bct->bot", attn.key_value.weight, tokens)
    k, v = kv[:, :c].reshape(b, h, dh, -1), kv[:, c:].reshape(b, h, dh, -1)
    weights = torch.softmax(torch.einsum("bhdn,bhdt->bhnt", q, k) / dh**0.5, dim=-1)
    return torch.einsum("bhnt,bhdt->bhdn", weights, v).reshape(x.shape)


class ReferenceCube(nn.Module):
    """Same `step` and `run(u, steps)` interface and parameters as the `Cube` it wraps, computed with plain conv3d."""

    def __init__(self, cube: Cube):
        super().__init__()
        self.cube = cube

    def step(self, state: torch.Tensor, u: torch.Tensor, i: int) -> torch.Tensor:
        """Step i (0-based) of `Cube.step`, computed channels-first with conv3d."""
        cfg = self.cube.cfg
        b, n, c = state.shape
        as_volume = lambda t: t.view(b, *cfg.dims, -1).permute(0, 4, 1, 2, 3).contiguous()  # noqa: E731
        x, rule = as_volume(state), self.cube.rules[i % len(self.cube.rules)]
        if isinstance(rule, CellAttention):  # plain PyTorch already, and checked on its own: the same block
            delta = as_volume(rule(state, u))
        else:
            delta = self._local_rule(rule, x, as_volume(u))
        if self.training and cfg.update_prob < 1:
            delta = delta * as_volume(update_mask(b, n, cfg.update_prob, state.device))
        x = (x + delta).clamp(-cfg.state_bound, cfg.state_bound)
        return x.permute(0, 2, 3, 4, 1).reshape(b, n, c)

    def _local_rule(self, rule: Rule, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The local rule's change of the state x, channels-first (B, C, D, H, W), u the input field alike."""
        features = [x, F.conv3d(x, rule.neighbours, padding=1, groups=x.shape[1])]
        if rule.attend is not None:
            features.append(_attend(rule.attend, x, self.cube.cfg.attention_grid))
        if rule.skip_input:
            features.append(u)
        h = F.relu(F.conv3d(torch.cat(features, 1), rule.w1.weight[..., None, None, None], rule.w1.bias))
        return F.conv3d(h, rule.w2.weight[..., None, None, None], rule.w2.bias)

    def run(self, u: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
        state = u
        for i in range(steps):
            state = self.step(state, u, i)
            yield state
