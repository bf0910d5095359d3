"""Typed configs, loaded from and saved to YAML.

Every config is a plain dataclass. `from_dict` rejects unknown keys and wrong types with an error that names
the source file and the key, so a typo in a YAML file fails before any work starts instead of being ignored.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


MAX_SEED = 2**32 - 1  # seeds are mixed with epochs and ranks into 64-bit generator seeds: larger ones overflow


def check_gpu_count(value: float, field: str) -> None:
    """Ray takes a fraction of one GPU, or whole GPUs: 0.5 and 2 are requests, 1.5 is not."""
    if not value >= 0 or (value > 1 and value != int(value)):
        raise ValueError(f"{field} must be 0 (CPU), a fraction of one GPU (e.g. 0.5) or a whole number of GPUs, "
                         f"got {value:g}")


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass."""


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(annotation, type):
        if annotation is not bool and isinstance(value, bool):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got a bool")
        if not isinstance(value, annotation):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a dict, checking keys and types; `where` prefixes every error."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; expected some of {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"cube": {"dims": v}} -> {"cube/dims": v}: Ray Tune nests names with '/'; this undoes it."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file would otherwise load as every default, e.g. a search of the bundled sample
        raise ConfigError(f"{path}: empty (a torn write?); expected a mapping of {cls.__name__} fields")
    return from_dict(cls, data, where=str(path))


def save_yaml(obj: Any, path: str | Path) -> None:
    """Written whole or not at all (a temporary file renamed into place)."""
    from cube_ray.fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


@dataclasses.dataclass
class FieldMap:
    """Which input column holds what. Only `question` and `answer` must exist in every row."""

    question: str = "question"
    answer: str = "answer"
    id: str = "id"
    doc_id: str = "doc_id"
    segment_id: str = "segment_id"


@dataclasses.dataclass
class DataConfig:
    """Where the pairs come from and how they are filtered and split."""

    pairs: str | None = None  # None: the sample bundled with the package
    eval_pairs: str | None = None  # an explicit eval file; it becomes the eval split as is
    fields: FieldMap = dataclasses.field(default_factory=FieldMap)
    limit: int | None = None  # keep only the first N pairs of each file (after reading, before filtering)
    min_chars: int = 3
    max_chars: int = 2000
    split_ratios: dict[str, float] = dataclasses.field(default_factory=lambda: {"train": 0.85, "eval": 0.15})
    seed: int = 0
    decontaminate: bool = False  # drop eval rows that collide with train instead of refusing
    # Move this fraction of the train split (whole documents) into a "val" split, which then picks models (per-epoch
    # eval, early stopping, best checkpoint, the search) instead of "eval": the eval split stays unseen until the report.
    val_fraction: float = 0.0

    def with_absolute_paths(self) -> DataConfig:
        """A copy whose data files are absolute paths (see SearchConfig.with_absolute_paths)."""
        absolute = lambda f: str(Path(f).absolute()) if f else f  # noqa: E731
        return dataclasses.replace(self, pairs=absolute(self.pairs), eval_pairs=absolute(self.eval_pairs))

    def validate(self) -> None:
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            raise ValueError(f"need 0 <= min_chars < max_chars, got {self.min_chars}, {self.max_chars}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be positive, got {self.limit}")
        if "train" not in self.split_ratios:
            raise ValueError(f"split_ratios must name a 'train' split, got {sorted(self.split_ratios)}")
        if any(r < 0 for r in self.split_ratios.values()) or abs(sum(self.split_ratios.values()) - 1) > 1e-6:
            raise ValueError(f"split_ratios must be non-negative and sum to 1, got {self.split_ratios}")


from cube_ray.model.config import AdapterConfig, CubeConfig, LossConfig, WeightingConfig  # noqa: E402


Mode = typing.Literal["autoencoder", "dialogue", "dual", "distill"]


