"""A training run, driver side: prepare the data once, hand each Ray Train worker its shard, start the trainer.

    fit(cfg, store, out) -> FitResult      checkpoints, config.yaml and timing.json land under `out`

`prepare_run` reads the prepared split through Ray Data (contamination check, extraction of what the store lacks,
one deterministic row range per worker) and leaves each worker's shard in Ray's object store as NumPy blocks;
`fit` starts the trainer whose workers run `train/loop.py`; `fit_in_trial` runs that loop in a search's 1-worker
Tune trial itself. This module never imports torch: a search's trial driver and Ray Train's controller run it (or
unpickle what it hands them), and each would pay ~2 s of CPU per trial to import torch for nothing. One worker trains with Ray Train's plain data-parallel trainer; several train
with `TorchTrainer`, whose torch.distributed process group DDP needs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path

from cube_ray.config import ConfigError, TrainConfig, save_yaml, to_dict
from cube_ray.experiment import SNAPSHOT_PREFIX, checkpoint_folder
from cube_ray.fsutil import folder_lock, recover_swap
from cube_ray.store import EmbeddingError, EmbeddingStore
from cube_ray.teachers.registry import TeacherSpec

HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


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
    """What a run reads, made once: the prepared split, the teachers, and one train shard per worker.

    A search makes it in its driver and hands it to every trial (same data, teachers and workers per trial)."""

    store: str
    dataset_id: str
    specs: dict[str, TeacherSpec]
    rows: int
    shards: list[list]  # per worker, the ObjectRefs of its shard's blocks (dicts of NumPy columns)
    data_ref: dict
    # prepare_run(held_out_later=True) left the held-out split's texts to embed (`embed_held_out`): the seconds that
    # is expected to take at the speed its first extraction ran (None: nothing left)
    held_out_s: float | None = None


def prepare_run(cfg: TrainConfig, store_root: str | Path, registry: dict[str, TeacherSpec] | None = None,
                held_out_later: bool = False) -> RunData:
    """Prepare the data (contamination check included), extract what the store lacks, and shard the train split.
    `held_out_later`: where a val split picks the models, the held-out split's texts are left for `embed_held_out`
    (a search embeds them after its trials: only its report reads them, and its trials start that much sooner)."""
    import ray

    from cube_ray.cli import init_ray
    from cube_ray.data.prepare import prepare
    from cube_ray.data.split import HELD_OUT, selection_split
    from cube_ray.extract import extract_all
    from cube_ray.store import pairs_dataset, shard_order
    from cube_ray.teachers.registry import get_teacher

    specs = {t: get_teacher(t, registry) for t in cfg.teachers}
    store = EmbeddingStore(store_root)
    prepared = prepare(cfg.data, store.root)  # contamination is checked here, before anything trains
    init_ray()  # training needs Ray whether or not extraction does
    require_train_gpus(cfg)  # before extraction: a run that can never start should not embed first
    texts = prepared.unique_texts()
    whole = {t: store.entry(s, shard_order(texts)) for t, s in specs.items()}
    later = held_out_later and selection_split(prepared.splits) != HELD_OUT and \
        not all(e.complete for e in whole.values())
    first = prepared.unique_texts(skip=HELD_OUT) if later else texts
    extracted = extract_all(first, list(specs.values()), store)
    entries = {t: store.dataset_entry(prepared.dataset_id, s, "train") for t, s in specs.items()}
    rows = prepared.manifest["splits"]["train"]["rows"]
    if rows < cfg.workers:
        raise ValueError(f"{rows} train pairs cannot feed {cfg.workers} workers")
    # Deterministic shards: row ranges of the split table, in file order, one per worker, each handed over as the
    # ObjectRefs of its NumPy blocks: a worker reads its shard with one ray.get instead of running a Ray Data
    # executor of its own over a `datasets=` shard. The blocks are made before training: workers that hold every CPU
    # would otherwise starve the tasks that make them and wait for them forever.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    train = pairs_dataset(prepared.dir, "train", entries)
    train.context.enable_progress_bars = False  # one short read; the epoch log is the progress
    try:
        parts = train.split_at_indices([rows * k // cfg.workers for k in range(1, cfg.workers)]) if cfg.workers > 1 \
            else [train]
        shards = [part.to_numpy_refs() for part in parts]
        ray.wait([ref for shard in shards for ref in shard], num_returns=sum(map(len, shards)), fetch_local=False)
    except Exception as e:  # bad embeddings in the store surface inside Ray Data's task error: say just that
        message = _embedding_error(e)
        if message is None:
            raise
        raise EmbeddingError(f"store {store.root}: {message}") from None
    widths = {t: entries[t].info["width"] for t in cfg.teachers}
    data_ref = {"store": str(store.root), "dataset_id": prepared.dataset_id, "widths": widths,
                "splits": {n: s["sha256"] for n, s in prepared.manifest["splits"].items()},
                "entries": {t: str(e.dir) for t, e in whole.items()}}
    held_out_s = sum(r.seconds_for(len(texts) - len(first)) for r in extracted) if later else None
    return RunData(str(store.root), prepared.dataset_id, specs, rows, shards, data_ref, held_out_s)


def embed_held_out(data: RunData) -> list:
    """Embed the held-out split's texts that `prepare_run(held_out_later=True)` left (nothing if it left none);
    returns the teachers' ExtractResults."""
    if data.held_out_s is None:
        return []
    from cube_ray.extract import extract_all
    from cube_ray.store import dataset_texts

    store = EmbeddingStore(data.store)
    return extract_all(dataset_texts(store.dataset_dir(data.dataset_id)), list(data.specs.values()), store)


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
        stop_after: int | None = None, data: RunData | None = None, lock: bool = True) -> FitResult:
    """Prepare and (if needed) extract the data, then train with Ray Train; checkpoints land under `out`.

    stop_after: train at most this many epochs in this call (the schedule still spans cfg.epochs); `resume=True`
    continues from `out/latest` exactly where it stopped. data: made by `prepare_run` already (a search's trials).
    lock: hold `out`'s lock for the run (FolderLocked if another process holds it); a search's trials pass False,
    their folders lie inside the experiment its driver holds locked.
    """
    cfg.validate()  # before any work: a bad value fails here, not in a worker after extraction
    cfg = with_init_checkpoint(cfg)
    out = Path(out).resolve()
    # This driver holds the lock until the run ends (its Ray Train workers write into `out` under it): a second
    # training or --resume into the same folder is refused at once, before it could overwrite or prune this one's
    # checkpoints, and what killed runs left here can be repaired without racing a live one.
    with folder_lock(out, "training run") if lock else contextlib.nullcontext():
        return _fit(cfg, out, store_root, resume, registry, run_config_kwargs, stop_after, data)


