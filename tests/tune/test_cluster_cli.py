"""A cluster started from the command line, as on real machines: a head and a second node, each `ray start --block`
in a process group of its own (two raylets on this machine, one temp folder), with token authentication. The smoke
search runs on it twice, from a driver that joins it (`--address`) and as a Ray job (`ray job submit`); both write
their report, and the trials' Ray Train workers ran on both nodes (Ray Train's state, served by the dashboard). While
they run, a thread scrapes each node's Prometheus export for the cube's gauges (`ray_cube_ray_*`, tagged with the
trial folder), and every trial folder holds TensorBoard events with one value per round the trial reported.

The cluster is stopped by killing the two process groups (never `ray stop`: it would stop every Ray on the host)."""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cube_ray.checkpoint import load_checkpoint
from cube_ray.cli import free_ports
from cube_ray.experiment import TRIAL
from tests.clusters import processes_of, readme_commands

GAUGES = ("samples_per_s", "micro_batch", "expected_steps")  # cube_ray.train.callbacks.RayMetrics
SAMPLES = 2  # trials per search: the base preset and smoke.yaml's first point, started together
CPUS = 2  # per node, and per trial: two trials at once cannot share a node
# Each trial a Ray Train run of two 1-CPU workers (TorchTrainer, DDP): the search's multi-worker path on a real
# two-node cluster (1-worker trials train inside their Tune trials: tests/reliability/test_node_loss.py)
WORKERS = 2


