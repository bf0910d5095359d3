"""One optimiser step: a worker's share of the global batch forward, the loss over the whole batch, backward.

What a step optimises does not depend on how it is computed:
- **Across workers**, the contrastive terms (InfoNCE, triplet) rank each prediction against every target of the
  global batch: the targets are teacher embeddings (constants), so each worker gathers the others' targets as extra
  negatives and no gradient has to cross workers (sentence-transformers' `gather_across_devices` does the same).
  Each worker's loss is the mean over its own samples and DDP averages the gradients, so with equal shares the
  step is the one-worker step over the global batch.
- **Across micro-batches**, when the batch sizer splits a share to fit in memory, the loss is still computed over
  the whole share with the gradient cache (Gao et al. 2021, "Scaling deep contrastive learning batch size under
  memory limited setup"): every micro-batch runs forward without a graph, the loss over all their predictions
  gives the gradient with respect to each prediction, then each micro-batch runs forward again, with the same
  random cell updates (its RNG state replayed), and backpropagates its slice of that gradient. It costs one extra
  forward pass, and only when the share is split.

The diversity term (predictions' mean pairwise cosine) is whole-share, not global: it needs the others'
predictions with their gradients. The curriculum weights each worker's share on its own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import torch
import torch.distributed as dist

from cube_ray.config import TrainConfig
from cube_ray.losses.combine import CombinedLoss
from cube_ray.model.student import FUSION
from cube_ray.train.batching import BatchSizer, is_oom
from cube_ray.train.data import Pairs
from cube_ray.train.device import autocast, rng_state, set_rng_state
from cube_ray.train.state import Run


@dataclasses.dataclass
class Task:
    """One prediction of a mode, for the loss weighted as teacher `teacher`: x (in `route[0]`'s space) -> y (in
    `route[1]`'s). A fused student's task has route (FUSION, teacher) and `inputs`, the same texts in every
    teacher's space (x is teacher's own); the tasks sharing one `inputs` share one run of the cube."""

    teacher: str
    x: torch.Tensor
    y: torch.Tensor
    route: tuple[str, str]
    inputs: dict[str, torch.Tensor] | None = None


@dataclasses.dataclass
class Predicted:
    output: torch.Tensor  # (N, width of route[1])
    steps: torch.Tensor  # (N,) the halting distribution's expected steps


def tasks(cfg: TrainConfig, batch: Pairs, mode: str | None = None) -> list[Task]:
    """The tasks of `mode` (default: the run's; a stage trains its own) for every teacher.

    dialogue: q_t -> a_t. autoencoder: x -> x over questions and answers. dual: both, each at half weight.
    distill: q_t -> a_u for every teacher u, so the shared cube must agree with every teacher's answer.
    With fusion, the input of each is the same texts in every teacher's space at once (q -> a_t, x -> x_t).
    """
    mode = mode or cfg.mode
    if cfg.fusion != "none":
        return fused_tasks(cfg, batch, mode)
    out = []
    for t in cfg.teachers:
        q, a = batch.q[t], batch.a[t]
        if mode == "distill":
            out += [Task(t, q, batch.a[u], (t, u)) for u in cfg.teachers]
            continue
        dialogue, auto = Task(t, q, a, (t, t)), Task(t, torch.cat([q, a]), torch.cat([q, a]), (t, t))
        out += {"dialogue": [dialogue], "autoencoder": [auto], "dual": [dialogue, auto]}[mode]
    return out


def fused_tasks(cfg: TrainConfig, batch: Pairs, mode: str) -> list[Task]:
    q = {t: batch.q[t] for t in cfg.teachers}
    texts = {t: torch.cat([batch.q[t], batch.a[t]]) for t in cfg.teachers}
    dialogue = [Task(t, q[t], batch.a[t], (FUSION, t), q) for t in cfg.teachers]
    auto = [Task(t, texts[t], texts[t], (FUSION, t), texts) for t in cfg.teachers]
    return {"dialogue": dialogue, "autoencoder": auto, "dual": dialogue + auto}[mode]


def predict(model, todo: list[Task]) -> list[Predicted]:
    fused: dict[int, dict] = {}  # id(task.inputs) -> {teacher: Pondered}: one run of the cube for all its spaces
    outs = []
    for task in todo:
        if task.inputs is None:
            outs.append(model(task.x, task.route[0], into=task.route[1]))
            continue
        if id(task.inputs) not in fused:
            fused[id(task.inputs)] = model(task.inputs, FUSION)
        outs.append(fused[id(task.inputs)][task.route[1]])
    # float32 whatever autocast ran the cube in: the loss is computed outside autocast, in full precision
    return [Predicted(o.output.float(), o.expected_steps.float()) for o in outs]


def gather_targets(y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every worker's targets in rank order (one worker: `y` itself), and where this worker's start among them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return y, 0
    # on y's device: NCCL (GPU workers) gathers only GPU tensors, gloo (CPU workers) CPU ones
    sizes = [torch.zeros(1, dtype=torch.long, device=y.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(y)], device=y.device))
    longest = int(max(sizes))  # shares may differ by one sample: pad to the longest, then cut
    padded = [torch.zeros(longest, *y.shape[1:], dtype=y.dtype, device=y.device) for _ in sizes]
    dist.all_gather(padded, torch.cat([y, y.new_zeros(longest - len(y), *y.shape[1:])]))
    rank = dist.get_rank()
    return torch.cat([p[:int(n)] for p, n in zip(padded, sizes)]), int(sum(sizes[:rank]))


def share_loss(run: Run, loss_fn: CombinedLoss, todo: list[Task], preds: list[Predicted]) -> tuple[torch.Tensor, dict]:
    """The weighted multi-teacher loss of this worker's share, its contrastive terms over the global batch."""
    total, parts = 0.0, {}
    teacher_w = run.student.weights()
    per_teacher = {t: sum(task.teacher == t for task in todo) for t in run.cfg.teachers}
    for task, pred in zip(todo, preds):
        candidates, offset = gather_targets(task.y)
        loss, p = loss_fn(pred.output, task.y, expected_steps=pred.steps, question=task.x, epoch=run.state.epoch,
                          candidates=candidates, offset=offset)
        n = per_teacher[task.teacher]
        total = total + teacher_w[task.teacher] * loss / n
        p["steps"] = pred.steps.mean().item()
        accumulate(parts, {f"{task.teacher}/{k}": v for k, v in p.items()}, 1 / n)
    return total, parts


def accumulate_gradients(run: Run, loss_fn: CombinedLoss, model, micro: int, batch: Pairs) -> tuple[float, dict]:
    """Backpropagate the share's loss into the parameters' .grad, in micro-batches of `micro` (gradient cache)."""
    amp, device = run.cfg.amp, run.device
    if micro >= len(batch):
        _maybe_inject_oom(run)
        todo = tasks(run.cfg, batch, run.task_mode)
        with autocast(amp, device):
            preds = predict(model, todo)
        total, parts = share_loss(run, loss_fn, todo, preds)
        total.backward()
        return total.item(), parts
    chunks = [take(batch, torch.arange(s, min(len(batch), s + micro))) for s in range(0, len(batch), micro)]
    replay, cached = [], []
    with torch.no_grad(), autocast(amp, device):
        for chunk in chunks:
            _maybe_inject_oom(run)
            replay.append(rng_state(device))
            cached.append(predict(model, tasks(run.cfg, chunk, run.task_mode)))
    after = rng_state(device)
    per_chunk = [tasks(run.cfg, chunk, run.task_mode) for chunk in chunks]
    whole = [dataclasses.replace(task, x=torch.cat([c[j].x for c in per_chunk]), y=torch.cat([c[j].y for c in per_chunk]),
                                 inputs=None) for j, task in enumerate(per_chunk[0])]  # for the loss alone
    leaves = [Predicted(torch.cat([c[j].output for c in cached]).requires_grad_(),
                        torch.cat([c[j].steps for c in cached]).requires_grad_()) for j in range(len(whole))]
    total, parts = share_loss(run, loss_fn, whole, leaves)
    total.backward()  # d loss / d prediction, for every prediction of the share
    starts = [0] * len(whole)
    for k, chunk in enumerate(chunks):
        set_rng_state(replay[k], device)  # the same random cell updates as the forward pass above
        sync = k == len(chunks) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            surrogate = 0.0
            with autocast(amp, device):
                preds = predict(model, per_chunk[k])
            for j, pred in enumerate(preds):
                rows = slice(starts[j], starts[j] + len(pred.output))
                starts[j] = rows.stop
                for value, leaf in ((pred.output, leaves[j].output), (pred.steps, leaves[j].steps)):
                    if leaf.grad is not None:
                        surrogate = surrogate + (value * leaf.grad[rows]).sum()
            surrogate.backward()
    set_rng_state(after, device)
    return total.item(), parts


def train_step(run: Run, loss_fn: CombinedLoss, model, optimizer, sizer: BatchSizer, batch: Pairs) -> tuple[float, dict]:
    """One optimiser step over this worker's share; an out-of-memory error halves the micro-batch and retries."""
    start = rng_state(run.device)
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total, parts = accumulate_gradients(run, loss_fn, model, sizer.micro, batch)
            break
        except (RuntimeError, MemoryError) as e:
            if not is_oom(e):
                raise
            sizer.on_oom(e)
            set_rng_state(start, run.device)  # the retry draws the same cell updates
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.student.parameters(), run.cfg.grad_clip)
    optimizer.step()
    sizer.after_step()
    return total, parts


