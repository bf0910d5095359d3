"""`ray up` for real: cluster-local.yaml brought up on this machine over SSH, the smoke search run on it with
`ray exec`, its best checkpoint evaluated, `ray down` (tests/ray_up_local.sh holds the commands, as the README shows
them).

The head is 127.0.0.1, reached as root over SSH with a key made here, through an OpenSSH server started here and
stopped by its PID. The SSH user's machine is emulated as cluster-local.yaml asks: a home of its own (sshd's SetEnv
HOME) whose ~/.bashrc puts this Python's `pip` and `ray` first on PATH, and a pip that installs to that home's user
site and needs no index (this machine reaches no PyTorch index and may have no network), so the config's set-up
commands install the rsynced checkout there, not over this environment's cube_ray. Everything runs inside PID,
network and mount namespaces this test creates (see the script), so the launcher's `ray stop`s see nothing else.
Skipped, with the reason, where that cannot be had: not root, no `unshare`, no `sshd` or `rsync` (.ci/run installs
Debian's openssh-server and rsync when missing)."""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from contextlib import suppress
from getpass import getuser
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_config import LOCAL_YAML, ROOT
from tests.clusters import processes_of, readme_commands, words

SCRIPT = Path(__file__).with_name("ray_up_local.sh")
SSHD, RSYNC = Path("/usr/sbin/sshd"), shutil.which("rsync")
EXP = "ray-up"


def missing() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, sshd on port 22 of its own loopback)"
    if not SSHD.exists() or not RSYNC:
        return "needs OpenSSH's sshd and rsync (Debian: apt-get install openssh-server rsync)"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here (`unshare --net --pid --fork --mount-proc`): {probe.stderr.strip()}"
    return None


def ssh_keys(folder: Path) -> None:
    folder.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    shutil.copy(folder / "id.pub", folder / "authorized_keys")


def sshd_config(folder: Path, home: Path) -> str:
    return "\n".join([
        "ListenAddress 127.0.0.1", "Port 22",  # port 22 of the namespace's own loopback
        f"HostKey {folder / 'host_key'}", f"PidFile {folder / 'sshd.pid'}",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no",  # the keys live in a temporary folder, under a world-writable /tmp
        f"SetEnv HOME={home}",  # the SSH user's machine: its own home, not this user's
    ]) + "\n"


def ssh_users_home(home: Path) -> None:
    """What cluster-local.yaml asks of a machine: Python's pip and ray first on PATH in ~/.bashrc; here also a pip
    that installs to ~/.local (user = true) with no index (the index the config names for torch is not reachable)
    and no build isolation (which would download setuptools). `false` is how pip's config turns a --no-* flag on."""
    (home / ".config" / "pip").mkdir(parents=True)
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\nno-index = true\n[install]\nuser = true\nno-build-isolation = false\n")
    (home / ".bashrc").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')


def filled_in_config(t: Path, cluster_name: str) -> Path:
    """cluster-local.yaml with the FILL IN fields set for this machine: head 127.0.0.1, no workers, root with the
    test's key. Everything else (mounts, set-up and start commands) is the shipped file's."""
    config = yaml.safe_load(LOCAL_YAML.read_text())
    config.update(cluster_name=cluster_name, max_workers=0)
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getuser(), "ssh_private_key": str(t / "ssh" / "id")}
    path = t / "cluster-local.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def ssh_control_folder(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps its control sockets (ray/autoscaler/_private/command_runner.py): a fixed
    folder under /tmp, outside the namespace's private mounts."""
    user, cluster = (hashlib.sha256(s.encode()).hexdigest()[:10] for s in (getuser(), cluster_name))
    return Path(f"/tmp/ray_ssh_{user}/{cluster}")


