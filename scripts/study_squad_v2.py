"""The SQuAD study, second round: the training presets and the search's best configs (residual students) against the
four baselines, 3 seeds.

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
5. the search's 3 best configs (ranked on val) retrained as the search trained them (`--max-epochs`), each seed,
   centred and raw, and scored as in step 2: the best one's runs first, then the others' centred ones (the search
   ran centred), then their raw ones;
6. per seed and centring, the ensemble of those 3 runs (predictions averaged) scored on dev;
7. the search again with another seed (`--seed 1`, same budget, search_rerun/), its best config retrained with each
   seed, centred and raw, as `rerun1`. The seed also draws the search's val documents (its val scores are not the
   first search's); the retrains use the study's split. In this study's record the first search ran before the fixes
   to what ASHA, TPE and the importance saw (notes.md) and the second after them;
8. report.md, study.json and plots, from the JSON figures alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

from study_squad import SQUAD, add_search_args, choice_table, search, spread

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "study_squad_v2"
SEARCH = "squad-v2-stage247"  # the search's experiment folder under --runs
RERUN, RERUN_SEED = "squad-v2-stage247-rerun", 1  # the second search's folder and seed
PRESETS = ROOT / "cube_ray" / "train" / "presets"
METRICS = ("cos", "r1", "r5", "mrr")
MODES = {True: "centred", False: "raw"}
# The plan's approaches the search chose between (stage247's space), and what a trial costs: compared per value below.
APPROACHES = ("stages", "fusion", "cube/mixer", "cube/attention", "cube/skip_linear", "cube/skip_input",
              "cube/channels", "cube/max_steps", "adapter/strategy", "batch_size")
SAMPLED = ("stages", "fusion", "cube/mixer", "cube/channels", "cube/max_steps", "loss/cosine", "loss/infonce", "lr",
           "batch_size")  # the columns of the per-trial table
PRESET_NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))
# The first search's importance rested on each trial's first round (cube_ray.report before the first-rung fix).
FIRST_SEARCH_BASIS = {"first round": "the first round of the {n} trials that reported, too few being complete (a "
                                     "staged trial's first round fell in its first stage: see the notes)"}


def preset(name: str):
    from cube_ray.config import TrainConfig, load_yaml

    return load_yaml(TrainConfig, PRESETS / f"{name}.yaml")


def searched_configs(exp: Path, prefix: str = "search") -> dict[str, object]:
    """The search's TOP best trials' configs ("search1" the best), ranked on val as its report ranks them, as the
    search trained them (its epochs: the schedule decays over them) on the default preset's workers. With the
    default's 10 epochs the best config peaked lower on val (notes.md)."""
    from cube_ray.ensemble import TOP
    from cube_ray.trials import load_trials, ranked, with_checkpoint

    default = preset("default")
    trials = with_checkpoint(ranked(load_trials(exp)))[:TOP]
    budget = {k: getattr(default, k) for k in ("workers", "cpus_per_worker")}
    return {f"{prefix}{i}": dataclasses.replace(t.config, **budget) for i, t in enumerate(trials, 1)}


def study_config(base, seed: int, center: bool, limit: int, val_fraction: float):
    """`base` (a preset or a searched config) on the study's data, with this seed and centring."""
    from cube_ray.config import DataConfig

    data = DataConfig(pairs=str(SQUAD / "train.jsonl.gz"), eval_pairs=str(SQUAD / "dev.jsonl.gz"), limit=limit,
                      decontaminate=True, val_fraction=val_fraction, seed=0)  # one split for every seed
    return dataclasses.replace(base, data=data, seed=seed, center=center)


def data_step(args) -> object:
    """Step 1: the prepared data (extraction included) and its facts: split sizes, texts and extraction time."""
    from cube_ray.store import EmbeddingStore
    from cube_ray.train.run import prepare_run

    start = time.perf_counter()
    data = prepare_run(study_config(preset(args.presets[0]), 0, True, args.limit, args.val_fraction), args.store)
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


BOTH = (True, False)  # centred and raw


def run_plan(groups: list[tuple[list[str], tuple[bool, ...]]], seeds: list[int]) -> list[tuple[str, str, int, bool]]:
    """(run name, config name, seed, centred) in the order they run: one group (configs, centrings) after another;
    within a group every centring and config of a seed before the next seed, so an interrupted study has every kind
    of row."""
    return [(f"{name}-{MODES[center]}-seed{seed}", name, seed, center)
            for names, centrings in groups for seed in seeds for name in names for center in centrings]


