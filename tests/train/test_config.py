from pathlib import Path

import pytest

from cube_ray.config import ConfigError, TrainConfig, from_dict, load_yaml
from cube_ray.teachers import get_teacher

PRESETS = sorted((Path(__file__).parents[2] / "cube_ray" / "train" / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_is_valid(path):
    cfg = load_yaml(TrainConfig, path)
    for name in cfg.teachers:
        get_teacher(name)


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"smoke", "default"}


@pytest.mark.parametrize("data, message", [
    ({"mode": "translate"}, r"config.mode: expected one of"),
    ({"cube": {"dims": [8, 8]}}, r"config.cube: dims must be three positive sizes"),
    ({"loss": {"cosine": -1}}, r"config.loss: loss weight cosine must be >= 0"),
    ({"epochs": 0}, r"epochs must be at least 1"),
    ({"mode": "distill", "teachers": ["minilm"]}, r"distill.*needs at least two"),
    ({"fusion": "sum", "teachers": ["minilm"]}, r"fusion 'sum'.*needs at least two teachers"),
    ({"fusion": "concat", "teachers": ["minilm", "smollm2"], "mode": "distill"}, r"fusion 'concat' with mode 'distill'"),
    ({"fusion": "mean"}, r"config.fusion: expected one of"),
    ({"lr": "fast"}, r"config.lr: expected float, got str"),
    ({"optimiser": "adamw"}, r"unknown key\(s\) \['optimiser'\]"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, data)


def test_an_empty_or_torn_config_is_an_error_naming_the_file(tmp_path, reliability):
    reliability(scenario="torn config: an empty search.yaml / config.yaml (a write cut short)", done="load_yaml")
    path = tmp_path / "search.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=rf"{path}: empty \(a torn write\?\); expected a mapping of TrainConfig"):
        load_yaml(TrainConfig, path)
    path.write_text("epochs: 3\nlr: [")
    with pytest.raises(ConfigError, match=rf"{path}: not valid YAML"):
        load_yaml(TrainConfig, path)
    reliability(outcome="ConfigError naming the file; no run on all-default settings", lost="nothing")


def test_save_yaml_replaces_a_file_whole(tmp_path):
    from cube_ray.config import save_yaml

    path = tmp_path / "config.yaml"
    save_yaml(TrainConfig(epochs=3), path)
    save_yaml(TrainConfig(epochs=5), path)
    assert load_yaml(TrainConfig, path).epochs == 5 and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
