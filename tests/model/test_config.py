import pytest

from cube_ray.config import ConfigError, from_dict
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig, WeightingConfig


def test_defaults_validate():
    for cls in (CubeConfig, AdapterConfig, LossConfig, WeightingConfig):
        from_dict(cls, {}, "defaults")


@pytest.mark.parametrize("cls, data, message", [
    (CubeConfig, {"dims": [8, 8]}, "three positive sizes"),
    (CubeConfig, {"min_steps": 5, "max_steps": 3}, "min_steps <= max_steps"),
    (CubeConfig, {"attention": True, "channels": 8, "attention_heads": 3}, "divisible by attention_heads"),
    (CubeConfig, {"mixer": "attention", "attention": True}, "needs a local rule"),
    (CubeConfig, {"mixer": "alternate", "channels": 8, "mixer_heads": 3}, "divisible by mixer_heads"),
    (CubeConfig, {"mixer": "global"}, "expected one of"),
    (CubeConfig, {"update_prob": 0.0}, "update_prob"),
    (CubeConfig, {"state_bound": -1.0}, "state_bound"),
    (CubeConfig, {"chanels": 8}, "unknown key"),
    (AdapterConfig, {"strategy": "magic"}, "expected one of"),
    (AdapterConfig, {"hidden": 0}, "hidden"),
    (LossConfig, {"cosine": -1.0}, "must be >= 0"),
    (LossConfig, {"cosine": 0.0, "think": 0.1}, "at least one task loss"),
    (LossConfig, {"triplet_negatives": "mixed"}, "expected one of"),
    (WeightingConfig, {"mode": "fixed"}, "positive sum"),
    (WeightingConfig, {"temperature": 0.0}, "temperature"),
])
def test_invalid_configs_name_the_problem(cls, data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(cls, data, "space.yaml")
