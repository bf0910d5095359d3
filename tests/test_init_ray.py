"""A cluster cube_ray starts for itself answers Ray's state API itself, even while a newer cluster runs on the host.

Without an address Ray's state API asks the host's newest cluster (/tmp/ray/ray_current_cluster). Ray Train's
placement-group cleaner asks it whether the run's controller is alive; told "no such actor" by a newer cluster (a
second search, a test run), it removed a live run's placement group and its workers died (seen twice in the SQuAD
study while tests ran beside it)."""
import os
import subprocess
import sys

import pytest

from cube_ray.cli import free_ports, starts_own_cluster

PROBE = """
import sys
import ray
from cube_ray.cli import init_ray

init_ray()


@ray.remote(num_cpus=0)
class Probe:
    def own_state(self):
        from ray.util.state import get_actor
        found = get_actor(ray.get_runtime_context().get_actor_id(), timeout=30)
        return None if found is None else found.state


probe = Probe.remote()
print("BEFORE", ray.get(probe.own_state.remote()), flush=True)
if "--newer" in sys.argv:
    sys.stdin.readline()  # the test starts a newer cluster meanwhile
    print("AFTER", ray.get(probe.own_state.remote()), flush=True)
"""


# A process that started its own cluster runs a child (PROBE) that starts another, as the SQuAD study's script runs its
# search: the child inherits the parent's RAY_API_SERVER_ADDRESS.
PARENT = """
import subprocess
import sys
from cube_ray.cli import init_ray

init_ray()
sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1]]).returncode)
"""


def line_starting(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.split()[1]
    raise AssertionError(f"the probe ended before printing {prefix}: exit {proc.wait()}")


@pytest.fixture
def env() -> dict[str, str]:
    """This process's environment without a Ray address, where init_ray starts a cluster of its own."""
    if not starts_own_cluster():  # ray.init() would join the host's running cluster (as Ray users expect)
        pytest.skip("a Ray cluster already runs on this host: the probe would join it instead of starting its own")
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}


def test_an_own_cluster_asks_its_own_state_api_while_a_newer_cluster_runs(env):
    from ray.cluster_utils import Cluster

    probe = subprocess.Popen([sys.executable, "-c", PROBE, "--newer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert line_starting(probe, "BEFORE") == "ALIVE"
        newer = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_ports(1)[0]})
        try:
            probe.stdin.write("\n")
            probe.stdin.flush()
            assert line_starting(probe, "AFTER") == "ALIVE"  # Ray's default asked the newer cluster: None
        finally:
            newer.shutdown()
        assert probe.wait(timeout=120) == 0
    finally:
        if probe.poll() is None:
            probe.kill()


def test_a_child_process_that_starts_its_own_cluster_asks_its_own_state_api(env):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, PROBE], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert line_starting(parent, "BEFORE") == "ALIVE"  # the child's own actor; with the parent's address: None
        assert parent.wait(timeout=120) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
