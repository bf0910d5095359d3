"""The multi-teacher student: one shared cube (with its halting head), one adapter pair per teacher.

`student(x, "minilm")` maps embeddings in that teacher's space to predictions in the same space: with
`cube.residual` (the default) x + (the cube's read-out), the decoders' last layers starting at zero, so an
untrained student predicts its input (the identity baseline) and training learns the change. The training
loop weights the per-teacher losses by `student.weights()`: fixed, uniform, adaptive or agreement, where
`update_weights(scores)` (called once per epoch) sets w_t = softmax(score_t / temperature): the teacher's MRR on
the picking split (adaptive) or how well its retrieval agrees with the other teachers' (agreement; see
WeightingConfig). The weights are a buffer, so they are saved in checkpoints.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cube_ray.model.adapters import Adapter, build_adapter
from cube_ray.model.config import AdapterConfig, CubeConfig, WeightingConfig
from cube_ray.model.cube import count_cost
from cube_ray.model.halting import PonderCube, Pondered


class Student(nn.Module):
    def __init__(self, cube: CubeConfig, adapter: AdapterConfig, teachers: dict[str, int],
                 weighting: WeightingConfig | None = None):
        super().__init__()
        weighting = weighting or WeightingConfig()
        if not teachers:
            raise ValueError("a student needs at least one teacher")
        if bad := [name for name in teachers if "." in name or not name]:
            raise ValueError(f"teacher names must be non-empty and contain no '.', got {bad}")
        if weighting.mode == "fixed" and (missing := sorted(set(teachers) - set(weighting.weights))):
            raise ValueError(f"fixed teacher weighting has no weight for {missing}")
        self.cfg, self.weighting, self.teachers = cube, weighting, list(teachers)
        self.core = PonderCube(cube)
        self.adapters = nn.ModuleDict({name: build_adapter(width, cube, adapter) for name, width in teachers.items()})
        # skip_linear: a direct linear path input -> prediction, zero at first, so the cube learns the residual.
        self.bypass = nn.ModuleDict({name: nn.Linear(width, width, bias=False) for name, width in teachers.items()}) \
            if cube.skip_linear else None
        if self.bypass is not None:
            for layer in self.bypass.values():
                nn.init.zeros_(layer.weight)
        if cube.residual:  # x + decode(field): the decoders' last layers start at zero, so the student starts at x
            for a in self.adapters.values():
                nn.init.zeros_(a.last_layer().weight)
                nn.init.zeros_(a.last_layer().bias)
        initial = [weighting.weights[t] if weighting.mode == "fixed" else 1.0 for t in self.teachers]
        self.register_buffer("teacher_weights", torch.tensor(initial) / sum(initial))
        # The most steps the cube runs, in training and at inference alike: a curriculum lowers it while it warms
        # up, and a checkpoint keeps it, so a student is always evaluated with the steps it was trained with.
        self.register_buffer("step_cap", torch.tensor(cube.max_steps))

    def forward(self, x: torch.Tensor, teacher: str, *, timeout: float | None = None, keep_steps: bool = False,
                all_steps: bool | None = None, max_steps: int | None = None, into: str | None = None) -> Pondered:
        """x (B, width of `teacher`) -> Pondered with output (B, width): the prediction in that teacher's space,
        or in teacher `into`'s space (read out by its adapter: the shared cube translates between teachers).

        Training (or all_steps=True): the halting-weighted expectation over all steps. Otherwise each sample
        halts by the gate, at max_steps, or when `timeout` seconds have passed (then timed_out is True).
        keep_steps: also return each step's prediction; max_steps: a lower step cap for this call (the buffer
        `step_cap`, set by a curriculum, caps it too).
        """
        into = into or teacher
        cap = int(self.step_cap)
        max_steps = cap if max_steps is None else min(max_steps, cap)
        for name in (teacher, into):
            if name not in self.adapters:
                raise KeyError(f"unknown teacher {name!r}; this student knows {self.teachers}")
        source, target = self.adapters[teacher], self.adapters[into]
        run = self.core(source.to_lattice(x), target.read, timeout=timeout, keep_steps=keep_steps,
                        all_steps=all_steps, max_steps=max_steps)
        predict = lambda field: self._predict(target, teacher, into, field, x)  # noqa: E731
        steps = None if run.step_outputs is None else [predict(f) for f in run.step_outputs]
        return dataclasses.replace(run, output=predict(run.output), step_outputs=steps)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, teacher: str, *, into: str | None = None,
                chunk: int = 512) -> tuple[torch.Tensor, float]:
        """Inference: predictions by the halting gate (in chunks of `chunk` samples, in teacher `into`'s space if
        given), and the mean number of steps the samples ran."""
        self.eval()
        preds, steps = [], []
        for i in range(0, len(x), chunk):
            out = self(x[i:i + chunk], teacher, into=into)
            preds.append(out.output)
            steps.append(out.steps_run.float())
        return torch.cat(preds), torch.cat(steps).mean().item()

    def _predict(self, adapter: Adapter, teacher: str, into: str, field: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        pred = adapter.decode(field)
        if into != teacher:  # the residual and the linear bypass map a teacher's space onto itself
            return pred
        if self.cfg.residual:
            pred = x + pred
        return pred if self.bypass is None else pred + self.bypass[teacher](x)

    def weights(self) -> dict[str, float]:
        return dict(zip(self.teachers, self.teacher_weights.tolist()))

    def update_weights(self, scores: dict[str, float]) -> dict[str, float]:
        """Adaptive and agreement weighting: w = softmax(score / temperature) over the teachers (higher score, more
        weight; see WeightingConfig). The other modes keep their weights. Returns the current weights."""
        if self.weighting.mode in ("adaptive", "agreement"):
            if missing := sorted(set(self.teachers) - set(scores)):
                raise ValueError(f"update_weights needs a score for every teacher, missing {missing}")
            values = torch.tensor([float(scores[t]) for t in self.teachers])
            self.teacher_weights.copy_(torch.softmax(values / self.weighting.temperature, dim=0))
        return self.weights()

    def cost(self, teacher: str) -> dict[str, int]:
        """Parameters (whole student) and forward FLOPs per sample for `teacher`, running all max_steps."""
        x = torch.zeros(1, self.adapters[teacher].width, device=self.teacher_weights.device)
        return count_cost(self, lambda: self(x, teacher, all_steps=True), 1)
