"""Typed configs of the student: the cube, its adapters, the loss mix and the teacher weighting.

Load them with `cube_ray.config.from_dict(CubeConfig, d, where)` or `load_yaml`; both call `validate()`.
"""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass
class CubeConfig:
    """The 3D Cubic Core: a lattice of cells, each holding `channels` numbers, updated by local rules."""

    dims: list[int] = dataclasses.field(default_factory=lambda: [8, 8, 12])  # (D, H, W); faces are D-slices
    channels: int = 8
    min_steps: int = 2  # no halting before this step (information crosses one cell per step)
    max_steps: int = 8
    layers: int = 1  # distinct update rules, used in turn: step i applies rule i % layers
    hidden: int = 32  # width of the per-cell update MLP
    # How cells exchange information in a step: "local", the update rule over each cell's 3x3x3 neighbourhood (the
    # cellular automaton); "attention", a small transformer block in which every cell attends to every cell (the
    # plan's cube + attention hybrid); "alternate", local and attention steps in turn, starting local.
    mixer: Literal["local", "attention", "alternate"] = "local"
    attention: bool = False  # the local rule also reads a global context: attention over pooled tokens
    attention_heads: int = 2
    # The attention mixer's heads. Its cost is the softmax over cells^2 scores per head (memory-bound at a few
    # channels per head, not FLOP-bound), so one head is the cheapest and the default.
    mixer_heads: int = 1
    attention_grid: int = 2  # the tokens are the means of an attention_grid^3 split of the lattice
    skip_input: bool = False  # every step's update also sees the input field
    skip_linear: bool = False  # a zero-initialised linear map from the input embedding to the prediction
    # Predict x + cube(x) in the input teacher's own space, the decoders' last layers starting at zero: an untrained
    # student is the identity baseline, so training improves on doing nothing instead of first learning to copy its
    # input. false: the pure cube of the research plan. Outputs in another teacher's space (distill) are the cube's
    # alone (and so start at zero).
    residual: bool = True
    update_prob: float = 0.5  # training: each cell updates with this probability (scaled by 1/p)
    state_bound: float = 5.0  # states are clamped to [-state_bound, state_bound] after every step
    halt_bias_init: float = -3.0  # sigmoid(-3) = 0.05: halting starts unlikely, so training sees many steps
    halt_eps: float = 0.01  # inference stops once the halting probability mass reaches 1 - halt_eps

    @property
    def cells(self) -> int:
        d, h, w = self.dims
        return d * h * w

    @property
    def face(self) -> int:
        return self.dims[1] * self.dims[2]

    def validate(self) -> None:
        if len(self.dims) != 3 or any(d < 1 for d in self.dims):
            raise ValueError(f"dims must be three positive sizes (D, H, W), got {self.dims}")
        for name in ("channels", "hidden", "layers", "attention_heads", "attention_grid", "mixer_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.attention and self.mixer == "attention":
            raise ValueError("attention (the local rule's pooled context) needs a local rule: mixer 'local' or "
                             "'alternate', got mixer 'attention' (whose every step already attends over all cells)")
        if self.mixer != "local" and self.channels % self.mixer_heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by mixer_heads ({self.mixer_heads})")
        if self.attention and self.channels % self.attention_heads:
            raise ValueError(f"channels ({self.channels}) must be divisible by attention_heads "
                             f"({self.attention_heads})")
        if self.attention and self.attention_grid > min(self.dims):
            raise ValueError(f"attention_grid ({self.attention_grid}) cannot exceed the smallest dim of {self.dims}")
        if not 0 < self.update_prob <= 1:
            raise ValueError(f"update_prob must be in (0, 1], got {self.update_prob}")
        if self.state_bound <= 0:
            raise ValueError(f"state_bound must be positive, got {self.state_bound}")
        if not 0 < self.halt_eps < 1:
            raise ValueError(f"halt_eps must be in (0, 1), got {self.halt_eps}")


@dataclasses.dataclass
class AdapterConfig:
    """How a teacher embedding enters the lattice and how the prediction is read back out."""

    strategy: Literal["learned_linear", "hierarchical", "attention_based", "autoencoder"] = "learned_linear"
    io: Literal["surface", "volume"] = "surface"  # input into the first D-slice, or into every cell
    out: Literal["surface", "volume"] = "surface"  # output read from the last D-slice, or from every cell
    hidden: int = 256  # hierarchical: the middle width; autoencoder: the bottleneck (code) width
    chunk: int = 32  # attention_based: the embedding is cut into chunks of this many numbers
    attention_dim: int = 32  # attention_based: query/key width

    def validate(self) -> None:
        for name in ("hidden", "chunk", "attention_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass
class LossConfig:
    """Weights of the loss terms (0 = the term is not computed) and their settings."""

    cosine: float = 1.0
    mse: float = 0.0
    infonce: float = 0.0
    triplet: float = 0.0
    diversity: float = 0.0
    think: float = 0.01  # lambda of the thinking cost lambda * E[steps]
    infonce_temperature: float = 0.05
    triplet_margin: float = 0.2
    triplet_negatives: Literal["hard", "random"] = "hard"
    curriculum: bool = False  # weight samples easy -> hard by the question-answer distance
    curriculum_warmup: int = 5  # epochs until every sample has full weight
    curriculum_start: float = 0.3  # fraction of the (easiest) samples with full weight at epoch 0
    seed: int = 0  # random negatives

    TERMS = ("cosine", "mse", "infonce", "triplet", "diversity", "think")

    def validate(self) -> None:
        for name in self.TERMS:
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if not any(getattr(self, name) > 0 for name in self.TERMS if name != "think"):
            raise ValueError(f"at least one task loss weight must be positive, got {self.weights()}")
        if self.infonce_temperature <= 0:
            raise ValueError(f"infonce_temperature must be positive, got {self.infonce_temperature}")
        if self.triplet_margin < 0:
            raise ValueError(f"triplet_margin must be >= 0, got {self.triplet_margin}")
        if self.curriculum_warmup < 0:
            raise ValueError(f"curriculum_warmup must be >= 0, got {self.curriculum_warmup}")
        if not 0 < self.curriculum_start <= 1:
            raise ValueError(f"curriculum_start must be in (0, 1], got {self.curriculum_start}")

    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.TERMS}


@dataclasses.dataclass
class WeightingConfig:
    """How the per-teacher losses are weighted, w = softmax(score / temperature) over the teachers, updated at every
    epoch's end from the picking split:

    - fixed: `weights`, never updated; uniform: all equal;
    - adaptive: score = the teacher's selection metric (MRR by default): more weight where the student retrieves
      best. E.g. MRR 0.70 (minilm) and 0.30 (smollm2) at temperature 0.1: softmax([7, 3]) = 0.98 / 0.02;
    - agreement: score = how often the student's top-1 answer in this teacher's space is the one it retrieves in
      the others' (the share of questions, averaged over the other teachers): a teacher whose space disagrees with
      the rest weighs less. E.g. three teachers whose top-1 answers agree pairwise on 60 % (a, b), 20 % (a, c) and
      20 % (b, c) of the questions score a 0.40, b 0.40, c 0.20: at temperature 0.1, 0.47 / 0.47 / 0.06. With two
      teachers the agreement is the same for both, so their weights stay equal.
    """

    mode: Literal["fixed", "uniform", "adaptive", "agreement"] = "uniform"
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # mode 'fixed'; normalised to sum 1
    temperature: float = 0.1  # adaptive, agreement: lower = more weight on the best-scoring teacher

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError(f"teacher weights must be >= 0, got {self.weights}")
        if self.mode == "fixed" and not sum(self.weights.values()) > 0:
            raise ValueError("mode 'fixed' needs weights with a positive sum")
