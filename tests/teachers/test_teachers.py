import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cube_ray.config import ConfigError
from cube_ray.teachers import TeacherError, get_teacher, load_registry
from cube_ray.teachers.model import Teacher
from cube_ray.teachers.pooling import pool
from cube_ray.teachers.registry import TeacherSpec
from tests.conftest import make_tiny_teacher

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.", "Short."]


def test_pooling_is_mask_aware_under_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # token t of row b holds 4b + t
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert pool(hidden, right, "mean").flatten().tolist() == [1.0, 4.5]
    assert pool(hidden, right, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, right, "last").flatten().tolist() == [2.0, 5.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, left, "cls").flatten().tolist() == [1.0, 6.0]
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(hidden, right, "max")


@pytest.mark.parametrize("family", ["llama", "mistral", "distilbert"])
def test_tiny_family_loads_by_the_real_code_path(tmp_path, family):
    spec = make_tiny_teacher(tmp_path / family, family)
    teacher = Teacher(spec)
    emb = teacher.embed(TEXTS, batch_size=2)
    assert emb.shape == (3, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    # Padding must not change a text's embedding: alone or in a batch with longer texts, the same vector.
    np.testing.assert_allclose(teacher.embed(TEXTS[2:]), emb[2:], atol=1e-5)


def test_width_mismatch_is_an_error(tmp_path):
    spec = make_tiny_teacher(tmp_path / "m", "llama")
    spec.width = 64
    with pytest.raises(TeacherError, match="spec says width 64, but the model's hidden size is 32"):
        Teacher(spec)


def test_max_length_above_the_models_positions_is_a_config_error_at_load(tmp_path):
    spec = make_tiny_teacher(tmp_path / "m", "llama")  # max_position_embeddings=128
    spec.max_length = 128
    Teacher(spec)
    spec.max_length = 129
    with pytest.raises(ConfigError, match=r"teacher 'tiny-llama': max_length 129 is above the model's limit of 128 "
                                          r"tokens \(max_position_embeddings\); set `max_length:` to at most 128"):
        Teacher(spec)


def test_minilm_is_real_and_semantic():
    teacher = Teacher(get_teacher("minilm"))
    emb = teacher.embed(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # normalised like sentence-transformers
    assert emb[0] @ emb[1] > 0.6 > 0.2 > emb[0] @ emb[2]


def test_smollm2_loads_from_gguf_and_embeds_as_the_committed_reference():
    """smollm2_reference.json: these texts embedded once (with the versions it names); a change of loading,
    dequantisation, tokenisation or pooling shows here."""
    reference = json.loads((Path(__file__).parent / "smollm2_reference.json").read_text())
    teacher = Teacher(get_teacher("smollm2"))
    emb = teacher.embed(reference["texts"])
    assert emb.shape == (3, 576) and type(teacher.model).__name__ == "LlamaModel"
    expected = np.array(reference["embeddings"])
    np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-3)
    cos = (emb * expected).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99999


def test_unknown_teacher_lists_known_ones(reliability):
    reliability(scenario="bad input: unknown teacher", done="teacher name 'gpt5'")
    with pytest.raises(TeacherError, match=r"unknown teacher 'gpt5'; known: .*minilm.*smollm2"):
        get_teacher("gpt5")
    reliability(outcome="TeacherError listing the known teachers, before Ray starts", lost="none")


def test_missing_local_path_says_how_to_fix(tmp_path, reliability):
    reliability(scenario="bad input: missing local model path", done="a llama teacher whose folder does not exist")
    spec = TeacherSpec(name="mine", family="llama", source=str(tmp_path / "no-such-model"))
    with pytest.raises(TeacherError, match=r"teacher 'mine': local model folder .*no-such-model' does not exist"):
        Teacher(spec)
    reliability(outcome="TeacherError naming the teacher and the folder", lost="none")


def test_uncached_hub_model_offline_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(TeacherError, match=r"teacher 'mistral-7b': model 'mistralai/Mistral-7B-v0.1' is not available: "
                                           r"HF_HUB_OFFLINE=1 .*hf download mistralai/Mistral-7B-v0.1"):
        Teacher(load_registry(gpus_per_actor=0)["mistral-7b"])  # on CPU: its built-in spec asks for a GPU


def test_user_teachers_from_yaml(tmp_path):
    model = make_tiny_teacher(tmp_path / "tiny", "distilbert")
    cfg = tmp_path / "teachers.yaml"
    cfg.write_text(f"my-bert:\n  family: distilbert\n  source: {model.source}\n  pooling: mean\n  width: 32\n")
    registry = load_registry(cfg)
    assert {"minilm", "smollm2", "llama3-8b", "mistral-7b", "distilbert-base", "my-bert"} <= set(registry)
    assert Teacher(registry["my-bert"]).embed(TEXTS).shape == (3, 32)
    cfg.write_text("bad:\n  family: gpt\n  source: x\n")
    with pytest.raises(ConfigError, match=r"teachers.yaml: teacher 'bad'.family: expected one of"):
        load_registry(cfg)


def test_fingerprint_tracks_what_changes_embeddings():
    a = get_teacher("minilm")
    b = TeacherSpec(**{**a.__dict__, "name": "renamed"})
    c = TeacherSpec(**{**a.__dict__, "max_length": 128})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_a_cpu_float32_spec_keeps_the_fingerprint_it_had_before_gpu_fields():
    """Stores made before `gpus`, `device` and `batch_size` existed (dtype float32 then) stay valid: this value is
    the fingerprint the code before them computed for this spec."""
    spec = TeacherSpec(name="x", family="bert", source="/nowhere", width=384, normalize=True,
                       model_version="sha256:0123456789abcdef")
    assert spec.fingerprint() == "b18b133a734625b1"
    assert dataclasses.replace(spec, dtype="float32", batch_size=8).fingerprint() == "b18b133a734625b1"


def test_a_gpu_spec_runs_in_bfloat16_and_gets_its_own_fingerprint():
    cpu = TeacherSpec(name="x", family="llama", source="/nowhere", model_version="sha256:0123456789abcdef")
    gpu = dataclasses.replace(cpu, gpus=0.5)
    assert (cpu.on_gpu, cpu.torch_dtype) == (False, "float32")
    assert (gpu.on_gpu, gpu.torch_dtype) == (True, "bfloat16")
    assert dataclasses.replace(gpu, dtype="float16").torch_dtype == "float16"
    # another device or dtype embeds differently: its own store entry; how many GPUs an actor gets does not
    assert len({cpu.fingerprint(), gpu.fingerprint(), dataclasses.replace(gpu, dtype="float32").fingerprint()}) == 3
    assert dataclasses.replace(gpu, gpus=2).fingerprint() == gpu.fingerprint()


def test_gpus_per_actor_sets_every_teachers_gpus():
    builtin = load_registry()
    assert builtin["llama3-8b"].gpus == builtin["mistral-7b"].gpus == 1 and builtin["minilm"].gpus == 0
    on_cpu, shared = load_registry(gpus_per_actor=0), load_registry(gpus_per_actor=0.25)
    assert not any(spec.on_gpu for spec in on_cpu.values())
    assert all(spec.gpus == 0.25 and spec.torch_dtype in ("bfloat16", "float16") for spec in shared.values())


@pytest.mark.parametrize("fields, message", [
    ("gpus: 1.5", r"gpus \(GPUs per extraction actor\) must be 0 \(CPU\), a fraction of one GPU .* got 1.5"),
    ("device: cuda", r"device 'cuda' with gpus 0: .* device 'cuda' needs gpus > 0"),
    ("batch_size: 0", r"batch_size must be >= 1"),
])
def test_a_bad_gpu_field_names_the_file_and_the_teacher(tmp_path, fields, message):
    cfg = tmp_path / "teachers.yaml"
    cfg.write_text(f"mine:\n  family: llama\n  source: /nowhere\n  {fields}\n")
    with pytest.raises(ConfigError, match=rf"teachers.yaml: teacher 'mine': {message}"):
        load_registry(cfg)


def test_a_gpu_teacher_where_torch_sees_no_gpu_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also true on a GPU machine's CPU-only torch
    spec = TeacherSpec(name="big", family="llama", source=str(tmp_path / "not-even-there"), gpus=1)
    with pytest.raises(TeacherError, match=r"teacher 'big' runs on a GPU \(gpus: 1\), but torch .* sees none here "
                                           r".* or set gpus: 0 \(--gpus-per-actor 0\) to embed on CPU"):
        Teacher(spec)  # the device is checked first: the missing folder is never looked at


@pytest.mark.parametrize("source", ["package:evilpkg", "package:evilpkg.model"])
def test_a_package_source_is_found_without_importing_anything(tmp_path, monkeypatch, source, reliability):
    """A package of that name in the working directory (first on sys.path under `python -m`) must not run."""
    reliability(scenario=f"teacher YAML `source: {source}` with evilpkg/__init__.py in the working directory",
                done="TeacherSpec.resolve (extract, train, tune, infer on a checkpoint's teachers.yaml)")
    marker = tmp_path / "pwned"
    (tmp_path / "evilpkg" / "model").mkdir(parents=True)
    (tmp_path / "evilpkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "evilpkg" / "model" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = TeacherSpec(name="evil", family="bert", source=source, pooling="mean", max_length=32, dtype="float32", width=8)
    expected = "is not installed" if source == "package:evilpkg" else "name a top-level package"
    with pytest.raises(TeacherError, match=expected):
        spec.resolve()
    assert not marker.exists()
    reliability(outcome=f"TeacherError ({expected}); nothing imported", lost="nothing")
