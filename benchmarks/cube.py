"""The cube's speed: training steps of the fused kernel, the PyTorch fast path and the conv3d reference, against
this machine's limits; and inference with per-sample halting. One run, so every figure shares the machine's load.

Training. For each shape it builds identical one-teacher students (same seed): `fused` (the default: the C
kernel of cube_ray.model.fused), `fast` (the same cube on PyTorch ops, `torch_path()`, the fast path before the
kernel) and `reference` (`ReferenceCube`, plain conv3d), and times full training steps (forward, cosine loss +
thinking cost, backward, Adam step) in alternation; a speed-up is the median of the per-round ratios. Peak RSS
is measured per variant in a fresh process.

Limits. The same run measures the fp32 matmul rate (1024^3, best of 20) and the memory bandwidth (a 256 MB
copy, read + write, best of 5). A step's FLOPs are 3x the forward's matmul/convolution FLOPs; its bytes are
what each aten op reads and writes (a TorchDispatchMode over one step; view ops move nothing), plus for `fused`
the kernel's own reads and writes (`kernel_bytes`). The bound is the larger of FLOPs / matmul rate and bytes /
bandwidth, and "% bound" is that time over the measured step time.

Halting. An eval-mode student whose gate stops most samples at step 2-3 (mean ~3 of 8), against the same student
with a gate that never halts; both on the halting path, where halted samples leave the batch.

    python benchmarks/cube.py                 # writes results/bench_cube.json
    python benchmarks/cube.py --iters 3       # quicker
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cube_ray.model import AdapterConfig, CubeConfig, ReferenceCube, Student
from cube_ray.model.cube import torch_path

CASES = {
    "default": dict(cube=dict(dims=[8, 8, 12], channels=8, max_steps=8), width=384, batch=128),
    "stage247-large": dict(cube=dict(dims=[10, 8, 10], channels=16, max_steps=16), width=384, batch=128),
}
THREADS = 2
VARIANTS = ("fused", "fast", "reference")


class Trainer:
    """One student and its optimiser; `step()` runs one timed training step."""

    def __init__(self, case: dict, variant: str):
        torch.manual_seed(0)
        self.student = Student(CubeConfig(**case["cube"]), AdapterConfig(strategy="learned_linear"),
                               {"t": case["width"]})
        if variant == "reference":
            self.student.core.cube = ReferenceCube(self.student.core.cube)
        self.path = torch_path if variant != "fused" else contextlib.nullcontext
        self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        self.x, self.y = torch.randn(case["batch"], case["width"]), torch.randn(case["batch"], case["width"])

    def step(self) -> float:
        start = time.perf_counter()
        with self.path():
            run = self.student(self.x, "t")
            loss = (1 - torch.cosine_similarity(run.output, self.y, dim=-1)).mean() + 0.01 * run.expected_steps.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - start


class _Traffic(TorchDispatchMode):
    """Bytes read and written by every aten op run inside it (views excluded: they move nothing)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
            self.bytes += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor))
        return out


def kernel_bytes(case: dict) -> int:
    """What the fused kernel reads and writes in one training step (all steps, forward and backward), in bytes:
    forward reads state and mask, writes out, nb and h; backward reads state, mask, nb, h, out and the output's
    gradient, writes the state's gradient (float32; the padded per-sample lattices stay in cache)."""
    cube, batch = CubeConfig(**case["cube"]), case["batch"]
    c, hidden = cube.channels, cube.hidden
    per_cell = (c + 1) + (3 * c + hidden) + (c + 1 + c + hidden + c + c) + c
    return 4 * per_cell * cube.cells * batch * cube.max_steps


def step_bytes(trainer: Trainer, case: dict, variant: str) -> int:
    with _Traffic() as traffic:
        trainer.step()
    return traffic.bytes + (kernel_bytes(case) if variant == "fused" else 0)