@dataclasses.dataclass
class TrainConfig:
    """One training run: which data and teachers, the student, the loss mix, and how to optimise it."""

    mode: Mode = "dialogue"  # the run's task: what every epoch is scored on and the best checkpoint is picked by
    # Progressive training (cube_ray.train.stages): the modes trained in turn, the last one `mode`, e.g.
    # [autoencoder, dialogue]; [] = `mode` alone. `stage_share` of the epochs go to the stages before the last.
    stages: list[Mode] = dataclasses.field(default_factory=list)
    stage_share: float = 0.5
    init_from: str | None = None  # a checkpoint folder whose matching weights start this run (cube_ray.train.stages)
    # Teacher fusion (cube_ray/model/student.py): every task's input is the same text embedded by all teachers at
    # once, their adapters' fields added ("sum") or side by side in each cell's channels and mixed ("concat"),
    # read out into every teacher's space. "none": each teacher's input alone.
    fusion: typing.Literal["none", "sum", "concat"] = "none"
    teachers: list[str] = dataclasses.field(default_factory=lambda: ["minilm"])
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    cube: CubeConfig = dataclasses.field(default_factory=CubeConfig)
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    weighting: WeightingConfig = dataclasses.field(default_factory=WeightingConfig)
    center: bool = True  # subtract each teacher's train mean (decoder embeddings are anisotropic)
    epochs: int = 10
    # A round: every this many training samples (all workers together) the run reports to Ray (Tune's ASHA compares
    # trials on it) and saves latest/; 1,024 samples take ~10 s of the default cube on one CPU here (102 samples/s),
    # ~13 s with a second trial beside it. Epoch ends are rounds too.
    report_every_samples: int = 1024
    # Each round scores the selection metric on this many queries of the picking split (a fixed, seeded slice, so
    # rounds are cheap and comparable across trials); the whole split is scored at every epoch's end.
    round_eval_size: int = 1000
    # Rounds every this many training seconds instead (0: by samples): a search on the cost clock (ASHA's rungs in
    # training seconds, cube_ray/tune/runner.py) sets it, so every trial reports right after each rung it reaches.
    report_every_s: float = 0.0
    # With report_every_s, rounds at report_every_s x report_growth^k training seconds instead (1: evenly spaced). A
    # search sets ASHA's reduction factor: a round right after each rung and none between, where ASHA decides nothing
    # (on a slow config, scoring a round every 3 s cost twice its training).
    report_growth: float = 1.0
    # With stages: the stages before the last end once the run has trained this many seconds, if stage_share of the
    # epochs ends later (0: stage_share alone). A search on the cost clock bounds them by its first rung.
    stage_budget_s: float = 0.0
    batch_size: int = 64  # the effective global batch; workers may split it into micro-batches
    optimizer: typing.Literal["adamw", "sgd", "adafactor"] = "adamw"
    lr: float = 1e-3
    # Linear layers with more inputs than this (the read-out from the lattice) take lr * lr_fan_in / fan-in: Adam's
    # step moves a unit's output in proportion to its fan-in (cube_ray/train/optim.py). 0: one lr for every layer.
    lr_fan_in: int = 256
    weight_decay: float = 0.01
    momentum: float = 0.9  # sgd only
    schedule: typing.Literal["none", "cosine", "plateau"] = "cosine"
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False  # each Ray Train worker on a GPU (ScalingConfig(use_gpu=True)), the student and batches there
    gpus_per_worker: float = 1.0  # with use_gpu: a fraction lets several trials' workers share one GPU
    amp: typing.Literal["none", "bf16"] = "none"  # bf16 autocast of the forward passes (on a GPU; CPU runs it slowly)
    eval_metric: typing.Literal["mrr", "r1", "r5", "cos"] = "mrr"
    # At every epoch's end, pick each teacher's residual mix (how much of the cube's change a prediction adds to its
    # input, 0..1) by eval_metric on the picking split (cube_ray/train/calibration.py); false: add all of it.
    pick_residual_mix: bool = True
    patience: int = 0  # early stopping: epochs without eval improvement; 0 = off
    min_delta: float = 1e-4  # early stopping: a smaller eval gain does not count as improvement
    entropy_patience: int = 0  # early stopping when retrieval entropy stops falling for this many epochs; 0 = off
    eval_samples: int = 3  # questions written to eval_samples/epoch_NNN.txt per epoch
    keep_checkpoints: int = 2  # Ray keeps the best K epoch checkpoints by eval, and its latest (besides our 3 folders)
    memory_budget_mb: int | None = None  # per worker; None = the cgroup limit or available memory
    max_micro_batch: int | None = None  # cap the per-worker micro-batch (None: as large as memory allows)
    inject_oom_at_step: int | None = None  # testing: raise an out-of-memory error once at this global step
    seed: int = 0

    def validate(self) -> None:
        if not self.teachers:
            raise ValueError("teachers must name at least one teacher")
        if self.stages and self.stages[-1] != self.mode:
            raise ValueError(f"stages {self.stages} must end with the run's mode {self.mode!r} (its task: every stage is "
                             "scored on it)")
        if not 0 < self.stage_share < 1:
            raise ValueError(f"stage_share must be in (0, 1), got {self.stage_share}")
        if "distill" in self.stages and len(self.teachers) < 2:
            raise ValueError("stage 'distill' maps between teachers, so it needs at least two")
        if self.fusion != "none" and len(self.teachers) < 2:
            raise ValueError(f"fusion {self.fusion!r} writes several teachers' embeddings into the lattice at once, so it "
                             "needs at least two teachers")
        if self.fusion != "none" and "distill" in [self.mode, *self.stages]:
            raise ValueError(f"fusion {self.fusion!r} with mode 'distill': a fused student already reads every answer "
                             "space out of one lattice; train it in mode 'dialogue' (or 'dual')")
        if self.mode == "distill" and len(self.teachers) < 2:
            raise ValueError("mode 'distill' maps between teachers, so it needs at least two")
        if self.mode == "distill" and self.cube.residual and not self.grad_clip:
            raise ValueError("mode 'distill' with cube.residual needs grad_clip > 0: predictions into another teacher's "
                             "space start at zero, where the cosine loss's gradient is ~1e7")
        for name in ("epochs", "batch_size", "workers", "cpus_per_worker", "report_every_samples", "round_eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.report_growth < math.inf:
            raise ValueError(f"report_growth must be a factor >= 1 (1: rounds evenly spaced), got {self.report_growth}")
        for name in ("report_every_s", "stage_budget_s"):
            if not 0 <= getattr(self, name) < math.inf:  # NaN fails too
                raise ValueError(f"{name} must be a number of seconds >= 0 (0: off), got {getattr(self, name)}")
        if self.batch_size < self.workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be at least workers ({self.workers})")
        if not 0 < self.lr < math.inf:  # NaN fails too
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.lr_fan_in < 0:
            raise ValueError(f"lr_fan_in must be >= 0 (0: one lr for every layer), got {self.lr_fan_in}")
        for name in ("weight_decay", "grad_clip", "momentum"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 1:
            raise ValueError(f"memory_budget_mb must be at least 1 (or unset: measured), got {self.memory_budget_mb}")
        check_gpu_count(self.gpus_per_worker, "gpus_per_worker")
        if self.use_gpu and not self.gpus_per_worker:
            raise ValueError("use_gpu needs gpus_per_worker > 0 (a fraction shares a GPU)")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**32 - 1], got {self.seed}")
        if self.loss.curriculum and self.loss.curriculum_warmup >= self.epochs:
            raise ValueError(f"loss.curriculum_warmup ({self.loss.curriculum_warmup}) must be below epochs "
                             f"({self.epochs}): the curriculum's step cap reaches cube.max_steps only after its warm-up")


@dataclasses.dataclass
class SearchConfig:
    """One search (`python -m cube_ray.tune`); saved as `<out>/<name>/search.yaml`, so `--resume` needs no flags."""

    space: str = "stage247"  # a name under search_spaces/ or a YAML path
    name: str = ""  # the experiment folder under `out`; "" = "<space>-<timestamp>"
    out: str = "results"
    store: str = ""  # the embedding store ("" = the default store)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    teachers: list[str] | None = None  # None: the teachers of the space's base preset
    teacher_config: str | None = None  # a YAML file of extra teacher specs
    num_samples: int = 200  # trials at most (a time budget usually ends a search first)
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs hold at once
    workers_per_trial: int = 1  # Ray Train workers of each trial
    # CPUs of each worker: on 2 cores two 1-CPU trials at once train ~1.6x the samples/s of one 2-CPU trial (the
    # default cube: 102 samples/s on 1 CPU, 129 on 2) and overlap one trial's start-up with the other's training.
    cpus_per_worker: int = 1
    use_gpu: bool = False  # every trial's Ray Train workers on GPUs
    gpus_per_worker: float = 1.0  # with use_gpu: each worker's share of a GPU (0.25: four trials per GPU)
    gpus_per_actor: float | None = None  # every teacher's extraction actors' GPUs (None: each teacher spec's `gpus`)
    # ASHA's clock: "cost", training seconds (a trial's steps only, measured in the trial: a config 10x slower
    # must be 10x better per second to pass a rung), or "samples", training samples of the task. It and ASHA's
    # first rung, None: the space file's `scheduler` settings
    asha_clock: typing.Literal["samples", "cost"] | None = None
    grace_s: float | None = None  # cost clock: training seconds every trial gets before it can be stopped
    grace_samples: int | None = None  # samples clock: samples every trial trains before it can be stopped
    reduction_factor: int | None = None  # keep the best 1/reduction_factor at each rung
    report_every_samples: int | None = None  # a round's length (None: the space's base preset's)
    keep_checkpoints: int = 2  # per trial: the best K by the eval metric (plus the latest)
    max_failures: int = 2  # retries of a trial after a crash (it resumes from its latest checkpoint)
    time_budget_s: float | None = None  # stop starting and running trials after this long
    # The whole search's wall time, from its start: the trials get what data preparation and extraction leave (at
    # most time_budget_s), less a reserve for the report, so a cold cache or a slow machine cannot make it overrun
    wall_budget_s: float | None = None
    # Cap every trial's epochs (and so ASHA's max_t) below the space's budget: a large cube on 20k pairs takes
    # hours per epoch budget on a laptop. The schedule then spans the capped run.
    max_epochs: int | None = None
    continue_from: str | None = None  # an earlier experiment of the same space whose finished trials the sampler knows
    seed: int = 0

    def with_absolute_paths(self) -> SearchConfig:
        """A copy whose every path is absolute. Ray Tune runs each trial in a working directory of its own, inside
        Ray's session folder, so a relative path read in a trial points there: the driver resolves them once,
        before Ray starts, and trials only ever see absolute paths."""
        absolute = lambda f: str(Path(f).absolute()) if f else f  # noqa: E731
        return dataclasses.replace(
            self, space=absolute(self.space) if Path(self.space).suffix else self.space, out=absolute(self.out),
            store=absolute(self.store), teacher_config=absolute(self.teacher_config),
            continue_from=absolute(self.continue_from), data=self.data.with_absolute_paths())

    def validate(self) -> None:
        for name in ("num_samples", "workers_per_trial", "cpus_per_worker", "keep_checkpoints", "grace_samples",
                     "report_every_samples",
                     "max_epochs", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        check_gpu_count(self.gpus_per_worker, "gpus_per_worker")
        if self.gpus_per_actor is not None:
            check_gpu_count(self.gpus_per_actor, "gpus_per_actor")
        if self.reduction_factor is not None and self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be at least 2, got {self.reduction_factor}")
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a folder name inside --out (no '/', not '.' or '..'), got {self.name!r}")
        if self.asha_clock not in (None, "samples", "cost"):
            raise ValueError(f"asha_clock must be 'samples' or 'cost', got {self.asha_clock!r}")
        if self.grace_s is not None and not 0 < self.grace_s < math.inf:
            raise ValueError(f"grace_s must be a positive number of seconds, got {self.grace_s}")
        for name in ("time_budget_s", "wall_budget_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or unset: no limit), got {value}")
        self.data.validate()


@dataclasses.dataclass
class InferConfig:
    """Inference only: no optimiser, no training state. Deterministic (seeded, deterministic algorithms)."""

    k: int = 5
    max_steps: int | None = None  # None: the checkpoint's cube max_steps
    timeout_s: float | None = 5.0
    seed: int = 0

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.timeout_s is not None and not 0 <= self.timeout_s < math.inf:
            raise ValueError(f"timeout_s must be a number >= 0 (or unset: no timeout), got {self.timeout_s}")
