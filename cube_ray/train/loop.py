"""Data-parallel cube training, worker side: what each Ray Train worker runs (`train/run.py` starts them), and what
a search's 1-worker trial runs right inside its Tune trial. Ray is reached only through `session`
(cube_ray/train/session.py: rank, world size, device, reports, the checkpoint to resume from).

`train_loop_per_worker(config, session)`:

  1. read its shard of the train split (NumPy blocks the driver left in Ray's object store, split deterministically)
     into tensors, and the selection split from the store (`val` where the data has one, else `eval`);
  2. centre every teacher on the train mean (all-reduced over workers), build the student (same seed on every
     rank, so DDP starts from identical weights), the optimiser and the schedule;
  3. resume from the latest checkpoint if Ray hands one over (a restarted worker or `--resume`): weights,
     optimiser, schedule, TrainState with the RNG states; else start from `init_from`'s matching weights, if set;
  4. per epoch: steps of the fixed global batch, each worker taking its share in micro-batches sized by the
     BatchSizer (gradients accumulated, DDP syncing on the last one; an out-of-memory error halves the micro-batch
     and retries the step). Every `report_every_samples` samples (or `report_every_s` training seconds: a search's
     cost clock) a round: the selection metric on a fixed slice of the picking split (`round_eval`), latest/ saved
     (the state holds the step inside the epoch), a report to Ray (Tune's ASHA decides on it). At the epoch's end:
     validation on the whole split, callbacks, and a checkpoint reported to Ray with the metrics. With `stages`
     (train/stages.py) each stage trains its mode, and a later stage starts from best_eval/ with a fresh optimiser
     and schedule, at its first epoch or, with `stage_budget_s`, at the step its budget runs out.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist

from cube_ray.config import TrainConfig, from_dict
from cube_ray.data.split import selection_split
from cube_ray.evaluate import retrieval_agreement, student_metrics
from cube_ray.experiment import COST_STEP, DONE_TRAINING, SNAPSHOT_PREFIX, TASK_STEP
from cube_ray.losses.combine import CombinedLoss
from cube_ray.metrics import Centering
from cube_ray.store import EmbeddingStore
from cube_ray.teachers.registry import TeacherSpec
from cube_ray.train.batching import BatchSizer, GpuMemory, gpu_memory_budget_bytes, memory_budget_bytes
from cube_ray.train.calibration import calibrate_residual_mix
from cube_ray.train.callbacks import BestCheckpoints, Callback, Curriculum, EarlyStopping, EvalSamples, RayMetrics, keep_as
from cube_ray.train.data import Pairs, load_shard, load_split
from cube_ray.train.optim import make_optimizer, make_schedule
from cube_ray.train.snapshot import build_student, check_widths, resume_snapshot, save_snapshot
from cube_ray.train.stages import init_from, legacy_stage, next_stage_due, restore_best, stage_plan
from cube_ray.train.state import Run, TrainState, seed_everything
from cube_ray.train.step import accumulate, probe_step, take, train_step
from cube_ray.train.timing import now, stamp

log = logging.getLogger("cube_ray.train")
# The batch sizer's probe: the bytes autograd saves grow linearly with the samples (the default cube's 7,112 KiB per
# sample measure the same at 4, 8 and 32), so 8 samples measure what 32 would at a third of the probe's time.
PROBE_SIZE = 8
# On the cost clock a round scores as many of its slice's queries as the trial trained samples since the last round,
# and at least this many: a slow config's first rung (3 s: a few dozen samples) no longer costs twice its training
# in scoring, and its score still estimates the slice's without bias (the same answer pool, a random subset).
MIN_ROUND_QUERIES = 64


def _train_statistics(cfg: TrainConfig, shard: Pairs, world: int,
                      device: torch.device) -> tuple[dict[str, Centering], dict[str, float]]:
    """Each teacher's train mean (when centring) and RMS embedding norm after it (the student's input scale,
    Student.input_scale), over questions and answers of all workers' shards together: one pass, one all-reduce
    (on the worker's device: NCCL reduces GPU tensors only)."""
    centres, scales = {}, {}
    for t in cfg.teachers:
        both = torch.cat([shard.q[t], shard.a[t]]).double()
        stats = torch.cat([both.sum(0), both.square().sum().view(1), torch.tensor([len(both)], dtype=torch.float64)])
        if world > 1:
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        n = stats[-1]
        mean = stats[:-2] / n if cfg.center else torch.zeros_like(stats[:-2])
        if cfg.center:
            centres[t] = Centering(mean.numpy())
        # E|x - mean|^2 = E|x|^2 - |mean|^2; all-zero embeddings (a test's) have nothing to scale
        scales[t] = math.sqrt(max(float(stats[-2] / n - mean.square().sum()), 0.0)) or 1.0
    return centres, scales


def _peak_rss_mb(world: int, device: torch.device) -> list[float]:
    """Every worker's peak RSS so far (MiB), in rank order."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64, device=device)
    if world == 1:
        return [peak.item()]
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    return [p.item() for p in peaks]


@dataclasses.dataclass
class Worker:
    """One Ray Train worker's whole training setup: what `train_loop_per_worker` builds before its first step."""

    run: Run
    model: torch.nn.Module  # the student, DDP-wrapped when there are several workers
    optimizer: torch.optim.Optimizer
    schedule: object
    sizer: BatchSizer
    loss_fn: CombinedLoss
    callbacks: list[Callback]
    shard: Pairs  # this worker's train rows, centred
    round_pairs: Pairs  # the fixed slice of the picking split every round scores
    round_order: np.ndarray  # a fixed, seeded order of its rows: a round that scores n of them scores the first n
    centres: dict[str, Centering]
    specs: dict[str, TeacherSpec]
    config: dict  # fit's train_loop_config
    steps_per_epoch: int
    share: int  # this worker's samples per step
    world: int
    resumed_from: str | None
    session: object  # how this loop reaches Ray (cube_ray.train.session)
    last_epoch: int = 0  # this call trains up to here (fit's stop_after; else cfg.epochs)
    step_s: float = 0.0  # seconds the next step will take: the last one's, or the probe's estimate
    timing: dict = dataclasses.field(default_factory=dict)  # timing.json's "worker" part (rank 0 writes it)


def _data_parallel(student: torch.nn.Module) -> torch.nn.Module:
    """The student wrapped in DDP over TorchTrainer's process group (several workers only)."""
    import ray.train.torch

    return ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True})