def with_init_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """cfg with `init_from` made the absolute path of its checkpoint folder (workers may run elsewhere); a path that
    holds no checkpoint is refused here, before any work."""
    if not cfg.init_from:
        return cfg
    folder = checkpoint_folder(Path(cfg.init_from).absolute())
    if not (folder / "checkpoint.json").exists():
        raise ConfigError(f"init_from: {cfg.init_from} is not a checkpoint folder (no checkpoint.json) and holds "
                                f"no best_eval/ checkpoint; expected a checkpoint or a training run's folder")
    return dataclasses.replace(cfg, init_from=str(folder))


def _fit(cfg: TrainConfig, out: Path, store_root, resume: bool, registry, run_config_kwargs, stop_after,
         data: RunData | None) -> FitResult:
    import ray.train

    # Ray Train's controller collects a worker's report only when it polls (every 2 s by default) and a worker's
    # next report waits for that: a round cost ~1.9 s of waiting here. Polling every 0.2 s makes reports, start-up and
    # teardown that much quicker (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S set by the user wins; Ray hands it on).
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, "0.2")
    run_kwargs = {"name": f"train-{time.strftime('%Y%m%d-%H%M%S')}", "storage_path": str(out / "ray"),
                  # Ray keeps the best K epoch checkpoints by the eval metric, and the latest
                  "checkpoint_config": ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints,
                                                                  checkpoint_score_attribute="eval",
                                                                  checkpoint_score_order="max"),
                  "failure_config": ray.train.FailureConfig(max_failures=2), **(run_config_kwargs or {})}
    config = _start_run(cfg, out, store_root, resume, registry, stop_after, data, run_kwargs["storage_path"])
    result = trainer_class(cfg.workers)(train_on_worker, train_loop_config=config, scaling_config=scaling_config(cfg),
                                        run_config=ray.train.RunConfig(**run_kwargs)).fit()
    if result.error:
        raise result.error
    return _fit_result(out, result.return_value or {})


