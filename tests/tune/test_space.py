import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from ray.tune.schedulers import TrialScheduler

from cube_ray.config import ConfigError, SearchConfig, from_dict
from cube_ray.experiment import ASHA_STOPPED
from cube_ray.tune.runner import asha, epoch_samples, scheduler_settings, space_for, trial_config, trial_epochs
from cube_ray.tune.space import SPACES, load_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space, n: int, seed: int) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        space.define_by_run(trial)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_space_file_is_valid_and_samples_valid_configs(path):
    space = load_space(path)
    for params in sample(space, 5, seed=0):
        cfg = space.train_config(params)  # raises on an invalid combination
        assert cfg.teachers


def test_named_spaces_exist():
    assert {p.stem for p in SPACES.glob("*.yaml")} >= {"stage247", "stage24", "smoke"}


def test_conditional_parameters_are_respected():
    space = load_space("stage247")
    trials = sample(space, 40, seed=1)
    for params in trials:
        assert ("cube/attention" in params) == (params["cube/mixer"] == "local")
        assert ("cube/attention_heads" in params) == params.get("cube/attention", False)
        assert ("weighting/temperature" in params) == (params["weighting/mode"] == "adaptive")
        assert ("stage_share" in params) == (params["stages"] == '["autoencoder", "dialogue"]')
        cfg = space.train_config(params)
        assert cfg.stages in ([], ["autoencoder", "dialogue"]) and cfg.cube.mixer == params["cube/mixer"]
    # every branch was explored
    assert {p.get("cube/attention") for p in trials} == {None, False, True}
    assert {p["cube/mixer"] for p in trials} == {"local", "attention", "alternate"}
    assert {p["stages"] for p in trials} == {"[]", '["autoencoder", "dialogue"]'}


def test_sampling_is_seeded_and_lists_round_trip():
    space = load_space("stage247")
    assert sample(space, 3, seed=7) == sample(space, 3, seed=7)
    cfg = space.train_config({"cube/dims": [6, 8, 16], "lr": 1e-3})
    assert cfg.cube.dims == [6, 8, 16] and cfg.lr == 1e-3
    nested = space.train_config({"cube": {"channels": 12}})
    assert nested.cube.channels == 12 and nested.cube.dims == space.base.cube.dims


