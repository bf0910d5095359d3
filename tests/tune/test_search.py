"""The search end to end on a real local Ray cluster the test starts (`ray.cluster_utils.Cluster`), the real minilm
teacher and the bundled SQuAD sample: report, best checkpoint, conditions, retention, and a driver killed with
SIGKILL then resumed (that driver and its successor join the cluster with --address)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cube_ray.checkpoint import load_checkpoint
from cube_ray.config import DataConfig, SearchConfig, TrainConfig, load_yaml
from cube_ray.tune.runner import FINISHED, TRIAL, prune_unregistered_checkpoints, run_search

KEEP = 1


@pytest.fixture(scope="module")
def cluster():
    """A separate local Ray cluster (never `ray stop`: that would kill every Ray on the host). With its dashboard:
    Ray Train's placement-group cleaner asks the state API whether a stopped trial's controller is dead."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": True})
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


def check_retention(trial: Path) -> None:
    """Ray keeps the best K epoch checkpoints plus the latest; we keep latest, best_loss, best_eval."""
    ray_checkpoints = [p for p in (trial / "train").glob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(ray_checkpoints) <= KEEP + 1, (trial, ray_checkpoints)
    assert prune_unregistered_checkpoints(trial / "train") == [], trial
    ours = {p.name for p in trial.iterdir() if (p / "checkpoint.json").exists()}
    assert ours == {"latest", "best_loss", "best_eval"}, (trial, sorted(p.name for p in trial.iterdir()))


def test_smoke_search_writes_a_report_whose_best_checkpoint_evaluates(smoke, capsys):
    from cube_ray.evaluate import main as evaluate

    report = (smoke / "report.md").read_text()
    for heading in ("## Leaderboard", "## Best trial", "## Held-out", "## Search cost"):
        assert heading in report
    assert "| ridge |" in report and "| identity |" in report and "| mean_answer |" in report
    for plot in ("history.png", "importance.png", "curves.png"):
        assert (smoke / plot).stat().st_size > 1000
    assert "from 4 scored trials, fewer than 10: these shares are noise" in report  # not read as evidence
    assert "Models were picked on the eval split itself (no --val-fraction)" in report  # the smoke data has no val
    figures = json.loads((smoke / "report.json").read_text())
    assert figures["cost"]["trials"] == 4 and figures["cost"]["errors"] == 0
    assert sum(figures["cost"][k] for k in ("complete", "early_stop", "stopped_by_asha", "time_budget")) == 4
    best = Path((smoke / "best_checkpoint").read_text().strip())
    assert best.parent.name == f"trial_{figures['best']['trial']}"
    assert max(t["eval"] for t in figures["trials"]) == pytest.approx(figures["best"]["eval"])
    best_cfg = load_yaml(TrainConfig, smoke / "best_config.yaml")
    assert best_cfg.lr == pytest.approx(figures["best"]["params"]["lr"])
    capsys.readouterr()
    assert evaluate([str(best), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["minilm"]) == {"model", "identity", "mean_answer", "ridge"}
    assert table["minilm"]["model"]["mrr"] == pytest.approx(figures["held_out"]["table"]["minilm"]["model"]["mrr"], abs=1e-6)


def test_the_search_tries_the_base_preset(smoke):
    tried = [json.loads((trial / TRIAL).read_text()) for trial in trial_dirs(smoke)]
    base = [p for p in tried if p["lr"] == 0.003 and p["loss/infonce"] == 0.5 and p["cube/attention"] is False]
    assert len(base) == 1 and base[0]["epochs"] in (1, 2)  # smoke's 3 epochs are outside the space: sampled


def test_conditional_parameters_are_sampled_only_when_their_condition_holds(smoke):
    for trial in trial_dirs(smoke):
        params = json.loads((trial / TRIAL).read_text())
        attention = params["cube/attention"]
        assert ("cube/attention_heads" in params) == attention
        cfg = load_yaml(TrainConfig, trial / "config.yaml")  # what the trial really trained
        assert cfg.cube.attention == attention and cfg.workers == 1 and cfg.data.limit == 300
    assert len(trial_dirs(smoke)) == 4


def test_checkpoint_retention_is_bounded_per_trial(smoke):
    for trial in trial_dirs(smoke):
        check_retention(trial)


def test_a_space_may_not_search_what_trials_share(tmp_path, store):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "smoke", "params": {"workers": {"type": "int", "low": 1, "high": 2}}}))
    search = SearchConfig(space=str(bad), name="bad", out=str(tmp_path), store=str(store))
    with pytest.raises(ValueError, match=r"\['workers'\] cannot be searched"):
        run_search(search)
    assert not (tmp_path / "bad").exists()


def history(trial: Path) -> list[dict]:
    return load_checkpoint(trial / "latest").state["train_state"]["history"]


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
    space.write_text(yaml.safe_dump({"base": "smoke", "params": {
        "lr": {"type": "log-float", "low": 1e-3, "high": 1e-2}, "epochs": {"type": "categorical", "choices": [12]}}}))
    exp = tmp_path / "out" / "killed"
    log = tmp_path / "driver.log"
    # grace period 12 = every trial's length: ASHA never stops one, so each trial either finishes or is interrupted
    cmd = tune_cli("--space", str(space), "--num-samples", "3", "--max-concurrent", "1", "--grace-period", "12",
                   "--keep-checkpoints", str(KEEP), "--name", "killed", "--out", str(tmp_path / "out"),
                   "--store", str(store), "--limit", "300", "--address", cluster.address)
    with open(log, "w") as f:
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        finished = lambda: [t for t in trial_dirs(exp) if (t / FINISHED).exists()]  # noqa: E731
        started = lambda: [t for t in trial_dirs(exp) if (t / "latest").exists() and not (t / FINISHED).exists()]  # noqa: E731
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
    reliability(outcome=f"--resume finished all 3 trials; the interrupted one continued after epoch {same} "
                        f"(rows identical); retention bounded", lost=f"none ({len(done_before)} finished trial(s) "
                        f"kept unchanged, none re-run)")
