"""The cube's step as one fused CPU kernel (step_kernel.c), built with the system's C compiler.

Unfused, a step is a dozen passes over the batch's memory (convolution, concatenation, two tall-and-narrow
matrix products, masks, clamp), each with matrices too small to keep the cores busy, and backward twice that:
benchmarks/cube.py measured it at ~15 % of the matmul rate. The kernel does a cell's whole step in registers,
and in training skips the MLP of the cells that do not update (update_prob 0.5: half of them).

A shared library is compiled for each shape (channels, extra features, hidden width are compile-time
constants, so every loop is a fixed run of 8-float vectors) on its first use: gcc -O3 -march=native -fopenmp,
about a second, into <CUBE_RAY_CACHE>/kernels/, named by the shape and a hash of the source, the flags and the
CPU; every later process (every trial of a search) only loads it, and a cache shared between different machines
never hands one the other's code. It runs on torch's own OpenMP threads (the libgomp torch has loaded). Where no
compiler is found or the build fails, `kernel()` returns None, with one warning, and the cube runs its plain
PyTorch path; `CUBE_RAY_KERNEL=torch` chooses that path on purpose.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from cube_ray.fsutil import cache_dir

SOURCE = Path(__file__).with_name("step_kernel.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]

log = logging.getLogger(__name__)
_P = ctypes.c_void_p
_I = ctypes.c_int


def _cpu_signature() -> str:
    """The CPU model and its feature flags: -march=native code is only valid on a CPU that has them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    except OSError:
        wanted = []
    return "\n".join(wanted) or platform.processor() or platform.machine()


