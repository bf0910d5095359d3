"""A lost node in the middle of a search, on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
two trials run at once, one on each node; the worker node is removed without warning while its trial trains; that
trial continues from its checkpoint on the head node, and the experiment completes with both trials."""
import json
import subprocess
import sys
import time

import pytest
import yaml

from cube_ray.checkpoint import load_checkpoint
from cube_ray.cli import free_ports
from cube_ray.experiment import FINISHED, TRIAL

EPOCHS = 120  # ~40 s of the smoke cube (~0.3 s an epoch here, rounds and checkpoints included): the head's trial
# still trains when the other, started on the new node after the head's first epoch, has trained one


@pytest.fixture(scope="module")
def cluster():
    """The head node only; the test adds the worker node once the search driver has prepared its data, so the
    data blocks every trial reads live on the node that stays."""
    import ray
    from ray.cluster_utils import Cluster

    # the dashboard on a free port: another Ray on this host (a user's, another test run's) may hold the default one
    c = Cluster(initialize_head=True,
                head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_ports(1)[0]})
    ray.init(address=c.address, logging_level="ERROR")
    yield c
    ray.shutdown()
    c.shutdown()


def history(trial) -> list[dict]:
    return load_checkpoint(trial / "latest").state["train_state"]["history"]


def epochs_done(trial) -> int:
    """Epochs in the trial's latest/ (0 while there is none, or while a round replaces it)."""
    try:
        return len(history(trial))
    except (FileNotFoundError, OSError, ValueError):
        return 0


def train_worker_nodes() -> dict[str, str]:
    """The trial processes that trained, alive or ended (a 1-worker trial trains inside its Tune trial, an
    ImplicitFunc actor; the one on the head may have finished by now): actor id -> node id."""
    from ray.util.state import list_actors

    return {a.actor_id: a.node_id for a in list_actors(filters=[("class_name", "=", "ImplicitFunc")])}


def test_lost_node_trial_resumes_on_the_remaining_node(cluster, tmp_path, reliability):
    reliability(scenario="node loss", done=f"2-node cluster (1 CPU each), 2 trials of {EPOCHS} epochs at once, one per "
                                           "node; worker node removed (not graceful) after its trial's first checkpoint")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": "smoke", "scheduler": {"epochs": EPOCHS}, "params": {
        "lr": {"type": "log-float", "low": 1e-3, "high": 1e-2}}}))
    exp, log = tmp_path / "out" / "nodes", tmp_path / "driver.log"
    # ASHA's first rung beyond any trial's budget (an epoch of the smoke preset is more than 300 samples: its steps
    # wrap the shard), so neither trial is stopped at a rung and both must finish
    cmd = [sys.executable, "-m", "cube_ray.tune", "--space", str(space), "--num-samples", "2", "--max-concurrent", "2",
           "--asha-clock", "samples", "--grace-samples", str(EPOCHS * 10_000), "--name", "nodes", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store"),
           "--limit", "300", "--address", cluster.address, "--seed", "1"]
    with open(log, "w") as f:
        driver = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def wait_for(condition, timeout=600):
        deadline = time.time() + timeout
        while not condition():
            assert driver.poll() is None or condition(), f"driver exited early:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)

    trials = lambda: sorted(p.parent for p in exp.glob(f"trial_*/{TRIAL}"))  # noqa: E731
    with_checkpoint = lambda: [t for t in trials() if epochs_done(t)]  # noqa: E731  (an epoch in latest/)
    seen = []  # what the condition saw: a second look can fall inside a swap of latest/ and read no epoch

    def one_has_trained():
        seen[:] = with_checkpoint()
        return len(seen) == 1

    # one trial trains on the 1-CPU head; the other (a 1-CPU Tune trial) waits for a CPU, which the new node brings
    wait_for(one_has_trained)
    (on_head,) = seen
    worker = cluster.add_node(num_cpus=1)
    wait_for(lambda: len(with_checkpoint()) == 2)  # the other one has trained an epoch on the new node
    nodes = train_worker_nodes()
    assert set(nodes.values()) == {cluster.head_node.node_id, worker.node_id}, nodes
    (on_worker,) = [t for t in trials() if t != on_head]
    before = history(on_worker)
    assert before and not (on_worker / FINISHED).exists()
    cluster.remove_node(worker, allow_graceful=False)

    wait_for(lambda: driver.poll() is not None, timeout=900)
    assert driver.returncode == 0, log.read_text()[-3000:]
    figures = json.loads((exp / "report.json").read_text())
    assert figures["cost"]["trials"] == 2 and figures["cost"]["complete"] == 2, figures["cost"]
    after = history(on_worker)
    assert [r["epoch"] for r in after] == list(range(1, EPOCHS + 1))
    # continued from its checkpoint: the epochs before the loss are the very rows written then (timings included)
    assert after[:len(before)] == before
    reliability(outcome=f"the trial on the lost node continued after epoch {len(before)} on the head node; "
                        f"experiment complete, 2 of 2 trials finished", lost="none")
