"""A trained student as a checkpoint folder, and back: build, save, and load for evaluation or inference.

Weights are stored as `student.*` (the model) and `centre.<teacher>` (train means, when centring is on), so a
checkpoint alone decides how inputs are preprocessed: evaluation and inference cannot forget the centring.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from cube_ray.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from cube_ray.config import ConfigError, TrainConfig, flatten, from_dict, load_yaml, to_dict
from cube_ray.data.split import selection_split
from cube_ray.fsutil import moved_aside
from cube_ray.metrics import Centering
from cube_ray.model import Student
from cube_ray.store import EmbeddingStore
from cube_ray.teachers.registry import TeacherSpec
from cube_ray.train.data import Pairs, load_split

log = logging.getLogger("cube_ray.train")


def build_student(cfg: TrainConfig, widths: dict[str, int]) -> Student:
    return Student(cfg.cube, cfg.adapter, widths, cfg.weighting, cfg.fusion)


def save_snapshot(path: str | Path, student: Student, centres: dict[str, Centering], cfg: TrainConfig,
                  specs: dict[str, TeacherSpec], data: dict, state: dict | None, optimiser: dict | None = None) -> Path:
    weights = {f"student.{k}": v for k, v in student.state_dict().items()}
    weights.update({f"centre.{t}": torch.from_numpy(c.mean.astype(np.float32)) for t, c in centres.items()})
    return save_checkpoint(path, weights, to_dict(cfg), specs, data, state, optimiser)


@dataclasses.dataclass
class Snapshot:
    checkpoint: Checkpoint
    cfg: TrainConfig
    student: Student
    centres: dict[str, Centering]


def load_snapshot(path: str | Path, with_state: bool = False) -> Snapshot:
    ck = load_checkpoint(path, with_state=with_state)
    if ck.format == 1 and isinstance(ck.config, dict) and isinstance(ck.config.get("cube"), dict):
        ck.config["cube"].setdefault("residual", False)  # format 1's students were the cube alone
    try:
        cfg = from_dict(TrainConfig, ck.config, where=f"{ck.dir / 'config.yaml'}")
    except ConfigError as e:
        raise CheckpointError(f"incompatible checkpoint: {e}") from None
    widths = {t: int(ck.data["widths"][t]) for t in cfg.teachers}
    student = build_student(cfg, widths)
    state = {k[len("student."):]: v for k, v in ck.weights.items() if k.startswith("student.")}
    if ck.format == 1:
        state.setdefault("step_cap", student.step_cap)  # format 1 evaluated every step, whatever it trained with
    state.setdefault("input_scale", student.input_scale)  # students saved before input scales saw raw inputs
    state.setdefault("residual_mix", student.residual_mix)  # students saved before the mix added all of the change
    try:
        student.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{ck.dir / 'model.safetensors'}: weights do not fit the config: {e}") from None
    centres = {k[len("centre."):]: Centering(v.double().numpy()) for k, v in ck.weights.items() if k.startswith("centre.")}
    student.eval()
    return Snapshot(ck, cfg, student, centres)


def check_resume_config(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume the run in `out` with another config than the one it trained with (its config.yaml),
    naming every setting that differs: a resumed run continues the same training, or it is not exact."""
    saved_at = out / "config.yaml"
    if not saved_at.exists():
        return
    saved, now = flatten(to_dict(load_yaml(TrainConfig, saved_at))), flatten(to_dict(cfg))
    differ = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        raise ValueError(f"--resume: {out} trained with another config ({saved_at}); differing: {'; '.join(differ)}. "
                         "Resume with the same config (only --epochs-this-run may change), or train into a new --out")


def check_widths(ck: Checkpoint, widths: dict[str, int], source: str) -> None:
    """Refuse embeddings whose width differs from the ones the checkpoint's adapters were trained on."""
    for t, w in widths.items():
        trained = int(ck.data["widths"].get(t, w))
        if trained != w:
            raise CheckpointError(f"{ck.dir}: trained on {trained}-d {t!r} embeddings, but {source} holds {w}-d ones "
                                  f"(a different model behind the same teacher name?)")


