"""Read question/answer pairs from JSONL, CSV or Parquet files (optionally gzip-compressed).

Every row becomes a `Pair` with a document id and a segment id, because splits are made by document. A row
without `doc_id` is its own document. A bad row is an error that names the file and the line (or row) and says
what was expected; nothing is silently skipped here (the quality filter drops rows, and reports why).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cube_ray.config import FieldMap

SAMPLE_DIR = Path(__file__).parent / "sample"


class DataError(ValueError):
    """Bad input data; the message names the file and the row."""


@dataclass(frozen=True)
class Pair:
    id: str
    doc_id: str
    segment_id: int
    question: str
    answer: str


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if ext in (".csv", ".tsv"):
        return ext[1:]
    if ext == ".parquet":
        return "parquet"
    raise DataError(f"{path}: unknown file type {''.join(path.suffixes)!r}; expected .jsonl, .csv, .tsv or .parquet (optionally .gz)")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_bytes(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, Any]]:
    with _open_bytes(path) as f:
        try:
            text = f.read().decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = _line_of_byte(path, e.start)
            raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    for row in reader:
        yield reader.line_num, row  # line_num: the line where this record ends, 1-based, header included


def _line_of_byte(path: Path, byte_offset: int) -> int:
    with _open_bytes(path) as f:
        return f.read(byte_offset).count(b"\n") + 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield i, row


def _text(row: dict, field: str, where: str) -> str:
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field {field!r}; the row has {sorted(row)}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty or whitespace only")
    return value


def read_pairs(path: str | Path, fields: FieldMap | None = None, limit: int | None = None) -> list[Pair]:
    """All pairs of one file, in file order. `limit` keeps the first N."""
    path = Path(path)
    fields = fields or FieldMap()
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = _format(path)
    rows = {"jsonl": lambda: _jsonl_rows(path), "csv": lambda: _csv_rows(path, ","),
            "tsv": lambda: _csv_rows(path, "\t"), "parquet": lambda: _parquet_rows(path)}[fmt]()
    unit = "row" if fmt == "parquet" else "line"
    pairs: list[Pair] = []
    seen_ids: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}" if unit == "line" else f"{path}: row {lineno}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with fields {fields.question!r} and {fields.answer!r}, got {type(row).__name__}")
        question = _text(row, fields.question, where)
        answer = _text(row, fields.answer, where)
        pair_id = str(row.get(fields.id) or f"{path.name}:{lineno}")
        if pair_id in seen_ids:
            raise DataError(f"{where}: duplicate id {pair_id!r} (first seen at {unit} {seen_ids[pair_id]})")
        seen_ids[pair_id] = lineno
        doc_id = row.get(fields.doc_id)
        segment = row.get(fields.segment_id)
        try:
            segment_id = int(segment) if segment not in (None, "") else 0
        except (TypeError, ValueError):
            raise DataError(f"{where}: field {fields.segment_id!r} must be an integer, got {segment!r}") from None
        pairs.append(Pair(pair_id, str(doc_id) if doc_id not in (None, "") else pair_id, segment_id, question, answer))
        if limit is not None and len(pairs) >= limit:
            break
    if not pairs:
        raise DataError(f"{path}: no pairs found (an empty file?)")
    return pairs


def sample_paths() -> tuple[Path, Path]:
    """The bundled sample of SQuAD v1.1 pairs (train, eval); see sample/README.md for its license."""
    return SAMPLE_DIR / "train.jsonl.gz", SAMPLE_DIR / "eval.jsonl.gz"
