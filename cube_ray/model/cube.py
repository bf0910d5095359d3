"""The 3D Cubic Core: a lattice of D x H x W cells, C channels each, updated by local rules step after step.

One step, per cell: perceive the 3x3x3 neighbourhood (a depthwise 3x3x3 convolution, next to the cell's own
state), run a small MLP over those features (1x1x1 convolutions), add the result to the state, clamp. This is a
neural cellular automaton; its known stabilisers are all here: the MLP's last layer starts at zero (the cube
starts as the identity), cells update at random during training, and states stay bounded.

Speed. On CPU in float32 a whole step (this rule's update, the mask, the clamp) runs as one fused C kernel,
forward and backward (cube_ray.model.fused, step_kernel.c, built once per machine and shape): 2-2.5x the
PyTorch path below in training (benchmarks/cube.py). Elsewhere, or where no C compiler is found, or inside
`torch_path()`, the step runs on PyTorch ops. Their layout: the state is kept channels-last, (B, cells, C), cells
in (d, h, w) row-major order: a face (a D-slice) is a contiguous slice, and the per-cell MLP is one product over
B * cells rows (`_CellMLP`: oneDNN's fused linear + ReLU, 2-3x faster than addmm on these tall, narrow
matrices). The depthwise convolution runs on a channels-last view of the same memory (`_Depthwise3d`, whose
hand-written backward avoids conv3d's slow weight gradient). `cube_ray.model.reference.ReferenceCube` computes
the same function the obvious way, channels-first with conv3d calls; tests hold all three equal.
"""
from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cube_ray.model.cell_attention import CellAttention
from cube_ray.model.config import CubeConfig
from cube_ray.model.fused import FusedStep, kernel

_TORCH_ONLY = False  # set by torch_path(): FLOP counting (and the tests' comparisons) need PyTorch's own ops


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Within: every cube runs its plain PyTorch path, not the fused kernel (whose work FlopCounterMode cannot see)."""
    global _TORCH_ONLY
    before, _TORCH_ONLY = _TORCH_ONLY, True
    try:
        yield
    finally:
        _TORCH_ONLY = before


def _fused_path(rule: "Rule", state: torch.Tensor) -> bool:
    """Whether this rule steps `state` in the fused kernel (building or loading it on first use)."""
    if _TORCH_ONLY or not state.is_cpu or state.dtype != torch.float32 or autocasting(state):
        return False
    c = rule.neighbours.shape[0]
    return kernel(c, c * (rule.attend is not None) + c * rule.skip_input, rule.w1.out_features) is not None


class _Depthwise3d(torch.autograd.Function):
    """Depthwise 3x3x3 convolution (zero padding, no bias) with a faster backward than autograd's.

    conv3d's own backward is slow here (its weight gradient, ~5-10x the forward on this shape). The input
    gradient is the same convolution with the kernel flipped; the weight gradient is a convolution of the
    input with the output gradient as the kernel, with the batch folded into groups, summed over the batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # x: (B, C, D, H, W)
        ctx.save_for_backward(x, weight)
        return F.conv3d(x, weight, padding=1, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, c = x.shape[:2]
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv3d(grad, weight.flip(2, 3, 4), padding=1, groups=c)
        if ctx.needs_input_grad[1]:
            per_sample = F.conv3d(x.reshape(1, b * c, *x.shape[2:]), grad.reshape(b * c, 1, *grad.shape[2:]),
                                  padding=1, groups=b * c)
            grad_w = per_sample.view(b, c, 1, 3, 3, 3).sum(0)
        return grad_x, grad_w


def autocasting(x: torch.Tensor) -> bool:
    """Whether autocast (TrainConfig.amp) is on for x's device: then the plain ops run, which autocast casts, and not
    the float32 Functions below, whose hand-written backward would meet bfloat16 gradients and float32 weights."""
    return torch.is_autocast_enabled(x.device.type)


def depthwise3d(state: torch.Tensor, dims: list[int], weight: torch.Tensor) -> torch.Tensor:
    """(B, cells, C) -> (B, cells, C): each channel convolved with its own 3x3x3 kernel, weight (C, 1, 3, 3, 3)."""
    b, n, c = state.shape
    volume = state.view(b, *dims, c).permute(0, 4, 1, 2, 3)  # a channels-last view, no copy
    out = F.conv3d(volume, weight, padding=1, groups=c) if autocasting(state) else _Depthwise3d.apply(volume, weight)
    return out.permute(0, 2, 3, 4, 1).reshape(b, n, c)


def update_mask(batch: int, cells: int, p: float, device: torch.device) -> torch.Tensor:
    """Which cells update this step: (B, cells, 1) of 0 or 1/p, so the expected update is the full one."""
    return torch.rand(batch, cells, 1, device=device).lt_(p).div_(p)  # 4x faster than bernoulli_ on CPU


# oneDNN's fused linear (+ ReLU) is 2-3x faster than addmm for these tall, narrow matrices (K, N <= 64).
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _cpu_attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


# Formulas FlopCounterMode lacks: oneDNN's linear, and the CPU kernel that scaled_dot_product_attention runs.
_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}
if _ONEDNN:
    _FLOP_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _linear_flops


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    if _ONEDNN and x.is_cpu and x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    y = F.linear(x, weight, bias)
    return y.relu_() if relu else y


