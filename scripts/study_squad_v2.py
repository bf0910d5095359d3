"""The SQuAD study, second round: the training presets (residual students) against the four baselines, 3 seeds.

    python scripts/study_squad_v2.py [--store DIR] [--runs DIR] [--presets default,cosine] [--seeds 0,1,2]
    python scripts/study_squad_v2.py --report-only     # report.md and plots from results/study_squad_v2/*.json

Data as in the first study (results/study_squad/, which stays as it is): the first 20,000 SQuAD v1.1 train pairs,
15 % of their documents as the `val` split that picks every model (best epoch, residual mix), the whole dev file as
the held-out `eval` split, teachers minilm and smollm2. Each step is skipped when its JSON exists, so an interrupted
study continues where it stopped:
1. data: prepare and extract what the store lacks (cached and shared with `python -m cube_ray.tune`);
2. each preset (cube_ray/train/presets/: default, cosine) for each seed, centred and raw: `fit`, then its
   best_eval/ (picked on val) scored on dev, with the plan's criteria;
3. the baselines on dev (identity, mean answer, ridge, linear adapter), raw and centred, fitted on train;
4. the search: `python -m cube_ray.tune --space stage247` on the same data (`--budget-s` of trials, `--max-epochs`
   per trial, picked on val), its report, plots and trial histories copied to search/;
5. report.md, study.json and plots, from the JSON figures alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from study_squad import SQUAD, add_search_args, search, spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "study_squad_v2"
SEARCH = "squad-v2-stage247"  # the search's experiment folder under --runs
PRESETS = ROOT / "cube_ray" / "train" / "presets"
METRICS = ("cos", "r1", "r5", "mrr")
MODES = {True: "centred", False: "raw"}


def preset_config(preset: str, seed: int, center: bool, limit: int, val_fraction: float):
    from cube_ray.config import DataConfig, TrainConfig, load_yaml

    data = DataConfig(pairs=str(SQUAD / "train.jsonl.gz"), eval_pairs=str(SQUAD / "dev.jsonl.gz"), limit=limit,
                      decontaminate=True, val_fraction=val_fraction, seed=0)  # one split for every seed
    return dataclasses.replace(load_yaml(TrainConfig, PRESETS / f"{preset}.yaml"), data=data, seed=seed, center=center)


def data_step(args) -> object:
    """Step 1: the prepared data (extraction included) and its facts: split sizes, texts and extraction time."""
    from cube_ray.store import EmbeddingStore
    from cube_ray.train.run import prepare_run

    start = time.perf_counter()
    data = prepare_run(preset_config(args.presets[0], 0, True, args.limit, args.val_fraction), args.store)
    store = EmbeddingStore(args.store)
    manifest = json.loads((store.dataset_dir(data.dataset_id) / "manifest.json").read_text())
    teachers = {}
    for t, spec in data.specs.items():
        info = store.dataset_entry(data.dataset_id, spec).info
        teachers[t] = {"texts": info["texts"], "width": info["width"], "extract_seconds": info["extract_seconds"]}
    facts = {"dataset_id": data.dataset_id, "limit": args.limit, "val_fraction": args.val_fraction,
             "splits": {n: {"rows": s["rows"], "documents": s["documents"]} for n, s in manifest["splits"].items()},
             "decontaminated": len(manifest.get("decontaminated", [])), "teachers": teachers,
             "prepare_seconds_this_session": round(time.perf_counter() - start, 1)}
    if not (OUT / "data.json").exists():
        (OUT / "data.json").write_text(json.dumps(facts, indent=1))
    return data


def run_plan(presets: list[str], seeds: list[int]) -> list[tuple[str, str, int, bool]]:
    """(run name, preset, seed, centred) in the order they run: both centrings of a seed before the next seed, and
    every preset's seed before the next seed, so an interrupted study has every kind of row."""
    return [(f"{preset}-{MODES[center]}-seed{seed}", preset, seed, center)
            for seed in seeds for preset in presets for center in (True, False)]


