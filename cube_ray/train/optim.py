"""The optimiser and learning-rate schedule of a run, or of one of its stages (cube_ray.train.stages)."""
from __future__ import annotations

import torch

from cube_ray.config import TrainConfig


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int, epochs: int):
    """cosine: from lr to 0 over `epochs` (the run's, or its stage's); plateau: halved after 2 epochs without gain."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    if cfg.schedule == "plateau":  # stepped once per epoch on the eval metric
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=2, factor=0.5)
    return None
