"""Data-parallel cube training on Ray Train.

`fit(cfg, store, dataset_id, out)` starts a TorchTrainer with `cfg.workers` CPU workers; each runs
`train_loop_per_worker`:

  1. read its shard of the train split (a Ray Dataset of pairs with embeddings, split deterministically by the
     driver) into tensors, and the selection split from the store (`val` where the data has one, else `eval`);
  2. centre every teacher on the train mean (all-reduced over workers), build the student (same seed on every
     rank, so DDP starts from identical weights), the optimiser and the schedule;
  3. resume from the latest checkpoint if Ray hands one over (a restarted worker or `--resume`): weights,
     optimiser, schedule, TrainState with the RNG states;
  4. per epoch: steps of the fixed global batch, each worker taking its share in micro-batches sized by the
     BatchSizer (gradients accumulated, DDP syncing on the last one; an out-of-memory error halves the micro-batch
     and retries the step); then validation, callbacks, and a checkpoint reported to Ray with the metrics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cube_ray.config import TrainConfig, from_dict, save_yaml, to_dict
from cube_ray.data.split import selection_split
from cube_ray.evaluate import student_metrics
from cube_ray.fsutil import recover_swap
from cube_ray.losses.combine import CombinedLoss
from cube_ray.metrics import Centering
from cube_ray.model import Student
from cube_ray.store import EmbeddingError, EmbeddingStore
from cube_ray.teachers.registry import TeacherSpec
from cube_ray.train.batching import BatchSizer, is_oom, memory_budget_bytes
from cube_ray.train.callbacks import BestCheckpoints, Callback, Curriculum, EarlyStopping, EvalSamples, RayMetrics
from cube_ray.train.data import Pairs, load_shard, load_split
from cube_ray.train.snapshot import build_student, check_widths, resume_snapshot, save_snapshot
from cube_ray.train.state import TrainState, seed_everything

log = logging.getLogger("cube_ray.train")


@dataclasses.dataclass
class Run:
    """What the callbacks see."""

    cfg: TrainConfig
    student: Student
    state: TrainState
    out: Path
    rank: int
    eval_pairs: Pairs
    step_cap: int | None = None
    stop: str = ""
    oom_injected: bool = False  # TrainConfig.inject_oom_at_step fires once


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_schedule(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    if cfg.schedule == "plateau":  # stepped once per epoch on the eval metric
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", patience=2, factor=0.5)
    return None


def task_pairs(cfg: TrainConfig, batch: Pairs, t: str) -> list[tuple[torch.Tensor, torch.Tensor, tuple[str, str]]]:
    """(input, target, (from teacher, into teacher)) of a mode, for the loss weighted as teacher `t`.

    dialogue: q_t -> a_t. autoencoder: x -> x over questions and answers. dual: both, each at half weight.
    distill: q_t -> a_u for every teacher u, so the shared cube must agree with every teacher's answer.
    """
    q, a = batch.q[t], batch.a[t]
    if cfg.mode == "distill":
        return [(q, batch.a[u], (t, u)) for u in cfg.teachers]
    dialogue, auto = (q, a, (t, t)), (torch.cat([q, a]), torch.cat([q, a]), (t, t))
    return {"dialogue": [dialogue], "autoencoder": [auto], "dual": [dialogue, auto]}[cfg.mode]


def batch_loss(run: Run, loss_fn: CombinedLoss, model, batch: Pairs, weight: float) -> tuple[torch.Tensor, dict]:
    """The weighted multi-teacher loss of one micro-batch; `weight` = its share of the worker's batch."""
    total, parts = 0.0, {}
    teacher_w = run.student.weights()
    for t in run.cfg.teachers:
        pairs = task_pairs(run.cfg, batch, t)
        for x, y, into in pairs:
            out = model(x, into[0], max_steps=run.step_cap, into=into[1])
            loss, p = loss_fn(out.output, y, expected_steps=out.expected_steps, question=x, epoch=run.state.epoch)
            total = total + teacher_w[t] * loss / len(pairs)
            p["steps"] = out.expected_steps.mean().item()
            accumulate(parts, {f"{t}/{k}": v for k, v in p.items()}, 1 / len(pairs))
    return total * weight, parts


def accumulate(into: dict[str, float], parts: dict[str, float], weight: float) -> None:
    """into[k] += weight * parts[k], for logging sums of loss parts over teachers, micro-batches and steps."""
    for k, v in parts.items():
        into[k] = into.get(k, 0.0) + weight * v


def take(pairs: Pairs, idx: torch.Tensor) -> Pairs:
    return Pairs([], [], [], {t: x[idx] for t, x in pairs.q.items()}, {t: x[idx] for t, x in pairs.a.items()})


