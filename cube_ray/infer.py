"""The phrase-bank decoder: map a question to the nearest answers of an answer bank.

    python -m cube_ray.infer CHECKPOINT "question" [--bank FILE] [--k 5] [--teacher NAME] [--timeout-s T]

The question is embedded by the checkpoint's teacher (a fused student's: by every teacher, answering in
`--teacher`'s space), centred like in training, pushed through the cube (which
halts by its gate, at the step cap, or at the timeout), and the bank's answers are ranked by cosine to the
prediction. The bank defaults to the answers of the checkpoint's training split (embeddings from the store);
`--bank` takes a .txt file (one answer per line) or a pairs file (its answers). Inference uses only an
InferConfig and the checkpoint: no optimiser, no training state; it runs seeded with deterministic algorithms.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from cube_ray.config import InferConfig
from cube_ray.data.readers import read_pairs
from cube_ray.metrics import Centering, dedup_pool
from cube_ray.model import FUSION, Student
from cube_ray.store import EmbeddingStore
from cube_ray.teachers.model import Teacher
from cube_ray.train.data import load_split
from cube_ray.train.snapshot import load_snapshot
from cube_ray.train.state import seed_everything


@dataclasses.dataclass
class Answer:
    text: str
    score: float


@dataclasses.dataclass
class Inference:
    answers: list[Answer]
    steps: int
    timed_out: bool


def answer(student: Student, teacher: str, questions: dict[str, torch.Tensor], bank_texts: list[str],
           bank_emb: torch.Tensor, centres: dict[str, Centering], cfg: InferConfig) -> Inference:
    """Rank `bank_texts` (embeddings `bank_emb`, raw space of `teacher`) for one question, given as raw embeddings
    {teacher: (width,)}: the answering teacher's alone, or every teacher's for a fused student."""
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(True)
    prep = lambda t, x: centres[t](x) if t in centres else x  # noqa: E731
    x = {t: prep(t, q.reshape(1, -1)) for t, q in questions.items()}
    student.eval()
    with torch.no_grad():
        run = dict(timeout=cfg.timeout_s, max_steps=cfg.max_steps)
        out = student(x, FUSION, **run)[teacher] if student.fused else student(x[teacher], teacher, **run)
    sims = torch.nn.functional.normalize(out.output, dim=-1) @ torch.nn.functional.normalize(
        prep(teacher, bank_emb), dim=-1).T
    top = sims[0].topk(min(cfg.k, len(bank_texts)))
    return Inference([Answer(bank_texts[i], s) for s, i in zip(top.values.tolist(), top.indices.tolist())],
                     int(out.steps_run[0]), out.timed_out)


def _bank(path: str | None, snap, teacher: str) -> tuple[list[str], torch.Tensor]:
    if path is None:
        store = EmbeddingStore(snap.checkpoint.data["store"])
        spec = snap.checkpoint.teachers[teacher]
        train = load_split(store, snap.checkpoint.data["dataset_id"], "train", {teacher: spec})
        pool = dedup_pool(train.answers)
        return pool.items, train.a[teacher][torch.as_tensor(pool.first)]
    p = Path(path)
    texts = [line.strip() for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".txt" \
        else list(dict.fromkeys(pair.answer for pair in read_pairs(p)))
    if not texts:
        raise ValueError(f"{path}: the answer bank is empty")
    return texts, torch.from_numpy(Teacher(snap.checkpoint.teachers[teacher]).embed(texts))


def main(argv: list[str] | None = None) -> int:
    from cube_ray.cli import float_at_least, positive_int, seed_int
    p = argparse.ArgumentParser(prog="python -m cube_ray.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("question")
    p.add_argument("--bank", help="answers: a .txt file (one per line) or a pairs file (default: the training answers)")
    p.add_argument("--k", type=positive_int, default=5, help="answers to show (default: %(default)s)")
    p.add_argument("--teacher", help="which of the checkpoint's teachers embeds the question (default: the first)")
    p.add_argument("--timeout-s", type=float_at_least(0.0), default=5.0,
                   help="stop the cube's steps after this many seconds; 0: after the first (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=0)
    args = p.parse_args(argv)
    if not args.question.strip():
        p.error("argument question: expected a question, got an empty text")
    cfg = InferConfig(k=args.k, timeout_s=args.timeout_s, seed=args.seed)
    cfg.validate()
    snap = load_snapshot(args.checkpoint)
    teacher = args.teacher or snap.cfg.teachers[0]
    if teacher not in snap.cfg.teachers:
        p.error(f"checkpoint has teachers {snap.cfg.teachers}, not {teacher!r}")
    texts, emb = _bank(args.bank, snap, teacher)
    embedders = snap.cfg.teachers if snap.student.fused else [teacher]
    questions = {t: torch.from_numpy(Teacher(snap.checkpoint.teachers[t]).embed([args.question])) for t in embedders}
    result = answer(snap.student, teacher, questions, texts, emb, snap.centres, cfg)
    print(f"Q: {args.question}   ({teacher}, {result.steps} step(s){', timed out' if result.timed_out else ''})")
    for rank, a in enumerate(result.answers, start=1):
        print(f"{rank:>2}. {a.score:.3f}  {a.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
