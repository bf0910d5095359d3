"""The search: Optuna proposes, ASHA stops, each trial trains the cube.

    run_search(SearchConfig) -> experiment folder <out>/<name>/

1. Make every path absolute (trials run in working directories of their own), load and validate the search space,
   prepare the data (the contamination check refuses a bad split here, before any trial) and extract every
   teacher's embeddings once; all trials read the same store.
2. A trial with one worker (the default) trains right inside its Tune trial (`fit_in_trial`: a function trainable
   holding the worker's CPUs, its process reused by the next trial), so it starts in a second or two instead of
   waiting ~30 s for a Ray Train controller, a worker group and their imports. A trial with several workers is a
   small driver (0 CPUs) that calls `fit`, whose Ray Train workers hold the CPUs; `TuneReportCallback` hands every
   round's metrics to Tune. Either way a restarted trial continues its own run from its latest checkpoint.
3. ASHA compares trials on `round_eval` (the picking split's fixed slice) at rungs on the search's clock: training
   seconds ("cost", the default: a config ten times slower must be ten times better per second to survive a rung;
   a staged trial's early stages end within the first rung) or training samples of the task ("samples"). On the
   cost clock a round comes every first rung's worth of seconds, so every trial is judged right after each rung.
   OptunaSearch (TPE with the space's settings, constant liar) samples define-by-run into the durable study of
   `study.py`.
4. `--resume` restores the Tuner: finished trials stay, unfinished ones continue, the study is the same file.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

from cube_ray.config import ConfigError, SearchConfig, flatten, load_yaml, save_yaml
from cube_ray.experiment import ASHA_STOPPED, CLOCK_STEP, DONE_TRAINING, FINISHED, ROUND_METRIC, SEARCH, TRIAL
from cube_ray.fsutil import atomic_write_text, folder_lock, recover_swap
from cube_ray.train.run import with_init_checkpoint
from cube_ray.train.timing import now, stamp
from cube_ray.tune.space import SearchSpace, load_space
from cube_ray.tune.study import copy_finished_trials, make_searcher

log = logging.getLogger("cube_ray.tune")

# the same for every trial of a search
SHARED = ("data", "teachers", "workers", "cpus_per_worker", "use_gpu", "gpus_per_worker")
# Of a wall budget, kept for what follows the trials: the last ones' teardown, the report, Ray's shutdown (32 s
# measured twice on 2 cores at half the usual matmul rate, with 8 and with 18 trials; the top-3 ensemble's row
# added 11 s to the report on a machine at a third of that rate)
REPORT_RESERVE_S = 55.0
MIN_TRIAL_BUDGET_S = 60.0  # what the trials get however little a wall budget leaves them: enough for a first round
TRIAL_DRIVER_MEMORY = 256 * 2**20


def asha(search: SearchConfig, space: SearchSpace, exp: Path, train_rows: int):
    """ASHA on `round_eval` at rungs on the search's clock (training seconds, or training samples of the task),
    recording each trial it stops in the experiment folder."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class RecordingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            # Ray's ASHA judges a result only at the highest rung it has reached. A report that passes several at
            # once (on the cost clock, a round charged with a step longer than a rung) would be judged only there,
            # where few trials or none are recorded yet, and so escape every rung below: judge it at each in turn.
            action = TrialScheduler.CONTINUE
            if result.get("samples_seen") == 0:  # a round before the first step, charged with it: see untrained_verdict
                action = untrained_verdict(self, trial, result)
            else:
                for rung in passed_rungs(self, trial, result):
                    action = super().on_trial_result(tune_controller, trial, {**result, self._time_attr: rung})
                    if action == TrialScheduler.STOP:
                        break
                else:
                    action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and not result.get(DONE_TRAINING):
                path = exp / ASHA_STOPPED
                stopped = json.loads(path.read_text()) if path.exists() else []
                atomic_write_text(path, json.dumps(sorted(set(stopped) | {trial.trial_id})))
            return action

    grace, factor = scheduler_settings(search, space)
    if asha_clock(search, space) == "cost":  # a trial ends by its epochs: rungs up to a day of training
        max_t = 86400.0
    else:
        max_t = trial_epochs(search, space) * epoch_samples(space, train_rows)
    # stop_last_trials=False: a trial that reaches max_t ends by itself, cleanly, instead of being killed
    return RecordingASHA(time_attr=CLOCK_STEP[asha_clock(search, space)], metric=ROUND_METRIC, mode="max",
                         max_t=max(max_t, grace), grace_period=grace, reduction_factor=factor, stop_last_trials=False)