class Cluster:
    def __init__(self, root: Path, token: str, env: dict, port: int, dashboard: int, metrics: dict[str, int]):
        self.root, self.token, self.env, self.metrics = root, token, env, metrics
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
        self.nodes: dict[str, str] = {}  # "head" / "worker" -> Ray node id

    def get(self, path: str, timeout: float = 10) -> bytes:
        request = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def state(self, resource: str) -> list[dict]:
        """Ray's state API (what `ray.util.state.list_<resource>` asks), over HTTP with the token."""
        body = json.loads(self.get(f"/api/v0/{resource}?limit=10000&detail=1&timeout=30", timeout=40))
        assert body["result"], body.get("msg")
        return body["data"]["result"]["result"]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`setsid ray start ... --block`: its own process group, whose id is its PID."""
    with open(log, "w") as f:
        return subprocess.Popen(["setsid", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop(groups: list[subprocess.Popen], root: Path) -> None:
    """SIGTERM to each process group (`ray start --block` then stops its node's processes), SIGKILL to what is left,
    then to any process of this cluster that left the groups."""
    for proc in groups:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in groups:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.time() + 15
    while time.time() < deadline and processes_of(root):
        time.sleep(0.5)
    for proc in groups:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for pid in processes_of(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def node_flags(temp) -> list[str]:
    return ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(CPUS), "--temp-dir", str(temp),
            "--object-store-memory", str(300 * 2**20), "--disable-usage-stats"]


def head_command(port, dashboard, client, metrics, agent, temp) -> list[str]:
    return ["ray", "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
            str(dashboard), "--ray-client-server-port", str(client), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent), *node_flags(temp)]


def node_command(address, metrics, agent, temp) -> list[str]:
    return ["ray", "start", "--address", str(address), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent), *node_flags(temp)]


def tune_args(out, store, name: str) -> list[str]:
    return ["-m", "cube_ray.tune", "--space", "smoke", "--name", name, "--out", str(out), "--store", str(store),
            "--limit", "300", "--num-samples", str(SAMPLES), "--workers-per-trial", str(WORKERS),
            "--cpus-per-worker", str(CPUS // WORKERS), "--keep-checkpoints", "1",
            "--seed", "0"]


def joined_command(python, out, store, address) -> list[str]:
    return [python, *tune_args(out, store, "joined"), "--address", str(address)]


def job_command(python, out, store, dashboard) -> list[str]:
    return ["ray", "job", "submit", "--address", str(dashboard), "--submission-id", "cube-ray-job", "--", python,
            *tune_args(out, store, "job"), "--address", "auto"]


@pytest.fixture(scope="module")
def cluster():
    # a short temp folder: Ray's sockets live under it (a Unix socket path has at most 107 bytes)
    root = Path(tempfile.mkdtemp(prefix="cube-ray-", dir="/tmp"))
    temp = root / "ray"
    token = secrets.token_hex(32)
    (root / "auth_token").write_text(token)
    (root / "auth_token").chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token",  # else clients fail with AuthenticationError: InvalidAuthToken
                "RAY_AUTH_TOKEN_PATH": str(root / "auth_token"),  # this cluster's own token, not ~/.ray/auth_token
                "RAY_metrics_report_interval_ms": "1000",  # gauges reach the export within ~1 s (default 10 s)
                "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"})  # Ray Train's runs and their workers in the dashboard
    port, dashboard, client, *rest = free_ports(7)
    metrics = {"head": rest[0], "worker": rest[1]}
    # The dashboard agents' HTTP ports: Ray's default, 52365, is every node's and every other Ray's on the machine; an
    # agent that finds it taken serves no HTTP, and `ray job submit` (through the head's agent) fails with "No
    # available agent to submit job"
    agents = {"head": rest[2], "worker": rest[3]}
    # Ray's state API, asked without an address (Ray Train's placement-group cleaner in a worker, the search's
    # require_state_api in its driver), takes RAY_ADDRESS, else looks for a cluster on this machine: with another
    # Ray running here it would ask that one, or fail ("Found multiple active Ray instances"). Every process of
    # this cluster inherits it from `ray start`; the joined driver is given it too.
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    head = start(head_command(port, dashboard, client, metrics["head"], agents["head"], temp), env, root / "head.log")
    groups = [head]
    c = Cluster(root, token, env, port, dashboard, metrics)
    try:
        wait_until(lambda: alive_nodes(c, head), 120, "the head", root / "head.log")
        worker = start(node_command(c.address, metrics["worker"], agents["worker"], temp), env, root / "worker.log")
        groups.append(worker)
        wait_until(lambda: len(alive_nodes(c, worker)) == 2, 120, "the second node", root / "worker.log")
        nodes = alive_nodes(c, worker)
        c.nodes = {"head" if n["is_head_node"] else "worker": n["node_id"] for n in nodes}
        yield c
    finally:
        stop(groups[::-1], root)
        left = processes_of(root)
        shutil.rmtree(root, ignore_errors=True)
    assert left == [], f"processes of the cluster still running after it was stopped: {left}"


def alive_nodes(c: Cluster, proc: subprocess.Popen) -> list[dict]:
    if proc.poll() is not None:
        raise AssertionError(f"`ray start` exited with {proc.returncode}")
    try:
        return [n for n in c.state("nodes") if n["state"] == "ALIVE"]
    except OSError:  # the dashboard is not up yet
        return []


def wait_until(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if condition():
                return
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}\n{log.read_text()[-3000:]}") from None
        if time.time() > deadline:
            raise AssertionError(f"{what} did not come up in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(1)


class Scraper(threading.Thread):
    """Polls each node's Prometheus export every second and keeps every value of the cube's gauges:
    seen[(node, gauge, run)] = set of values."""
    LINE = re.compile(r"^ray_cube_ray_(\w+)\{([^}]*)\}\s+(\S+)", re.M)
    LABEL = re.compile(r'(\w+)="([^"]*)"')

    def __init__(self, ports: dict[str, int]):
        super().__init__(daemon=True)
        self.ports, self.seen, self.scrapes, self.done = ports, {}, {node: 0 for node in ports}, threading.Event()

    def run(self):
        while not self.done.is_set():
            for node, port in self.ports.items():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                        text = response.read().decode()
                except OSError:
                    continue
                self.scrapes[node] += 1
                for name, labels, value in self.LINE.findall(text):
                    run = dict(self.LABEL.findall(labels)).get("run")
                    self.seen.setdefault((node, name, run), set()).add(float(value))
            self.done.wait(1.0)


@pytest.fixture(scope="module")
def searches(cluster, tmp_path_factory):
    """The smoke search from a driver that joins the cluster, then as a Ray job (its driver runs on the head); the
    second finds the first's embeddings in the store. Returns both experiment folders and the scraped gauges."""
    out, store = tmp_path_factory.mktemp("experiments"), tmp_path_factory.mktemp("store")
    scraper = Scraper(cluster.metrics)
    scraper.start()
    try:
        joined = subprocess.run(joined_command(sys.executable, out, store, cluster.address), env=cluster.env,
                                capture_output=True, text=True, timeout=400)
        assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
        client = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}  # it would override --address
        job = subprocess.run(job_command(sys.executable, out, store, cluster.dashboard), env=client,
                             capture_output=True, text=True, timeout=400)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + logs(cluster.root, "dashboard*.log")
        time.sleep(2)  # a last scrape after the job's final epoch
    finally:
        scraper.done.set()
        scraper.join()
    return {"joined": out / "joined", "job": out / "job", "scraper": scraper, "job_output": job.stdout}


def logs(root: Path, pattern: str) -> str:
    """The ends of the cluster's logs named `pattern` (for a failure's message: the folder goes with the cluster)."""
    return "".join(f"\n--- {p}:\n" + p.read_text(errors="replace")[-2000:]
                   for p in sorted(root.glob(f"ray/session_latest/logs/{pattern}")))


def trial_dirs(exp: Path) -> list[Path]:
    return sorted(p.parent.resolve() for p in exp.glob(f"trial_*/{TRIAL}"))


def history(trial: Path) -> list[dict]:
    return load_checkpoint(trial / "latest").state["train_state"]["history"]


def test_both_searches_write_their_report(searches, cluster):
    for kind in ("joined", "job"):
        exp = searches[kind]
        assert "## Leaderboard" in (exp / "report.md").read_text()
        figures = json.loads((exp / "report.json").read_text())
        assert figures["cost"]["trials"] == SAMPLES and figures["cost"]["errors"] == 0, (kind, figures["cost"])
        assert len(trial_dirs(exp)) == SAMPLES
    status = json.loads(cluster.get("/api/jobs/cube-ray-job"))  # the job's driver ran in the cluster, and ended well
    assert status["status"] == "SUCCEEDED", status
    assert "report: " + str(searches["job"] / "report.md") in searches["job_output"]


