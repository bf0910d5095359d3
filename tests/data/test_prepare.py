import json

import pytest

from cube_ray.config import ConfigError, DataConfig, from_dict
from cube_ray.data.contamination import ContaminationError, find_contamination
from cube_ray.data.prepare import prepare
from cube_ray.data.quality import quality_filter
from cube_ray.data.readers import DataError, Pair, read_pairs, sample_paths
from cube_ray.data.split import split_by_document
from tests.conftest import SQUAD, write_jsonl


def P(i, doc, q, a):
    return Pair(str(i), doc, 0, q, a)


def test_quality_filter_counts_reasons():
    pairs = [P(1, "d", "What is a cube?", "A solid."), P(2, "d", "?!", "A solid."), P(3, "d", "Hi", "A solid."),
             P(4, "d", "What is a cube?", "x" * 50), P(5, "d", "what is a CUBE", "a solid")]
    kept, report = quality_filter(pairs, min_chars=3, max_chars=40)
    assert [p.id for p in kept] == ["1", "4"]
    assert kept[1].answer == "x" * 40  # cut to max_chars, kept
    assert dict(report.dropped) == {"empty": 1, "too_short": 1, "duplicate": 1}
    assert (report.kept, report.truncated) == (2, 1)


def test_split_is_by_document_and_seeded():
    pairs = read_pairs(SQUAD / "dev.jsonl.gz")
    splits = split_by_document(pairs, {"train": 0.7, "val": 0.1, "eval": 0.2}, seed=3)
    docs = {name: {p.doc_id for p in ps} for name, ps in splits.items()}
    assert not (docs["train"] & docs["eval"]) and not (docs["train"] & docs["val"]) and not (docs["val"] & docs["eval"])
    assert sum(len(ps) for ps in splits.values()) == len(pairs)
    assert abs(len(splits["eval"]) / len(pairs) - 0.2) < 0.05
    assert splits == split_by_document(pairs, {"train": 0.7, "val": 0.1, "eval": 0.2}, seed=3)
    assert splits != split_by_document(pairs, {"train": 0.7, "val": 0.1, "eval": 0.2}, seed=4)


def test_manifest_identical_across_runs(tmp_path):
    a = prepare(DataConfig(seed=1), tmp_path / "a")
    b = prepare(DataConfig(seed=1), tmp_path / "b")
    text = (a.dir / "manifest.json").read_text()
    assert text == (b.dir / "manifest.json").read_text()
    manifest = json.loads(text)
    train_file, eval_file = sample_paths()
    assert [s["file"] for s in manifest["sources"]] == [train_file.name, eval_file.name]
    assert manifest["splits"]["train"]["rows"] == len(manifest["splits"]["train"]["row_sha256"]) == len(a.splits["train"])
    assert {p.doc_id for p in a.splits["train"]}.isdisjoint({p.doc_id for p in a.splits["eval"]})
    assert prepare(DataConfig(seed=1, limit=100), tmp_path / "c").dataset_id != a.dataset_id


def test_val_fraction_carves_whole_documents_from_train_only(tmp_path):
    plain = prepare(DataConfig(seed=1), tmp_path)
    held = prepare(DataConfig(seed=1, val_fraction=0.2), tmp_path)
    docs = {name: {p.doc_id for p in ps} for name, ps in held.splits.items()}
    assert set(held.splits) == {"train", "val", "eval"}
    assert not docs["val"] & docs["train"] and not docs["val"] & docs["eval"]
    assert held.splits["eval"] == plain.splits["eval"]  # the report's split does not move
    assert sorted(held.splits["train"] + held.splits["val"], key=lambda p: p.id) == sorted(plain.splits["train"], key=lambda p: p.id)
    assert abs(len(held.splits["val"]) / len(plain.splits["train"]) - 0.2) < 0.1
    assert held.manifest["splits"]["val"]["rows"] == len(held.splits["val"]) and held.dataset_id != plain.dataset_id
    assert set(held.unique_texts()) == set(plain.unique_texts())  # the same texts: one store entry serves both


def test_contamination_refuses_and_lists_examples(tmp_path, reliability):
    reliability(scenario="bad input: contaminated split", done="an eval question also in train (after normalisation)")
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "t1", "doc_id": "A", "question": "Who built the first cube?", "answer": "Rubik built it in 1974."},
        {"id": "t2", "doc_id": "B", "question": "Where is the museum of cubes located?", "answer": "It is in Budapest, Hungary."}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "e1", "doc_id": "C", "question": "WHO built the first cube", "answer": "Nobody knows that."},
        {"id": "e2", "doc_id": "D", "question": "How heavy is it?", "answer": "About one hundred grams."}])
    cfg = DataConfig(pairs=str(train), eval_pairs=str(evals))
    with pytest.raises(ContaminationError, match=r"(?s)1 eval text\(s\) also occur in train.*eval e1 question") as e:
        prepare(cfg, tmp_path / "store")
    assert "--decontaminate" in str(e.value)
    assert not (tmp_path / "store" / "datasets").exists()  # nothing written that reads as a dataset
    clean = prepare(DataConfig(pairs=str(train), eval_pairs=str(evals), decontaminate=True), tmp_path / "store")
    assert [p.id for p in clean.splits["eval"]] == ["e2"]
    assert clean.manifest["decontaminated"] == ["e1"]
    reliability(outcome="ContaminationError listing 'eval e1 question' and --decontaminate; no dataset written; "
                        "--decontaminate drops e1 and records it", lost="none")


def test_near_duplicates_are_warnings_not_errors():
    train = [P(1, "A", "In what year did the first transcontinental railroad across the western United States of America officially open", "It opened in 1869.")]
    evals = [P(2, "B", "In what year did the first transcontinental railroad across the western United States of America officially open fully", "Later.")]
    report = find_contamination({"train": train, "eval": evals})
    assert not report.exact
    assert [(c.pair_id, c.field, c.train_id) for c in report.near] == [("2", "question", "1")]
    assert report.near[0].jaccard >= 0.9
    report.raise_if_contaminated()  # near-duplicates alone do not refuse


def test_squad_official_split_is_contaminated():
    """SQuAD's own train and dev share a few answer sentences; the check must see them."""
    report = find_contamination({"train": read_pairs(SQUAD / "train.jsonl.gz"), "eval": read_pairs(SQUAD / "dev.jsonl.gz")})
    assert 10 <= len(report.exact) <= 30
    assert any(c.field == "answer" for c in report.exact)


def test_every_row_filtered_out_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Hi", "answer": "Yo"}, {"question": "Ok", "answer": "No"}])
    with pytest.raises(DataError, match=r"p.jsonl: every row was filtered out \(kept 0, dropped 2 \(2 too_short\)\)"):
        prepare(DataConfig(pairs=str(path)), tmp_path / "store")


def test_data_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"config.split_ratios: expected a mapping"):
        from_dict(DataConfig, {"split_ratios": [0.5, 0.5]})
    with pytest.raises(ConfigError, match=r"config: val_fraction must be in \[0, 1\), got 1.0"):
        from_dict(DataConfig, {"val_fraction": 1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DataConfig, {"split_ratio": {"train": 1.0}})
    with pytest.raises(ConfigError, match="sum to 1"):
        from_dict(DataConfig, {"split_ratios": {"train": 0.5, "eval": 0.4}})
