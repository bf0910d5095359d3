"""Shared fixtures: a real local Ray per test module, and tiny randomly initialised teachers saved to disk."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from cube_ray.teachers.registry import TeacherSpec, get_teacher

SQUAD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "squad-v1.1-sentences"


def pytest_collection_modifyitems(items):
    """A test that describes itself with the `reliability` fixture is part of the reliability suite
    (`pytest -m reliability`), wherever it lives."""
    for item in items:
        if "reliability" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def reliability(record_property):
    """Describe a reliability scenario for results/reliability.md (scripts/reliability.py reads these from the
    JUnit XML): `scenario` and `done` up front, then `outcome` and `lost` once the test has checked them."""
    def record(**fields: str) -> None:
        for key, value in fields.items():
            record_property(key, value)
    return record


@pytest.fixture
def small_disk(tmp_path):
    """Make a folder a size-limited filesystem (tmpfs) to run out of space in: `small_disk(folder, "2m")`."""
    import subprocess

    mounted = []

    def mount(folder: Path, size: str) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray session for the whole module (Ray takes ~8 s to start here)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def make_tiny_teacher(folder: Path, family: str, poison_token: str | None = None) -> TeacherSpec:
    """Save a tiny random model of `family` (with all-MiniLM's tokenizer) and return a spec pointing at it.

    `poison_token`: that token's input embedding is set to NaN, so any text containing it embeds to NaN.
    """
    import torch
    from transformers import (AutoTokenizer, DistilBertConfig, DistilBertModel, LlamaConfig, LlamaModel,
                              MistralConfig, MistralModel)

    tokenizer = AutoTokenizer.from_pretrained(get_teacher("minilm").resolve())
    small = dict(vocab_size=tokenizer.vocab_size)
    if family == "distilbert":
        model = DistilBertModel(DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2, **small))
    else:
        cls, cfg = {"llama": (LlamaModel, LlamaConfig), "mistral": (MistralModel, MistralConfig)}[family]
        model = cls(cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, **small))
    if poison_token is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(poison_token)] = float("nan")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    pooling = "cls" if family == "distilbert" else "last"
    return TeacherSpec(name=f"tiny-{family}", family=family, source=str(folder), pooling=pooling, max_length=64, width=32)
