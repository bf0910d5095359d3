"""The fingerprinted Parquet embedding store.

Layout under the store root:

    datasets/<dataset_id>/manifest.json, train.parquet, eval.parquet   (see cube_ray.data.prepare)
    embeddings/<teacher>/<fingerprint>/part-00000.parquet …            one file per shard of texts
    embeddings/<teacher>/<fingerprint>/entry.json                      written last: the entry is complete

An entry holds one teacher's embeddings of one set of unique texts. Its fingerprint covers the texts (content
hash), the teacher spec (source, pooling, max length, dtype, …), the model files (TeacherSpec.model_version: their
sha256, a package's version, a hub commit) and the shard size, so a second extraction of the same data with the
same teacher finds the entry and does no model work, and a changed model gets an entry of its own. Texts are
sorted by length before sharding: a shard's texts have similar lengths, which keeps padding (wasted teacher
compute) small.

Shard schema: `text_id` (string, sha256 of the text, 32 hex), `text` (string), `embedding`
(fixed_size_list<float32>[width]). Each shard file is written atomically, so after a crash a shard is either
complete or absent, and a resumed extraction redoes only the missing ones.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from cube_ray.data.split import HELD_OUT
from cube_ray.fsutil import atomic_path, atomic_write_text
from cube_ray.teachers.registry import TeacherSpec

STORE_VERSION = 2  # 2: entries are keyed by the model files too (version-1 entries do not say which model)
SHARD_SIZE = 256


class EmbeddingError(ValueError):
    """Embeddings that are missing, of the wrong width, not finite, or zero."""


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def shard_order(texts: list[str]) -> list[str]:
    """Unique texts in the order they are sharded: by length, then by content (deterministic)."""
    return sorted(set(texts), key=lambda t: (len(t), t))


def shard_schema(width: int) -> pa.Schema:
    return pa.schema([("text_id", pa.string()), ("text", pa.string()), ("embedding", pa.list_(pa.float32(), width))])


def check_embeddings(emb: np.ndarray, width: int, teacher: str, texts: list[str], first_row: int = 0) -> None:
    """Raise EmbeddingError naming the teacher and the first bad row unless `emb` is (len(texts), width),
    finite and of non-zero norm."""
    if emb.ndim != 2 or emb.shape != (len(texts), width):
        raise EmbeddingError(f"teacher {teacher!r}: expected embeddings of shape ({len(texts)}, {width}), got {emb.shape}")
    bad_finite = ~np.isfinite(emb).all(axis=1)
    bad_zero = np.linalg.norm(np.nan_to_num(emb), axis=1) == 0
    for what, bad in (("non-finite (NaN or inf)", bad_finite), ("zero-norm", bad_zero)):
        if bad.any():
            i = int(np.argmax(bad))
            raise EmbeddingError(f"teacher {teacher!r}: {int(bad.sum())} {what} embedding(s); first at text row "
                                 f"{first_row + i}: {texts[i][:80]!r}")


@dataclass(frozen=True)
class Embeddings:
    """Embeddings by text id: row i of `matrix` embeds the text whose id is `ids[i]`."""

    ids: list[str]
    matrix: np.ndarray

    @cached_property
    def _row(self) -> dict[str, int]:
        return {tid: i for i, tid in enumerate(self.ids)}

    def locate(self, ids: list[str]) -> tuple[list[int], list[int]]:
        """(the positions in `ids` of the texts held here, their rows in `matrix`)."""
        found = [(j, self._row[tid]) for j, tid in enumerate(ids) if tid in self._row]
        return [j for j, _ in found], [r for _, r in found]

    def missing(self, ids: list[str]) -> list[int]:
        """The positions in `ids` of the texts not held here."""
        return [j for j, tid in enumerate(ids) if tid not in self._row]

    def subset(self, ids: list[str]) -> Embeddings:
        at, rows = self.locate(ids)
        return Embeddings([ids[j] for j in at], self.matrix[rows])


@dataclass(frozen=True)
class Entry:
    """One teacher's embeddings of one set of texts."""

    dir: Path
    spec: TeacherSpec
    data_hash: str
    n_texts: int

    @property
    def n_shards(self) -> int:
        return -(-self.n_texts // SHARD_SIZE)

    @property
    def complete(self) -> bool:
        return (self.dir / "entry.json").exists()

    def shard_path(self, i: int) -> Path:
        return self.dir / f"part-{i:05d}.parquet"

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.shard_path(i).exists()]

    def write_shard(self, i: int, texts: list[str], emb: np.ndarray) -> None:
        table = pa.Table.from_arrays(
            [pa.array([text_id(t) for t in texts]), pa.array(texts),
             pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])],
            schema=shard_schema(emb.shape[1]))
        with atomic_path(self.shard_path(i)) as tmp:
            pq.write_table(table, tmp)

    def finish(self, width: int, seconds: float) -> None:
        info = {"version": STORE_VERSION, "teacher": self.spec.__dict__, "data_hash": self.data_hash,
                "texts": self.n_texts, "width": width, "shards": self.n_shards, "shard_size": SHARD_SIZE,
                "extract_seconds": round(seconds, 2)}
        atomic_write_text(self.dir / "entry.json", json.dumps(info, indent=1) + "\n")

    @property
    def info(self) -> dict:
        return json.loads((self.dir / "entry.json").read_text())

    def find(self, ids) -> Embeddings:
        """The embeddings of those of `ids` this entry holds, reading only those rows (one scan)."""
        table = pads.dataset(sorted(self.dir.glob("part-*.parquet")), format="parquet").to_table(
            columns=["text_id", "embedding"], filter=pc.field("text_id").isin(pa.array(sorted(set(ids)))))
        width = table.schema.field("embedding").type.list_size
        emb = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, width)
        return Embeddings(table.column("text_id").to_pylist(), emb)

    def lookup(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts` (any order, repeats allowed), reading only the rows asked for."""
        ids = [text_id(t) for t in texts]
        found = self.find(ids)
        missing = found.missing(ids)
        if missing:
            raise EmbeddingError(f"{self.dir}: {len(missing)} text(s) have no embedding in this entry, "
                                 f"e.g. {texts[missing[0]][:80]!r}")
        out = found.matrix[found.locate(ids)[1]]
        check_embeddings(out, out.shape[1], self.spec.name, texts)
        return out


class EmbeddingStore:
    def __init__(self, root: str | Path):
        # absolute: extraction actors and Ray Train workers run in working directories of their own
        self.root = Path(root).absolute()

    def entry(self, spec: TeacherSpec, texts: list[str]) -> Entry:
        """The entry for `spec` over the unique `texts` (already in shard order), complete or not."""
        data_hash = hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()
        key = json.dumps([STORE_VERSION, SHARD_SIZE, data_hash, spec.fingerprint()])
        fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        return Entry(self.root / "embeddings" / spec.name / fingerprint, spec, data_hash, len(texts))

    def reusable_entries(self, entry: Entry) -> list[Entry]:
        """The other complete entries of `entry`'s teacher with the same spec fingerprint: embeddings of other text
        sets by the same model, which a new text set can take its known texts from instead of re-embedding them."""
        out = []
        for info_path in sorted((self.root / "embeddings" / entry.spec.name).glob("*/entry.json")):
            if info_path.parent == entry.dir:
                continue
            info = json.loads(info_path.read_text())
            if info.get("version") != STORE_VERSION:  # an entry written by another version: not reused
                continue
            try:
                same = TeacherSpec(**info["teacher"]).fingerprint() == entry.spec.fingerprint()
            except (KeyError, TypeError):
                continue
            if same:
                out.append(Entry(info_path.parent, entry.spec, info["data_hash"], info["texts"]))
        return out

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def dataset_entry(self, dataset_id: str, spec: TeacherSpec, split: str | None = None) -> Entry:
        """The complete entry holding `spec`'s embeddings of every text of a prepared dataset or, given `split`, of
        that split's: the whole dataset's entry, or for a split other than the held-out one, the entry of the texts
        every split but that one has, which a search embeds first (it embeds the held-out split while its trials
        run: only its report reads it)."""
        folder = self.dataset_dir(dataset_id)
        if not (folder / "manifest.json").exists():
            raise EmbeddingError(f"{folder}: no prepared dataset {dataset_id!r} in store {self.root}")
        entry = self.entry(spec, dataset_texts(folder))
        if not entry.complete and split not in (None, HELD_OUT):
            first = self.entry(spec, dataset_texts(folder, skip=HELD_OUT))
            entry = first if first.complete else entry
        if not entry.complete:
            raise EmbeddingError(f"store {self.root} has no complete {spec.name!r} embeddings (model {spec.model_version}) "
                                 f"of dataset {dataset_id}; "
                                 f"run `python -m cube_ray.extract --teachers {spec.name} --store {self.root}` with the same data")
        return entry


def dataset_texts(dataset_dir: str | Path, skip: str | None = None) -> list[str]:
    """The unique question and answer texts of every split of a prepared dataset (but split `skip`), in shard order."""
    texts: set[str] = set()
    for table in sorted(Path(dataset_dir).glob("*.parquet")):
        if table.stem == skip:
            continue
        t = pq.read_table(table, columns=["question", "answer"])
        texts.update(t.column("question").to_pylist(), t.column("answer").to_pylist())
    return shard_order(list(texts))


def split_embeddings(dataset_dir: str | Path, split: str, entry: Entry) -> tuple[np.ndarray, np.ndarray]:
    """Question and answer embeddings of one split, row-aligned with `<dataset_dir>/<split>.parquet`."""
    table = pq.read_table(Path(dataset_dir) / f"{split}.parquet", columns=["question", "answer"])
    return entry.lookup(table.column("question").to_pylist()), entry.lookup(table.column("answer").to_pylist())


def _attach_embeddings(batch: dict, entries: dict[str, Entry]) -> dict:
    n = len(batch["question"])
    for name, entry in entries.items():
        both = entry.lookup(list(batch["question"]) + list(batch["answer"]))  # one scan of the entry for both
        batch[f"q_{name}"], batch[f"a_{name}"] = both[:n], both[n:]
    return batch


def pairs_dataset(dataset_dir: str | Path, split: str, entries: dict[str, Entry], batch_size: int = 8192):
    """A Ray Dataset of one split with columns id, doc_id, question, answer and, per teacher, `q_<teacher>` and
    `a_<teacher>` embedding tensors. It streams: neither the driver nor any worker holds the whole store.

    Texts are sharded by length, not by pair, so each batch's lookup scans every shard of an entry (~0.7 s for
    200k texts here, whatever the batch size): large batches keep the number of scans, pairs / batch_size, small."""
    import ray.data

    ds = ray.data.read_parquet(str(Path(dataset_dir) / f"{split}.parquet"))
    return ds.map_batches(_attach_embeddings, fn_kwargs={"entries": entries}, batch_size=batch_size, batch_format="numpy")
