import math

import numpy as np
import pytest
import torch

from cube_ray.metrics import (Centering, agreement, dedup_pool, reconstruction_cosine, retrieval_entropy,
                              retrieval_metrics, top1)


@pytest.fixture
def pool():
    return np.random.default_rng(0).normal(size=(50, 16))


def test_perfect_predictor(pool):
    gold = np.random.default_rng(1).integers(0, 50, size=80)
    m = retrieval_metrics(pool[gold] * 3.0, gold, pool)  # scale does not matter, direction does
    assert m == pytest.approx({"cos": 1.0, "r1": 1.0, "r5": 1.0, "mrr": 1.0})


def test_constant_predictor_is_at_chance(pool):
    gold = np.arange(50)  # every answer is gold once, so a fixed ranking puts each gold at each rank once
    m = retrieval_metrics(np.tile(pool.mean(0), (50, 1)), gold, pool)
    assert m["r1"] == pytest.approx(1 / 50)
    assert m["r5"] == pytest.approx(5 / 50)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, 51)) / 50)


def test_ties_count_against_gold(pool):
    m = retrieval_metrics(np.zeros((4, 16)), np.arange(4), pool)
    assert m["r1"] == 0.0 and m["mrr"] == pytest.approx(1 / 50)


def test_accepts_torch_and_numpy(pool):
    gold = np.arange(10)
    a = retrieval_metrics(pool[:10] + 0.5, gold, pool)
    b = retrieval_metrics(torch.tensor(pool[:10] + 0.5), torch.tensor(gold), torch.tensor(pool))
    assert a == pytest.approx(b)


def test_dedup_pool_embeddings_and_texts():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    p = dedup_pool(emb)
    np.testing.assert_array_equal(p.items, emb[[0, 1, 3]])
    np.testing.assert_array_equal(p.index, [0, 1, 0, 2, 1])
    np.testing.assert_array_equal(p.first, [0, 1, 3])
    np.testing.assert_array_equal(p.items[p.index], emb)
    t = dedup_pool(["b", "a", "b", "c"])
    assert t.items == ["b", "a", "c"]
    np.testing.assert_array_equal(t.index, [0, 1, 0, 2])
    np.testing.assert_array_equal(t.first, [0, 1, 3])


def test_reconstruction_cosine():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert reconstruction_cosine(x, x * 2) == pytest.approx(1.0)
    assert reconstruction_cosine(x, x[::-1]) == pytest.approx(0.0)


def test_retrieval_entropy(pool):
    assert retrieval_entropy(np.zeros((3, 16)), pool) == pytest.approx(math.log(50))  # undecided
    one_hot = np.eye(16)[:4]
    assert retrieval_entropy(one_hot, np.eye(16), temperature=0.01) == pytest.approx(0.0, abs=1e-6)


def test_centering_fits_train_mean_and_applies_to_both_types():
    train_q, train_a = np.array([[1.0, 2.0], [3.0, 2.0]]), np.array([[5.0, 4.0], [7.0, 4.0]])
    c = Centering.fit(train_q, train_a)
    np.testing.assert_array_equal(c.mean, [4.0, 3.0])
    np.testing.assert_array_equal(c(np.array([[4.0, 3.0]])), [[0.0, 0.0]])
    out = c(torch.tensor([[5.0, 5.0]]))
    assert isinstance(out, torch.Tensor) and out.tolist() == [[1.0, 2.0]]


def test_top1_and_agreement_between_teacher_spaces(pool):
    gold = np.array([3, 7, 7, 0])
    assert top1(pool[gold] + 0.01, pool).tolist() == [3, 7, 7, 0]
    first, second = top1(pool[gold], pool), top1(pool[[3, 7, 1, 2]], pool)  # agree on half the queries
    assert agreement({"a": first, "b": second}) == {"a": 0.5, "b": 0.5}  # two teachers: always the same share
    assert agreement({"alone": first}) == {"alone": 1.0}
    import doctest

    from cube_ray import metrics
    assert doctest.testmod(metrics).attempted >= 1 and doctest.testmod(metrics).failed == 0