def train_step(run: Run, loss_fn, model, optimizer, sizer: BatchSizer, batch: Pairs) -> tuple[float, dict]:
    """One optimiser step over this worker's share, in micro-batches; an OOM halves the micro-batch and retries."""
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total, parts, n = 0.0, {}, len(batch)
            chunks = list(range(0, n, sizer.micro))
            for k, start in enumerate(chunks):
                idx = torch.arange(start, min(n, start + sizer.micro))
                if run.cfg.inject_oom_at_step == run.state.global_step and not run.oom_injected:
                    run.oom_injected = True
                    raise torch.OutOfMemoryError(f"injected at step {run.state.global_step}")
                sync = k == len(chunks) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss, p = batch_loss(run, loss_fn, model, take(batch, idx), len(idx) / n)
                    loss.backward()
                total += loss.item()
                accumulate(parts, p, len(idx) / n)
            break
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            sizer.on_oom(e)
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.student.parameters(), run.cfg.grad_clip)
    optimizer.step()
    sizer.after_step()
    return total, parts


def _centres(cfg: TrainConfig, shard: Pairs, world: int) -> dict[str, Centering]:
    """Each teacher's train mean over questions and answers, summed over all workers' shards."""
    if not cfg.center:
        return {}
    out = {}
    for t in cfg.teachers:
        both = torch.cat([shard.q[t], shard.a[t]]).double()
        stats = torch.cat([both.sum(0), torch.tensor([len(both)], dtype=torch.float64)])
        if world > 1:
            dist.all_reduce(stats)
        out[t] = Centering((stats[:-1] / stats[-1]).numpy())
    return out


