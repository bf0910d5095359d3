"""Faults during training and extraction on a real local Ray with the real minilm teacher: a SIGKILLed training
worker, damaged checkpoints, a kill in the middle of a checkpoint save, a full disk, NaN embeddings in the store and
a store whose width differs from the checkpoint's. Each checks what was already written survives."""
import dataclasses
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cube_ray.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cube_ray.config import DataConfig, TrainConfig
from cube_ray.data.prepare import prepare
from cube_ray.extract import extract_teacher
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig
from cube_ray.store import EmbeddingError, EmbeddingStore, Entry, shard_order
from cube_ray.teachers.registry import get_teacher
from cube_ray.train.run import fit
from cube_ray.train.snapshot import load_for_eval, load_snapshot

LIMIT = 300


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_local):
    return tmp_path_factory.mktemp("store")


def cfg(**kw) -> TrainConfig:
    """A cube big enough that an epoch takes a few seconds (room to kill a worker in the middle of one)."""
    base = TrainConfig(teachers=["minilm"], data=DataConfig(limit=LIMIT),
                       cube=CubeConfig(dims=[6, 6, 6], channels=16, min_steps=2, max_steps=6, update_prob=1.0),
                       adapter=AdapterConfig(io="volume", out="volume"), loss=LossConfig(cosine=1.0, think=0.01),
                       epochs=3, batch_size=16, lr=3e-3, eval_samples=0, keep_checkpoints=2, seed=3)
    return dataclasses.replace(base, **kw)


def epoch_of(folder: Path) -> int:
    return load_checkpoint(folder).state["train_state"]["epoch"]


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_local():
    """This module's own local Ray, with the dashboard: it serves the state API that names this test's workers."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=True, logging_level="ERROR")
    STATE_API["address"] = f"http://{context.dashboard_url}"
    yield ray
    ray.shutdown()


STATE_API: dict[str, str] = {}


def train_worker_pids() -> list[int]:
    """The PIDs of this test's own Ray Train workers, as its own cluster's state API lists them for its own job: on
    a shared host, other people's RayTrainWorker processes are never touched."""
    import ray
    from ray.util.state import list_actors

    mine = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE"),
            ("job_id", "=", ray.get_runtime_context().get_job_id())]
    return [a.pid for a in list_actors(address=STATE_API["address"], filters=mine, timeout=30)]


def test_killed_training_worker_restarts_from_its_last_checkpoint(store, tmp_path, reliability):
    reliability(scenario="worker kill", done="SIGKILL to the Ray Train worker in the middle of epoch 2 of 4")
    out = tmp_path / "run"
    killed: dict = {}

    def kill_mid_epoch():
        wait_for(lambda: (out / "latest" / "checkpoint.json").exists())
        killed["pids"] = train_worker_pids()  # now, not after the sleep: the state API takes a moment to answer
        first = load_checkpoint(out / "latest").state["train_state"]["history"][0]
        killed["row"] = first
        time.sleep(0.4 * first["time_s"])  # well inside epoch 2
        killed["epoch_on_disk"] = epoch_of(out / "latest")
        for pid in killed["pids"]:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_epoch)
    killer.start()
    result = fit(cfg(epochs=4), store, out)
    killer.join()
    assert len(killed["pids"]) == 1 and killed["epoch_on_disk"] == 1
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]  # the configured number of epochs
    assert result.history[0] == killed["row"]  # epoch 1 was not redone: the restart continued from its checkpoint
    assert result.resumed_from is not None and epoch_of(out / "latest") == 4
    assert killed["pids"][0] not in train_worker_pids()
    reliability(outcome="Ray Train restarted the worker group; it resumed after epoch 1 from Ray's checkpoint and "
                        "finished 4 of 4 epochs", lost="none (epoch 1 kept, only the interrupted epoch 2 redone)")


