"""Retrieval metrics, all in one teacher's embedding space (the baselines scored with them: cube_ray/baselines.py).

A prediction is scored by ranking the de-duplicated answer pool by cosine similarity: cos (mean cosine to the
gold answer), R@1, R@5 and MRR. Ties rank against the gold answer, so a constant prediction cannot score well
by accident. `Centering` subtracts a teacher's train mean; fit it once on train and apply it to model inputs,
targets and baselines alike.

Inputs may be numpy arrays or torch tensors; ranking runs in float32 torch.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 1024  # queries ranked at a time: bounds memory at chunk x pool


def as_tensor(x) -> torch.Tensor:
    """An array or tensor as a float32 CPU tensor (ranking)."""
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def as_array(x) -> np.ndarray:
    """An array or tensor as float64 numpy (closed-form fits)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def retrieval_metrics(pred, gold_idx, pool) -> dict[str, float]:
    """Rank `pool` (P, d) by cosine to each prediction (N, d); gold_idx (N,) is each gold answer's pool row."""
    pred, pool = F.normalize(as_tensor(pred), dim=-1), F.normalize(as_tensor(pool), dim=-1)
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


def top1(pred, pool) -> np.ndarray:
    """(N,) each prediction's nearest pool row by cosine."""
    pred, pool = F.normalize(as_tensor(pred), dim=-1), F.normalize(as_tensor(pool), dim=-1)
    return torch.cat([(pred[i:i + _CHUNK] @ pool.T).argmax(1) for i in range(0, len(pred), _CHUNK)]).numpy()


def agreement(top1_by_teacher: dict[str, np.ndarray]) -> dict[str, float]:
    """Per teacher: the share of queries whose top-1 answer (a row of one shared pool) is also the top-1 in another
    teacher's space, averaged over the other teachers; 1.0 for a lone teacher.

    Example:
        >>> a, b, c = np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([4, 1, 3])  # a~b 2/3, a~c 1/3, b~c 2/3
        >>> {t: round(v, 3) for t, v in agreement({"a": a, "b": b, "c": c}).items()}
        {'a': 0.5, 'b': 0.667, 'c': 0.5}
    """
    out = {}
    for t, mine in top1_by_teacher.items():
        others = [np.mean(mine == theirs) for u, theirs in top1_by_teacher.items() if u != t]
        out[t] = float(np.mean(others)) if others else 1.0
    return out


def reconstruction_cosine(pred, target) -> float:
    """Mean cosine between reconstructions and their inputs (autoencoder mode)."""
    return F.cosine_similarity(as_tensor(pred), as_tensor(target), dim=-1).double().mean().item()


def retrieval_entropy(pred, pool, temperature: float = 0.05) -> float:
    """Mean over queries of the entropy (nats) of softmax(cos(pred, pool) / temperature).

    log(P) is a uniform (undecided) distribution over P answers, 0 a certain one.
    """
    pred, pool = F.normalize(as_tensor(pred), dim=-1), F.normalize(as_tensor(pool), dim=-1)
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
        return cls(np.concatenate([as_array(x) for x in train]).mean(axis=0))

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return x - torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        return np.asarray(x) - self.mean.astype(np.asarray(x).dtype)
