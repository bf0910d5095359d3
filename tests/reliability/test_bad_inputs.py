"""Bad input files through data preparation, end to end: a clear error naming the file, the line and what was
expected, and no dataset in the store that could later read as complete (its manifest.json is written last)."""
import logging
import re
from pathlib import Path

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


SAVED = "stage247-20260101-000000"  # newest_experiment finds it by the space's name


def saved_experiment(tmp_path: Path) -> Path:
    """results/<SAVED>/search.yaml as a default `python -m cube_ray.tune` run saves it (absolute paths, the sample
    defaults, the schedule filled in), without running a search: a resume reads only this before Ray starts."""
    from cube_ray.config import DataConfig, SearchConfig, save_yaml
    from cube_ray.tune.__main__ import SAMPLE_LIMIT, SAMPLE_SCHEDULE, SAMPLE_VAL_FRACTION, TIME_BUDGET_S

    search = SearchConfig(name=SAVED, out="results", store="store", time_budget_s=TIME_BUDGET_S, reduction_factor=3,
                          data=DataConfig(limit=SAMPLE_LIMIT, val_fraction=SAMPLE_VAL_FRACTION), **SAMPLE_SCHEDULE)
    path = tmp_path / "results" / SAVED / "search.yaml"
    path.parent.mkdir(parents=True)
    save_yaml(search.with_absolute_paths(), path)
    return path


RESUME_FLAGS = [  # (argv after --resume --name <the saved experiment>, the message argparse must print)
    (["--num-samples", "7"], r"--num-samples 7 \(saved: 200\)"),
    (["--time-budget-s", "0"], r"--time-budget-s unset \(saved: 600\)"),
    (["--limit", "100", "--seed", "3"], r"--limit 100 \(saved: 600\), --seed 3 \(saved: 0\)"),
    (["--teachers", "minilm"], r"--teachers minilm \(saved: unset\)"),
    (["--reduction-factor", "2"], r"--reduction-factor 2 \(saved: 3\)"),
    (["--store", "elsewhere"], r"--store /\S*/elsewhere \(saved: /\S*/store\)"),
    (["--space", "smoke"], r"--space smoke \(saved: stage247\)"),
]


@pytest.mark.parametrize("argv, message", RESUME_FLAGS, ids=[" ".join(a) for a, _ in RESUME_FLAGS])
def test_resume_refuses_a_search_flag_that_differs_from_the_saved_one(argv, message, tmp_path, monkeypatch, capsys,
                                                                      reliability):
    from cube_ray.tune.__main__ import main

    reliability(scenario=f"bad flag: python -m cube_ray.tune --resume {' '.join(argv)}", done="argument parsing")
    monkeypatch.chdir(tmp_path)
    saved = saved_experiment(tmp_path)
    before = saved.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["--resume", "--name", SAVED, *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err), err
    assert f"results/{SAVED}/search.yaml with its saved settings" in err
    assert [f for f in tmp_path.rglob("*") if f.is_file()] == [saved] and saved.read_bytes() == before  # nothing written
    reliability(outcome="exit 2, each differing flag named with the saved value", lost="nothing")


def test_train_resume_with_another_config_is_refused_naming_the_setting(tmp_path, capsys, reliability):
    from cube_ray.train.__main__ import PRESETS, main

    reliability(scenario="bad flag: python -m cube_ray.train --resume --seed 5 (the run trained with seed 0)",
                done="argument parsing")
    out = tmp_path / "run"
    out.mkdir()
    saved = out / "config.yaml"
    saved.write_bytes((PRESETS / "smoke.yaml").read_bytes())
    before = saved.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["--preset", "smoke", "--out", str(out), "--resume", "--seed", "5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "seed: 0 -> 5" in err and "trained with another config" in err, err
    assert [f for f in tmp_path.rglob("*") if f.is_file()] == [saved] and saved.read_bytes() == before
    reliability(outcome="exit 2, each differing setting named (saved -> given)", lost="nothing")


def test_resume_accepts_per_session_flags_and_repeated_settings(tmp_path, monkeypatch):
    import cube_ray.tune.runner
    from cube_ray.tune.__main__ import main

    class Started(Exception):
        pass

    def run_search(search, address=None, resume=False):
        raise Started(search.name, address, resume)

    monkeypatch.chdir(tmp_path)
    saved_experiment(tmp_path)
    monkeypatch.setattr(cube_ray.tune.runner, "run_search", run_search)
    # --space finds the experiment; the settings repeat the saved ones, the default --num-samples 200 included
    argv = ["--resume", "--space", "stage247", "--out", "results", "--address", "auto", "--num-samples", "200",
            "--time-budget-s", "600", "--limit", "600", "--store", "store"]
    with pytest.raises(Started) as e:
        main(argv)
    assert e.value.args == (SAVED, "auto", True)


def test_given_options_sees_a_flag_given_with_its_default_value():
    import argparse

    from cube_ray.cli import given_options

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--flag", action="store_true")
    p.add_argument("--s", default="x")
    assert given_options(p, ["--n", "40", "--flag"]) == {"n", "flag"}
    assert given_options(p, []) == set()


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