def test_a_worker_killed_inside_an_epoch_resumes_from_its_last_round_bit_for_bit(store, tmp_path, reliability):
    reliability(scenario="worker kill inside an epoch", done="SIGKILL to the Ray Train worker after its second round "
                                                            "of epoch 1 (rounds of 64 samples, 304 samples an epoch)")
    config = cfg(epochs=2, report_every_samples=64)
    whole = fit(config, store, tmp_path / "whole")
    out = tmp_path / "run"
    killed: dict = {}

    def step_in_epoch_1() -> int:
        try:
            state = load_checkpoint(out / "latest").state["train_state"]
        except (FileNotFoundError, OSError, ValueError, CheckpointError):  # not there yet, or being replaced
            return 0
        return state["step_in_epoch"] if state["epoch"] == 0 else 0

    def kill_after_a_round():
        wait_for(lambda: step_in_epoch_1() >= 4)  # the first round: the group is up (asking the state API takes a moment)
        killed["pids"] = train_worker_pids()
        wait_for(lambda: step_in_epoch_1() >= 8)
        for pid in killed["pids"]:
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_a_round)
    killer.start()
    result = fit(config, store, out)
    killer.join()
    assert len(killed["pids"]) == 1
    assert result.resumed_from == str(out / "latest")  # a round's checkpoint inside epoch 1: Ray had none yet
    rounds = load_checkpoint(out / "latest").state["train_state"]["rounds"]
    assert [r["samples_seen"] for r in rounds if r["epoch_progress"] < 1][:2] == [64, 128]
    assert [r["eval"] for r in result.history] == [r["eval"] for r in whole.history]
    final, reference = load_checkpoint(out / "latest").weights, load_checkpoint(whole.out / "latest").weights
    assert all(torch.equal(final[k], reference[k]) for k in reference)  # as if never interrupted
    reliability(outcome="Ray Train restarted the worker group; it continued from the round's latest/ inside epoch 1 "
                        "and ended with the uninterrupted run's weights, bit for bit",
                lost="none (only the steps after the last round redone)")


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_checkpoints_are_named_and_resume_falls_back_to_the_last_good_one(store, tmp_path, reliability):
    reliability(scenario="corrupt checkpoint", done="after 2 of 3 epochs: truncate latest/model.safetensors and "
                                                    "garble Ray's newest checkpoint's state.pt; then --resume")
    out = tmp_path / "run"
    first = fit(cfg(), store, out, stop_after=2)
    ray_checkpoints = sorted((d for d in (out / "ray").glob("*/checkpoint_*") if d.is_dir()), key=epoch_of)
    assert [epoch_of(d) for d in ray_checkpoints] == [1, 2]
    weights = out / "latest" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    garble(ray_checkpoints[1] / "state.pt")
    with pytest.raises(CheckpointError, match=rf"{weights}: corrupt \(sha256 differs"):
        load_snapshot(out / "latest")
    with pytest.raises(CheckpointError, match=rf"{ray_checkpoints[1] / 'state.pt'}: corrupt"):
        load_snapshot(ray_checkpoints[1])

    resumed = fit(cfg(), store, out, resume=True)
    assert resumed.resumed_from == str(ray_checkpoints[0])  # the last good one: epoch 1
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[0] == first.history[0]
    assert epoch_of(out / "latest") == 3  # and latest/ is whole again
    reliability(outcome="CheckpointError names each damaged file; resume skipped both and continued from the "
                        "epoch-1 checkpoint, finishing 3 of 3 epochs", lost="epoch 2 (both of its copies damaged), redone")


SAVER = """
import sys, torch
from cube_ray.checkpoint import save_checkpoint
weights = {"w": torch.randn(4_000_000)}
print("ready", flush=True)
i = int(sys.argv[2])
while True:
    i += 1
    save_checkpoint(sys.argv[1], weights, {"i": i}, {}, {"i": i}, {"i": i})
"""


def test_a_kill_during_a_checkpoint_save_leaves_it_complete_or_absent(tmp_path, reliability):
    reliability(scenario="kill during checkpoint save", done="SIGKILL at random moments to a process saving a 16 MB "
                                                             "checkpoint in a loop, 8 times")
    path, rng, seen = tmp_path / "latest", random.Random(0), []
    for round_ in range(8):
        saver = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(1000 * round_)], stdout=subprocess.PIPE,
                                 text=True)
        assert saver.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 1.0))
        saver.kill()
        saver.wait()
        if round_ == 0 and not path.exists() and not list(tmp_path.glob(".old-*")):
            seen.append(None)  # killed before the first save completed: absent, never half
            continue
        ck = load_checkpoint(path)  # complete (recovering a save cut between its two renames), never half-written
        assert ck.data["i"] == ck.config["i"] == ck.state["i"]
        seen.append(ck.data["i"])
    assert len([i for i in seen if i is not None]) >= 7
    reliability(outcome=f"after each kill the checkpoint loaded whole (sha256-checked); saves seen: {seen}",
                lost="only the save in flight; the previous checkpoint always loaded")


def test_full_disk_during_checkpointing_keeps_the_last_checkpoint(store, tmp_path, small_disk, reliability):
    reliability(scenario="bad input: full disk during checkpointing",
                done="run folder on a 200 MB tmpfs (a checkpoint is ~21 MB), filled up after epoch 1 of 3")
    out = small_disk(tmp_path / "disk", "200m") / "run"
    filler = out.parent / "filler"

    def fill_after_epoch_1():
        wait_for(lambda: (out / "latest" / "checkpoint.json").exists())
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    threading.Thread(target=fill_after_epoch_1, daemon=True).start()
    with pytest.raises(Exception, match="No space left on device") as e:
        fit(cfg(), store, out)
    assert epoch_of(out / "latest") == 1  # intact, loads with every sha256 checked
    filler.unlink()
    resumed = fit(cfg(), store, out, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3] and epoch_of(out / "latest") == 3
    reliability(outcome=f"{type(e.value).__name__}: ... No space left on device (after Ray Train's 2 retries); "
                        "latest/ still loads (epoch 1); with space freed, --resume finished 3 of 3 epochs",
                lost="none (epoch 1 kept)")