def reached_rungs(scheduler, trial, result: dict) -> list[tuple[float, dict]] | None:
    """The rungs `result` has reached, lowest first, each (rung, {trial id: score}) as Ray's ASHAScheduler keeps them
    in the trial's bracket (highest first there); None where ASHA would not judge the result."""
    bracket, clock = scheduler._trial_info.get(trial.trial_id), result.get(scheduler._time_attr)
    if bracket is None or clock is None or scheduler._metric not in result:
        return None
    return sorted(((rung, recorded) for rung, recorded in bracket._rungs if rung <= clock), key=lambda r: r[0])


def passed_rungs(scheduler, trial, result: dict) -> list[float]:
    """The rungs below the highest that `result` reaches at which ASHA has not judged `trial` yet, lowest first."""
    reached = reached_rungs(scheduler, trial, result) or []
    judged = max((rung for rung, recorded in reached if trial.trial_id in recorded), default=0.0)
    return [rung for rung, _ in reached[:-1] if rung > judged]


def untrained_verdict(scheduler, trial, result: dict) -> str:
    """ASHA's verdict on a round before a trial's first step (a step longer than a rung, charged ahead): STOP where the
    trials that trained to a rung it passes beat its score there (its input's: it has learnt nothing), else CONTINUE.
    It is recorded at no rung: an untrained score would lower the bar every later trial is held to there."""
    from ray.tune.schedulers import TrialScheduler

    score = scheduler._metric_op * result.get(scheduler._metric, 0.0)
    bracket = scheduler._trial_info.get(trial.trial_id)
    for _, recorded in reached_rungs(scheduler, trial, result) or []:
        cutoff = bracket.cutoff(recorded)
        if cutoff is not None and score < cutoff:
            scheduler._num_stopped += 1
            return TrialScheduler.STOP
    return TrialScheduler.CONTINUE


def epoch_samples(space: SearchSpace, train_rows: int) -> int:
    """The most training samples an epoch counts (ASHA's time unit) for any batch size the space can sample: whole
    batches, the last one wrapping round the split, so up to a batch less one more than its rows. With max_t at
    epochs x rows, ASHA's top rung fell inside a trial's last epoch and stopped trials that were about to finish."""
    param = next((p for p in space.params if p.name == "batch_size"), None)
    batches = [space.base.batch_size] if param is None else list(param.choices) or [int(param.high)]
    return max(math.ceil(train_rows / b) * b for b in batches)


def asha_clock(search: SearchConfig, space: SearchSpace) -> str:
    """What ASHA's rungs count, "cost" (training seconds) or "samples": the command's, else the space file's."""
    return search.asha_clock or space.scheduler.clock


def scheduler_settings(search: SearchConfig, space: SearchSpace) -> tuple[float, int]:
    """ASHA's grace period (seconds on the cost clock, samples on the samples clock) and reduction factor: the
    command's, else the space file's."""
    grace = (search.grace_s or space.scheduler.grace_s) if asha_clock(search, space) == "cost" \
        else (search.grace_samples or space.scheduler.grace_samples)
    return grace, search.reduction_factor or space.scheduler.reduction_factor


def space_for(search: SearchConfig) -> SearchSpace:
    """The search space with the search's data, teachers, workers, retention and seed applied to its base."""
    space = load_space(search.space, search.teachers)
    shared = [p.name for p in space.params if p.name.split("/")[0] in SHARED]
    if shared:
        raise ConfigError(f"search space {search.space!r}: {shared} cannot be searched: every trial reads the same "
                          f"prepared data with the same teachers and workers ({', '.join(SHARED)} are fixed per search)")
    base = dataclasses.replace(space.base, data=search.data, workers=search.workers_per_trial,
                               cpus_per_worker=search.cpus_per_worker, use_gpu=search.use_gpu,
                               gpus_per_worker=search.gpus_per_worker, keep_checkpoints=search.keep_checkpoints, seed=search.seed,
                               epochs=trial_epochs(search, space),
                               report_every_samples=search.report_every_samples or space.base.report_every_samples,
                               **cost_rounds(search, space))
    base.validate()
    base = with_init_checkpoint(base)  # absolute: a trial resolves a relative path in its own working directory
    check_warmup_fits(search, space, base.epochs)
    return dataclasses.replace(space, base=base)


