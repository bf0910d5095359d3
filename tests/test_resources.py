"""GPU requests on a real two-node Ray cluster with no real GPU: a CPU head, and a node that declares one GPU (a
logical resource: torch there sees none), like a mixed cluster's CPU and GPU nodes.

A GPU teacher's extraction actors and a use_gpu run's Train workers must land on the GPU node, where they meet
"torch sees no GPU" with CUDA_VISIBLE_DEVICES set to the GPU Ray gave them (that is how these tests know they asked
for one and got it); a CPU teacher's actors stay on the CPU node; a request no node can meet is refused before any
work."""
import dataclasses

import pytest

from cube_ray.config import ConfigError, DataConfig, SearchConfig, TrainConfig
from cube_ray.extract import extract_all
from cube_ray.model import CubeConfig
from cube_ray.store import EmbeddingStore
from cube_ray.teachers import TeacherError, get_teacher
from cube_ray.train.run import fit, scaling_config
from cube_ray.tune.runner import concurrency, space_for

TEXTS = [f"text number {i} about the capital of France" for i in range(12)]


@pytest.fixture(scope="module")
def mixed_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR")
    yield {"cpu": cluster.head_node.node_id, "gpu": gpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def test_a_cpu_teachers_actors_stay_off_the_gpu_node(mixed_cluster, tmp_path):
    [result] = extract_all(TEXTS, [get_teacher("minilm")], EmbeddingStore(tmp_path), concurrency=2)
    assert result.embedded == len(TEXTS) and result.nodes == (mixed_cluster["cpu"],)


def test_a_gpu_teachers_actors_ask_for_the_gpu_and_run_there(mixed_cluster, tmp_path):
    spec = dataclasses.replace(get_teacher("minilm"), gpus=0.5)
    with pytest.raises(TeacherError, match=r"teacher 'minilm' runs on a GPU \(gpus: 0.5\), but torch .* sees none "
                                           r"here \(CUDA_VISIBLE_DEVICES='0'"):
        extract_all(TEXTS, [spec], EmbeddingStore(tmp_path))


def test_a_gpu_request_no_node_can_meet_is_refused_before_any_work(mixed_cluster, tmp_path):
    spec = dataclasses.replace(get_teacher("minilm"), gpus=2)
    with pytest.raises(ConfigError, match=r"teacher 'minilm' \(gpus: 2\) asks for 2 GPU\(s\) per extraction actor, "
                                          r"but the Ray cluster cannot give them \(the most GPUs on one node is 1 .*\)"):
        extract_all(TEXTS, [spec], EmbeddingStore(tmp_path))
    assert not (tmp_path / "embeddings").exists()  # no actor started, no shard written

    cfg = tiny_config(use_gpu=True, gpus_per_worker=2)
    with pytest.raises(ConfigError, match=r"use_gpu \(gpus_per_worker: 2\) asks for 2 GPU\(s\) per Ray Train worker"):
        fit(cfg, tmp_path / "store", tmp_path / "run")
    assert not (tmp_path / "store" / "embeddings").exists()  # refused before extraction


def tiny_config(**fields) -> TrainConfig:
    return TrainConfig(teachers=["minilm"], data=DataConfig(limit=40), epochs=1, batch_size=8,
                       cube=CubeConfig(dims=[2, 2, 2], channels=4, hidden=8, max_steps=2), **fields)


def test_a_use_gpu_runs_workers_request_their_gpu_share_and_run_on_the_gpu_node(mixed_cluster, tmp_path):
    import ray.train

    cfg = tiny_config(use_gpu=True, gpus_per_worker=0.5)
    scaling = scaling_config(cfg)
    assert scaling.use_gpu and scaling.resources_per_worker == {"CPU": 1, "GPU": 0.5}
    assert scaling_config(tiny_config()).resources_per_worker == {"CPU": 1}
    with pytest.raises(Exception, match=r"use_gpu: this Ray Train worker has no GPU that torch .* can use .*"
                                        r"CUDA_VISIBLE_DEVICES='0'"):
        fit(cfg, tmp_path / "store", tmp_path / "run",
            run_config_kwargs={"failure_config": ray.train.FailureConfig(max_failures=0)})


def test_the_search_runs_as_many_gpu_trials_at_once_as_the_gpus_hold(mixed_cluster):
    search = SearchConfig(space="smoke", name="x", use_gpu=True, gpus_per_worker=0.5)
    space = space_for(search)
    assert space.base.use_gpu and space.base.gpus_per_worker == 0.5
    assert concurrency(search, space) == 2  # 1 GPU / 0.5 (the 3 CPUs would hold 3)
    cpu_search = dataclasses.replace(search, use_gpu=False)
    assert concurrency(cpu_search, space_for(cpu_search)) == 3