def train_runs(args, data, configs: dict[str, object], groups: list[tuple[list[str], tuple[bool, ...]]]) -> None:
    """Steps 2 and 5 (and 3 on the way): each run of `groups` (names of `configs`) trained, then its best_eval/
    scored on dev."""
    import torch

    from cube_ray.config import to_dict
    from cube_ray.evaluate import baseline_table, student_metrics, with_criteria
    from cube_ray.train.run import fit
    from cube_ray.train.snapshot import load_for_eval

    torch.use_deterministic_algorithms(True)  # the evaluation here (training runs in Ray's workers)
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    for name, config, seed, center in run_plan(groups, args.seeds):
        figures = OUT / "runs" / f"{name}.json"
        if figures.exists():
            continue
        cfg = study_config(configs[config], seed, center, args.limit, args.val_fraction)
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
            "name": name, "preset": config, "config": {k: v for k, v in to_dict(cfg).items() if k != "data"},
            "seed": seed, "center": center, "fit_seconds": round(seconds, 1), "held_out_pairs": len(loaded.held_out),
            "mix": dict(zip(loaded.student.teachers, loaded.student.residual_mix.tolist())),
            "history": history, "table": table}, indent=1))
        print(f"{name}: " + ", ".join(f"{t} MRR {rows['model']['mrr']:.3f} (identity {rows['identity']['mrr']:.3f}, "
                                      f"linear adapter {rows['linear_adapter']['mrr']:.3f})"
                                      for t, rows in table.items()), flush=True)


def search_step(args, name: str = SEARCH, dest: str = "search", seed: int = 0) -> Path:
    """Steps 4 and 7: stage247 on the study's data, resumed if it was interrupted (its run folder: --runs/name)."""
    import ray

    ray.shutdown()  # the steps before started Ray here; the search starts its own in its process, one at a time
    return search(args, name, OUT / dest, seed)


def ensemble_runs(args, names: list[str]) -> None:
    """Step 6: per seed and centring, the runs of `names` (the search's top configs, retrained with that seed) as one
    ensemble (cube_ray.ensemble: predictions averaged in each teacher space) scored on dev."""
    from cube_ray.ensemble import ensemble_table

    (OUT / "ensembles").mkdir(exist_ok=True)
    for seed in args.seeds:
        for center in (True, False):
            figures = OUT / "ensembles" / f"{MODES[center]}-seed{seed}.json"
            runs = [f"{name}-{MODES[center]}-seed{seed}" for name in names]
            if figures.exists() or not all((OUT / "runs" / f"{run}.json").exists() for run in runs):
                continue
            result = ensemble_table([Path(args.runs) / run / "best_eval" for run in runs], with_baselines=False)
            figures.write_text(json.dumps({"name": f"ensemble-{MODES[center]}-seed{seed}", "preset": "ensemble",
                                           "members": runs, "seed": seed, "center": center, "table": {
                                               t: {"model": rows["ensemble"]} for t, rows in result["table"].items()}},
                                          indent=1))
            print(f"{figures.stem}: " + ", ".join(f"{t} MRR {rows['ensemble']['mrr']:.4f}"
                                                  for t, rows in result["table"].items()), flush=True)


# ---------------------------------------------------------------- the report, from the JSON figures alone

