"""Training throughput of the cube: the fast channels-last cube against the plain conv3d reference, same run.

For each shape it builds two identical one-teacher students (same seed), one running the fast `Cube` and one
`ReferenceCube`, and times full training steps (forward, cosine loss + thinking cost, backward, Adam step) of
the two in alternation, so that both see the same machine load: the speed-up is the median of the per-pair
ratios. The machine may be shared, so compare ratios within one run rather than absolute numbers across runs.
Peak RSS is measured per variant in a fresh process (a few steps each). The same run measures this machine's
fp32 matmul rate (1024 x 1024 @ 1024 x 1024, best of 20) as the ceiling to compare with.

    python benchmarks/cube.py                 # writes results/bench_cube.json
    python benchmarks/cube.py --iters 3       # quicker
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from cube_ray.model import AdapterConfig, CubeConfig, ReferenceCube, Student

CASES = {
    "default": dict(cube=dict(dims=[8, 8, 12], channels=8, max_steps=8), width=384, batch=128),
    "stage247-large": dict(cube=dict(dims=[10, 8, 10], channels=16, max_steps=16), width=384, batch=128),
}
THREADS = 2
VARIANTS = ("fast", "reference")


class Trainer:
    """One student and its optimiser; `step()` runs one timed training step."""

    def __init__(self, case: dict, reference: bool):
        torch.manual_seed(0)
        self.student = Student(CubeConfig(**case["cube"]), AdapterConfig(strategy="learned_linear"),
                               {"t": case["width"]})
        if reference:
            self.student.core.cube = ReferenceCube(self.student.core.cube)
        self.opt = torch.optim.Adam(self.student.parameters(), lr=1e-3)
        self.x, self.y = torch.randn(case["batch"], case["width"]), torch.randn(case["batch"], case["width"])

    def step(self) -> float:
        start = time.perf_counter()
        run = self.student(self.x, "t")
        loss = (1 - torch.cosine_similarity(run.output, self.y, dim=-1)).mean() + 0.01 * run.expected_steps.mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - start


def peak_rss_mb(case: dict, reference: bool, steps: int = 3) -> float:
    """Runs in a fresh process: the peak RSS of a few training steps of one variant."""
    torch.set_num_threads(THREADS)
    trainer = Trainer(case, reference)
    for _ in range(steps):
        trainer.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default="results/bench_cube.json")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    matmul = [matmul_gflops()]
    rows = []
    for name, case in CASES.items():
        with mp.get_context("spawn").Pool(1) as pool:
            rss = {v: pool.apply(peak_rss_mb, (case, v == "reference")) for v in VARIANTS}
        trainers = {v: Trainer(case, v == "reference") for v in VARIANTS}
        times = {v: [] for v in VARIANTS}
        for i in range(args.warmup + args.iters):
            for v in VARIANTS:
                t = trainers[v].step()
                if i >= args.warmup:
                    times[v].append(t)
            matmul.append(matmul_gflops(repeat=3))
        cost = trainers["fast"].student.cost("t")
        ratios = [r / f for f, r in zip(times["fast"], times["reference"])]
        for v in VARIANTS:
            rate = case["batch"] / statistics.median(times[v])
            rows.append({"case": name, "variant": v, **case["cube"], "width": case["width"], "batch": case["batch"],
                         "samples_per_s": rate, "peak_rss_mb": rss[v], "params": cost["params"],
                         "flops_per_sample": cost["flops_per_sample"],
                         "gflops_achieved": 3 * cost["flops_per_sample"] * rate / 1e9, "step_times_s": times[v]})
        rows[-2]["speedup_vs_reference"] = statistics.median(ratios)
        rows[-2]["speedup_range"] = [min(ratios), max(ratios)]

    ceiling = statistics.median(matmul)
    print(f"fp32 matmul 1024^3, {THREADS} threads: {ceiling:.1f} GFLOP/s (median of {len(matmul)}; "
          f"min {min(matmul):.1f}, max {max(matmul):.1f})")
    header = f"{'case':<16}{'variant':<11}{'samples/s':>10}{'speedup':>9}{'MFLOP/sample':>14}{'GFLOP/s':>9}" \
             f"{'% matmul':>9}{'peak RSS MB':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else ""
        print(f"{r['case']:<16}{r['variant']:<11}{r['samples_per_s']:>10.1f}{speedup:>9}"
              f"{r['flops_per_sample'] / 1e6:>14.1f}{r['gflops_achieved']:>9.2f}"
              f"{100 * r['gflops_achieved'] / ceiling:>8.1f}%{r['peak_rss_mb']:>12.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "note": "training steps (fwd + bwd + Adam) of a one-teacher student; samples/s from the median step; "
                "speedup = median of per-pair (fast, reference) step-time ratios; GFLOP/s counts 3x the forward "
                "matmul/conv FLOPs; the machine may be shared, so compare ratios within this run",
        "torch": torch.__version__, "threads": THREADS, "machine": platform.processor() or platform.machine(),
        "matmul_gflops": {"median": ceiling, "all": matmul}, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
