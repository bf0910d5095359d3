"""python -m cube_ray.train [--config FILE | --preset NAME] [--store DIR] [--workers N] [--out DIR] [--resume]
[--init-from CHECKPOINT] [--use-gpu [--gpus-per-worker G] [--amp bf16]] [--gpus-per-actor G] [--seed S]"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from cube_ray.cli import add_gpus_per_actor, default_store, gpu_count, positive_int, seed_int, setup_logging
from cube_ray.config import TrainConfig, load_yaml
from cube_ray.experiment import INIT_FROM
from cube_ray.teachers.registry import load_registry
from cube_ray.train.run import fit, with_init_checkpoint
from cube_ray.train.snapshot import check_resume_config

PRESETS = Path(__file__).parent / "presets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cube_ray.train", description="Train the cube with Ray Train.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="a TrainConfig YAML file")
    src.add_argument("--preset", default="smoke", help=f"one of {sorted(f.stem for f in PRESETS.glob('*.yaml'))} (default: %(default)s)")
    p.add_argument("--store", default=default_store(), help="embedding store (default: %(default)s)")
    p.add_argument("--workers", type=positive_int, help="Ray Train workers (overrides the config)")
    p.add_argument("--out", default="results/train", help="output folder: checkpoints, eval samples (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--epochs-this-run", type=positive_int, help="stop after this many epochs (continue later with --resume)")
    p.add_argument("--init-from", help="start from this checkpoint (or a run folder's best_eval/): the weights that "
                                       "match are loaded, the rest left new (init_from.json in --out says which)")
    p.add_argument("--teacher-config", help="a YAML file of extra teacher specs")
    add_gpus_per_actor(p)
    p.add_argument("--use-gpu", action="store_true", help="train on GPUs (sets use_gpu: true; default: the config's)")
    p.add_argument("--gpus-per-worker", type=gpu_count, help="with use_gpu: each worker's share of a GPU (overrides the config)")
    p.add_argument("--amp", choices=["none", "bf16"], help="bf16 autocast of the forward passes (overrides the config)")
    p.add_argument("--seed", type=seed_int, help="seed of everything (overrides the config)")
    args = p.parse_args(argv)
    setup_logging()
    path = Path(args.config) if args.config else PRESETS / f"{args.preset}.yaml"
    if not path.exists():
        p.error(f"no such config: {path}")
    cfg = load_yaml(TrainConfig, path)
    if args.workers is not None:
        cfg.workers = args.workers
    if args.seed is not None:
        cfg.seed, cfg.data = args.seed, dataclasses.replace(cfg.data, seed=args.seed)
    if args.init_from is not None:
        cfg.init_from = args.init_from
    cfg.use_gpu = cfg.use_gpu or args.use_gpu
    cfg.gpus_per_worker = cfg.gpus_per_worker if args.gpus_per_worker is None else args.gpus_per_worker
    cfg.amp = args.amp or cfg.amp
    try:  # at the door: a resume with another config than the run's is a usage error, not a traceback
        cfg.validate()
        cfg = with_init_checkpoint(cfg)
        if args.resume:
            check_resume_config(cfg, Path(args.out).resolve())
    except ValueError as e:
        p.error(str(e))
    result = fit(cfg, args.store, args.out, resume=args.resume, registry=load_registry(args.teacher_config, args.gpus_per_actor),
                 stop_after=args.epochs_this_run)
    last = result.history[-1] if result.history else {}
    if (result.out / INIT_FROM).exists():
        summary = json.loads((result.out / INIT_FROM).read_text())
        print(f"started from {summary['from']}: loaded {', '.join(summary['loaded']) or 'nothing'}; "
              f"left new {', '.join(summary['new']) or 'nothing'}")
    print(f"\ntrained {len(result.history)} epoch(s){' (' + result.stopped + ')' if result.stopped else ''}; "
          f"last eval {last.get('eval', float('nan')):.4f}; checkpoints in {result.out}: latest, best_loss, best_eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