def resume_snapshot(ray_checkpoint, out: Path, storage: Path) -> Snapshot | None:
    """The newest intact checkpoint to continue training from, or None for a fresh start.

    The further on of the checkpoint Ray hands a restarted worker and the run's `latest/` folder; if neither is
    intact, the older epoch checkpoints Ray kept under `storage`, newest first. A damaged one is logged with the file
    that is wrong and skipped, so a truncated or garbled checkpoint costs the epochs since the previous good one.

    `latest/` is written before Ray's copy, so it is ahead when a node dies with checkpoints its worker reported but
    Ray's controller had not registered yet (Ray then restarts the group from an older one, or from none). `fit`
    refuses to start a fresh run in a folder that holds a `latest/`, so whatever is found here belongs to this run."""
    if ray_checkpoint is None and not (out / "latest").exists() and not moved_aside(out / "latest"):
        return None  # (a copy moved aside: a save of latest/ killed between its renames, which load_checkpoint reads)
    tried: list[str] = []

    def load(candidate) -> Snapshot | None:
        try:
            if isinstance(candidate, Path):
                return load_snapshot(candidate, with_state=True)
            with candidate.as_directory() as folder:  # Ray's checkpoint, possibly on remote storage
                return load_snapshot(folder, with_state=True)
        except CheckpointError as e:
            log.error("cannot resume from this checkpoint: %s; trying the previous one", e)
        except FileNotFoundError as e:  # a folder that disappeared under retention
            log.error("cannot resume from a checkpoint that vanished: %s", e)
        tried.append(str(candidate))
        return None

    newest = [snap for c in ([ray_checkpoint] if ray_checkpoint is not None else []) + [out / "latest"]
              if (snap := load(c)) is not None]
    if newest:
        return max(newest, key=lambda snap: snap.checkpoint.state["train_state"]["global_step"])
    ray_path = getattr(ray_checkpoint, "path", None)  # already tried above
    # Ray Train keeps them in a run folder under `storage` (<storage>/<run>/checkpoint_*), Tune in the trial's folder
    found = [*storage.glob("checkpoint_*"), *storage.glob("*/checkpoint_*")]
    older = sorted((d for d in found if d.is_dir() and str(d) != ray_path), key=lambda d: (d / "checkpoint.json").stat().st_mtime
                   if (d / "checkpoint.json").exists() else 0.0, reverse=True)
    for candidate in older:
        if (snap := load(candidate)) is not None:
            return snap
    raise CheckpointError(f"no intact checkpoint to resume from under {out} (tried {', '.join(tried)})")


@dataclasses.dataclass
class EvalData:
    student: Student
    centres: dict[str, Centering]
    train: Pairs  # centred when the checkpoint centres
    held_out: Pairs
    picked_on: str  # the split that chose this checkpoint: "val", or "eval" itself when the data has no val split
    mode: str  # what it was trained for (TrainConfig.mode): "distill" students map between teachers
    dataset_id: str  # the prepared data it trained on (its train and eval splits)


def load_for_eval(path: str | Path, pairs: str | None = None) -> EvalData:
    """The checkpoint's student, its (centred) training split and a held-out split: its own eval split, or `pairs`."""
    snap = load_snapshot(path)
    store = EmbeddingStore(snap.checkpoint.data["store"])
    specs = snap.checkpoint.teachers
    dataset_id = snap.checkpoint.data["dataset_id"]
    train = load_split(store, dataset_id, "train", specs)
    if pairs is None:
        held_out = load_split(store, dataset_id, "eval", specs)
    else:
        held_out = _embed_pairs(pairs, store, specs, snap.cfg)
    for split in (train, held_out):
        check_widths(snap.checkpoint, {t: x.shape[1] for t, x in split.q.items()}, f"store {store.root}")
    return EvalData(snap.student, snap.centres, train.centred(snap.centres), held_out.centred(snap.centres),
                    selection_split(snap.checkpoint.data["splits"]), snap.cfg.mode, dataset_id)


def _embed_pairs(path: str, store: EmbeddingStore, specs: dict[str, TeacherSpec], cfg: TrainConfig) -> Pairs:
    """Prepare `path` as a dataset of one eval split and embed it with the checkpoint's teachers (cached)."""
    from cube_ray.data.prepare import prepare
    from cube_ray.extract import extract_all

    data = dataclasses.replace(cfg.data, pairs=path, eval_pairs=None, limit=None, split_ratios={"train": 1.0})
    prepared = prepare(data, store.root)
    extract_all(prepared.unique_texts(), list(specs.values()), store)
    return load_split(store, prepared.dataset_id, "train", specs)
