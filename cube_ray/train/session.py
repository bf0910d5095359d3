"""How the training loop reaches Ray: rank, world size, its device, reports, and the checkpoint to resume from.

    train_loop_per_worker(config, session)      session: TrainSession() or TuneSession()

The same loop (`train/loop.py`) runs in two places:
- a Ray Train worker (a plain `train` run, or a search trial with several workers): `TrainSession`, over `ray.train`;
- a search's 1-worker trial, run directly inside its Tune trial (a function trainable, no Ray Train controller nor
  worker group to start: ~15-30 s less per trial): `TuneSession`, over `ray.tune`. There `ray.train.report`,
  `get_checkpoint` and `get_context` raise, so nothing below this module calls them.
"""
from __future__ import annotations

from pathlib import Path

import torch


class TrainSession:
    """A Ray Train worker's view of its run."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world, self.local_world = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        from cube_ray.train.device import worker_device

        return worker_device(use_gpu)

    def checkpoint(self):
        """The checkpoint Ray hands a restarted worker group, or None."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand metrics (and, from rank 0 at an epoch's end, a checkpoint folder Ray copies) to Ray Train."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class TuneSession:
    """A 1-worker search trial's view of its run: rank 0 of 1, reporting straight to Tune (ASHA, Optuna)."""

    rank, world, local_world = 0, 1, 1

    def device(self, use_gpu: bool) -> torch.device:
        """The GPU Ray assigned this trial (Ray sets CUDA_VISIBLE_DEVICES to it, so it is cuda:0 here); else the CPU."""
        import ray

        if not use_gpu:
            return torch.device("cpu")
        if not ray.get_gpu_ids() or not torch.cuda.is_available():
            raise RuntimeError(f"use_gpu: this Tune trial has no GPU that torch {torch.__version__} can use (Ray "
                               f"assigned {ray.get_gpu_ids()}, torch.cuda.is_available() is "
                               f"{torch.cuda.is_available()}); install a CUDA build of torch, or search without --use-gpu")
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        return device

    def checkpoint(self):
        """The checkpoint Tune hands a restarted trial, or None."""
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Hand metrics (and at an epoch's end a checkpoint folder, which Tune copies into the trial's folder and
        prunes by the RunConfig's CheckpointConfig) to Tune; ASHA's decision comes back before this returns."""
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=checkpoint)