class _CellMLP(torch.autograd.Function):
    """relu(x W1^T + b1) W2^T + b2 over rows x (cells). A Function because the oneDNN op has no autograd
    formula; the backward's two row-wise products go through `_linear` too, the weight gradients through mm."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        h = _linear(x, w1, b1, relu=True)
        ctx.save_for_backward(x, h, w1, w2)
        return _linear(h, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, h, w1, w2 = ctx.saved_tensors
        grad = grad.contiguous()
        grad_h = _linear(grad, w2.t().contiguous(), None)
        torch.ops.aten.threshold_backward.grad_input(grad_h, h, 0, grad_input=grad_h)  # in place: 2x faster
        grad_x = _linear(grad_h, w1.t().contiguous(), None)
        return grad_x, grad_h.t().mm(x), grad_h.sum(0), grad.t().mm(h), grad.sum(0)


def pool_matrix(dims: list[int], grid: int) -> torch.Tensor:
    """(grid^3, cells): row t averages the cells of block t of an adaptive grid x grid x grid split."""
    n = dims[0] * dims[1] * dims[2]
    eye = torch.eye(n).view(n, 1, *dims)
    return F.adaptive_avg_pool3d(eye, grid).view(n, -1).t().contiguous()


class GlobalAttention(nn.Module):
    """Every cell attends to grid^3 tokens, the mean states of the lattice's blocks (8 for grid 2).

    Full attention among cells would cost cells^2 per head (590k scores per sample for 8x8x12); pooled tokens
    cost cells * grid^3 and still let information cross the lattice in one step. There is no output projection:
    the update MLP that reads the result is already a linear map over it.
    """

    def __init__(self, cfg: CubeConfig):
        super().__init__()
        c = cfg.channels
        self.heads = cfg.attention_heads
        self.query = nn.Linear(c, c, bias=False)
        self.key_value = nn.Linear(c, 2 * c, bias=False)
        self.register_buffer("pool", pool_matrix(cfg.dims, cfg.attention_grid), persistent=False)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        b, n, c = state.shape
        h, t = self.heads, self.pool.shape[0]
        tokens = torch.matmul(self.pool, state)  # (B, T, C)
        q = self.query(state).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.key_value(tokens).view(b, t, 2, h, c // h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


class Rule(nn.Module):
    """One update rule: features [state, neighbourhood, (global context), (input)] -> MLP -> state change."""

    def __init__(self, cfg: CubeConfig):
        super().__init__()
        c = cfg.channels
        self.dims = cfg.dims
        self.neighbours = nn.Parameter(torch.empty(c, 1, 3, 3, 3).uniform_(-27**-0.5, 27**-0.5))
        self.attend = GlobalAttention(cfg) if cfg.attention else None
        self.skip_input = cfg.skip_input
        self.w1 = nn.Linear(c * (2 + cfg.attention + cfg.skip_input), cfg.hidden)
        self.w2 = nn.Linear(cfg.hidden, c)
        nn.init.zeros_(self.w2.weight)  # the cube starts as the identity map
        nn.init.zeros_(self.w2.bias)

    def forward(self, state: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, n, c = state.shape
        features = [state, depthwise3d(state, self.dims, self.neighbours)]
        if self.attend is not None:
            features.append(self.attend(state))
        if self.skip_input:
            features.append(u)
        x = torch.cat(features, dim=-1).view(b * n, -1)
        if autocasting(x):
            return self.w2(F.relu(self.w1(x))).view(b, n, c)
        return _CellMLP.apply(x, self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias).view(b, n, c)

    def fused_step(self, state: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None, bound: float) -> torch.Tensor:
        """The whole step (this rule's update, the mask, the clamp) in the fused kernel: cube_ray.model.fused."""
        b, n, _ = state.shape
        extra = ([self.attend(state)] if self.attend is not None else []) + ([u] if self.skip_input else [])
        extra = torch.cat(extra, dim=-1).contiguous() if extra else None
        mask = None if mask is None else mask.view(b, n).contiguous()
        return FusedStep.apply(state.contiguous(), extra, self.neighbours, self.w1.weight, self.w1.bias,
                               self.w2.weight, self.w2.bias, mask, tuple(self.dims), bound,
                               torch.is_grad_enabled())


class Cube(nn.Module):
    """The lattice core. `run(u, steps)` yields the (B, cells, C) state after each step.

    Its rules are used in turn, step i applying rule i % len(rules): `cfg.layers` local rules (mixer "local"),
    attention blocks (mixer "attention", cube_ray.model.cell_attention), or local and attention in turn ("alternate").
    """

    def __init__(self, cfg: CubeConfig):
        super().__init__()
        self.cfg = cfg
        kinds = {"local": [Rule], "attention": [CellAttention], "alternate": [Rule, CellAttention]}[cfg.mixer]
        self.rules = nn.ModuleList(kind(cfg) for _ in range(cfg.layers) for kind in kinds)

    def step(self, state: torch.Tensor, u: torch.Tensor, i: int) -> torch.Tensor:
        """Step i (0-based) from `state` (B, cells, C), u the input field of the same samples: the next state.

        Rows are independent samples, so a caller may step any subset of a batch (halting drops the rows that
        have stopped) and get those rows of the whole batch's step (in eval; training draws a random mask).
        """
        cfg = self.cfg
        rule = self.rules[i % len(self.rules)]
        mask = None
        if self.training and cfg.update_prob < 1:
            mask = update_mask(state.shape[0], state.shape[1], cfg.update_prob, state.device)
        if isinstance(rule, Rule) and _fused_path(rule, state):
            return rule.fused_step(state, u, mask, cfg.state_bound)
        delta = rule(state, u)
        state = state + delta if mask is None else torch.addcmul(state, delta, mask)
        # A hard box: exactly the identity inside, so the zero-initialised cube is the identity map.
        # Cells at the bound get no gradient through it; the bound is a guard rail, not a working range.
        return F.hardtanh(state, -cfg.state_bound, cfg.state_bound)  # = clamp, with a 3x cheaper backward

    def prepare(self) -> None:
        """Build (once per machine and shape) or load every rule's fused kernel now, not in the first step."""
        for rule in self.rules:  # the parameters' device and dtype are the states'
            if isinstance(rule, Rule):
                _fused_path(rule, rule.neighbours)

    def run(self, u: torch.Tensor, steps: int) -> Iterator[torch.Tensor]:
        """Start from the input field u (B, cells, C) and yield the state after each of `steps` steps."""
        state = u
        for i in range(steps):
            state = self.step(state, u, i)
            yield state


def count_cost(module: nn.Module, forward: Callable[[], object], batch: int) -> dict[str, int]:
    """Parameter count of `module`, and the FLOPs per sample of `forward()` run on `batch` samples.

    FLOPs are those of matrix multiplies, convolutions and attention (torch's FlopCounterMode); the
    elementwise work (activations, masks, clamps) is left out, as usual when comparing with a matmul ceiling.
    """
    was_training = module.training
    module.eval()
    with torch.no_grad(), torch_path(), FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS) as counter:
        forward()
    module.train(was_training)
    return {"params": sum(p.numel() for p in module.parameters()),
            "flops_per_sample": counter.get_total_flops() // batch}


def cost(cfg: CubeConfig) -> dict[str, int]:
    """Parameters and forward FLOPs per sample of the cube alone, run for max_steps."""
    cube = Cube(cfg)
    u = torch.zeros(1, cfg.cells, cfg.channels)
    return count_cost(cube, lambda: collections.deque(cube.run(u, cfg.max_steps), maxlen=0), 1)
