"""Training throughput: Ray Train (1 and 2 workers) against a plain PyTorch loop on the same cube and data.

    python benchmarks/train.py [--epochs 3] [--limit 1000] [--seed 0]

All runs train the default cube (8x8x12 lattice, 8 channels, 8 steps, learned_linear adapters) on the bundled
sample's minilm embeddings with the same global batch (64), loss and optimiser. The plain loop calls the very
`train_step` the Ray workers run, in this process, so the ratio isolates what Ray Train costs. samples/s counts
training steps only (each epoch's validation is excluded on both sides); peak RSS is per worker (the largest).
Prints a table and writes results/bench_train.json. Targets: Ray 1 worker >= 0.85x the plain loop; < 2 GB per worker.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import tempfile
import time
from pathlib import Path

import ray
import torch

from cube_ray.cli import default_store
from cube_ray.config import DataConfig, TrainConfig
from cube_ray.data.prepare import prepare
from cube_ray.losses.combine import CombinedLoss
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig
from cube_ray.store import EmbeddingStore
from cube_ray.teachers import get_teacher
from cube_ray.train.batching import BatchSizer
from cube_ray.train.data import load_split
from cube_ray.train.run import fit
from cube_ray.train.snapshot import build_student
from cube_ray.train.state import Run, TrainState, seed_everything
from cube_ray.train.step import take, train_step

RESULTS = Path(__file__).resolve().parents[1] / "results"


def plain_loop(cfg: TrainConfig, store: EmbeddingStore, dataset_id: str) -> float:
    """samples/s of the same steps, with no Ray: one process, the whole batch, cfg.cpus_per_worker threads."""
    torch.set_num_threads(cfg.cpus_per_worker)
    train = load_split(store, dataset_id, "train", {"minilm": get_teacher("minilm")})
    seed_everything(cfg.seed)
    student = build_student(cfg, {"minilm": train.q["minilm"].shape[1]})
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(cfg, student, TrainState(), Path(tempfile.mkdtemp()), 0, train)
    sizer, loss_fn = BatchSizer(cfg.batch_size, 2**40), CombinedLoss(cfg.loss)
    steps = math.ceil(len(train) / cfg.batch_size)
    seconds = 0.0
    for epoch in range(cfg.epochs):
        student.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        for step in range(steps):
            idx = order[torch.arange(step * cfg.batch_size, (step + 1) * cfg.batch_size) % len(train)]
            train_step(run, loss_fn, student, optimizer, sizer, take(train, idx))
        seconds += time.perf_counter() - start
    return steps * cfg.batch_size * cfg.epochs / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    base = TrainConfig(teachers=["minilm"], data=DataConfig(limit=args.limit, seed=args.seed),
                       cube=CubeConfig(dims=[8, 8, 12], channels=8, min_steps=2, max_steps=8),
                       adapter=AdapterConfig(), loss=LossConfig(cosine=1.0, infonce=0.5, think=0.01),
                       epochs=args.epochs, batch_size=64, lr=2e-3, eval_samples=0, seed=args.seed, schedule="none")
    store = EmbeddingStore(default_store())
    dataset_id = prepare(base.data, store.root).dataset_id
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, cfg in (("ray 1 worker x 2 threads", dataclasses.replace(base, workers=1, cpus_per_worker=2)),
                           ("ray 2 workers x 1 thread", dataclasses.replace(base, workers=2, cpus_per_worker=1))):
            history = fit(cfg, store.root, Path(tmp) / label.replace(" ", "_")).history
            # The first epoch carries warm-up (allocator, oneDNN kernels): count the later ones, as for the plain loop.
            rate = sum(h["samples_per_s"] for h in history[1:]) / max(1, len(history) - 1)
            rows.append({"run": label, "samples_per_s": rate, "peak_rss_mb": max(h["peak_rss_mb"] for h in history)})
    ray.shutdown()
    plain = plain_loop(dataclasses.replace(base, cpus_per_worker=2), store, dataset_id)
    rows.insert(0, {"run": "plain PyTorch x 2 threads", "samples_per_s": plain,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    for r in rows:
        r["ratio_to_plain"] = r["samples_per_s"] / plain
    print(f"\n{'run':<28} {'samples/s':>10} {'x plain':>8} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['run']:<28} {r['samples_per_s']:>10.1f} {r['ratio_to_plain']:>8.2f} {r['peak_rss_mb']:>12.0f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "train", "cube": dataclasses.asdict(base.cube), "batch_size": base.batch_size,
           "epochs": args.epochs, "rows": rows, "targets": {"ray_1_worker_ratio": 0.85, "peak_rss_mb": 2048},
           "note": "the plain loop's peak RSS is the benchmark driver's, which also ran Ray's driver side"}
    (RESULTS / "bench_train.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'bench_train.json'}")


if __name__ == "__main__":
    main()