def _peak_rss_mb(world: int) -> list[float]:
    """Every worker's peak RSS so far (MiB), in rank order."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    if world == 1:
        return [peak.item()]
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    return [p.item() for p in peaks]


def train_loop_per_worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    specs = {n: TeacherSpec(name=n, **s) for n, s in config["teachers"].items()}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    store = EmbeddingStore(config["store"])
    shard = load_shard(ray.train.get_dataset_shard(f"train_{rank}"), cfg.teachers)
    centres = _centres(cfg, shard, world)
    shard = shard.centred(centres)
    eval_pairs = load_split(store, config["dataset_id"], selection_split(config["data_ref"]["splits"]), specs).centred(centres)
    widths = {t: shard.q[t].shape[1] for t in cfg.teachers}

    seed_everything(cfg.seed)  # identical initial weights on every rank
    student = build_student(cfg, widths)
    model = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True}) \
        if world > 1 else student
    optimizer = make_optimizer(cfg, student.parameters())
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / cfg.batch_size))
    schedule = make_schedule(cfg, optimizer, steps_per_epoch)
    state = TrainState()
    # Ray's own latest checkpoint (a restarted worker) wins over --resume's folder (Train V2 has no
    # resume_from_checkpoint: the function loads it); a damaged checkpoint falls back to the previous good one.
    snap = resume_snapshot(ray.train.get_checkpoint(), Path(config["out"]), Path(config["storage"]))
    if snap is not None:
        check_widths(snap.checkpoint, widths, f"the train split's embeddings in {config['store']}")
        student.load_state_dict(snap.student.state_dict())
        saved = snap.checkpoint.state
        optimizer.load_state_dict(saved["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(saved["schedule"])
        state = TrainState(**saved["train_state"])
        state.restore_rng()
        log.info("rank %d: resumed from %s after epoch %d (step %d)", rank, snap.checkpoint.dir, state.epoch,
                 state.global_step)
    else:
        seed_everything(cfg.seed * 1000 + rank + 1)  # stochastic cell updates differ per rank, reproducibly
    share = cfg.batch_size // world + (rank < cfg.batch_size % world)
    sizer = BatchSizer(share, memory_budget_bytes(cfg.memory_budget_mb, ctx.get_local_world_size()), cfg.max_micro_batch)
    loss_fn = CombinedLoss(cfg.loss)
    run = Run(cfg, student, state, Path(config["out"]), rank, eval_pairs)
    if state.micro_batch:
        sizer.micro = state.micro_batch
    else:
        t0 = cfg.teachers[0]
        sizer.probe(lambda n: model(shard.q[t0][:n], t0).output.sum(), probe_size=min(32, len(shard)))
    callbacks: list[Callback] = [Curriculum(), EarlyStopping(cfg.patience, cfg.entropy_patience, cfg.min_delta),
                                 EvalSamples(cfg.eval_samples), BestCheckpoints(), RayMetrics()]
    for cb in callbacks:
        cb.on_start(run)

    peaks: list[float] = []  # each worker's peak RSS, measured every epoch
    last_epoch = min(cfg.epochs, state.epoch + config["stop_after"]) if config.get("stop_after") else cfg.epochs
    while state.epoch < last_epoch and not run.stop:
        for cb in callbacks:
            cb.on_epoch_start(run)
        student.train()
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + state.epoch * 101 + rank)
        start, samples, epoch_loss, parts_sum = time.perf_counter(), 0, 0.0, {}
        order = torch.randperm(len(shard), generator=gen)
        for step in range(steps_per_epoch):
            idx = order[torch.arange(step * share, (step + 1) * share) % len(shard)]  # wraps: every rank same steps
            loss, parts = train_step(run, loss_fn, model, optimizer, sizer, take(shard, idx))
            if schedule is not None and cfg.schedule == "cosine":
                schedule.step()
            state.global_step += 1
            samples += len(idx)
            epoch_loss += loss / steps_per_epoch
            accumulate(parts_sum, parts, 1 / steps_per_epoch)
        seconds = time.perf_counter() - start
        per_teacher = student_metrics(student, eval_pairs, "autoencoder" if cfg.mode == "autoencoder" else "dialogue")
        key = "recon_cos" if cfg.mode == "autoencoder" else cfg.eval_metric
        metrics = {"epoch": state.epoch + 1, "loss": epoch_loss, "eval": float(np.mean([m[key] for m in per_teacher.values()])),
                   "samples_per_s": samples * world / seconds, "micro_batch": sizer.micro,
                   "accumulation": sizer.accumulation, "lr": optimizer.param_groups[0]["lr"],
                   "expected_steps": float(np.mean([parts_sum[f"{t}/steps"] for t in cfg.teachers])),
                   "entropy": float(np.mean([m.get("entropy", math.nan) for m in per_teacher.values()])),
                   "peak_rss_mb": max(peaks := _peak_rss_mb(world)), "time_s": state.seconds + time.perf_counter() - start}
        metrics.update({f"{t}/{k}": v for t, m in per_teacher.items() for k, v in m.items()})
        metrics.update({f"train/{k}": v for k, v in parts_sum.items()})
        if cfg.weighting.mode == "adaptive":
            weights = student.update_weights({t: 1 - per_teacher[t].get("cos", per_teacher[t].get("recon_cos", 0))
                                              for t in cfg.teachers})
        else:
            weights = student.weights()
        metrics.update({f"weight/{t}": w for t, w in weights.items()})
        if schedule is not None and cfg.schedule == "plateau":
            schedule.step(metrics["eval"])
        for cb in callbacks:
            cb.on_validation_end(run, metrics)
        state.epoch += 1
        state.seconds = metrics["time_s"]
        state.micro_batch = sizer.micro
        state.batch_decisions = list(sizer.decisions)
        state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        state.capture_rng()
        if rank == 0:
            log.info("epoch %d/%d  loss %.4f  eval %s %.4f  steps %.2f  %.0f samples/s  micro-batch %d x %d%s",
                     state.epoch, cfg.epochs, epoch_loss, key, metrics["eval"], metrics["expected_steps"],
                     metrics["samples_per_s"], sizer.micro, sizer.accumulation, f"  ({run.stop})" if run.stop else "")
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                training = {"optimizer": optimizer.state_dict(), "train_state": dataclasses.asdict(state),
                            "schedule": schedule.state_dict() if schedule is not None else None}
                path = save_snapshot(Path(tmp) / "ck", student, centres, cfg, specs, config["data_ref"], training)
                for cb in callbacks:
                    cb.on_checkpoint(run, path)
                checkpoint = ray.train.Checkpoint.from_directory(str(path))
            ray.train.report(metrics, checkpoint=checkpoint)
    return {"epochs": state.epoch, "stopped": run.stop, "history": state.history, "batch_decisions": state.batch_decisions,
            "worker_peak_rss_mb": peaks, "resumed_from": str(snap.checkpoint.dir) if snap is not None else None}


@dataclasses.dataclass
class FitResult:
    out: Path
    history: list[dict[str, float]]
    stopped: str
    batch_decisions: list[str]
    worker_peak_rss_mb: list[float]  # each worker's peak RSS, in rank order (of the last attempt)
    resumed_from: str | None  # the checkpoint the last attempt continued from


@dataclasses.dataclass
class RunData:
    """What a run reads, made once: the prepared split, the teachers, and one materialised train shard per worker.

    A search makes it in its driver and hands it to every trial (same data, teachers and workers per trial)."""

    store: str
    dataset_id: str
    specs: dict[str, TeacherSpec]
    rows: int
    parts: list  # ray.data.MaterializedDataset per worker
    data_ref: dict


def prepare_run(cfg: TrainConfig, store_root: str | Path, registry: dict[str, TeacherSpec] | None = None) -> RunData:
    """Prepare the data (contamination check included), extract what the store lacks, and shard the train split."""
    import ray

    from cube_ray.cli import init_ray
    from cube_ray.data.prepare import prepare
    from cube_ray.extract import extract_all
    from cube_ray.store import pairs_dataset
    from cube_ray.teachers.registry import get_teacher

    specs = {t: get_teacher(t, registry) for t in cfg.teachers}
    store = EmbeddingStore(store_root)
    prepared = prepare(cfg.data, store.root)  # contamination is checked here, before anything trains
    init_ray()  # training needs Ray whether or not extraction does
    extract_all(prepared.unique_texts(), list(specs.values()), store)
    entries = {t: store.dataset_entry(prepared.dataset_id, s) for t, s in specs.items()}
    rows = prepared.manifest["splits"]["train"]["rows"]
    if rows < cfg.workers:
        raise ValueError(f"{rows} train pairs cannot feed {cfg.workers} workers")
    # Deterministic shards: row ranges of the split table, in file order, one per worker. They are materialised
    # (in the object store, not the driver) before training: workers that hold every CPU would otherwise starve
    # the read tasks of a streaming dataset and wait for them forever.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train = pairs_dataset(prepared.dir, "train", entries)
    try:
        parts = train.split_at_indices([rows * k // cfg.workers for k in range(1, cfg.workers)]) if cfg.workers > 1 \
            else [train.materialize()]
    except Exception as e:  # bad embeddings in the store surface inside Ray Data's task error: say just that
        message = _embedding_error(e)
        if message is None:
            raise
        raise EmbeddingError(f"store {store.root}: {message}") from None
    for part in parts:  # workers read their shard once; the epoch log is the progress
        part.context.enable_progress_bars = False
    widths = {t: entries[t].info["width"] for t in cfg.teachers}
    data_ref = {"store": str(store.root), "dataset_id": prepared.dataset_id, "widths": widths,
                "splits": {n: s["sha256"] for n, s in prepared.manifest["splits"].items()},
                "entries": {t: str(e.dir) for t, e in entries.items()}}
    return RunData(str(store.root), prepared.dataset_id, specs, rows, parts, data_ref)


def _embedding_error(error: BaseException) -> str | None:
    """The EmbeddingError message inside a Ray Data failure. Ray Data hands the driver a RayTaskError wrapping a
    UserCodeException whose original exception survives only as traceback text, so read it from there."""
    marker = f"{EmbeddingError.__module__}.{EmbeddingError.__name__}: "
    for line in str(error).splitlines():
        if marker in line:
            return line.split(marker, 1)[1].strip()
    return None


def fit(cfg: TrainConfig, store_root: str | Path, out: str | Path, resume: bool = False,
        registry: dict[str, TeacherSpec] | None = None, run_config_kwargs: dict | None = None,
        stop_after: int | None = None, data: RunData | None = None) -> FitResult:
    """Prepare and (if needed) extract the data, then train with Ray Train; checkpoints land under `out`.

    stop_after: train at most this many epochs in this call (the schedule still spans cfg.epochs); `resume=True`
    continues from `out/latest` exactly where it stopped. data: made by `prepare_run` already (a search's trials).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(out).resolve()
    recover_swap(out / "latest")
    if (out / "latest").exists() and not resume:
        raise FileExistsError(f"{out} already holds a training run (latest/); pass --resume to continue it, "
                              f"or choose another --out")
    if resume and not (out / "latest").exists():
        raise FileNotFoundError(f"--resume: {out / 'latest'} does not exist; nothing to resume")
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    data = data or prepare_run(cfg, store_root, registry)
    if len(data.parts) != cfg.workers or list(data.specs) != cfg.teachers:
        raise ValueError(f"the prepared data has {len(data.parts)} shard(s) for teachers {list(data.specs)}; this run "
                         f"needs {cfg.workers} for {cfg.teachers}")
    run_kwargs = {"name": f"train-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": str(out / "ray"),
                  # Ray keeps the best K epoch checkpoints by the eval metric, and the latest
                  "checkpoint_config": ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                                  checkpoint_score_attribute="eval",
                                                                  checkpoint_score_order="max"),
                  "failure_config": ray.train.FailureConfig(max_failures=2), **(run_config_kwargs or {})}
    config = {"train": to_dict(cfg), "teachers": {t: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
                                                  for t, s in data.specs.items()},
              "store": data.store, "dataset_id": data.dataset_id, "train_rows": data.rows, "out": str(out),
              "stop_after": stop_after, "storage": run_kwargs["storage_path"], "data_ref": data.data_ref}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets={f"train_{k}": part for k, part in enumerate(data.parts)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(**run_kwargs))
    result = trainer.fit()
    if result.error:
        raise result.error
    ret = result.return_value or {}
    return FitResult(out, ret.get("history", []), ret.get("stopped", ""), ret.get("batch_decisions", []),
                     ret.get("worker_peak_rss_mb", []), ret.get("resumed_from"))
