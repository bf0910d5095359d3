"""Optimiser groups: a linear layer's learning rate scales down with its fan-in (cube_ray/train/optim.py)."""
import pytest

from cube_ray.config import TrainConfig
from cube_ray.model import CubeConfig
from cube_ray.train.optim import make_optimizer, make_schedule
from cube_ray.train.snapshot import build_student


def test_wide_layers_take_lr_times_base_over_fan_in_and_the_schedule_decays_every_group():
    cfg = TrainConfig(teachers=["minilm", "smollm2"], lr=2e-3)
    student = build_student(cfg, {"minilm": 384, "smollm2": 576})
    optimizer = make_optimizer(cfg, student)
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == len(list(student.parameters()))  # every parameter once
    read_out = student.adapters["minilm"].out.weight  # the last D-slice: 8 x 12 cells x 8 channels = 768 inputs
    assert read_out.shape[1] == 768 and lr_of[id(read_out)] == pytest.approx(2e-3 * 256 / 768)
    assert lr_of[id(student.adapters["smollm2"].inp.weight)] == pytest.approx(2e-3 * 256 / 576)
    assert lr_of[id(student.adapters["minilm"].inp.weight)] == pytest.approx(2e-3 * 256 / 384)
    assert lr_of[id(student.adapters["minilm"].inp.bias)] == lr_of[id(student.core.halt.weight)] == 2e-3
    assert optimizer.param_groups[0]["lr"] == 2e-3  # the logged lr is the run's own
    schedule = make_schedule(cfg, optimizer, steps=10)
    for _ in range(5):
        optimizer.step()
        schedule.step()
    assert [g["lr"] / g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([0.5] * len(optimizer.param_groups))


def test_volume_read_out_and_lr_fan_in_zero():
    cfg = TrainConfig(teachers=["t"], lr=1e-3, cube=CubeConfig(dims=[8, 8, 12]))
    cfg.adapter.out = "volume"
    student = build_student(cfg, {"t": 64})
    lr_of = {id(p): g["lr"] for g in make_optimizer(cfg, student).param_groups for p in g["params"]}
    assert lr_of[id(student.adapters["t"].out.weight)] == pytest.approx(1e-3 * 256 / 6144)
    assert lr_of[id(student.adapters["t"].inp.weight)] == 1e-3  # 64 inputs: narrower than 256
    cfg.lr_fan_in = 0
    assert [g["lr"] for g in make_optimizer(cfg, student).param_groups] == [1e-3]
    with pytest.raises(ValueError, match="lr_fan_in must be >= 0"):
        TrainConfig(lr_fan_in=-1).validate()
