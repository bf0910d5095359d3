"""Held-out evaluation: the student against the identity, mean-answer, ridge and linear-adapter baselines
(cube_ray/baselines.py), in each teacher's space.

    python -m cube_ray.evaluate CHECKPOINT [--pairs FILE] [--json]

Every number ranks the split's de-duplicated answer pool by cosine (R@1, R@5, MRR) next to the mean cosine to
the gold answer. With centring on (the checkpoint says), model inputs, targets, the pool and the baselines are
all centred on the train mean of that teacher. With `--pairs`, those pairs are embedded with the checkpoint's
teachers (through the store, so a second run is a cache hit) and become the eval split; baselines are still
fitted on the checkpoint's training split. Below the table, the research plan's success criteria for this
checkpoint, each against its threshold (cube_ray/criteria.py; under "criteria" in `--json`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch

from cube_ray import criteria
from cube_ray.baselines import BASELINES, baselines
from cube_ray.metrics import agreement, dedup_pool, reconstruction_cosine, retrieval_entropy, retrieval_metrics, top1
from cube_ray.model import Student
from cube_ray.train.data import Pairs

ROWS = ("model", *BASELINES)


def student_metrics(student: Student, pairs: Pairs, mode: str = "dialogue", untrained: bool = False,
                    queries=None) -> dict[str, dict[str, float]]:
    """Per teacher: retrieval metrics of q -> a (or reconstruction cosine in autoencoder mode), steps, entropy. A fused
    student predicts from every teacher's embedding of the text at once. `untrained`: a residual student before its
    first step predicts its input exactly (its decoders' last layers start at zero), so the inputs stand in for its
    predictions and no forward pass runs (steps: nan). `queries`: score only these rows' questions, still against
    every answer of `pairs` (the same pool, so the figures estimate the whole split's without bias)."""
    predict = (lambda xs: (dict(xs), {t: math.nan for t in xs})) if untrained else student.predict_each
    rows = slice(None) if queries is None else np.asarray(queries, dtype=np.int64)
    if mode == "autoencoder":
        preds, steps = predict({t: x[rows] for t, x in pairs.a.items()})
        return {t: {"recon_cos": reconstruction_cosine(preds[t], pairs.a[t][rows]), "steps": steps[t]} for t in pairs.a}
    pool = dedup_pool(pairs.answers)
    preds, steps = predict({t: x[rows] for t, x in pairs.q.items()})
    out = {}
    for t in pairs.q:
        answers = pairs.a[t][torch.as_tensor(pool.first)]
        out[t] = {**retrieval_metrics(preds[t], pool.index[rows], answers), "steps": steps[t],
                  "entropy": retrieval_entropy(preds[t], answers)}
    return out


def retrieval_agreement(student: Student, pairs: Pairs) -> dict[str, float]:
    """Per teacher: how often the student's top-1 answer in its space is the top-1 in the other teachers' spaces."""
    pool = dedup_pool(pairs.answers)
    preds, _ = student.predict_each(pairs.q)
    return agreement({t: top1(preds[t], pairs.a[t][torch.as_tensor(pool.first)]) for t in pairs.q})


def baseline_table(train: Pairs, held_out: Pairs, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{teacher: {"identity": …, "mean_answer": …, "ridge": …, "linear_adapter": …}} on `held_out`; the fitted
    baselines validate on whole documents of `train`."""
    return {t: baselines(train.q[t], train.a[t], held_out.q[t], held_out.a[t], seed=seed, groups=train.doc_ids or None)
            for t in held_out.q}


def comparison(student: Student, train: Pairs, held_out: Pairs, seed: int = 0) -> dict[str, dict[str, dict]]:
    """{teacher: {"model": …, "identity": …, "mean_answer": …, "ridge": …, "linear_adapter": …}} on the same
    (centred) split."""
    model = student_metrics(student, held_out)
    return {t: {"model": model[t], **base} for t, base in baseline_table(train, held_out, seed).items()}


def with_criteria(table: dict[str, dict[str, dict]], loaded) -> dict[str, dict[str, dict]]:
    """The comparison table of `loaded` (load_for_eval) with the plan's criteria added under each teacher's
    "criteria" (cube_ray/criteria.py); the cross-teacher share is relative to the table's identity rows."""
    found = criteria.measure(loaded.student, loaded.held_out, {t: rows["identity"]["mrr"] for t, rows in table.items()},
                             cross_teacher=loaded.mode == "distill" or loaded.student.fused)
    return {t: {**rows, "criteria": found[t]} for t, rows in table.items()}


def format_rows(teacher: str, rows: dict[str, dict]) -> list[str]:
    """One teacher space's rows (name -> cos, R@1, R@5, MRR) as aligned text under a header."""
    return [f"\n{teacher}\n{'':<15} {'cos':>7} {'R@1':>7} {'R@5':>7} {'MRR':>7}"] + [
        f"{name:<15} {m['cos']:>7.3f} {m['r1']:>7.3f} {m['r5']:>7.3f} {m['mrr']:>7.3f}" for name, m in rows.items()]


def format_table(table: dict[str, dict[str, dict]]) -> str:
    lines = []
    for teacher, rows in table.items():
        lines += format_rows(teacher, {name: rows[name] for name in ROWS}) + [verdict(rows)]
    return "\n".join(lines)


def best_baseline(rows: dict[str, dict]) -> str:
    return max(BASELINES, key=lambda name: rows[name]["mrr"])


def verdict(rows: dict[str, dict]) -> str:
    """'model beats …' or 'model does NOT beat …', against the best of the baselines on MRR."""
    best = best_baseline(rows)
    word = "beats" if rows["model"]["mrr"] > rows[best]["mrr"] else "does NOT beat"
    return f"model {word} the best baseline, {best}, on MRR ({rows['model']['mrr']:.3f} vs {rows[best]['mrr']:.3f})"


def main(argv: list[str] | None = None) -> int:
    from cube_ray.cli import seed_int
    from cube_ray.train.snapshot import load_for_eval

    p = argparse.ArgumentParser(prog="python -m cube_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. OUT/best_eval)")
    p.add_argument("--pairs", help="evaluate on these pairs instead of the checkpoint's eval split")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--seed", type=seed_int, default=0)
    args = p.parse_args(argv)
    torch.use_deterministic_algorithms(True)
    loaded = load_for_eval(args.checkpoint, pairs=args.pairs)
    table = with_criteria(comparison(loaded.student, loaded.train, loaded.held_out, seed=args.seed), loaded)
    if args.json:
        print(json.dumps({t: {**{k: {m: round(v, 6) for m, v in rows[k].items()} for k in ROWS},
                              "criteria": rows["criteria"]} for t, rows in table.items()}))
    else:
        print(f"checkpoint {args.checkpoint}: {len(loaded.held_out)} held-out pairs, centring "
              f"{'on' if loaded.centres else 'off'}")
        print(format_table(table))
        print("\n" + "\n".join(criteria.format_criteria({t: rows["criteria"] for t, rows in table.items()})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
