"""Teacher-embedding extraction: unique texts -> Ray Data actor pool per teacher -> Parquet embedding store.

    python -m cube_ray.extract [--pairs FILE] [--eval-pairs FILE] [--teachers minilm,smollm2] [--store DIR]
                               [--limit N] [--concurrency K] [--seed S]

Each teacher gets its own actor pool: a model is loaded once per actor, and each actor embeds whole shards
(SHARD_SIZE texts, in mini-batches) and writes each shard's Parquet file itself, atomically. The unit of work is
therefore also the unit of resume: an interrupted run leaves complete shards, and the next run embeds only the
missing ones. The entry's `entry.json` is written when every shard exists; with it present, a run does no model
work at all.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from cube_ray.store import SHARD_SIZE, EmbeddingError, EmbeddingStore, Entry, check_embeddings, shard_order
from cube_ray.fsutil import remove_stale_tmp
from cube_ray.teachers.registry import TeacherSpec

log = logging.getLogger("cube_ray.extract")


class ShardEmbedder:
    """Ray Data actor: loads one teacher once, then embeds and writes whole shards."""

    def __init__(self, spec: TeacherSpec, entry: Entry, batch_size: int):
        import ray

        from cube_ray.teachers.model import Teacher

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.teacher = Teacher(spec, threads=max(1, int(cpus)))  # Ray sets OMP_NUM_THREADS; torch needs telling too
        self.entry, self.batch_size = entry, batch_size

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "texts": [], "seconds": [], "width": [], "error": []}
        for shard, texts in zip(batch["shard"], batch["texts"]):
            start = time.perf_counter()
            texts = [str(t) for t in texts]
            emb = self.teacher.embed(texts, self.batch_size)
            error = ""
            try:
                check_embeddings(emb, self.teacher.width, self.entry.spec.name, texts, first_row=int(shard) * SHARD_SIZE)
                self.entry.write_shard(int(shard), texts, emb)
            except EmbeddingError as e:  # reported by the driver after the other shards are safely written
                error = str(e)
            except OSError as e:  # a full disk, a read-only store: the shard is absent, the written ones are kept
                error = f"cannot write {self.entry.shard_path(int(shard))}: {e}"
            for key, value in zip(out, (int(shard), len(texts), time.perf_counter() - start, self.teacher.width, error)):
                out[key].append(value)
        return {k: np.array(v) for k, v in out.items()}


@dataclass
class ExtractResult:
    teacher: str
    entry: Entry
    cached: bool
    texts: int
    embedded: int  # texts embedded by this run (0 on a cache hit)
    seconds: float
    warm_seconds: float = 0.0  # until the first shard came back: actor start, model load, first shard
    warm_texts: int = 0

    @property
    def steady_texts_per_s(self) -> float:
        """Throughput once the pool is running (after the first shard), the figure that scales with data."""
        rest = self.embedded - self.warm_texts
        return rest / (self.seconds - self.warm_seconds) if rest and self.seconds > self.warm_seconds else float("nan")

    @property
    def texts_per_s(self) -> float:
        return self.embedded / self.seconds if self.embedded and self.seconds else float("nan")


def _pool_shape(concurrency: int | None) -> tuple[int, float]:
    """(actors, CPUs per actor). By default one actor per 2 CPUs, so each actor's torch uses 2 threads."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = concurrency or max(1, cpus // 2)
    return actors, max(1, cpus // actors)


def extract_teacher(texts: list[str], spec: TeacherSpec, store: EmbeddingStore, concurrency: int | None = None,
                    batch_size: int = 32) -> ExtractResult:
    """Embed the unique `texts` with one teacher into the store (only the shards still missing)."""
    import ray

    ordered = shard_order(texts)
    entry = store.entry(spec, ordered)
    if entry.complete:
        log.info("%s: cache hit, %d texts in %s", spec.name, len(ordered), entry.dir)
        return ExtractResult(spec.name, entry, True, len(ordered), 0, 0.0)
    entry.dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(entry.dir)
    missing = entry.missing_shards()
    if len(missing) < entry.n_shards:
        log.info("%s: resuming, %d of %d shards already written", spec.name, entry.n_shards - len(missing), entry.n_shards)
    items = [{"shard": i, "texts": ordered[i * SHARD_SIZE:(i + 1) * SHARD_SIZE]} for i in missing]
    actors, cpus = _pool_shape(concurrency)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEmbedder, fn_constructor_kwargs={"spec": spec, "entry": entry, "batch_size": batch_size},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))), num_cpus=cpus)
    start = time.perf_counter()
    done, embedded, width, errors, warm = 0, 0, None, [], (0.0, 0)
    for row in ds.iter_rows():
        done += 1
        if row["error"]:
            errors.append(str(row["error"]))
            continue
        embedded += int(row["texts"])
        width = int(row["width"])
        if done == 1:
            warm = (time.perf_counter() - start, embedded)
        rate = embedded / (time.perf_counter() - start)
        log.info("%s: shard %d/%d written (%d texts, %.1f texts/s overall)", spec.name, done, len(items), embedded, rate)
    seconds = time.perf_counter() - start
    if errors:
        kind = OSError if errors[0].startswith("cannot write") else EmbeddingError
        raise kind(f"{len(errors)} shard(s) of teacher {spec.name!r} were not written (the other {done - len(errors)} "
                   f"are kept; a re-run resumes): {errors[0]}")
    if entry.missing_shards():  # only possible if files vanished underneath us
        raise EmbeddingError(f"{entry.dir}: shards {entry.missing_shards()[:5]} are missing after extraction")
    entry.finish(width or spec.width or 0, seconds)
    return ExtractResult(spec.name, entry, False, len(ordered), embedded, seconds, *warm)


