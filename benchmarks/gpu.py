"""GPU against CPU: extraction of the bundled sample with MiniLM and SmolLM2, and an epoch of the default cube.

    python benchmarks/gpu.py [--limit 600] [--json results/bench_gpu.json] [--seed 0]

Each teacher embeds the sample's unique texts into a fresh store twice, once on CPU (float32) and once on the GPU
(`gpus: 1`, bfloat16), through the real Ray Data actor pools; the GPU run's vectors are compared with the CPU's
(mean cosine per text: what bfloat16 costs). Then one epoch of the default preset trains with Ray Train on CPU and
with `use_gpu`. On a machine without a GPU the GPU rows say so and only the CPU rows are measured. Prints a table;
writes the JSON with the machine named.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from cube_ray.config import DataConfig, TrainConfig, load_yaml
from cube_ray.data.prepare import prepare
from cube_ray.extract import extract_teacher
from cube_ray.store import EmbeddingStore
from cube_ray.teachers.registry import get_teacher

ROOT = Path(__file__).resolve().parents[1]
TEACHERS = ("minilm", "smollm2")


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "cuda": torch.version.cuda}


def vectors(entry) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(entry.dir.glob("part-*.parquet")), columns=["text_id", "embedding"])
    return dict(zip(table.column("text_id").to_pylist(), np.asarray(table.column("embedding").to_pylist())))


def mean_cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    ids = sorted(a)
    x, y = np.stack([a[i] for i in ids]), np.stack([b[i] for i in ids])
    return float(np.mean((x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))))


def extraction(texts: list[str], work: Path, gpu: bool) -> list[dict]:
    rows = []
    for name in TEACHERS:
        runs = {}
        for device in ("cpu", "gpu") if gpu else ("cpu",):
            spec = dataclasses.replace(get_teacher(name), gpus=1.0 if device == "gpu" else 0.0)
            result = extract_teacher(texts, spec, EmbeddingStore(work / f"store-{device}"))
            runs[device] = result
            rows.append({"what": f"extract {name}", "device": device, "dtype": spec.torch_dtype, "texts": result.texts,
                         "seconds": round(result.seconds, 1), "texts_per_s": round(result.texts_per_s, 1),
                         "steady_texts_per_s": round(result.steady_texts_per_s, 1)})
        if gpu:
            rows[-1]["cosine_to_cpu"] = round(mean_cosine(vectors(runs["gpu"].entry), vectors(runs["cpu"].entry)), 5)
    return rows


def training(cfg: TrainConfig, work: Path, gpu: bool) -> list[dict]:
    from cube_ray.train.run import fit

    rows = []
    for device in ("cpu", "gpu") if gpu else ("cpu",):
        run = dataclasses.replace(cfg, use_gpu=device == "gpu", epochs=1)
        result = fit(run, work / "store-cpu", work / f"train-{device}")
        last = result.history[-1]
        rows.append({"what": "train 1 epoch (default preset)", "device": device, "dtype": "float32",
                     "samples_per_s": round(last["samples_per_s"], 1), "eval": round(last["eval"], 4),
                     "micro_batch": last["micro_batch"]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=600, help="pairs of each bundled file (default: %(default)s)")
    p.add_argument("--json", default=str(ROOT / "results" / "bench_gpu.json"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import ray
    import torch

    gpu = torch.cuda.is_available()
    ray.init(logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = DataConfig(limit=args.limit, seed=args.seed, val_fraction=0.25)
        texts = prepare(data, work / "store-cpu").unique_texts()
        rows = extraction(texts, work, gpu)
        cfg = dataclasses.replace(load_yaml(TrainConfig, ROOT / "cube_ray/train/presets/default.yaml"), data=data,
                                  seed=args.seed)
        rows += training(cfg, work, gpu)
    figures = {"machine": machine(), "gpu_at_hand": gpu, "limit": args.limit, "rows": rows}
    if not gpu:
        figures["note"] = "no GPU on this machine: CPU rows only"
    print(f"\n{'what':<32} {'device':<6} {'dtype':<9} figures")
    for r in rows:
        rest = {k: v for k, v in r.items() if k not in ("what", "device", "dtype")}
        print(f"{r['what']:<32} {r['device']:<6} {r['dtype']:<9} {rest}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"\nwrote {args.json}  (machine: {figures['machine']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
