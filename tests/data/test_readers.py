import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cube_ray.config import FieldMap
from cube_ray.data.readers import DataError, read_pairs
from tests.conftest import SQUAD, write_jsonl

ROWS = [{"id": "a", "doc_id": "d1", "segment_id": 0, "question": "What is a cube?", "answer": "A solid with six faces."},
        {"id": "b", "doc_id": "d1", "segment_id": 1, "question": "How many edges?", "answer": "Twelve edges."},
        {"id": "c", "doc_id": "d2", "segment_id": 0, "question": "Who wrote it?", "answer": "Euclid wrote it."}]


def _same(pairs):
    assert [(p.id, p.doc_id, p.segment_id, p.question, p.answer) for p in pairs] == \
        [(r["id"], r["doc_id"], r["segment_id"], r["question"], r["answer"]) for r in ROWS]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl(tmp_path, gz):
    _same(read_pairs(write_jsonl(tmp_path / ("p.jsonl.gz" if gz else "p.jsonl"), ROWS, gz)))


@pytest.mark.parametrize("gz", [False, True])
def test_csv(tmp_path, gz):
    lines = ["id,doc_id,segment_id,question,answer"] + [
        f'{r["id"]},{r["doc_id"]},{r["segment_id"]},"{r["question"]}","{r["answer"]}"' for r in ROWS]
    data = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("p.csv.gz" if gz else "p.csv")
    path.write_bytes(gzip.compress(data) if gz else data)
    _same(read_pairs(path))


def test_parquet_with_custom_fields(tmp_path):
    renamed = [{"qid": r["id"], "article": r["doc_id"], "para": r["segment_id"], "prompt": r["question"], "reply": r["answer"]}
               for r in ROWS]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "p.parquet")
    fields = FieldMap(question="prompt", answer="reply", id="qid", doc_id="article", segment_id="para")
    _same(read_pairs(tmp_path / "p.parquet", fields))


def test_rows_without_doc_id_are_their_own_document(tmp_path):
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", [{"question": "Why?", "answer": "Because."}] * 2))
    assert [p.doc_id for p in pairs] == ["p.jsonl:1", "p.jsonl:2"]


def test_squad_loads_as_is():
    pairs = read_pairs(SQUAD / "dev.jsonl.gz")
    assert len(pairs) == 10570
    assert len({p.doc_id for p in pairs}) == 48


@pytest.mark.parametrize("line, expected", [
    ('{"answer": "x y z"}', "p.jsonl:2: missing field 'question'"),
    ('{"question": "", "answer": "x y z"}', "p.jsonl:2: field 'question' is empty"),
    ('{"question": "   ", "answer": "x y z"}', "p.jsonl:2: field 'question' is empty"),
    ('{"question": 42, "answer": "x y z"}', "p.jsonl:2: field 'question' must be a string, got int"),
    ('{"question": "ok?", "answer": "x"', "p.jsonl:2: malformed JSON"),
    ('["question", "answer"]', "p.jsonl:2: expected an object"),
    ('{"id": "a", "question": "ok?", "answer": "x y"}', "p.jsonl:2: duplicate id 'a' (first seen at line 1)"),
])
def test_bad_row_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "question": "fine?", "answer": "yes it is"}\n' + line + "\n")
    with pytest.raises(DataError, match=expected.replace("?", r"\?").replace("(", r"\(").replace(")", r"\)")) as e:
        read_pairs(path)
    assert str(path) in str(e.value)


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"question": "fine?", "answer": "yes"}\n{"question": "caf\xe9?", "answer": "no"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: invalid UTF-8"):
        read_pairs(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "p.xml").write_text("<x/>")
    with pytest.raises(DataError, match="unknown file type"):
        read_pairs(tmp_path / "p.xml")
