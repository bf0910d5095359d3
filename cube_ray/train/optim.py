"""The optimiser and learning-rate schedule of a run, or of one of its stages (cube_ray.train.stages).

Learning rates scale with fan-in. Adam moves every weight by about lr a step whatever its gradient's scale, so a
unit with n inputs can move its output by up to lr * n * |input| a step. The default student reads its prediction
from 6,144 numbers (768 cells x 8 channels): at lr 2e-3 for every layer, its read-out grew ~5x the size of the
input within four short epochs, drowning the residual student's identity (held-out MiniLM MRR 0.33 against
identity's 0.75; benchmarks/approaches.py). So every linear layer with more inputs than `lr_fan_in` (the read-out
from the lattice; an encoder from a teacher wider than that) takes lr * lr_fan_in / fan-in, muP's rule for Adam's
hidden and output layers (Yang et al. 2021, "Tensor Programs V"); `lr` is the rate of everything narrower (the
cube's rules, the halting head, the attention blocks). With that, val MRR at lr 2e-3 went from 0.34 to 0.68 in
that benchmark, as high as one lr of 5e-4 for every layer.
"""
from __future__ import annotations

import torch
from torch import nn

from cube_ray.config import TrainConfig


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """The model's parameters in optimiser groups: first everything at cfg.lr, then one group per narrower rate."""
    scaled: dict[float, list] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and cfg.lr_fan_in and module.in_features > cfg.lr_fan_in:
            scaled.setdefault(cfg.lr * cfg.lr_fan_in / module.in_features, []).append(module.weight)
    taken = {id(p) for params in scaled.values() for p in params}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [{"params": rest}] + [{"params": params, "lr": lr} for lr, params in sorted(scaled.items(), reverse=True)]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps: int):
    """cosine: from each group's lr to 0 over `steps` (the run's, or its stage's); plateau: halved after 2 epochs
    without gain."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    if cfg.schedule == "plateau":  # stepped once per epoch on the eval metric
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=2, factor=0.5)
    return None