def cost_rounds(search: SearchConfig, space: SearchSpace) -> dict:
    """On the cost clock, a trial's rounds at ASHA's rungs (grace x factor^k training seconds): each rung is judged
    right after a trial reaches it, and no round is scored between two, where ASHA decides nothing."""
    if asha_clock(search, space) != "cost":
        return {"report_every_s": 0.0}
    grace, factor = scheduler_settings(search, space)
    return {"report_every_s": grace, "report_growth": float(factor)}


def check_warmup_fits(search: SearchConfig, space: SearchSpace, epochs: int) -> None:
    """Refuse a space whose curriculum can warm up for as long as a trial trains: its step cap would never reach
    max_steps, and the steps a model is scored with would be fewer than the space says."""
    params = {p.name: p for p in space.params}

    def values(name: str, default) -> list:
        p = params.get(name)
        if p is None:
            return [default]
        return [False, True] if p.type == "bool" else list(p.choices) or [p.low, p.high]

    if True not in values("loss/curriculum", space.base.loss.curriculum):
        return
    longest = max(values("loss/curriculum_warmup", space.base.loss.curriculum_warmup))
    if longest >= epochs:
        raise ConfigError(f"search space {search.space!r}: loss/curriculum_warmup can be {longest:g} epochs but a trial "
                          f"trains at most {epochs}: the curriculum's step cap would not reach cube/max_steps. Keep "
                          f"the warm-up below {epochs} epochs, or give trials more (scheduler.epochs, --max-epochs)")


def trial_epochs(search: SearchConfig, space: SearchSpace) -> int:
    """The epochs of a trial no rung stops (ASHA's max_t in epochs): the space's budget, capped by --max-epochs."""
    budget = space.scheduler.epochs or space.base.epochs
    return min(budget, search.max_epochs or budget)


def trial_config(config: dict, space: SearchSpace, search: SearchConfig):
    """The TrainConfig of one trial's sampled values (on the search's base: data, teachers, epochs budget). On the
    cost clock a staged trial's early stages end within stage_share of the first rung, so every trial meets that rung
    having trained the task it is scored on, and none holds a worker past it unjudged."""
    cfg = space.train_config(config)
    if asha_clock(search, space) == "cost" and cfg.stages:
        cfg = dataclasses.replace(cfg, stage_budget_s=cfg.stage_share * scheduler_settings(search, space)[0])
    cfg.validate()
    return cfg


def run_trial(config: dict, search: SearchConfig, space: SearchSpace, data) -> None:
    """One Tune trial: train the sampled config on the driver's prepared data, in the trial folder. With one worker
    (the default) the training loop runs right here (`fit_in_trial`); with several, a Ray Train run (`fit`)."""
    import ray.train
    import ray.tune

    from cube_ray.train.run import fit, fit_in_trial

    # The trial folder in the experiment (not Tune's local staging copy, which a stopped trial never syncs back):
    # checkpoints land where a restarted trial, --resume and the report look for them.
    started = now()
    trial_dir = experiment_dir(search) / f"trial_{ray.tune.get_context().get_trial_id()}"
    recover_swap(trial_dir / "latest")  # a restarted trial's killed save: before deciding whether to resume
    cfg = trial_config(config, space, search)
    trial_dir.mkdir(parents=True, exist_ok=True)  # the sampled values, flat, beside the trial's checkpoints
    atomic_write_text(trial_dir / TRIAL, json.dumps(flatten(config)))
    stamp(trial_dir, "trial", start=started, fit_start=now())
    resume = (trial_dir / "latest").exists()
    if search.workers_per_trial == 1:
        result = fit_in_trial(cfg, trial_dir, data, resume)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        prune_unregistered_checkpoints(trial_dir / "train")
        # lock=False: the search's driver holds the experiment's lock, and this trial alone writes its folder.
        # A crashed worker fails the Train run and Tune retries the trial (FailureConfig in _tuner), which resumes
        # from latest/. Ray Train's own retry is off: when Tune stops a trial, its controller can see its worker
        # killed first and start a new worker group, whose placement group (1 CPU) outlives the dying controller
        # and stays reserved for the rest of the search (seen here: a later 2-CPU extraction then waited forever).
        result = fit(cfg, search.store, trial_dir, resume=resume, data=data, lock=False,
                     run_config_kwargs={"name": "train", "storage_path": str(trial_dir),
                                        "callbacks": [TuneReportCallback()],
                                        "failure_config": ray.train.FailureConfig(max_failures=0)})
    atomic_write_text(trial_dir / FINISHED, json.dumps({"epochs": len(result.history), "stopped": result.stopped}))
    stamp(trial_dir, "trial", fit_end=now())