@pytest.fixture(scope="module")
def brought_up():
    """Runs tests/ray_up_local.sh in its namespaces; returns the folder and the script's output."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    t = Path(tempfile.mkdtemp(prefix="cube-ray-up-", dir="/tmp"))
    cluster_name = f"cube-ray-test-{secrets.token_hex(4)}"
    for name in ("home", "client/tmp", "shared", "raytmp"):
        (t / name).mkdir(parents=True)
    ssh_keys(t / "ssh")
    (t / "ssh" / "sshd_config").write_text(sshd_config(t / "ssh", t / "home"))
    ssh_users_home(t / "home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CUBE_RAY_"))}
    env.update(T=str(t), REPO=str(ROOT), PYBIN=str(Path(sys.executable).parent), EXP=EXP,
               CONFIG=str(filled_in_config(t, cluster_name)))
    try:
        run = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", str(SCRIPT)], env=env,
                             capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        left = processes_of(t)
        yield {"t": t, "run": run, "left": left}
    finally:
        shutil.rmtree(t, ignore_errors=True)
        shutil.rmtree(ssh_control_folder(cluster_name), ignore_errors=True)
        with suppress(OSError):  # the user's folder of control folders, unless another cluster's is in it
            ssh_control_folder(cluster_name).parent.rmdir()


def test_ray_up_runs_the_search_and_ray_down_ends_it(brought_up):
    run, t = brought_up["run"], brought_up["t"]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-4000:] + (t / "ssh" / "sshd.log").read_text()[-2000:]
    steps = [line for line in run.stdout.splitlines() if line.startswith(("+ ", "= "))]
    print("\n".join(steps))  # the commands and their wall times (pytest -s shows them)
    assert [line[2:].split()[:2] for line in steps if line.startswith("+ ")] == [
        ["ray", "get-auth-token"], ["ray", "up"], ["ray", "exec"], ["ray", "exec"], ["ray", "down"]]
    assert sum(line.startswith("= ") for line in steps) == 5  # every step ended
    assert brought_up["left"] == [], "processes of the cluster outlived its namespace"


def test_the_setup_commands_installed_the_rsynced_checkout(brought_up):
    """`pip install -e .` on the head installed ~/cube_ray, the copy `ray up` synced, in the SSH user's home."""
    home = brought_up["t"] / "home"
    assert (home / "cube_ray" / "cube_ray" / "__init__.py").read_bytes() == (ROOT / "cube_ray" / "__init__.py").read_bytes()
    assert not (home / "cube_ray" / ".git").exists()  # rsync_exclude
    (record,) = home.glob(".local/lib/python*/site-packages/cube_ray-*.dist-info/direct_url.json")
    installed = json.loads(record.read_text())
    assert installed["url"] == (home / "cube_ray").as_uri() and installed["dir_info"] == {"editable": True}
    bashrc = (home / ".bashrc").read_text()
    assert "export CUBE_RAY_STORE=/mnt/shared/cube_ray/store" in bashrc and "export RAY_AUTH_MODE=token" in bashrc
    assert (home / ".ray" / "auth_token").read_text() == (brought_up["t"] / "client" / ".ray" / "auth_token").read_text()


def test_the_search_reported_on_the_cluster_and_its_best_checkpoint_evaluates(brought_up):
    exp = brought_up["t"] / "shared" / "cube_ray" / "results" / EXP
    report = json.loads((exp / "report.json").read_text())
    assert report["cost"]["trials"] == 2 and report["cost"]["errors"] == 0, report["cost"]
    assert "## Leaderboard" in (exp / "report.md").read_text()
    best = Path((exp / "best_checkpoint").read_text().strip())
    assert best.is_relative_to("/mnt/shared/cube_ray/results") and best.name == "best_eval"
    assert (brought_up["t"] / "shared" / best.relative_to("/mnt/shared") / "model.safetensors").is_file()
    # `python -m cube_ray.evaluate` on the cluster gives the report's held-out figures for that checkpoint
    figures, held_out = json.loads((exp / "evaluate.json").read_text()), report["held_out"]["table"]
    assert set(figures) == set(held_out) and figures
    for teacher, rows in held_out.items():
        for row in ("model", "identity", "linear_adapter"):
            assert figures[teacher][row]["mrr"] == pytest.approx(rows[row]["mrr"], abs=1e-6), (teacher, row)
    # the store the extraction wrote is the shared one the set-up commands named (CUBE_RAY_STORE)
    assert any((brought_up["t"] / "shared" / "cube_ray" / "store").iterdir())


def test_the_readme_shows_the_commands_this_test_runs():
    """README.md's on-prem block holds the script's client commands, with the config's and experiment's names."""
    commands = [words(c) for c in SCRIPT.read_text().replace("\\\n", " ").splitlines() if c.startswith("step ray ")]
    assert len(commands) == 5
    shown = readme_commands("### On-prem (local provider)")
    for command in commands:
        expected = command.removeprefix("step ").replace('"$CONFIG"', "cluster-local.yaml").replace("$EXP", EXP)
        assert expected in shown, expected
