"""The plan's success criteria (cube_ray/criteria.py) on students whose answers are known without training."""
import pytest
import torch

from cube_ray import criteria
from cube_ray.model import AdapterConfig, CubeConfig, Student
from cube_ray.train.data import Pairs

WIDTHS = {"minilm": 384, "smollm2": 576}


def pairs(n: int = 60) -> Pairs:
    g = torch.Generator().manual_seed(0)
    q = {t: torch.randn(n, w, generator=g) for t, w in WIDTHS.items()}
    a = {t: x + 0.5 * torch.randn(x.shape, generator=g) for t, x in q.items()}
    return Pairs([str(i) for i in range(n)], [f"q{i}" for i in range(n)], [f"a{i}" for i in range(n)], q, a)


@pytest.mark.parametrize("fusion", ["none", "sum"])
def test_an_untrained_residual_student_reconstructs_exactly_and_cannot_yet_translate(fusion):
    """Residual: it starts as the identity, so its autoencoder path returns each answer (cosine 1, met; a fused
    student from every teacher's embedding at once). Into another teacher's space (a fused student: from teacher t's
    embedding alone) it writes zeros (the decoders start at zero): every answer ties, rank P, so MRR is 1/P."""
    student = Student(CubeConfig(dims=[4, 4, 4], max_steps=3), AdapterConfig(), WIDTHS, fusion=fusion)
    held_out = pairs()
    identity = {"minilm": 0.8, "smollm2": 0.5}
    found = criteria.measure(student, held_out, identity, cross_teacher=True)
    for u, other in (("minilm", "smollm2"), ("smollm2", "minilm")):
        recon = found[u]["reconstruction_cos"]
        assert recon["value"] == pytest.approx(1.0, abs=1e-6) and recon["threshold"] == 0.95 and recon["met"]
        share = found[u][f"cross_teacher_share/{other}"]
        assert share["value"] == pytest.approx((1 / 60) / identity[u], rel=1e-9) and share["threshold"] == 0.7 and not share["met"]
    table = "\n".join(criteria.format_criteria(found))
    assert "| reconstruction cosine (autoencoder path, held-out texts) | > 0.95 | 1.000 (met) | 1.000 (met) |" in table
    assert "| distilled or fused student: MRR from smollm2's questions / identity MRR | > 0.7 | 0.021 (not met) | n/a |" in table
    assert "benchmarks/scale.py" in table


def test_a_dialogue_student_has_no_cross_teacher_share_and_says_so():
    student = Student(CubeConfig(dims=[4, 4, 4], max_steps=3, residual=False), AdapterConfig(), WIDTHS)
    found = criteria.measure(student, pairs(), {"minilm": 0.8, "smollm2": 0.5}, cross_teacher=False)
    assert set(found["minilm"]) == set(found["smollm2"]) == {"reconstruction_cos"}
    assert found["minilm"]["reconstruction_cos"]["value"] < 0.95  # a pure cube does not start at the identity
    assert "| n/a (neither distilled nor fused) | n/a (neither distilled nor fused) |" in "\n".join(criteria.format_criteria(found))