def preset_runs(args, data) -> None:
    """Step 2 (and 3 on the way): each run trained, then its best_eval/ scored on dev."""
    import torch

    from cube_ray.config import to_dict
    from cube_ray.evaluate import baseline_table, student_metrics, with_criteria
    from cube_ray.train.run import fit
    from cube_ray.train.snapshot import load_for_eval

    torch.use_deterministic_algorithms(True)  # the evaluation here (training runs in Ray's workers)
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    for name, preset, seed, center in run_plan(args.presets, args.seeds):
        figures = OUT / "runs" / f"{name}.json"
        if figures.exists():
            continue
        cfg = preset_config(preset, seed, center, args.limit, args.val_fraction)
        run_dir = Path(args.runs) / name
        start = time.perf_counter()
        history = fit(cfg, args.store, run_dir, resume=(run_dir / "latest").exists(), data=data).history
        seconds = time.perf_counter() - start
        loaded = load_for_eval(run_dir / "best_eval")
        baselines = OUT / f"baselines_{MODES[center]}.json"
        if not baselines.exists():  # every run of a centring shares its train split and centres
            baselines.write_text(json.dumps(baseline_table(loaded.train, loaded.held_out), indent=1))
        base = json.loads(baselines.read_text())
        model = student_metrics(loaded.student, loaded.held_out)
        table = with_criteria({t: {"model": model[t], **base[t]} for t in model}, loaded)
        figures.write_text(json.dumps({
            "name": name, "preset": preset, "config": {k: v for k, v in to_dict(cfg).items() if k != "data"},
            "seed": seed, "center": center, "fit_seconds": round(seconds, 1), "held_out_pairs": len(loaded.held_out),
            "mix": dict(zip(loaded.student.teachers, loaded.student.residual_mix.tolist())),
            "history": history, "table": table}, indent=1))
        print(f"{name}: " + ", ".join(f"{t} MRR {rows['model']['mrr']:.3f} (identity {rows['identity']['mrr']:.3f}, "
                                      f"linear adapter {rows['linear_adapter']['mrr']:.3f})"
                                      for t, rows in table.items()), flush=True)


def search_step(args) -> None:
    """Step 4: stage247 on the study's data, resumed if it was interrupted (its run folder: --runs/SEARCH)."""
    import ray

    ray.shutdown()  # the steps before started Ray here; the search starts its own in its process, one at a time
    search(args, SEARCH, OUT / "search")


# ---------------------------------------------------------------- the report, from the JSON figures alone

def search_lines() -> list[str]:
    """The search's cost and its best trial, base-preset trial and top-3 ensemble on dev (search/report.json)."""
    path = OUT / "search" / "report.json"
    if not path.exists():
        return ["Not run yet (`python scripts/study_squad_v2.py` runs it after the presets).", ""]
    r = json.loads(path.read_text())
    cost, teachers = r["cost"], list(r["held_out"]["table"])
    lines = [f"`python -m cube_ray.tune --space stage247` on the same data, every model picked on val, dev scored "
             f"after the search ([its report](search/report.md)): {cost['trials']} trials in "
             f"{cost['wall_s'] / 60:.0f} min, {cost['stopped_by_asha']} stopped by ASHA "
             f"({cost['stopped_by_asha'] / cost['trials']:.0%}), {cost['complete'] + cost['early_stop']} trained "
             f"their whole budget (max_t) or stopped on patience, {cost['time_budget']} cut by the time budget, "
             f"{cost['errors']} errors; {cost['cpu_hours']:.1f} CPU-hours.", "",
             "| dev MRR, one seed (the search's) | " + " | ".join(teachers) + " |", "|---|" + "---|" * len(teachers)]
    rows = {"search's best trial": {t: r["held_out"]["table"][t]["model"]["mrr"] for t in teachers},
            "base preset's trial (`default`)": {t: r["base_preset"]["held_out"]["table"][t]["model"]["mrr"] for t in teachers}}
    if r["ensemble"]:  # none with fewer than 3 trials that trained an epoch
        rows["top-3 ensemble"] = {t: r["ensemble"]["table"][t]["ensemble"]["mrr"] for t in teachers}
    rows |= {b.replace("_", " "): {t: r["held_out"]["table"][t][b]["mrr"] for t in teachers}
             for b in ("identity", "linear_adapter")}
    lines += [f"| {name} | " + " | ".join(f"{v[t]:.4f}" for t in teachers) + " |" for name, v in rows.items()]
    top = sorted(r["importance"].items(), key=lambda kv: -kv[1])[:6]
    return lines + ["", f"Best trial `{r['best']['trial']}` (val {r['best']['eval']:.4f}; the base preset's "
                        f"{r['base_preset']['eval']:.4f}). Parameter importance (Optuna, val): "
                        + ", ".join(f"`{k}` {v:.2f}" for k, v in top) + ".", "",
                    "![parameter importance](search/importance.png)", ""]


def load_runs() -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in (OUT / "runs").glob("*.json")),
                  key=lambda r: (r["preset"], not r["center"], r["seed"]))


def presets_of(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["preset"] for r in runs))


