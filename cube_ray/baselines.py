"""The baselines every student is scored against, in one teacher's space and on the same split.

- identity: the question as its own answer (doing nothing);
- mean answer: the train answers' mean for every query (a high cosine on anisotropic embeddings while retrieving
  almost nothing, which is why it is always shown);
- ridge: linear regression q -> a in closed form, its penalty picked by MRR;
- linear adapter: x + xW (W zero at first, full rank) trained with in-batch InfoNCE and early-stopped by MRR:
  what a user would train instead of a cube, and the bar a cube has to clear.

Ridge's penalty and the adapter's stopping epoch are picked on a validation slice of the train split, whole
documents when `groups` (doc ids) are given: a random slice shares documents with what was fitted and picks models
that look better than they are. Ridge then refits on all of train; the adapter keeps its best epoch's W.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from cube_ray.metrics import as_array, as_tensor, dedup_pool, retrieval_metrics

RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
BASELINES = ("identity", "mean_answer", "ridge", "linear_adapter")


@dataclasses.dataclass
class Ridge:
    """Linear regression Y ~ X W + b with an L2 penalty alpha on W (not on the bias), in closed form."""

    weight: np.ndarray  # (d_in, d_out)
    bias: np.ndarray  # (d_out,)
    alpha: float

    @classmethod
    def fit(cls, x, y, alpha: float) -> Ridge:
        """W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on centred X, Y (= an unpenalised bias), b = mean(Y) - mean(X) W."""
        x, y = as_array(x), as_array(y)
        mx, my = x.mean(0), y.mean(0)
        xc = x - mx
        weight = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
        return cls(weight, my - mx @ weight, alpha)

    def predict(self, x) -> np.ndarray:
        return as_array(x) @ self.weight + self.bias


def validation_mask(n: int, fraction: float, seed: int, groups=None) -> np.ndarray:
    """A boolean validation mask over n rows: whole groups (e.g. documents) when given, else single rows."""
    rng = np.random.default_rng(seed)
    keys = np.arange(n) if groups is None else np.asarray(groups)
    unique = rng.permutation(np.unique(keys))
    val_keys = unique[: max(1, round(fraction * len(unique)))]
    return np.isin(keys, val_keys)


def fit_ridge(x, y, alphas=RIDGE_ALPHAS, val_fraction: float = 0.2, seed: int = 0, groups=None) -> Ridge:
    """Ridge with alpha chosen on a validation slice of train by MRR (ties: cosine), then refit on all of train.

    MRR, not cosine, picks alpha: on anisotropic embeddings a heavily shrunk map toward the mean answer wins on
    cosine while retrieving nothing. One eigendecomposition of the fit slice's Gram matrix serves every alpha.
    """
    x, y = as_array(x), as_array(y)
    val = validation_mask(len(x), val_fraction, seed, groups)
    xf, yf = x[~val], y[~val]
    mx, my = xf.mean(0), yf.mean(0)
    xc = xf - mx
    eigval, eigvec = np.linalg.eigh(xc.T @ xc)
    projected = eigvec.T @ (xc.T @ (yf - my))
    pool = dedup_pool(y[val])
    scores = []
    for alpha in alphas:
        weight = eigvec @ (projected / (eigval + alpha)[:, None])
        m = retrieval_metrics((x[val] - mx) @ weight + my, pool.index, pool.items)
        scores.append((m["mrr"], m["cos"]))
    best = alphas[max(range(len(alphas)), key=lambda i: scores[i])]
    return Ridge.fit(x, y, best)


@dataclasses.dataclass
class LinearAdapter:
    """The residual linear adapter x + xW; `epochs` is how many epochs its W trained (0: it stayed the identity)."""

    weight: np.ndarray  # (d, d)
    epochs: int
    val_mrr: float

    def predict(self, x) -> np.ndarray:
        x = as_array(x)
        return x + x @ self.weight


def fit_linear_adapter(x, y, val_fraction: float = 0.2, seed: int = 0, groups=None, temperature: float = 0.05,
                       batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.01, max_epochs: int = 60,
                       patience: int = 4) -> LinearAdapter:
    """x + xW trained on the fit slice with in-batch InfoNCE (cosine / temperature, each query against the batch's
    answers) by AdamW; W starts at zero (the identity, scored first) and the epoch with the best MRR on the
    validation slice is kept, stopping after `patience` epochs without a better one.

    Example (answers are a rotation of the questions, which the identity cannot retrieve):
        >>> g = np.random.default_rng(0); q = g.normal(size=(600, 16)); a = q[:, ::-1].copy()
        >>> fit_linear_adapter(q, a, lr=1e-2).val_mrr > 0.9
        True
    """
    x, y = as_tensor(x), as_tensor(y)
    val = torch.from_numpy(validation_mask(len(x), val_fraction, seed, groups))
    xf, yf, xv, yv = x[~val], y[~val], x[val], y[val]
    pool = dedup_pool(yv.numpy())
    weight = torch.zeros(x.shape[1], x.shape[1], requires_grad=True)
    opt = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    def val_mrr() -> float:
        with torch.no_grad():
            return retrieval_metrics(xv + xv @ weight, pool.index, pool.items)["mrr"]

    best = LinearAdapter(np.zeros((x.shape[1], x.shape[1])), 0, val_mrr())
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(xf), generator=gen).split(batch_size):
            q, a = xf[idx], yf[idx]
            logits = F.normalize(q + q @ weight, dim=-1) @ F.normalize(a, dim=-1).T / temperature
            loss = F.cross_entropy(logits, torch.arange(len(idx)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = val_mrr()
        if score > best.val_mrr:
            best = LinearAdapter(weight.detach().double().numpy().copy(), epoch, score)
        elif epoch - best.epochs >= patience:
            break
    return best


def baselines(train_q, train_a, eval_q, eval_a, seed: int = 0, groups=None) -> dict[str, dict[str, float]]:
    """The four baselines' metrics on the eval split (pool: its de-duplicated answers); `groups` are the train
    pairs' doc ids, for the validation slice that picks ridge's penalty and the adapter's epoch."""
    pool = dedup_pool(as_array(eval_a))
    mean_answer = np.broadcast_to(as_array(train_a).mean(0), as_array(eval_a).shape)
    ridge = fit_ridge(train_q, train_a, seed=seed, groups=groups)
    adapter = fit_linear_adapter(train_q, train_a, seed=seed, groups=groups)
    return {
        "identity": retrieval_metrics(eval_q, pool.index, pool.items),
        "mean_answer": retrieval_metrics(mean_answer, pool.index, pool.items),
        "ridge": {**retrieval_metrics(ridge.predict(eval_q), pool.index, pool.items), "alpha": ridge.alpha},
        "linear_adapter": {**retrieval_metrics(adapter.predict(eval_q), pool.index, pool.items),
                           "epochs": adapter.epochs},
    }