def fit_in_trial(cfg: TrainConfig, out: str | Path, data: RunData, resume: bool) -> FitResult:
    """A search's 1-worker trial: the same run as `fit`'s, its loop called right here in the Tune trial (no Ray Train
    controller or worker group), reporting to Tune (cube_ray.train.session.TuneSession). Tune keeps the epochs'
    checkpoints in the trial's folder `out` itself. The search's driver holds the experiment's lock."""
    from cube_ray.train.loop import train_loop_per_worker
    from cube_ray.train.session import TuneSession

    cfg.validate()
    out = Path(out).resolve()
    config = _start_run(cfg, out, data.store, resume, None, None, data, str(out))
    return _fit_result(out, train_loop_per_worker(config, TuneSession()))


def _start_run(cfg: TrainConfig, out: Path, store_root, resume: bool, registry, stop_after, data: RunData | None,
               storage: str) -> dict:
    """Repair what killed runs left in `out`, check it may (or may not) be resumed, save config.yaml, prepare the
    data, and return the loop's config (train/loop.py); `storage`: where Ray keeps the run's epoch checkpoints."""
    for name in ("latest", "best_eval", "best_loss"):  # a save killed between its two renames left one aside
        recover_swap(out / name)
    for stale in out.glob(f"{SNAPSHOT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if (out / "latest").exists() and not resume:
        raise FileExistsError(f"{out} already holds a training run (latest/); pass --resume to continue it, "
                              f"or choose another --out")
    if resume and not (out / "latest").exists():
        raise FileNotFoundError(f"--resume: {out / 'latest'} does not exist; nothing to resume")
    if resume:
        from cube_ray.train.snapshot import check_resume_config  # torch: only a resume needs it

        check_resume_config(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, out / "config.yaml")
    data = data or prepare_run(cfg, store_root, registry)
    if len(data.shards) != cfg.workers or list(data.specs) != cfg.teachers:
        raise ValueError(f"the prepared data has {len(data.shards)} shard(s) for teachers {list(data.specs)}; this "
                         f"run needs {cfg.workers} for {cfg.teachers}")
    return {"train": to_dict(cfg), "teachers": {t: {k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
                                                for t, s in data.specs.items()},
            "store": data.store, "dataset_id": data.dataset_id, "train_rows": data.rows, "out": str(out),
            "stop_after": stop_after, "storage": storage, "data_ref": data.data_ref, "shards": data.shards}


def _fit_result(out: Path, ret: dict) -> FitResult:
    return FitResult(out, ret.get("history", []), ret.get("stopped", ""), ret.get("batch_decisions", []),
                     ret.get("worker_peak_rss_mb", []), ret.get("resumed_from"))


def scaling_config(cfg: TrainConfig):
    """The run's workers and what each requests: its CPUs and, with use_gpu, its share of a GPU."""
    import ray.train

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {})}
    return ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources)


def require_train_gpus(cfg: TrainConfig) -> None:
    """With use_gpu, a ConfigError unless some node can hold a worker's GPU share (cube_ray.resources)."""
    from cube_ray.resources import require_gpus

    if cfg.use_gpu:
        require_gpus(cfg.gpus_per_worker, f"use_gpu (gpus_per_worker: {cfg.gpus_per_worker:g})", "Ray Train worker",
                     "Train on a cluster with GPU nodes, or without --use-gpu (use_gpu: false) on CPU")


def trainer_class(workers: int):
    """TorchTrainer where DDP needs its process group; else Ray Train's data-parallel trainer with the default
    backend, which sets up nothing, so neither the controller nor the worker group imports torch to start."""
    if workers > 1:
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer


def train_on_worker(config: dict) -> dict:
    """Ray Train's worker function. Ray pickles it by reference to this torch-free module, so the processes that
    only pass it on (the trial driver, Ray Train's controller) import no torch; the worker imports the loop here."""
    from cube_ray.train.loop import train_loop_per_worker

    return train_loop_per_worker(config)
