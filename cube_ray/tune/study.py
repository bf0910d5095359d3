"""The search's Optuna study (`<experiment>/study.journal`, see cube_ray/experiment.py) and the searcher that feeds it.

`optuna-dashboard <experiment>/study.journal` shows the search live; `--resume` reopens the same study, and
`--continue-from EARLIER_EXPERIMENT` copies the earlier study's finished trials (values, intermediate values and
states; nothing re-runs) into a new one, so its sampler starts from what the earlier search learned.

What Optuna is told about a trial:
- every round: its score on the picking split's fixed slice (`round_eval`) at step `samples_seen`;
- a trial that trained to its end (all its epochs, or its own early stop): COMPLETE, with its best whole-split score
  (`best_eval`);
- a trial stopped before that (by ASHA at a rung, or by the time budget): PRUNED, and Optuna takes its last
  intermediate value (the round ASHA stopped it at included, which Tune passes on only with the trial's end). TPE
  ranks pruned trials below complete ones (further-trained first), instead of mistaking a low-fidelity score for a
  finished one.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from cube_ray.experiment import (BASE_PRESET, CONTINUED_FROM, DONE_TRAINING, FINAL_METRIC, ROUND_METRIC, STEP,
                                 STUDY, TRIAL_ID, load_study, study_storage)
from cube_ray.tune.space import SearchSpace

log = logging.getLogger("cube_ray.tune")


def make_searcher(space: SearchSpace, exp: Path, seed: int, points_to_evaluate: list[dict] | None,
                  base: dict | None = None):
    """OptunaSearch on the experiment's durable study, with the space's TPE settings; the trial with the values of
    `base` (the base preset's point, enqueued first) is marked as such."""
    from optuna.samplers import TPESampler
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    last_step: dict[str, int] = {}  # per trial, the step of the last round told to Optuna

    class StudySearch(OptunaSearch):
        def suggest(self, trial_id):
            params = super().suggest(trial_id)
            if params is not None:
                trial = self._ot_trials[trial_id]
                trial.set_user_attr(TRIAL_ID, trial_id)
                if base is not None and all(trial.params.get(k) == v for k, v in base.items()):
                    trial.set_user_attr(BASE_PRESET, True)  # the enqueued base preset
            return params

        def on_trial_result(self, trial_id, result):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._ot_trials[trial_id].report(result[ROUND_METRIC], step=int(result[STEP]))
            last_step[trial_id] = int(result[STEP])

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            if ROUND_METRIC in (result or {}) and last_step.get(trial_id) != int(result[STEP]):
                # Tune hands the searcher no result on which the scheduler stops the trial: the round ASHA stopped
                # it at arrives here only (without it, a trial stopped at its first rung had no value in the study)
                self.on_trial_result(trial_id, result)
            final = (result or {}).get(FINAL_METRIC, -math.inf)
            if error:
                state, value = TrialState.FAIL, None
            elif (result or {}).get(DONE_TRAINING) and math.isfinite(final):
                state, value = TrialState.COMPLETE, final
            else:
                state, value = TrialState.PRUNED, None  # Optuna keeps its last intermediate value
            try:
                self._ot_study.tell(self._ot_trials[trial_id], value, state=state)
            except Exception as e:  # noqa: BLE001 - e.g. a NaN score: logged, the search goes on (as OptunaSearch does)
                log.warning("Optuna refused the result of trial %s: %s", trial_id, e)
            self._completed_trials.add(trial_id)

    s = space.sampler
    sampler = TPESampler(seed=seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate, group=s.group,
                         constant_liar=s.constant_liar, n_ei_candidates=s.n_ei_candidates)
    return StudySearch(space=space.define_by_run, metric=ROUND_METRIC, mode="max", seed=seed, sampler=sampler,
                       study_name=exp.name, storage=study_storage(exp), points_to_evaluate=points_to_evaluate)


def copy_finished_trials(earlier: Path, exp: Path, space: SearchSpace) -> int:
    """Copy the earlier experiment's complete and pruned trials into this experiment's study; returns how many.

    Refused, naming both experiments, unless the earlier search sampled exactly this space's distributions."""
    import optuna
    from optuna.trial import TrialState

    old = load_study(earlier)
    if old is None:
        raise FileNotFoundError(f"--continue-from {earlier}: no {STUDY} there (not an experiment of this version?)")
    wanted = space.distributions()
    done = [t for t in old.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    for t in done:
        if any(name not in wanted or wanted[name] != d for name, d in t.distributions.items()):
            raise ValueError(f"--continue-from {earlier}: its trials sampled another space than {space.name!r} "
                             f"(trial {t.number}: {sorted(t.distributions)}); continue only from the same space")
    study = optuna.create_study(study_name=exp.name, storage=study_storage(exp), direction="maximize", load_if_exists=True)
    study.add_trials([optuna.trial.create_trial(
        state=t.state, value=t.value, params=t.params, distributions=t.distributions,
        intermediate_values=t.intermediate_values, user_attrs={**t.user_attrs, CONTINUED_FROM: earlier.name})
        for t in done])
    log.info("continuing from %s: the sampler knows its %d finished trials", earlier, len(done))
    return len(done)
