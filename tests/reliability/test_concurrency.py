"""Two runs side by side, as real processes: two writers of one latest/, a reader beside a writer, two runs locking
the same folder, two extractions of the same store entry. No Ray: each takes seconds."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cube_ray.checkpoint import load_checkpoint, save_checkpoint
from cube_ray.config import SearchConfig, TrainConfig
from cube_ray.fsutil import FolderLocked, folder_lock
from cube_ray.store import EmbeddingStore, shard_order
from cube_ray.teachers.registry import get_teacher
from cube_ray.train.run import fit
from cube_ray.tune.runner import run_search

KEEPER = """
import sys, time
from pathlib import Path
from cube_ray.train.callbacks import keep_as
print("ready", flush=True)
sys.stdin.readline()
n, end = 0, time.time() + float(sys.argv[3])
while time.time() < end:
    keep_as(Path(sys.argv[1]), Path(sys.argv[2]))
    n += 1
print(n, flush=True)
"""

SAVER = """
import sys, time, torch
from cube_ray.checkpoint import save_checkpoint
print("ready", flush=True)
sys.stdin.readline()
i, end = 0, time.time() + float(sys.argv[2])
while time.time() < end:
    i += 1
    save_checkpoint(sys.argv[1], {"w": torch.full((1000,), float(i))}, {"i": i}, {}, {"i": i}, {"i": i})
print(i, flush=True)
"""

HOLDER = """
import sys
from cube_ray.fsutil import folder_lock
with folder_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.readline()
"""

EXTRACTOR = """
import sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from cube_ray.fsutil import atomic_path, folder_lock
from cube_ray.store import EmbeddingStore, shard_order, shard_schema, text_id
from cube_ray.teachers.registry import get_teacher
texts = shard_order(sys.argv[2:])
entry = EmbeddingStore(sys.argv[1]).entry(get_teacher("minilm"), texts)
emb = np.random.default_rng(0).standard_normal((len(texts), 384)).astype(np.float32)
table = pa.Table.from_arrays([pa.array([text_id(t) for t in texts]), pa.array(texts),
                              pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 384)], schema=shard_schema(384))
with folder_lock(entry.dir, "extraction", wait=True):
    with atomic_path(entry.shard_path(0)) as tmp:  # a shard in flight, as a ShardEmbedder writes it
        pq.write_table(table, tmp)
        print(tmp, flush=True)
        sys.stdin.readline()
    entry.finish(384, 0.0)
