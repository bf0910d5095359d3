"""Ensembles of a search's best trials: their predictions averaged in each teacher's space, against the members
and the baselines.

    python -m cube_ray.ensemble EXP_DIR [--top K] [--pairs FILE] [--json] [--seed S]

The members are the best checkpoints (best_eval/) of the experiment's top K trials, ranked as the search report
ranks them (on the picking split), so the held-out split chooses nothing. In each teacher space every member
predicts each held-out question (its halting gate picks its steps); the predictions are L2-normalised and
averaged. Retrieval ranks by cosine, so each member's direction counts equally, whatever its scale. A search's
trials share the data, teachers and centring, so the predictions, the answer pool and the baselines lie in one
space; checkpoints that do not are refused, by name, before anything is scored.

Example: `python -m cube_ray.ensemble results/stage247-20261203-101500 --top 3` prints, per teacher, the
ensemble, each member and the baselines (cos, R@1, R@5, MRR), then whether the ensemble beats its best member
and the best baseline.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cube_ray.evaluate import baseline_table, best_baseline, format_rows
from cube_ray.metrics import dedup_pool, retrieval_metrics

TOP = 3  # members of the ensemble the search report shows


def top_checkpoints(exp: str | Path, top: int = TOP) -> list[Path]:
    """The best checkpoints of the experiment's `top` best trials, best first."""
    from cube_ray.trials import load_trials, ranked, with_checkpoint

    trials = with_checkpoint(ranked(load_trials(Path(exp).resolve())))
    if not trials:
        raise FileNotFoundError(f"{exp}: no trial finished an epoch (no best_eval/ checkpoint); nothing to ensemble")
    return [t.dir / "best_eval" for t in trials[:top]]


def load_members(checkpoints: list[Path], pairs: str | None = None) -> tuple:
    """The first checkpoint's splits (`load_for_eval`, read once: the members share them) and every member's
    student, each checked to lie in the first one's space."""
    from cube_ray.train.snapshot import load_for_eval, load_snapshot

    first = load_for_eval(checkpoints[0], pairs=pairs)
    students = [first.student]
    for path in checkpoints[1:]:
        snap = load_snapshot(path)
        problem = None
        if set(snap.cfg.teachers) != set(first.held_out.q):
            problem = f"teachers {sorted(snap.cfg.teachers)}, not {sorted(first.held_out.q)}"
        elif pairs is None and snap.checkpoint.data["dataset_id"] != first.dataset_id:
            problem = f"another data set ({snap.checkpoint.data['dataset_id']}, not {first.dataset_id})"
        elif set(snap.centres) != set(first.centres) or not all(
                np.allclose(snap.centres[t].mean, first.centres[t].mean, atol=1e-6) for t in snap.centres):
            problem = "other centring"
        if problem:
            raise ValueError(f"{path}: cannot join an ensemble with {checkpoints[0]}: it has {problem}, so their "
                             "predictions are not in one space")
        students.append(snap.student)
    return first, students


def ensemble_table(checkpoints: list[Path], pairs: str | None = None, seed: int = 0,
                   with_baselines: bool = True) -> dict:
    """{"pairs", "picked_on", "members", "table": {teacher: {"ensemble": …, "member_1": …, …, and the baselines}}}."""
    torch.use_deterministic_algorithms(True)
    first, students = load_members([Path(c) for c in checkpoints], pairs)
    held_out = first.held_out
    pool = dedup_pool(held_out.answers)
    predicted = [student.predict_each(held_out.q)[0] for student in students]
    table = {}
    for t in held_out.q:
        answers = held_out.a[t][torch.as_tensor(pool.first)]
        preds = [F.normalize(p[t], dim=-1) for p in predicted]
        table[t] = {"ensemble": retrieval_metrics(torch.stack(preds).mean(0), pool.index, answers)}
        table[t].update({f"member_{i}": retrieval_metrics(p, pool.index, answers) for i, p in enumerate(preds, 1)})
    if with_baselines:
        for t, rows in baseline_table(first.train, held_out, seed).items():
            table[t].update(rows)
    return {"pairs": len(held_out), "picked_on": first.picked_on, "members": [str(c) for c in checkpoints],
            "table": table}


def verdict(rows: dict[str, dict]) -> str:
    """Whether the ensemble beats its best member and the best baseline, on MRR."""
    mrr = rows["ensemble"]["mrr"]
    member = max((k for k in rows if k.startswith("member_")), key=lambda k: rows[k]["mrr"])
    words = [f"ensemble {'beats' if mrr > rows[member]['mrr'] else 'does NOT beat'} its best member, {member}, "
             f"on MRR ({mrr:.3f} vs {rows[member]['mrr']:.3f})"]
    if "identity" in rows:
        base = best_baseline(rows)
        words.append(f"{'beats' if mrr > rows[base]['mrr'] else 'does NOT beat'} the best baseline, {base} "
                     f"({rows[base]['mrr']:.3f})")
    return "; ".join(words)


def format_table(result: dict) -> str:
    lines = [f"{len(result['members'])} members, {result['pairs']} held-out pairs (models picked on the "
             f"{result['picked_on']} split):"] + [f"  member_{i}: {m}" for i, m in enumerate(result["members"], 1)]
    for teacher, rows in result["table"].items():
        lines += format_rows(teacher, rows) + [verdict(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from cube_ray.cli import positive_int, seed_int

    p = argparse.ArgumentParser(prog="python -m cube_ray.ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="a search's experiment folder (e.g. results/stage247-20261203-101500)")
    p.add_argument("--top", type=positive_int, default=TOP, help="members: the best K trials (default: %(default)s)")
    p.add_argument("--pairs", help="evaluate on these pairs instead of the experiment's eval split")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--seed", type=seed_int, default=0, help="the fitted baselines' seed")
    args = p.parse_args(argv)
    result = ensemble_table(top_checkpoints(args.experiment, args.top), pairs=args.pairs, seed=args.seed)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
