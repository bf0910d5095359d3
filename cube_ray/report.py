"""The search report: `python -m cube_ray.report EXP_DIR` (re)builds it from the experiment folder alone.

Writes beside the experiment: report.md (leaderboard, best trial against the base preset's trial, held-out table of
the best checkpoint and the top-3 ensemble (cube_ray/ensemble.py) against identity / mean answer / ridge / linear
adapter on the same split, search cost), best_config.yaml, best_checkpoint (a text file holding the path),
report.json (every figure), and plots: history.png (search history), importance.png (Optuna's parameter
importance), curves.png (round scores of the top trials).

The trials come from the experiment's Optuna study joined with their folders (cube_ray/trials.py). No Ray is needed.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from cube_ray.config import SearchConfig, load_yaml, save_yaml
from cube_ray.criteria import format_criteria
from cube_ray.ensemble import TOP as ENSEMBLE_TOP, ensemble_table
from cube_ray.experiment import CONTINUED_FROM, SEARCH, load_study
from cube_ray.fsutil import atomic_write_text
from cube_ray.trials import STATUS_ORDER, Trial, load_trials, ranked, with_checkpoint

log = logging.getLogger("cube_ray.report")
TOP = 10  # leaderboard rows
# Below this many scored trials fANOVA's shares are noise (two trials differ in every parameter at once): the
# report still shows them, marked as such, so nobody reads "what mattered" into a handful of trials.
FEW_TRIALS = 10
# What the importance rests on (cube_ray.report.importance), as the report says it
IMPORTANCE_BASIS = {"complete": "the {n} trials the study holds as complete",
                    "first rung": "the {n} trials that reached ASHA's first rung, too few being complete: each one's "
                                  "score on the picking split's slice there, after the same training seconds (cost "
                                  "clock) or samples of the task"}
CURVES = 5  # trials in the learning-curve plot


# The phases of a trial's wall time, from its stamps (train/timing.py) and Optuna's proposal and end times.
PHASES = {
    "proposed -> trial running (Tune scheduling, trial actor start)": lambda t, tr, w: tr["start"] - t.proposed_at,
    "trial running -> Train run asked for (config, folders)": lambda t, tr, w: tr["fit_start"] - tr["start"],
    # a worker process Ray started before the run (an idle pooled one) counts from the run's start
    "Train controller and worker group start -> worker process": lambda t, tr, w: max(0.0, w["process_start"] - tr["fit_start"]),
    "worker process -> training function (imports, Train worker setup)": lambda t, tr, w: w["start"] - max(w["process_start"], tr["fit_start"]),
    "worker setup: data (train shard hand-over, picking split)": lambda t, tr, w: w["data_done"] - w["start"],
    "worker setup: student, optimiser, resume": lambda t, tr, w: w["model_done"] - w["data_done"],
    "worker setup: cube kernel (built once per machine and shape, else loaded)":
        lambda t, tr, w: w["kernel_done"] - w["model_done"],
    "worker setup: batch probe": lambda t, tr, w: w["setup_done"] - w.get("kernel_done", w["model_done"]),
    "setup -> first report (training, scoring, checkpoint)": lambda t, tr, w: w["first_report"] - w["setup_done"],
    "scoring (rounds' slice and epochs' whole split)": lambda t, tr, w: w.get("score_s", 0.0),
    "checkpoints and reports": lambda t, tr, w: w.get("checkpoint_s", 0.0),
    "last report -> trial ended (stop, teardown)": lambda t, tr, w: t.ended_at - w["last_report"],
    "whole trial (proposed -> ended)": lambda t, tr, w: t.ended_at - t.proposed_at,
}


# How close the search runs to the machine: a trial's fixed cost, and its first rung's compute against its wall time
FIXED_COST = "fixed cost: trial running -> first sample (set-up)"
RUNG_COMPUTE = "first rung: the training it needs (steps only)"
RUNG_TOOK = "first rung: what it took (trial running -> its report)"


def first_rung_phases(grace: float, clock: str) -> dict:
    """The fixed cost and first-rung phases (seconds), from a trial's stamps and its rounds (each round carries its
    training seconds `time_s` and its wall-clock stamp `at`)."""
    return {FIXED_COST: lambda t, tr, w: w["setup_done"] - tr["start"],
            # spent so far (a round before a long step charges the clock with that step too)
            RUNG_COMPUTE: lambda t, tr, w: t.first_rung(grace, clock)["time_s"],
            RUNG_TOOK: lambda t, tr, w: t.first_rung(grace, clock)["at"] - tr["start"]}


def trial_cost(trials: list[Trial], grace: float = 0.0, clock: str = "samples") -> dict[str, dict[str, float]]:
    """Per phase of a trial's wall time: median, total and the trials measured (those with every stamp)."""
    import numpy as np

    from cube_ray.train.timing import read_timing

    out = {}
    for name, phase in {**first_rung_phases(grace, clock), **PHASES}.items():
        values = []
        for t in trials:
            timing = read_timing(t.dir)
            try:
                values.append(phase(t, timing["trial"], timing["worker"]))
            except (KeyError, TypeError):  # a stamp missing: killed before it, not a search trial, no rung reached
                continue
        if values:
            out[name] = {"median_s": float(np.median(values)), "total_s": float(np.sum(values)), "trials": len(values)}
    return out


