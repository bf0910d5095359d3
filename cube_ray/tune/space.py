"""Search spaces as data: a YAML file -> a validated `SearchSpace` -> an Optuna define-by-run function.

Schema (see search_spaces/*.yaml):

    base: default            # a training preset (cube_ray/train/presets) the sampled values override
    start_at_base: true      # optional: the first trial is the base preset itself (see SearchSpace.base_point)
    points:                  # optional: trials to run next, before the sampler (values of some parameters; the
      - {cube/mixer: attention}            # sampler fills in the rest): Ray Tune's points_to_evaluate
    sampler: {n_startup_trials: 4}          # optional: Optuna TPESampler settings (SamplerSettings)
    scheduler: {grace_samples: 1024}        # optional: ASHA in training samples (SchedulerSettings)
    params:                  # order matters: a condition may only name an earlier parameter
      lr: {type: log-float, low: 1.0e-4, high: 3.0e-3}
      cube/dims: {type: categorical, choices: [[8, 8, 12], [6, 8, 16]]}
      cube/attention: {type: bool}
      cube/attention_heads: {type: categorical, choices: [1, 2, 4], when: {cube/attention: true}}

A parameter's name is the path of a TrainConfig field, parts joined by "/" (Ray Tune nests such names). Types:
float, log-float (low, high), int (low, high, optional step), categorical (choices; lists allowed), bool. `when`
maps earlier parameter names to the value they must have for this one to be sampled. Everything is checked before
any trial runs, and every error names the file, the parameter and the problem.

`epochs` is not a parameter: it is the budget ASHA hands out (a trial that survives every rung trains the base
preset's epochs, or `scheduler.epochs`), so no sampled value decides how long a trial may train.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

import yaml

from cube_ray.config import ConfigError, TrainConfig, flatten, from_dict, load_yaml, to_dict

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"
PRESETS = Path(__file__).resolve().parents[1] / "train" / "presets"
TYPES = ("float", "log-float", "int", "categorical", "bool")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    choices: tuple = ()
    when: tuple[tuple[str, Any], ...] = ()

    def suggest(self, trial) -> Any:
        if self.type in ("bool", "categorical"):
            return trial.suggest_categorical(self.name, list(self.distribution().choices))
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step or 1)
        return trial.suggest_float(self.name, self.low, self.high, log=self.type == "log-float")

    def distribution(self):
        """The Optuna distribution `suggest` samples from (to rebuild a study from finished trials)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "bool":
            return CategoricalDistribution([False, True])
        if self.type == "categorical":
            # Optuna's categorical choices must be scalars: lists travel as their JSON text (train_config decodes).
            return CategoricalDistribution([self.encode(c) for c in self.choices])
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.type == "log-float")

    def active(self, chosen: dict[str, Any]) -> bool:
        """Whether this parameter's conditions hold for the values `chosen` so far (as Optuna stores them)."""
        return all(chosen.get(k, _MISSING) == self.encode(v) for k, v in self.when)

    def holds(self, value: Any) -> bool:
        """Whether `value` (as a TrainConfig holds it) is one this parameter can take."""
        if self.type == "bool":
            return isinstance(value, bool)
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        return self.type != "int" or (float(value).is_integer() and (value - self.low) % (self.step or 1) == 0)

    def encode(self, value: Any) -> Any:
        """`value` as Optuna stores it (list choices travel as JSON text; train_config decodes them)."""
        return json.dumps(value) if isinstance(value, list) else value


@dataclasses.dataclass
class SamplerSettings:
    """Optuna's TPESampler, sized for searches of tens of trials (the space file's `sampler:` mapping)."""

    n_startup_trials: int = 4  # random trials before TPE models; Optuna's default of 10 is a whole search on a laptop
    multivariate: bool = True
    group: bool = True  # with multivariate: models each set of parameters that occur together (conditions)
    constant_liar: bool = True  # trials still running count as bad, so concurrent trials are not proposed as twins
    n_ei_candidates: int = 24

    def validate(self) -> None:
        if self.n_startup_trials < 0 or self.n_ei_candidates < 1:
            raise ValueError(f"need n_startup_trials >= 0 and n_ei_candidates >= 1, got {self.n_startup_trials}, "
                             f"{self.n_ei_candidates}")