def search_lines(folder: str) -> list[str]:
    """A search's cost and its best trial, base-preset trial and top-3 ensemble on dev (folder/report.json)."""
    from cube_ray.report import IMPORTANCE_BASIS

    path = OUT / folder / "report.json"
    if not path.exists():
        return ["Not run yet (`python scripts/study_squad_v2.py` runs it).", ""]
    r = json.loads(path.read_text())
    cost, teachers = r["cost"], list(r["held_out"]["table"])
    lines = [f"`python -m cube_ray.tune --space stage247` on the same pairs and dev file, every model picked on val, dev scored "
             f"after the search ([its report]({folder}/report.md)): {cost['trials']} trials in "
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
    basis = (IMPORTANCE_BASIS | FIRST_SEARCH_BASIS)[r["importance_basis"]["on"]].format(n=r["importance_basis"]["trials"])
    return lines + ["", f"Best trial `{r['best']['trial']}` (val {r['best']['eval']:.4f}; the base preset's "
                        f"{r['base_preset']['eval']:.4f}). Parameter importance (Optuna's fANOVA over {basis}): "
                        + ", ".join(f"`{k}` {v:.2f}" for k, v in top) + ".", "",
                    f"![parameter importance]({folder}/importance.png)", ""]


def score_at_first_rung(trial: dict, grace: int) -> float | None:
    """A trial's (trials.json) score on the fixed val slice at ASHA's first rung (cube_ray.trials.first_rung)."""
    from cube_ray.trials import first_rung

    rung = first_rung(trial.get("rounds", []), grace)
    return rung["round_eval"] if rung else None


def learned_lines(folder: str) -> list[str]:
    """What the search learned and did: each approach's values compared at the first rung and at epoch 1, and every
    trial in the order TPE proposed it, with what ASHA did to it (folder/trials.json)."""
    from cube_ray.config import SearchConfig, load_yaml

    path = OUT / folder / "trials.json"
    if not path.exists():
        return []
    trials = json.loads(path.read_text())
    grace = load_yaml(SearchConfig, OUT / folder / "search.yaml").grace_samples
    at_rung = functools.partial(score_at_first_rung, grace=grace)
    lines = ["**What the search learned.** Each approach's values, compared on the first rung (the val slice after "
             "ASHA's grace period, which every trial reached) and after epoch 1 (the whole val split; only the trials "
             "ASHA let train that far). Residual students are not a choice here: every trial is one (the base preset's "
             "`cube.residual`); the residual mix in the table above says how much of the cube each space keeps.", "",
             "| parameter | value | trials (rung) | mean / best at the first rung | trials (epoch 1) | mean / best at epoch 1 |",
             "|---|---|---|---|---|---|"]
    epoch = {(p, v): (n, m, b) for p, v, n, m, b in choice_table(trials, APPROACHES)}
    for p, v, n, m, b in choice_table(trials, APPROACHES, at_rung):
        e = epoch.get((p, v))
        lines.append(f"| `{p}` | {json.loads(v)} | {n} | {m:.4f} / {b:.4f} | "
                     + (f"{e[0]} | {e[1]:.4f} / {e[2]:.4f} |" if e else "0 | |"))
    lines += ["", "**What TPE sampled and ASHA stopped**, in the order the trials were proposed (the first is the "
              "default preset, enqueued; TPE models after 4 random ones):", "",
              "| # | status | samples trained | first rung | best val | " + " | ".join(f"`{p}`" for p in SAMPLED) + " |",
              "|---|---|---|---|---|" + "---|" * len(SAMPLED)]
    for i, t in enumerate(trials):
        scores = (at_rung(t), max((h["eval"] for h in t["history"]), default=None))
        cells = [f"{v:.3g}" if isinstance(v := t["params"].get(p, ""), float) else str(v) for p in SAMPLED]
        lines.append(f"| {i} | {t['status']} | {t['rounds'][-1]['samples_seen'] if t.get('rounds') else 0:,} | "
                     + " | ".join("" if v is None else f"{v:.4f}" for v in scores) + " | " + " | ".join(cells) + " |")
    return lines + [""]


def load_rows(folder: str) -> list[dict]:
    """The figures of runs/ (trained models) or ensembles/, presets first, then the search's configs."""
    return sorted((json.loads(p.read_text()) for p in (OUT / folder).glob("*.json")),
                  key=lambda r: (r["preset"] not in PRESET_NAMES + ["ensemble"], r["preset"].startswith("rerun"),
                                 r["preset"], not r["center"], r["seed"]))


def presets_of(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["preset"] for r in runs))


def label(config: str) -> str:
    """How a row's config reads in the report: a preset, one of the search's top configs, or their ensemble."""
    if config == "ensemble":
        return "ensemble of the search's top 3"
    if config.startswith("search"):
        return f"search's config #{config.removeprefix('search')}"
    if config.startswith("rerun"):
        return "second search's best config"
    return f"preset `{config}`"


