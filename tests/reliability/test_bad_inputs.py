"""Bad input files through data preparation, end to end: a clear error naming the file, the line and what was
expected, and no dataset in the store that could later read as complete (its manifest.json is written last)."""
import logging

import pyarrow.parquet as pq
import pytest

from cube_ray.config import DataConfig
from cube_ray.data.prepare import prepare
from cube_ray.data.readers import DataError
from tests.conftest import write_jsonl

GOOD = [{"id": f"p{i}", "doc_id": f"d{i}", "question": f"What is fact number {i}?", "answer": f"Fact {i} is true."}
        for i in range(6)]


def bad_rows(case: str) -> tuple[bytes, str]:
    """(file content, the message the error must match)."""
    import json

    lines = [json.dumps(r).encode() for r in GOOD]
    if case == "malformed JSONL line":
        lines[3] = b'{"id": "p3", "question": "What?", "answer": '
        return b"\n".join(lines), r"bad\.jsonl:4: malformed JSON"
    if case == "missing question field":
        lines[2] = json.dumps({"id": "p2", "answer": "An answer."}).encode()
        return b"\n".join(lines), r"bad\.jsonl:3: missing field 'question'"
    if case == "empty text":
        lines[1] = json.dumps({"id": "p1", "question": "   \t", "answer": "An answer."}).encode()
        return b"\n".join(lines), r"bad\.jsonl:2: field 'question' is empty or whitespace only"
    if case == "invalid UTF-8":
        lines[4] = b'{"id": "p4", "question": "Caf\xe9?", "answer": "Yes."}'
        return b"\n".join(lines), r"bad\.jsonl:5: invalid UTF-8"
    if case == "duplicate ids":
        lines[5] = json.dumps({**GOOD[5], "id": "p0"}).encode()
        return b"\n".join(lines), r"bad\.jsonl:6: duplicate id 'p0' \(first seen at line 1\)"
    if case == "every row filtered out":
        rows = [{"id": f"x{i}", "question": "?!", "answer": "..."} for i in range(4)]
        return b"\n".join(json.dumps(r).encode() for r in rows), r"bad\.jsonl: every row was filtered out \(kept 0, dropped 4 \(4 empty\)\)"
    raise KeyError(case)


CASES = ["malformed JSONL line", "missing question field", "empty text", "invalid UTF-8", "duplicate ids",
         "every row filtered out"]


@pytest.mark.parametrize("case", CASES)
def test_bad_file_is_refused_naming_file_and_line_and_writes_no_dataset(tmp_path, case, reliability):
    content, message = bad_rows(case)
    reliability(scenario=f"bad input: {case}", done="prepare a JSONL file with that row")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    store = tmp_path / "store"
    with pytest.raises(DataError, match=message) as e:
        prepare(DataConfig(pairs=str(path)), store)
    assert str(path) in str(e.value)
    assert not list(store.glob("datasets/*/manifest.json"))  # nothing that reads as a prepared dataset
    reliability(outcome=f"DataError: {str(e.value).replace(str(tmp_path) + '/', '')[:110]}", lost="none (no dataset written)")


def test_a_one_megabyte_text_is_truncated_with_a_warning(tmp_path, caplog, reliability):
    reliability(scenario="bad input: 1 MB text", done="one answer of 1,048,576 characters among 6 pairs")
    rows = [dict(r) for r in GOOD]
    rows[2]["answer"] = "word " * (2**20 // 5) + "w"
    assert len(rows[2]["answer"]) == 2**20
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        prepared = prepare(DataConfig(pairs=str(path), max_chars=2000), tmp_path / "store")
    assert any("pair 'p2': a text of 1048576 characters was truncated to max_chars=2000" in r.getMessage()
               and str(path) in r.getMessage() for r in caplog.records)
    answers = {p.id: p.answer for ps in prepared.splits.values() for p in ps}
    assert len(answers) == 6 and len(answers["p2"]) == 2000  # kept, cut
    assert prepared.manifest["filter"]["truncated"] == 1
    stored = {r["id"]: r["answer"] for split in prepared.splits
              for r in pq.read_table(prepared.dir / f"{split}.parquet").to_pylist()}
    assert len(stored["p2"]) == 2000
    reliability(outcome="kept, answer cut to 2,000 characters; a warning names the file and the pair; "
                        "the manifest counts 1 truncated", lost="none (all 6 pairs kept)")


FLAGS = [  # (entry point, argv, the message argparse must print)
    ("extract", ["--teachers", ""], r"argument --teachers: expected comma-separated teacher names, got ''"),
    ("extract", ["--concurrency", "0"], r"argument --concurrency: expected an integer >= 1, got 0"),
    ("extract", ["--batch-size", "-1"], r"argument --batch-size: expected an integer >= 1, got -1"),
    ("extract", ["--limit", "-3"], r"argument --limit: expected an integer >= 0, got -3"),
    ("train", ["--epochs-this-run", "0"], r"argument --epochs-this-run: expected an integer >= 1, got 0"),
    ("train", ["--seed", str(2**47)], r"argument --seed: expected an integer in \[0, 4294967295\], got 140737488355328"),
    ("tune", ["--time-budget-s", "-5"], r"argument --time-budget-s: expected a number >= 0, got -5"),
    ("tune", ["--name", "../x"], r"name must be a folder name inside --out \(no '/', not '.' or '..'\), got '../x'"),
    ("tune", ["--name", "/tmp/elsewhere"], r"name must be a folder name inside --out"),
    ("tune", ["--reduction-factor", "1"], r"argument --reduction-factor: expected an integer >= 2, got 1"),
    ("infer", ["ck", "When?", "--k", "0"], r"argument --k: expected an integer >= 1, got 0"),
    ("infer", ["ck", "When?", "--timeout-s", "-1"], r"argument --timeout-s: expected a number >= 0, got -1"),
    ("infer", ["ck", "   "], r"argument question: expected a question, got an empty text"),
]


@pytest.mark.parametrize("entry, argv, message", FLAGS, ids=[" ".join([e, *a]) for e, a, _ in FLAGS])
def test_a_bad_flag_is_refused_naming_it_before_any_work(entry, argv, message, tmp_path, monkeypatch, capsys,
                                                         reliability):
    import importlib
    import re

    reliability(scenario=f"bad flag: python -m cube_ray.{entry} {' '.join(argv)}", done="argument parsing")
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module({"train": "cube_ray.train.__main__", "tune": "cube_ray.tune.__main__"}
                                   .get(entry, f"cube_ray.{entry}")).main
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started
    reliability(outcome="exit 2, the flag and the expected range named", lost="nothing")


def test_config_values_out_of_range_are_refused():
    from cube_ray.config import InferConfig, TrainConfig

    for bad, message in [(dict(lr=float("nan")), "lr must be a positive number, got nan"),
                         (dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
                         (dict(grad_clip=-1.0), "grad_clip must be a number >= 0"),
                         (dict(memory_budget_mb=0), "memory_budget_mb must be at least 1"),
                         (dict(seed=2**47), r"seed must be in \[0, 2\*\*32 - 1\]")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()
    for bad, message in [(dict(k=0), "k must be at least 1"), (dict(timeout_s=-1.0), "timeout_s must be a number >= 0")]:
        with pytest.raises(ValueError, match=message):
            InferConfig(**bad).validate()
