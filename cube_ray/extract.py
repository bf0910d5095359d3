"""Teacher-embedding extraction: unique texts -> Ray Data actor pool per teacher -> Parquet embedding store.

    python -m cube_ray.extract [--pairs FILE] [--eval-pairs FILE] [--teachers minilm,smollm2] [--store DIR]
                               [--limit N] [--concurrency K] [--gpus-per-actor G] [--seed S]

Each teacher gets its own actor pool: a model is loaded once per actor, and each actor embeds whole shards
(SHARD_SIZE texts, in mini-batches) and writes each shard's Parquet file itself, atomically. The unit of work is
therefore also the unit of resume: an interrupted run leaves complete shards, and the next run embeds only the
missing ones. The entry's `entry.json` is written when every shard exists; with it present, a run does no model
work at all. A teacher whose spec asks for GPUs (`gpus:`, or --gpus-per-actor for all) gets actors that request that
share of a GPU and run the model there (bfloat16 unless its dtype says otherwise), so on a mixed cluster they land
on GPU nodes while CPU teachers' actors stay on CPU nodes (Ray keeps CPU-only work off GPU nodes when it can).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cube_ray.config import ConfigError
from cube_ray.store import (SHARD_SIZE, EmbeddingError, Embeddings, EmbeddingStore, Entry, check_embeddings, shard_order,
                            text_id)
from cube_ray.fsutil import folder_lock, remove_stale_tmp
from cube_ray.teachers.registry import TeacherError, TeacherSpec

log = logging.getLogger("cube_ray.extract")


class ShardEmbedder:
    """Ray Data actor: loads one teacher once, then embeds and writes whole shards.

    `known`: embeddings of some of its texts that earlier entries of the same teacher hold: copied, not embedded again."""

    def __init__(self, spec: TeacherSpec, entry: Entry, batch_size: int, known: Embeddings):
        import ray

        from cube_ray.teachers.model import Teacher

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        self.entry, self.batch_size, self.known, self.load_error = entry, batch_size, known, None
        self.node = ray.get_runtime_context().get_node_id()  # where it ran: the driver reports the nodes
        try:
            self.teacher = Teacher(spec, threads=max(1, int(cpus)))  # Ray sets OMP_NUM_THREADS; torch needs telling too
        except (ConfigError, TeacherError) as e:  # a bad spec: the driver raises it as such (a dead actor would not)
            self.load_error = e

    def embed(self, texts: list[str], ids: list[str]) -> tuple[np.ndarray, int]:
        """The shard's embeddings, and how many of them the model computed (the rest were known)."""
        at, rows = self.known.locate(ids)
        if not at:
            return self.teacher.embed(texts, self.batch_size), len(texts)
        emb = np.empty((len(texts), self.known.matrix.shape[1]), dtype=np.float32)
        emb[at] = self.known.matrix[rows]
        todo = self.known.missing(ids)
        if todo:
            emb[todo] = self.teacher.embed([texts[j] for j in todo], self.batch_size)
        return emb, len(todo)

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"shard": [], "texts": [], "seconds": [], "width": [], "error": [], "load_error": [],
                                "node": []}
        for shard, texts, ids in zip(batch["shard"], batch["texts"], batch["ids"]):
            if self.load_error is not None:  # no text embedded; the driver raises the error's own type
                for key, value in zip(out, (int(shard), 0, 0.0, 0, str(self.load_error), type(self.load_error).__name__,
                                            self.node)):
                    out[key].append(value)
                continue
            start = time.perf_counter()
            texts = [str(t) for t in texts]
            emb, embedded = self.embed(texts, [str(tid) for tid in ids])
            error = ""
            try:
                check_embeddings(emb, self.teacher.width, self.entry.spec.name, texts, first_row=int(shard) * SHARD_SIZE)
                self.entry.write_shard(int(shard), texts, emb)
            except EmbeddingError as e:  # reported by the driver after the other shards are safely written
                error = str(e)
            except OSError as e:  # a full disk, a read-only store: the shard is absent, the written ones are kept
                error = f"cannot write {self.entry.shard_path(int(shard))}: {e}"
            for key, value in zip(out, (int(shard), embedded, time.perf_counter() - start, self.teacher.width, error, "",
                                        self.node)):
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
    reused: int = 0  # texts copied from earlier entries of the same teacher instead of embedded
    nodes: tuple[str, ...] = ()  # the Ray node ids its actors ran on

    @property
    def steady_texts_per_s(self) -> float:
        """Throughput once the pool is running (after the first shard), the figure that scales with data."""
        rest = self.embedded - self.warm_texts
        return rest / (self.seconds - self.warm_seconds) if rest and self.seconds > self.warm_seconds else float("nan")

    @property
    def texts_per_s(self) -> float:
        return self.embedded / self.seconds if self.embedded and self.seconds else float("nan")

    def seconds_for(self, texts: int) -> float:
        """The seconds embedding `texts` more should take, going by this extraction: its pool's start (actors, model
        load: its first shard's time less what the steady rate gives that shard) and its steady rate; 0 where it
        embedded nothing to go by."""
        if not self.embedded:
            return 0.0
        rate = self.steady_texts_per_s
        if rate != rate:  # NaN: one shard only, its start not told apart
            return self.seconds * texts / self.embedded
        return max(0.0, self.warm_seconds - self.warm_texts / rate) + texts / rate