def results_table(runs: list[dict], mode: str, teacher: str) -> tuple[list[str], list[str]]:
    """One space's rows (each preset's mean ± sd over seeds, then the baselines) and a verdict per preset."""
    from cube_ray.baselines import BASELINES

    mine = [r for r in runs if MODES[r["center"]] == mode]
    if not mine:
        return [], [f"{teacher} {mode}: not run"]
    base = mine[0]["table"][teacher]
    lines = [f"**{teacher}, {mode}**", "", "| | seeds | cos | R@1 | R@5 | MRR |", "|---|---|---|---|---|---|"]
    verdicts = []
    best = max(BASELINES, key=lambda b: base[b]["mrr"])
    for preset in presets_of(mine):
        ours = [r for r in mine if r["preset"] == preset]
        mrr = [r["table"][teacher]["model"]["mrr"] for r in ours]
        lines.append(f"| cube, preset `{preset}` | {', '.join(str(r['seed']) for r in ours)} | " + " | ".join(
            spread([r["table"][teacher]["model"][m] for r in ours], 4 if m == "mrr" else 3) for m in METRICS) + " |")
        beaten = [b.replace("_", " ") for b in BASELINES if min(mrr) > base[b]["mrr"]]
        verdicts.append(f"{teacher} {mode}, preset `{preset}`: MRR {spread(mrr, 4)} against the best baseline, "
                        f"{best.replace('_', ' ')}, {base[best]['mrr']:.4f} ({min(mrr) - base[best]['mrr']:+.5f} for "
                        f"the worst seed). Beaten on every seed: {', '.join(beaten) or 'none'}.")
    lines += [f"| {b.replace('_', ' ')} | | " + " | ".join(f"{base[b][m]:.{4 if m == 'mrr' else 3}f}" for m in METRICS)
              + " |" for b in BASELINES]
    return lines + [""] + [line for v in verdicts for line in (v, "")], verdicts


def criteria_lines(runs: list[dict]) -> list[str]:
    teachers = list(runs[0]["table"])
    lines = ["| run | " + " | ".join(f"reconstruction cosine ({t})" for t in teachers) + " | residual mix | "
             "E[steps] at the best epoch (train) | " + " | ".join(f"steps on dev ({t})" for t in teachers) + " |",
             "|---|" + "---|" * (2 * len(teachers) + 2)]
    for r in runs:
        best = max(r["history"], key=lambda h: h["eval"])
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r['table'][t]['criteria']['reconstruction_cos']['value']:.3f}" for t in teachers)
            + " | " + ", ".join(f"{t} {m:.1f}" for t, m in r["mix"].items())
            + f" | {best['expected_steps']:.2f} of {r['config']['cube']['min_steps']}-{r['config']['cube']['max_steps']} | "
            + " | ".join(f"{r['table'][t]['model']['steps']:.2f}" for t in teachers) + " |")
    return lines


