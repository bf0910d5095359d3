"""The SQuAD study: stage247 on 20k SQuAD train pairs and the full dev split, with both bundled teachers.

    python scripts/study_squad.py [--store DIR] [--runs DIR] [--budget-s S] [--max-epochs E]   # the whole study
    python scripts/study_squad.py --report-only          # rebuild report.md and plots from results/study_squad/*.json

Each step is skipped when its output exists, so an interrupted study continues where it stopped:
1. search: `python -m cube_ray.tune --space stage247` on SQuAD (extraction of whatever the store lacks happens
   inside it), models picked on a `val` split of train documents, so SQuAD dev stays unseen until step 3;
2. retrain: the best config with seeds 0, 1, 2, once centred and once raw, on the same prepared data;
3. evaluate: each retrain's best checkpoint against identity, mean answer and ridge on SQuAD dev, per teacher space;
4. report: results/study_squad/report.md, study.json and plots, from the JSON figures of steps 1-3 alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "study_squad"
SQUAD = ROOT.parent / "shared" / "data" / "squad-v1.1-sentences"
NAME = "squad-stage247"
SEEDS = (0, 1, 2)
CUBES = {"best": "cube, best config of the search", "default": "cube, default preset"}
METRICS = ("cos", "r1", "r5", "mrr")
# The baselines the committed study (results/study_squad/) measured; it predates the linear adapter, which a rerun of
# split_baselines adds (cube_ray.baselines.BASELINES) and this report then still leaves out until it is listed here.
BASELINES = ("identity", "mean_answer", "ridge")
ARCHITECTURE = ("cube/dims", "cube/channels", "cube/layers", "cube/max_steps", "cube/attention", "cube/skip_input",
                "cube/skip_linear", "adapter/strategy", "adapter/io", "adapter/out", "optimizer", "batch_size")


def search(args, name: str = NAME, dest: Path = OUT / "search", seed: int = 0) -> Path:
    """Step 1: the search (its own process: Tune's status table and the extraction's progress show as usual), its
    small figures copied to `dest`. `args`: the flags of `add_search_args`; `seed`: the search's (TPE's, trials')."""
    exp = Path(args.runs) / name
    if not (exp / "report.json").exists():
        cmd = [sys.executable, "-m", "cube_ray.tune", "--space", "stage247", "--out", str(args.runs), "--name", name,
               "--store", args.store, "--seed", str(seed)]
        if (exp / "search.yaml").exists():
            cmd.append("--resume")
        else:  # the clock the study's searches ran on (rungs at 1,024 samples of the task)
            cmd += ["--asha-clock", "samples", "--pairs", str(SQUAD / "train.jsonl.gz"), "--eval-pairs", str(SQUAD / "dev.jsonl.gz"),
                    "--limit", str(args.limit), "--decontaminate", "--val-fraction", str(args.val_fraction),
                    "--num-samples", str(args.num_samples), "--time-budget-s", str(args.budget_s),
                    "--max-epochs", str(args.max_epochs)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    save_search(exp, dest)
    return exp


def save_search(exp: Path, dest: Path) -> None:
    """Copy the search's report, plots and per-trial histories (small) beside the study report."""
    from cube_ray.config import SearchConfig, load_yaml
    from cube_ray.experiment import TASK_STEP
    from cube_ray.trials import load_trials

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "report.json", "best_config.yaml", "history.png", "importance.png", "curves.png", "search.yaml"):
        if (exp / name).exists():
            shutil.copy(exp / name, dest / name)
    search = load_yaml(SearchConfig, exp / "search.yaml")
    trials = [{"id": t.id, "status": t.status, "params": t.params, "epochs_planned": t.config.epochs,
               "history": [{k: r[k] for k in ("epoch", "eval", "time_s", "expected_steps", "samples_per_s") if k in r}
                           for r in t.history],
               "rounds": [{k: r[k] for k in ("samples_seen", TASK_STEP, "round_eval", "time_s") if k in r}
                          for r in t.rounds]}
              for t in load_trials(exp, budget=bool(search.time_budget_s))]
    (dest / "trials.json").write_text(json.dumps(trials, indent=1, default=str))


