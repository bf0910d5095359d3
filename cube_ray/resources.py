"""What the Ray cluster can give, checked before any work: a GPU request that no node can ever meet is an error
naming what asked for it, instead of an actor or a Train worker that waits for ever.

    require_gpus(1, "teacher 'llama3-8b' (gpus: 1)", "an extraction actor", "set gpus: 0 to embed on CPU")
"""
from __future__ import annotations

from pathlib import Path

import yaml

from cube_ray.config import ConfigError

# `ray up` writes the autoscaler's copy of the cluster config on the head: its node types say which nodes the
# autoscaler can start when a request waits (cluster.yaml's gpu_worker has min_workers 0, so none runs until then)
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def node_gpus() -> float:
    """The most GPUs one alive node of the connected cluster has (Ray places a request on a single node)."""
    import ray

    return max([float(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")] or [0.0])


def autoscaler_node_gpus(path: Path = BOOTSTRAP_CONFIG) -> float:
    """The most GPUs a node type of this head's autoscaler config brings (0 where there is none)."""
    try:
        config = yaml.safe_load(path.expanduser().read_text()) or {}
    except (OSError, yaml.YAMLError):
        return 0.0
    types = config.get("available_node_types") if isinstance(config, dict) else None
    gpus = [float((t.get("resources") or {}).get("GPU", 0)) for t in (types or {}).values() if isinstance(t, dict)]
    return max(gpus or [0.0])


def require_gpus(per_unit: float, who: str, unit: str, fix: str) -> None:
    """A ConfigError unless some node has (or the autoscaler can start one with) `per_unit` GPUs for each `unit`."""
    if per_unit <= 0:
        return
    have, can_add = node_gpus(), autoscaler_node_gpus()
    if max(have, can_add) >= per_unit:
        return
    where = f"the most GPUs on one node is {have:g}" + (f", on a node the autoscaler can add {can_add:g}" if can_add else
                                                         " and no autoscaler here can add a GPU node")
    raise ConfigError(f"{who} asks for {per_unit:g} GPU(s) per {unit}, but the Ray cluster cannot give them ({where}): "
                      f"nothing would run. {fix}")
