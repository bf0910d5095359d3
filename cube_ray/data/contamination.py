"""Train/eval contamination: exact collisions refuse the run, near-duplicates are warnings.

Exact means equal after `normalise` (case, punctuation, whitespace folded). Near means token-set Jaccard >= a
threshold; candidates are found with prefix filtering (rarest tokens first), which is exact for Jaccard and
avoids comparing every eval text with every train text.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from cube_ray.data.readers import Pair
from cube_ray.data.text import normalise, tokens


class ContaminationError(ValueError):
    """An eval text also occurs in train."""


@dataclass(frozen=True)
class Collision:
    split: str
    pair_id: str
    field: str  # "question" or "answer"
    text: str
    train_id: str
    jaccard: float = 1.0


@dataclass
class ContaminationReport:
    exact: list[Collision] = field(default_factory=list)
    near: list[Collision] = field(default_factory=list)

    def raise_if_contaminated(self, hint: str = "") -> None:
        if not self.exact:
            return
        examples = "\n".join(f"  {c.split} {c.pair_id} {c.field}: {c.text[:90]!r} (train {c.train_id})" for c in self.exact[:5])
        raise ContaminationError(
            f"{len(self.exact)} eval text(s) also occur in train after normalisation, e.g.:\n{examples}\n{hint}".rstrip())


def _train_texts(train: list[Pair]) -> list[tuple[str, str]]:
    """(text, train pair id) for every question and answer of train."""
    return [(t, p.id) for p in train for t in (p.question, p.answer)]


def find_contamination(splits: dict[str, list[Pair]], threshold: float = 0.9) -> ContaminationReport:
    train = _train_texts(splits.get("train", []))
    exact_index = {}
    for text, pid in train:
        exact_index.setdefault(normalise(text), pid)
    train_sets = [tokens(t) for t, _ in train]
    df = Counter(tok for s in train_sets for tok in s)

    def prefix(s: frozenset[str]) -> list[str]:
        ordered = sorted(s, key=lambda t: (df.get(t, 0), t))
        return ordered[: len(s) - math.ceil(threshold * len(s)) + 1]

    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(train_sets):
        for tok in prefix(s):
            index[tok].append(i)

    report = ContaminationReport()
    for name, pairs in splits.items():
        if name == "train":
            continue
        for p in pairs:
            for fname in ("question", "answer"):
                text = getattr(p, fname)
                hit = exact_index.get(normalise(text))
                if hit is not None:
                    report.exact.append(Collision(name, p.id, fname, text, hit))
                    continue
                s = tokens(text)
                best, best_j = None, 0.0
                for i in {i for tok in prefix(s) for i in index.get(tok, ())}:
                    other = train_sets[i]
                    j = len(s & other) / len(s | other)
                    if j > best_j:
                        best, best_j = i, j
                if best is not None and best_j >= threshold:
                    report.near.append(Collision(name, p.id, fname, text, train[best][1], round(best_j, 3)))
    return report
