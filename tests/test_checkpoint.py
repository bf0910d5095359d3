import json
import os

import pytest
import torch

from cube_ray.checkpoint import OPTIMISER, CheckpointError, drop_optimiser, load_checkpoint, save_checkpoint
from cube_ray.data.manifest import sha256_file
from cube_ray.teachers import get_teacher


def _save(path, value=1.0):
    weights = {"w": torch.full((3, 2), value), "centre.minilm": torch.arange(4.0)}
    return save_checkpoint(path, weights, {"cube": {"dims": [4, 4, 4]}}, {"minilm": get_teacher("minilm")},
                           {"dataset_id": "abc"}, state={"epoch": 3, "rng": torch.get_rng_state()})


def test_round_trip(tmp_path):
    ck = load_checkpoint(_save(tmp_path / "ck"))
    assert torch.equal(ck.weights["w"], torch.ones(3, 2)) and ck.config == {"cube": {"dims": [4, 4, 4]}}
    assert ck.teachers["minilm"] == get_teacher("minilm") and ck.data == {"dataset_id": "abc"}
    assert ck.state["epoch"] == 3


def test_the_optimisers_state_loads_into_the_state_and_can_be_dropped_alone(tmp_path):
    """It lives in a file of its own (a search drops it when a trial ends, without rewriting anything else); the
    folder still loads whole and checked, every other file the very same (hard links), its twin untouched."""
    path = save_checkpoint(tmp_path / "ck", {"w": torch.ones(3)}, {}, {"minilm": get_teacher("minilm")}, {},
                           state={"epoch": 3}, optimiser={"optimizer": {"state": {0: torch.zeros(3)}}, "schedule": None})
    ck = load_checkpoint(path)
    assert ck.state["epoch"] == 3 and torch.equal(ck.state["optimizer"]["state"][0], torch.zeros(3))
    os.link(path / OPTIMISER, tmp_path / "twin")  # a hard link elsewhere (best_eval/ and latest/ share files)
    inodes = {p.name: p.stat().st_ino for p in path.iterdir() if p.name not in (OPTIMISER, "checkpoint.json")}
    assert drop_optimiser(path) and not (path / OPTIMISER).exists() and (tmp_path / "twin").exists()
    ck = load_checkpoint(path)
    assert ck.state == {"epoch": 3} and torch.equal(ck.weights["w"], torch.ones(3))
    assert {p.name: p.stat().st_ino for p in path.iterdir() if p.name != "checkpoint.json"} == inodes
    assert not drop_optimiser(path)  # nothing left to drop
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "twin"]  # no temporary or old folder left


def test_overwrite_is_whole(tmp_path):
    _save(tmp_path / "ck", 1.0)
    _save(tmp_path / "ck", 2.0)
    assert torch.equal(load_checkpoint(tmp_path / "ck").weights["w"], torch.full((3, 2), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old folders left behind


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:40]), r"model.safetensors: corrupt"),
    (lambda d: (d / "config.yaml").write_text("cube: {dims: [9, 9, 9]}\n"), r"config.yaml: corrupt"),
    (lambda d: (d / "state.pt").unlink(), r"state.pt: missing from the checkpoint"),
    (lambda d: (d / "checkpoint.json").write_text("{not json"), r"checkpoint.json: corrupt"),
    (lambda d: (d / "checkpoint.json").unlink(), r"checkpoint.json: missing; .* is not a complete cube_ray checkpoint"),
])
def test_damaged_checkpoint_names_the_file(tmp_path, damage, message):
    path = _save(tmp_path / "ck")
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


class _RunsCode:
    """What an attacker's pickle holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_pt_is_refused_and_runs_nothing(tmp_path, reliability):
    reliability(scenario="malicious checkpoint: state.pt that runs os.system on load, sha256 manifest rewritten to match",
                done="load_checkpoint (report, --resume and Ray's restarts read state.pt this way)")
    path, marker = _save(tmp_path / "ck"), tmp_path / "pwned"
    torch.save({"epoch": 3, "payload": _RunsCode(marker)}, path / "state.pt")
    manifest = json.loads((path / "checkpoint.json").read_text())
    manifest["files"]["state.pt"] = sha256_file(path / "state.pt")  # whoever hands it over writes both
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"state.pt: refused, it holds more than tensors and plain values"):
        load_checkpoint(path)
    assert not marker.exists()
    assert torch.equal(load_checkpoint(path, with_state=False).weights["w"], torch.ones(3, 2))  # evaluate, infer
    assert not marker.exists()
    reliability(outcome="CheckpointError naming state.pt; nothing ran (torch.load weights_only=True)", lost="nothing")
