"""The research plan's Phase 3 success criteria, measured on a held-out split, each against the plan's threshold.

    reconstruction_cos      the autoencoder path (a text in, the same text out), per teacher       > 0.95
                            space: mean cosine of the student's output to its input, over the
                            split's questions and answers
    cross_teacher_share/t   a distilled or fused student in teacher u's space: teacher t's           > 70 %
                            questions (alone) answered in u's space (MRR), as a share of u's own
                            identity MRR
    scale                   > 100K training pairs within 8 GB: not a property of one checkpoint;
                            benchmarks/scale.py measures it (results/bench_scale.json)

The cross-teacher share is measured for students trained to map between teachers (mode `distill`) and for fused
students (fusion sum or concat: their input is then teacher t's embedding alone); a dialogue student's decoders
never learnt to write another teacher's space, so it is "n/a" for them. A fused student's autoencoder path reads
every teacher's embedding of the text at once. `evaluate` and the search report print the table; `evaluate --json`
carries each teacher's criteria under "criteria".

Example, the best trial of the README's first command (results/main_job: a sum-fused residual student, 600 held-out
pairs):

    | criterion (the plan's Phase 3) | threshold | minilm | smollm2 |
    |---|---|---|---|
    | reconstruction cosine (autoencoder path, held-out texts) | > 0.95 | 0.951 (met) | 0.916 (not met) |
    | distilled or fused student: MRR from smollm2's questions / identity MRR | > 0.7 | 0.032 (not met) | n/a |
    | distilled or fused student: MRR from minilm's questions / identity MRR | > 0.7 | n/a | 0.195 (not met) |
"""
from __future__ import annotations

import torch

from cube_ray.metrics import dedup_pool, reconstruction_cosine, retrieval_metrics
from cube_ray.model.student import FUSION
from cube_ray.train.data import Pairs

THRESHOLDS = {"reconstruction_cos": 0.95, "cross_teacher_share": 0.70}
LABELS = {"reconstruction_cos": "reconstruction cosine (autoencoder path, held-out texts)",
          "cross_teacher_share": "distilled or fused student: MRR from {t}'s questions / identity MRR"}
SCALE = ("> 100K training pairs within 8 GB: measured by `benchmarks/scale.py` (results/bench_scale.json), not per "
         "checkpoint")


def _criterion(name: str, value: float) -> dict:
    threshold = THRESHOLDS[name]
    return {"value": value, "threshold": threshold, "met": bool(value > threshold)}


@torch.no_grad()
def measure(student, held_out: Pairs, identity_mrr: dict[str, float], cross_teacher: bool) -> dict[str, dict]:
    """{teacher u: {"reconstruction_cos": {"value", "threshold", "met"}, "cross_teacher_share/<t>": …}}."""
    pool = dedup_pool(held_out.answers)
    texts = {u: torch.cat([held_out.q[u], held_out.a[u]]) for u in held_out.q}  # the split's questions and answers
    rebuilt, _ = student.predict_each(texts)
    out = {}
    for u in held_out.q:
        out[u] = {"reconstruction_cos": _criterion("reconstruction_cos", reconstruction_cosine(rebuilt[u], texts[u]))}
        if not cross_teacher:
            continue
        answers = held_out.a[u][torch.as_tensor(pool.first)]
        for t in (t for t in held_out.q if t != u):
            mrr = retrieval_metrics(_across(student, held_out.q[t], t, u), pool.index, answers)["mrr"]
            out[u][f"cross_teacher_share/{t}"] = _criterion("cross_teacher_share", mrr / identity_mrr[u])
    return out


def _across(student, x: torch.Tensor, t: str, u: str) -> torch.Tensor:
    """Predictions in teacher u's space from teacher t's embeddings alone."""
    if student.fused:
        return student.predict({t: x}, FUSION)[0][u]
    return student.predict(x, t, into=u)[0]


def format_criteria(criteria: dict[str, dict]) -> list[str]:
    """The criteria as a markdown table, one column per teacher space ("n/a" where a criterion does not apply)."""
    teachers = list(criteria)
    names = list(dict.fromkeys(name for rows in criteria.values() for name in rows))
    lines = ["| criterion (the plan's Phase 3) | threshold | " + " | ".join(teachers) + " |",
             "|---|---|" + "---|" * len(teachers)]
    for name in names:
        kind, _, source = name.partition("/")
        cells = []
        for t in teachers:
            c = criteria[t].get(name)
            cells.append("n/a" if c is None else f"{c['value']:.3f} ({'met' if c['met'] else 'not met'})")
        lines.append(f"| {LABELS[kind].format(t=source)} | > {THRESHOLDS[kind]:g} | " + " | ".join(cells) + " |")
    if not any(n.startswith("cross_teacher_share") for n in names):
        lines.append(f"| {LABELS['cross_teacher_share'].format(t='another teacher')} | "
                     f"> {THRESHOLDS['cross_teacher_share']:g} | " + " | ".join("n/a (neither distilled nor fused)"
                                                                              for _ in teachers) + " |")
    lines.append(f"| {SCALE} | | " + " | ".join("" for _ in teachers) + " |")
    return lines
