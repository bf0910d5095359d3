"""python -m cube_ray.tune --space stage247 [--num-samples N] [--max-concurrent K] [--workers-per-trial W]
[--teachers a,b] [--pairs FILE] [--eval-pairs FILE] [--address auto] [--name EXP] [--out DIR] [--resume] [--seed S]
[--time-budget-s T] [--max-epochs E] [--val-fraction F] [--asha-clock cost|samples] [--grace-s S] [--grace-samples N]
[--reduction-factor F] [--report-every-samples N] [--continue-from EXP_DIR]"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cube_ray.cli import (add_data_args, data_config, float_at_least, given_options, gpu_count, int_in, positive_int,
                          setup_logging)
from cube_ray.config import SearchConfig, flatten, load_yaml, to_dict
from cube_ray.experiment import SEARCH

# The bundled sample is cut to this many pairs per file by default: cold SmolLM2 extraction runs at ~12 texts/s on
# 2 cores, so the whole sample (~6,500 texts) would take ~9 minutes before the first trial. 600 pairs of each file
# (~2,000 texts) keep the cold default run inside 15 minutes. --limit or --pairs change it.
SAMPLE_LIMIT = 600
# Those 600 train pairs are 4 SQuAD articles: one of them (204 pairs) becomes the val split that picks the models, so
# the report's held-out table is on the eval file's 600 pairs, which picked nothing.
SAMPLE_VAL_FRACTION = 0.25
# ... and the trials get 10 minutes: cold extraction (~3.5 min), the search and the report finish in ~14 minutes on 2 cores.
TIME_BUDGET_S = 600
# On a slower machine (or a busy one) extraction takes longer (5.5 min on a 2-core machine with half the matmul rate):
# the bundled default's whole search, set-up and report included, keeps to 14 minutes, so the README's first
# command (pip's ~25 s included) ends within 15; the trials get what extraction leaves, at most TIME_BUDGET_S.
SAMPLE_WALL_BUDGET_S = 840
# On the sample's 396 train pairs (an epoch is 448 samples, ~3 s of the default cube on one CPU) a trial no rung stops
# trains 4 epochs. stage247's cost clock judges trials at 3, 9, 27 s of training; with --asha-clock samples, rounds
# and grace of 512 samples (rungs at 512 and 1,536).
SAMPLE_SCHEDULE = {"report_every_samples": 512, "grace_samples": 512, "max_epochs": 4}
# What a resume takes from its command line: where the experiment is and the cluster to run on. Every other flag is a
# search setting, which a resume takes from the saved search.yaml instead (--space only finds the experiment, so it
# must name the saved one).
PER_SESSION = {"address", "name", "out", "resume"}
DATA_FLAGS = {"pairs", "eval_pairs", "limit", "decontaminate", "val_fraction"}  # SearchConfig.data's fields


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cube_ray.tune", description="Search the cube's architecture and "
                                "loss weights with Ray Tune (Optuna TPE + ASHA); each trial trains with Ray Train.")
    p.add_argument("--space", default="stage247", help="a search space under search_spaces/ or a YAML path (default: %(default)s)")
    p.add_argument("--num-samples", type=positive_int, default=SearchConfig.num_samples, help="trials (default: %(default)s)")
    p.add_argument("--max-concurrent", type=positive_int, help="trials at once (default: as many as the cluster's CPUs hold)")
    p.add_argument("--workers-per-trial", type=positive_int, default=1, help="Ray Train workers per trial (default: %(default)s)")
    p.add_argument("--cpus-per-worker", type=positive_int, default=SearchConfig.cpus_per_worker,
                   help="CPUs of each Ray Train worker (default: %(default)s: on 2 cores, two 1-CPU trials at once beat one 2-CPU trial)")
    p.add_argument("--use-gpu", action="store_true", help="train every trial's workers on GPUs (default: CPUs)")
    p.add_argument("--gpus-per-worker", type=gpu_count, default=SearchConfig.gpus_per_worker,
                   help="with --use-gpu: each worker's share of a GPU; 0.25 runs four trials per GPU (default: %(default)s)")
    p.add_argument("--teachers", help="comma-separated teacher names (default: the space's base preset's)")
    p.add_argument("--name", help="experiment name: the folder under --out (default: <space>-<timestamp>; with "
                   "--resume, the newest experiment of --space under --out)")
    p.add_argument("--out", default="results", help="where experiments live (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment with its saved settings "
                   "(a search flag that differs from them is refused)")
    p.add_argument("--time-budget-s", type=float_at_least(0.0), default=TIME_BUDGET_S,
                   help="stop the search (not extraction) after this many seconds; 0 = no limit (default: %(default)s)")
    p.add_argument("--wall-budget-s", type=float_at_least(0.0), help="the whole search's wall time, set-up, extraction "
                   f"and report included: the trials get what is left, at most --time-budget-s; 0 = no limit (default: "
                   f"{SAMPLE_WALL_BUDGET_S} on the bundled sample, else no limit)")
    p.add_argument("--max-epochs", type=positive_int, help="cap every trial's epochs, whatever the space samples (default: no cap)")
    p.add_argument("--asha-clock", choices=["cost", "samples"],
                   help="what ASHA's rungs count: cost, a trial's training seconds (a config 10x slower must be 10x "
                   "better per second), or samples, its training samples of the task (default: the space file's "
                   "scheduler.clock)")
    p.add_argument("--grace-s", type=float_at_least(0.01), help="ASHA on the cost clock: training seconds before a "
                   "trial can be stopped, and a round's length (default: the space file's scheduler.grace_s)")
    p.add_argument("--grace-samples", type=positive_int, help="ASHA on the samples clock: training samples before a "
                   "trial can be stopped (default: the space file's scheduler.grace_samples)")
    p.add_argument("--reduction-factor", type=int_in(2), help="ASHA reduction factor (default: the space file's)")
    p.add_argument("--report-every-samples", type=positive_int, help="a round: trials report to Tune every this many "
                   "training samples (default: the space's base preset's report_every_samples)")
    p.add_argument("--continue-from", help="an earlier experiment folder of the same space: the new search's sampler "
                   "starts knowing its finished trials (not re-run)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=SearchConfig.keep_checkpoints, help="best checkpoints kept per trial (default: %(default)s)")
    add_data_args(p)
    args = p.parse_args(argv)
    given = given_options(p, argv)  # before the sample defaults below fill some in
    setup_logging()
    if args.limit is None and args.pairs is None:  # the embedded defaults: sized to finish in 15 minutes on 2 cores
        args.limit = SAMPLE_LIMIT
        args.val_fraction = SAMPLE_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        for key, value in {**SAMPLE_SCHEDULE, "wall_budget_s": SAMPLE_WALL_BUDGET_S}.items():
            setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    try:  # every value checked before any work starts
        if args.resume:
            name = args.name or newest_experiment(Path(args.out), Path(args.space).stem)
            if name is None:
                p.error(f"--resume: no experiment of space {args.space!r} under {args.out}; pass --name")
            search = SearchConfig(name=name, out=args.out)
            search.validate()  # the name, before it is read as a path
            refuse_changed_settings(args, given - PER_SESSION, Path(args.out) / name / SEARCH)
        else:  # paths as given: run_search makes them absolute before Ray starts
            search = search_from_flags(args, args.name or f"{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
            search.validate()
    except ValueError as e:  # a ConfigError too
        p.error(str(e))
    from cube_ray.tune.runner import run_search

    exp = run_search(search, address=args.address, resume=args.resume)
    print(f"\nreport: {exp / 'report.md'}\nbest checkpoint: {(exp / 'best_checkpoint').read_text().strip()}")
    return 0


def search_from_flags(args: argparse.Namespace, name: str) -> SearchConfig:
    return SearchConfig(
        space=args.space, name=name, out=args.out, store=args.store, data=data_config(args),
        teachers=args.teachers.split(",") if args.teachers else None, teacher_config=args.teacher_config,
        num_samples=args.num_samples, max_concurrent=args.max_concurrent, workers_per_trial=args.workers_per_trial,
        cpus_per_worker=args.cpus_per_worker, use_gpu=args.use_gpu, gpus_per_worker=args.gpus_per_worker,
        gpus_per_actor=args.gpus_per_actor, asha_clock=args.asha_clock, grace_s=args.grace_s,
        grace_samples=args.grace_samples, reduction_factor=args.reduction_factor,
        report_every_samples=args.report_every_samples, keep_checkpoints=args.keep_checkpoints,
        time_budget_s=args.time_budget_s or None, wall_budget_s=args.wall_budget_s or None,
        max_epochs=args.max_epochs, continue_from=args.continue_from,
        seed=args.seed)


def refuse_changed_settings(args: argparse.Namespace, flags: set[str], saved_at: Path) -> None:
    """A resume runs with the saved settings, so a search flag given with --resume would be silently ignored: refuse
    each one whose value differs from the saved experiment's (one that repeats it is harmless)."""
    if not flags or not saved_at.exists():  # run_search says that there is nothing to resume
        return
    saved = load_yaml(SearchConfig, saved_at)
    # what these flags would have saved, beside what was: both with absolute paths, as run_search saves them
    before = flatten(to_dict(saved))
    now = flatten(to_dict(search_from_flags(args, saved.name).with_absolute_paths()))
    key = lambda flag: f"data/{flag}" if flag in DATA_FLAGS else flag  # noqa: E731
    if "space" in flags:  # a name or a file of search_spaces/, saved absolute: the same space by its stem
        before["space"], now["space"] = Path(saved.space).stem, Path(args.space).stem
    differ = [f"--{flag.replace('_', '-')} {shown(now[key(flag)])} (saved: {shown(before[key(flag)])})"
              for flag in sorted(flags) if now[key(flag)] != before[key(flag)]]
    if differ:
        raise ValueError(f"--resume continues {saved_at} with its saved settings, and these flags differ from them: "
                         f"{', '.join(differ)}; drop them, or start a new experiment (another --name)")


def shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):  # --teachers
        return ",".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def newest_experiment(out: Path, space: str) -> str | None:
    found = sorted(out.glob(f"{space}-*/search.yaml"), key=lambda f: f.stat().st_mtime)
    return found[-1].parent.name if found else None


if __name__ == "__main__":
    sys.exit(main())
