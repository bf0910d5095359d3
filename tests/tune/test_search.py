"""The search end to end on a real local Ray cluster the test starts (`ray.cluster_utils.Cluster`), the real minilm
teacher and the bundled SQuAD sample: report, best checkpoint, conditions, retention, the Optuna study (rounds,
pruned and complete trials), --continue-from, the default relative --out from a fresh working directory, and a
driver killed with SIGKILL then resumed (the CLI drivers join the cluster with --address)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cube_ray.checkpoint import load_checkpoint
from cube_ray.cli import free_ports
from cube_ray.config import DataConfig, SearchConfig, TrainConfig, load_yaml
from cube_ray.experiment import (ASHA_STOPPED, BASE_PRESET, CONTINUED_FROM, FINISHED, INIT_FROM, TRIAL, TRIAL_ID,
                                 load_study)
from cube_ray.report import IMPORTANCE_BASIS
from cube_ray.tune.runner import MIN_TRIAL_BUDGET_S, REPORT_RESERVE_S, prune_unregistered_checkpoints, run_search, trial_budget

KEEP = 1


@pytest.fixture(scope="module")
def cluster():
    """A separate local Ray cluster (never `ray stop`: that would kill every Ray on the host). With its dashboard:
    Ray Train's placement-group cleaner asks the state API whether a stopped trial's controller is dead."""
    import ray
    from ray.cluster_utils import Cluster

    # the dashboard on a free port: another Ray on this host (a user's, another test run's) may hold the default one
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_port": free_ports(1)[0]})
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def smoke(cluster, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    search = SearchConfig(space="smoke", name="smoke", out=str(out), store=str(store), data=DataConfig(limit=300),
                          num_samples=4, keep_checkpoints=KEEP, seed=0)
    return run_search(search, address=cluster.address)


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p.parent for p in exp.glob(f"trial_*/{TRIAL}"))


def epoch_reports(trial: Path) -> list[dict]:
    """The epoch-end reports Tune received (they carry `eval`; a round's report carries only `round_eval`)."""
    lines = (trial / "result.json").read_text().splitlines() if (trial / "result.json").exists() else []
    return [r for r in map(json.loads, lines) if "eval" in r]


def ray_checkpoints(trial: Path) -> list[Path]:
    """The epoch checkpoints Ray keeps: Tune's in the trial's folder (a 1-worker trial), Ray Train's in its run's."""
    return [p for p in [*trial.glob("checkpoint_*"), *(trial / "train").glob("checkpoint_*")] if p.is_dir()]


def check_retention(trial: Path) -> None:
    """Ray keeps the best K epoch checkpoints plus the latest; we keep latest, best_loss, best_eval. A trial ASHA
    stopped at a rung inside its first epoch has only the rounds' latest/ (epoch checkpoints come at an epoch's end).
    An epoch's end writes our folders first, then hands Ray its checkpoint with the report: a trial ASHA stops in
    between has the epoch in our folders and not in Ray's, so Ray's side is checked against the reports Tune got."""
    kept = ray_checkpoints(trial)
    assert prune_unregistered_checkpoints(trial / "train") == [], trial
    assert len(kept) <= KEEP + 1, (trial, kept)
    reported = epoch_reports(trial)
    assert len(kept) >= min(1, len(reported)), (trial, kept, len(reported))
    ours = {p.name for p in trial.iterdir() if (p / "checkpoint.json").exists()} - {p.name for p in kept}
    epochs = [row["epoch"] for row in history(trial)]
    assert {r["epoch"] for r in reported} <= set(epochs), (trial, reported, epochs)  # ours never lag Ray's
    if epochs:
        assert ours == {"latest", "best_loss", "best_eval"}, (trial, sorted(p.name for p in trial.iterdir()))
    else:
        assert kept == [] and ours == {"latest"}, (trial, kept, sorted(ours))


def test_smoke_search_writes_a_report_whose_best_checkpoint_evaluates(smoke, capsys):
    from cube_ray.evaluate import main as evaluate

    report = (smoke / "report.md").read_text()
    for heading in ("## Leaderboard", "## Best trial", "## Held-out", "## Search cost"):
        assert heading in report
    assert "| ridge |" in report and "| identity |" in report and "| mean_answer |" in report
    for plot in ("history.png", "curves.png"):
        assert (smoke / plot).stat().st_size > 1000
    assert "Models were picked on the eval split itself (no --val-fraction)" in report  # the smoke data has no val
    figures = json.loads((smoke / "report.json").read_text())
    assert figures["cost"]["trials"] == 4 and figures["cost"]["errors"] == 0
    assert sum(figures["cost"][k] for k in ("complete", "early_stop", "stopped_by_asha", "time_budget")) == 4
    # fANOVA rests on the trials Optuna holds as complete: a trial ASHA stopped while it finished its last epoch
    # counts as complete in the table (it trained every epoch) but as pruned in the study (its last report was lost).
    # With fewer than 10 complete, it rests on the first rung of every trial that reached it, where there are more.
    from optuna.trial import TrialState
    study = load_study(smoke)
    complete = len(study.get_trials(states=(TrialState.COMPLETE,)))
    reported = len([t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)) if t.intermediate_values])
    assert complete <= figures["cost"]["complete"] + figures["cost"]["early_stop"] and reported == 4
    basis = figures["importance_basis"]
    assert basis == ({"trials": 4, "on": "first rung"} if complete < 4 else {"trials": 4, "on": "complete"})
    assert (smoke / "importance.png").stat().st_size > 1000
    assert f"over {IMPORTANCE_BASIS[basis['on']].format(n=4)}, fewer than 10: these shares are noise" in report
    # the best trial against the base preset's, on held-out data (unless the base preset's trial is the best)
    assert "| base preset (trial " in report or figures["base_preset"]["trial"] == figures["best"]["trial"]
    assert {"Train controller and worker group start -> worker process", "whole trial (proposed -> ended)",
            "worker setup: batch probe", "worker setup: cube kernel (built once per machine and shape, else loaded)"
            } <= set(figures["trial_cost"])
    assert all(p["trials"] >= 1 and p["median_s"] >= 0 for p in figures["trial_cost"].values())
    best = Path((smoke / "best_checkpoint").read_text().strip())
    assert best.parent.name == f"trial_{figures['best']['trial']}"
    # a trial ASHA stops at a round inside its first epoch has no whole-split (epoch) score, and cannot be the best
    scored = [t for t in figures["trials"] if t["eval"] is not None]
    assert all(t["status"] == "stopped by ASHA" and t["epochs"] == 0 for t in figures["trials"] if t not in scored)
    assert max(t["eval"] for t in scored) == pytest.approx(figures["best"]["eval"])
    best_cfg = load_yaml(TrainConfig, smoke / "best_config.yaml")
    assert best_cfg.lr == pytest.approx(figures["best"]["params"]["lr"])
    capsys.readouterr()
    assert evaluate([str(best), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["minilm"]) == {"model", "identity", "mean_answer", "ridge", "linear_adapter", "criteria"}
    assert table["minilm"]["model"]["mrr"] == pytest.approx(figures["held_out"]["table"]["minilm"]["model"]["mrr"], abs=1e-6)
    # the report's criteria are the best checkpoint's, as evaluate measures them
    reported = figures["held_out"]["table"]["minilm"]["criteria"]["reconstruction_cos"]
    assert table["minilm"]["criteria"]["reconstruction_cos"]["value"] == pytest.approx(reported["value"], abs=1e-6)
    assert "### The plan's success criteria (best trial, held-out split)" in report


def test_the_top_trials_ensemble_averages_their_normalised_predictions(smoke, capsys, tmp_path):
    import torch
    import torch.nn.functional as F

    from cube_ray.ensemble import ensemble_table, main as ensemble, top_checkpoints
    from cube_ray.evaluate import main as evaluate
    from cube_ray.metrics import Centering
    from cube_ray.train.snapshot import load_for_eval, load_snapshot, save_snapshot

    figures = json.loads((smoke / "report.json").read_text())
    members = top_checkpoints(smoke, 2)
    assert len(members) == 2 and members[0] == Path((smoke / "best_checkpoint").read_text().strip())  # the report's rank
    capsys.readouterr()
    assert ensemble([str(smoke), "--top", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["members"] == [str(m) for m in members] and result["pairs"] == figures["held_out"]["pairs"]
    rows = result["table"]["minilm"]
    assert set(rows) == {"ensemble", "member_1", "member_2", "identity", "mean_answer", "ridge", "linear_adapter"}
    for i, path in enumerate(members, 1):  # each member's row is what evaluate says of its checkpoint
        assert evaluate([str(path), "--json"]) == 0
        model = json.loads(capsys.readouterr().out)["minilm"]["model"]
        assert rows[f"member_{i}"]["mrr"] == pytest.approx(model["mrr"], abs=1e-6)
    assert rows["ridge"] == pytest.approx(figures["held_out"]["table"]["minilm"]["ridge"])
    # the ensemble predicts the mean of its members' unit-length predictions: its mean cosine to the gold answers
    loaded = [load_for_eval(path) for path in members]
    q, a = loaded[0].held_out.q["minilm"], loaded[0].held_out.a["minilm"]
    mean = torch.stack([F.normalize(m.student.predict(q, "minilm")[0], dim=-1) for m in loaded]).mean(0)
    assert rows["ensemble"]["cos"] == pytest.approx(F.cosine_similarity(mean, a).mean().item(), abs=1e-5)
    assert rows["ensemble"]["cos"] != pytest.approx(rows["member_1"]["cos"], abs=1e-4)  # two members, not one
    # an ensemble of one is its member, and the report's top-3 row is the same ensemble over three
    one = ensemble_table(members[:1], with_baselines=False)["table"]["minilm"]
    assert one["ensemble"] == pytest.approx(one["member_1"]) and one["member_1"]["mrr"] == pytest.approx(
        figures["held_out"]["table"]["minilm"]["model"]["mrr"], abs=1e-6)
    top3 = ensemble_table(top_checkpoints(smoke, 3), with_baselines=False)
    assert figures["ensemble"]["table"]["minilm"]["ensemble"] == pytest.approx(top3["table"]["minilm"]["ensemble"])
    assert f"| top-{len(top3['members'])} ensemble | {top3['table']['minilm']['ensemble']['cos']:.3f} |" in \
        (smoke / "report.md").read_text()
    # a checkpoint centred otherwise is not in the members' space: refused by name before anything is scored
    snap = load_snapshot(members[1])
    centre = snap.centres["minilm"].mean if snap.centres else 0.0  # the smoke space may train uncentred
    shifted = {"minilm": Centering(torch.ones(snap.checkpoint.data["widths"]["minilm"]).numpy() + centre)}
    other = save_snapshot(tmp_path / "other", snap.student, shifted, snap.cfg, snap.checkpoint.teachers,
                          snap.checkpoint.data, None)
    with pytest.raises(ValueError, match=f"{other}: cannot join an ensemble with {members[0]}: it has other centring"):
        ensemble_table([members[0], other])


def test_a_moved_experiment_folder_still_reports(smoke, tmp_path):
    """Its study keeps the old folder's name inside study.journal: the report finds it there."""
    import shutil

    from cube_ray.report import build_report

    moved = tmp_path / "renamed"
    shutil.copytree(smoke, moved)
    assert build_report(moved) == moved / "report.md"
    figures = json.loads((moved / "report.json").read_text())
    assert figures["cost"]["trials"] == 4 and Path((moved / "best_checkpoint").read_text().strip()).is_relative_to(moved)


def test_stopped_trials_leave_no_placement_group_behind(smoke):
    """Every trial's CPUs are free again once the search ends (a leaked placement group would hold them for the rest
    of the driver's job: later trials and extractions would wait for CPUs that never come back)."""
    from ray.util.state import list_placement_groups

    deadline = time.time() + 30  # Ray Train's placement-group cleaner polls for dead controllers
    while (left := [pg.placement_group_id for pg in list_placement_groups(filters=[("state", "=", "CREATED")])]) \
            and time.time() < deadline:
        time.sleep(1)
    assert left == []


def test_the_search_tries_the_base_preset_first(smoke):
    tried = [json.loads((trial / TRIAL).read_text()) for trial in trial_dirs(smoke)]
    base = [p for p in tried if p["lr"] == 0.003 and p["loss/infonce"] == 0.5 and p["cube/attention"] is False]
    assert len(base) == 1 and "epochs" not in base[0]  # epochs are ASHA's budget, not sampled
    first = load_study(smoke).trials[0]
    assert first.user_attrs[BASE_PRESET] and first.params == base[0]


def test_the_study_holds_rounds_and_tells_asha_stops_as_pruned(smoke):
    from optuna.trial import TrialState

    study = load_study(smoke)  # durable: a file in the experiment folder (optuna-dashboard reads it)
    assert (smoke / "study.journal").stat().st_size > 0 and len(study.trials) == 4
    stopped = set(json.loads((smoke / ASHA_STOPPED).read_text())) if (smoke / ASHA_STOPPED).exists() else set()
    for t in study.trials:
        folder = smoke / f"trial_{t.user_attrs[TRIAL_ID]}"
        rounds = load_checkpoint(folder / "latest").state["train_state"]["rounds"]
        steps = sorted(t.intermediate_values)
        assert steps == sorted({int(r["samples_seen"]) for r in rounds})[:len(steps)] and steps[0] == 128  # every round
        assert t.intermediate_values[steps[-1]] == pytest.approx(rounds[len(steps) - 1]["round_eval"])
        if t.user_attrs[TRIAL_ID] in stopped and not (folder / FINISHED).exists():
            assert t.state == TrialState.PRUNED and t.value == t.intermediate_values[steps[-1]]  # its last round
        else:
            assert t.state == TrialState.COMPLETE and (folder / FINISHED).exists()
            best = max(r["eval"] for r in history(folder))  # the whole split's best epoch, not a round's slice
            assert t.value == pytest.approx(best)


def test_every_path_is_under_the_working_directory_with_the_default_relative_out(cluster, store, tmp_path):
    """The README's command as a user runs it: a fresh working directory, the default `--out results`."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    cwd = tmp_path / "fresh"
    cwd.mkdir()
    done = subprocess.run(tune_cli("--space", "smoke", "--num-samples", "2", "--name", "relative", "--store",
                                   str(store), "--limit", "300", "--address", cluster.address),
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = cwd / "results" / "relative"
    assert (exp / "report.md").exists() and (exp / "study.journal").exists()
    trials = trial_dirs(exp)
    assert len(trials) == 2 and all((t / "latest" / "checkpoint.json").exists() for t in trials)
    best = Path((exp / "best_checkpoint").read_text().strip())
    assert best.is_relative_to(exp) and (best / "checkpoint.json").exists()
    assert ray_checkpoints(best.parent)  # Ray's own (epoch) checkpoints, too
    # nothing the search writes lands under Ray's session folder (Ray Tune stages its own driver files there), and
    # the trials' working directories there stay empty
    ours = {TRIAL, FINISHED, "checkpoint.json", "config.yaml", "timing.json", "report.md", "study.journal"}
    leaked = [p for p in session.rglob("*") if p.name in ours]
    leaked += [p for d in session.rglob("working_dirs") for p in d.rglob("*") if p.is_file()]
    assert leaked == [], leaked

    smoke = yaml.safe_load((Path(__file__).parents[2] / "cube_ray" / "train" / "presets" / "smoke.yaml").read_text())
    (cwd / "smoke.yaml").write_text(yaml.safe_dump({**smoke, "data": {"limit": 300}, "workers": 1}))
    train = subprocess.run([sys.executable, "-m", "cube_ray.train", "--config", "smoke.yaml", "--epochs-this-run",
                            "1", "--store", "store"], cwd=cwd, capture_output=True, text=True,
                           timeout=600, env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert (cwd / "results" / "train" / "latest" / "checkpoint.json").exists()
    assert (cwd / "store" / "embeddings" / "minilm").is_dir()  # a relative --store is the working directory's
    warm = subprocess.run([sys.executable, "-m", "cube_ray.train", "--config", "smoke.yaml", "--epochs-this-run", "1",
                           "--store", "store", "--out", "results/warm", "--init-from", "results/train"], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": cluster.address})
    assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr[-3000:]
    summary = json.loads((cwd / "results" / "warm" / INIT_FROM).read_text())  # a relative --init-from: the cwd's run
    assert summary == {"from": str(cwd / "results" / "train" / "best_eval"), "loaded": ["adapters.minilm", "core"],
                       "new": []}
    assert f"started from {summary['from']}: loaded adapters.minilm, core; left new nothing" in warm.stdout


def test_continue_from_starts_knowing_the_earlier_trials(smoke, cluster, store, tmp_path):
    later = SearchConfig(space="smoke", name="later", out=str(tmp_path), store=str(store), data=DataConfig(limit=300),
                         num_samples=1, keep_checkpoints=KEEP, continue_from=str(smoke), seed=1)
    exp = run_search(later, address=cluster.address)
    trials = load_study(exp).trials
    earlier = load_study(smoke).trials
    copied = [t for t in trials if t.user_attrs.get(CONTINUED_FROM) == smoke.name]
    assert len(copied) == len(earlier) == 4 and len(trials) == 5  # known, not re-run: one new trial
    assert [(t.params, t.value, t.state) for t in copied] == [(t.params, t.value, t.state) for t in earlier]
    new = trials[-1]
    assert not new.user_attrs.get(BASE_PRESET)  # the earlier search tried the base preset already
    assert len(trial_dirs(exp)) == 1 and json.loads((exp / "report.json").read_text())["cost"]["trials"] == 1
    assert "The sampler started knowing 4 finished trials" in (exp / "report.md").read_text()

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"base": "smoke", "params": {"lr": {"type": "float", "low": 1e-4, "high": 1e-3}}}))
    refused = dataclasses.replace(later, space=str(other), name="refused")
    with pytest.raises(ValueError, match=r"--continue-from .*smoke: its trials sampled another space than 'other'"):
        run_search(refused, address=cluster.address)


def test_conditional_parameters_are_sampled_only_when_their_condition_holds(smoke):
    for trial in trial_dirs(smoke):
        params = json.loads((trial / TRIAL).read_text())
        assert ("cube/attention" in params) == (params["cube/mixer"] == "local")
        attention = params.get("cube/attention", False)
        assert ("cube/attention_heads" in params) == attention
        cfg = load_yaml(TrainConfig, trial / "config.yaml")  # what the trial really trained
        assert cfg.cube.attention == attention and cfg.workers == 1 and cfg.data.limit == 300
    assert len(trial_dirs(smoke)) == 4


def test_the_spaces_points_train_each_approach_after_the_base(smoke):
    """smoke.yaml's points: the attention mixer, then alternating steps with autoencoder -> dialogue stages; each
    trial trains what it was given (its checkpoint's cube and stages) and reports rounds."""
    from cube_ray.train.snapshot import load_snapshot

    study = load_study(smoke)
    trained = []
    for t in study.trials[1:3]:
        folder = smoke / f"trial_{t.user_attrs[TRIAL_ID]}"
        snap = load_snapshot(folder / "latest", with_state=True)
        kinds = [type(rule).__name__ for rule in snap.student.core.cube.rules]
        trained.append((t.params["cube/mixer"], snap.cfg.stages, kinds))
        assert t.intermediate_values and not t.user_attrs.get(BASE_PRESET)
    assert trained == [("attention", [], ["CellAttention"]),
                       ("alternate", ["autoencoder", "dialogue"], ["Rule", "CellAttention"])]


def test_a_two_teacher_smoke_search_trains_each_fusion(cluster, store, tmp_path):
    """The fusion choices end to end: the smoke preset over two teachers (minilm and a tiny random LLaMA), a space whose
    points are sum and concat fusion. Each trial trains a fused student; the report scores it in both spaces, with
    the cross-teacher criteria a fused student has."""
    from cube_ray.train.snapshot import load_snapshot
    from tests.conftest import make_tiny_teacher

    spec = dataclasses.asdict(make_tiny_teacher(tmp_path / "tiny", "llama"))
    teachers = tmp_path / "teachers.yaml"
    teachers.write_text(yaml.safe_dump({spec.pop("name"): {k: v for k, v in spec.items() if k != "model_version"}}))
    space = tmp_path / "fusion.yaml"
    space.write_text(yaml.safe_dump({"base": "smoke", "points": [{"fusion": "sum"}, {"fusion": "concat"}],
                                     "scheduler": {"grace_samples": 256, "reduction_factor": 2, "epochs": 1},
                                     "params": {"fusion": {"type": "categorical", "choices": ["sum", "concat"]}}}))
    search = SearchConfig(space=str(space), name="fusion", out=str(tmp_path / "exp"), store=str(store), seed=0,
                          data=DataConfig(limit=300), num_samples=2, teachers=["minilm", "tiny-llama"],
                          teacher_config=str(teachers))
    exp = run_search(search, address=cluster.address)
    fused = sorted(load_snapshot(folder / "latest").student.fusion for folder in trial_dirs(exp))
    assert fused == ["concat", "sum"]
    report = (exp / "report.md").read_text()
    assert "| distilled or fused student: MRR from tiny-llama's questions / identity MRR | > 0.7 |" in report


def test_a_reused_trial_process_trains_the_next_trial_as_a_fresh_one(cluster, store, tmp_path):
    """1-worker trials train in Tune's trial processes, each reused by the next trial (reuse_actors): one trial at a
    time, lr 0.003 (the base preset), 0.009, then 0.003 again, all in one process. The third trains exactly what
    the first trained: nothing of the trials before it (seeds, weights, the step cap, the kernel) leaks into it."""
    space = tmp_path / "again.yaml"
    space.write_text(yaml.safe_dump({"base": "smoke", "start_at_base": True, "points": [{"lr": 0.009}, {"lr": 0.003}],
                                     "scheduler": {"clock": "samples", "grace_samples": 10 ** 6, "epochs": 2},
                                     "params": {"lr": {"type": "log-float", "low": 1e-3, "high": 1e-2}}}))
    search = SearchConfig(space=str(space), name="again", out=str(tmp_path), store=str(store), seed=0,
                          data=DataConfig(limit=300), num_samples=3, max_concurrent=1)
    exp = run_search(search, address=cluster.address)
    first, other, again = [exp / f"trial_{t.user_attrs[TRIAL_ID]}" for t in load_study(exp).trials]
    pids = {json.loads((t / "timing.json").read_text())["worker"]["pid"] for t in (first, other, again)}
    assert len(pids) == 1  # one process served all three
    timed = {"time_s", "cost_s", "samples_per_s", "peak_rss_mb", "at"}
    rows = lambda t: [{k: v for k, v in r.items() if k not in timed} for r in history(t)]  # noqa: E731
    assert rows(again) == rows(first) != rows(other)
    a, b = (load_checkpoint(t / "best_eval").weights for t in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_retention_is_bounded_per_trial(smoke):
    for trial in trial_dirs(smoke):
        check_retention(trial)


def test_an_ended_search_keeps_no_optimiser_state(smoke):
    """Only a trial that continues needs its optimiser's state (AdamW's moments, ~2/3 of a checkpoint): the search
    drops it from every checkpoint of every trial once the trial ends; what is left still loads, history included."""
    from cube_ray.checkpoint import OPTIMISER

    checkpoints = [f.parent for f in smoke.rglob("checkpoint.json")]
    assert len(checkpoints) >= 4 and not list(smoke.rglob(OPTIMISER))
    for folder in checkpoints:
        ck = load_checkpoint(folder)
        assert "optimizer" not in ck.state and ck.state["train_state"]["rounds"]


def test_a_wall_budget_gives_the_trials_what_set_up_leaves():
    """The trials' budget is the wall budget less the set-up so far and the report's reserve, at most time_budget_s;
    a set-up that ate the wall budget still leaves the trials enough for a first round."""
    set_up = 200.0
    start = time.time() - set_up
    search = SearchConfig(name="x", time_budget_s=600, wall_budget_s=810)
    assert trial_budget(search, start) == pytest.approx(810 - set_up - REPORT_RESERVE_S, abs=2)
    assert trial_budget(dataclasses.replace(search, wall_budget_s=2000), start) == 600  # time_budget_s caps it
    unbounded = dataclasses.replace(search, time_budget_s=None)  # the wall budget alone decides
    assert trial_budget(unbounded, start) == pytest.approx(810 - set_up - REPORT_RESERVE_S, abs=2)
    assert trial_budget(dataclasses.replace(search, wall_budget_s=250), start) == MIN_TRIAL_BUDGET_S
    assert trial_budget(dataclasses.replace(search, wall_budget_s=None), start) == 600  # no wall budget: as set
    with pytest.raises(ValueError, match="wall_budget_s must be positive"):
        dataclasses.replace(search, wall_budget_s=-5).validate()


def test_a_space_may_not_search_what_trials_share(tmp_path, store):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "smoke", "params": {"workers": {"type": "int", "low": 1, "high": 2}}}))
    search = SearchConfig(space=str(bad), name="bad", out=str(tmp_path), store=str(store))
    with pytest.raises(ValueError, match=r"\['workers'\] cannot be searched"):
        run_search(search)
    assert not (tmp_path / "bad").exists()


def history(trial: Path) -> list[dict]:
    return load_checkpoint(trial / "latest").state["train_state"]["history"]


def epochs_done(trial: Path) -> int:
    """Epochs in the trial's latest/ (0 while there is none, or while it is being replaced)."""
    try:
        return len(history(trial))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def tune_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cube_ray.tune", *args]


def wait_for(condition, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited with {proc.returncode} too early:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_killed_driver_resumes_keeping_finished_trials(cluster, store, tmp_path, reliability):
    reliability(scenario="driver kill", done="SIGKILL to the search driver (3 trials of 12 epochs, one at a time) "
                                           "after one trial finished and the next wrote a checkpoint; then --resume")
    space = tmp_path / "three_epochs.yaml"
    space.write_text(yaml.safe_dump({"base": "smoke", "scheduler": {"epochs": 12}, "params": {
        "lr": {"type": "log-float", "low": 1e-3, "high": 1e-2}}}))
    exp = tmp_path / "out" / "killed"
    log = tmp_path / "driver.log"
    # grace = every trial's length (12 epochs of 10 batches of 32: 300 pairs, the last batch wrapping round): ASHA's
    # one rung is each trial's last report, so it never stops one and each trial finishes or is interrupted
    cmd = tune_cli("--space", str(space), "--num-samples", "3", "--max-concurrent", "1", "--asha-clock", "samples",
                   "--grace-samples", "3840",
                   "--keep-checkpoints", str(KEEP), "--name", "killed", "--out", str(tmp_path / "out"),
                   "--store", str(store), "--limit", "300", "--address", cluster.address)
    with open(log, "w") as f:
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        finished = lambda: [t for t in trial_dirs(exp) if (t / FINISHED).exists()]  # noqa: E731
        started = lambda: [t for t in trial_dirs(exp) if epochs_done(t) and not (t / FINISHED).exists()]  # noqa: E731
        wait_for(lambda: finished() and started(), 400, driver, log)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = {t.name: history(t) for t in finished()}
    interrupted = started()[0]
    before = history(interrupted)

    resumed = subprocess.run(tune_cli("--resume", "--name", "killed", "--out", str(tmp_path / "out"),
                                      "--address", cluster.address), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    figures = json.loads((exp / "report.json").read_text())
    assert figures["cost"]["trials"] == 3 and figures["cost"]["complete"] == 3, figures["cost"]
    for name, rows in done_before.items():  # finished trials are kept as they were, not re-run
        assert history(exp / name) == rows
    after = history(interrupted)
    assert [r["epoch"] for r in after] == list(range(1, 13))
    # it continued from its checkpoint: the epochs before the kill are the very same rows (timings included);
    # Ray's own checkpoint may be one epoch behind ours if the kill fell between the two saves
    same = max(1, len(before) - 1)
    assert after[:same] == before[:same]
    for trial in trial_dirs(exp):
        check_retention(trial)
    assert len(json.loads((exp / "sessions.json").read_text())) == 1  # the killed session never recorded an end
    assert [t.state.name for t in load_study(exp).trials] == ["COMPLETE"] * 3  # the same study, continued
    reliability(outcome=f"--resume finished all 3 trials; the interrupted one continued after epoch {same} "
                        f"(rows identical); retention bounded", lost=f"none ({len(done_before)} finished trial(s) "
                        f"kept unchanged, none re-run)")


def test_resume_refuses_an_experiment_others_can_write_into(tmp_path, reliability):
    """Ray restores a search from pickles (tuner.pkl, the searcher's state): only from folders this user controls."""
    from cube_ray.config import save_yaml

    reliability(scenario="--resume of a world-writable experiment folder (Ray's pickles could have been replaced)",
                done="run_search(resume=True), before Ray starts")
    exp = tmp_path / "out" / "shared"
    exp.mkdir(parents=True)
    save_yaml(SearchConfig(space="smoke", out=str(tmp_path / "out"), name="shared"), exp / "search.yaml")
    (exp / "tuner.pkl").write_bytes(b"not to be unpickled")
    exp.chmod(0o777)
    with pytest.raises(PermissionError, match=r"writable by everyone \(mode 777\).*chmod o-w"):
        run_search(SearchConfig(out=str(tmp_path / "out"), name="shared"), resume=True)
    reliability(outcome="PermissionError naming the folder and its mode; nothing unpickled", lost="nothing")