def drop_optimisers(trial_dir: Path) -> int:
    """Drop the optimiser's state from every checkpoint of a trial that has ended (ASHA stopped it, it finished, or
    the budget cut it): only a run that continues needs it, and it is about two thirds of a checkpoint's bytes.
    Returns how many checkpoints held one. Folders being saved or swapped (`.tmp-`, `.old-`) are left alone."""
    from cube_ray.checkpoint import drop_optimiser

    folders = [f.parent for f in trial_dir.rglob("checkpoint.json")
               if not any(part.startswith(".") for part in f.parent.relative_to(trial_dir).parts)]
    return sum(drop_optimiser(folder) for folder in folders)


def drop_ended_optimisers(exp: Path):
    """A Tune callback: a trial's checkpoints lose their optimiser state as the trial ends, so a search's disk holds
    weights, not AdamW's moments, of the trials it is done with (the driver sweeps every trial again after `fit`)."""
    import ray.tune

    class DropEndedOptimisers(ray.tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            drop_optimisers(exp / f"trial_{trial.trial_id}")

    return DropEndedOptimisers()


def prune_unregistered_checkpoints(run_dir: Path) -> list[str]:
    """Delete checkpoint folders of a Train run that Ray's checkpoint manager never registered.

    A hard kill between Ray persisting a checkpoint and recording it leaves a folder that retention never deletes;
    a restarted trial calls this before its run resumes, so disk use stays bounded by the retention setting."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    known = set(_values(json.loads(snapshot.read_text()), "checkpoint_dir_name"))
    orphans = [d for d in run_dir.glob("checkpoint_*") if d.is_dir() and d.name not in known]
    for d in orphans:
        log.warning("removing checkpoint %s: Ray never registered it (the run was killed while saving)", d)
        shutil.rmtree(d)
    return [d.name for d in orphans]


def _values(node, key: str):
    """Every value stored under `key` anywhere in a JSON tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


def experiment_dir(search: SearchConfig) -> Path:
    if not Path(search.out).is_absolute():  # inside a trial, a relative path would point into Ray's session folder
        raise ValueError(f"out must be absolute here (SearchConfig.with_absolute_paths), got {search.out!r}")
    return Path(search.out) / search.name


def _tuner(search: SearchConfig, space: SearchSpace, data, restore: bool):
    import ray.tune

    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, search=search, space=space, data=data),
                                        trial_resources(search, space))
    exp = experiment_dir(search)
    if restore:
        return ray.tune.Tuner.restore(str(exp), trainable, resume_errored=True)
    known = copy_finished_trials(Path(search.continue_from), exp, space) if search.continue_from else 0
    # metric and mode live in the searcher and the scheduler only (Tune refuses them in both places); an earlier
    # experiment that is continued has tried the base preset already
    searcher = make_searcher(space, exp, search.seed, start_points(space) if not known else None,
                             base=space.base_point()[0] if space.start_at_base and not known else None)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=asha(search, space, exp, data.rows),
                                        num_samples=search.num_samples,
                                        max_concurrent_trials=concurrency(search, space),
                                        time_budget_s=search.time_budget_s,
                                        # a 1-worker trial's process (imports, the loaded kernel) serves the next
                                        # trial: the loop seeds and builds everything afresh per trial
                                        reuse_actors=search.workers_per_trial == 1,
                                        trial_dirname_creator=lambda trial: f"trial_{trial.trial_id}"),
        run_config=ray.tune.RunConfig(name=search.name, storage_path=str(exp.parent),
                                      callbacks=[drop_ended_optimisers(exp)],
                                      # the epochs' checkpoints a 1-worker trial reports: Tune keeps the best K
                                      checkpoint_config=ray.tune.CheckpointConfig(
                                          num_to_keep=search.keep_checkpoints, checkpoint_score_attribute="eval",
                                          checkpoint_score_order="max"),
                                      failure_config=ray.tune.FailureConfig(max_failures=search.max_failures)))


