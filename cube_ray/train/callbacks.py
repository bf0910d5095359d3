"""Training callbacks: small objects with four hooks, so the loop stays a loop.

on_start(run), on_epoch_start(run), on_validation_end(run, metrics), on_checkpoint(run, path).
`run` is the loop's `Run` (config, student, state, output folder, rank, eval pairs); a callback stops training by
setting `run.stop`. Only rank 0 writes files.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path

import torch

from cube_ray.fsutil import swap_in, temp_dir
from cube_ray.losses.curriculum import competence, step_cap
from cube_ray.metrics import dedup_pool

log = logging.getLogger("cube_ray.train")


class Callback:
    def on_start(self, run) -> None: ...

    def on_epoch_start(self, run) -> None: ...

    def on_validation_end(self, run, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, run, path: Path) -> None: ...


class BestCheckpoints(Callback):
    """Keep `latest`, `best_loss` (lowest train loss) and `best_eval` (highest eval metric) under the output folder.

    Each is replaced atomically (save_checkpoint's swap), so at most these three folders exist: retention is bounded.
    """

    def on_validation_end(self, run, metrics):
        state = run.state
        self.improved_eval = metrics["eval"] > state.best_eval
        self.improved_loss = metrics["loss"] < state.best_loss
        state.best_eval = max(state.best_eval, metrics["eval"])
        state.best_loss = min(state.best_loss, metrics["loss"])

    def on_checkpoint(self, run, path):
        if run.rank != 0:
            return
        targets = ["latest"] + ["best_eval"] * self.improved_eval + ["best_loss"] * self.improved_loss
        for name in targets:
            keep_as(path, run.out / name)


def keep_as(checkpoint: Path, target: Path) -> None:
    """Put a checkpoint folder at `target`, replacing it atomically: a kill leaves the old one or the new one.

    Files are hard-linked where the folder is on the same filesystem (a checkpoint's files are never rewritten in
    place: every save is a new folder), so latest/, best_eval/ and best_loss/ of one save cost one write, not three:
    the default cube's checkpoint with its optimiser state is ~170 MB."""
    tmp = temp_dir(target)  # a name of its own: two writers of one target never share a temporary
    try:
        try:
            shutil.copytree(checkpoint, tmp, copy_function=os.link, dirs_exist_ok=True)
        except OSError:  # another filesystem
            shutil.rmtree(tmp)
            tmp = temp_dir(target)
            shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class EarlyStopping(Callback):
    """Stop after `patience` epochs without a better eval metric, or (optionally) without a lower retrieval entropy."""

    def __init__(self, patience: int, entropy_patience: int = 0, min_delta: float = 0.0):
        self.patience, self.entropy_patience, self.min_delta = patience, entropy_patience, min_delta

    def on_validation_end(self, run, metrics):
        state = run.state
        improved = metrics["eval"] > state.best_eval + self.min_delta
        state.epochs_without_improvement = 0 if improved else state.epochs_without_improvement + 1
        if self.patience and state.epochs_without_improvement >= self.patience:
            run.stop = f"early stop: no eval improvement for {self.patience} epochs"
        entropy = metrics.get("entropy", math.nan)
        if not math.isnan(entropy):
            dropped = entropy < state.best_entropy - 1e-4
            state.best_entropy = min(state.best_entropy, entropy)
            state.epochs_without_entropy_drop = 0 if dropped else state.epochs_without_entropy_drop + 1
            if self.entropy_patience and state.epochs_without_entropy_drop >= self.entropy_patience:
                run.stop = f"early stop: retrieval entropy flat for {self.entropy_patience} epochs"


class Curriculum(Callback):
    """Easy -> hard: the cube's step cap grows with competence over the warm-up epochs (samples are weighted by
    CombinedLoss when LossConfig.curriculum is on). The cap is the student's `step_cap` buffer, so every score of
    this epoch (rounds, the epoch's end) and its checkpoints run the steps it trained with."""

    def on_epoch_start(self, run):
        loss, cube = run.cfg.loss, run.cfg.cube
        c = competence(run.state.epoch, loss.curriculum_warmup, loss.curriculum_start) if loss.curriculum else 1.0
        run.student.step_cap.fill_(step_cap(c, cube.min_steps, cube.max_steps))


class EvalSamples(Callback):
    """Write a few eval questions with their top-3 retrieved answers and the gold one: eval_samples/epoch_NNN.txt."""

    def __init__(self, count: int):
        self.count = count

    def on_validation_end(self, run, metrics):
        if run.rank != 0 or not self.count:
            return
        pairs, teacher = run.eval_pairs, run.cfg.teachers[0]
        pool = dedup_pool(pairs.answers)
        answers = torch.nn.functional.normalize(pairs.a[teacher][torch.as_tensor(pool.first)], dim=-1)
        pred, _ = run.student.predict(pairs.q[teacher][: self.count], teacher)
        top = (torch.nn.functional.normalize(pred, dim=-1) @ answers.T).topk(min(3, len(pool.items)), dim=-1)
        epoch = run.state.epoch + 1  # validation ends before the state counts the epoch as done
        lines = [f"epoch {epoch}  teacher {teacher}  {run.cfg.eval_metric} {metrics['eval']:.4f}\n"]
        for i in range(len(pred)):
            lines.append(f"Q: {pairs.questions[i]}\nGOLD: {pairs.answers[i]}")
            for rank, (score, j) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist()), start=1):
                mark = " *" if pool.items[j] == pairs.answers[i] else ""
                lines.append(f"  {rank}. ({score:.3f}) {pool.items[j]}{mark}")
            lines.append("")
        folder = run.out / "eval_samples"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"epoch_{epoch:03d}.txt").write_text("\n".join(lines))


class RayMetrics(Callback):
    """Export throughput, micro-batch and expected halting steps as Ray metrics (Prometheus `ray_cube_ray_*`,
    the dashboard's Metrics tab), tagged with the run folder's name (a Tune trial's folder in a search)."""

    NAMES = {"samples_per_s": "training samples per second (all workers)",
             "micro_batch": "per-worker micro-batch chosen by the batch sizer",
             "expected_steps": "expected halting steps of the cube (train mean)"}

    def on_start(self, run):
        from ray.util.metrics import Gauge

        self.gauges = {k: Gauge(f"cube_ray_{k}", description=d, tag_keys=("run",)) for k, d in self.NAMES.items()} \
            if run.rank == 0 else {}

    def on_validation_end(self, run, metrics):
        for key, gauge in self.gauges.items():
            gauge.set(float(metrics[key]), tags={"run": run.out.name})