def importance(study, trials: list[Trial], grace: float, seed: int, clock: str = "samples") -> tuple[dict[str, float], int, str]:
    """Optuna's parameter importance (fANOVA), how many trials it rests on, and on what (IMPORTANCE_BASIS): the
    study's complete trials (those --continue-from brought in included) on their value; or, where ASHA left fewer than
    FEW_TRIALS complete and more of `trials` (this experiment's, load_trials) reached ASHA's first rung (`grace` on
    the search's `clock`: training seconds, or samples of the task), each of those on its round there as its checkpoint holds it: its score on the picking
    split's fixed slice after the same samples of the task, the one look ASHA takes at every trial. (A staged trial's
    first round falls in its first stage, scored on a task it has not trained yet.)"""
    import optuna
    from optuna.trial import TrialState, create_trial

    basis, scored = "complete", study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    judged = [(t, rung) for t in trials if (rung := t.first_rung(grace, clock))]
    if len(scored) < FEW_TRIALS and len(judged) > len(scored):
        sampled = {ot.number: ot for ot in study.get_trials(deepcopy=False)}
        basis, scored = "first rung", [create_trial(params=sampled[t.number].params, value=rung["round_eval"],
                                                    distributions=sampled[t.number].distributions) for t, rung in judged]
    if len(scored) < 2:
        return {}, len(scored), basis
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = optuna.create_study(direction=study.direction)
    chosen.add_trials(scored)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        return dict(optuna.importance.get_param_importances(chosen, evaluator=evaluator)), len(scored), basis
    except (RuntimeError, ValueError) as e:  # e.g. every trial scored the same
        log.warning("parameter importance unavailable: %s", e)
        return {}, len(scored), basis


def held_out(trial: Trial, seed: int, with_baselines: bool = True) -> dict:
    """A trial's best checkpoint on its held-out split: against the baselines (evaluate's table), or the model's row
    alone (every trial of a search shares the data and its centring, so the baselines are the same for all)."""
    import torch

    from cube_ray.evaluate import comparison, student_metrics, with_criteria
    from cube_ray.train.snapshot import load_for_eval

    torch.use_deterministic_algorithms(True)
    loaded = load_for_eval(trial.dir / "best_eval")
    table = with_criteria(comparison(loaded.student, loaded.train, loaded.held_out, seed=seed), loaded) \
        if with_baselines else {t: {"model": m} for t, m in student_metrics(loaded.student, loaded.held_out).items()}
    return {"pairs": len(loaded.held_out), "picked_on": loaded.picked_on, "table": table}


