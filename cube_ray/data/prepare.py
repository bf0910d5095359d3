"""Pairs on disk -> filtered, document-split, contamination-checked splits with a manifest.

The result lives in `<root>/datasets/<dataset_id>/`: `manifest.json` and one Parquet table per split
(`id, doc_id, segment_id, question, answer`). `dataset_id` is derived from the split contents, so the same
data and config always land in the same folder, and everything downstream (embeddings, checkpoints) can refer
to it by that id.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cube_ray.config import DataConfig, to_dict
from cube_ray.data.contamination import ContaminationReport, find_contamination
from cube_ray.data.manifest import build_manifest, dumps
from cube_ray.data.quality import FilterReport, quality_filter
from cube_ray.data.readers import DataError, Pair, read_pairs, sample_paths
from cube_ray.data.split import VALIDATION, split_by_document
from cube_ray.fsutil import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    dir: Path
    manifest: dict
    splits: dict[str, list[Pair]]
    filter_report: FilterReport
    contamination: ContaminationReport

    @property
    def dataset_id(self) -> str:
        return self.manifest["dataset_id"]

    def unique_texts(self, skip: str | None = None) -> list[str]:
        """Every distinct question and answer text over all splits (but split `skip`), in first-seen order."""
        return list(dict.fromkeys(t for name, pairs in self.splits.items() if name != skip
                                  for p in pairs for t in (p.question, p.answer)))


def _filtered(path: Path, cfg: DataConfig, report: FilterReport) -> list[Pair]:
    pairs, rep = quality_filter(read_pairs(path, cfg.fields, cfg.limit), cfg.min_chars, cfg.max_chars, str(path))
    log.info("%s: %s", path, rep.summary())
    report.kept += rep.kept
    report.truncated += rep.truncated
    report.dropped.update(rep.dropped)
    if not pairs:
        raise DataError(f"{path}: every row was filtered out ({rep.summary()}); check min_chars")
    return pairs


def split_table(pairs: list[Pair]) -> pa.Table:
    return pa.Table.from_pylist([asdict(p) for p in pairs],
                                schema=pa.schema([("id", pa.string()), ("doc_id", pa.string()), ("segment_id", pa.int64()),
                                                  ("question", pa.string()), ("answer", pa.string())]))


def prepare(cfg: DataConfig, root: str | Path) -> PreparedData:
    """Read, filter, split and check `cfg`'s pairs; write the manifest and split tables under `root`."""
    if cfg.pairs is None:
        train_path, eval_path = sample_paths()
    else:
        train_path, eval_path = Path(cfg.pairs), Path(cfg.eval_pairs) if cfg.eval_pairs else None
    report = FilterReport()
    pairs = _filtered(train_path, cfg, report)
    if eval_path is not None:
        ratios = {k: v for k, v in cfg.split_ratios.items() if k != "eval"}
        total = sum(ratios.values())
        splits = split_by_document(pairs, {k: v / total for k, v in ratios.items()}, cfg.seed)
        splits["eval"] = _filtered(eval_path, cfg, report)
    else:
        splits = split_by_document(pairs, cfg.split_ratios, cfg.seed)
    if cfg.val_fraction:
        splits.update(split_by_document(splits["train"], {"train": 1 - cfg.val_fraction, VALIDATION: cfg.val_fraction},
                                        cfg.seed))

    contamination = find_contamination(splits)
    dropped_ids: list[str] = []
    if cfg.decontaminate and contamination.exact:
        bad = {(c.split, c.pair_id) for c in contamination.exact}
        dropped_ids = sorted(pid for _, pid in bad)
        splits = {name: [p for p in ps if (name, p.id) not in bad] for name, ps in splits.items()}
        log.warning("decontaminate: dropped %d eval pair(s) whose text also occurs in train", len(bad))
    else:
        contamination.raise_if_contaminated(
            hint="Fix the split, or pass --decontaminate to drop these eval pairs (recorded in the manifest).")
    for c in contamination.near[:5]:
        log.warning("near-duplicate (Jaccard %.2f): %s %s %s ~ train %s", c.jaccard, c.split, c.pair_id, c.field, c.train_id)
    if contamination.near:
        log.warning("%d eval text(s) are near-duplicates of train texts (token Jaccard >= 0.9)", len(contamination.near))

    sources = [train_path] + ([eval_path] if eval_path else [])
    extra = {"config": {k: v for k, v in to_dict(cfg).items() if k not in ("pairs", "eval_pairs")},
             "filter": {"kept": report.kept, "truncated": report.truncated,
                        "dropped": dict(sorted(report.dropped.items()))},
             "decontaminated": dropped_ids,
             "near_duplicates": [[c.split, c.pair_id, c.field, c.train_id, c.jaccard] for c in contamination.near]}
    manifest = build_manifest(splits, sources, extra)
    out = Path(root) / "datasets" / manifest["dataset_id"]
    for name, ps in splits.items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(split_table(ps), tmp)
    atomic_write_text(out / "manifest.json", dumps(manifest))  # written last: its presence means complete
    return PreparedData(out, manifest, splits, report, contamination)