def peak_rss_mb(case: dict, variant: str, steps: int = 3) -> float:
    """Runs in a fresh process: the peak RSS of a few training steps of one variant."""
    torch.set_num_threads(THREADS)
    trainer = Trainer(case, variant)
    for _ in range(steps):
        trainer.step()
    status = Path("/proc/self/status").read_text()  # VmHWM: this process's own peak (ru_maxrss can carry the
    return int(status.split("VmHWM:")[1].split()[0]) / 1024  # parent's over fork + exec)


def matmul_gflops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def copy_gb_per_s(megabytes: int = 256, repeat: int = 5) -> float:
    """Memory bandwidth: bytes read + written per second by a copy far larger than the caches."""
    src = torch.randn(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeat))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def train_rows(case_name: str, case: dict, iters: int, warmup: int, matmul: list[float]) -> list[dict]:
    rss = {}
    for v in VARIANTS:  # a fresh process each: the peak RSS of a process only grows
        with mp.get_context("spawn").Pool(1) as pool:
            rss[v] = pool.apply(peak_rss_mb, (case, v))
    trainers = {v: Trainer(case, v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for i in range(warmup + iters):
        for v in VARIANTS:
            t = trainers[v].step()
            if i >= warmup:
                times[v].append(t)
        matmul.append(matmul_gflops(repeat=3))
    cost = trainers["fast"].student.cost("t")
    rows = []
    for v in VARIANTS:
        rows.append({"case": case_name, "variant": v, **case["cube"], "width": case["width"], "batch": case["batch"],
                     "samples_per_s": case["batch"] / statistics.median(times[v]), "peak_rss_mb": rss[v],
                     "params": cost["params"], "flops_per_sample": cost["flops_per_sample"],
                     "bytes_per_step": step_bytes(trainers[v], case, v), "step_times_s": times[v],
                     "speedup_vs_reference": statistics.median(r / t for t, r in zip(times[v], times["reference"])),
                     "speedup_vs_fast": statistics.median(f / t for t, f in zip(times[v], times["fast"]))})
    return rows


def add_bounds(rows: list[dict], gflops: float, gb_per_s: float) -> None:
    for r in rows:
        flop_s = 3 * r["flops_per_sample"] * r["batch"] / (gflops * 1e9)
        byte_s = r["bytes_per_step"] / (gb_per_s * 1e9)
        r["bound"], r["bound_s"] = ("matmul", flop_s) if flop_s >= byte_s else ("memory", byte_s)
        r["share_of_bound"] = r["bound_s"] * r["samples_per_s"] / r["batch"]
        r["gflops_achieved"] = 3 * r["flops_per_sample"] * r["samples_per_s"] / 1e9


def print_tables(rows: list[dict], halting: dict, gflops: float, gb_per_s: float) -> None:
    print(f"fp32 matmul 1024^3, {THREADS} threads: {gflops:.1f} GFLOP/s; copy bandwidth {gb_per_s:.1f} GB/s")
    header = f"{'case':<16}{'variant':<11}{'samples/s':>10}{'vs fast':>8}{'vs ref':>7}{'MFLOP/smp':>10}" \
             f"{'MB/step':>8}{'bound':>7}{'% bound':>8}{'RSS MB':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['case']:<16}{r['variant']:<11}{r['samples_per_s']:>10.1f}{r['speedup_vs_fast']:>7.2f}x"
              f"{r['speedup_vs_reference']:>6.2f}x{r['flops_per_sample'] / 1e6:>10.1f}{r['bytes_per_step'] / 1e6:>8.0f}"
              f"{r['bound']:>7}{100 * r['share_of_bound']:>7.1f}%{r['peak_rss_mb']:>7.0f}")
    print(f"\ninference, batch {halting['batch']}: gate halting at mean {halting['mean_steps']:.2f} of 8 steps "
          f"{1e3 * halting['halting_s']:.0f} ms, never halting {1e3 * halting['all_steps_s']:.0f} ms: "
          f"{halting['speedup']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="results/bench_cube.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    matmul, bandwidth = [matmul_gflops()], [copy_gb_per_s()]
    rows = []
    for name, case in CASES.items():
        rows += train_rows(name, case, args.iters, args.warmup, matmul)
        bandwidth.append(copy_gb_per_s())
    halting = halting_speedup(args.iters)
    gflops, gb_per_s = statistics.median(matmul), statistics.median(bandwidth)
    add_bounds(rows, gflops, gb_per_s)
    print_tables(rows, halting, gflops, gb_per_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "note": "training steps (fwd + bwd + Adam) of a one-teacher student; samples/s from the median step; "
                "speedups = medians of per-round step-time ratios; FLOPs = 3x the forward's matmul/conv FLOPs; "
                "bytes = aten ops' reads + writes (+ the fused kernel's); bound = max(FLOPs / matmul rate, "
                "bytes / copy bandwidth); the machine may be shared, so compare ratios within this run",
        "torch": torch.__version__, "threads": THREADS, "machine": platform.processor() or platform.machine(),
        "matmul_gflops": {"median": gflops, "all": matmul}, "copy_gb_per_s": {"median": gb_per_s, "all": bandwidth},
        "rows": rows, "halting": halting}, indent=1))
    print(f"wrote {out}")


