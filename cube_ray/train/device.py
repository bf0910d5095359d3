"""Where a worker trains (TrainConfig.use_gpu): its device, bf16 autocast, and the RNG states a step replays.

On CPU every function here is what the code did before GPUs: the CPU device, autocast off, the CPU generator.
"""
from __future__ import annotations

import contextlib
import os

import torch


def worker_device(use_gpu: bool) -> torch.device:
    """The GPU Ray Train gave this worker (use_gpu), made current; else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()  # cuda:<its GPU> from Ray's assignment, whether or not torch can use it
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"use_gpu: this Ray Train worker has no GPU that torch {torch.__version__} can use "
                           f"(torch.cuda.is_available() is {torch.cuda.is_available()}, CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch on the GPU "
                           f"nodes, or train without --use-gpu")
    torch.cuda.set_device(device)  # collectives (NCCL) and the allocator's statistics use the current device
    return device


def autocast(amp: str, device: torch.device):
    """bf16 autocast of a forward pass when `amp` is "bf16" (TrainConfig.amp); a no-op context otherwise."""
    if amp != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def rng_state(device: torch.device) -> tuple:
    """The generators a step draws its random cell updates from: the CPU's, and the GPU's when it trains there."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, gpu = state
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)