def train_workers(cluster) -> dict[Path, set[str]]:
    """Each trial folder -> the Ray nodes its Ray Train workers ran on (Ray Train's state: a run's storage path is
    its trial folder; its attempts list their workers with their node)."""
    runs = json.loads(cluster.get("/api/train/v2/runs/v1", timeout=30))["train_runs"]
    nodes: dict[Path, set[str]] = {}
    for run in runs:
        folder = Path(run["run_settings"]["run_config"]["storage_path"]).resolve()
        nodes.setdefault(folder, set()).update(w["node_id"] for a in run["attempts"] for w in a["workers"])
    return nodes


def test_the_trials_ran_on_both_nodes(searches, cluster):
    workers = train_workers(cluster)
    for kind in ("joined", "job"):
        trials = trial_dirs(searches[kind])
        assert all(workers.get(t) for t in trials), (trials, workers)  # every trial's Train run is known
        # two 2-CPU trials at once on two 2-CPU nodes: one on each
        assert set().union(*(workers[t] for t in trials)) == set(cluster.nodes.values()), (kind, workers)
    # the state API agrees: Train workers (dead by now, kept with their node) on both nodes
    actors = [a for a in cluster.state("actors") if a["class_name"] == "RayTrainWorker"]
    assert {a["node_id"] for a in actors} == set(cluster.nodes.values())
    assert len(actors) >= 2 * SAMPLES * WORKERS


def test_each_node_exports_the_cubes_gauges_of_its_trials(searches, cluster):
    """Every trial that ended an epoch set the three gauges, tagged run=trial_<id>; they show up (as ray_cube_ray_*)
    on the export of the node its worker ran on, with the values of an epoch of its history."""
    scraper, workers = searches["scraper"], train_workers(cluster)
    assert all(n > 10 for n in scraper.scrapes.values()), scraper.scrapes
    node_name = {node_id: name for name, node_id in cluster.nodes.items()}
    checked = 0
    for kind in ("joined", "job"):
        for trial in trial_dirs(searches[kind]):
            rows = history(trial)
            if not rows:  # ASHA stopped it inside its first epoch: no epoch's end, no gauge
                continue
            (node,) = workers[trial]
            for gauge in GAUGES:
                values = scraper.seen.get((node_name[node], gauge, trial.name))
                assert values, (trial.name, gauge, sorted(k for k in scraper.seen if k[2] == trial.name))
                for value in values:
                    assert any(value == pytest.approx(row[gauge], rel=1e-6) for row in rows), (gauge, value, rows)
                assert not any(k[0] != node_name[node] and k[2] == trial.name for k in scraper.seen)
            checked += 1
    assert checked >= 2  # the base preset's trial of each search trains whole epochs


def masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the folder's event files, tag -> [(step, value)]: TFRecords (length, its CRC, an Event
    protobuf, its CRC) read with tensorboardX's own protobuf classes."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}: {sorted(p.name for p in folder.iterdir())}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack_from("<I", data, pos + 8)
            record = data[pos + 12:pos + 12 + length]
            (record_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
            assert header_crc == masked_crc(header) and record_crc == masked_crc(record), f"{path}: corrupt at {pos}"
            pos += 12 + length + 4
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_every_trial_folder_holds_its_rounds_as_tensorboard_events(searches):
    for kind in ("joined", "job"):
        for trial in trial_dirs(searches[kind]):
            reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
            assert reports, trial
            scalars = tensorboard_scalars(trial)
            for key in ("round_eval", "samples_seen"):
                logged = scalars.get(f"ray/tune/{key}")
                assert logged is not None, (trial, sorted(scalars))
                expected = [r[key] for r in reports if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
                assert len(expected) == len(reports)  # every report carries both
                assert [v for _, v in logged] == pytest.approx(expected, rel=1e-6), (trial, key)
                assert [step for step, _ in logged] == [r["training_iteration"] for r in reports]
            epochs = [r["eval"] for r in reports if "eval" in r]  # an epoch's end also reports the whole split's score
            assert [v for _, v in scalars.get("ray/tune/eval", [])] == pytest.approx(epochs, rel=1e-6), trial


def test_the_readme_shows_the_commands_this_module_runs():
    """README.md's "Several Ray processes on one machine" block: the same commands, with placeholders."""
    shown = readme_commands("### Several Ray processes on one machine (`ray start`)")
    out, store = '"$PWD/results"', '"$PWD/store"'
    at = "RAY_ADDRESS=127.0.0.1:P "
    for cmd in ([at + "setsid", *head_command("P", "D", "C", "M1", "A1", "T")],
                [at + "setsid", *node_command("127.0.0.1:P", "M2", "A2", "T")],
                [at + "python", *joined_command("python", out, store, "127.0.0.1:P")[1:]],
                job_command("python", out, store, "http://127.0.0.1:D")):
        assert " ".join(cmd) in shown, " ".join(cmd)
    assert "export RAY_AUTH_MODE=token" in shown and "kill -TERM -- -<head pid> -<node pid>" in shown
