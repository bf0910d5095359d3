"""The search report: `python -m cube_ray.report EXP_DIR` (re)builds it from the experiment folder alone.

Writes beside the experiment: report.md (leaderboard, best config, held-out table of the best checkpoint against
identity / mean answer / ridge on the same split, search cost), best_config.yaml, best_checkpoint (a text file
holding the path), report.json (every figure), and plots: history.png (search history), importance.png
(Optuna's parameter importance), curves.png (learning curves of the top trials).

It reads only files: each trial folder's trial.json (sampled values), latest/ (its TrainState holds the per-epoch
metrics), config.yaml (the trial's TrainConfig), finished.json (the trial's training ran to its end) and best_eval/ (its best checkpoint). No Ray is needed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from cube_ray.checkpoint import load_checkpoint
from cube_ray.config import SearchConfig, TrainConfig, load_yaml, save_yaml
from cube_ray.fsutil import atomic_write_text

log = logging.getLogger("cube_ray.report")
TOP = 10  # leaderboard rows
# Below this many scored trials fANOVA's shares are noise (two trials differ in every parameter at once): the
# report still shows them, marked as such, so nobody reads "what mattered" into a handful of trials.
FEW_TRIALS = 10
CURVES = 5  # trials in the learning-curve plot


@dataclasses.dataclass
class Trial:
    id: str
    dir: Path
    params: dict  # the sampled values, flat "a/b" names
    config: TrainConfig
    history: list[dict]  # one row of metrics per epoch
    status: str  # complete | early stop | stopped by ASHA | time budget | error | unfinished

    @property
    def best(self) -> dict:
        return max(self.history, key=lambda r: r["eval"]) if self.history else {}

    @property
    def score(self) -> float:
        return self.best.get("eval", -math.inf)

    @property
    def seconds(self) -> float:
        return self.history[-1].get("time_s", 0.0) if self.history else 0.0

    @property
    def cpus(self) -> int:
        return self.config.workers * self.config.cpus_per_worker


def load_trials(exp: Path, budget: bool = False) -> list[Trial]:
    from cube_ray.tune.runner import ASHA_STOPPED, TRIAL

    asha_stopped = set(json.loads((exp / ASHA_STOPPED).read_text())) if (exp / ASHA_STOPPED).exists() else set()
    trials = []
    for folder in sorted(p.parent for p in exp.glob(f"*/{TRIAL}")):
        if not (folder / "config.yaml").exists():  # the trial failed before training started
            continue
        # The history travels in the checkpoint's TrainState: complete across restarts, unlike Tune's result.json,
        # which a killed driver may never have synced.
        history = load_checkpoint(folder / "latest").state["train_state"]["history"] if (folder / "latest").exists() else []
        config = load_yaml(TrainConfig, folder / "config.yaml")
        trial_id = folder.name.removeprefix("trial_")
        trials.append(Trial(trial_id, folder, json.loads((folder / TRIAL).read_text()),
                            config, history, _status(folder, config, history, trial_id in asha_stopped, budget)))
    return trials


def _status(folder: Path, config: TrainConfig, history: list[dict], asha_stopped: bool, budget: bool) -> str:
    from cube_ray.tune.runner import FINISHED

    if (folder / FINISHED).exists():
        return "early stop" if json.loads((folder / FINISHED).read_text())["stopped"] else "complete"
    if history and history[-1]["epoch"] >= config.epochs:
        return "complete"  # stopped by the scheduler at its last epoch
    if asha_stopped:
        return "stopped by ASHA"
    if (folder / "error.txt").exists():
        return "error"
    # Tune stops whatever still runs when the budget is spent (even before its first epoch)
    return "time budget" if budget else "unfinished"


def importance(trials: list[Trial], search: SearchConfig) -> dict[str, float]:
    """Optuna's parameter importance (fANOVA) over the trials' best eval, on a study rebuilt from the trials."""
    import optuna

    from cube_ray.tune.space import load_space

    dists = {p.name: p.distribution() for p in load_space(search.space).params}
    scored = [t for t in trials if t.history]
    if len(scored) < 2:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in scored:
        params = {k: v for k, v in t.params.items() if k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=t.score))
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=search.seed)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError) as e:  # e.g. every trial scored the same
        log.warning("parameter importance unavailable: %s", e)
        return {}


def held_out(best: Trial, seed: int) -> dict:
    """The best checkpoint against the baselines on its own held-out split (evaluate's table)."""
    import torch

    from cube_ray.evaluate import comparison
    from cube_ray.train.snapshot import load_for_eval

    torch.use_deterministic_algorithms(True)
    loaded = load_for_eval(best.dir / "best_eval")
    return {"pairs": len(loaded.held_out), "picked_on": loaded.picked_on,
            "table": comparison(loaded.student, loaded.train, loaded.held_out, seed=seed)}


def plots(exp: Path, trials: list[Trial], imp: dict[str, float], metric: str) -> list[str]:
    import matplotlib

    from cube_ray.tune.runner import TRIAL

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    scored = [t for t in trials if t.history]
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"complete": "tab:blue", "early stop": "tab:green", "stopped by ASHA": "tab:orange",
               "time budget": "tab:grey", "error": "tab:red"}
    order = sorted(scored, key=lambda t: (t.dir / TRIAL).stat().st_mtime)
    for status, colour in colours.items():
        pts = [(i + 1, t.score) for i, t in enumerate(order) if t.status == status]
        if pts:
            ax.scatter(*zip(*pts), c=colour, label=status)
    running = [max(t.score for t in order[: i + 1]) for i in range(len(order))]
    ax.step(range(1, len(order) + 1), running, where="post", c="k", lw=1, label="best so far")
    ax.set(xlabel="trial (in start order)", ylabel=f"best eval {metric}", title="search history")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(exp / "history.png", dpi=120)
    made.append("history.png")
    if imp:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(imp))))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        few = " - too few trials: noise" if len(scored) < FEW_TRIALS else ""
        ax.set(xlabel="importance (fANOVA, share of variance)", title=f"parameter importance ({len(scored)} trials{few})")
        fig.tight_layout()
        fig.savefig(exp / "importance.png", dpi=120)
        made.append("importance.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in sorted(scored, key=lambda t: -t.score)[:CURVES]:
        ax.plot([r["epoch"] for r in t.history], [r["eval"] for r in t.history], marker="o", label=t.id)
    ax.set(xlabel="epoch", ylabel=f"eval {metric}", title=f"learning curves, top {CURVES} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(exp / "curves.png", dpi=120)
    made.append("curves.png")
    plt.close("all")
    return made


def cost(exp: Path, trials: list[Trial]) -> dict:
    sessions = json.loads((exp / "sessions.json").read_text()) if (exp / "sessions.json").exists() else []
    return {"trials": len(trials), "stopped_by_asha": sum(t.status == "stopped by ASHA" for t in trials),
            "time_budget": sum(t.status == "time budget" for t in trials),
            "early_stop": sum(t.status == "early stop" for t in trials),
            "complete": sum(t.status == "complete" for t in trials), "errors": sum(t.status == "error" for t in trials),
            "unfinished": sum(t.status == "unfinished" for t in trials),
            "epochs": sum(len(t.history) for t in trials),
            "cpu_hours": sum(t.seconds * t.cpus for t in trials) / 3600, "wall_s": sum(sessions), "sessions": len(sessions)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def build_report(exp: str | Path) -> Path:
    """Write report.md and its companions into the experiment folder; returns the report's path."""
    from cube_ray.evaluate import ROWS

    exp = Path(exp).resolve()
    search = load_yaml(SearchConfig, exp / "search.yaml")
    trials = load_trials(exp, budget=bool(search.time_budget_s))
    scored = sorted([t for t in trials if t.history], key=lambda t: -t.score)
    if not scored:
        raise RuntimeError(f"{exp}: no trial reported a result yet; nothing to report")
    imp = importance(trials, search)
    keys = list(imp)[:5] or [k for k in scored[0].params][:5]
    metric = scored[0].config.eval_metric
    best = next(t for t in scored if (t.dir / "best_eval").exists())
    table = held_out(best, search.seed)
    figures = cost(exp, trials)
    made = plots(exp, trials, imp, metric)
    save_yaml(best.config, exp / "best_config.yaml")
    atomic_write_text(exp / "best_checkpoint", f"{best.dir / 'best_eval'}\n")

    teachers = best.config.teachers
    selection = table["picked_on"]
    lines = [f"# Search report: {exp.name}", "",
             f"Space `{search.space}`, {figures['trials']} trials, Optuna TPE (seed {search.seed}) + ASHA on the "
             f"{selection} split's {metric.upper()} (`eval`, mean over teachers {', '.join(teachers)}), epochs as the "
             f"time attribute (grace {search.grace_period}, reduction factor {search.reduction_factor}"
             + (f", at most {search.max_epochs} epochs per trial" if search.max_epochs else "") + "). "
             + ("The held-out table below is on the eval split, which picked nothing. " if selection != "eval" else
                "Models were picked on the eval split itself (no --val-fraction), so its figures below are optimistic. ") +
             f"Rebuild: `python -m cube_ray.report {exp}`.", "",
             "## Leaderboard", "",
             "| # | trial | eval | " + " | ".join(f"{t} MRR" for t in teachers) + " | best epoch / run / planned | status "
             "| E[steps] | minutes | " + " | ".join(f"`{k}`" for k in keys) + " |",
             "|" + "---|" * (7 + len(teachers) + len(keys))]
    for rank, t in enumerate(scored[:TOP], start=1):
        b = t.best
        lines.append(f"| {rank} | {t.id} | {t.score:.4f} | " + " | ".join(f"{b.get(f'{x}/mrr', math.nan):.4f}" for x in teachers)
                     + f" | {b['epoch']} / {len(t.history)} / {t.config.epochs} | {t.status} | {b.get('expected_steps', math.nan):.2f} "
                     f"| {t.seconds / 60:.1f} | " + " | ".join(_fmt(t.params.get(k, "–")) for k in keys) + " |")
    lines += ["", "## Best trial", "",
              f"Trial `{best.id}`: best eval {best.score:.4f} at epoch {best.best['epoch']}, expected halting steps "
              f"{best.best.get('expected_steps', math.nan):.2f} of max {best.config.cube.max_steps}.",
              f"Checkpoint: `{best.dir / 'best_eval'}` (also in `best_checkpoint`); config: `best_config.yaml`.", "",
              "Sampled parameters:", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in best.params.items()]
    lines += ["", f"## Held-out: best checkpoint against baselines ({table['pairs']} pairs, same split)", ""]
    for teacher, rows in table["table"].items():
        lines += [f"**{teacher}** (centred: {'yes' if best.config.center else 'no'})", "",
                  "| row | cos | R@1 | R@5 | MRR |", "|---|---|---|---|---|"]
        lines += [f"| {r} | {rows[r]['cos']:.3f} | {rows[r]['r1']:.3f} | {rows[r]['r5']:.3f} | {rows[r]['mrr']:.3f} |" for r in ROWS]
        beats = rows["model"]["mrr"] > rows["ridge"]["mrr"]
        lines += ["", f"The cube {'beats' if beats else 'does **not** beat'} ridge regression on MRR "
                  f"({rows['model']['mrr']:.3f} vs {rows['ridge']['mrr']:.3f})"
                  + ("" if rows["model"]["mrr"] > rows["identity"]["mrr"] else
                     f", and does not beat identity ({rows['identity']['mrr']:.3f})") + ".", ""]
    lines += ["## Search cost", "",
              f"- trials: {figures['trials']} ({figures['complete']} ran all their epochs, {figures['early_stop']} "
              f"stopped by their own early stopping, {figures['stopped_by_asha']} stopped early by ASHA, "
              f"{figures['time_budget']} cut by the time budget, {figures['errors']} failed, "
              f"{figures['unfinished']} unfinished)",
              f"- epochs trained: {figures['epochs']}; CPU-hours: {figures['cpu_hours']:.3f} (trial time x CPUs)",
              f"- wall time: {figures['wall_s'] / 60:.1f} min over {figures['sessions']} driver session(s), "
              "data preparation and extraction included", "",
              "## Plots", ""] + [f"![{m}]({m})" for m in made]
    if imp:
        lines += ["", "Parameter importance: " + ", ".join(f"`{k}` {v:.2f}" for k, v in list(imp.items())[:8])
                  + (f" (from {len(scored)} scored trials, fewer than {FEW_TRIALS}: these shares are noise, not evidence "
                     "of what matters)" if len(scored) < FEW_TRIALS else "")]
    report = exp / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_text(exp / "report.json", json.dumps({
        "cost": figures, "importance": imp, "best": {"trial": best.id, "eval": best.score, "params": best.params,
                                                     "checkpoint": str(best.dir / "best_eval"), "epoch": best.best["epoch"]},
        "held_out": table, "trials": [{"id": t.id, "status": t.status, "eval": t.score if t.history else None,
                                       "epochs": len(t.history), "params": t.params} for t in trials]}, indent=1, default=str))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cube_ray.report", description="Rebuild a search's report.")
    p.add_argument("experiment", help="the experiment folder (e.g. results/stage247-20261123-101500)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(build_report(args.experiment))
    return 0


if __name__ == "__main__":
    sys.exit(main())
