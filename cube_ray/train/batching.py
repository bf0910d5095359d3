"""Resource-aware batch sizing for one worker: choose the micro-batch from the memory this worker may use.

The global batch (TrainConfig.batch_size) is fixed: each worker takes its share of it every step and splits that
share into micro-batches, accumulating gradients, so the optimiser sees the same effective batch whatever the
micro-batch is. The sizer
  1. measures the memory a sample costs with a probe step (forward and backward of every task of the mode, e.g.
     dual's two and distill's one per teacher pair): the bytes autograd saves for the backward, doubled for the
     backward's own gradients (RSS growth would say little: the allocator reuses what it already holds),
  2. picks the largest micro-batch that fits the budget (with a safety factor),
  3. halves it after a step whose memory went over budget (memory pressure), and
  4. halves it and retries the same step when the step raises an out-of-memory error (CUDA's included).
On CPU the budget is host memory and a step's use its RSS; on a GPU (use_gpu) the budget is the GPU's free memory
(`torch.cuda.mem_get_info`, this worker's share of it) and a step's use the peak its allocator handed out.
Every decision is logged and kept, so it shows up in metrics and in the checkpoint's TrainState.
"""
from __future__ import annotations

import logging
from pathlib import Path

import psutil
import torch

log = logging.getLogger(__name__)
SAFETY = 0.5  # use at most half of the free budget for activations: RSS is a coarse measure


def memory_budget_bytes(configured_mb: int | None, workers_on_node: int) -> int:
    """This worker's memory budget: the configured one, else its share of min(cgroup limit, available memory)."""
    if configured_mb is not None:
        return configured_mb * 2**20
    limit = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup/memory.max")
    if cgroup.exists() and cgroup.read_text().strip().isdigit():
        limit = min(limit, int(cgroup.read_text()))
    return limit // max(1, workers_on_node)


def gpu_memory_budget_bytes(configured_mb: int | None, device: torch.device, gpu_share: float) -> int:
    """A GPU worker's budget: the configured one, else its share of the GPU (`gpus_per_worker`), at most what is free
    now plus what this process already holds (the sizer counts that as used)."""
    if configured_mb is not None:
        return configured_mb * 2**20
    free, total = torch.cuda.mem_get_info(device)
    return int(min(free + torch.cuda.memory_reserved(device), total * min(1.0, gpu_share)))


def rss() -> int:
    return psutil.Process().memory_info().rss


class HostMemory:
    """What a CPU worker uses: its RSS, now and after a step alike."""

    name = "RSS"

    def used(self) -> int:
        return rss()

    def peak(self) -> int:
        return rss()


class GpuMemory:
    """What a GPU worker uses: the bytes its CUDA allocator hands out, now or at the peak since the last step."""

    name = "GPU memory"

    def __init__(self, device: torch.device):
        self.device = device

    def used(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak


def is_oom(error: BaseException) -> bool:
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


class saved_bytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes of the tensors autograd saves for the backward while the block runs (each storage once):
    the activations a step holds at its peak, measured exactly, where RSS hardly moves once the allocator has
    memory to reuse."""

    def __init__(self, exclude=()):
        self.bytes, self._seen = 0, {p.untyped_storage().data_ptr() for p in exclude}  # e.g. the weights
        super().__init__(self._pack, lambda t: t)

    def __enter__(self) -> saved_bytes:
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t


class BatchSizer:
    def __init__(self, share: int, budget: int, cap: int | None = None, memory: HostMemory | GpuMemory | None = None):
        self.share = share  # this worker's samples per optimiser step
        self.budget = budget
        self.memory = memory or HostMemory()
        self.cap = min(share, cap or share)
        self.micro = self.cap
        self.decisions: list[str] = []
        self.per_sample = 0  # bytes a sample costs, as the probe measured it

    def _decide(self, micro: int, why: str) -> None:
        micro = max(1, min(self.cap, micro))
        message = f"micro-batch {self.micro} -> {micro}: {why}"
        self.micro = micro
        self.decisions.append(message)
        log.info("batch sizer: %s", message)

    def probe(self, step, probe_size: int, parameters=()) -> None:
        """`step(n)` runs a training step's forward and backward on n samples; `parameters` are not activations."""
        probe_size = max(1, min(probe_size, self.cap))
        with saved_bytes(exclude=parameters) as saved:
            step(probe_size)
        per_sample = max(1, 2 * saved.bytes // probe_size)
        free = max(0, self.budget - self.memory.used())
        fits = int(free * SAFETY // per_sample)
        self._decide(fits, f"probe: {per_sample / 2**10:.0f} KiB/sample, {free / 2**20:.0f} MiB free of a "
                           f"{self.budget / 2**20:.0f} MiB budget, share {self.share}")
        self.per_sample = per_sample

    def after_step(self) -> None:
        """Memory pressure: a step over budget halves the micro-batch for the next steps."""
        used = self.memory.peak()
        if used > self.budget and self.micro > 1:
            self._decide(self.micro // 2, f"{self.memory.name} {used / 2**20:.0f} MiB over the "
                                          f"{self.budget / 2**20:.0f} MiB budget")

    def on_oom(self, error: BaseException) -> None:
        if self.micro == 1:
            raise error
        if isinstance(self.memory, GpuMemory):
            torch.cuda.empty_cache()  # the failed step's blocks back to the GPU before the retry
        self._decide(self.micro // 2, f"out of memory ({error}); retrying the step")

    @property
    def accumulation(self) -> int:
        return -(-self.share // self.micro)