def results_table(runs: list[dict], mode: str, teacher: str) -> tuple[list[str], list[str]]:
    """One space's rows (each config's mean ± sd over seeds, then the baselines) and a verdict per config: against
    the baselines, and (the search's) against the default preset. `runs`: trained runs first, then ensembles."""
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
        lines.append(f"| cube, {label(preset)} | {', '.join(str(r['seed']) for r in ours)} | " + " | ".join(
            spread([r["table"][teacher]["model"][m] for r in ours], 4 if m == "mrr" else 3) for m in METRICS) + " |")
        beaten = [b.replace("_", " ") for b in BASELINES if min(mrr) > base[b]["mrr"]]
        verdict = (f"{teacher} {mode}, {label(preset)}: MRR {spread(mrr, 4)} against the best baseline, "
                   f"{best.replace('_', ' ')}, {base[best]['mrr']:.4f} ({min(mrr) - base[best]['mrr']:+.5f} for "
                   f"the worst seed). Beaten on every seed: {', '.join(beaten) or 'none'}.")
        default = [r["table"][teacher]["model"]["mrr"] for r in mine if r["preset"] == "default"]
        if preset not in PRESET_NAMES and default:
            verdict += (f" Against the default preset ({spread(default, 4)}): "
                        f"{statistics.mean(mrr) - statistics.mean(default):+.4f} in the mean, "
                        + ("better on every seed." if min(mrr) > max(default) else
                           "worse on every seed." if max(mrr) < min(default) else "the seeds overlap."))
        verdicts.append(verdict)
    lines += [f"| {b.replace('_', ' ')} | | " + " | ".join(f"{base[b][m]:.{4 if m == 'mrr' else 3}f}" for m in METRICS)
              + " |" for b in BASELINES]
    return lines + [""] + [line for v in verdicts for line in (v, "")], verdicts


def criteria_lines(runs: list[dict]) -> list[str]:
    teachers = list(runs[0]["table"])
    lines = ["| run | " + " | ".join(f"reconstruction cosine ({t})" for t in teachers) + " | cross-teacher share | "
             "residual mix | E[steps] at the best epoch (train) | "
             + " | ".join(f"steps on dev ({t})" for t in teachers) + " |", "|---|" + "---|" * (2 * len(teachers) + 3)]
    for r in runs:
        best = max(r["history"], key=lambda h: h["eval"])
        shares = [f"{t.split('/')[1]} → {u} {c['value']:.2f}" for u in teachers
                  for t, c in r["table"][u]["criteria"].items() if t.startswith("cross_teacher_share/")]
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r['table'][t]['criteria']['reconstruction_cos']['value']:.3f}" for t in teachers)
            + f" | {', '.join(shares) or 'n/a'} | " + ", ".join(f"{t} {m:.1f}" for t, m in r["mix"].items())
            + f" | {best['expected_steps']:.2f} of {r['config']['cube']['min_steps']}-{r['config']['cube']['max_steps']} | "
            + " | ".join(f"{r['table'][t]['model']['steps']:.2f}" for t in teachers) + " |")
    return lines