@pytest.mark.parametrize("text, message", [
    ("params:\n  lr: {type: log-float, low: 0.1, high: 0.01}\n", r"parameter 'lr': needs numbers low < high"),
    ("params:\n  cube/colour: {type: bool}\n", r"parameter 'cube/colour': no such TrainConfig field"),
    ("params:\n  lr: {type: gaussian, low: 0, high: 1}\n", r"parameter 'lr': type must be one of"),
    ("params:\n  lr: {type: log-float, low: 0, high: 1}\n", r"log-float needs low > 0"),
    ("params:\n  cube/attention_heads: {type: categorical, choices: [2], when: {cube/attention: true}}\n"
     "  cube/attention: {type: bool}\n", r"condition on 'cube/attention', which is not an earlier parameter"),
    ("params:\n  optimizer: {type: categorical, choices: []}\n", r"categorical needs a non-empty list"),
    ("params:\n  optimizer: {type: categorical, choices: [adamw, lion]}\n", r"choice 'lion' is invalid: .*optimizer"),
    ("params:\n  lr: {type: float, low: 0.001, high: 0.01, scale: 2}\n", r"unknown key\(s\) \['scale'\]"),
    ("base: nosuch\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"base preset 'nosuch' does not exist"),
    ("params: {}\n", r"non-empty 'params'"),
    ("params: [\n", r"not valid YAML"),
    ("start_at_base: yes please\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"start_at_base must be true or false"),
    ("params:\n  epochs: {type: int, low: 1, high: 3}\n", r"'epochs' cannot be searched: it is the budget ASHA hands out"),
    ("points:\n  - {lr: 0.5}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n",
     r"points\[0\]: lr=0.5 is outside the parameter's range"),
    ("points:\n  - {cube/mixer: attention}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n",
     r"points\[0\]: 'cube/mixer' is not a parameter of this space"),
    ("points: {lr: 0.005}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"points must be a list"),
    ("sampler: {n_startup: 4}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"sampler: unknown key\(s\) \['n_startup'\]"),
    ("scheduler: {grace_samples: 0}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"scheduler: need grace_samples >= 1"),
    ("scheduler: {grace_s: -1}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", r"scheduler: need grace_s > 0"),
    ("scheduler: {clock: epochs}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n",
     r"scheduler.clock: expected one of \['samples', 'cost'\]|scheduler: need clock 'samples' or 'cost'"),
    ("scheduler: {reduction_factor: three}\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n",
     r"scheduler.reduction_factor: expected int, got str"),
])
def test_malformed_space_names_file_key_and_problem(tmp_path, text, message, reliability):
    reliability(scenario="bad input: malformed search space", done=f"space file {text.strip()!r}")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_space(path)
    assert str(path) in str(e.value)
    reliability(outcome=f"ConfigError naming the file: {str(e.value).replace(str(path), 'bad.yaml')[:120]}", lost="none")


def test_unknown_space_lists_known_ones():
    with pytest.raises(ConfigError, match=r"no such search space; known: .*stage247"):
        load_space("stage999")


def test_a_search_that_starts_at_base_tries_the_default_preset_first():
    space = load_space("stage247")
    assert space.start_at_base
    point, outside = space.base_point()
    assert outside == []  # every value of the default preset is a point of stage247
    assert "cube/attention_heads" not in point and "weighting/temperature" not in point  # their conditions are off
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(point)  # what OptunaSearch(points_to_evaluate=...) does
    trial = study.ask()
    space.define_by_run(trial)
    assert space.train_config(trial.params) == space.base
    assert load_space("stage24").base_point() == (  # the default's lr, batch size and loss mix are outside stage24's
        {"weighting/mode": "uniform", "optimizer": "adamw"},
        ["lr", "batch_size", "loss/curriculum", "loss/cosine", "loss/triplet", "loss/infonce"])


def test_epochs_are_the_schedulers_budget_and_max_epochs_caps_it():
    capped, free = SearchConfig(max_epochs=3), SearchConfig()
    space = load_space("stage247")
    assert (trial_epochs(capped, space), trial_epochs(free, space)) == (3, 6)  # stage247: scheduler.epochs 6
    assert trial_epochs(free, load_space("stage24")) == 25
    for params in sample(space_for(capped), 5, seed=2):
        assert "epochs" not in params
        assert trial_config(params, space_for(capped), capped).epochs == 3
        assert trial_config(params, space_for(free), free).epochs == 6
    with pytest.raises(ConfigError, match=r"max_epochs must be at least 1, got 0"):
        from_dict(SearchConfig, {"max_epochs": 0})


def test_asha_counts_an_epoch_in_the_samples_the_largest_batch_makes_of_it():
    """An epoch is whole batches (the last wraps round the split): ASHA's max_t is epochs x the longest such epoch,
    so no rung falls inside a trial's last epoch."""
    assert epoch_samples(load_space("stage247"), 300) == 512  # batch 256: 2 batches; 128 makes 384, 32 and 64 320
    assert epoch_samples(load_space("smoke"), 300) == 320  # the smoke preset's batch of 64, not searched: 5 batches
    assert epoch_samples(load_space("stage247"), 16619) == 16640
    search = SearchConfig(max_epochs=3, asha_clock="samples")
    scheduler = asha(search, load_space("stage247"), Path("unused"), 300)
    assert scheduler._max_t == 3 * 512


def test_asha_judges_a_staged_trial_only_on_the_samples_it_trained_the_task(tmp_path):
    """A trial with stages [autoencoder, dialogue] is scored on Q->A from its first round but trains Q->A only in its
    last stage: ASHA's clock is its Q->A samples, so no rung judges it on a task it has not trained yet (on
    `samples_seen`, the first rung stopped every such trial of the SQuAD search inside its first stage)."""
    search = SearchConfig(max_epochs=3, asha_clock="samples")
    scheduler = asha(search, load_space("stage247"), tmp_path, 16619)  # grace: 1,024 samples
    plain, staged = SimpleNamespace(trial_id="plain"), SimpleNamespace(trial_id="staged")
    for trial in (plain, staged):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, plain, {"samples_seen": 1024, "task_samples": 1024, "round_eval": 0.62}) \
        == TrialScheduler.CONTINUE  # the first at the rung
    # autoencoding, worse on Q->A than `plain`: at the first rung's count and a whole epoch later, no rung judges it
    for samples in (1024, 16640):
        assert scheduler.on_trial_result(None, staged, {"samples_seen": samples, "task_samples": 0, "round_eval": 0.58}) \
            == TrialScheduler.CONTINUE
    # its first Q->A samples: judged at the first rung, against `plain` there
    assert scheduler.on_trial_result(None, staged, {"samples_seen": 17664, "task_samples": 1024, "round_eval": 0.60}) \
        == TrialScheduler.STOP
    assert json.loads((tmp_path / ASHA_STOPPED).read_text()) == ["staged"]


def test_on_the_cost_clock_asha_judges_training_seconds_and_bounds_a_staged_trials_first_stage(tmp_path):
    """stage247's clock is cost: rungs at grace_s x factor^k training seconds (`cost_s`), whatever the samples; a
    round every grace_s; a staged trial's early stages end within stage_share of the first rung."""
    search = SearchConfig(max_epochs=3, grace_s=2.0)
    space = space_for(search)
    assert scheduler_settings(search, space) == (2.0, 3) and space.base.report_every_s == 2.0
    scheduler = asha(search, space, tmp_path, 16619)
    fast, slow = SimpleNamespace(trial_id="fast"), SimpleNamespace(trial_id="slow")
    for trial in (fast, slow):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, fast, {"samples_seen": 1024, "cost_s": 2.1, "round_eval": 0.62}) \
        == TrialScheduler.CONTINUE
    # ten times slower per sample: judged after the same seconds, on what it learnt in them
    assert scheduler.on_trial_result(None, slow, {"samples_seen": 64, "cost_s": 1.9, "round_eval": 0.30}) \
        == TrialScheduler.CONTINUE  # not at the rung yet
    assert scheduler.on_trial_result(None, slow, {"samples_seen": 128, "cost_s": 2.2, "round_eval": 0.58}) \
        == TrialScheduler.STOP
    staged = next(p for p in sample(space, 40, seed=0) if p["stages"] != "[]")
    cfg = trial_config(staged, space, search)
    assert cfg.stages and cfg.stage_budget_s == pytest.approx(cfg.stage_share * 2.0)
    plain = next(p for p in sample(space, 40, seed=0) if p["stages"] == "[]")
    assert trial_config(plain, space, search).stage_budget_s == 0
    assert trial_config(staged, space, SearchConfig(max_epochs=3, asha_clock="samples")).stage_budget_s == 0


def test_a_report_that_passes_several_rungs_at_once_is_judged_at_each(tmp_path):
    """A round charged with a step longer than a rung (cost clock) can pass rungs 3, 9 and 27 at once: ASHA judges it
    at the lowest first, against the trials there, instead of only at the highest, where none is recorded yet (Ray's
    ASHA alone let such a trial through with its untrained score)."""
    search = SearchConfig(max_epochs=3)
    scheduler = asha(search, space_for(search), tmp_path, 16619)  # rungs at 3, 9, 27, 81 ... s
    trials = {name: SimpleNamespace(trial_id=name) for name in ("a", "b", "slow", "slower")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    for name, score in (("a", 0.69), ("b", 0.70)):
        assert scheduler.on_trial_result(None, trials[name], {"cost_s": 3.1, "round_eval": score}) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["slow"], {"cost_s": 40.0, "round_eval": 0.66}) == TrialScheduler.STOP
    assert json.loads((tmp_path / ASHA_STOPPED).read_text()) == ["slow"]
    # as good as the best at the first rung: it goes on, judged at 9 and 27 too on the way (nobody there yet)
    assert scheduler.on_trial_result(None, trials["slower"], {"cost_s": 40.0, "round_eval": 0.71}) \
        == TrialScheduler.CONTINUE
    assert all("slower" in recorded for rung, recorded in scheduler._trial_info["slower"]._rungs if rung <= 40)


def test_a_round_before_the_first_step_is_judged_against_trained_trials_and_recorded_nowhere(tmp_path):
    """A config whose first step outlasts a rung reports before it, untrained (samples_seen 0), its score its input's:
    stopped where trained trials beat it at a rung it passes, and never recorded, so it does not lower the bar
    (the base preset's own untrained round, on half a 2-core machine, had let every later config through rung 3)."""
    search = SearchConfig(max_epochs=3)
    scheduler = asha(search, space_for(search), tmp_path, 16619)  # rungs at 3, 9, 27 ... s
    trials = {name: SimpleNamespace(trial_id=name) for name in ("first", "base", "monster", "later")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    untrained = {"samples_seen": 0, "cost_s": 40.0, "round_eval": 0.659}
    assert scheduler.on_trial_result(None, trials["first"], untrained) == TrialScheduler.CONTINUE  # nobody to beat
    assert scheduler.on_trial_result(None, trials["base"], {"samples_seen": 512, "cost_s": 4.9, "round_eval": 0.664}) \
        == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials["monster"], untrained) == TrialScheduler.STOP
    rungs = scheduler._trial_info["base"]._rungs
    assert [list(recorded) for rung, recorded in rungs if recorded] == [["base"]]  # the untrained recorded nowhere
    # the bar at rung 3 is the trained trial's: a trained score below it stops
    assert scheduler.on_trial_result(None, trials["later"], {"samples_seen": 64, "cost_s": 3.2, "round_eval": 0.661}) \
        == TrialScheduler.STOP


def test_a_space_cannot_warm_a_curriculum_up_for_longer_than_a_trial_trains():
    search = SearchConfig(max_epochs=3)
    assert trial_config(sample(space_for(search), 1, seed=0)[0], space_for(search), search)
    with pytest.raises(ConfigError, match=r"'stage247': loss/curriculum_warmup can be 2 epochs but a trial trains at "
                                          r"most 2: .* not reach cube/max_steps"):
        space_for(SearchConfig(max_epochs=2))  # stage247's warm-ups are 1-2 epochs
    with pytest.raises(ConfigError, match=r"'stage24': loss/curriculum_warmup can be 5 epochs but a trial trains at most 5"):
        space_for(SearchConfig(space="stage24", max_epochs=5))  # the base preset's warm-up, curriculum always on
    assert space_for(SearchConfig(space="smoke", max_epochs=1))  # no curriculum: any budget


def test_sampler_and_scheduler_come_from_the_space_file_and_the_command_wins():
    space = load_space("stage247")
    assert (space.sampler.n_startup_trials, space.sampler.constant_liar) == (4, True)
    assert space.scheduler.clock == "cost" and scheduler_settings(SearchConfig(), space) == (space.scheduler.grace_s, 3)
    assert scheduler_settings(SearchConfig(grace_s=7.5, reduction_factor=2), space) == (7.5, 2)
    assert scheduler_settings(SearchConfig(asha_clock="samples"), space) == (1024, 3)
    assert scheduler_settings(SearchConfig(asha_clock="samples", grace_samples=300, reduction_factor=2), space) == (300, 2)
    assert load_space("smoke").scheduler.clock == "samples"
    assert load_space("smoke").scheduler.grace_samples == 256
