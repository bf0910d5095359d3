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
    ({"lr": "fast"}, r"config.lr: expected float, got str"),
    ({"optimiser": "adamw"}, r"unknown key\(s\) \['optimiser'\]"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, data)