def extract_all(texts: list[str], specs: list[TeacherSpec], store: EmbeddingStore, address: str | None = None,
                concurrency: int | None = None, batch_size: int = 32) -> list[ExtractResult]:
    """Embed `texts` with every teacher; Ray is started (or joined) only if some entry is incomplete."""
    from cube_ray.cli import init_ray

    if not all(store.entry(spec, shard_order(texts)).complete for spec in specs):
        init_ray(address)
    return [extract_teacher(texts, spec, store, concurrency, batch_size) for spec in specs]


def main(argv: list[str] | None = None) -> int:
    from cube_ray.cli import add_data_args, data_config, setup_logging
    from cube_ray.data.prepare import prepare
    from cube_ray.teachers.registry import get_teacher, load_registry

    p = argparse.ArgumentParser(prog="python -m cube_ray.extract", description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--teachers", default="minilm,smollm2", help="comma-separated teacher names (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=None, help="actors per teacher pool (default: one per 2 CPUs)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per teacher forward pass")
    args = p.parse_args(argv)
    setup_logging()
    registry = load_registry(args.teacher_config)
    specs = [get_teacher(name.strip(), registry) for name in args.teachers.split(",") if name.strip()]
    prepared = prepare(data_config(args), args.store)
    texts = prepared.unique_texts()
    print(f"data: {prepared.dir}  ({prepared.filter_report.summary()})")
    for name, split in prepared.manifest["splits"].items():
        print(f"  {name:<6} {split['rows']:>7} pairs  {split['documents']:>5} documents  sha256 {split['sha256'][:12]}")
    print(f"  {len(texts)} unique texts")
    results = extract_all(texts, specs, EmbeddingStore(args.store), args.address, args.concurrency, args.batch_size)
    print(f"\n{'teacher':<10} {'width':>5} {'texts':>7} {'status':<9} {'seconds':>8} {'texts/s':>8}  entry")
    for r in results:
        status = "cached" if r.cached else "extracted"
        rate = f"{r.texts_per_s:>8.1f}" if r.embedded else f"{'-':>8}"
        print(f"{r.teacher:<10} {r.entry.info['width']:>5} {r.texts:>7} {status:<9} {r.seconds:>8.1f} {rate}  {r.entry.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
