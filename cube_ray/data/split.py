"""Split pairs by document, so that no document (article, conversation) straddles two splits."""
from __future__ import annotations

import random
from collections import defaultdict

from cube_ray.data.readers import DataError, Pair

VALIDATION = "val"
HELD_OUT = "eval"  # with a val split, read by the final report alone


def selection_split(split_names) -> str:
    """The split that picks models (per-epoch eval, early stopping, best checkpoint, ASHA, Optuna): "val" where the
    data has one, else "eval". With a val split the eval split is touched only by the final report, so its
    figures are not inflated by having been selected on."""
    return VALIDATION if VALIDATION in split_names else HELD_OUT


def split_by_document(pairs: list[Pair], ratios: dict[str, float], seed: int) -> dict[str, list[Pair]]:
    """Assign whole documents to splits so each split's row count is close to its ratio.

    Documents are shuffled with `seed`, then each goes to the split furthest below its target row count.
    Pairs keep their input order inside a split.
    """
    by_doc: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(pairs):
        by_doc[p.doc_id].append(i)
    docs = list(by_doc)
    live = {name: r for name, r in ratios.items() if r > 0}
    if len(docs) < len(live):
        raise DataError(f"{len(docs)} document(s) cannot fill {len(live)} splits {sorted(live)}; give more data or fewer splits")
    random.Random(seed).shuffle(docs)
    targets = {name: r * len(pairs) for name, r in live.items()}
    rows = {name: 0 for name in live}
    assigned: dict[str, list[int]] = {name: [] for name in ratios}
    for k, doc in enumerate(docs):
        # Splits still without any document claim the first documents, so a small ratio is never left empty.
        empty = [n for n in live if rows[n] == 0]
        if empty and len(docs) - k <= len(empty):
            name = empty[0]
        else:
            name = max(live, key=lambda n: (targets[n] - rows[n], -list(live).index(n)))
        assigned[name].extend(by_doc[doc])
        rows[name] += len(by_doc[doc])
    return {name: [pairs[i] for i in sorted(idx)] for name, idx in assigned.items()}
