"""Each teacher's residual mix, picked on the picking split: how much of the cube's change to add to the input.

A residual student predicts x + Δ(x). Trained on in-batch negatives, Δ can fit the training pairs and still hurt
retrieval against a whole pool of answers where the identity is already strong: in MiniLM space (SQuAD dev MRR
0.708 for doing nothing) every cube trained before this scored below it, while in SmolLM2 space the same Δ lifts
MRR far above it. Scaling Δ by a factor in [0, 1] interpolates between the student's start (the identity) and the
trained student, as WiSE-FT does between a pretrained and a fine-tuned model (Wortsman et al., 2022), here in output
space. The factor is picked per teacher on the picking split, like ridge's penalty; at 0 a teacher's predictions
are its inputs, so on the picking split a student never scores below the identity.

Training always adds all of Δ (the mix applies in eval mode only): a mix of 0 must not stop a teacher's adapters
from learning, and the next epoch's end picks the mix again.

Example (a residual student whose change is random: retrieval prefers the input, so the mix goes to 0):
    >>> from cube_ray.model import AdapterConfig, CubeConfig, Student
    >>> from cube_ray.train.data import Pairs
    >>> _ = torch.manual_seed(0)
    >>> s = Student(CubeConfig(dims=(2, 2, 2), channels=2, max_steps=2), AdapterConfig(), {"t": 8})
    >>> _ = torch.nn.init.normal_(s.adapters["t"].last_layer().weight)
    >>> q = torch.randn(50, 8)
    >>> texts = [f"text {i}" for i in range(50)]
    >>> calibrate_residual_mix(s, Pairs(texts, texts, texts, {"t": q}, {"t": q}))
    {'t': 0.0}
    >>> bool(torch.equal(s.predict(q, "t")[0], q))
    True
"""
from __future__ import annotations

import numpy as np
import torch

from cube_ray.metrics import dedup_pool, retrieval_metrics
from cube_ray.model import Student
from cube_ray.train.data import Pairs

MIXES = tuple(i / 10 for i in range(11))


@torch.no_grad()
def calibrate_residual_mix(student: Student, pairs: Pairs, metric: str = "mrr") -> dict[str, float]:
    """Set `student.residual_mix` to the factor of MIXES with the best `metric` on `pairs`, per teacher (the smaller
    factor on a tie); returns {teacher: mix}. A student without a residual keeps its mix (it has no effect)."""
    if not student.cfg.residual:
        return dict(zip(student.teachers, student.residual_mix.tolist()))
    student.residual_mix.fill_(1.0)
    preds, _ = student.predict_each(pairs.q)
    pool = dedup_pool(pairs.answers)
    chosen = {}
    for teacher, pred in preds.items():
        x = pairs.q[teacher]
        change = pred - x
        answers = pairs.a[teacher][torch.as_tensor(pool.first)]
        scores = [retrieval_metrics(x + mix * change, pool.index, answers)[metric] for mix in MIXES]
        chosen[teacher] = MIXES[int(np.argmax(scores))]
    student.residual_mix.copy_(torch.tensor([chosen.get(t, 1.0) for t in student.teachers]))
    return chosen
