"""One training step computes the same loss and gradients however the batch is split: into micro-batches (the
gradient cache) or across workers (targets gathered as negatives). Real torch.distributed (gloo) for the workers."""
import dataclasses
from pathlib import Path

import pytest
import torch

from cube_ray.config import TrainConfig
from cube_ray.losses import CombinedLoss
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig
from cube_ray.train.data import Pairs
from cube_ray.train.snapshot import build_student
from cube_ray.train.state import Run, TrainState
from cube_ray.train.step import Predicted, accumulate_gradients, predict, share_loss, take, tasks

WIDTH = 24
LOSSES = {"infonce": LossConfig(cosine=0.0, infonce=1.0, think=0.01),
          "triplet": LossConfig(cosine=0.0, triplet=1.0, triplet_negatives="hard", think=0.01),
          "mix": LossConfig(cosine=1.0, infonce=0.5, triplet=0.2, triplet_negatives="random", think=0.01)}


def config(loss: LossConfig, **cube) -> TrainConfig:
    return TrainConfig(teachers=["t"], loss=loss, grad_clip=0.0,
                       cube=CubeConfig(dims=[3, 3, 3], channels=4, hidden=8, max_steps=3, **{"update_prob": 1.0, **cube}),
                       adapter=AdapterConfig(io="volume", out="volume"))


def batch(n: int = 16) -> Pairs:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, WIDTH, generator=g)
    return Pairs([], [], [], {"t": q}, {"t": q.roll(1, dims=1) + 0.3 * torch.randn(n, WIDTH, generator=g)})


def built(cfg: TrainConfig):
    torch.manual_seed(0)
    student = build_student(cfg, {"t": WIDTH})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the residual's zero start, so every parameter has a gradient
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def gradients(cfg: TrainConfig, micro: int, pairs: Pairs, model=None, student=None) -> tuple[float, dict]:
    student = student or built(cfg)
    torch.manual_seed(0)  # the cell updates' draws
    run = Run(cfg, student, TrainState(), Path("."), 0, pairs)
    loss, _ = accumulate_gradients(run, CombinedLoss(cfg.loss), model or student, micro, pairs)
    return loss, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_micro_batches_give_the_whole_batch_loss_and_gradients(loss):
    cfg = config(LOSSES[loss])
    whole_loss, whole = gradients(cfg, 64, batch())
    assert len(whole) == len(list(build_student(cfg, {"t": WIDTH}).parameters()))
    for micro in (8, 1):
        split_loss, split = gradients(cfg, micro, batch())
        assert split_loss == pytest.approx(whole_loss, abs=1e-5)
        for name, g in whole.items():
            torch.testing.assert_close(split[name], g, atol=1e-5, rtol=1e-4, msg=f"{loss}, micro {micro}: {name}")


@pytest.mark.parametrize("fusion, mode", [("sum", "dialogue"), ("concat", "dual")])
def test_a_fused_students_micro_batches_give_the_whole_batch_loss_and_gradients(fusion, mode):
    """Fused tasks share one run of the cube per input (q, or q and a together): still one step however it is split."""
    cfg = dataclasses.replace(config(LOSSES["mix"]), teachers=["t", "u"], fusion=fusion, mode=mode)
    widths = {"t": WIDTH, "u": WIDTH + 8}
    g = torch.Generator().manual_seed(2)
    pairs = batch()
    pairs.q["u"], pairs.a["u"] = torch.randn(16, WIDTH + 8, generator=g), torch.randn(16, WIDTH + 8, generator=g)

    def fused_gradients(micro):
        torch.manual_seed(0)
        student = build_student(cfg, widths)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g.manual_seed(1)))
        return gradients(cfg, micro, pairs, student=student)

    assert [task.route for task in tasks(cfg, pairs)][:2] == [("fusion", "t"), ("fusion", "u")]
    whole_loss, whole = fused_gradients(64)
    assert "concat_mix.weight" in whole if fusion == "concat" else "concat_mix.weight" not in whole
    split_loss, split = fused_gradients(4)
    assert split_loss == pytest.approx(whole_loss, abs=1e-5)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-5, rtol=1e-4, msg=f"{fusion}: {name}")


def test_the_gradient_cache_replays_the_random_cell_updates():
    """update_prob 0.5: each micro-batch's second forward must draw the cell updates of its first, or the gradient
    belongs to another network than the loss. Reference: the same micro-batches forward with their graphs kept
    (from the same RNG state), one loss over them all, one backward."""
    cfg = config(LOSSES["mix"], update_prob=0.5)
    cached_loss, cached = gradients(cfg, 4, batch())
    assert gradients(cfg, 4, batch())[0] == cached_loss  # deterministic
    student = built(cfg)
    torch.manual_seed(0)  # the RNG state the cached step started from (gradients() seeds it so)
    run = Run(cfg, student, TrainState(), Path("."), 0, batch())
    chunks = [take(batch(), torch.arange(s, s + 4)) for s in range(0, 16, 4)]
    preds = [predict(student, tasks(cfg, c))[0] for c in chunks]
    whole = [dataclasses.replace(tasks(cfg, batch())[0])]
    joined = [Predicted(torch.cat([p.output for p in preds]), torch.cat([p.steps for p in preds]))]
    loss, _ = share_loss(run, CombinedLoss(cfg.loss), whole, joined)
    loss.backward()
    assert loss.item() == pytest.approx(cached_loss, abs=1e-6)
    for name, p in student.named_parameters():
        torch.testing.assert_close(cached[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def _worker(rank: int, init: str, loss: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        cfg = dataclasses.replace(config(LOSSES[loss]), workers=2)
        student = built(cfg)
        model = DistributedDataParallel(student, find_unused_parameters=True)
        half = take(batch(), torch.arange(rank * 8, rank * 8 + 8))
        # rank 1 splits its share into micro-batches: the gradient cache and the gather together
        value, grads = gradients(cfg, 8 if rank == 0 else 3, half, model=model, student=student)
        losses = [torch.zeros(1) for _ in range(2)]
        dist.all_gather(losses, torch.tensor([value]))
        if rank == 0:
            torch.save({"loss": float(sum(losses)) / 2, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss", ["infonce", "triplet"])
def test_two_workers_give_the_one_worker_loss_and_gradients(loss, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'rendezvous'}", loss, str(out)), nprocs=2,
                       start_method="spawn")
    two = torch.load(out)
    one_loss, one = gradients(config(LOSSES[loss]), 16, batch())
    assert two["loss"] == pytest.approx(one_loss, abs=1e-5)
    for name, g in one.items():
        torch.testing.assert_close(two["grads"][name], g, atol=1e-5, rtol=1e-4, msg=f"{loss}: {name}")


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_the_loss_in_float32():
    """amp: bf16 (TrainConfig.amp; meant for GPUs, run here on CPU): the gradients are those of fp32 to bf16's
    precision, not equal to them, so autocast really ran; whole batch and micro-batches agree as in fp32."""
    cfg = config(LOSSES["mix"])
    fp32_loss, fp32 = gradients(cfg, 64, batch())
    amp = dataclasses.replace(cfg, amp="bf16")
    bf16_loss, bf16 = gradients(amp, 64, batch())
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05) and bf16_loss != fp32_loss
    assert all(g.dtype == torch.float32 for g in bf16.values())  # the parameters stay float32
    worst = max(((bf16[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in fp32.items())
    assert 0 < worst < 0.15
    split_loss, _ = gradients(amp, 8, batch())
    assert split_loss == pytest.approx(bf16_loss, rel=1e-2)  # the gradient cache replays under autocast too
