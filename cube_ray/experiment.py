"""A search experiment's folder: the names that the search (tune/) writes and the report reads, in one home.

    <out>/<name>/search.yaml          the SearchConfig (--resume needs no flags)
                 study.journal        the Optuna study (JournalStorage; `optuna-dashboard` reads it)
                 asha_stopped.json    the trials ASHA stopped, so the report tells them from time-budget stops
                 trial_<id>/trial.json     the trial's sampled values, flat
                 trial_<id>/finished.json  the trial's training ran to its end (all epochs, or its own early stop)
                 trial_<id>/latest/, best_eval/, best_loss/, train/ (Ray's checkpoints), timing.json
                 trial_<id>/.tmp-snapshot-*  a checkpoint being saved (any training run's folder; fit removes a
                                             killed save's)
"""
from __future__ import annotations

from pathlib import Path

SEARCH = "search.yaml"
STUDY = "study.journal"
ASHA_STOPPED = "asha_stopped.json"
TRIAL = "trial.json"
FINISHED = "finished.json"
SNAPSHOT_PREFIX = ".tmp-snapshot-"
INIT_FROM = "init_from.json"  # a run started from another's checkpoint: what it loaded, what it left new

# What each report carries for Tune and Optuna (train/loop.py writes them, on each worker)
ROUND_METRIC = "round_eval"  # the round's score on the picking split's fixed slice: ASHA's metric
FINAL_METRIC = "best_eval"  # the best whole-split score so far: a complete trial's value
STEP = "samples_seen"  # Optuna's step: training samples so far, every stage's
# ASHA's time attribute: training samples of the run's task (its last stage). A staged trial is scored on the task
# from its first round, but only trains it in its last stage: counted in all its samples, every early rung judged it
# on a task it had not trained yet, and ASHA stopped each one inside its first stage.
TASK_STEP = "task_samples"
# ASHA's time attribute on the cost clock: training seconds so far (steps only: no set-up, scoring nor saving), and
# in a round that comes before a step longer than a round, that step's seconds too (train/loop.py: long_step)
COST_STEP = "cost_s"
CLOCK_STEP = {"samples": TASK_STEP, "cost": COST_STEP}  # SearchConfig.asha_clock -> ASHA's time attribute
DONE_TRAINING = "done_training"  # true in the report of a run's last epoch: Optuna is told COMPLETE

# User attributes of the study's trials
TRIAL_ID = "tune_trial_id"  # the Tune trial (its folder is trial_<id>)
CONTINUED_FROM = "continued_from"  # a trial copied from an earlier experiment (--continue-from)
BASE_PRESET = "base_preset"  # the enqueued base-preset trial


def study_storage(exp: Path):
    """The experiment's durable Optuna storage (a journal file: no database server, works on NFS)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(exp) / STUDY)))


def load_study(exp: Path):
    """The experiment's study (named after the experiment folder); None where there is no study file. A folder
    moved or renamed since keeps its study under the old name: where the journal holds one study, that is it."""
    import optuna

    if not (Path(exp) / STUDY).exists():
        return None
    storage = study_storage(exp)
    names = [s.study_name for s in storage.get_all_studies()]
    name = names[0] if len(names) == 1 else Path(exp).name
    return optuna.load_study(study_name=name, storage=storage)


def checkpoint_folder(path: str | Path) -> Path:
    """`path` itself if it is a checkpoint folder, else its best_eval/ (a training run's or a trial's folder)."""
    path = Path(path)
    return path if (path / "checkpoint.json").exists() else path / "best_eval"