def retrain_plan(best, default) -> list[tuple[str, str, object]]:
    """(run name, which config, TrainConfig) in the order they run, so an interrupted study has what matters most:
    the searched setting (centred) with every seed, then the default preset (a few times cheaper) centred and raw,
    then the best config raw."""
    def run(which, cfg, center, seed):
        return f"{which}-{'centred' if center else 'raw'}-seed{seed}", which, dataclasses.replace(cfg, center=center, seed=seed)

    return ([run("best", best, True, s) for s in SEEDS] + [run("default", default, c, s) for s in SEEDS for c in (True, False)]
            + [run("best", best, False, s) for s in SEEDS])


def retrain_and_evaluate(args, exp: Path) -> None:
    """Steps 2 and 3: the best config and the default preset, 3 seeds x (centred, raw), evaluated on SQuAD dev."""
    import torch

    from cube_ray.checkpoint import load_checkpoint
    from cube_ray.config import TrainConfig, load_yaml
    from cube_ray.evaluate import comparison
    from cube_ray.train.run import fit, prepare_run
    from cube_ray.train.snapshot import load_for_eval

    torch.use_deterministic_algorithms(True)  # the evaluation below (training runs in Ray's workers)
    best = load_yaml(TrainConfig, exp / "best_config.yaml")
    # The hand-set default cube on the same data, epochs and workers: does the search beat it?
    default = dataclasses.replace(load_yaml(TrainConfig, ROOT / "cube_ray" / "train" / "presets" / "default.yaml"),
                                  data=best.data, teachers=best.teachers, epochs=best.epochs, workers=best.workers,
                                  cpus_per_worker=best.cpus_per_worker, keep_checkpoints=best.keep_checkpoints)
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    data = None
    for name, which, cfg in retrain_plan(best, default):
        figures = OUT / "runs" / f"{name}.json"
        if figures.exists():
            continue
        if cfg == best:  # the best trial itself: same config and seed, and training is deterministic
            run_dir = Path((exp / "best_checkpoint").read_text().strip()).parent
            history = load_checkpoint(run_dir / "latest").state["train_state"]["history"]
            seconds = history[-1]["time_s"]
        else:
            data = data or prepare_run(cfg, args.store)  # the same data, teachers and workers for every run
            run_dir = Path(args.runs) / "retrain" / name
            start = time.perf_counter()
            history = fit(cfg, args.store, run_dir, resume=(run_dir / "latest").exists(), data=data).history
            seconds = time.perf_counter() - start
        loaded = load_for_eval(run_dir / "best_eval")
        table = comparison(loaded.student, loaded.train, loaded.held_out, seed=0)
        figures.write_text(json.dumps({
            "name": name, "config": which, "center": cfg.center, "seed": cfg.seed, "epochs": cfg.epochs,
            "fit_seconds": round(seconds, 1), "held_out_pairs": len(loaded.held_out), "max_steps": cfg.cube.max_steps,
            "min_steps": cfg.cube.min_steps, "history": history, "table": table}, indent=1))
        print(f"{name}: " + ", ".join(f"{t} MRR {rows['model']['mrr']:.3f}" for t, rows in table.items()), flush=True)


def search_data(exp: Path):
    """What the search ran on: its config, the prepared dataset's id, the store and the teachers' specs."""
    from cube_ray.config import SearchConfig, load_yaml
    from cube_ray.store import EmbeddingStore
    from cube_ray.teachers.registry import get_teacher, load_registry

    search = load_yaml(SearchConfig, exp / "search.yaml")
    ck = json.loads((next(exp.glob("trial_*/best_eval/data.json"))).read_text())
    registry = load_registry(search.teacher_config)
    return search, ck["dataset_id"], EmbeddingStore(search.store), {t: get_teacher(t, registry) for t in ck["entries"]}


