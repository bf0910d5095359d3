"""The multi-teacher student: one shared cube (with its halting head), one adapter pair per teacher.

`student(x, "minilm")` maps embeddings in that teacher's space to predictions in the same space: with
`cube.residual` (the default) x + (the cube's read-out), the decoders' last layers starting at zero, so an
untrained student predicts its input (the identity baseline) and training learns the change. At inference each
teacher's change is scaled by its `residual_mix` in [0, 1], which training picks on the picking split. The training
loop weights the per-teacher losses by `student.weights()`: fixed, uniform, adaptive or agreement, where
`update_weights(scores)` (called once per epoch) sets w_t = softmax(score_t / temperature): the teacher's MRR on
the picking split (adaptive) or how well its retrieval agrees with the other teachers' (agreement; see
WeightingConfig). The weights are a buffer, so they are saved in checkpoints.

A fused student (`fusion` "sum" or "concat", the research plan's teacher fusion) takes the same texts embedded by
every teacher at once: `student({"minilm": x1, "smollm2": x2}, FUSION)`. Each teacher's adapter writes its field
into the lattice, the fields are added (sum) or laid side by side in each cell's channels and mixed back to C
channels (concat), the cube runs once, and every teacher's adapter reads the result out into its own space. A
teacher left out of the inputs writes nothing (its field is zero), so a fused student also answers from a subset.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cube_ray.model.adapters import build_adapter
from cube_ray.model.config import AdapterConfig, CubeConfig, WeightingConfig
from cube_ray.model.cube import count_cost
from cube_ray.model.halting import PonderCube, Pondered

FUSION = "fusion"  # the input "teacher" of a fused student: every teacher's embedding of the same texts at once
FUSIONS = ("none", "sum", "concat")


class Student(nn.Module):
    def __init__(self, cube: CubeConfig, adapter: AdapterConfig, teachers: dict[str, int],
                 weighting: WeightingConfig | None = None, fusion: str = "none"):
        super().__init__()
        weighting = weighting or WeightingConfig()
        if not teachers:
            raise ValueError("a student needs at least one teacher")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion != "none" and len(teachers) < 2:
            raise ValueError(f"fusion {fusion!r} writes several teachers' embeddings into the lattice at once, so it "
                             f"needs at least two teachers, got {list(teachers)}")
        if bad := [name for name in teachers if "." in name or not name]:
            raise ValueError(f"teacher names must be non-empty and contain no '.', got {bad}")
        if weighting.mode == "fixed" and (missing := sorted(set(teachers) - set(weighting.weights))):
            raise ValueError(f"fixed teacher weighting has no weight for {missing}")
        self.cfg, self.weighting, self.teachers, self.fusion = cube, weighting, list(teachers), fusion
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
        # concat: per cell, the teachers' C channels side by side, mapped back to C by one linear layer shared by all
        # cells. It starts as their sum, so both fusions start alike and concat learns how to weigh the teachers.
        self.concat_mix = nn.Linear(len(teachers) * cube.channels, cube.channels, bias=False) \
            if fusion == "concat" else None
        if self.concat_mix is not None:
            with torch.no_grad():
                self.concat_mix.weight.copy_(torch.eye(cube.channels).repeat(1, len(teachers)))
        initial = [weighting.weights[t] if weighting.mode == "fixed" else 1.0 for t in self.teachers]
        self.register_buffer("teacher_weights", torch.tensor(initial) / sum(initial))
        # Each teacher's input scale (the RMS norm of its train embeddings, after centring; set by the training loop,
        # saved in checkpoints): the adapters see x / scale and write predictions back at that scale, so every teacher
        # enters the lattice at norm ~1. Teachers differ ~20x here (MiniLM's centred embeddings ~1, SmolLM2's ~22):
        # unscaled, SmolLM2's field drowned MiniLM's in a fused lattice (held-out MiniLM MRR 0.71 against 0.75).
        self.register_buffer("input_scale", torch.ones(len(self.teachers)))
        # The most steps the cube runs, in training and at inference alike: a curriculum lowers it while it warms
        # up, and a checkpoint keeps it, so a student is always evaluated with the steps it was trained with.
        self.register_buffer("step_cap", torch.tensor(cube.max_steps))
        # Each teacher's share of the residual at inference: x + mix * (the cube's change). Training adds all of the
        # change; the training loop picks mix in [0, 1] per teacher on the picking split at every epoch's end
        # (cube_ray/train/calibration.py), so a space the cube does not improve falls back towards its input.
        self.register_buffer("residual_mix", torch.ones(len(self.teachers)))

    @property
    def fused(self) -> bool:
        return self.fusion != "none"

    def set_input_scales(self, scales: dict[str, float]) -> None:
        """Each teacher's input scale (see `input_scale`): the RMS norm of its (centred) train embeddings."""
        if bad := {t: v for t, v in scales.items() if not v > 0}:
            raise ValueError(f"input scales must be positive, got {bad}")
        self.input_scale.copy_(torch.tensor([float(scales[t]) for t in self.teachers]))

    def _to_lattice(self, x: torch.Tensor, teacher: str) -> torch.Tensor:
        return self.adapters[teacher].to_lattice(x / self.input_scale[self.teachers.index(teacher)])

    def forward(self, x, teacher: str, *, timeout: float | None = None, keep_steps: bool = False,
                all_steps: bool | None = None, max_steps: int | None = None, into: str | None = None):
        """x (B, width of `teacher`) -> Pondered with output (B, width): the prediction in that teacher's space,
        or in teacher `into`'s space (read out by its adapter: the shared cube translates between teachers).
        A fused student with teacher FUSION: x is {teacher: (B, width)}, the same texts in several teachers' spaces,
        and the result is {teacher: Pondered}, one run of the cube read out into every teacher's space.

        Training (or all_steps=True): the halting-weighted expectation over all steps. Otherwise each sample
        halts by the gate, at max_steps, or when `timeout` seconds have passed (then timed_out is True).
        keep_steps: also return each step's prediction; max_steps: a lower step cap for this call (the buffer
        `step_cap`, set by a curriculum, caps it too).
        """
        cap = int(self.step_cap)
        max_steps = cap if max_steps is None else min(max_steps, cap)
        run = dict(timeout=timeout, keep_steps=keep_steps, all_steps=all_steps, max_steps=max_steps)
        if teacher == FUSION:
            return self._fused(x, into, run)
        into = into or teacher
        for name in (teacher, into):
            self._check(name)
        pondered = self.core(self._to_lattice(x, teacher), self.adapters[into].read, **run)
        return self._read_out(pondered, into, x if into == teacher else None)

    def _fused(self, xs: dict[str, torch.Tensor], into: str | None, run: dict) -> dict[str, Pondered]:
        if not self.fused:
            raise ValueError("this student is not fused (fusion 'none'): give one teacher's embeddings and its name")
        if into is not None:
            raise ValueError("a fused run reads out into every teacher's space: pick one from the result, not `into`")
        if not xs:
            raise ValueError("a fused run needs at least one teacher's embeddings")
        for name in xs:
            self._check(name)
        lattices = {t: self._to_lattice(x, t) for t, x in xs.items()}
        if self.fusion == "sum":
            lattice = sum(lattices.values())
        else:
            zero = torch.zeros_like(next(iter(lattices.values())))
            lattice = self.concat_mix(torch.cat([lattices.get(t, zero) for t in self.teachers], dim=-1))
        # Every adapter reads the same output cells (AdapterConfig.out is shared), so one run serves them all.
        pondered = self.core(lattice, self.adapters[self.teachers[0]].read, **run)
        return {u: self._read_out(pondered, u, xs.get(u)) for u in self.teachers}

    def _check(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"unknown teacher {name!r}; this student knows {self.teachers}")

    def _read_out(self, run: Pondered, into: str, own: torch.Tensor | None) -> Pondered:
        """The run's read-out (and every step's) decoded into teacher `into`'s space; `own` is the input in that
        space, if the run had one: the residual and the linear bypass map a teacher's space onto itself, so a
        prediction into a space whose input was not given is the cube's alone."""
        index = self.teachers.index(into)
        scale = self.input_scale[index]
        mix = 1.0 if self.training else self.residual_mix[index]

        def predict(field: torch.Tensor) -> torch.Tensor:
            pred = self.adapters[into].decode(field) * scale
            if own is None:
                return pred
            if self.bypass is not None:
                pred = pred + self.bypass[into](own)
            return own + mix * pred if self.cfg.residual else pred

        steps = None if run.step_outputs is None else [predict(f) for f in run.step_outputs]
        return dataclasses.replace(run, output=predict(run.output), step_outputs=steps)

    @torch.no_grad()
    def predict(self, x, teacher: str, *, into: str | None = None, chunk: int = 512):
        """Inference: predictions by the halting gate (in chunks of `chunk` samples, in teacher `into`'s space if
        given), and the mean number of steps the samples ran. Teacher FUSION (x: {teacher: (N, width)}): the
        predictions are {teacher: (N, width)}, in every teacher's space. Each chunk runs on the student's device
        (a GPU worker's) and its predictions come back to the CPU, where scoring and the callers' inputs are."""
        self.eval()
        device = self.input_scale.device
        fused = teacher == FUSION
        if fused and not x:
            raise ValueError("a fused run needs at least one teacher's embeddings")
        n = len(next(iter(x.values()))) if fused else len(x)
        preds, steps = [], []
        for i in range(0, n, chunk):
            if fused:
                outs = self({t: v[i:i + chunk].to(device) for t, v in x.items()}, FUSION)
                preds.append({t: o.output.cpu() for t, o in outs.items()})
                steps.append(outs[self.teachers[0]].steps_run.float())
            else:
                out = self(x[i:i + chunk].to(device), teacher, into=into)
                preds.append(out.output.cpu())
                steps.append(out.steps_run.float())
        mean_steps = torch.cat(steps).mean().item()
        if fused:
            return {t: torch.cat([p[t] for p in preds]) for t in self.teachers}, mean_steps
        return torch.cat(preds), mean_steps

    def predict_each(self, xs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The same texts as {teacher: embeddings} -> per teacher space, the predictions and their mean steps: each
        from that teacher's own embedding or, for a fused student, from all of them at once."""
        if self.fused:
            preds, steps = self.predict(xs, FUSION)
            return {t: preds[t] for t in xs}, {t: steps for t in xs}
        out = {t: self.predict(x, t) for t, x in xs.items()}
        return {t: p for t, (p, _) in out.items()}, {t: s for t, (_, s) in out.items()}

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
        """Parameters (whole student) and forward FLOPs per sample for `teacher` (FUSION: every teacher's input at
        once), running all max_steps."""
        zeros = lambda t: torch.zeros(1, self.adapters[t].width, device=self.teacher_weights.device)  # noqa: E731
        x = {t: zeros(t) for t in self.teachers} if teacher == FUSION else zeros(teacher)
        return count_cost(self, lambda: self(x, teacher, all_steps=True), 1)