def trial_resources(search: SearchConfig, space: SearchSpace) -> dict:
    """What a trial reserves. A 1-worker trial trains in its own process: the worker's CPUs (and GPU share). A
    Ray Train trial's driver reserves no CPU (its Train workers hold them); Tune needs a non-empty request, so
    memory."""
    if search.workers_per_trial > 1:
        return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    return {"CPU": space.base.cpus_per_worker, **({"GPU": space.base.gpus_per_worker} if space.base.use_gpu else {})}


def start_points(space: SearchSpace) -> list[dict] | None:
    """The trials Optuna runs before it samples: the base preset, where the space says `start_at_base`, then the
    space's `points`."""
    if not space.start_at_base:
        return space.points or None
    point, outside = space.base_point()
    log.info("first trial: the base preset%s", f" ({', '.join(outside)} sampled: the base value is outside the space)"
             if outside else "")
    return [point, *space.points]


def concurrency(search: SearchConfig, space: SearchSpace) -> int:
    """Trials at once: as many as the cluster's CPUs (and, with use_gpu, its GPUs) hold (a trial's driver takes
    none; its workers take workers x cpus_per_worker, and x gpus_per_worker), unless --max-concurrent says otherwise."""
    import ray

    if search.max_concurrent:
        return search.max_concurrent
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1)) // (search.workers_per_trial * space.base.cpus_per_worker)
    if space.base.use_gpu:  # an autoscaling cluster may have no GPU yet: then one trial, which brings a GPU node
        fits = min(fits, int(resources.get("GPU", 0) // (search.workers_per_trial * space.base.gpus_per_worker)))
    return max(1, fits)


def check_own_experiment(exp: Path) -> None:
    """Ray Tune restores a search from its own pickles (tuner.pkl, the searcher's state), and unpickling runs code:
    resume only experiments this user owns and no one else can write into."""
    import os

    info = exp.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"--resume: {exp} belongs to user id {info.st_uid}, not you ({os.getuid()}): Ray restores "
                              "a search from pickles, which run code; resume only your own experiments")
    if info.st_mode & 0o002:
        raise PermissionError(f"--resume: {exp} is writable by everyone (mode {info.st_mode & 0o777:o}): anyone could "
                              f"have replaced the pickles Ray restores from; chmod o-w {exp} if you trust its contents")


def run_search(search: SearchConfig, address: str | None = None, resume: bool = False) -> Path:
    """Run (or with `resume`, continue) the search; returns the experiment folder holding report.md."""
    start = time.time()
    search = search.with_absolute_paths()  # before Ray starts: trials run in working directories of their own
    exp = experiment_dir(search)
    if resume:
        if not (exp / SEARCH).exists():
            raise FileNotFoundError(f"--resume: {exp / SEARCH} does not exist; nothing to resume")
        check_own_experiment(exp)
    # This driver holds the experiment's lock for the whole search, from before any work (search.yaml is written only
    # after extraction): a second search with the same --name, or a --resume of it, is refused at once. The trials
    # write inside the folder from processes of their own and take no lock (fit(lock=False)).
    with folder_lock(exp, "search"):
        return _search(search, exp, address, resume, start)


def _search(search: SearchConfig, exp: Path, address: str | None, resume: bool, start: float) -> Path:
    from cube_ray.cli import default_store, init_ray
    from cube_ray.report import build_report
    from cube_ray.teachers.registry import load_registry
    from cube_ray.train.run import embed_held_out, prepare_run

    saved = exp / SEARCH
    if resume:
        # the saved settings win; the folder is wherever the experiment is now
        search = dataclasses.replace(load_yaml(SearchConfig, saved), out=str(exp.parent), name=exp.name)
    elif saved.exists():
        raise FileExistsError(f"{exp} already holds an experiment; pass --resume to continue it, or choose another --name")
    search = dataclasses.replace(search, store=search.store or default_store()).with_absolute_paths()
    exp = experiment_dir(search)
    search.validate()
    if search.continue_from and not (Path(search.continue_from) / SEARCH).exists():
        raise FileNotFoundError(f"--continue-from {search.continue_from}: not an experiment folder (no search.yaml)")
    registry = load_registry(search.teacher_config, search.gpus_per_actor)
    space = space_for(search)  # a malformed space fails here, before Ray starts
    grace, factor = scheduler_settings(search, space)  # saved as used, so the report and --resume read them
    clock = asha_clock(search, space)
    search = dataclasses.replace(search, asha_clock=clock, reduction_factor=factor,
                                 **{"grace_s" if clock == "cost" else "grace_samples": grace},
                                 report_every_samples=space.base.report_every_samples)
    init_ray(address)
    require_state_api()
    # Once for all trials: data preparation (the contamination check refuses a bad split here), extraction of
    # whatever the store lacks, and the per-worker train shards.
    data = prepare_run(space.base, search.store, registry, held_out_later=True)
    exp.mkdir(parents=True, exist_ok=True)
    save_yaml(search, saved)
    budget = trial_budget(search, start, data.held_out_s or 0.0)
    _tuner(dataclasses.replace(search, time_budget_s=budget), space, data, restore=resume).fit()
    for run_dir in exp.glob("trial_*/train"):  # trials ASHA killed may have left an unregistered checkpoint
        prune_unregistered_checkpoints(run_dir)
    for trial_dir in exp.glob("trial_*"):  # every trial has ended: none needs its optimiser state any more
        drop_optimisers(trial_dir)
    embed_held_out(data)  # the report's held-out table needs it; the trials did not
    _log_elapsed(exp, time.time() - start)
    build_report(exp)
    return exp


def trial_budget(search: SearchConfig, start: float, held_out_s: float = 0.0) -> float | None:
    """The trials' time budget: time_budget_s, cut to what wall_budget_s leaves after the search's set-up (data
    preparation, extraction), the held-out split's extraction after the trials (`held_out_s`, expected) and the
    report's reserve. (A resumed Tuner keeps the budget of its first session.)"""
    if not search.wall_budget_s:
        return search.time_budget_s
    set_up = time.time() - start
    left = search.wall_budget_s - set_up - held_out_s - REPORT_RESERVE_S
    if left < MIN_TRIAL_BUDGET_S:
        log.warning("the wall budget (%.0f s) leaves the trials %.0f s after set-up; they get %.0f s, so the search "
                    "overruns it", search.wall_budget_s, left, MIN_TRIAL_BUDGET_S)
        left = MIN_TRIAL_BUDGET_S
    budget = min(left, search.time_budget_s or left)
    log.info("trials: %.0f s (the wall budget of %.0f s less %.0f s of set-up, %.0f s to embed the held-out split "
             "after them and %.0f s kept for the report)", budget, search.wall_budget_s, set_up, held_out_s,
             REPORT_RESERVE_S)
    return budget


def require_state_api() -> None:
    """ASHA stops a trial by killing its actor; Ray Train's placement-group cleaner then frees the trial's CPUs, but
    only if it can ask the state API (served by the dashboard) that the trial's controller is dead. Without it the
    CPUs leak and the next trials wait forever, so refuse to start."""
    from ray.util.state import list_nodes

    try:
        list_nodes(limit=1, timeout=15)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing here
        raise RuntimeError("the search needs Ray's state API (the dashboard: install ray[default], and do not start the "
                           f"cluster with --include-dashboard=false): {e}") from None


def _log_elapsed(exp: Path, seconds: float) -> None:
    """Add this driver session's wall time to the experiment's (resumed sessions add up)."""
    path = exp / "sessions.json"
    sessions = json.loads(path.read_text()) if path.exists() else []
    atomic_write_text(path, json.dumps(sessions + [round(seconds, 1)]))