def plots(runs: list[dict], ensembles: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cube_ray.baselines import BASELINES

    teachers = list(runs[0]["table"])
    panels = [(mode, t) for mode in MODES.values() for t in teachers if any(MODES[r["center"]] == mode for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.8), squeeze=False)
    for ax, (mode, teacher) in zip(axes[0], panels):
        mine = [r for r in runs + ensembles if MODES[r["center"]] == mode]
        configs = presets_of(mine)
        mrr = [[r["table"][teacher]["model"]["mrr"] for r in mine if r["preset"] == c] for c in configs]
        values = [statistics.mean(m) for m in mrr] + [mine[0]["table"][teacher][b]["mrr"] for b in BASELINES]
        errors = [statistics.stdev(m) if len(m) > 1 else 0 for m in mrr] + [0] * len(BASELINES)
        bars = ax.bar(configs + [b.replace("_", " ") for b in BASELINES], values, yerr=errors, capsize=4,
                      color=[plt.cm.Blues(0.9 - 0.6 * i / len(configs)) for i in range(len(configs))]
                      + ["tab:grey", "tab:orange", "tab:green", "tab:red"])
        ax.bar_label(bars, fmt="%.4f", fontsize=6, rotation=90, label_type="center")  # MiniLM's differences are small
        ax.set_title(f"{teacher}, {mode}", fontsize=10)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_ylabel("MRR on SQuAD dev")
    fig.tight_layout()
    fig.savefig(OUT / "mrr.png", dpi=120)
    colour = {c: f"C{i}" for i, c in enumerate(presets_of(runs))}
    fig, axes = plt.subplots(1, len(teachers), figsize=(6 * len(teachers), 4.5), squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        for r in runs:
            ax.plot([h["epoch"] for h in r["history"]], [h[f"{teacher}/mrr"] for h in r["history"]], lw=1,
                    color=colour[r["preset"]], marker="os^"[r["seed"] % 3], ls="-" if r["center"] else "--",
                    label=r["name"])
        ax.set(xlabel="epoch", ylabel="val MRR (after the residual mix)", title=teacher)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(OUT / "curves.png", dpi=120)
    plt.close("all")


def report() -> Path:
    from cube_ray.criteria import THRESHOLDS

    data, runs, ensembles = json.loads((OUT / "data.json").read_text()), load_rows("runs"), load_rows("ensembles")
    teachers = list(data["teachers"])
    plots(runs, ensembles)
    epochs = {"search1": "--max-epochs"} | {r["preset"]: r["config"]["epochs"] for r in runs}
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
    lines += ["", "## The presets and the search's configs against the baselines on SQuAD dev", "",
              "Each preset of `cube_ray/train/presets/` as it ships (`default`: the cube with InfoNCE alone on batches of "
              "256 and a linear path beside the cube; `cosine`, the default before this study: cosine to the gold "
              f"answer plus InfoNCE at 0.5 on batches of 64), for {epochs['default']} epochs; the search's 3 best configs "
              f"(ranked on val; search below), retrained as the search trained them ({epochs['search1']} epochs); and their ensemble (the 3 runs of one "
              "seed and centring, predictions averaged in each teacher space: `cube_ray.ensemble`). Residual mix and "
              "epoch picked on val, one multi-teacher student per run (a row in each teacher space), "
              "with every teacher's train mean subtracted from inputs, targets, pool and baselines (centred) or not "
              f"(raw). Cube: mean ± sd over seeds; pool: dev's de-duplicated answers ({runs[0]['held_out_pairs']:,} "
              "queries). cos is the mean cosine of each prediction to its gold answer in the row's space; in the raw rows "
              "it is the plan's Q→A cosine (its headline: 38.5 %), where a constant, the mean answer, scores 0.80 in "
              "SmolLM2 space: retrieval is what counts.", ""]
    verdicts = []
    for mode in MODES.values():
        for teacher in teachers:
            table, found = results_table(runs + ensembles, mode, teacher)
            lines += table
            verdicts += found
    lines += ["![MRR per teacher space](mrr.png)", "", "## The plan's criteria, residual mix and halting", "",
              f"Reconstruction cosine (threshold {THRESHOLDS['reconstruction_cos']}) on dev's questions and answers; the "
              f"cross-teacher share (threshold {THRESHOLDS['cross_teacher_share']}; fused students only): MRR from the "
              "other teacher's questions over identity's. Residual mix: the share of "
              "the cube's change each teacher space keeps, picked on val at the best epoch. E[steps]: the halting "
              "distribution's expectation in training; steps on dev: what the gate ran.", ""]
    lines += criteria_lines(runs)
    lines += ["", "Cost: " + ", ".join(f"{r['name']} {r['fit_seconds'] / 60:.1f} min ({len(r['history'])} epochs)"
                                       for r in runs) + ".", "", "![val learning curves](curves.png)", "",
              "## The search (stage247)", ""] + search_lines("search") + learned_lines("search")
    lines += ["## The search again (seed 1)", ""] + search_lines("search_rerun") \
        + learned_lines("search_rerun") + ["## Conclusions", ""] + [f"- {v}" for v in verdicts] + [""]
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
        data = data_step(args)
        train_runs(args, data, {name: preset(name) for name in args.presets}, [(args.presets, BOTH)])
        searched = searched_configs(search_step(args))
        # the search's Ray session ended with it, and the prepared data's shards with it: prepare again (cached)
        best, others = list(searched)[:1], list(searched)[1:]  # the best first; the others' centred runs (as searched) next
        train_runs(args, data_step(args), searched, [(best, BOTH), (others, (True,)), (others, (False,))])
        ensemble_runs(args, list(searched))
        rerun = searched_configs(search_step(args, RERUN, "search_rerun", RERUN_SEED), prefix="rerun")
        train_runs(args, data_step(args), rerun, [(list(rerun)[:1], BOTH)])  # its best config
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