def _pool_shape(spec: TeacherSpec, concurrency: int | None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor). On CPU, by default one actor per 2 CPUs, so each actor's torch uses
    2 threads; a GPU teacher's actor takes 1 CPU (tokenising) and its `gpus`, as many actors as the GPUs hold."""
    import ray

    if spec.on_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        return concurrency or max(1, int(gpus // spec.gpus)), 1, spec.gpus
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = concurrency or max(1, cpus // 2)
    largest = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus])
    return actors, max(1, min(cpus // actors, largest)), 0  # an actor fits on one node


def extract_teacher(texts: list[str], spec: TeacherSpec, store: EmbeddingStore, concurrency: int | None = None,
                    batch_size: int = 32) -> ExtractResult:
    """Embed the unique `texts` with one teacher into the store (only the shards still missing)."""
    ordered = shard_order(texts)
    entry = store.entry(spec, ordered)
    if not entry.complete:
        # One extraction per entry at a time: another one of the same entry is waited for, and then its complete entry
        # reused. Holding the lock, the entry's temporaries are a dead run's, never a live run's shard in flight.
        with folder_lock(entry.dir, f"extraction of {spec.name} embeddings", wait=True):
            if not entry.complete:
                return _extract_entry(ordered, spec, store, entry, concurrency, batch_size)
    log.info("%s: cache hit, %d texts in %s", spec.name, len(ordered), entry.dir)
    return ExtractResult(spec.name, entry, True, len(ordered), 0, 0.0)


def _extract_entry(ordered: list[str], spec: TeacherSpec, store: EmbeddingStore, entry: Entry,
                   concurrency: int | None, batch_size: int) -> ExtractResult:
    """Embed the shards `entry` still lacks (its lock held)."""
    import ray

    remove_stale_tmp(entry.dir)
    missing = entry.missing_shards()
    if len(missing) < entry.n_shards:
        log.info("%s: resuming, %d of %d shards already written", spec.name, entry.n_shards - len(missing), entry.n_shards)
    shards = [ordered[i * SHARD_SIZE:(i + 1) * SHARD_SIZE] for i in missing]
    items = [{"shard": i, "texts": texts, "ids": [text_id(t) for t in texts]} for i, texts in zip(missing, shards)]
    known = known_embeddings(store, entry, {tid for item in items for tid in item["ids"]})
    reused = len(known.ids)  # texts are unique, so each known id is one text copied
    items = write_known_shards(entry, items, known)
    if reused:
        log.info("%s: %d texts copied from earlier entries, %d shard(s) written without the model", spec.name, reused,
                 len(missing) - len(items))
    start = time.perf_counter()
    if not items:  # every missing text was known: no model work at all
        entry.finish(pq.read_schema(entry.shard_path(0)).field("embedding").type.list_size, 0.0)
        return ExtractResult(spec.name, entry, False, len(ordered), 0, 0.0, reused=reused)
    known = known.subset([tid for item in items for tid in item["ids"]])  # the actors need only their shards' texts
    actors, cpus, gpus = _pool_shape(spec, concurrency)
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEmbedder, fn_constructor_kwargs={"spec": spec, "entry": entry, "batch_size": spec.batch_size or batch_size,
                                              "known": known},
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(actors, len(items))), num_cpus=cpus, num_gpus=gpus,
        # Ray Data spreads actors over every node by default, GPU nodes included; Ray's default policy keeps work
        # that asks for no GPU off GPU nodes while others have room (a GPU teacher's actors spread over GPU nodes)
        **({} if gpus else {"scheduling_strategy": "DEFAULT"}))
    done, embedded, width, errors, warm, nodes = 0, 0, None, [], (0.0, 0), set()
    for row in ds.iter_rows():
        if row["load_error"]:  # the teacher could not load: no text was embedded
            raise {"ConfigError": ConfigError, "TeacherError": TeacherError}[str(row["load_error"])](str(row["error"]))
        done += 1
        nodes.add(str(row["node"]))
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
    return ExtractResult(spec.name, entry, False, len(ordered), embedded, seconds, *warm, reused=reused,
                         nodes=tuple(sorted(nodes)))


def known_embeddings(store: EmbeddingStore, entry: Entry, wanted: set[str]) -> Embeddings:
    """Those of the `wanted` text ids that earlier entries of the same teacher already hold (one scan each):
    growing a dataset, or changing its split, re-embeds only the new texts."""
    ids, parts, missing = [], [], set(wanted)
    for other in store.reusable_entries(entry) if missing else []:
        found = other.find(missing)
        ids += found.ids
        parts.append(found.matrix)
        missing.difference_update(found.ids)
        log.info("%s: %d of the %d texts to embed are already in %s", entry.spec.name, len(found.ids), len(wanted),
                 other.dir)
        if not missing:
            break
    return Embeddings(ids, np.concatenate(parts) if parts else np.zeros((0, 0), np.float32))


def write_known_shards(entry: Entry, items: list[dict], known: Embeddings) -> list[dict]:
    """Write the shards whose every text is known (no model needed); return the items still to embed."""
    rest = []
    for item in items:
        at, rows = known.locate(item["ids"])
        if len(at) == len(item["ids"]):
            entry.write_shard(item["shard"], item["texts"], known.matrix[rows])
        else:
            rest.append(item)
    return rest


def extract_all(texts: list[str], specs: list[TeacherSpec], store: EmbeddingStore, address: str | None = None,
                concurrency: int | None = None, batch_size: int = 32) -> list[ExtractResult]:
    """Embed `texts` with every teacher; Ray is started (or joined) only if some entry is incomplete, and a teacher
    that asks for GPUs no node can give is refused before any teacher loads."""
    from cube_ray.cli import init_ray
    from cube_ray.resources import require_gpus

    todo = [spec for spec in specs if not store.entry(spec, shard_order(texts)).complete]
    if todo:
        init_ray(address)
    for spec in todo:
        if spec.on_gpu:
            require_gpus(spec.gpus, f"teacher {spec.name!r} (gpus: {spec.gpus:g})", "extraction actor",
                         "Run it on a cluster with GPU nodes, or embed on CPU: gpus: 0 in its --teacher-config "
                         "entry, or --gpus-per-actor 0 for every teacher")
    return [extract_teacher(texts, spec, store, concurrency, batch_size) for spec in specs]


def main(argv: list[str] | None = None) -> int:
    from cube_ray.cli import add_data_args, data_config, positive_int, setup_logging
    from cube_ray.data.prepare import prepare
    from cube_ray.teachers.registry import get_teacher, load_registry

    p = argparse.ArgumentParser(prog="python -m cube_ray.extract", description=__doc__.split("\n\n")[0])
    add_data_args(p)
    p.add_argument("--teachers", default="minilm,smollm2", help="comma-separated teacher names (default: %(default)s)")
    p.add_argument("--concurrency", type=positive_int, default=None, help="actors per teacher pool (default: one per 2 CPUs)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="texts per teacher forward pass (a teacher's batch_size: wins)")
    args = p.parse_args(argv)
    setup_logging()
    registry = load_registry(args.teacher_config, args.gpus_per_actor)
    names = [name.strip() for name in args.teachers.split(",") if name.strip()]
    if not names:
        p.error(f"argument --teachers: expected comma-separated teacher names, got {args.teachers!r}")
    specs = [get_teacher(name, registry) for name in names]
    prepared = prepare(data_config(args), args.store)
    texts = prepared.unique_texts()
    print(f"data: {prepared.dir}  ({prepared.filter_report.summary()})")
    for name, split in prepared.manifest["splits"].items():
        print(f"  {name:<6} {split['rows']:>7} pairs  {split['documents']:>5} documents  sha256 {split['sha256'][:12]}")
    print(f"  {len(texts)} unique texts")
    results = extract_all(texts, specs, EmbeddingStore(args.store), args.address, args.concurrency, args.batch_size)
    print(f"\n{'teacher':<10} {'width':>5} {'texts':>7} {'device':<6} {'status':<22} {'seconds':>8} {'texts/s':>8}  entry")
    for r, spec in zip(results, specs):
        status = "cached" if r.cached else f"extracted ({r.reused} reused)" if r.reused else "extracted"
        rate = f"{r.texts_per_s:>8.1f}" if r.embedded else f"{'-':>8}"
        device = "cuda" if spec.on_gpu else "cpu"
        print(f"{r.teacher:<10} {r.entry.info['width']:>5} {r.texts:>7} {device:<6} {status:<22} {r.seconds:>8.1f} {rate}  "
              f"{r.entry.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