"""

SECOND_EXTRACTION = """
import logging, sys
from cube_ray.extract import extract_teacher
from cube_ray.store import EmbeddingStore
from cube_ray.teachers.registry import get_teacher
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
result = extract_teacher(sys.argv[2:], get_teacher("minilm"), EmbeddingStore(sys.argv[1]))
print("cached" if result.cached else "extracted", result.embedded, flush=True)
"""


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ready(*procs: subprocess.Popen) -> None:
    for p in procs:
        assert p.stdout.readline().strip() in ("ready", "locked"), p.stderr.read()


def go(*procs: subprocess.Popen) -> None:
    ready(*procs)
    for p in procs:  # released together, so their loops overlap
        p.stdin.write("go\n")
        p.stdin.flush()


def finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    return out.strip()


def strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")))


def test_two_writers_of_latest_race_without_errors_or_strays(tmp_path, reliability):
    reliability(scenario="two writers of one latest/", done="two processes put their own checkpoint at the same "
                                                             "latest/ (keep_as) in a tight loop for 2 s, a reader loads it")
    sources = {}
    for name in ("a", "b"):
        sources[name] = save_checkpoint(tmp_path / "src" / name, {"w": torch.full((1000,), float(ord(name)))},
                                        {"writer": name}, {}, {"writer": name})
    run = tmp_path / "run"
    run.mkdir()
    writers = [start(KEEPER, sources[n], run / "latest", 2.0) for n in sources]
    go(*writers)
    reads = 0
    while any(w.poll() is None for w in writers):
        ck = load_checkpoint(run / "latest") if reads or (run / "latest").exists() else None
        if ck is not None:
            assert ck.config["writer"] == ck.data["writer"] and ck.weights["w"][0] == ord(ck.config["writer"])
            reads += 1
    saves = [int(finish(w)) for w in writers]
    assert min(saves) > 50 and reads > 10
    assert strays(run) == [] and [p.name for p in run.iterdir()] == ["latest"]
    assert load_checkpoint(run / "latest").config["writer"] in sources  # whole: the last writer's
    reliability(outcome=f"{sum(saves)} swaps ({saves[0]} + {saves[1]}) without an error, {reads} loads all whole; "
                        "no .old-*/.tmp-* left, latest/ complete", lost="none")


def test_a_reader_beside_a_writer_never_fails_and_never_undoes_a_save(tmp_path, reliability):
    reliability(scenario="reader beside a checkpoint writer", done="one process saves latest/ in a loop for 2 s, "
                                                                   "another loads it in a loop")
    path = tmp_path / "latest"
    writer = start(SAVER, path, 2.0)
    go(writer)
    seen = []
    while writer.poll() is None:
        if not seen and not path.exists():
            continue  # the first save is not in yet
        ck = load_checkpoint(path)
        assert ck.data["i"] == ck.config["i"] == ck.state["i"] == int(ck.weights["w"][0])  # one save, whole
        seen.append(ck.data["i"])
    last = int(finish(writer))  # the writer never failed: no reader moved a folder under it
    assert len(seen) > 10 and seen == sorted(seen)  # never an older save after a newer one
    assert load_checkpoint(path).data["i"] == last and strays(tmp_path) == []
    reliability(outcome=f"{len(seen)} loads, each one whole save, never going back; the writer's {last} saves all "
                        "succeeded and its last one is latest/", lost="none")


def test_a_second_training_or_search_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, reliability):
    reliability(scenario="two runs on one folder", done="another process holds the --out / experiment folder's "
                                                        "lock; fit, run_search and run_search(resume=True) on it")
    out, exp = tmp_path / "run", tmp_path / "results" / "shared"
    holders = [start(HOLDER, out, "training run"), start(HOLDER, exp, "search")]
    ready(*holders)  # each holds its lock until told otherwise
    train_pid, search_pid = (h.pid for h in holders)
    with pytest.raises(FolderLocked, match=rf"^{out} is in use by another training run: process {train_pid} on .+ "
                                           rf"holds its lock \({out / '.lock'}\)") as refused:
        fit(TrainConfig(), tmp_path / "store", out)
    search = SearchConfig(out=str(tmp_path / "results"), name="shared", store=str(tmp_path / "store"))
    with pytest.raises(FolderLocked, match=rf"^{exp} is in use by another search: process {search_pid} on "):
        run_search(search)
    (exp / "search.yaml").write_text("name: shared\n")
    with pytest.raises(FolderLocked, match=rf"process {search_pid} on "):
        run_search(search, resume=True)
    assert not (out / "latest").exists() and sorted(p.name for p in exp.iterdir()) == [".lock", "search.yaml"]
    os.kill(train_pid, signal.SIGKILL)  # a holder killed outright: the kernel drops its lock
    holders[1].communicate("done\n", timeout=60)  # the other lets go
    holders[0].wait(timeout=60)
    with folder_lock(out, "training run"), folder_lock(exp, "search"):
        assert (out / ".lock").read_text().split()[0] == str(os.getpid())
    reliability(outcome=f"FolderLocked at once, before any work: {str(refused.value).replace(str(tmp_path), 'TMP')}",
                lost="none (the holder's folder untouched)")


def test_a_second_extraction_of_an_entry_waits_and_leaves_the_first_ones_shard_in_flight(tmp_path, reliability):
    reliability(scenario="two extractions of one store entry", done="one process holds the entry with a shard "
                                                                    "in flight (.tmp-part-*); extract_teacher in another")
    texts = ["What is a cube?", "A solid with six square faces.", "How many edges?"]
    first = start(EXTRACTOR, tmp_path, *texts)
    in_flight = Path(first.stdout.readline().strip())
    assert in_flight.name.startswith(".tmp-part-00000.parquet.") and in_flight.exists(), first.stderr.read()
    second = start(SECOND_EXTRACTION, tmp_path, *texts)
    for line in second.stderr:  # until it says it waits for the first
        if "waiting for another extraction" in line:
            break
    else:
        pytest.fail(f"the second extraction did not wait: {second.communicate()}")
    time.sleep(0.5)
    assert in_flight.exists()  # the second one's clean-up did not touch it
    first.stdin.write("go\n")
    first.stdin.flush()
    finish(first)
    assert finish(second) == "cached 0"  # it reused the entry the first completed
    entry = EmbeddingStore(tmp_path).entry(get_teacher("minilm"), shard_order(texts))
    assert entry.complete and entry.lookup(texts).shape == (3, 384) and strays(entry.dir) == []
    reliability(outcome="the second extraction waited for the entry's lock, then reused the completed entry; the "
                        "first one's shard in flight survived", lost="none")
