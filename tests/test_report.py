from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cube_ray.config import TrainConfig
from cube_ray.report import FEW_TRIALS, importance
from cube_ray.trials import Trial

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "fusion": CategoricalDistribution(["none", "concat"])}


GRACE = 1024


def search(runs: list[tuple[TrialState, float, float | None]], staged: int = 0) -> tuple[optuna.Study, list[Trial]]:
    """A study and its trials, run i sampling `lr` from i % 10 and `fusion` from i % 2: (state, the score its
    checkpoint holds at ASHA's first rung, the value the study holds). The study holds no rounds: a stopped trial's
    first rung may never have reached it. The first `staged` trials report a round in their first stage (no samples
    of the task yet, scored 0) before the rung."""
    study, trials = optuna.create_study(direction="maximize"), []
    for i, (state, at_rung, value) in enumerate(runs):
        params = {"lr": 1e-4 * 1.5 ** (i % 10), "fusion": ["none", "concat"][i % 2]}
        study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=state, value=value))
        first_stage = [{"samples_seen": GRACE, "task_samples": 0, "round_eval": 0.0}] if i < staged else []
        rung = {"samples_seen": GRACE + len(first_stage) * GRACE, "task_samples": GRACE, "round_eval": at_rung}
        trials.append(Trial(str(i), i, Path("."), params, TrainConfig(), history=[], status="",
                            rounds=first_stage + [rung]))
    return study, trials


@pytest.mark.parametrize("staged", [0, 12])
def test_with_few_complete_trials_importance_rests_on_every_trials_first_rung(staged):
    """ASHA stopped most trials: 2 complete ones say nothing, the first rung of all 24 does. There only `fusion`
    moves the score, so it takes nearly all the variance; half the trials being staged changes nothing: their rung
    is their first round of the task, not the first stage's rounds (scored 0 here, on every other `lr`)."""
    runs = [(TrialState.PRUNED, 0.60 + 0.02 * (i % 2), None) for i in range(22)]
    runs += [(TrialState.COMPLETE, 0.60 + 0.02 * (i % 2), 0.5) for i in (22, 23)]
    imp, n, basis = importance(*search(runs, staged), grace=GRACE, seed=0)
    assert (n, basis) == (24, "first rung")
    assert imp["fusion"] > 0.9 > imp["lr"]


def test_trials_that_never_reached_the_first_rung_are_left_out():
    study, trials = search([(TrialState.PRUNED, 0.60 + 0.02 * (i % 2), None) for i in range(12)])
    for t in trials[:3]:  # cut inside their first stage
        t.rounds = [{"samples_seen": 4 * GRACE, "task_samples": 0, "round_eval": 0.9}]
    assert importance(study, trials, grace=GRACE, seed=0)[1] == 9


def test_rounds_saved_without_the_task_count_count_every_sample():
    trial = search([(TrialState.PRUNED, 0.6, None)])[1][0]
    trial.rounds = [{"samples_seen": s, "round_eval": s / 1e4} for s in (512, 1024, 1536)]
    assert trial.first_rung(GRACE)["round_eval"] == 0.1024 and trial.first_rung(4096) is None


def test_with_enough_complete_trials_importance_rests_on_their_values():
    """Their values (here set by `lr`), not their first rungs (set by `fusion`); pruned trials are left out."""
    runs = [(TrialState.COMPLETE, 0.60 + 0.02 * (i % 2), 0.1 * (i % 10)) for i in range(FEW_TRIALS)]
    imp, n, basis = importance(*search(runs + [(TrialState.PRUNED, 0.0, None)] * 5), grace=GRACE, seed=0)
    assert (n, basis) == (FEW_TRIALS, "complete")
    assert imp["lr"] > 0.9 > imp["fusion"]


@pytest.mark.parametrize("states", [[], [TrialState.COMPLETE]])
def test_fewer_than_two_trials_give_no_importance(states):
    assert importance(*search([(s, 0.6, 0.6) for s in states]), grace=GRACE, seed=0)[0] == {}
