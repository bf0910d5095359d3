"""Progressive training: a run that learns other tasks first (`stages`), or starts from another run (`init_from`).

The plan's first breakthrough approach is autoencoder -> Q->A: the adapters and the cube first learn to carry a
text's own embedding through the lattice, then to answer. `stages: [autoencoder, dialogue]` trains those modes in
turn within one run, `stage_share` of its epochs going to the stages before the last (split evenly; the last stage
always keeps at least one epoch, so a short budget may skip an early stage), or less: with `stage_budget_s` the early
stages end once they have trained that many seconds, inside an epoch if need be. Whatever the stage trains, every round
and epoch is scored on the run's task (`mode`, the last stage): a search's rungs then compare trials like with like,
and best_eval/ is the best model for the task. Each later stage starts from best_eval/ so far, the best model of
the stages before it, with a fresh optimiser and schedule (the moments of another objective would steer its first
steps) and early stopping counting afresh. Checkpoints carry the epoch, so a resumed run continues in its stage.

`init_from: PATH` (a checkpoint folder, or a run folder holding best_eval/) starts a run from another run's weights:
every parameter whose name and shape match is loaded (the cube, the halting head, the adapters of the same teachers
and widths), the rest keeps its initialisation. The run writes what it loaded and what it left new to init_from.json
in its folder, and logs it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from cube_ray.checkpoint import load_checkpoint
from cube_ray.config import TrainConfig
from cube_ray.experiment import INIT_FROM, checkpoint_folder
from cube_ray.fsutil import atomic_write_text

log = logging.getLogger("cube_ray.train")


@dataclasses.dataclass(frozen=True)
class Stage:
    mode: str
    first_epoch: int
    epochs: int


def stage_plan(cfg: TrainConfig) -> list[Stage]:
    """The run's stages in order, e.g. [autoencoder, dialogue] over 6 epochs at share 0.5: 3 epochs each."""
    modes = cfg.stages or [cfg.mode]
    early = min(max(round(cfg.stage_share * cfg.epochs), len(modes) - 1), cfg.epochs - 1) if len(modes) > 1 else 0
    each, extra = divmod(early, max(len(modes) - 1, 1))
    lengths = [each + (i < extra) for i in range(len(modes) - 1)] + [cfg.epochs - early]
    starts = [sum(lengths[:i]) for i in range(len(modes))]
    return [Stage(m, s, n) for m, s, n in zip(modes, starts, lengths) if n > 0]


def stage_at(cfg: TrainConfig, epoch: int) -> Stage:
    """The stage that trains epoch `epoch` (0-based); past the plan, the last."""
    return next((s for s in stage_plan(cfg) if s.first_epoch <= epoch < s.first_epoch + s.epochs), stage_plan(cfg)[-1])


def legacy_stage(cfg: TrainConfig, epoch: int, step_in_epoch: int, epoch_samples: int) -> tuple[int, int]:
    """TrainState's (stage, task_start) for a checkpoint saved before states recorded them: stages then began at
    epoch starts only, and an epoch not yet begun (step 0) was still in the stage of the one before."""
    plan = stage_plan(cfg)
    stage = plan.index(stage_at(cfg, max(0, epoch - (step_in_epoch == 0))))
    return stage, plan[-1].first_epoch * epoch_samples


def load_matching(student: torch.nn.Module, path: str | Path) -> dict:
    """Copy into `student` the parameters of the checkpoint at `path` that match by name and shape; returns what was
    loaded and what was left new, by module ("core", "adapters.minilm", ...). A teacher's adapter (and bypass) loads
    whole or not at all: half an adapter of another width or strategy would be noise. The core loads parameter by
    parameter (e.g. the first of two rules from a one-rule cube); its parameters left new are named."""
    folder = checkpoint_folder(path)
    saved = {k[len("student."):]: v for k, v in load_checkpoint(folder).weights.items() if k.startswith("student.")}
    groups: dict[str, list] = {}
    for name, param in student.named_parameters():
        groups.setdefault(_module(name), []).append((name, param))
    loaded, new = [], []
    with torch.no_grad():
        for group, params in sorted(groups.items()):
            fits = [(n, p) for n, p in params if n in saved and saved[n].shape == p.shape]
            if not fits or (len(fits) < len(params) and group != "core"):
                new.append(group if not any(n in saved for n, _ in params) else f"{group} (another shape)")
                continue
            for name, param in fits:
                param.copy_(saved[name])
            loaded.append(group)
            fitted = {n for n, _ in fits}
            new += [n for n, _ in params if n not in fitted]
    return {"from": str(folder), "loaded": loaded, "new": new}


def _module(name: str) -> str:
    """A parameter's module for the summary: "adapters.minilm.encode.weight" -> "adapters.minilm"; "core.…" -> "core"."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("adapters", "bypass") else parts[0]


def init_from(student: torch.nn.Module, cfg: TrainConfig, out: Path, rank: int) -> None:
    """Start `student` from cfg.init_from (every rank loads the same file, so DDP starts from identical weights)."""
    summary = load_matching(student, cfg.init_from)
    if rank == 0:
        atomic_write_text(out / INIT_FROM, json.dumps(summary, indent=1))
        log.info("init_from %s: loaded %s; left new %s", summary["from"], ", ".join(summary["loaded"]) or "nothing",
                 ", ".join(summary["new"]) or "nothing")


def next_stage_due(cfg: TrainConfig, stage: int, epoch: int, step_in_epoch: int, trained_s: float) -> bool:
    """Whether a run training stage `stage` (an index into stage_plan) begins the next one before its next step: at
    that stage's first epoch, or, with `stage_budget_s`, once the stages so far have trained their share of it in
    seconds (a search on the cost clock bounds a staged trial's early stages by its first rung this way)."""
    plan = stage_plan(cfg)
    if stage >= len(plan) - 1:
        return False
    if step_in_epoch == 0 and epoch >= plan[stage + 1].first_epoch:
        return True
    return bool(cfg.stage_budget_s) and trained_s >= cfg.stage_budget_s * (stage + 1) / (len(plan) - 1)


def restore_best(student: torch.nn.Module, out: Path, rank: int, world: int) -> str:
    """Load best_eval/ into `student` on rank 0 and send it to every other rank; returns where it came from. The step
    cap stays the current one (the curriculum's for this epoch; a stage can begin inside an epoch)."""
    best = out / "best_eval"
    source = "the current weights (no best_eval/ yet)"
    if rank == 0 and (best / "checkpoint.json").exists():
        weights = load_checkpoint(best).weights
        cap = student.step_cap.clone()
        student.load_state_dict({k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")})
        student.step_cap.copy_(cap)
        source = str(best)
    if world > 1:
        for tensor in list(student.parameters()) + list(student.buffers()):
            dist.broadcast(tensor.data, src=0)
    return source
