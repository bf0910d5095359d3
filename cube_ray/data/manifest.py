"""The split manifest: what went into each split, by content hash, so a result can be traced to its data.

A manifest holds the source files' sha256, the filter report, and per split its row count, document count, a
sha256 per row (over id, doc_id, segment_id, question, answer) and one for the split (over its row hashes in
order). It holds no timestamps or absolute paths, so the same data and config give the same file byte for byte.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cube_ray.data.readers import Pair


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def row_hash(p: Pair) -> str:
    payload = json.dumps([p.id, p.doc_id, p.segment_id, p.question, p.answer], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def split_hash(row_hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(row_hashes).encode()).hexdigest()


def build_manifest(splits: dict[str, list[Pair]], sources: list[Path], extra: dict) -> dict:
    manifest: dict = {
        "version": 1,
        "sources": [{"file": Path(s).name, "sha256": sha256_file(s)} for s in sources],
        **extra,
        "splits": {},
    }
    for name, pairs in splits.items():
        hashes = [row_hash(p) for p in pairs]
        manifest["splits"][name] = {
            "rows": len(pairs),
            "documents": len({p.doc_id for p in pairs}),
            "sha256": split_hash(hashes),
            "row_sha256": [[p.id, h] for p, h in zip(pairs, hashes)],
        }
    manifest["dataset_id"] = split_hash([manifest["splits"][n]["sha256"] for n in sorted(splits)])[:16]
    return manifest


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=False) + "\n"
