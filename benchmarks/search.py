"""The search itself: TPE + ASHA in rounds against random search in the same rounds and against the old per-epoch search.

    python benchmarks/search.py [--budget-s 600] [--seeds 0,1,2] [--setups tpe,random,old] [--old-tree DIR]

Every run is `python -m cube_ray.tune` on the main job's data (the bundled sample's first 600 pairs per file, a
val split of one article that picks, both teachers, a warm store) with the same trial budget (`--time-budget-s`):

- tpe:    the main job as shipped (stage247; rounds of 512 samples, ASHA rungs at 512 and 1,536 samples, 4 epochs
          at most, TPE with 4 random starts, constant liar, stopped trials told to Optuna as pruned, 1-CPU trials);
- random: the same rounds and rungs, but the sampler never leaves its random start-up (n_startup_trials 10,000);
- old:    the code before rounds (git e2892fc, checked out with `git worktree add DIR e2892fc`; --old-tree): ASHA at
          epoch rungs (grace 1 epoch, factor 3), TPE with Optuna's 10 random starts, an ASHA stop told as complete,
          2-CPU trials, Ray Train's 2-s polling, and its stage247 (epochs, surface I/O, SGD and Adafactor sampled).

Per run: trials started, trials that trained their whole budget, the share stopped early, seconds from a trial's
start to its first result (Tune's `time_total_s` of the trial's first result), the best trial's picking-split MRR
and the same checkpoint's MRR on the held-out eval split (mean over teachers). Prints a table and writes
results/bench_search.json; each run's experiment stays under --out for a look.
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
OLD_COMMIT = "e2892fc"


def space_file(setup: str, folder: Path) -> str:
    """The space each setup searches: stage247, or stage247 with a sampler that stays random."""
    if setup != "random":
        return "stage247"
    space = yaml.safe_load((ROOT / "search_spaces" / "stage247.yaml").read_text())
    space["sampler"] = {**space.get("sampler", {}), "n_startup_trials": 10_000}
    path = folder / "stage247_random.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return str(path)


def run(setup: str, seed: int, args, folder: Path) -> dict:
    name = f"{setup}-seed{seed}-{args.budget_s:g}s"
    exp = Path(args.out) / name
    if not (exp / "report.json").exists():  # a run of the same setup, seed and budget is reused
        env = dict(os.environ)
        if setup == "old":  # the old package first on the path, for the driver and the Ray workers it starts
            env["PYTHONPATH"] = f"{args.old_tree}{os.pathsep}{env.get('PYTHONPATH', '')}"
        # tpe and random: the main job's embedded defaults; old: the same data by its flags (it had no val split)
        cmd = [sys.executable, "-m", "cube_ray.tune", "--space", space_file(setup, folder), "--name", name,
               "--out", str(args.out), "--time-budget-s", str(args.budget_s), "--seed", str(seed)]
        cmd += ["--val-fraction", "0.25", "--limit", "600"] if setup == "old" else []
        start = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=folder)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    return figures(setup, seed, exp)


def figures(setup: str, seed: int, exp: Path) -> dict:
    report = json.loads((exp / "report.json").read_text())
    cost = report["cost"]
    first = []
    for folder in exp.glob("trial_*"):
        lines = (folder / "result.json").read_text().splitlines() if (folder / "result.json").exists() else []
        if lines:
            first.append(json.loads(lines[0])["time_total_s"])
    held_out = report["held_out"]["table"]
    return {"setup": setup, "seed": seed, "trials": cost["trials"],
            "full_budget": cost["complete"] + cost["early_stop"],
            "stopped_early_share": cost["stopped_by_asha"] / max(1, cost["trials"]),
            "first_result_s": statistics.median(first) if first else None,
            "best_pick_mrr": report["best"]["eval"],
            "best_held_out_mrr": statistics.mean(rows["model"]["mrr"] for rows in held_out.values()),
            "identity_held_out_mrr": statistics.mean(rows["identity"]["mrr"] for rows in held_out.values()),
            "picked_on": report["held_out"].get("picked_on"), "experiment": str(exp)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=600, help="each search's trial budget (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--setups", default="tpe,random,old")
    p.add_argument("--old-tree", default=str(Path(tempfile.gettempdir()) / "cube_ray_old"),
                   help=f"a checkout of {OLD_COMMIT} (made with git worktree if missing)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench_search"))
    args = p.parse_args()
    args.out = str(Path(args.out).absolute())
    setups, seeds = args.setups.split(","), [int(s) for s in args.seeds.split(",")]
    if "old" in setups and not Path(args.old_tree).exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", args.old_tree, OLD_COMMIT], check=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for setup in setups:
                rows.append(run(setup, seed, args, Path(tmp)))
    print(f"\n{'setup':<8} {'seed':>4} {'trials':>6} {'full':>5} {'stopped':>8} {'1st result s':>12} "
          f"{'pick MRR':>9} {'held-out MRR':>12} {'identity':>9}")
    for r in rows:
        first = f"{r['first_result_s']:.1f}" if r["first_result_s"] is not None else "-"
        print(f"{r['setup']:<8} {r['seed']:>4} {r['trials']:>6} {r['full_budget']:>5} {r['stopped_early_share']:>8.0%} "
              f"{first:>12} {r['best_pick_mrr']:>9.4f} {r['best_held_out_mrr']:>12.4f} {r['identity_held_out_mrr']:>9.4f}")
    summary = {s: {k: statistics.mean(r[k] for r in rows if r["setup"] == s and r[k] is not None)
                   for k in ("trials", "full_budget", "stopped_early_share", "first_result_s", "best_pick_mrr",
                             "best_held_out_mrr")} for s in setups}
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "search", "budget_s": args.budget_s, "seeds": seeds, "data": "bundled sample, 600 pairs per "
           "file, val 0.25 (one article) picks, eval file held out; teachers minilm + smollm2", "rows": rows,
           "mean": summary}
    (RESULTS / "bench_search.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RESULTS / 'bench_search.json'}")


if __name__ == "__main__":
    main()