# --- inference with halting -------------------------------------------------------------------------------------

def _mean_steps(student: Student, x: torch.Tensor, bias: float) -> float:
    with torch.no_grad():
        student.core.halt.bias.fill_(bias)
        return student(x, "t").steps_run.float().mean().item()


def _set_gate(student: Student, x: torch.Tensor, target: float = 3.0) -> None:
    """A gate on the mean state whose logits vary by about +-1.5 across samples (so samples halt at different
    steps), its bias bisected until the measured mean of steps_run is about `target`."""
    halt = student.core.halt
    with torch.no_grad():
        mean_state = student.adapters["t"].to_lattice(x).mean(dim=1)  # what the gate reads at first
        direction = torch.randn(halt.weight.shape[1], generator=torch.Generator().manual_seed(1))
        halt.weight.copy_(1.5 * direction / (mean_state @ direction).std())
    low, high = -5.0, 10.0  # more bias, fewer steps
    for _ in range(12):
        mid = (low + high) / 2
        low, high = (low, mid) if _mean_steps(student, x, mid) < target else (mid, high)
    _mean_steps(student, x, (low + high) / 2)


def halting_speedup(iters: int, batch: int = 512) -> dict:
    """Median inference time of a batch with the staggered gate and with a gate that never halts."""
    torch.manual_seed(0)
    student = Student(CubeConfig(dims=[8, 8, 12], channels=8, max_steps=8, min_steps=1),
                      AdapterConfig(strategy="learned_linear"), {"t": 384}).eval()
    x = torch.randn(batch, 384)
    _set_gate(student, x)
    halt_bias = student.core.halt.bias.item()
    with torch.no_grad():
        steps_run = student(x, "t").steps_run
    times = {"halting": [], "all_steps": []}
    for i in range(iters + 1):  # alternate, so both see the same machine load; the first pair warms up
        for name, bias in (("halting", halt_bias), ("all_steps", -30.0)):  # sigmoid(-30): never halts
            with torch.no_grad():
                student.core.halt.bias.fill_(bias)
                seconds = _timed(lambda: student(x, "t"))
            if i:
                times[name].append(seconds)
    halting_s, all_steps_s = (statistics.median(times[k]) for k in ("halting", "all_steps"))
    return {"batch": batch, "mean_steps": steps_run.float().mean().item(),
            "steps_histogram": {int(s): int(c) for s, c in zip(*steps_run.unique(return_counts=True))},
            "halting_s": halting_s, "all_steps_s": all_steps_s, "speedup": all_steps_s / halting_s}


if __name__ == "__main__":
    main()
