"""Extraction end to end on a real local Ray, with the real all-MiniLM-L6-v2 teacher and real Parquet files."""
import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cube_ray.teachers.registry as registry
from cube_ray.config import ConfigError, DataConfig
from cube_ray.data.prepare import prepare
from cube_ray.extract import ExtractResult, extract_teacher, main
from cube_ray.store import SHARD_SIZE, EmbeddingError, EmbeddingStore, pairs_dataset, shard_order, split_embeddings
from cube_ray.teachers import get_teacher
from cube_ray.teachers.model import Teacher
from tests.conftest import make_tiny_teacher, write_jsonl


@pytest.fixture(scope="module")
def sample(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("store")
    prepared = prepare(DataConfig(limit=150), root)
    assert len(prepared.unique_texts()) > SHARD_SIZE  # at least two shards, so resume has something to skip
    return prepared, EmbeddingStore(root)


def test_the_time_more_texts_take_goes_by_the_pools_start_and_its_steady_rate():
    """What a search keeps of its wall budget for embedding the held-out split after its trials."""
    done = ExtractResult("t", None, cached=False, texts=1000, embedded=1000, seconds=110.0, warm_seconds=25.0,
                         warm_texts=100)
    # after the first shard 900 texts in 85 s; the pool's start: 25 s less that shard's 100 texts at that rate
    rate = 900 / 85
    assert done.seconds_for(500) == pytest.approx(25 - 100 / rate + 500 / rate)
    assert dataclasses.replace(done, embedded=0).seconds_for(500) == 0  # a cache hit: nothing to go by
    assert dataclasses.replace(done, warm_seconds=110.0, warm_texts=1000).seconds_for(500) == pytest.approx(55)


def test_extract_then_cache_hit(sample):
    prepared, store = sample
    texts = prepared.unique_texts()
    first = extract_teacher(texts, get_teacher("minilm"), store)
    assert not first.cached and first.embedded == first.texts == len(texts) and first.entry.complete
    files = sorted(first.entry.dir.glob("part-*.parquet"))
    assert len(files) == first.entry.n_shards == -(-len(texts) // SHARD_SIZE)
    schema = pq.read_schema(files[0])
    assert schema.names == ["text_id", "text", "embedding"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert sum(pq.read_metadata(f).num_rows for f in files) == len(texts)

    again = extract_teacher(list(reversed(texts)), get_teacher("minilm"), store)  # same set, other order
    assert again.cached and again.embedded == 0 and again.entry.dir == first.entry.dir


def test_split_api_is_aligned_with_direct_embedding(sample):
    prepared, store = sample
    entry = store.entry(get_teacher("minilm"), shard_order(prepared.unique_texts()))
    q, a = split_embeddings(prepared.dir, "eval", entry)
    pairs = prepared.splits["eval"]
    assert q.shape == a.shape == (len(pairs), 384)
    direct = Teacher(get_teacher("minilm")).embed([pairs[5].question, pairs[5].answer])
    np.testing.assert_allclose(np.stack([q[5], a[5]]), direct, atol=1e-4)

    ds = pairs_dataset(prepared.dir, "eval", {"minilm": entry}, batch_size=64)
    rows = ds.take_all()
    assert [r["id"] for r in rows] == [p.id for p in pairs]
    np.testing.assert_array_equal(np.stack([r["q_minilm"] for r in rows]), q)
    np.testing.assert_array_equal(np.stack([r["a_minilm"] for r in rows]), a)


def test_interrupted_extraction_resumes_missing_shards_only(sample):
    prepared, store = sample
    spec = get_teacher("minilm")
    entry = store.entry(spec, shard_order(prepared.unique_texts()))
    before = pq.read_table(entry.shard_path(1))
    # What a crash leaves: a missing shard, a half-written temporary file, and no entry.json.
    entry.shard_path(1).unlink()
    (entry.dir / "entry.json").unlink()
    (entry.dir / ".tmp-part-00001.parquet.x").write_bytes(b"PAR1 half")
    result = extract_teacher(prepared.unique_texts(), spec, store)
    assert not result.cached and result.embedded == pq.read_metadata(entry.shard_path(1)).num_rows
    assert not list(entry.dir.glob(".tmp-*")) and entry.complete
    after = pq.read_table(entry.shard_path(1))
    assert after.column("text_id").equals(before.column("text_id"))
    np.testing.assert_allclose(np.stack(after.column("embedding").to_numpy(zero_copy_only=False)),
                               np.stack(before.column("embedding").to_numpy(zero_copy_only=False)), atol=1e-5)


def test_a_grown_or_cut_text_set_embeds_only_texts_the_store_lacks(tmp_path, ray_local):
    spec, store = get_teacher("minilm"), EmbeddingStore(tmp_path / "store")
    old = [f"What is cube number {i}?" for i in range(300)]
    new = [f"How large is lattice {i}?" for i in range(40)]  # lengths interleave with old: shards mix both
    first = extract_teacher(old, spec, store)
    grown = extract_teacher(old + new, spec, store)
    assert grown.entry.dir != first.entry.dir and grown.entry.complete
    assert (grown.reused, grown.embedded) == (300, 40)
    np.testing.assert_array_equal(grown.entry.lookup(old), first.entry.lookup(old))  # copied, not recomputed
    np.testing.assert_allclose(grown.entry.lookup(new[:3]), Teacher(spec).embed(new[:3]), atol=1e-4)
    cut = extract_teacher(old[:100], spec, store)  # every text known: written without the model
    assert (cut.reused, cut.embedded) == (100, 0) and cut.entry.complete and cut.entry.info["width"] == 384
    np.testing.assert_array_equal(cut.entry.lookup(old[:100]), first.entry.lookup(old[:100]))


def test_nan_embedding_is_caught_and_good_shards_are_kept(tmp_path, ray_local):
    spec = make_tiny_teacher(tmp_path / "model", "distilbert", poison_token="volcano")
    texts = [f"Question number {i} about cubes and lattices?" for i in range(SHARD_SIZE + 20)]
    texts[-1] = "Is the volcano active, and how many cubes and lattices are inside it?"  # the longest texts sort last: this lands in the second shard
    store = EmbeddingStore(tmp_path / "store")
    with pytest.raises(EmbeddingError, match=r"teacher 'tiny-distilbert': 1 non-finite \(NaN or inf\) embedding\(s\); "
                                             r"first at text row \d+: .Is the volcano active, and"):
        extract_teacher(texts, spec, store)
    entry = store.entry(spec, shard_order(texts))
    assert entry.missing_shards() == [1] and not entry.complete  # shard 0 kept; nothing reads as complete


def test_a_changed_model_gets_its_own_entry_and_an_unchanged_one_is_reused(tmp_path, ray_local, monkeypatch,
                                                                          reliability):
    reliability(scenario="changed model", done="extract 30 texts with a tiny DistilBERT, again unchanged, then again "
                                               "after its weights were re-saved in place (same shapes)")
    monkeypatch.setenv("CUBE_RAY_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = registry._sha256
    monkeypatch.setattr(registry, "_sha256", lambda path: hashed.append(path.name) or real(path))
    spec = make_tiny_teacher(tmp_path / "model", "distilbert")
    texts = [f"How many cubes fit in box {i}?" for i in range(30)]
    store = EmbeddingStore(tmp_path / "store")
    fresh = lambda: dataclasses.replace(spec, model_version=None)  # noqa: E731  what a new run reads

    first = extract_teacher(texts, fresh(), store)
    assert not first.cached and first.embedded == 30 and first.entry.info["teacher"]["model_version"].startswith("sha256:")
    hashed.clear()
    again = extract_teacher(texts, fresh(), store)
    assert again.cached and again.entry.dir == first.entry.dir and hashed == []  # files unchanged: not even re-read

    make_tiny_teacher(tmp_path / "model", "distilbert")  # the model upgraded in place: new weights, same shapes
    upgraded = extract_teacher(texts, fresh(), store)
    assert "model.safetensors" in hashed
    assert not upgraded.cached and upgraded.entry.dir != first.entry.dir
    assert (upgraded.embedded, upgraded.reused) == (30, 0)  # nothing taken from the old model's entry
    assert not np.allclose(upgraded.entry.lookup(texts), first.entry.lookup(texts))
    np.testing.assert_allclose(upgraded.entry.lookup(texts[:3]), Teacher(fresh()).embed(texts[:3]), atol=1e-5)
    reliability(outcome="unchanged: the same entry, no file re-hashed; re-saved: a new entry (model_version from the "
                        "weights' sha256) with all 30 texts embedded afresh by the new weights, 0 reused",
                lost="none (the old model's entry stays for checkpoints that used it)")


def test_max_length_above_the_models_positions_fails_before_any_text_is_embedded(tmp_path, ray_local):
    spec = dataclasses.replace(make_tiny_teacher(tmp_path / "model", "llama"), max_length=512)  # 128 positions
    store = EmbeddingStore(tmp_path / "store")
    texts = [f"A long question about cube {i}? " * 40 for i in range(SHARD_SIZE + 5)]
    with pytest.raises(ConfigError, match=r"teacher 'tiny-llama': max_length 512 is above the model's limit of 128"):
        extract_teacher(texts, spec, store)
    assert store.entry(spec, shard_order(texts)).missing_shards() == [0, 1]


def test_cli_prints_summary(tmp_path, ray_local, capsys):
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"doc_id": f"d{i % 7}", "question": f"What is item {i}?",
                                                "answer": f"Item {i} is a cube of side {i}."} for i in range(40)])
    assert main(["--pairs", str(pairs), "--teachers", "minilm", "--store", str(tmp_path / "s"), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "80 unique texts" in out
    assert "minilm       384      80 cpu    extracted" in out