def _build(target: Path, compiler: str, defines: list[str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}.{os.getpid()}")
    try:
        subprocess.run([compiler, *FLAGS, *defines, str(SOURCE), "-o", str(tmp)], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)  # atomic: a concurrent process loads the old complete file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def _check_own(library: Path) -> None:
    """Loading a shared library runs its code: load only one this user owns, in a folder no one else can write."""
    for path in (library, library.parent):
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o002:
            raise PermissionError(f"{path} belongs to user id {info.st_uid} or is writable by everyone (mode "
                                  f"{info.st_mode & 0o777:o}): not loading code from it; remove it, or set "
                                  "CUBE_RAY_CACHE to a folder of your own")


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@functools.cache
def kernel(channels: int, extra: int, hidden: int) -> ctypes.CDLL | None:
    """The kernel for one shape (sizes are compile-time constants), built first if this machine has none;
    None: use the PyTorch path."""
    if os.environ.get("CUBE_RAY_KERNEL", "fused") == "torch":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    defines = [f"-DCUBE_C={channels}", f"-DCUBE_E={extra}", f"-DCUBE_HD={hidden}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS + defines).encode() + _cpu_signature().encode())
    target = cache_dir() / "kernels" / f"cube_step-c{channels}e{extra}h{hidden}-{key.hexdigest()[:16]}.so"
    start = time.perf_counter()
    try:
        if not target.exists():
            if compiler is None:
                raise RuntimeError("no C compiler (gcc or cc) on PATH")
            _build(target, compiler, defines)
            log.info("built the fused cube kernel %s in %.1f s", target.name, time.perf_counter() - start)
        _check_own(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:  # PermissionError is an OSError
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"the fused cube kernel is unavailable ({detail}); the cube runs its slower PyTorch path",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.cube_step_forward.argtypes = [_I] * 5 + [_P] * 8 + [ctypes.c_float] + [_P] * 3
    lib.cube_step_backward.argtypes = [_I] * 5 + [_P] * 6 + [ctypes.c_float] + [_P] * 7
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _padded_weights(neighbours, w1, b1, w2, b2, c: int, e: int) -> dict[str, torch.Tensor]:
    """The kernel's zero-padded layouts (see step_kernel.c): features [state | nb | extra] at 0, CP, 2 CP."""
    cp, hp = _pad8(c), _pad8(w1.shape[0])
    feature = _feature_index(c, e)
    w1p = w1.new_zeros(hp, 2 * cp + _pad8(e))
    w1p[:w1.shape[0], feature] = w1
    w2p = w2.new_zeros(cp, hp)
    w2p[:c, :w2.shape[1]] = w2
    dw = neighbours.new_zeros(27, cp)
    dw[:, :c] = neighbours.view(c, 27).t()
    return {"dw": dw, "w1": w1p, "w1t": w1p.t().contiguous(), "b1": F.pad(b1, (0, hp - b1.shape[0])),
            "w2": w2p, "w2t": w2p.t().contiguous(), "b2": F.pad(b2, (0, cp - c))}


def _feature_index(c: int, e: int) -> torch.Tensor:
    cp = _pad8(c)
    return torch.cat([torch.arange(c), cp + torch.arange(c), 2 * cp + torch.arange(e)])


class FusedStep(torch.autograd.Function):
    """out = clamp(state + mask * W2 relu(W1 [state, depthwise(state), extra] + b1) + b2): one step of a Rule.

    state (B, N, C), extra (B, N, E) or None (attention output, input field), mask (B, N) of 0 or 1/p or None,
    dims the lattice's (D, H, W); keep: keep what backward needs (the caller knows whether grad mode is on,
    forward does not: it always runs without). Backward gives every tensor input its gradient; the weight
    gradients are summed in double precision.
    """

    @staticmethod
    def forward(ctx, state, extra, neighbours, w1, b1, w2, b2, mask, dims, bound, keep):
        b, n, c = state.shape
        e, hidden = 0 if extra is None else extra.shape[-1], w1.shape[0]
        lib, weights = kernel(c, e, hidden), _padded_weights(neighbours, w1, b1, w2, b2, c, e)
        out = torch.empty_like(state)
        nb = torch.empty_like(state) if keep else None
        h = state.new_empty(b, n, hidden) if keep else None
        lib.cube_step_forward(b, *dims, torch.get_num_threads(), _ptr(state), _ptr(extra), _ptr(weights["dw"]),
                              _ptr(weights["w1t"]), _ptr(weights["b1"]), _ptr(weights["w2t"]), _ptr(weights["b2"]),
                              _ptr(mask), bound, _ptr(out), _ptr(nb), _ptr(h))
        ctx.save_for_backward(state, extra, weights["dw"], weights["w1"], weights["w2"], mask, nb, h, out)
        ctx.dims, ctx.bound, ctx.neighbours_shape = dims, bound, neighbours.shape
        return out

    @staticmethod
    def backward(ctx, g_out):
        state, extra, dw, w1p, w2p, mask, nb, h, out = ctx.saved_tensors
        (b, n, c), e, hidden = state.shape, 0 if extra is None else extra.shape[-1], h.shape[-1]
        lib, g_out = kernel(c, e, hidden), g_out.contiguous()  # held: the kernel reads its memory
        g_state = torch.empty_like(state)
        g_extra = state.new_empty(b, n, e) if e else None
        grads = state.new_empty(lib.cube_step_grads())
        lib.cube_step_backward(b, *ctx.dims, torch.get_num_threads(), _ptr(state), _ptr(extra), _ptr(dw),
                               _ptr(w1p), _ptr(w2p), _ptr(mask), ctx.bound, _ptr(nb), _ptr(h), _ptr(out),
                               _ptr(g_out), _ptr(g_state), _ptr(g_extra), _ptr(grads))
        cp, hp = dw.shape[1], w1p.shape[0]
        g_dw, g_w1, g_b1, g_w2, g_b2 = grads.split([27 * cp, hp * w1p.shape[1], hp, c * hp, cp])
        g_w1 = g_w1.view(hp, -1)[:hidden, _feature_index(c, e)]
        return (g_state, g_extra, g_dw.view(27, cp)[:, :c].t().reshape(ctx.neighbours_shape), g_w1,
                g_b1[:hidden], g_w2.view(c, hp)[:, :hidden], g_b2[:c], None, None, None, None)
