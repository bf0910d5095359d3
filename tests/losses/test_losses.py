import doctest
import importlib
import math

import pytest
import torch

from cube_ray.losses import (CombinedLoss, CosineLoss, DiversityLoss, InfoNCELoss, MSELoss, ThinkingCost,
                             TripletLoss, competence, curriculum_subset, curriculum_weights, difficulty, step_cap)
from cube_ray.losses.diversity import mean_pairwise_cosine
from cube_ray.model import LossConfig

PRED = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
TARGET = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
R = 1 / math.sqrt(2)
COS = torch.tensor([[R, 0.0, -1.0], [R, 1.0, 0.0], [1.0, R, -R]])  # COS[i, j] = cos(PRED[i], TARGET[j])


def test_cosine():
    assert CosineLoss()(PRED, TARGET).item() == pytest.approx(((1 - R) + 0 + (1 + R)) / 3)
    w = torch.tensor([1.0, 0.0, 1.0])
    assert CosineLoss()(PRED, TARGET, sample_weight=w).item() == pytest.approx(((1 - R) + (1 + R)) / 2)


def test_mse():
    # squared errors per sample: (0 + 1) / 2, (0 + 1) / 2, (4 + 1) / 2
    assert MSELoss()(PRED, TARGET).item() == pytest.approx((0.5 + 0.5 + 2.5) / 3)


def test_infonce():
    t = 0.5
    logits = COS / t
    expected = sum(-logits[i, i] + torch.logsumexp(logits[i], 0) for i in range(3)) / 3
    assert InfoNCELoss(temperature=t)(PRED, TARGET).item() == pytest.approx(expected.item(), rel=1e-5)


def test_infonce_ignores_duplicate_answers():
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # answers 0 and 1 are the same text
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # samples 0 and 1 compete only with target 2 (not with each other); sample 2 with targets 0 and 1
    e2 = math.exp(2)  # cos 1 at temperature 0.5
    expected = (2 * -math.log(e2 / (e2 + 1)) - math.log(e2 / (e2 + 2))) / 3
    assert InfoNCELoss(temperature=0.5)(pred, target).item() == pytest.approx(expected, rel=1e-5)


def test_triplet_hard_negatives():
    m = 0.3
    # hardest negative per row: row 0 -> target 1 (0), row 1 -> target 0 (R), row 2 -> target 0 (1)
    expected = (max(0, 0 - R + m) + max(0, R - 1 + m) + max(0, 1 - (-R) + m)) / 3
    assert TripletLoss(margin=m)(PRED, TARGET).item() == pytest.approx(expected, rel=1e-5)


def test_triplet_random_negatives_are_seeded_and_valid():
    pred, target = torch.randn(16, 8), torch.randn(16, 8)
    a = TripletLoss(negatives="random", seed=3)(pred, target)
    b = TripletLoss(negatives="random", seed=3)(pred, target)
    assert a == b
    hard = TripletLoss(negatives="hard")(pred, target)
    assert a <= hard  # the hardest negative gives the largest hinge per sample
    single = TripletLoss(negatives="random")(pred[:1], target[:1])
    assert single.item() == 0  # no negative, no loss


def test_diversity():
    collapsed = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # pairwise cosines 0, -1, 0 -> mean -1/3
    assert DiversityLoss()(collapsed, spread).item() == pytest.approx(1 + 1 / 3)
    assert DiversityLoss()(spread, collapsed).item() == 0.0
    # the O(B d) formula equals the explicit mean over pairs
    x = torch.randn(7, 5)
    n = torch.nn.functional.normalize(x, dim=-1)
    sims = n @ n.T
    explicit = (sims.sum() - sims.diagonal().sum()) / (7 * 6)
    assert mean_pairwise_cosine(x).item() == pytest.approx(explicit.item(), rel=1e-5)


def test_thinking_cost():
    assert ThinkingCost()(PRED, TARGET, expected_steps=torch.tensor([2.0, 4.0, 9.0])).item() == 5.0
    with pytest.raises(ValueError, match="expected_steps"):
        ThinkingCost()(PRED, TARGET)


def test_curriculum_schedule():
    q = torch.tensor([[1.0, 0.0]] * 4)
    a = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = difficulty(q, a)
    torch.testing.assert_close(d, torch.tensor([2.0, 0.0, 1.0, 1 - R]))
    assert competence(0, warmup=4, start=0.25) == 0.25
    assert competence(2, warmup=4, start=0.25) == 0.625
    assert competence(9, warmup=4, start=0.25) == 1.0
    assert competence(0, warmup=0, start=0.25) == 1.0
    assert curriculum_weights(d, 0.25).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert curriculum_weights(d, 0.5).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert curriculum_weights(d, 1.0).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert curriculum_subset(d, 0.75).tolist() == [1, 3, 2]
    assert [step_cap(c, 2, 10) for c in (0.0, 0.5, 1.0)] == [2, 6, 10]


def test_combined_loss_weights_and_skips_zero_terms():
    loss = CombinedLoss(LossConfig(cosine=0.5, mse=2.0, infonce=0.0, triplet=0.1, think=0.01))
    assert set(loss.terms) == {"cosine", "mse", "triplet", "think"}
    steps = torch.tensor([3.0, 5.0, 7.0])
    total, parts = loss(PRED, TARGET, expected_steps=steps)
    expected = (0.5 * CosineLoss()(PRED, TARGET) + 2.0 * MSELoss()(PRED, TARGET)
                + 0.1 * TripletLoss()(PRED, TARGET) + 0.01 * 5.0)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["think"] == 5.0 and parts["mse"] == pytest.approx(MSELoss()(PRED, TARGET).item())


def test_combined_loss_with_curriculum():
    loss = CombinedLoss(LossConfig(cosine=1.0, think=0.0, curriculum=True, curriculum_warmup=2,
                                   curriculum_start=0.5))
    question = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])  # easy, easy, hard, hard
    pred = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    early, _ = loss(pred, target, question=question, epoch=0)
    assert early.item() == pytest.approx(CosineLoss()(pred[:2], target[:2]).item())
    late, _ = loss(pred, target, question=question, epoch=2)
    assert late.item() == pytest.approx(CosineLoss()(pred, target).item())
    with pytest.raises(ValueError, match="question"):
        loss(pred, target)


@pytest.mark.parametrize("module", ["base", "cosine", "mse", "infonce", "triplet", "diversity", "curriculum",
                                    "think", "combine"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(f"cube_ray.losses.{module}"))
    assert result.attempted >= 1 and result.failed == 0  # every loss module shows an example, and it holds
