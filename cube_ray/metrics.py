"""Retrieval metrics and baselines, all in one teacher's embedding space.

A prediction is scored by ranking the de-duplicated answer pool by cosine similarity: cos (mean cosine to the
gold answer), R@1, R@5 and MRR. Ties rank against the gold answer, so a constant prediction cannot score well
by accident. Baselines on the same split: identity (the question as its own answer), mean answer (the train
answers' mean for every query: it scores a high cosine on anisotropic embeddings while retrieving almost
nothing, which is why it is always shown) and ridge regression. `Centering` subtracts a teacher's train mean;
fit it once on train and apply it to model inputs, targets and baselines alike.

Inputs may be numpy arrays or torch tensors; ranking runs in float32 torch, ridge in float64 numpy.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

RIDGE_ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
_CHUNK = 1024  # queries ranked at a time: bounds memory at chunk x pool


def _tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def retrieval_metrics(pred, gold_idx, pool) -> dict[str, float]:
    """Rank `pool` (P, d) by cosine to each prediction (N, d); gold_idx (N,) is each gold answer's pool row."""
    pred, pool = F.normalize(_tensor(pred), dim=-1), F.normalize(_tensor(pool), dim=-1)
    gold = torch.as_tensor(np.asarray(gold_idx), dtype=torch.long)
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions but {len(gold)} gold indices")
    cos, ranks = [], []
    for i in range(0, len(pred), _CHUNK):
        sims = pred[i:i + _CHUNK] @ pool.T
        gold_sim = sims.gather(1, gold[i:i + _CHUNK, None])
        cos.append(gold_sim.squeeze(1))
        ranks.append((sims >= gold_sim).sum(1))  # 1 = best; ties count against the gold answer
    cos, rank = torch.cat(cos).double(), torch.cat(ranks).double()
    return {"cos": cos.mean().item(), "r1": (rank <= 1).double().mean().item(),
            "r5": (rank <= 5).double().mean().item(), "mrr": (1 / rank).mean().item()}


class Pool(NamedTuple):
    items: np.ndarray | list[str]  # the distinct answers, in order of first occurrence
    index: np.ndarray  # (N,) each example's row in items
    first: np.ndarray  # (P,) the first example holding each item (embeddings of texts: emb[first])


def dedup_pool(answers) -> Pool:
    """De-duplicate answers given as an (N, d) embedding matrix or a list of N texts (exact duplicates only)."""
    if isinstance(answers, (list, tuple)):
        first_at: dict[str, int] = {}
        for i, a in enumerate(answers):
            first_at.setdefault(a, i)
        row = {a: r for r, a in enumerate(first_at)}
        return Pool(list(first_at), np.array([row[a] for a in answers], dtype=np.int64),
                    np.array(list(first_at.values()), dtype=np.int64))
    answers = answers.detach().cpu().numpy() if isinstance(answers, torch.Tensor) else np.asarray(answers)
    _, first, inverse = np.unique(answers, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # np.unique sorts its rows; keep the order of first occurrence instead
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return Pool(answers[first[order]], rank[inverse.reshape(-1)], first[order])


def reconstruction_cosine(pred, target) -> float:
    """Mean cosine between reconstructions and their inputs (autoencoder mode)."""
    return F.cosine_similarity(_tensor(pred), _tensor(target), dim=-1).double().mean().item()


def retrieval_entropy(pred, pool, temperature: float = 0.05) -> float:
    """Mean over queries of the entropy (nats) of softmax(cos(pred, pool) / temperature).

    log(P) is a uniform (undecided) distribution over P answers, 0 a certain one.
    """
    pred, pool = F.normalize(_tensor(pred), dim=-1), F.normalize(_tensor(pool), dim=-1)
    total = 0.0
    for i in range(0, len(pred), _CHUNK):
        logp = torch.log_softmax(pred[i:i + _CHUNK] @ pool.T / temperature, dim=-1)
        total += -(logp.exp() * logp).sum(-1).double().sum().item()
    return total / len(pred)


@dataclasses.dataclass
class Centering:
    """Subtract one teacher's train mean. Fit on train (questions and answers together, so both stay in one space)."""

    mean: np.ndarray

    @classmethod
    def fit(cls, *train) -> Centering:
        return cls(np.concatenate([_array(x) for x in train]).mean(axis=0))

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return x - torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        return np.asarray(x) - self.mean.astype(np.asarray(x).dtype)


@dataclasses.dataclass
class Ridge:
    """Linear regression Y ~ X W + b with an L2 penalty alpha on W (not on the bias), in closed form."""

    weight: np.ndarray  # (d_in, d_out)
    bias: np.ndarray  # (d_out,)
    alpha: float

    @classmethod
    def fit(cls, x, y, alpha: float) -> Ridge:
        """W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on centred X, Y (= an unpenalised bias), b = mean(Y) - mean(X) W."""
        x, y = _array(x), _array(y)
        mx, my = x.mean(0), y.mean(0)
        xc = x - mx
        weight = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - my))
        return cls(weight, my - mx @ weight, alpha)

    def predict(self, x) -> np.ndarray:
        return _array(x) @ self.weight + self.bias


def _validation_split(n: int, fraction: float, seed: int, groups=None) -> np.ndarray:
    """A boolean validation mask over n rows: whole groups (e.g. documents) when given, else single rows."""
    rng = np.random.default_rng(seed)
    keys = np.arange(n) if groups is None else np.asarray(groups)
    unique = rng.permutation(np.unique(keys))
    val_keys = unique[: max(1, round(fraction * len(unique)))]
    return np.isin(keys, val_keys)


def fit_ridge(x, y, alphas=RIDGE_ALPHAS, val_fraction: float = 0.2, seed: int = 0, groups=None) -> Ridge:
    """Ridge with alpha chosen on a validation slice of train by MRR (ties: cosine), then refit on all of train.

    MRR, not cosine, picks alpha: on anisotropic embeddings a heavily shrunk map toward the mean answer wins on
    cosine while retrieving nothing. `groups` (e.g. doc ids) keeps a document's pairs on one side of the slice.
    One eigendecomposition of the fit slice's Gram matrix serves every alpha.
    """
    x, y = _array(x), _array(y)
    val = _validation_split(len(x), val_fraction, seed, groups)
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


def baselines(train_q, train_a, eval_q, eval_a, **ridge_kwargs) -> dict[str, dict[str, float]]:
    """Identity, mean-answer and ridge metrics on the eval split (pool: its de-duplicated answers)."""
    pool = dedup_pool(_array(eval_a))
    mean_answer = np.broadcast_to(_array(train_a).mean(0), _array(eval_a).shape)
    ridge = fit_ridge(train_q, train_a, **ridge_kwargs)
    return {
        "identity": retrieval_metrics(eval_q, pool.index, pool.items),
        "mean_answer": retrieval_metrics(mean_answer, pool.index, pool.items),
        "ridge": {**retrieval_metrics(ridge.predict(eval_q), pool.index, pool.items), "alpha": ridge.alpha},
    }