@dataclasses.dataclass
class SchedulerSettings:
    """ASHA's rungs (the space file's `scheduler:` mapping): at grace_s x reduction_factor^k training seconds on the
    cost clock, at grace_samples x reduction_factor^k samples of the task on the samples clock."""

    clock: typing.Literal["samples", "cost"] = "cost"  # what the rungs count (SearchConfig.asha_clock)
    grace_s: float = 3.0  # cost clock: every trial trains this many seconds before ASHA may stop it
    grace_samples: int = 1024  # samples clock: every trial trains this many samples before ASHA may stop it
    reduction_factor: int = 3  # each rung keeps the best 1/reduction_factor
    epochs: int | None = None  # the budget of a trial no rung stopped (None: the base preset's epochs)

    def validate(self) -> None:
        if self.clock not in ("samples", "cost"):
            raise ValueError(f"need clock 'samples' or 'cost', got {self.clock!r}")
        if not 0 < self.grace_s < math.inf:
            raise ValueError(f"need grace_s > 0 (training seconds), got {self.grace_s}")
        if self.grace_samples < 1 or self.reduction_factor < 2 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"need grace_samples >= 1, reduction_factor >= 2 and epochs >= 1, got "
                             f"{self.grace_samples}, {self.reduction_factor}, {self.epochs}")


@dataclasses.dataclass
class SearchSpace:
    name: str
    base: TrainConfig
    params: list[Param]
    start_at_base: bool = False
    points: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # as Optuna stores them (lists as JSON)
    sampler: SamplerSettings = dataclasses.field(default_factory=SamplerSettings)
    scheduler: SchedulerSettings = dataclasses.field(default_factory=SchedulerSettings)

    def distributions(self) -> dict[str, Any]:
        """Each parameter's Optuna distribution: two spaces with the same ones can share trials (--continue-from)."""
        return {p.name: p.distribution() for p in self.params}

    def define_by_run(self, trial) -> dict | None:
        """For OptunaSearch(space=...): suggest each parameter whose conditions hold, in file order."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.name] = p.suggest(trial)
        return None

    def base_point(self) -> tuple[dict[str, Any], list[str]]:
        """The base preset as a point of this space, and the parameters whose range does not hold the base's value.

        A search that starts here (`start_at_base`) tries the hand-set config first, so its best is never worse on the
        picking split than where it started: a few random TPE start-up trials alone can all miss a config that works.
        Parameters outside their range, and those whose condition rests on one, are left to the sampler."""
        base = flatten(to_dict(self.base))
        point: dict[str, Any] = {}
        outside = []
        for p in self.params:
            if not p.active(point):
                continue
            if p.holds(base[p.name]):
                point[p.name] = p.encode(base[p.name])
            else:
                outside.append(p.name)
        return point, outside

    def train_config(self, sampled: dict[str, Any]) -> TrainConfig:
        """The base config with `sampled` values (flat "a/b" names or nested dicts) applied, validated."""
        data = to_dict(self.base)
        for name, value in flatten(sampled).items():
            node = data
            *parents, leaf = name.split("/")
            for part in parents:
                node = node[part]
            node[leaf] = json.loads(value) if isinstance(value, str) and value.startswith("[") else value
        return from_dict(TrainConfig, data, where=f"search space {self.name!r} trial config")


_MISSING = object()


def _field_type(name: str) -> Any:
    """The annotation of TrainConfig field `name` ("cube/dims" -> CubeConfig.dims), or None if there is none."""
    cls: Any = TrainConfig
    annotation = None
    for part in name.split("/"):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = cls = hints[part]
    return annotation


def _param(where: str, name: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"{where}: parameter {name!r}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'type', got {spec!r}")
    unknown = sorted(set(spec) - {"type", "low", "high", "step", "choices", "when"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}")
    if _field_type(name) is None:
        raise ConfigError(f"{where}: no such TrainConfig field (use '/' between parts, e.g. cube/channels)")
    kind = spec.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type must be one of {list(TYPES)}, got {kind!r}")
    if kind in ("float", "log-float", "int"):
        low, high = spec.get("low"), spec.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"{where}: needs numbers low < high, got low={low!r}, high={high!r}")
        if kind == "log-float" and low <= 0:
            raise ConfigError(f"{where}: log-float needs low > 0, got {low}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ConfigError(f"{where}: int needs whole-number bounds, got {low}, {high}")
    choices = spec.get("choices", [])
    if kind == "categorical" and (not isinstance(choices, list) or not choices):
        raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: 'when' must map earlier parameter names to values")
    for other, value in when.items():
        if other not in earlier:
            raise ConfigError(f"{where}: condition on {other!r}, which is not an earlier parameter")
        allowed = [False, True] if earlier[other].type == "bool" else list(earlier[other].choices)
        if allowed and value not in allowed:
            raise ConfigError(f"{where}: condition {other}={value!r} can never hold; {other} takes {allowed}")
    return Param(name, kind, spec.get("low"), spec.get("high"), spec.get("step"), tuple(choices), tuple(when.items()))


def _points(where: str, points: Any, params: dict[str, Param]) -> list[dict[str, Any]]:
    """The space's `points`, checked: each a mapping of its parameters to values they can take."""
    if not isinstance(points, list) or not all(isinstance(point, dict) and point for point in points):
        raise ConfigError(f"{where}: points must be a list of non-empty mappings of parameter names to values")
    for i, point in enumerate(points):
        for name, value in point.items():
            if name not in params:
                raise ConfigError(f"{where}: points[{i}]: {name!r} is not a parameter of this space")
            if not params[name].holds(value):
                raise ConfigError(f"{where}: points[{i}]: {name}={value!r} is outside the parameter's range or choices")
    return [{name: params[name].encode(value) for name, value in point.items()} for point in points]


