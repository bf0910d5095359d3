import warnings

from optuna.trial import TrialState

from cube_ray.experiment import DONE_TRAINING, FINAL_METRIC, ROUND_METRIC, STEP, load_study
from cube_ray.tune.space import load_space
from cube_ray.tune.study import make_searcher


def result(score: float, samples: int, **more) -> dict:
    return {ROUND_METRIC: score, STEP: samples, **more}


def test_the_round_asha_stops_a_trial_at_reaches_the_study(tmp_path):
    """Tune tells the searcher nothing of the result on which ASHA stops a trial, only that the trial ended, with
    that result: the study must still hold the round (a trial stopped at its first rung had no value at all), and
    a round already told is not told twice."""
    searcher = make_searcher(load_space("smoke"), tmp_path, seed=0, points_to_evaluate=None)
    for trial in ("stopped", "finished"):
        assert searcher.suggest(trial)
    searcher.on_trial_complete("stopped", result(0.61, 1024))  # as Tune calls it when ASHA stops at the first rung
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of a step reported twice
        searcher.on_trial_result("finished", result(0.55, 1024))
        last = result(0.60, 2048, **{FINAL_METRIC: 0.58, DONE_TRAINING: True})
        searcher.on_trial_result("finished", last)
        searcher.on_trial_complete("finished", last)
    stopped, finished = load_study(tmp_path).trials
    assert (stopped.state, stopped.intermediate_values, stopped.value) == (TrialState.PRUNED, {1024: 0.61}, 0.61)
    assert (finished.state, finished.intermediate_values, finished.value) == (
        TrialState.COMPLETE, {1024: 0.55, 2048: 0.60}, 0.58)