def test_full_disk_during_extraction_keeps_written_shards(tmp_path, small_disk, ray_local, reliability):
    reliability(scenario="bad input: full disk during extraction", done=f"store on a 1 MB tmpfs; minilm on the "
                                                                      f"sample's first {LIMIT} pairs (shards of ~400 kB)")
    root = small_disk(tmp_path / "disk", "1m")
    prepared = prepare(DataConfig(limit=LIMIT), root)
    texts, spec, store = prepared.unique_texts(), get_teacher("minilm"), EmbeddingStore(root)
    with pytest.raises(OSError, match=r"shard\(s\) of teacher 'minilm' were not written .*cannot write .*part-0000\d"
                                      r"\.parquet: .*No space left on device"):
        extract_teacher(texts, spec, store, concurrency=1)
    entry = store.entry(spec, shard_order(texts))
    written = [i for i in range(entry.n_shards) if i not in entry.missing_shards()]
    assert not entry.complete and 0 < len(written) < entry.n_shards
    for i in written:  # the shards that made it are whole
        assert pq.read_table(entry.shard_path(i)).num_rows > 0
    subprocess.run(["mount", "-o", "remount,size=32m", str(root)], check=True)
    again = extract_teacher(texts, spec, store, concurrency=1)
    assert again.entry.complete and again.embedded == len(texts) - 256 * len(written)
    reliability(outcome=f"OSError naming the shard file and 'No space left on device'; no entry.json; "
                        f"{len(written)} of {entry.n_shards} shards kept; with space, the re-run embedded only the "
                        f"{again.embedded} missing texts",
                lost="none")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    fit(cfg(epochs=1), store, out)
    return out


def copy_store(store: Path, to: Path) -> tuple[Path, Path]:
    """A copy of the store, and its minilm entry folder."""
    shutil.copytree(store, to)
    (entry,) = [d for d in (to / "embeddings" / "minilm").iterdir() if (d / "entry.json").exists()]
    return to, entry


def test_nan_and_inf_embeddings_in_the_store_are_refused(store, trained, tmp_path, reliability):
    reliability(scenario="bad input: NaN or inf embeddings in the store", done="one row of a stored shard set to NaN, "
                                                                              "another to inf; then train on it")
    root, entry = copy_store(store, tmp_path / "store")
    shard = entry / "part-00000.parquet"
    table = pq.read_table(shard)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    emb[5, 7], emb[9, 0] = np.nan, np.inf
    table = table.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
    pq.write_table(table, shard)
    with pytest.raises(EmbeddingError, match=rf"^store {root}: teacher 'minilm': \d+ non-finite \(NaN or inf\) "
                                             r"embedding\(s\); first at text row \d+: '.+'$") as e:
        fit(cfg(epochs=1), root, tmp_path / "run")
    assert not (tmp_path / "run" / "latest").exists()  # nothing trained on it, no checkpoint
    reliability(outcome=f"EmbeddingError before any training: {str(e.value).replace(str(root), 'STORE')[:110]}",
                lost="none (no checkpoint written)")


def test_store_width_differs_from_the_checkpoint(store, trained, tmp_path, reliability):
    reliability(scenario="bad input: width mismatch between store and checkpoint",
                done="a 384-d minilm checkpoint evaluated against a store whose minilm entry holds 300-d vectors")
    root, entry = copy_store(store, tmp_path / "store")
    rng = np.random.default_rng(0)
    for shard in entry.glob("part-*.parquet"):
        table = pq.read_table(shard)
        texts = table.column("text").to_pylist()
        Entry(entry, get_teacher("minilm"), "", 0).write_shard(int(shard.stem.split("-")[1]), texts,
                                                                rng.standard_normal((len(texts), 300)).astype(np.float32))
    ck = load_checkpoint(trained / "latest")
    moved = save_checkpoint(tmp_path / "ck", ck.weights, ck.config, ck.teachers, {**ck.data, "store": str(root)}, ck.state)
    with pytest.raises(CheckpointError, match=rf"{moved}: trained on 384-d 'minilm' embeddings, but store {root} "
                                              r"holds 300-d ones"):
        load_for_eval(moved)
    reliability(outcome="CheckpointError naming the checkpoint, the store and both widths", lost="none")
