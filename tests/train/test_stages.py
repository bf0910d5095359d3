"""Progressive training's plan (which epochs train which mode) and init_from's loading of matching weights."""
import dataclasses

import pytest
import torch

from cube_ray.config import ConfigError, TrainConfig, from_dict
from cube_ray.model import AdapterConfig, CubeConfig
from cube_ray.teachers.registry import TeacherSpec
from cube_ray.train.snapshot import build_student, save_snapshot
from cube_ray.train.stages import Stage, legacy_stage, load_matching, next_stage_due, stage_at, stage_plan


def plan(epochs, stages, share=0.5):
    return [(s.mode, s.epochs) for s in stage_plan(TrainConfig(epochs=epochs, stages=stages, stage_share=share))]


def test_the_stages_before_the_last_get_their_share_of_the_epochs():
    assert plan(6, []) == [("dialogue", 6)]
    assert plan(6, ["autoencoder", "dialogue"]) == [("autoencoder", 3), ("dialogue", 3)]
    assert plan(6, ["autoencoder", "dialogue"], share=0.2) == [("autoencoder", 1), ("dialogue", 5)]
    assert plan(5, ["autoencoder", "dual", "dialogue"], share=0.6) == [("autoencoder", 2), ("dual", 1), ("dialogue", 2)]
    # every stage gets at least one epoch while there are epochs for it; the task's own stage always keeps one
    assert plan(2, ["autoencoder", "dialogue"], share=0.1) == [("autoencoder", 1), ("dialogue", 1)]
    assert plan(1, ["autoencoder", "dialogue"]) == [("dialogue", 1)]


def test_each_epoch_trains_its_stage_and_a_stage_begins_once():
    cfg = TrainConfig(epochs=4, stages=["autoencoder", "dialogue"])
    assert [stage_at(cfg, e).mode for e in range(5)] == ["autoencoder"] * 2 + ["dialogue"] * 3
    assert stage_at(cfg, 2) == Stage("dialogue", 2, 2)
    # training stage 0: the next one is due at epoch 2's first step, and not again once it has begun (stage 1)
    assert [next_stage_due(cfg, 0, e, 0, 0.0) for e in range(4)] == [False, False, True, True]
    assert not next_stage_due(cfg, 1, 2, 0, 0.0) and not next_stage_due(cfg, 1, 3, 5, 1e9)
    assert not next_stage_due(cfg, 0, 1, 5, 1e9)  # no stage_budget_s: seconds do not count


def test_a_stage_budget_ends_the_early_stages_inside_an_epoch():
    """The cost clock bounds a staged trial's early stages by seconds (stage_budget_s): the next stage is due at the
    first step after the stages so far trained their share of it, wherever in an epoch that falls."""
    cfg = TrainConfig(epochs=6, stages=["autoencoder", "dual", "dialogue"], stage_share=0.5, stage_budget_s=10.0)
    assert [next_stage_due(cfg, 0, 0, 3, s) for s in (4.9, 5.0)] == [False, True]  # half the budget each
    assert [next_stage_due(cfg, 1, 0, 7, s) for s in (9.9, 10.0)] == [False, True]
    assert not next_stage_due(cfg, 2, 0, 9, 100.0)  # the last stage trains to the end
    assert next_stage_due(cfg, 0, 2, 0, 0.0)  # the epochs' plan still ends a stage whose budget outlasts it


def test_checkpoints_saved_before_states_recorded_their_stage_resume_in_it():
    """Then stages began at epoch starts only; a checkpoint at an epoch's step 0 had not begun that epoch's stage."""
    staged = TrainConfig(epochs=4, stages=["autoencoder", "dialogue"])  # 2 epochs each, 100 samples an epoch
    assert [legacy_stage(staged, e, step, 100) for e, step in ((0, 0), (1, 3), (2, 0), (2, 1), (3, 0))] == \
        [(0, 200), (0, 200), (0, 200), (1, 200), (1, 200)]
    assert legacy_stage(TrainConfig(epochs=4), 2, 0, 100) == (0, 0)  # one stage: every sample is the task's


@pytest.mark.parametrize("data, message", [
    ({"stages": ["autoencoder"]}, "must end with the run's mode 'dialogue'"),
    ({"stages": ["autoencoder", "dialogue"], "stage_share": 1.0}, r"stage_share must be in \(0, 1\)"),
    ({"stages": ["distill", "dialogue"]}, "needs at least two"),
])
def test_bad_stages_are_refused_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, data, "run.yaml")


def saved(tmp_path, cfg: TrainConfig, widths: dict) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(1)
    student = build_student(cfg, widths)
    for p in student.parameters():  # not the initialisation a new student would have
        torch.nn.init.normal_(p)
    specs = {t: TeacherSpec(name=t, family="bert", source=f"local-{t}") for t in widths}
    return student, save_snapshot(tmp_path / "ck", student, {}, cfg, specs, {"widths": widths}, None)


def test_init_from_loads_what_matches_and_names_what_it_left_new(tmp_path):
    cfg = TrainConfig(teachers=["a"], cube=CubeConfig(dims=[4, 4, 4]), adapter=AdapterConfig(io="volume", out="volume"))
    old, path = saved(tmp_path, cfg, {"a": 16})
    # a second teacher, a linear bypass and a wider first teacher: the cube fits, the rest does not
    new_cfg = dataclasses.replace(cfg, teachers=["a", "b"], cube=dataclasses.replace(cfg.cube, skip_linear=True))
    torch.manual_seed(2)
    student = build_student(new_cfg, {"a": 16, "b": 8})
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    summary = load_matching(student, path)
    assert summary["loaded"] == ["adapters.a", "core"] and summary["new"] == ["adapters.b", "bypass.a", "bypass.b"]
    now, before = student.state_dict(), old.state_dict()
    for name, _ in student.named_parameters():
        expected = before[name] if name.startswith(("core.", "adapters.a.")) else fresh[name]
        assert torch.equal(now[name], expected), name
    wider = build_student(cfg, {"a": 24})
    summary = load_matching(wider, path)
    assert summary["loaded"] == ["core"] and summary["new"] == ["adapters.a (another shape)"]
    two_rules = build_student(dataclasses.replace(cfg, cube=dataclasses.replace(cfg.cube, layers=2)), {"a": 16})
    summary = load_matching(two_rules, path)  # the core parameter by parameter: the second rule is new
    assert summary["loaded"] == ["adapters.a", "core"] and summary["new"] and \
        all(n.startswith("core.cube.rules.1.") for n in summary["new"])


def test_init_from_a_run_folder_loads_its_best_eval(tmp_path):
    cfg = TrainConfig(teachers=["a"], cube=CubeConfig(dims=[4, 4, 4]))
    old, path = saved(tmp_path, cfg, {"a": 16})
    path.rename(tmp_path / "best_eval")
    student = build_student(cfg, {"a": 16})
    assert load_matching(student, tmp_path)["from"] == str(tmp_path / "best_eval")
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), old.parameters()))