def data_facts(exp: Path) -> None:
    """Split sizes and extraction cost (from the dataset manifest and the store's entries) for the report."""
    search, dataset_id, store, specs = search_data(exp)
    manifest = json.loads((store.dataset_dir(dataset_id) / "manifest.json").read_text())
    teachers = {}
    for t, spec in specs.items():
        info = store.dataset_entry(dataset_id, spec).info
        teachers[t] = {"n_texts": info["texts"], "width": info["width"], "extract_seconds": info["extract_seconds"]}
    (OUT / "data.json").write_text(json.dumps({
        "dataset_id": dataset_id, "limit": search.data.limit, "val_fraction": search.data.val_fraction,
        "splits": {n: {"rows": s["rows"], "documents": s["documents"]} for n, s in manifest["splits"].items()},
        "decontaminated": len(manifest.get("decontaminated", [])), "teachers": teachers}, indent=1))


def split_baselines(exp: Path, split: str) -> None:
    """The baselines on one split (`val`: the split that picked the models; `eval`: SQuAD dev), raw and centred on
    the train mean, for every teacher: the scale of the search's figures, and the raw rows even where no raw cube ran."""
    from cube_ray.baselines import baselines
    from cube_ray.metrics import Centering
    from cube_ray.train.data import load_split

    _, dataset_id, store, specs = search_data(exp)
    train, held = (load_split(store, dataset_id, name, specs) for name in ("train", split))
    out: dict = {"raw": {}, "centred": {}}
    for t in specs:
        out["raw"][t] = baselines(train.q[t], train.a[t], held.q[t], held.a[t], groups=train.doc_ids)
        c = Centering.fit(train.q[t], train.a[t])
        out["centred"][t] = baselines(c(train.q[t]), c(train.a[t]), c(held.q[t]), c(held.a[t]), groups=train.doc_ids)
    (OUT / f"baselines_{split}.json").write_text(json.dumps(out, indent=1))


# ---------------------------------------------------------------- the report, from the JSON figures alone