def plots(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cube_ray.baselines import BASELINES

    teachers = list(runs[0]["table"])
    panels = [(mode, t) for mode in MODES.values() for t in teachers if any(MODES[r["center"]] == mode for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, (mode, teacher) in zip(axes[0], panels):
        mine = [r for r in runs if MODES[r["center"]] == mode]
        presets = presets_of(mine)
        mrr = [[r["table"][teacher]["model"]["mrr"] for r in mine if r["preset"] == p] for p in presets]
        values = [statistics.mean(m) for m in mrr] + [mine[0]["table"][teacher][b]["mrr"] for b in BASELINES]
        errors = [statistics.stdev(m) if len(m) > 1 else 0 for m in mrr] + [0] * len(BASELINES)
        ax.bar(presets + [b.replace("_", " ") for b in BASELINES], values, yerr=errors, capsize=4,
               color=["tab:blue", "tab:cyan"][:len(presets)] + ["tab:grey", "tab:orange", "tab:green", "tab:red"])
        ax.set_title(f"{teacher}, {mode}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_ylabel("MRR on SQuAD dev")
    fig.tight_layout()
    fig.savefig(OUT / "mrr.png", dpi=120)
    fig, axes = plt.subplots(1, len(teachers), figsize=(5 * len(teachers), 3.8), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        for r in runs:
            ax.plot([h["epoch"] for h in r["history"]], [h[f"{teacher}/mrr"] for h in r["history"]],
                    marker="os^"[r["seed"] % 3], ls="-" if r["center"] else "--", label=r["name"])
        ax.set(xlabel="epoch", ylabel="val MRR (after the residual mix)", title=teacher)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "curves.png", dpi=120)
    plt.close("all")


def report() -> Path:
    from cube_ray.criteria import THRESHOLDS

    data, runs = json.loads((OUT / "data.json").read_text()), load_runs()
    teachers = list(data["teachers"])
    plots(runs)
    lines = ["# SQuAD study, second round: the training presets (residual students) against the baselines", "",
             "Regenerate: `python scripts/study_squad_v2.py` (every step not done yet; each finished one is skipped) "
             "or `python scripts/study_squad_v2.py --report-only` (this file and its plots, from the JSON beside it).",
             "", "## Data", "",
             f"The first {data['limit']:,} SQuAD v1.1 train pairs, split by document into train and `val` "
             f"({data['val_fraction']:.0%} of the documents), which picks every model (best epoch, residual mix); the "
             f"whole dev file is the held-out `eval` split, used only in the tables below ({data['decontaminated']} "
             f"dev pairs dropped as contaminated). Dataset `{data['dataset_id']}`.", "",
             "| split | pairs | documents |", "|---|---|---|"]
    lines += [f"| {n} | {s['rows']:,} | {s['documents']} |" for n, s in data["splits"].items()]
    lines += ["", "| teacher | texts | width | extraction (wall) | texts/s |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {i['texts']:,} | {i['width']} | {i['extract_seconds'] / 60:.1f} min | "
              f"{i['texts'] / i['extract_seconds']:.1f} |" for t, i in data["teachers"].items()]
    lines += ["", "## The presets against the baselines on SQuAD dev", "",
              "Each preset of `cube_ray/train/presets/` as it ships (`default`: the cube with InfoNCE alone on batches of "
              "256 and a linear path beside the cube; `cosine`, the default before this study: cosine to the gold "
              "answer plus InfoNCE at 0.5 on batches of 64), residual mix picked on val, "
              f"{runs[0]['config']['epochs']} epochs at most, one multi-teacher student per run (a row in each teacher space), "
              "with every teacher's train mean subtracted from inputs, targets, pool and baselines (centred) or not "
              f"(raw). Cube: mean ± sd over seeds; pool: dev's de-duplicated answers ({runs[0]['held_out_pairs']:,} "
              "queries). cos is the mean cosine of each prediction to its gold answer in the row's space; in the raw rows "
              "it is the plan's Q→A cosine (its headline: 38.5 %), where a constant, the mean answer, scores 0.80 in "
              "SmolLM2 space: retrieval is what counts.", ""]
    verdicts = []
    for mode in MODES.values():
        for teacher in teachers:
            table, found = results_table(runs, mode, teacher)
            lines += table
            verdicts += found
    lines += ["![MRR per teacher space](mrr.png)", "", "## The plan's criteria, residual mix and halting", "",
              f"Reconstruction cosine (threshold {THRESHOLDS['reconstruction_cos']}) on dev's questions and answers; the "
              "cross-teacher share is n/a (these students are neither distilled nor fused). Residual mix: the share of "
              "the cube's change each teacher space keeps, picked on val at the best epoch. E[steps]: the halting "
              "distribution's expectation in training; steps on dev: what the gate ran.", ""]
    lines += criteria_lines(runs)
    lines += ["", "Cost: " + ", ".join(f"{r['name']} {r['fit_seconds'] / 60:.1f} min ({len(r['history'])} epochs)"
                                       for r in runs) + ".", "", "![val learning curves](curves.png)", "",
              "## The search (stage247)", ""] + search_lines() + ["## Conclusions", ""] + [f"- {v}" for v in verdicts] + [""]
    notes = OUT / "notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    (OUT / "study.json").write_text(json.dumps({"data": data, "verdicts": verdicts, "runs": [
        {k: r[k] for k in ("name", "seed", "center", "fit_seconds", "mix")} | {
            "mrr": {t: rows["model"]["mrr"] for t, rows in r["table"].items()}} for r in runs]}, indent=1))
    return OUT / "report.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_search_args(p, ROOT / "results" / "squad_v2_runs", num_samples=200, budget_s=3600)
    p.add_argument("--presets", default="default,cosine", help="training presets (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of each preset (default: %(default)s)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from results/study_squad_v2/*.json")
    args = p.parse_args(argv)
    if not args.report_only:
        from cube_ray.cli import setup_logging

        setup_logging()
        args.store, args.seeds = str(Path(args.store).resolve()), [int(s) for s in args.seeds.split(",")]
        args.presets = args.presets.split(",")
        OUT.mkdir(parents=True, exist_ok=True)
        preset_runs(args, data_step(args))
        search_step(args)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