def load_space(name_or_path: str | Path, teachers: list[str] | None = None) -> SearchSpace:
    """`stage247` (a file under search_spaces/) or a path to a YAML file; validated before any trial runs.
    `teachers` (a search's): they replace the base preset's before the choices are checked (fusion needs two)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SPACES / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SPACES.glob("*.yaml"))
        raise ConfigError(f"{path}: no such search space; known: {known}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"{path}: expected a mapping with a non-empty 'params' mapping")
    keys = ("base", "params", "start_at_base", "points", "sampler", "scheduler")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {unknown}; expected some of {list(keys)}")
    if "epochs" in data["params"]:
        raise ConfigError(f"{path}: parameter 'epochs' cannot be searched: it is the budget ASHA hands out (set "
                          "scheduler.epochs, or the base preset's epochs)")
    if not isinstance(data.get("start_at_base", False), bool):
        raise ConfigError(f"{path}: start_at_base must be true or false, got {data['start_at_base']!r}")
    base_path = PRESETS / f"{data.get('base', 'default')}.yaml"
    if not base_path.exists():
        raise ConfigError(f"{path}: base preset {data.get('base')!r} does not exist in {PRESETS}")
    params: dict[str, Param] = {}
    for pname, spec in data["params"].items():
        params[pname] = _param(str(path), pname, spec, params)
    base = load_yaml(TrainConfig, base_path)
    if teachers:
        base = dataclasses.replace(base, teachers=list(teachers))
    space = SearchSpace(path.stem, base, list(params.values()),
                        data.get("start_at_base", False), _points(str(path), data.get("points", []), params),
                        from_dict(SamplerSettings, data.get("sampler") or {}, where=f"{path}: sampler"),
                        from_dict(SchedulerSettings, data.get("scheduler") or {}, where=f"{path}: scheduler"))
    for p in space.params:  # every categorical choice must make a valid config on its own
        for choice in p.choices:
            try:
                space.train_config({p.name: choice})
            except ConfigError as e:
                raise ConfigError(f"{path}: parameter {p.name!r}: choice {choice!r} is invalid: {e}") from None
    return space
