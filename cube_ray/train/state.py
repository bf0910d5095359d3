"""TrainState: everything besides the weights that a resumed run needs to continue exactly where it stopped; Run:
what a worker's step and its callbacks see of the run."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cube_ray.config import TrainConfig
from cube_ray.model import Student
from cube_ray.train.data import Pairs
from cube_ray.train.stages import stage_plan


@dataclasses.dataclass
class TrainState:
    epoch: int = 0  # epochs finished
    global_step: int = 0
    samples_seen: int = 0  # training samples so far, all workers together (ASHA's time attribute)
    step_in_epoch: int = 0  # steps of the current epoch done: a round's checkpoint may fall inside an epoch
    partial: dict[str, Any] = dataclasses.field(default_factory=dict)  # the current epoch's sums so far
    best_eval: float = float("-inf")
    best_loss: float = float("inf")
    epochs_without_improvement: int = 0
    best_entropy: float = float("inf")
    epochs_without_entropy_drop: int = 0
    micro_batch: int | None = None  # the batch sizer's current choice, so a resume does not re-probe
    batch_decisions: list[str] = dataclasses.field(default_factory=list)
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # one row of metrics per epoch
    rounds: list[dict[str, float]] = dataclasses.field(default_factory=list)  # one row per round (see Round)
    seconds: float = 0.0  # training seconds so far (steps only: no scoring, saving nor set-up), across resumes
    stage: int = 0  # the stage being trained (an index into cube_ray.train.stages.stage_plan)
    task_start: int = 0  # samples_seen when the last stage (the run's task) began: ASHA's sample clock starts there
    rng: dict[str, Any] = dataclasses.field(default_factory=dict)  # every rank's RNG states, by rank ("0", "1", …)

    def capture_rng(self, device: torch.device = torch.device("cpu")) -> None:
        """Every rank's RNG states (a collective call when several workers train: each rank draws its own cell
        updates, so rank 0's state alone would not resume rank 1 exactly), its GPU's too when it trains on one."""
        name, key, pos, has_gauss, gauss = np.random.get_state()
        # plain values and tensors only: a checkpoint loads with torch.load(weights_only=True), which runs no code
        mine = {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
                "torch": torch.get_rng_state()}
        if device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(device)
        states = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, mine)
        self.rng = {str(rank): s for rank, s in enumerate(states)}

    def restore_rng(self, rank: int, device: torch.device = torch.device("cpu")) -> bool:
        """Restore this rank's RNG states; False if the checkpoint has none for it (it ran with fewer workers)."""
        mine = self.rng.get(str(rank)) or (self.rng if "python" in self.rng and rank == 0 else None)  # format 1: rank 0's
        if mine is None:
            return False
        random.setstate(_tuples(mine["python"]))
        name, key, pos, has_gauss, gauss = mine["numpy"]
        np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(mine["torch"])
        if device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
        return True


@dataclasses.dataclass
class Run:
    """What a worker's training step and its callbacks see."""

    cfg: TrainConfig
    student: Student
    state: TrainState
    out: Path
    rank: int
    eval_pairs: Pairs
    device: torch.device = torch.device("cpu")  # the student's and the train shard's (TrainConfig.use_gpu)
    stop: str = ""
    oom_injected: bool = False  # TrainConfig.inject_oom_at_step fires once

    @property
    def task_mode(self) -> str:
        """The mode the run trains now: its stage's (cube_ray.train.stages); every epoch is scored on cfg.mode."""
        return stage_plan(self.cfg)[self.state.stage].mode


def _tuples(value):
    """random.setstate wants the nested tuples random.getstate gave, whatever a checkpoint turned them into."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
