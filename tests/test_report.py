from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from cube_ray.config import TrainConfig
from cube_ray.report import FEW_TRIALS, importance
from cube_ray.trials import Trial

DISTRIBUTIONS = {"lr": FloatDistribution(1e-4, 1e-2, log=True), "fusion": CategoricalDistribution(["none", "concat"])}


def search(runs: list[tuple[TrialState, float, float | None]]) -> tuple[optuna.Study, list[Trial]]:
    """A study and its trials, run i sampling `lr` from i % 10 and `fusion` from i % 2: (state, the first round's
    score its checkpoint holds, the value the study holds). The study holds no rounds: a stopped trial's first
    round may never have reached it."""
    study, trials = optuna.create_study(direction="maximize"), []
    for i, (state, first_round, value) in enumerate(runs):
        params = {"lr": 1e-4 * 1.5 ** (i % 10), "fusion": ["none", "concat"][i % 2]}
        study.add_trial(create_trial(params=params, distributions=DISTRIBUTIONS, state=state, value=value))
        trials.append(Trial(str(i), i, Path("."), params, TrainConfig(), history=[], status="",
                            rounds=[{"samples_seen": 1024, "round_eval": first_round}]))
    return study, trials


def test_with_few_complete_trials_importance_rests_on_every_trials_first_round():
    """ASHA stopped most trials: 2 complete ones say nothing, the first round of all 24 does. There only `fusion`
    moves the score, so it takes nearly all the variance."""
    runs = [(TrialState.PRUNED, 0.60 + 0.02 * (i % 2), None) for i in range(22)]
    runs += [(TrialState.COMPLETE, 0.60 + 0.02 * (i % 2), 0.5) for i in (22, 23)]
    imp, n, basis = importance(*search(runs), seed=0)
    assert (n, basis) == (24, "first round")
    assert imp["fusion"] > 0.9 > imp["lr"]


def test_with_enough_complete_trials_importance_rests_on_their_values():
    """Their values (here set by `lr`), not their first rounds (set by `fusion`); pruned trials are left out."""
    runs = [(TrialState.COMPLETE, 0.60 + 0.02 * (i % 2), 0.1 * (i % 10)) for i in range(FEW_TRIALS)]
    imp, n, basis = importance(*search(runs + [(TrialState.PRUNED, 0.0, None)] * 5), seed=0)
    assert (n, basis) == (FEW_TRIALS, "complete")
    assert imp["lr"] > 0.9 > imp["fusion"]


@pytest.mark.parametrize("states", [[], [TrialState.COMPLETE]])
def test_fewer_than_two_trials_give_no_importance(states):
    assert importance(*search([(s, 0.6, 0.6) for s in states]), seed=0)[0] == {}