def round_slice(pairs: Pairs, size: int, seed: int) -> Pairs:
    """A fixed, seeded slice of `size` queries (the whole split when it is smaller): every round of every trial of a
    search scores the same queries, so rounds are cheap and comparable; epoch ends score the whole split."""
    if len(pairs) <= size:
        return pairs
    pick = np.sort(np.random.default_rng(seed).choice(len(pairs), size=size, replace=False))
    return Pairs([pairs.ids[i] for i in pick], [pairs.questions[i] for i in pick], [pairs.answers[i] for i in pick],
                 {t: x[pick] for t, x in pairs.q.items()}, {t: x[pick] for t, x in pairs.a.items()})


def setup_worker(config: dict, session) -> Worker:
    """Read the data, build the student, optimiser and schedule, and continue from a checkpoint if there is one."""
    import ray

    cfg: TrainConfig = from_dict(TrainConfig, config["train"])
    specs = {n: TeacherSpec(name=n, **s) for n, s in config["teachers"].items()}
    rank, world = session.rank, session.world
    # the worker's process start: before it, Ray Train's controller and the worker group; after it, the imports
    timing = {"process_start": psutil.Process().create_time(), "pid": os.getpid(), "start": now()}
    torch.set_num_threads(cfg.cpus_per_worker)
    device = session.device(cfg.use_gpu)
    store = EmbeddingStore(config["store"])
    shard = load_shard(ray.get(config["shards"][rank]), cfg.teachers)
    centres, input_scales = _train_statistics(cfg, shard, world, device)
    shard = shard.centred(centres).to(device)  # on a GPU for the whole run; scoring moves its chunks (Student.predict)
    eval_pairs = load_split(store, config["dataset_id"], selection_split(config["data_ref"]["splits"]), specs).centred(centres)
    widths = {t: shard.q[t].shape[1] for t in cfg.teachers}
    timing["data_done"] = now()

    seed_everything(cfg.seed)  # identical initial weights on every rank
    student = build_student(cfg, widths)
    student.set_input_scales(input_scales)  # a resumed run loads its own below
    # Ray's own latest checkpoint (a restarted worker) wins over --resume's folder (Train V2 has no
    # resume_from_checkpoint: the function loads it); a damaged checkpoint falls back to the previous good one.
    snap = resume_snapshot(session.checkpoint(), Path(config["out"]), Path(config["storage"]))
    if snap is None and cfg.init_from:  # a resumed run continues its own weights, wherever they started
        init_from(student, cfg, Path(config["out"]), rank)
    student.to(device)  # before the optimiser, whose state lives beside the parameters
    model = _data_parallel(student) if world > 1 else student
    optimizer = make_optimizer(cfg, student)
    steps_per_epoch = max(1, math.ceil(config["train_rows"] / cfg.batch_size))
    # the first stage's schedule; a resumed run loads its stage's below
    schedule = make_schedule(cfg, optimizer, stage_plan(cfg)[0].epochs * steps_per_epoch)
    state = TrainState()
    if snap is not None:
        check_widths(snap.checkpoint, widths, f"the train split's embeddings in {config['store']}")
        student.load_state_dict(snap.student.state_dict())
        saved = snap.checkpoint.state
        if "optimizer" in saved:
            optimizer.load_state_dict(saved["optimizer"])
            if schedule is not None:
                schedule.load_state_dict(saved["schedule"])
        else:  # a search's trial that had ended (its optimiser state dropped), continued all the same
            log.warning("rank %d: %s holds no optimiser state (dropped when its trial ended): a fresh optimiser and "
                        "schedule continue it, so this resume is not exact", rank, snap.checkpoint.dir)
        state = TrainState(**saved["train_state"])
        if "stage" not in saved["train_state"]:  # saved before states recorded their stage
            state.stage, state.task_start = legacy_stage(cfg, state.epoch, state.step_in_epoch,
                                                         steps_per_epoch * cfg.batch_size)
        if not state.restore_rng(rank, device):
            log.warning("rank %d: the checkpoint holds no RNG state for this rank (it trained with fewer workers): "
                        "seeded afresh, so this resume is not bit-exact", rank)
            seed_everything(cfg.seed * 1000 + rank + 1 + state.global_step)
        log.info("rank %d: resumed from %s after epoch %d (step %d)", rank, snap.checkpoint.dir, state.epoch,
                 state.global_step)
    else:
        seed_everything(cfg.seed * 1000 + rank + 1)  # stochastic cell updates differ per rank, reproducibly
    share = cfg.batch_size // world + (rank < cfg.batch_size % world)
    sizer = worker_batch_sizer(cfg, share, device, session.local_world)
    timing["model_done"] = now()
    student.core.cube.prepare()  # the fused kernel: built once per machine and shape, else loaded
    timing["kernel_done"] = now()
    run = Run(cfg, student, state, Path(config["out"]), rank, eval_pairs, device)
    step_s = 0.0  # the next step's seconds, as far as known (a resumed run learns it from its first step)
    if state.micro_batch:
        sizer.micro = state.micro_batch
    else:
        step_s = probe_micro_batch(sizer, run, model, shard, share)
    callbacks: list[Callback] = [Curriculum(), EarlyStopping(cfg.patience, cfg.entropy_patience, cfg.min_delta),
                                 EvalSamples(cfg.eval_samples), BestCheckpoints(), RayMetrics()]
    for cb in callbacks:
        cb.on_start(run)
    round_pairs = round_slice(eval_pairs, cfg.round_eval_size, cfg.seed)
    return Worker(run, model, optimizer, schedule, sizer, CombinedLoss(cfg.loss), callbacks, shard, round_pairs,
                  np.random.default_rng(cfg.seed).permutation(len(round_pairs)), centres, specs, config, steps_per_epoch,
                  share, world, str(snap.checkpoint.dir) if snap is not None else None, session, step_s=step_s,
                  timing=timing)


