"""The batch sizer measures a real training step and picks the micro-batch from what it measured."""
import pytest
import torch

from cube_ray.config import TrainConfig
from cube_ray.model import AdapterConfig, CubeConfig
from cube_ray.train.batching import BatchSizer, rss, saved_bytes
from cube_ray.train.data import Pairs
from cube_ray.train.snapshot import build_student
from cube_ray.train.step import probe_step, take

WIDTHS = {"a": 32, "b": 48}


def measured(mode: str, share: int = 64, budget: int | None = None) -> BatchSizer:
    cfg = TrainConfig(teachers=list(WIDTHS), mode=mode, cube=CubeConfig(dims=[4, 4, 4], channels=8, max_steps=4),
                      adapter=AdapterConfig(io="volume", out="volume"))
    torch.manual_seed(0)
    student = build_student(cfg, WIDTHS)
    g = torch.Generator().manual_seed(0)
    pairs = Pairs([], [], [], {t: torch.randn(share, w, generator=g) for t, w in WIDTHS.items()},
                  {t: torch.randn(share, w, generator=g) for t, w in WIDTHS.items()})
    sizer = BatchSizer(share, budget if budget is not None else rss() + 2**30)
    sizer.probe(lambda n: probe_step(cfg, student, take(pairs, torch.arange(n))), 16, list(student.parameters()))
    assert all(p.grad is None for p in student.parameters())  # the probe leaves no gradients
    return sizer


def test_the_probe_counts_every_task_of_the_mode():
    """dual runs q -> a and (q, a) -> (q, a): three rows of activations per sample; distill one task per teacher pair."""
    dialogue, dual, distill = (measured(mode).per_sample for mode in ("dialogue", "dual", "distill"))
    assert dual == pytest.approx(3 * dialogue, rel=0.15) and distill == pytest.approx(2 * dialogue, rel=0.15)


def test_a_budget_above_the_start_up_memory_picks_a_micro_batch_from_the_measurement():
    per_sample = measured("dialogue").per_sample
    budget = rss() + 40 * per_sample  # room for ~20 samples at the sizer's safety factor of 0.5
    sizer = measured("dialogue", budget=budget)
    assert 1 < sizer.micro < 64 and sizer.micro == pytest.approx(20, abs=4)
    assert f"{sizer.per_sample / 2**10:.0f} KiB/sample" in sizer.decisions[-1]


def test_saved_bytes_counts_what_autograd_keeps_for_the_backward():
    w = torch.randn(100, 100, requires_grad=True)
    x = torch.randn(10, 100)
    with saved_bytes(exclude=[w]) as saved:
        (x @ w).tanh().sum()  # keeps x (for d/dw) and tanh's output (for its own derivative)
    assert saved.bytes == 2 * 10 * 100 * 4