def probe_step(cfg: TrainConfig, model, batch: Pairs, mode: str | None = None) -> None:
    """Forward and backward of every task of `mode` (default: the run's) on `batch`, as a step runs them (the batch
    sizer's probe); it leaves no gradients behind."""
    with autocast(cfg.amp, next(iter(batch.q.values())).device):
        preds = predict(model, tasks(cfg, batch, mode))
    sum(p.output.sum() + p.steps.sum() for p in preds).backward()
    for p in model.parameters():
        p.grad = None


def _maybe_inject_oom(run: Run) -> None:
    """TrainConfig.inject_oom_at_step: one simulated out-of-memory error, for the tests of the retry."""
    if run.cfg.inject_oom_at_step == run.state.global_step and not run.oom_injected:
        run.oom_injected = True
        raise torch.OutOfMemoryError(f"injected at step {run.state.global_step}")


def accumulate(into: dict[str, float], parts: dict[str, float], weight: float) -> None:
    """into[k] += weight * parts[k], for logging sums of loss parts over teachers and steps."""
    for k, v in parts.items():
        into[k] = into.get(k, 0.0) + weight * v


def take(pairs: Pairs, idx: torch.Tensor) -> Pairs:
    return Pairs([], [], [], {t: x[idx] for t, x in pairs.q.items()}, {t: x[idx] for t, x in pairs.a.items()})
