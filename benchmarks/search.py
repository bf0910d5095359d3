"""The search itself, at equal trial budget: today's trials and clock against the code before them, and samplers.

    python benchmarks/search.py [--budget-s 600] [--seeds 0,1,2] [--setups old,tpe,random,tpe1] [--old-tree DIR]

Every run is `python -m cube_ray.tune` on the main job's data (the bundled sample's first 600 pairs per file, a
val split of one article that picks, both teachers, a warm store) with the same trial budget (`--time-budget-s`):

- old:    the code before in-trial training and the cost clock (git 09fb3dd, checked out with `git worktree add DIR
          09fb3dd`; --old-tree): each trial a Ray Train run, ASHA on samples of the task (rungs at 512 and 1,536),
          TPE with 4 random starts;
- tpe:    the main job as shipped: 1-worker trials trained inside their Tune trials (processes reused), ASHA on
          training seconds (the cost clock), TPE with the space's settings (4 random starts, multivariate, constant
          liar);
- random: the same trials and clock, but the sampler never leaves its random start-up (n_startup_trials 10,000);
- tpe1:   the same, TPE modelling after a single random trial (the base preset): a sampler that models early.

Per run: trials started, the share stopped early by ASHA, the median fixed cost per trial (the trial's start stamp
to its worker's setup_done in timing.json), the best trial's picking-split MRR and the same checkpoint's MRR on the
held-out eval split (mean over teachers), and the disk the experiment keeps. Then per setup, over the seeds: the best
trial's held-out MRR (mean ± sd), the base preset's (the same config every run: its sd is the seed noise a sampler
works against) and the spread (sd) of the complete trials' picking-split MRR inside a run, which is what a sampler
can tell apart. Prints the tables and writes results/bench_search.json; each run's experiment stays under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
OLD_COMMIT = "09fb3dd"


SAMPLERS = {"random": {"n_startup_trials": 10_000}, "tpe1": {"n_startup_trials": 1}}  # changes to stage247's


def space_file(setup: str, folder: Path) -> str:
    """The space each setup searches: stage247, or stage247 with another sampler setting."""
    if setup not in SAMPLERS:
        return "stage247"
    space = yaml.safe_load((ROOT / "search_spaces" / "stage247.yaml").read_text())
    space["sampler"] = {**space.get("sampler", {}), **SAMPLERS[setup]}
    path = folder / f"stage247_{setup}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def run(setup: str, seed: int, args, folder: Path) -> dict:
    name = f"{setup}-seed{seed}-{args.budget_s:g}s"
    exp = Path(args.out) / name
    if not (exp / "report.json").exists():  # a run of the same setup, seed and budget is reused
        env = dict(os.environ)
        if setup == "old":  # the old package first on the path, for the driver and the Ray workers it starts
            env["PYTHONPATH"] = f"{args.old_tree}{os.pathsep}{env.get('PYTHONPATH', '')}"
        # every setup: the main job's embedded defaults (the old code's too), the trials' budget as given
        cmd = [sys.executable, "-m", "cube_ray.tune", "--space", space_file(setup, folder), "--name", name,
               "--out", str(args.out), "--time-budget-s", str(args.budget_s), "--seed", str(seed)]
        start = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    return figures(setup, seed, exp)


def figures(setup: str, seed: int, exp: Path) -> dict:
    report = json.loads((exp / "report.json").read_text())
    cost = report["cost"]
    fixed = []
    for folder in exp.glob("trial_*"):
        timing = json.loads((folder / "timing.json").read_text()) if (folder / "timing.json").exists() else {}
        if "setup_done" in timing.get("worker", {}):
            fixed.append(timing["worker"]["setup_done"] - timing["trial"]["start"])
    held_out = report["held_out"]["table"]
    complete = [t["eval"] for t in report["trials"] if t["status"] == "complete" and t.get("eval") is not None]
    base = report.get("base_preset") or {}
    base_held_out = [rows["model"]["mrr"] for rows in base.get("held_out", {}).get("table", {}).values()]
    disk = subprocess.run(["du", "-sb", str(exp)], capture_output=True, text=True, check=True).stdout.split()[0]
    return {"setup": setup, "seed": seed, "trials": cost["trials"],
            "full_budget": cost["complete"] + cost["early_stop"],
            "stopped_early_share": cost["stopped_by_asha"] / max(1, cost["trials"]),
            "fixed_cost_s": statistics.median(fixed) if fixed else None,
            "best_pick_mrr": report["best"]["eval"],
            "best_held_out_mrr": statistics.mean(rows["model"]["mrr"] for rows in held_out.values()),
            "identity_held_out_mrr": statistics.mean(rows["identity"]["mrr"] for rows in held_out.values()),
            # what a sampler has to work with: how far apart the configs that trained to the end score on the
            # picking split, against the seed noise (the base preset's held-out MRR across seeds, in the summary)
            "complete_trials": len(complete),
            "complete_spread": statistics.stdev(complete) if len(complete) > 1 else None,
            "base_held_out_mrr": statistics.mean(base_held_out) if base_held_out else None,
            "disk_mb": int(disk) / 2**20, "picked_on": report["held_out"].get("picked_on"), "experiment": str(exp)}


def mean_of(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def fmt(value: float | None, sd: float | None = None) -> str:
    """`mean ± sd` over seeds (4 decimals), or - where there is nothing to show."""
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")


def machine_gflops() -> float:
    """The machine's speed, as every timing here must state it: benchmarks/cube.py's fp32 matmul rate."""
    import torch

    from cube import THREADS, matmul_gflops

    torch.set_num_threads(THREADS)
    return matmul_gflops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=600, help="each search's trial budget (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--setups", default="old,tpe,random,tpe1")
    p.add_argument("--old-tree", default=str(Path(tempfile.gettempdir()) / "cube_ray_old"),
                   help=f"a checkout of {OLD_COMMIT} (made with git worktree if missing)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_search"))
    args = p.parse_args()
    args.out = str(Path(args.out).absolute())
    setups, seeds = args.setups.split(","), [int(s) for s in args.seeds.split(",")]
    if "old" in setups and not Path(args.old_tree).exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", args.old_tree, OLD_COMMIT], check=True)
    gflops = machine_gflops()
    print(f"this machine: fp32 matmul {gflops:.0f} GFLOP/s (benchmarks/cube.py's measure, 2 threads)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for setup in setups:
                rows.append(run(setup, seed, args, Path(tmp)))
    print(f"\n{'setup':<8} {'seed':>4} {'trials':>6} {'full':>5} {'stopped':>8} {'fixed s':>8} "
          f"{'pick MRR':>9} {'held-out MRR':>12} {'identity':>9} {'disk MB':>8}")
    for r in rows:
        fixed = f"{r['fixed_cost_s']:.1f}" if r["fixed_cost_s"] is not None else "-"
        print(f"{r['setup']:<8} {r['seed']:>4} {r['trials']:>6} {r['full_budget']:>5} {r['stopped_early_share']:>8.0%} "
              f"{fixed:>8} {r['best_pick_mrr']:>9.4f} {r['best_held_out_mrr']:>12.4f} {r['identity_held_out_mrr']:>9.4f} "
              f"{r['disk_mb']:>8.0f}")
    summary = {s: {k: mean_of([r[k] for r in rows if r["setup"] == s])
                   for k in ("trials", "full_budget", "stopped_early_share", "fixed_cost_s", "best_pick_mrr",
                             "best_held_out_mrr", "disk_mb", "complete_spread", "base_held_out_mrr")} for s in setups}
    for s in setups:
        for k in ("best_held_out_mrr", "base_held_out_mrr"):
            values = [r[k] for r in rows if r["setup"] == s and r[k] is not None]
            summary[s][f"{k}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    print(f"\n{'setup':<8} {'best held-out MRR':>20} {'base preset held-out':>22} {'complete trials spread (sd)':>28}")
    for s, m in summary.items():
        print(f"{s:<8} {fmt(m['best_held_out_mrr'], m['best_held_out_mrr_sd']):>20} "
              f"{fmt(m['base_held_out_mrr'], m['base_held_out_mrr_sd']):>22} {fmt(m['complete_spread']):>28}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "search", "budget_s": args.budget_s, "seeds": seeds, "matmul_gflops": gflops, "data": "bundled sample, 600 pairs per "
           "file, val 0.25 (one article) picks, eval file held out; teachers minilm + smollm2", "rows": rows,
           "mean": summary}
    (RESULTS / "bench_search.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'bench_search.json'}")


if __name__ == "__main__":
    main()
