"""Scale: 100,000 pairs streamed from the Parquet store into one epoch of Ray Train, with bounded memory.

    python benchmarks/scale.py [--pairs 100000] [--workers 2] [--json results/bench_scale.json] [--seed 0]

The pairs are synthetic (distinct texts, 4 pairs per document) and the store holds precomputed valid embeddings
(random unit vectors, 384-d, written shard by shard under the minilm fingerprint), so the run measures the data
path, not an hour of teacher time. The data path is the real one: `fit` prepares and checks the split, finds the
store complete, streams the train split through `pairs_dataset` (one scan of the store per 8,192 pairs) into one
materialised shard per worker, and trains one epoch of a small cube.

Measured: wall time per phase, the driver's peak RSS (this process) and each worker's, against the size of the
embeddings on disk: nothing may hold the whole store in the driver. Prints a table; writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from cube_ray.config import DataConfig, TrainConfig
from cube_ray.data.prepare import prepare
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig
from cube_ray.store import SHARD_SIZE, EmbeddingStore, shard_order
from cube_ray.teachers.registry import get_teacher

RESULTS = Path(__file__).resolve().parents[1] / "results"
WIDTH = 384


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pairs(path: Path, n: int, seed: int, prefix: str) -> None:
    rng = np.random.default_rng(seed)
    words = np.array("cube lattice teacher student answer question river castle engine garden theory market "
                     "signal protein planet language music history ocean winter".split())
    with open(path, "w") as f:
        for i in range(n):
            topic = " ".join(rng.choice(words, 3))
            f.write(json.dumps({"id": f"{prefix}{i}", "doc_id": f"{prefix}doc{i // 4}",
                                "question": f"What does {prefix} record {i} say about the {topic}?",
                                "answer": f"Record {prefix}{i} says the {topic} matters in case {i * 7 % 1000}."}) + "\n")


def fill_store(store: EmbeddingStore, texts: list[str], seed: int) -> int:
    """Write valid embeddings of `texts` under the minilm fingerprint, one shard at a time; returns bytes on disk."""
    rng = np.random.default_rng(seed)
    ordered = shard_order(texts)
    entry = store.entry(get_teacher("minilm"), ordered)
    for i in range(entry.n_shards):
        chunk = ordered[i * SHARD_SIZE:(i + 1) * SHARD_SIZE]
        emb = rng.standard_normal((len(chunk), WIDTH)).astype(np.float32)
        entry.write_shard(i, chunk, emb / np.linalg.norm(emb, axis=1, keepdims=True))
    entry.finish(WIDTH, 0.0)
    return sum(p.stat().st_size for p in entry.dir.glob("part-*.parquet"))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=100_000, help="train pairs (default: %(default)s)")
    p.add_argument("--eval-pairs", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=str(RESULTS / "bench_scale.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import ray

    from cube_ray.train.run import fit

    ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="ERROR")
    rows, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pairs(tmp / "train.jsonl", args.pairs, args.seed, "t")
        write_pairs(tmp / "eval.jsonl", args.eval_pairs, args.seed + 1, "e")
        data = DataConfig(pairs=str(tmp / "train.jsonl"), eval_pairs=str(tmp / "eval.jsonl"), seed=args.seed)
        t = time.perf_counter()
        prepared = prepare(data, tmp / "store")
        texts = prepared.unique_texts()
        rows["prepare_s"] = time.perf_counter() - t
        rows["train_pairs"] = prepared.manifest["splits"]["train"]["rows"]
        t = time.perf_counter()
        rows["store_bytes"] = fill_store(EmbeddingStore(tmp / "store"), texts, args.seed)
        rows["texts"] = len(texts)
        del prepared, texts
        rows["store_write_s"] = time.perf_counter() - t
        rows["driver_rss_before_fit_mb"] = rss_mb()
        cfg = TrainConfig(teachers=["minilm"], data=data, workers=args.workers, epochs=1, batch_size=256, lr=1e-3,
                          cube=CubeConfig(dims=[4, 4, 4], channels=4, min_steps=1, max_steps=2),
                          adapter=AdapterConfig(io="volume", out="volume"), loss=LossConfig(cosine=1.0),
                          eval_samples=0, seed=args.seed)
        t = time.perf_counter()
        result = fit(cfg, tmp / "store", tmp / "run")
        rows["fit_s"] = time.perf_counter() - t
        epoch = result.history[-1]
    rows.update(pairs=args.pairs, workers=args.workers, epochs=len(result.history),
                samples_per_s=epoch["samples_per_s"], epoch_s=epoch["time_s"],
                driver_peak_rss_mb=rss_mb(), worker_peak_rss_mb=result.worker_peak_rss_mb,
                total_s=time.perf_counter() - start)
    rows["driver_growth_mb"] = rows["driver_peak_rss_mb"] - rows["driver_rss_before_fit_mb"]
    ray.shutdown()
    print(f"\n{'what':<28} {'value':>12}")
    for key in ("pairs", "train_pairs", "texts", "store_bytes", "prepare_s", "store_write_s", "fit_s", "epoch_s", "samples_per_s",
                "driver_rss_before_fit_mb", "driver_peak_rss_mb", "driver_growth_mb"):
        print(f"{key:<28} {rows[key]:>12.1f}" if isinstance(rows[key], float) else f"{key:<28} {rows[key]:>12}")
    print(f"{'worker_peak_rss_mb':<28} {', '.join(f'{m:.0f}' for m in rows['worker_peak_rss_mb']):>12}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