def spread(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(runs: list[dict]) -> dict:
    """{centring: {teacher: {"best"|"default": {metric: [per seed]}, baseline: {metric: value}}}}."""
    out: dict = {}
    for run in runs:
        mode = "centred" if run["center"] else "raw"
        for teacher, rows in run["table"].items():
            cell = out.setdefault(mode, {}).setdefault(teacher, {})
            cube = cell.setdefault(run["config"], {m: [] for m in METRICS + ("steps",)})
            for m in METRICS + ("steps",):
                cube[m].append(rows["model"][m])
            for b in BASELINES:
                cell[b] = {m: rows[b][m] for m in METRICS}
    return out


def epoch_one(trial: dict) -> float | None:
    """A trial's val score after its first epoch, if it trained one."""
    return trial["history"][0]["eval"] if trial["history"] else None


def choice_table(trials: list[dict], params=ARCHITECTURE, score=epoch_one) -> list[tuple[str, str, int, float, float]]:
    """Per value of each parameter: trials, mean and best `score` (by default val at epoch 1, which every trial that
    trained an epoch has: no value is favoured by running longer). Trials whose score is None are left out."""
    rows = []
    for param in params:
        groups: dict[str, list[float]] = {}
        for t in trials:
            if score(t) is not None and param in t["params"]:
                groups.setdefault(json.dumps(t["params"][param]), []).append(score(t))
        for value, evals in sorted(groups.items(), key=lambda kv: -statistics.mean(kv[1])):
            rows.append((param, value, len(evals), statistics.mean(evals), max(evals)))
    return rows


def plots(summary: dict, runs: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(mode, t) for mode in summary for t in summary[mode]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, (mode, teacher) in zip(axes[0], panels):
        cell = summary[mode][teacher]
        cubes = [c for c in CUBES if c in cell]
        mrr = [cell[c]["mrr"] for c in cubes]
        names = [f"cube ({c})" for c in cubes] + [b.replace("_", " ") for b in BASELINES]
        values = [statistics.mean(m) for m in mrr] + [cell[b]["mrr"] for b in BASELINES]
        errors = [statistics.stdev(m) if len(m) > 1 else 0 for m in mrr] + [0] * len(BASELINES)
        colours = [{"best": "tab:blue", "default": "tab:cyan"}[c] for c in cubes] + ["tab:grey", "tab:orange", "tab:green"]
        ax.bar(names, values, yerr=errors, capsize=4, color=colours)
        ax.set_title(f"{teacher}, {mode}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_ylabel("MRR on SQuAD dev")
    fig.tight_layout()
    fig.savefig(OUT / "mrr.png", dpi=120)
    fig, ax = plt.subplots(figsize=(7, 4))
    colour = {"best": "tab:blue", "default": "tab:cyan"}  # one colour per cube, as in mrr.png
    for run in runs:
        ax.plot([r["epoch"] for r in run["history"]], [r["eval"] for r in run["history"]], color=colour[run["config"]],
                marker="os^"[run["seed"] % 3], ls="-" if run["center"] else "--", label=run["name"])
    ax.set(xlabel="epoch", ylabel="val MRR (mean over teachers)", title="retrains: best config and default preset")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT / "retrain_curves.png", dpi=120)
    plt.close("all")
    return ["mrr.png", "retrain_curves.png"]


def report() -> Path:
    from cube_ray.report import FEW_TRIALS

    data = json.loads((OUT / "data.json").read_text())
    search = json.loads((OUT / "search" / "report.json").read_text())
    trials = json.loads((OUT / "search" / "trials.json").read_text())
    val_base = json.loads((OUT / "baselines_val.json").read_text())
    dev_base = json.loads((OUT / "baselines_eval.json").read_text())
    runs = sorted((json.loads(p.read_text()) for p in (OUT / "runs").glob("*.json")),
                  key=lambda r: (r["config"], not r["center"], r["seed"]))
    summary = summarise(runs)
    plots(summary, runs)
    cost, best = search["cost"], search["best"]
    scored = [t for t in trials if t["history"]]
    teachers = list(data["teachers"])
    seeds = lambda which, center: sorted(r["seed"] for r in runs if r["config"] == which and r["center"] == center)  # noqa: E731
    lines = ["# SQuAD study: stage247 with minilm and smollm2, against identity, mean answer and ridge", "",
             "Regenerate: `python scripts/study_squad.py` (the whole study; each finished step is skipped) or "
             "`python scripts/study_squad.py --report-only` (this file and its plots, from the JSON figures beside it).", "",
             "## Data and extraction", "",
             f"SQuAD v1.1 question → answer-sentence pairs (`../shared/data/squad-v1.1-sentences`): the first "
             f"{data['limit']:,} pairs of train, split by document into train and a `val` split "
             f"({data['val_fraction']:.0%} of the documents' pairs) that picked every model (early stopping, best "
             f"checkpoint, ASHA, TPE); the **whole dev file** is the held-out `eval` split, used only in the tables below. "
             f"Dataset `{data['dataset_id']}`, {data['decontaminated']} eval pairs dropped as contaminated.", "",
             "| split | pairs | documents |", "|---|---|---|"]
    lines += [f"| {n} | {s['rows']:,} | {s['documents']} |" for n, s in data["splits"].items()]
    lines += ["", "| teacher | texts | width | extraction | texts/s |", "|---|---|---|---|---|"]
    for t, info in data["teachers"].items():
        sec = info.get("extract_seconds") or math.nan
        lines.append(f"| {t} | {info['n_texts']:,} | {info['width']} | {sec / 60:.1f} min | {info['n_texts'] / sec:.1f} |")
    lines += ["", "Extraction ran on this machine's 2 CPU cores through Ray Data actor pools (one actor per teacher).", ""]

    lines += ["## The cube against the baselines on SQuAD dev", "",
              "Two cubes, each retrained for the search's epochs with several seeds: the **best config of the search**, "
              "and the **default preset** (`cube_ray/train/presets/default.yaml`, hand-set, never searched) as a "
              "reference. Each once with every teacher's train mean subtracted from inputs, targets, pool and baselines "
              "(centred, as the search ran) and once without (raw). Seeds run: "
              + "; ".join(f"{w} {m}: {', '.join(map(str, seeds(w, c))) or 'none'}" for w in CUBES
                          for m, c in (("centred", True), ("raw", False)))
              + ". The student is one multi-teacher cube: each teacher space has its own adapters into and out of the "
              "shared lattice, so every run gives a row in both spaces. Cube figures are mean ± standard deviation over "
              f"the seeds; the pool is the dev split's de-duplicated answers ({runs[0]['held_out_pairs']:,} queries). "
              "Figures: `runs/*.json`.", ""]
    verdicts = []
    for mode in ("raw", "centred"):
        for teacher in teachers:
            cell = {**summary.get(mode, {}).get(teacher, {}), **dev_base[mode][teacher]}
            lines += [f"**{teacher}, {mode}**", "", "| | cos | R@1 | R@5 | MRR |", "|---|---|---|---|---|"]
            lines += [f"| {CUBES[c]} | " + (" | ".join(spread(cell[c][m]) for m in METRICS) if c in cell
                                           else "not run | | |") + " |" for c in CUBES]
            lines += [f"| {b.replace('_', ' ')} | " + " | ".join(f"{cell[b][m]:.3f}" for m in METRICS) + " |" for b in BASELINES]
            lines.append("")
            best_base = max(BASELINES, key=lambda b: cell[b]["mrr"])
            for c in (c for c in CUBES if c in cell):
                mrr = cell[c]["mrr"]
                beats = [b.replace("_", " ") for b in BASELINES if min(mrr) > cell[b]["mrr"]]
                fails = [b.replace("_", " ") for b in BASELINES if max(mrr) <= cell[b]["mrr"]]
                verdict = (f"{teacher} {mode}, {CUBES[c]}: MRR {spread(mrr)} against {best_base.replace('_', ' ')} "
                           f"{cell[best_base]['mrr']:.3f}, the best baseline. Beats on every seed: "
                           f"{', '.join(beats) or 'none'}; loses on every seed to: {', '.join(fails) or 'none'}.")
                verdicts.append(verdict)
                lines += [verdict, ""]
    lines += ["**The multi-teacher student** (MRR, mean over the two teacher spaces: what the search maximised):", "",
              "| | raw | centred |", "|---|---|---|"]
    for row in list(CUBES) + list(BASELINES):
        vals = []
        for mode in ("raw", "centred"):
            cells = [summary.get(mode, {}).get(t, {}) for t in teachers]
            if row in BASELINES:
                vals.append(f"{statistics.mean(dev_base[mode][t][row]['mrr'] for t in teachers):.3f}")
            elif all(row in c for c in cells):
                vals.append(spread([statistics.mean(seed) for seed in zip(*[c[row]["mrr"] for c in cells])]))
            else:
                vals.append("not run")
        lines.append(f"| {CUBES.get(row, row.replace('_', ' '))} | " + " | ".join(vals) + " |")
    lines += ["", "![MRR per teacher space](mrr.png)", ""]

    lines += ["## Expected halting steps", "",
              "Training: the halting distribution's expectation at each run's best epoch; inference: the mean number "
              "of steps the gate ran on dev.", "",
              "| run | min / max steps | E[steps] (train, best epoch) | "
              + " | ".join(f"steps on dev ({t})" for t in teachers) + " |", "|---|---|---|" + "---|" * len(teachers)]
    for run in runs:
        best_epoch = max(run["history"], key=lambda r: r["eval"])
        lines.append(f"| {run['name']} | {run['min_steps']} / {run['max_steps']} | {best_epoch['expected_steps']:.2f} | "
                     + " | ".join(f"{run['table'][t]['model']['steps']:.2f}" for t in teachers) + " |")

    lines += ["", "## The search", "",
              f"`python -m cube_ray.tune --space stage247` ({cost['trials']} trials, Optuna TPE + ASHA; full report: "
              "`search/report.md`). Cost: "
              f"{cost['epochs']} epochs trained, {cost['cpu_hours']:.2f} CPU-hours, {cost['wall_s'] / 60:.0f} min wall "
              f"(extraction included) over {cost['sessions']} session(s); {cost['complete']} trials ran all their epochs, "
              f"{cost['stopped_by_asha']} were stopped by ASHA, {cost['time_budget']} by the time budget, "
              f"{cost['errors']} failed.", "",
              f"Best trial `{best['trial']}`: val MRR {best['eval']:.4f} at epoch {best['epoch']}. Its parameters: "
              + ", ".join(f"`{k}` {v:.3g}" if isinstance(v, float) else f"`{k}` {v}" for k, v in best["params"].items())
              + ".", "",
              "For scale, the baselines on the same val split (MRR, mean over teachers): " + ", ".join(
                  f"{b.replace('_', ' ')} {statistics.mean(v[t][b]['mrr'] for t in v):.3f} {mode}"
                  for mode, v in val_base.items() for b in BASELINES) + ".", "",
              "Per-trial minutes per epoch: " + ", ".join(
                  f"{t['history'][-1]['time_s'] / 60 / len(t['history']):.1f}" for t in trials if t["history"]) + ".", "",
              "Parameter importance (fANOVA over the trials' best val MRR): "
              + (", ".join(f"`{k}` {v:.2f}" for k, v in list(search["importance"].items())[:10]) or "unavailable")
              + (f" — from {len(scored)} trials, which differ in every parameter at once: noise, not evidence of "
                 "what matters." if len(scored) < FEW_TRIALS else "."), "",
              "Architecture choices, compared at epoch 1 (every trial reached it, so no choice is favoured by running "
              "longer):", "", "| parameter | value | trials | mean val MRR | best val MRR |", "|---|---|---|---|---|"]
    lines += [f"| `{p}` | {v} | {n} | {m:.4f} | {b:.4f} |" for p, v, n, m, b in choice_table(trials)]
    lines += ["", "![search history](search/history.png)", "", "![parameter importance](search/importance.png)", "",
              "![learning curves](search/curves.png)", "", "![retrains](retrain_curves.png)", ""]
    notes = OUT / "notes.md"
    lines += ["## Conclusions", ""] + [f"- {v}" for v in verdicts] + [""]
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    (OUT / "study.json").write_text(json.dumps({"data": data, "summary": summary, "search_cost": cost, "best": best,
                                                "importance": search["importance"], "verdicts": verdicts}, indent=1))
    return OUT / "report.md"


def add_search_args(p: argparse.ArgumentParser, runs: Path, num_samples: int, budget_s: int) -> None:
    """The flags `search` reads (both studies): data, store, run folders and the search's budget."""
    from cube_ray.cli import default_store

    p.add_argument("--store", default=default_store(), help="embedding store (default: %(default)s)")
    p.add_argument("--runs", default=str(runs), help="the search's and the training runs' folders (checkpoints)")
    p.add_argument("--limit", type=int, default=20000, help="SQuAD train pairs (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="train documents held out to pick models")
    p.add_argument("--num-samples", type=int, default=num_samples, help="the search's trials at most (default: %(default)s)")
    p.add_argument("--budget-s", type=int, default=budget_s, help="the search's time budget (default: %(default)s)")
    p.add_argument("--max-epochs", type=int, default=3, help="epochs per search trial at most (default: %(default)s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_search_args(p, ROOT / "results" / "squad_runs", num_samples=40, budget_s=3000)  # retrains train --max-epochs too
    p.add_argument("--report-only", action="store_true", help="rebuild the report from results/study_squad/*.json")
    args = p.parse_args(argv)
    if not args.report_only:
        from cube_ray.cli import setup_logging

        setup_logging()
        args.store = str(Path(args.store).resolve())
        exp = search(args)
        data_facts(exp)
        for split in ("val", "eval"):
            if not (OUT / f"baselines_{split}.json").exists():
                split_baselines(exp, split)
        retrain_and_evaluate(args, exp)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
