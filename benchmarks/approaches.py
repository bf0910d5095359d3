"""The plan's breakthrough approaches against the plain residual student, at the same budget.

    python benchmarks/approaches.py [--epochs 4] [--approaches plain,stages,...] [--seed 0]

Each approach is the default preset (both bundled teachers, the 8x8x12 residual student) with one change, trained
with `fit` on the main job's data (the bundled sample's first 600 pairs per file, one article of the train file as
the `val` split that picks the checkpoint) for the same number of epochs, the same samples. Its best_eval/ (picked on
val) is then scored on the held-out eval split in each teacher space, next to identity. Approaches:

- plain:      the default preset;
- stages:     autoencoder -> dialogue, half the epochs each (cube_ray/train/stages.py);
- attention:  every step a transformer block over all cells (cube.mixer: attention);
- alternate:  local and attention steps in turn (cube.mixer: alternate);
- fusion-sum, fusion-concat: both teachers' embeddings of the text written into one lattice at once (fusion), one
  run of the cube read out into each teacher's space;
- pure, pure+stages: the plan's pure cube (residual: false), alone and with autoencoder pretraining, where the
  autoencoder stage has something to learn (a residual student starts at its optimum, the identity).

Seconds are the run's wall time (start-up, extraction cache hits and validation included). Prints a table and writes
results/bench_approaches.json; each run's folder stays under --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from cube_ray.cli import default_store
from cube_ray.config import DataConfig, TrainConfig, load_yaml
from cube_ray.evaluate import student_metrics
from cube_ray.metrics import dedup_pool, retrieval_metrics
from cube_ray.train.run import fit
from cube_ray.train.snapshot import load_for_eval

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "cube_ray" / "train" / "presets" / "default.yaml"
APPROACHES = {
    "plain": {},
    "stages": {"stages": ["autoencoder", "dialogue"], "stage_share": 0.5},
    "attention": {"cube": {"mixer": "attention"}},
    "alternate": {"cube": {"mixer": "alternate"}},
    "fusion-sum": {"fusion": "sum"},
    "fusion-concat": {"fusion": "concat"},
    "pure": {"cube": {"residual": False}},
    "pure+stages": {"cube": {"residual": False}, "stages": ["autoencoder", "dialogue"], "stage_share": 0.5},
}


def config(name: str, epochs: int, seed: int) -> TrainConfig:
    cfg = load_yaml(TrainConfig, PRESET)
    change = APPROACHES[name]
    cfg = dataclasses.replace(cfg, epochs=epochs, seed=seed, patience=0, workers=1, cpus_per_worker=2,
                              data=DataConfig(limit=600, val_fraction=0.25, seed=seed),
                              **{k: v for k, v in change.items() if k != "cube"})
    if "cube" in change:
        cfg.cube = dataclasses.replace(cfg.cube, **change["cube"])
    cfg.validate()
    return cfg


def run(name: str, epochs: int, seed: int, store: str, out: Path) -> dict:
    start = time.perf_counter()
    result = fit(config(name, epochs, seed), store, out / name)
    seconds = time.perf_counter() - start
    data = load_for_eval(out / name / "best_eval")
    held_out = student_metrics(data.student, data.held_out)
    pool = dedup_pool(data.held_out.answers)  # identity: the question as its own answer's prediction
    identity = {t: retrieval_metrics(q, pool.index, data.held_out.a[t][torch.as_tensor(pool.first)])["mrr"]
                for t, q in data.held_out.q.items()}
    return {"approach": name, "seconds": seconds, "samples_per_s": result.history[-1]["samples_per_s"],
            "picked_epoch": max(result.history, key=lambda h: h["eval"])["epoch"],
            "val_mrr": max(h["eval"] for h in result.history),
            "held_out_mrr": {t: m["mrr"] for t, m in held_out.items()}, "identity_mrr": identity}


def print_table(rows: list[dict]) -> None:
    teachers = list(rows[0]["held_out_mrr"])
    head = " | ".join(f"{t} MRR (identity)" for t in teachers)
    print(f"\n| approach | val MRR | {head} | picked epoch | samples/s | seconds |")
    print("|---" * (5 + len(teachers)) + "|")
    for r in rows:
        cells = " | ".join(f"{r['held_out_mrr'][t]:.3f} ({r['identity_mrr'][t]:.3f})" for t in teachers)
        print(f"| {r['approach']} | {r['val_mrr']:.3f} | {cells} | {r['picked_epoch']} | {r['samples_per_s']:.0f} | "
              f"{r['seconds']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--approaches", default=",".join(APPROACHES))
    p.add_argument("--store", default=default_store())
    p.add_argument("--out", help="run folders (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(ROOT / "results" / "bench_approaches.json"))
    args = p.parse_args()
    names = args.approaches.split(",")
    if unknown := sorted(set(names) - set(APPROACHES)):
        p.error(f"--approaches: unknown {unknown}; known: {sorted(APPROACHES)}")
    out = Path(args.out or tempfile.mkdtemp(prefix="approaches-"))
    rows = []
    for name in names:
        rows.append(run(name, args.epochs, args.seed, args.store, out))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"epochs": args.epochs, "seed": args.seed, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