def worker_batch_sizer(cfg: TrainConfig, share: int, device: torch.device, workers_on_node: int) -> BatchSizer:
    """The batch sizer over host memory (a CPU worker's share of it) or over the worker's GPU."""
    if device.type == "cuda":
        budget = gpu_memory_budget_bytes(cfg.memory_budget_mb, device, cfg.gpus_per_worker)
        return BatchSizer(share, budget, cfg.max_micro_batch, GpuMemory(device))
    return BatchSizer(share, memory_budget_bytes(cfg.memory_budget_mb, workers_on_node), cfg.max_micro_batch)


def probe_micro_batch(sizer: BatchSizer, run: Run, model, shard: Pairs, share: int) -> float:
    """Size the micro-batch by a probe step of the current stage's tasks (modes differ in rows per sample), in
    training mode, and draw nothing from the RNGs training draws from: a run resumed at a stage's start then probes
    as the uninterrupted run did and continues bit for bit. Returns the seconds a step of `share` samples should take:
    a line through two more (warm) passes, a pass's fixed cost and its cost per sample (the probe's own per-sample
    time, first call included, put the default cube's 256-sample step at 2.4x what it took on a slow machine)."""
    run.student.train()
    size = min(PROBE_SIZE, len(shard))
    pass_on = lambda n: probe_step(run.cfg, model, take(shard, torch.arange(n)), run.task_mode)  # noqa: E731
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        sizer.probe(pass_on, probe_size=size, parameters=list(run.student.parameters()))
        half, seconds = max(1, size // 2), []
        for n in (half, size):
            start = time.perf_counter()
            pass_on(n)
            seconds.append(time.perf_counter() - start)
    per_sample = max(0.0, (seconds[1] - seconds[0]) / max(1, size - half))
    fixed = max(0.0, seconds[0] - per_sample * half)
    return sizer.accumulation * fixed + per_sample * share


def begin_stage(w: Worker) -> None:
    """The next stage (cube_ray.train.stages): the best model so far, a fresh optimiser and schedule for the stage's
    steps, early stopping counting afresh, and the micro-batch probed for the stage's tasks."""
    run, cfg, state = w.run, w.run.cfg, w.run.state
    plan = stage_plan(cfg)
    state.stage += 1
    stage = plan[state.stage]
    if state.stage == len(plan) - 1:
        state.task_start = state.samples_seen
    source = restore_best(run.student, run.out, run.rank, w.world)
    w.optimizer = make_optimizer(cfg, run.student)
    w.schedule = make_schedule(cfg, w.optimizer, (stage.first_epoch + stage.epochs) * w.steps_per_epoch - state.global_step)
    state.epochs_without_improvement = state.epochs_without_entropy_drop = 0
    state.best_entropy = float("inf")
    w.step_s = probe_micro_batch(w.sizer, run, w.model, w.shard, w.share)
    if run.rank == 0:
        log.info("stage %s from epoch %d, step %d, starting from %s", stage.mode, state.epoch + 1,
                 state.step_in_epoch + 1, source)


def selection_score(w: Worker, pairs: Pairs, queries: np.ndarray | None = None) -> tuple[float, dict[str, dict[str, float]]]:
    """The selection metric on `pairs` (or those of its queries) (mean over teachers) and each teacher's metrics."""
    cfg, start = w.run.cfg, time.perf_counter()
    per_teacher = student_metrics(w.run.student, pairs, "autoencoder" if cfg.mode == "autoencoder" else "dialogue",
                                  untrained(w), queries)
    w.timing["score_s"] = w.timing.get("score_s", 0.0) + time.perf_counter() - start
    return float(np.mean([m[selection_key(cfg)] for m in per_teacher.values()])), per_teacher


def untrained(w: Worker) -> bool:
    """Before the first step (a round charged with a long step), where a residual student is still its input."""
    return w.run.state.global_step == 0 and w.run.student.cfg.residual and not w.run.cfg.init_from


def round_queries(w: Worker) -> np.ndarray | None:
    """The rows of the round's slice this round scores (None: all): on the cost clock as many as the samples trained
    since the last round (MIN_ROUND_QUERIES at least), the first of the slice's fixed order."""
    state = w.run.state
    if not w.run.cfg.report_every_s or untrained(w):  # an untrained student is scored without running it
        return None
    n = max(MIN_ROUND_QUERIES, state.samples_seen - (state.rounds[-1]["samples_seen"] if state.rounds else 0))
    return np.sort(w.round_order[:n]) if n < len(w.round_pairs) else None


def selection_key(cfg: TrainConfig) -> str:
    """The per-teacher metric that picks models (and weighs teachers adaptively)."""
    return "recon_cos" if cfg.mode == "autoencoder" else cfg.eval_metric


def round_metrics(w: Worker, elapsed: float, whole_split_score: float | None = None, ahead: float = 0.0) -> dict[str, float]:
    """What every report carries: the round's score on the fixed slice, and where the run is. At an epoch's end a
    slice that is the whole split reuses the whole split's score. COST_STEP, the cost clock: the training seconds
    so far, and `ahead`, those of the step the run is about to take (a round before a long step)."""
    state = w.run.state
    same = whole_split_score is not None and w.round_pairs is w.run.eval_pairs
    queries = None if same else round_queries(w)
    score = whole_split_score if same else selection_score(w, w.round_pairs, queries)[0]
    row = {"samples_seen": state.samples_seen, "round_eval": score, "time_s": state.seconds + elapsed,
           "round_queries": len(w.round_pairs) if queries is None else len(queries),
           COST_STEP: state.seconds + elapsed + ahead,
           "epoch_progress": state.epoch + state.step_in_epoch / w.steps_per_epoch,
           TASK_STEP: state.samples_seen - state.task_start if state.stage == len(stage_plan(w.run.cfg)) - 1 else 0,
           "at": now()}  # wall clock: the report's "what the first rung took"
    state.rounds.append(row)  # kept with TASK_STEP: the report finds the round each ASHA rung judged
    return {**row, "best_eval": state.best_eval}


def epoch_metrics(w: Worker, sums: dict, elapsed: float) -> dict[str, float]:
    """An epoch's end: the selection metric on the whole picking split, throughput, halting, teacher weights."""
    cfg, student, state = w.run.cfg, w.run.student, w.run.state
    if cfg.pick_residual_mix and selection_key(cfg) != "recon_cos":  # an autoencoder's best mix is 0, its input
        start = time.perf_counter()
        calibrate_residual_mix(student, w.run.eval_pairs, selection_key(cfg))
        w.timing["score_s"] = w.timing.get("score_s", 0.0) + time.perf_counter() - start
    score, per_teacher = selection_score(w, w.run.eval_pairs)
    metrics = {"epoch": state.epoch + 1, "loss": sums["loss"], "eval": score,
               "samples_per_s": sums["samples"] * w.world / max(sums["seconds"], 1e-9), "micro_batch": w.sizer.micro,
               "accumulation": w.sizer.accumulation, "lr": w.optimizer.param_groups[0]["lr"],
               "expected_steps": float(np.mean([sums["parts"][f"{t}/steps"] for t in cfg.teachers])),
               "step_cap": int(student.step_cap),  # the steps it trained and is scored with (a curriculum's cap)
               "entropy": float(np.mean([m.get("entropy", math.nan) for m in per_teacher.values()])),
               "peak_rss_mb": max(_peak_rss_mb(w.world, w.run.device)), "time_s": state.seconds + elapsed}
    metrics.update({f"{t}/{k}": v for t, m in per_teacher.items() for k, v in m.items()})
    metrics.update({f"train/{k}": v for k, v in sums["parts"].items()})
    if cfg.weighting.mode == "adaptive":
        weights = student.update_weights({t: per_teacher[t][selection_key(cfg)] for t in cfg.teachers})
    elif cfg.weighting.mode == "agreement":
        weights = student.update_weights(retrieval_agreement(student, w.run.eval_pairs))
    else:
        weights = student.weights()
    metrics.update({f"weight/{t}": w_ for t, w_ in weights.items()})
    metrics.update({f"mix/{t}": m for t, m in zip(student.teachers, student.residual_mix.tolist())})
    if w.schedule is not None and cfg.schedule == "plateau":
        w.schedule.step(metrics["eval"])
    return metrics


def save_and_report(w: Worker, metrics: dict, epoch_end: bool) -> None:
    """Hand a round's metrics to Ray, with the run's state saved as latest/. At an epoch's end the checkpoint also
    goes to Ray (which keeps the best K by the whole split's `eval`) and to best_eval/, best_loss/."""
    run, state = w.run, w.run.state
    state.micro_batch = w.sizer.micro
    state.batch_decisions = list(w.sizer.decisions)
    state.capture_rng(run.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run.out, prefix=SNAPSHOT_PREFIX) as tmp:  # beside latest/: hard links
        checkpoint = None
        if run.rank == 0:
            optimiser = {"optimizer": w.optimizer.state_dict(),
                         "schedule": w.schedule.state_dict() if w.schedule is not None else None}
            path = save_snapshot(Path(tmp) / "ck", run.student, w.centres, run.cfg, w.specs, w.config["data_ref"],
                                 {"train_state": dataclasses.asdict(state)}, optimiser)
            for cb in w.callbacks if epoch_end else ():
                cb.on_checkpoint(run, path)
            if not epoch_end:
                keep_as(path, run.out / "latest")
            checkpoint = path if epoch_end else None
            w.timing["reports"] = w.timing.get("reports", 0) + 1
            start = stamp_report(w, start)  # now: in a Tune trial, a report ASHA stops the trial at never returns
        w.session.report(metrics, checkpoint)
    if run.rank == 0:
        stamp_report(w, start)


def stamp_report(w: Worker, since: float) -> float:
    """Add the seconds since `since` to the time spent saving and reporting, and stamp timing.json."""
    w.timing["checkpoint_s"] = w.timing.get("checkpoint_s", 0.0) + time.perf_counter() - since
    w.timing.setdefault("first_report", now())
    stamp(w.run.out, "worker", **w.timing, last_report=now())
    return time.perf_counter()


def trained_s(w: Worker, this_epoch: float) -> float:
    """The run's training seconds so far, given this epoch's: the cost clock of rounds and stages. Several workers
    take rank 0's, so all of them decide alike (a collective call, made only where a setting reads the clock)."""
    seconds = w.run.state.seconds + this_epoch
    if w.world == 1 or not (w.run.cfg.report_every_s or w.run.cfg.stage_budget_s):
        return seconds
    clock = torch.tensor([seconds], dtype=torch.float64, device=w.run.device)
    dist.broadcast(clock, src=0)
    return clock.item()


def round_due(w: Worker, samples_before: int, this_epoch: float, ahead: float = 0.0) -> bool:
    """Whether a round falls here, inside the epoch (its end is one anyway): on the cost clock once the training
    seconds (counting `ahead`, the step about to run) reach the next round's (`next_round_s`), else every
    report_every_samples samples."""
    cfg, state = w.run.cfg, w.run.state
    if cfg.report_every_s:
        last = state.rounds[-1].get(COST_STEP, state.rounds[-1]["time_s"]) if state.rounds else 0.0
        return trained_s(w, this_epoch + ahead) >= next_round_s(cfg, last)
    return state.samples_seen // cfg.report_every_samples > samples_before // cfg.report_every_samples


def next_round_s(cfg: TrainConfig, last: float) -> float:
    """The training seconds of the first round after one at `last`: the next multiple of report_every_s or, with
    report_growth g > 1, the next report_every_s x g^k (a search's rungs)."""
    every, growth = cfg.report_every_s, cfg.report_growth
    if growth == 1:
        return (last // every + 1) * every
    due = every
    while due <= last:
        due *= growth
    return due


def long_step(w: Worker) -> float:
    """On the cost clock, the seconds of the step about to run where it is longer than a round (0 otherwise): the
    round it would overrun comes before it, charged with it, so a config slow enough that one step outlasts a rung
    is judged at that rung on what it has learnt so far, instead of holding its worker through the step."""
    every = w.run.cfg.report_every_s
    return w.step_s if every and w.step_s >= every else 0.0


def train_epoch(w: Worker) -> None:
    """The rest of the current epoch (all of it, unless a round's checkpoint fell inside it), reporting each round;
    then validation on the whole picking split, the callbacks and the epoch's checkpoint."""
    run, cfg, state = w.run, w.run.cfg, w.run.state
    for cb in w.callbacks:
        cb.on_epoch_start(run)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + state.epoch * 101 + run.rank)
    order = torch.randperm(len(w.shard), generator=gen)  # the same for a resumed epoch: it continues at its step
    sums = state.partial or {"loss": 0.0, "parts": {}, "samples": 0, "seconds": 0.0}
    start = time.perf_counter()

    def report_round(ahead: float = 0.0) -> None:  # a round inside the epoch; its seconds are not the epoch's
        nonlocal start
        paused = time.perf_counter()
        state.partial = {**sums, "seconds": sums["seconds"] + paused - start}
        save_and_report(w, round_metrics(w, state.partial["seconds"], ahead=ahead), epoch_end=False)
        start += time.perf_counter() - paused

    for step in range(state.step_in_epoch, w.steps_per_epoch):
        if next_stage_due(cfg, state.stage, state.epoch, step, trained_s(w, sums["seconds"] + time.perf_counter() - start)):
            paused = time.perf_counter()
            begin_stage(w)
            start += time.perf_counter() - paused  # set-up, not training
        ahead = long_step(w)
        if ahead and round_due(w, state.samples_seen, sums["seconds"] + time.perf_counter() - start, ahead):
            report_round(ahead)
        w.run.student.train()
        # wraps round the shard, so every rank takes the same number of steps
        idx = order[torch.arange(step * w.share, (step + 1) * w.share) % len(w.shard)].to(run.device)
        step_start = time.perf_counter()
        loss, parts = train_step(run, w.loss_fn, w.model, w.optimizer, w.sizer, take(w.shard, idx))
        w.step_s = time.perf_counter() - step_start
        if w.schedule is not None and cfg.schedule == "cosine":
            w.schedule.step()
        before, state.samples_seen = state.samples_seen, state.samples_seen + cfg.batch_size
        state.global_step, state.step_in_epoch = state.global_step + 1, step + 1
        sums["samples"] += len(idx)
        sums["loss"] += loss / w.steps_per_epoch
        accumulate(sums["parts"], parts, 1 / w.steps_per_epoch)
        # after a long step, the round comes before the next one, charged with it
        this_epoch = sums["seconds"] + time.perf_counter() - start
        if step + 1 < w.steps_per_epoch and not long_step(w) and round_due(w, before, this_epoch):
            report_round()  # the epoch's seconds count training, not the rounds' scoring
    sums["seconds"] += time.perf_counter() - start
    metrics = epoch_metrics(w, sums, sums["seconds"])
    for cb in w.callbacks:
        cb.on_validation_end(run, metrics)
    metrics.update(round_metrics(w, sums["seconds"], metrics["eval"]))
    state.epoch, state.step_in_epoch, state.partial = state.epoch + 1, 0, {}
    state.seconds = metrics["time_s"]
    state.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    if run.rank == 0:
        log.info("epoch %d/%d  loss %.4f  eval %.4f  steps %.2f  %.0f samples/s  micro-batch %d x %d%s", state.epoch,
                 cfg.epochs, metrics["loss"], metrics["eval"], metrics["expected_steps"], metrics["samples_per_s"],
                 w.sizer.micro, w.sizer.accumulation, f"  ({run.stop})" if run.stop else "")
    metrics[DONE_TRAINING] = state.epoch >= w.last_epoch or bool(run.stop)  # Tune tells Optuna: complete
    save_and_report(w, metrics, epoch_end=True)


def train_loop_per_worker(config: dict, session=None) -> dict:
    """Train as `config` (fit's train_loop_config) says; `session`: how to reach Ray (default: a Ray Train worker's)."""
    from cube_ray.train.session import TrainSession

    w = setup_worker(config, session or TrainSession())
    w.timing["setup_done"] = now()
    state = w.run.state
    stop_after = config.get("stop_after")
    w.last_epoch = min(w.run.cfg.epochs, state.epoch + stop_after) if stop_after else w.run.cfg.epochs
    while state.epoch < w.last_epoch and not w.run.stop:
        train_epoch(w)
    return {"epochs": state.epoch, "stopped": w.run.stop, "history": state.history,
            "batch_decisions": state.batch_decisions, "worker_peak_rss_mb": _peak_rss_mb(w.world, w.run.device),
            "resumed_from": w.resumed_from}
