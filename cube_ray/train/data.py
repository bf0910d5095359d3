"""Pairs with their teacher embeddings, as tensors: one split (eval) or one worker's shard (train)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from cube_ray.metrics import Centering
from cube_ray.store import EmbeddingStore, split_embeddings
from cube_ray.teachers.registry import TeacherSpec


@dataclasses.dataclass
class Pairs:
    ids: list[str]
    questions: list[str]
    answers: list[str]
    q: dict[str, torch.Tensor]  # teacher -> (N, width)
    a: dict[str, torch.Tensor]
    doc_ids: list[str] = dataclasses.field(default_factory=list)  # a whole split's: baselines validate by document

    def __len__(self) -> int:
        return len(next(iter(self.q.values())))  # from the tensors: a batch made by `take` carries no ids

    def to(self, device: torch.device) -> Pairs:
        """The embeddings on `device` (a GPU worker's train shard lives there for the whole run)."""
        return dataclasses.replace(self, q={t: x.to(device) for t, x in self.q.items()},
                                   a={t: x.to(device) for t, x in self.a.items()})

    def centred(self, centres: dict[str, Centering]) -> Pairs:
        if not centres:
            return self
        return dataclasses.replace(self, q={t: centres[t](x) for t, x in self.q.items()},
                                   a={t: centres[t](x) for t, x in self.a.items()})


def load_split(store: EmbeddingStore, dataset_id: str, split: str, specs: dict[str, TeacherSpec]) -> Pairs:
    """A whole split from the store (eval sets and baselines; training streams instead)."""
    folder = store.dataset_dir(dataset_id)
    table = pq.read_table(Path(folder) / f"{split}.parquet", columns=["id", "doc_id", "question", "answer"])
    q, a = {}, {}
    for name, spec in specs.items():
        qn, an = split_embeddings(folder, split, store.dataset_entry(dataset_id, spec, split))
        q[name], a[name] = torch.from_numpy(qn), torch.from_numpy(an)
    return Pairs(table.column("id").to_pylist(), table.column("question").to_pylist(),
                 table.column("answer").to_pylist(), q, a, table.column("doc_id").to_pylist())


def load_shard(blocks: list[dict[str, np.ndarray]], teachers: list[str]) -> Pairs:
    """One worker's shard from its blocks (dicts of NumPy columns, as `prepare_run` left them in Ray's object
    store), sorted by id so its order never depends on how the rows were cut into blocks."""
    blocks = [b for b in blocks if len(b["id"])]
    if not blocks:
        raise ValueError("this worker's shard of the train split is empty: use fewer workers or more data")
    ids = np.concatenate([b["id"] for b in blocks])
    order = np.argsort(ids, kind="stable")
    pick = lambda k: np.concatenate([b[k] for b in blocks])[order]  # noqa: E731
    return Pairs([str(i) for i in ids[order]], list(pick("question")), list(pick("answer")),
                 {t: torch.from_numpy(np.ascontiguousarray(pick(f"q_{t}"), dtype=np.float32)) for t in teachers},
                 {t: torch.from_numpy(np.ascontiguousarray(pick(f"a_{t}"), dtype=np.float32)) for t in teachers})