def plots(exp: Path, trials: list[Trial], imp: dict[str, float], imp_trials: int, imp_basis: str,
          metric: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    order = sorted((t for t in trials if t.rounds), key=lambda t: t.number)
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = dict(zip(STATUS_ORDER, ("tab:blue", "tab:green", "tab:orange", "tab:grey", "tab:purple", "tab:red")))
    for status, colour in colours.items():
        pts = [(t.number, t.round_score) for t in order if t.status == status]
        if pts:
            ax.scatter(*zip(*pts), c=colour, label=status)
    running = [max(t.round_score for t in order[: i + 1]) for i in range(len(order))]
    ax.step([t.number for t in order], running, where="post", c="k", lw=1, label="best so far")
    ax.set(xlabel="trial (Optuna's number)", ylabel=f"last round {metric} (picking slice)", title="search history")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(exp / "history.png", dpi=120)
    made.append("history.png")
    if imp:
        fig, ax = plt.subplots(figsize=(7, max(2.5, 0.3 * len(imp))))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        few = " - too few trials: noise" if imp_trials < FEW_TRIALS else ""
        ax.set(xlabel="importance (fANOVA, share of variance)",
               title=f"parameter importance ({imp_trials} trials, {imp_basis}{few})")
        fig.tight_layout()
        fig.savefig(exp / "importance.png", dpi=120)
        made.append("importance.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in sorted(order, key=lambda t: t.rank_key)[:CURVES]:
        ax.plot([r["samples_seen"] for r in t.rounds], [r["round_eval"] for r in t.rounds], marker=".", label=t.id)
    ax.set(xlabel="training samples", ylabel=f"round {metric} (picking slice)", title=f"learning curves, top {CURVES} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(exp / "curves.png", dpi=120)
    made.append("curves.png")
    plt.close("all")
    return made


def cost(exp: Path, trials: list[Trial]) -> dict:
    sessions = json.loads((exp / "sessions.json").read_text()) if (exp / "sessions.json").exists() else []
    counts = {s: sum(t.status == s for t in trials) for s in STATUS_ORDER}
    return {"trials": len(trials), "complete": counts["complete"], "early_stop": counts["early stop"],
            "stopped_by_asha": counts["stopped by ASHA"], "time_budget": counts["time budget"],
            "errors": counts["error"], "unfinished": counts["unfinished"],
            "epochs": sum(len(t.history) for t in trials), "rounds": sum(len(t.rounds) for t in trials),
            "samples": sum(t.samples for t in trials),
            "cpu_hours": sum(t.seconds * t.cpus for t in trials) / 3600, "wall_s": sum(sessions), "sessions": len(sessions)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _score(v: float) -> str:
    return f"{v:.4f}" if math.isfinite(v) else "–"  # a trial stopped inside its first epoch has no whole-split score


def round_schedule(cfg, clock: str) -> str:
    """When a trial's rounds came, in words: on the cost clock every so many training seconds or at the rungs."""
    if clock != "cost":
        return f"every round of {cfg.report_every_samples} training samples"
    every, growth = cfg.report_every_s, cfg.report_growth
    if growth == 1:
        return f"every round of {every:g} training seconds"
    return f"a round at each rung ({', '.join(f'{every * growth ** k:g}' for k in range(3))} ... training seconds)"


def _leaderboard(scored: list[Trial], keys: list[str], teachers: list[str]) -> list[str]:
    lines = ["| # | trial | eval (whole split) | last round (slice) | " + " | ".join(f"{t} MRR" for t in teachers)
             + " | samples | best epoch / run / budget | status | E[steps] | minutes | "
             + " | ".join(f"`{k}`" for k in keys) + " |", "|" + "---|" * (10 + len(teachers) + len(keys))]
    for rank, t in enumerate(scored[:TOP], start=1):
        b = t.best
        lines.append(f"| {rank} | {t.id}{' (base preset)' if t.base_preset else ''} | {_score(t.score)} | {_score(t.round_score)} | "
                     + " | ".join(f"{b.get(f'{x}/mrr', math.nan):.4f}" for x in teachers)
                     + f" | {t.samples} | {b.get('epoch', '–')} / {len(t.history)} / {t.config.epochs} | {t.status} "
                     f"| {b.get('expected_steps', math.nan):.2f} | {t.seconds / 60:.1f} | "
                     + " | ".join(_fmt(t.params.get(k, "–")) for k in keys) + " |")
    return lines


def _held_out_tables(table: dict, base_table: dict | None, base: Trial | None, ensemble: dict | None,
                     center: bool) -> list[str]:
    from cube_ray.evaluate import ROWS, best_baseline

    lines = []
    for teacher, rows in table["table"].items():
        lines += [f"**{teacher}** (centred: {'yes' if center else 'no'})", "",
                  "| row | cos | R@1 | R@5 | MRR |", "|---|---|---|---|---|"]
        shown = [("best trial", rows["model"])] \
            + ([(f"top-{len(ensemble['members'])} ensemble", ensemble["table"][teacher]["ensemble"])] if ensemble else []) \
            + ([(f"base preset (trial {base.id})", base_table["table"][teacher]["model"])] if base_table else []) \
            + [(r, rows[r]) for r in ROWS if r != "model"]
        lines += [f"| {name} | {r['cos']:.3f} | {r['r1']:.3f} | {r['r5']:.3f} | {r['mrr']:.3f} |" for name, r in shown]
        model, strongest = rows["model"]["mrr"], best_baseline(rows)
        verdict = [f"The best trial {'beats' if model > rows[strongest]['mrr'] else 'does **not** beat'} every "
                   f"baseline on MRR (the best is {strongest}: {model:.3f} vs {rows[strongest]['mrr']:.3f})"]
        if base_table:
            b = base_table["table"][teacher]["model"]["mrr"]
            verdict.append(f"it {'beats' if model > b else 'does **not** beat'} the base preset's trial ({b:.3f})")
        lines += ["", "; ".join(verdict) + ".", ""]
    return lines


def build_report(exp: str | Path) -> Path:
    """Write report.md and its companions into the experiment folder; returns the report's path."""
    exp = Path(exp).resolve()
    search = load_yaml(SearchConfig, exp / SEARCH)
    study = load_study(exp)  # read once: the trials, their importance and what --continue-from brought in
    trials = load_trials(exp, budget=bool(search.time_budget_s), study=study)
    scored = ranked(trials)
    if not scored:
        raise RuntimeError(f"{exp}: no trial reported a result yet; nothing to report")
    clock = search.asha_clock or "samples"  # searches saved before the cost clock counted samples
    grace, factor = (search.grace_s if clock == "cost" else search.grace_samples), search.reduction_factor
    imp, imp_trials, imp_basis = importance(study, trials, grace or 0, search.seed, clock)
    keys = list(imp)[:5] or [k for k in scored[0].params][:5]
    metric = scored[0].config.eval_metric
    candidates = with_checkpoint(scored)
    if not candidates:
        raise RuntimeError(f"{exp}: no trial finished an epoch (no best_eval/ checkpoint); nothing to evaluate")
    best = candidates[0]
    base = next((t for t in candidates if t.base_preset), None)
    table = held_out(best, search.seed)
    base_table = held_out(base, search.seed, with_baselines=False) if base is not None and base is not best else None
    # the best trials' predictions averaged; the members share the baselines above
    ensemble = ensemble_table([t.dir / "best_eval" for t in candidates[:ENSEMBLE_TOP]], seed=search.seed,
                              with_baselines=False) if len(candidates) > 1 else None
    figures = cost(exp, trials)
    phases = trial_cost(trials, grace or 0, clock)
    made = plots(exp, trials, imp, imp_trials, imp_basis, metric)
    save_yaml(best.config, exp / "best_config.yaml")
    atomic_write_text(exp / "best_checkpoint", f"{best.dir / 'best_eval'}\n")
    known = sum(CONTINUED_FROM in t.user_attrs for t in study.get_trials(deepcopy=False))

    teachers = best.config.teachers
    selection = table["picked_on"]
    lines = [f"# Search report: {exp.name}", "",
             f"Space `{search.space}`, {figures['trials']} trials, Optuna TPE (seed {search.seed}) + ASHA on the "
             f"{selection} split's {metric.upper()} (mean over teachers {', '.join(teachers)}): "
             + round_schedule(best.config, clock) + " scores a fixed slice of it (`round_eval`, "
             "what ASHA compares, rungs in " + ("training seconds" if clock == "cost" else "samples of the task")
             + (f": grace {grace:g}" if grace else "") + (f", factor {factor}" if factor else "")
             + f"), every epoch's end the whole split (`eval`, which picks checkpoints); {best.config.epochs} epochs at "
             "most per trial. "
             + (f"The sampler started knowing {known} finished trials of `{search.continue_from}`. " if known else "")
             + ("The held-out table below is on the eval split, which picked nothing. " if selection != "eval" else
                "Models were picked on the eval split itself (no --val-fraction), so its figures below are optimistic. ") +
             f"Study: `optuna-dashboard {exp / 'study.journal'}`. Rebuild: `python -m cube_ray.report {exp}`.", "",
             "## Leaderboard", ""] + _leaderboard(scored, keys, teachers)
    lines += ["", "## Best trial", "",
              f"Trial `{best.id}`: best eval {best.score:.4f} at epoch {best.best['epoch']}, expected halting steps "
              f"{best.best.get('expected_steps', math.nan):.2f} of max {best.config.cube.max_steps}"
              + (f"; the base preset's trial `{base.id}` scored {base.score:.4f}" if base is not None and base is not best
                 else "; it is the base preset's trial" if best.base_preset else "") + ".",
              f"Checkpoint: `{best.dir / 'best_eval'}` (also in `best_checkpoint`); config: `best_config.yaml`.", "",
              "Sampled parameters:", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in best.params.items()]
    lines += ["", f"## Held-out: best checkpoint against the base preset and the baselines ({table['pairs']} pairs, same split)", ""]
    lines += _held_out_tables(table, base_table, base, ensemble, best.config.center)
    lines += ["### The plan's success criteria (best trial, held-out split)", ""]
    lines += format_criteria({t: rows["criteria"] for t, rows in table["table"].items()}) + [""]
    lines += ["## Search cost", "",
              f"- trials: {figures['trials']} ({figures['complete']} ran all their epochs, {figures['early_stop']} "
              f"stopped by their own early stopping, {figures['stopped_by_asha']} stopped early by ASHA, "
              f"{figures['time_budget']} cut by the time budget, {figures['errors']} failed, "
              f"{figures['unfinished']} unfinished)",
              f"- samples trained: {figures['samples']} in {figures['rounds']} rounds ({figures['epochs']} whole epochs); "
              f"CPU-hours: {figures['cpu_hours']:.3f} (trial time x CPUs)",
              f"- wall time: {figures['wall_s'] / 60:.1f} min over {figures['sessions']} driver session(s), "
              "data preparation and extraction included", "",
              "Where a trial's time goes (seconds; from each trial's `timing.json`, its rounds and the study's times). "
              f"The first three rows say how close the search runs to the machine: a trial's fixed cost before its "
              f"first sample, and the training its first rung needs against the wall time that rung took:", "",
              "| phase | median | total | trials |", "|---|---|---|---|"]
    lines += [f"| {name} | {p['median_s']:.1f} | {p['total_s']:.0f} | {p['trials']} |" for name, p in phases.items()]
    lines += ["", "## Plots", ""] + [f"![{m}]({m})" for m in made]
    if imp:
        lines += ["", "Parameter importance: " + ", ".join(f"`{k}` {v:.2f}" for k, v in list(imp.items())[:8])
                  + f" (fANOVA over {IMPORTANCE_BASIS[imp_basis].format(n=imp_trials)}"
                  + (f", fewer than {FEW_TRIALS}: these shares are noise, not evidence of what matters)"
                     if imp_trials < FEW_TRIALS else ")")]
    report = exp / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    atomic_write_text(exp / "report.json", json.dumps({
        "cost": figures, "trial_cost": phases, "importance": imp, "importance_basis": {"trials": imp_trials, "on": imp_basis},
        "best": {"trial": best.id, "eval": best.score, "params": best.params, "checkpoint": str(best.dir / "best_eval"),
                 "epoch": best.best["epoch"]},
        "base_preset": {"trial": base.id, "eval": base.score, "held_out": base_table or table} if base else None,
        "held_out": table, "ensemble": ensemble, "trials": [{"id": t.id, "number": t.number, "status": t.status,
                                       "eval": t.score if t.history else None, "round_eval": t.round_score if t.rounds else None,
                                       "samples": t.samples, "epochs": len(t.history), "params": t.params} for t in trials]},
        indent=1, default=str))
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
