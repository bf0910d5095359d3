"""Each teacher's residual mix: applied at inference only, linear in the cube's change, picked on the split given."""
import doctest

import pytest
import torch

from cube_ray.metrics import retrieval_metrics
from cube_ray.model import AdapterConfig, CubeConfig, Student
from cube_ray.train import calibration
from cube_ray.train.calibration import MIXES, calibrate_residual_mix
from cube_ray.train.data import Pairs

TEACHERS = {"minilm": 12, "smollm2": 16}


def trained_looking_student(**cube) -> Student:
    """A residual student whose decoders are no longer zero, so its change to the input is not."""
    torch.manual_seed(0)
    student = Student(CubeConfig(dims=[2, 2, 3], channels=4, max_steps=2, update_prob=1.0, **cube),
                      AdapterConfig(io="volume", out="volume"), TEACHERS)
    for adapter in student.adapters.values():
        torch.nn.init.normal_(adapter.last_layer().weight, std=0.5)
    return student


def pairs(q: dict, a: dict) -> Pairs:
    texts = [f"text {i}" for i in range(len(next(iter(q.values()))))]
    return Pairs(texts, texts, texts, q, a)


def test_the_mix_scales_the_change_at_inference_and_not_in_training():
    student = trained_looking_student()
    x = torch.randn(6, 12)
    full = student.eval()(x, "minilm").output
    student.residual_mix.copy_(torch.tensor([0.3, 1.0]))
    torch.testing.assert_close(student(x, "minilm").output, x + 0.3 * (full - x))
    student.residual_mix.zero_()
    assert torch.equal(student(x, "minilm").output, x)
    assert not torch.equal(student(x, "minilm", into="smollm2").output, torch.zeros(6, 16))
    student.train()  # training adds all of the change, whatever the mix: a mix of 0 must not stop learning
    torch.testing.assert_close(student(x, "minilm", all_steps=False).output, full)


def test_each_teacher_gets_the_mix_its_split_scores_best():
    """minilm's answers are its inputs (the identity retrieves them all: mix 0); smollm2's are the full student's
    predictions (the identity retrieves few; the smallest mix that retrieves them all is picked)."""
    student = trained_looking_student().eval()
    q = {"minilm": torch.randn(80, 12), "smollm2": torch.randn(80, 16)}
    predicted = student(q["smollm2"], "smollm2").output
    mrr = {mix: retrieval_metrics(q["smollm2"] + mix * (predicted - q["smollm2"]), torch.arange(80), predicted)["mrr"]
           for mix in MIXES}
    assert mrr[0.0] < 0.5 and mrr[1.0] == 1.0
    chosen = calibrate_residual_mix(student, pairs(q, {"minilm": q["minilm"], "smollm2": predicted}))
    assert chosen == {"minilm": 0.0, "smollm2": min(mix for mix in MIXES if mrr[mix] == 1.0)}
    assert student.residual_mix.tolist() == pytest.approx([0.0, chosen["smollm2"]])
    assert torch.equal(student.predict(q["minilm"], "minilm")[0], q["minilm"])
    torch.testing.assert_close(student.predict(q["smollm2"], "smollm2")[0],
                               q["smollm2"] + chosen["smollm2"] * (predicted - q["smollm2"]))


def test_a_tie_keeps_the_smaller_change_and_a_pure_cube_keeps_its_mix():
    untrained = Student(CubeConfig(dims=[2, 2, 3], channels=4, max_steps=2), AdapterConfig(), TEACHERS)
    q = {t: torch.randn(30, w) for t, w in TEACHERS.items()}
    assert calibrate_residual_mix(untrained, pairs(q, q)) == {"minilm": MIXES[0], "smollm2": MIXES[0]}  # no change: all tie
    pure = trained_looking_student(residual=False)
    assert calibrate_residual_mix(pure, pairs(q, q)) == {"minilm": 1.0, "smollm2": 1.0}


def test_the_module_example_runs():
    assert doctest.testmod(calibration).attempted >= 1 and doctest.testmod(calibration).failed == 0
