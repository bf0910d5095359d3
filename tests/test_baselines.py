"""The baselines: ridge in closed form, the residual linear adapter, and the table every evaluation shows."""
import doctest

import numpy as np

from cube_ray import baselines as module
from cube_ray.baselines import (RIDGE_ALPHAS, Ridge, baselines, fit_linear_adapter, fit_ridge, validation_mask)
from cube_ray.metrics import retrieval_metrics


def test_ridge_equals_numpy_closed_form():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    alpha = 2.5
    model = Ridge.fit(x, y, alpha)
    # explicit closed form with a bias column, the bias not penalised
    xa = np.hstack([x, np.ones((40, 1))])
    penalty = alpha * np.eye(7)
    penalty[-1, -1] = 0
    wb = np.linalg.solve(xa.T @ xa + penalty, xa.T @ y)
    np.testing.assert_allclose(model.weight, wb[:-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.bias, wb[-1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.predict(x), xa @ wb, rtol=1e-10, atol=1e-12)


def test_fit_ridge_picks_alpha_on_validation_and_refits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = x @ rng.normal(size=(8, 8)) + 0.1 * rng.normal(size=(200, 8))
    model = fit_ridge(x, y)
    assert model.alpha in RIDGE_ALPHAS
    assert model.alpha <= 10  # near-noiseless data: little shrinkage retrieves best
    np.testing.assert_allclose(model.weight, Ridge.fit(x, y, model.alpha).weight)


def test_validation_split_keeps_groups_whole():
    groups = np.repeat(np.arange(10), 5)
    val = validation_mask(50, 0.2, seed=0, groups=groups)
    assert val.sum() == 10
    for g in range(10):
        assert len(set(val[groups == g])) == 1


def test_baselines_on_an_identity_task():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(120, 8)) + 5.0  # a shared offset: embeddings all alike, as for decoder models
    a = q + 0.01 * rng.normal(size=q.shape)
    table = baselines(q[:80], a[:80], q[80:], a[80:])
    assert set(table) == {"identity", "mean_answer", "ridge", "linear_adapter"}
    assert table["identity"]["r1"] == 1.0 and table["linear_adapter"]["r1"] == 1.0
    assert table["ridge"]["mrr"] > 0.9
    assert table["mean_answer"]["cos"] > 0.9 and table["mean_answer"]["mrr"] < 0.2  # high cosine, no retrieval


def test_the_linear_adapter_stays_the_identity_where_the_identity_is_best():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(400, 16))
    a = q + 0.05 * rng.normal(size=q.shape)  # the question already retrieves its answer
    adapter = fit_linear_adapter(q, a)
    assert adapter.val_mrr > 0.99 and adapter.epochs == 0 and np.array_equal(adapter.predict(q), q)


def test_the_linear_adapter_learns_a_map_the_identity_cannot():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(800, 32))
    a = q[:, ::-1] + 0.5 * rng.normal(size=q.shape)  # a permutation of the question, plus noise
    groups = np.repeat(np.arange(200), 4)
    adapter = fit_linear_adapter(q[:600], a[:600], groups=groups[:600], lr=1e-2)
    pool = np.arange(200)
    held_out = retrieval_metrics(adapter.predict(q[600:]), pool, a[600:])["mrr"]
    assert adapter.epochs > 0 and held_out > 0.8 > retrieval_metrics(q[600:], pool, a[600:])["mrr"] + 0.5


def test_the_linear_adapter_keeps_its_best_epoch_and_stops_after_patience():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(300, 64))
    a = rng.normal(size=(300, 64))  # nothing to learn: the validation MRR can only wander around chance
    adapter = fit_linear_adapter(q, a, patience=2, max_epochs=30, lr=1e-2)
    later = fit_linear_adapter(q, a, patience=30, max_epochs=30, lr=1e-2)
    assert adapter.epochs < 28 and later.val_mrr >= adapter.val_mrr  # stopped early; more patience, never worse


def test_the_linear_adapter_is_deterministic_by_seed():
    rng = np.random.default_rng(0)
    q, a = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    a = q[:, ::-1] + a
    one, two = fit_linear_adapter(q, a, seed=3), fit_linear_adapter(q, a, seed=3)
    assert np.array_equal(one.weight, two.weight) and one.epochs == two.epochs


def test_docstring_examples():
    assert doctest.testmod(module).attempted >= 1 and doctest.testmod(module).failed == 0
