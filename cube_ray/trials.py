"""A search experiment's trials, read from its folder alone (no Ray): what the report and the ensemble rank.

Each trial comes from the experiment's Optuna study (`study.journal`: state, sampled values, proposal and end
times), joined with its folder: latest/ (its TrainState holds the per-epoch metrics and the rounds), config.yaml
(the trial's TrainConfig), finished.json (its training ran to its end) and best_eval/ (its best checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from cube_ray.checkpoint import load_checkpoint
from cube_ray.config import TrainConfig, load_yaml
from cube_ray.experiment import ASHA_STOPPED, BASE_PRESET, CONTINUED_FROM, COST_STEP, FINISHED, TASK_STEP, TRIAL_ID, load_study

STATUS_ORDER = ("complete", "early stop", "stopped by ASHA", "time budget", "unfinished", "error")


def first_rung(rounds: list[dict], grace: float, clock: str = "samples") -> dict | None:
    """The round ASHA first judged a trial at: the first whose clock reaches the grace period: on the samples clock
    its samples of the task (TASK_STEP; a staged trial's count starts with its last stage), on the cost clock its
    training seconds (COST_STEP, the step it was about to take included). None where the trial never got there. Rounds saved without the task's count (older
    checkpoints, older trials.json) count every sample."""
    if clock == "cost":
        return next((r for r in rounds if r.get(COST_STEP, r.get("time_s", 0.0)) >= grace), None)
    return next((r for r in rounds if r.get(TASK_STEP, r["samples_seen"]) >= grace), None)


@dataclasses.dataclass
class Trial:
    id: str
    number: int  # Optuna's trial number: the order the sampler proposed it
    dir: Path
    params: dict  # the sampled values, flat "a/b" names (list choices as JSON text, as Optuna stores them)
    config: TrainConfig
    history: list[dict]  # one row of metrics per epoch (whole picking split)
    rounds: list[dict]  # one row per round (samples_seen, TASK_STEP, round_eval on the fixed slice, time_s)
    status: str  # one of STATUS_ORDER
    base_preset: bool = False  # the enqueued base-preset trial
    proposed_at: float | None = None  # when Optuna proposed it (seconds since the epoch)
    ended_at: float | None = None  # when Optuna was told its end

    @property
    def best(self) -> dict:
        return max(self.history, key=lambda r: r["eval"]) if self.history else {}

    @property
    def score(self) -> float:
        """The best whole-split score of any epoch (-inf for a trial stopped inside its first epoch)."""
        return self.best.get("eval", -math.inf)

    @property
    def round_score(self) -> float:
        """The last round's score on the fixed slice: what ASHA compared."""
        return self.rounds[-1]["round_eval"] if self.rounds else -math.inf

    def first_rung(self, grace: float, clock: str = "samples") -> dict | None:
        return first_rung(self.rounds, grace, clock)

    @property
    def samples(self) -> int:
        return int(self.rounds[-1]["samples_seen"]) if self.rounds else 0

    @property
    def seconds(self) -> float:
        return self.rounds[-1].get("time_s", 0.0) if self.rounds else 0.0

    @property
    def cpus(self) -> int:
        return self.config.workers * self.config.cpus_per_worker

    @property
    def rank_key(self) -> tuple:
        """Best first: a whole-split score beats any slice score, then the further-trained round score."""
        return (-self.score, -self.samples, -self.round_score)


def load_trials(exp: Path, budget: bool = False, study=None) -> list[Trial]:
    """This experiment's trials, from its Optuna study (trials copied by --continue-from are not its own)."""
    from optuna.trial import TrialState

    study = study or load_study(exp)
    if study is None:
        raise FileNotFoundError(f"{exp}: no Optuna study (study.journal); is this a search experiment folder?")
    asha_stopped = set(json.loads((exp / ASHA_STOPPED).read_text())) if (exp / ASHA_STOPPED).exists() else set()
    trials = []
    for ot in study.get_trials(deepcopy=False):
        folder = exp / f"trial_{ot.user_attrs.get(TRIAL_ID)}"
        if CONTINUED_FROM in ot.user_attrs or not (folder / "config.yaml").exists():  # failed before training started
            continue
        # The history travels in the checkpoint's TrainState: complete across restarts, unlike Tune's result.json,
        # which a killed driver may never have synced.
        state = load_checkpoint(folder / "latest").state["train_state"] if (folder / "latest").exists() else {}
        config = load_yaml(TrainConfig, folder / "config.yaml")
        trial_id = folder.name.removeprefix("trial_")
        status = {TrialState.FAIL: "error"}.get(ot.state) or _status(folder, config, state.get("history", []),
                                                                      ot.state == TrialState.PRUNED,
                                                                      trial_id in asha_stopped, budget)
        trials.append(Trial(trial_id, ot.number, folder, dict(ot.params), config, state.get("history", []),
                            state.get("rounds", []), status, bool(ot.user_attrs.get(BASE_PRESET)),
                            ot.datetime_start.timestamp() if ot.datetime_start else None,
                            ot.datetime_complete.timestamp() if ot.datetime_complete else None))
    return trials


def _status(folder: Path, config: TrainConfig, history: list[dict], pruned: bool, asha_stopped: bool,
            budget: bool) -> str:
    if (folder / FINISHED).exists():
        return "early stop" if json.loads((folder / FINISHED).read_text())["stopped"] else "complete"
    if history and history[-1]["epoch"] >= config.epochs:
        return "complete"  # it trained every epoch; the scheduler or the budget stopped it while it ended
    if asha_stopped:
        return "stopped by ASHA"
    if (folder / "error.txt").exists():
        return "error"
    # Tune stops whatever still runs when the budget is spent (even before its first round)
    return "time budget" if budget or pruned else "unfinished"


def ranked(trials: list[Trial]) -> list[Trial]:
    """The trials that reported, best first (by the picking split only: the held-out split chooses nothing)."""
    return sorted([t for t in trials if t.rounds], key=lambda t: t.rank_key)


def with_checkpoint(trials: list[Trial]) -> list[Trial]:
    """Those of `trials` that finished an epoch, so have a best checkpoint (best_eval/), in the same order."""
    return [t for t in trials if (t.dir / "best_eval").exists()]
