"""Ray Train cube training on a real local Ray, the real minilm teacher and the bundled SQuAD sample."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from cube_ray.checkpoint import load_checkpoint
from cube_ray.config import ConfigError, DataConfig, TrainConfig
from cube_ray.data.prepare import prepare
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig
from cube_ray.evaluate import student_metrics
from cube_ray.experiment import INIT_FROM
from cube_ray.store import EmbeddingError, EmbeddingStore
from cube_ray.teachers.model import Teacher
from cube_ray.train.calibration import MIXES
from cube_ray.train.data import load_shard, load_split
from cube_ray.train.loop import next_round_s
from cube_ray.train.run import embed_held_out, fit, prepare_run
from cube_ray.train.snapshot import load_for_eval, load_snapshot


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_local):
    return tmp_path_factory.mktemp("store")


def small(**kw) -> TrainConfig:
    """A tiny cube that learns (volume in/out), every cell updating (no sampling noise between runs)."""
    base = TrainConfig(teachers=["minilm"], data=DataConfig(limit=300),
                       cube=CubeConfig(dims=[4, 4, 4], channels=8, min_steps=1, max_steps=3, update_prob=1.0),
                       adapter=AdapterConfig(io="volume", out="volume"), loss=LossConfig(cosine=1.0, think=0.01),
                       epochs=2, batch_size=32, lr=3e-3, eval_samples=2, seed=7)
    return dataclasses.replace(base, **kw)


def weights(folder):
    return load_checkpoint(folder, with_state=False).weights


def close(a, b, tol):
    return all(torch.allclose(a[k], b[k], atol=tol) for k in a)


@pytest.fixture(scope="module")
def baseline(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return fit(small(), store, out)


def test_two_workers_write_three_checkpoints_and_eval_samples(store, tmp_path):
    result = fit(small(workers=2), store, tmp_path / "run")
    assert len(result.history) == 2
    for name in ("latest", "best_loss", "best_eval"):
        snap = load_snapshot(tmp_path / "run" / name, with_state=True)
        assert snap.cfg.workers == 2 and "centre.minilm" in snap.checkpoint.weights
    assert load_checkpoint(tmp_path / "run" / "latest").state["train_state"]["epoch"] == 2
    sample = (tmp_path / "run" / "eval_samples" / "epoch_002.txt").read_text()
    assert sample.count("Q: ") == 2 and sample.count("GOLD: ") == 2 and "  1. (" in sample
    assert (tmp_path / "run" / "eval_samples" / "epoch_001.txt").exists()
    assert result.history[-1]["samples_per_s"] > 0 and 1 <= result.history[-1]["expected_steps"] <= 3


def test_a_val_split_picks_the_model_and_eval_stays_unseen(store, tmp_path):
    result = fit(small(data=DataConfig(limit=300, val_fraction=0.3), epochs=1), store, tmp_path / "run")
    snap = load_snapshot(tmp_path / "run" / "latest")
    data = snap.checkpoint.data
    assert set(data["splits"]) == {"train", "val", "eval"}
    split = {name: load_split(EmbeddingStore(store), data["dataset_id"], name, snap.checkpoint.teachers).centred(snap.centres)
             for name in ("val", "eval")}
    scored = {name: student_metrics(snap.student, pairs)["minilm"]["mrr"] for name, pairs in split.items()}
    assert result.history[-1]["minilm/mrr"] == pytest.approx(scored["val"], abs=1e-6)
    assert result.history[-1]["minilm/mrr"] != pytest.approx(scored["eval"], abs=1e-3)
    assert load_for_eval(tmp_path / "run" / "best_eval").picked_on == "val"  # what the report states
    # the residual mix the checkpoint keeps is the one val scores best, picked at the epoch's end
    assert snap.student.residual_mix.item() == pytest.approx(result.history[-1]["mix/minilm"])
    by_mix = {}
    for mix in MIXES:
        snap.student.residual_mix.fill_(mix)
        by_mix[mix] = student_metrics(snap.student, split["val"])["minilm"]["mrr"]
    assert result.history[-1]["minilm/mrr"] == pytest.approx(max(by_mix.values()), abs=1e-6)
    assert by_mix[1.0] != pytest.approx(by_mix[0.0], abs=1e-4)  # the cube changed its input: the pick had a choice


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_equals_an_uninterrupted_run(store, tmp_path, workers):
    # the default update_prob (0.5): every rank draws its own cell updates, so every rank's RNG must resume
    cfg = small(epochs=4, schedule="cosine", workers=workers, cube=dataclasses.replace(small().cube, update_prob=0.5))
    whole = fit(cfg, store, tmp_path / "whole")
    first = fit(cfg, store, tmp_path / "split", stop_after=2)
    assert len(first.history) == 2
    second = fit(cfg, store, tmp_path / "split", resume=True)
    assert [h["epoch"] for h in second.history] == [1, 2, 3, 4]  # the history travels in the TrainState
    assert close(weights(tmp_path / "whole" / "latest"), weights(tmp_path / "split" / "latest"), 1e-5)
    for a, b in zip(whole.history, second.history):
        assert a["eval"] == pytest.approx(b["eval"], abs=1e-5) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_a_curriculum_scores_every_epoch_with_the_steps_it_trained_with(store, tmp_path):
    """Warm-up 2 from competence 0.01: caps 1, 2, 3 over three epochs; each epoch's score and its checkpoint run its cap."""
    loss = LossConfig(cosine=1.0, think=0.01, curriculum=True, curriculum_warmup=2, curriculum_start=0.01)
    result = fit(small(epochs=3, loss=loss, patience=0), store, tmp_path / "run")
    assert [h["step_cap"] for h in result.history] == [1, 2, 3]
    assert all(h["minilm/steps"] <= h["step_cap"] for h in result.history)
    assert result.history[0]["minilm/steps"] == 1.0  # capped at one step, whatever the gate says
    best = load_for_eval(tmp_path / "run" / "best_eval")
    picked = max(result.history, key=lambda h: h["eval"])
    assert int(best.student.step_cap) == picked["step_cap"]  # evaluate runs the picked epoch's steps
    assert student_metrics(best.student, best.held_out)["minilm"]["steps"] <= picked["step_cap"]


def test_stages_train_their_modes_in_turn_scored_on_the_task_and_resume_across_them(store, tmp_path):
    """[autoencoder, dialogue] over 4 epochs: the residual student starts at the autoencoder's optimum (its loss is
    the thinking cost alone), then learns Q->A from the best model so far; every epoch is scored on Q->A. Stopped at
    the stages' boundary and resumed, the run is the uninterrupted one."""
    cfg = small(epochs=4, stages=["autoencoder", "dialogue"], cube=dataclasses.replace(small().cube, update_prob=0.5))
    whole = fit(cfg, store, tmp_path / "whole")
    assert all(h["eval"] == h["minilm/mrr"] for h in whole.history)  # the task's metric, not the reconstruction
    epoch = whole.history[0]["samples_seen"]  # ASHA's clock (task_samples) starts with the Q->A stage
    assert [h["task_samples"] for h in whole.history] == [0, 0, epoch, 2 * epoch]
    rounds = load_checkpoint(tmp_path / "whole" / "latest").state["train_state"]["rounds"]  # where reports find rungs
    assert all(r["task_samples"] == max(0, r["samples_seen"] - 2 * epoch) for r in rounds)
    assert [r["task_samples"] for r in rounds if r["samples_seen"] % epoch == 0] == [0, 0, epoch, 2 * epoch]
    losses = [h["loss"] for h in whole.history]
    assert max(losses[:2]) < 0.1 < min(losses[2:]), losses
    first = fit(cfg, store, tmp_path / "split", stop_after=2)
    second = fit(cfg, store, tmp_path / "split", resume=True)
    assert len(first.history) == 2 and [h["epoch"] for h in second.history] == [1, 2, 3, 4]
    assert close(weights(tmp_path / "whole" / "latest"), weights(tmp_path / "split" / "latest"), 1e-5)
    for a, b in zip(whole.history, second.history):
        assert a["eval"] == pytest.approx(b["eval"], abs=1e-5) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


def test_init_from_starts_where_the_other_run_ended(store, baseline, tmp_path):
    """From the baseline run's folder (its best_eval/): everything matches, and at a learning rate of ~0 the first
    epoch scores what the baseline's best checkpoint scored."""
    result = fit(small(init_from=str(baseline.out), lr=1e-9, schedule="none", epochs=1), store, tmp_path / "warm")
    summary = json.loads((tmp_path / "warm" / INIT_FROM).read_text())
    assert summary == {"from": str(baseline.out / "best_eval"), "loaded": ["adapters.minilm", "core"], "new": []}
    assert result.history[0]["eval"] == pytest.approx(max(h["eval"] for h in baseline.history), abs=1e-4)
    with pytest.raises(ConfigError, match="is not a checkpoint folder"):  # refused before anything is written
        fit(small(init_from=str(tmp_path / "nowhere")), store, tmp_path / "cold")
    assert not (tmp_path / "cold").exists()


def test_a_resume_with_another_config_is_refused_naming_what_differs(store, baseline):
    before = (baseline.out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"trained with another config .*differing: lr: 0.003 -> 0.01; seed: 7 -> 8\."):
        fit(small(lr=1e-2, seed=8), store, baseline.out, resume=True)
    assert (baseline.out / "config.yaml").read_text() == before  # refused before anything is written


def test_fresh_run_refuses_to_overwrite(store, baseline):
    with pytest.raises(FileExistsError, match="pass --resume"):
        fit(small(), store, baseline.out)


CONTRASTIVE = LossConfig(cosine=1.0, infonce=0.5, triplet=0.2, think=0.01)  # whole-batch terms: the split must not show


@pytest.fixture(scope="module")
def contrastive(store, tmp_path_factory):
    return fit(small(loss=CONTRASTIVE), store, tmp_path_factory.mktemp("contrastive"))


def test_memory_budget_forces_a_shrink_with_the_same_effective_batch(store, contrastive, tmp_path):
    result = fit(small(loss=CONTRASTIVE, memory_budget_mb=1), store, tmp_path / "tight")
    assert any("probe" in d and "-> 1:" in d for d in result.batch_decisions)
    assert result.history[-1]["micro_batch"] == 1 and result.history[-1]["accumulation"] == 32
    # the same loss and gradients up to rounding (tests/train/test_step.py: 1e-5 per step); over two epochs Adam
    # amplifies the rounding of batch-32 vs batch-1 matmuls in near-zero-gradient weights: measured 1.1e-4 here.
    # Per-micro-batch InfoNCE would be 0 at micro-batch 1 and train another model altogether.
    assert close(weights(contrastive.out / "latest"), weights(tmp_path / "tight" / "latest"), 3e-4)
    assert result.history[-1]["eval"] == pytest.approx(contrastive.history[-1]["eval"], abs=1e-3)
    assert result.history[-1]["train/minilm/infonce"] == pytest.approx(contrastive.history[-1]["train/minilm/infonce"],
                                                                       abs=1e-4)  # over 32, not 32 batches of one


def test_injected_oom_is_survived(store, contrastive, tmp_path):
    result = fit(small(loss=CONTRASTIVE, inject_oom_at_step=3), store, tmp_path / "oom")
    assert any("out of memory (injected at step 3); retrying the step" in d for d in result.batch_decisions)
    assert len(result.history) == 2 and result.history[-1]["micro_batch"] == 16
    assert close(weights(contrastive.out / "latest"), weights(tmp_path / "oom" / "latest"), 1e-4)


def test_early_stopping_fires(store, tmp_path):
    result = fit(small(epochs=6, lr=1e-9, patience=1, schedule="none"), store, tmp_path / "early")
    assert len(result.history) == 2 and result.stopped.startswith("early stop")


@pytest.mark.parametrize("mode", ["autoencoder", "dual"])
def test_other_modes_train(store, tmp_path, mode):
    result = fit(small(mode=mode, epochs=1), store, tmp_path / mode)
    key = "minilm/recon_cos" if mode == "autoencoder" else "minilm/mrr"
    assert len(result.history) == 1 and result.history[0][key] > 0


@pytest.mark.parametrize("mode", ["adaptive", "agreement"])
def test_teacher_weights_follow_each_teachers_score_on_the_picking_split(store, tmp_path, mode):
    from cube_ray.model import WeightingConfig
    from cube_ray.teachers import load_registry
    from tests.conftest import make_tiny_teacher

    registry = {**load_registry(), "tiny-llama": make_tiny_teacher(tmp_path / "tiny", "llama")}
    result = fit(small(teachers=["minilm", "tiny-llama"], epochs=1, weighting=WeightingConfig(mode=mode, temperature=0.1)),
                 store, tmp_path / mode, registry=registry)
    row = result.history[0]
    if mode == "adaptive":  # softmax(MRR / temperature): the teacher the student retrieves best in weighs most
        expected = torch.softmax(torch.tensor([row["minilm/mrr"], row["tiny-llama/mrr"]]) / 0.1, 0).tolist()
        assert row["minilm/mrr"] != pytest.approx(row["tiny-llama/mrr"], abs=0.01)
    else:  # two teachers agree with each other as much as the other way round
        expected = [0.5, 0.5]
    assert [row["weight/minilm"], row["weight/tiny-llama"]] == pytest.approx(expected, abs=1e-6)


def test_distill_mode_with_two_teachers(store, tmp_path):
    from cube_ray.teachers import load_registry
    from tests.conftest import make_tiny_teacher

    registry = {**load_registry(), "tiny-llama": make_tiny_teacher(tmp_path / "tiny", "llama")}
    result = fit(small(mode="distill", teachers=["minilm", "tiny-llama"], epochs=1), store, tmp_path / "distill",
                 registry=registry)
    row = result.history[0]
    assert {"train/minilm/cosine", "train/tiny-llama/cosine", "weight/minilm", "weight/tiny-llama"} <= set(row)
    assert row["weight/minilm"] == pytest.approx(0.5)


def test_a_fused_student_trains_on_every_teachers_embeddings_and_evaluates_in_every_space(store, tmp_path):
    """fusion concat, micro-batches of 8 (the gradient cache): the checkpoint is a fused student with its mix, scored
    in each teacher space from both teachers' embeddings, and the criteria hold its cross-teacher shares."""
    from cube_ray.evaluate import comparison, with_criteria
    from cube_ray.teachers import load_registry
    from tests.conftest import make_tiny_teacher

    registry = {**load_registry(), "tiny-llama": make_tiny_teacher(tmp_path / "tiny", "llama")}
    cfg = small(fusion="concat", teachers=["minilm", "tiny-llama"], epochs=1, max_micro_batch=8)
    result = fit(cfg, store, tmp_path / "fused", registry=registry)
    row = result.history[0]
    assert {"minilm/mrr", "tiny-llama/mrr", "train/minilm/cosine", "train/tiny-llama/cosine"} <= set(row)
    assert row["micro_batch"] == 8
    loaded = load_for_eval(tmp_path / "fused" / "best_eval")
    assert loaded.student.fused and loaded.student.concat_mix is not None
    # each teacher's input scale: the RMS norm of its centred train embeddings (here the train split is the shard)
    rms = [torch.cat([loaded.train.q[t], loaded.train.a[t]]).square().sum(1).mean().sqrt().item() for t in cfg.teachers]
    assert loaded.student.input_scale.tolist() == pytest.approx(rms, rel=1e-4)
    mrr = student_metrics(loaded.student, loaded.held_out)
    assert mrr["minilm"]["mrr"] == pytest.approx(row["minilm/mrr"], abs=1e-6)  # eval is the picking split here
    table = with_criteria(comparison(loaded.student, loaded.train, loaded.held_out), loaded)
    assert {"reconstruction_cos", "cross_teacher_share/tiny-llama"} <= set(table["minilm"]["criteria"])


def test_each_worker_gets_its_row_range_of_the_train_split_as_numpy_blocks(store):
    """The driver reads the train split once (Ray Data) and leaves worker k rows [k·N/W, (k+1)·N/W) in the object
    store as plain NumPy columns: what a worker loads is exactly the split's rows, embeddings included."""
    data = prepare_run(small(workers=2), store)
    blocks = [ray.get(refs) for refs in data.shards]
    assert all(isinstance(b["q_minilm"], np.ndarray) for bs in blocks for b in bs)
    split = load_split(EmbeddingStore(store), data.dataset_id, "train", data.specs)
    half = data.rows // 2
    for rows, bs in zip([range(half), range(half, data.rows)], blocks):
        shard = load_shard(bs, ["minilm"])
        order = sorted(rows, key=lambda i: split.ids[i])  # a shard is sorted by id
        assert shard.ids == [split.ids[i] for i in order]
        assert torch.equal(shard.q["minilm"], split.q["minilm"][order])
        assert torch.equal(shard.a["minilm"], split.a["minilm"][order])


def test_a_search_embeds_the_held_out_split_after_the_texts_its_trials_read(tmp_path, ray_local):
    """prepare_run(held_out_later=True), as a search calls it, embeds the train and val texts, which is all a run
    reads while it trains; embed_held_out then embeds the held-out split's texts, and only those."""
    store = EmbeddingStore(tmp_path / "store")
    cfg = small(data=DataConfig(limit=120, val_fraction=0.3), epochs=1)
    data = prepare_run(cfg, store.root, held_out_later=True)
    assert data.held_out_s > 0  # what the search keeps of its wall budget for it
    with pytest.raises(EmbeddingError, match="no complete 'minilm' embeddings"):
        load_split(store, data.dataset_id, "eval", data.specs)
    result = fit(cfg, store.root, tmp_path / "run", data=data)
    assert result.history[-1]["minilm/mrr"] > 0  # scored on val
    [later] = embed_held_out(data)
    prepared = prepare(cfg.data, store.root)
    eval_only = set(prepared.unique_texts()) - set(prepared.unique_texts(skip="eval"))
    assert later.embedded == len(eval_only) and later.reused == len(prepared.unique_texts(skip="eval"))
    whole = store.dataset_entry(data.dataset_id, data.specs["minilm"])
    assert whole.complete and whole.dir == Path(data.data_ref["entries"]["minilm"])
    held_out = load_split(store, data.dataset_id, "eval", data.specs)
    first = EmbeddingStore(store.root).dataset_entry(data.dataset_id, data.specs["minilm"], "val")
    assert first.dir == whole.dir  # complete now: every split reads the whole entry
    direct = Teacher(data.specs["minilm"]).embed([held_out.questions[3]])
    np.testing.assert_allclose(held_out.q["minilm"][3:4].numpy(), direct, atol=1e-4)
    # a prepare_run that finds the whole entry leaves nothing for later
    assert prepare_run(cfg, store.root, held_out_later=True).held_out_s is None


def test_in_a_tune_trial_the_loop_trains_as_in_a_ray_train_run(store, tmp_path):
    """A search's 1-worker trial runs the loop right in its Tune trial (fit_in_trial, reporting through TuneSession);
    a Ray Train run (fit, TrainSession) of the same config and seed gives the same rounds, epochs and weights."""
    import ray.tune

    from cube_ray.train.run import fit_in_trial

    cfg = small(report_every_samples=96)  # rounds inside the epochs too
    trained = fit(cfg, store, tmp_path / "train")
    data = prepare_run(cfg, store)

    def trainable(config):
        fit_in_trial(cfg, tmp_path / "trial", data, resume=False)

    results = ray.tune.Tuner(ray.tune.with_resources(trainable, {"CPU": 1}),
                             run_config=ray.tune.RunConfig(name="one", storage_path=str(tmp_path / "tune"))).fit()
    assert not results.errors
    timed = {"time_s", "cost_s", "samples_per_s", "peak_rss_mb", "at"}  # wall-clock figures
    state = {run: load_checkpoint(tmp_path / run / "latest").state["train_state"] for run in ("train", "trial")}
    for key in ("history", "rounds"):
        rows = {run: [{k: v for k, v in r.items() if k not in timed} for r in s[key]] for run, s in state.items()}
        assert rows["trial"] == rows["train"] and len(rows["train"]) > len(trained.history) * (key == "rounds")
    assert [r["eval"] for r in results[0].metrics_dataframe.dropna(subset=["eval"]).to_dict("records")] == \
        [h["eval"] for h in trained.history]  # Tune got every epoch's report
    a, b = weights(tmp_path / "train" / "best_eval"), weights(tmp_path / "trial" / "best_eval")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_on_the_cost_clock_rounds_come_by_seconds_and_the_stage_budget_ends_the_first_stage_early(store, tmp_path):
    """A search on the cost clock sets report_every_s (a round every so many training seconds) and, for a staged
    trial, stage_budget_s: its autoencoder stage ends once it has trained that long, inside an epoch, long before the
    plan's two epochs; ASHA's sample count of the task starts there."""
    every, budget = 0.05, 0.1
    cfg = small(epochs=4, batch_size=8, stages=["autoencoder", "dialogue"], report_every_s=every, stage_budget_s=budget)
    result = fit(cfg, store, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "latest").state["train_state"]
    epoch = result.history[0]["samples_seen"]
    assert state["stage"] == 1 and 0 < state["task_start"] < 2 * epoch and state["task_start"] % epoch  # mid-epoch
    rounds = state["rounds"]
    assert all(r["task_samples"] == max(0, r["samples_seen"] - state["task_start"]) for r in rounds)
    before = [r for r in rounds if r["samples_seen"] <= state["task_start"]]
    assert before and all(r["time_s"] < budget + 1.0 for r in before)  # the stage's rounds: within its budget (+ a step)
    inside = [r["cost_s"] // every for r in rounds if r["samples_seen"] % epoch]  # rounds inside epochs: by seconds
    assert len(inside) >= 3 and inside == sorted(set(inside))


def test_with_report_growth_rounds_fall_at_the_rungs_only(store, tmp_path):
    """A search sets report_growth to ASHA's factor: rounds inside an epoch come once the training seconds reach
    every x growth^k (the rungs), one a rung, and none between, where ASHA decides nothing."""
    assert [next_round_s(TrainConfig(report_every_s=3, report_growth=3), last) for last in (0, 2.9, 3.0, 9.5, 30)] \
        == [3, 3, 9, 27, 81]
    assert [next_round_s(TrainConfig(report_every_s=3), last) for last in (0, 3.0, 9.5)] == [3, 6, 12]
    every, growth = 0.01, 2.0
    result = fit(small(epochs=2, batch_size=8, report_every_s=every, report_growth=growth), store, tmp_path / "run")
    rounds = load_checkpoint(tmp_path / "run" / "latest").state["train_state"]["rounds"]
    epoch = result.history[0]["samples_seen"]
    rung = lambda seconds: math.floor(math.log(seconds / every, growth) + 1e-9)  # noqa: E731
    inside = [rung(r["cost_s"]) for r in rounds if r["samples_seen"] % epoch]
    assert len(inside) >= 3 and inside == sorted(set(inside))  # one round a rung
    steps = 2 * epoch // 8
    assert len(rounds) < steps / 4  # not a round every 10 ms
    # a round inside an epoch scores as many of the slice's queries as it trained samples (64 at least)
    split = rounds[-1]["round_queries"]  # the epoch's end: the whole split
    trained = [(r["round_queries"], r["samples_seen"] - before["samples_seen"]) for before, r in zip(rounds, rounds[1:])
               if r["samples_seen"] % epoch]
    assert trained and all(n == min(max(64, samples), split) for n, samples in trained)
    assert any(n < split for n, _ in trained)


def test_on_the_cost_clock_a_step_longer_than_a_round_is_judged_before_it_runs(store, tmp_path):
    """A config so slow that one step outlasts a round (here: rounds of 1 ms) reports each round before the step it
    would overrun, charged with that step (`cost_s` ahead of `time_s`), so ASHA judges it at the rung on what it has
    learnt so far; the first, before any step, on the batch probe's estimate."""
    result = fit(small(epochs=1, report_every_s=0.001), store, tmp_path / "run")
    rounds = load_checkpoint(tmp_path / "run" / "latest").state["train_state"]["rounds"]
    epoch = result.history[0]["samples_seen"]
    inside = [r for r in rounds if r["samples_seen"] < epoch]
    assert inside[0]["samples_seen"] == 0 and inside[0]["time_s"] < inside[0]["cost_s"]
    # each before a step (none after one), charged with it: nearly every step crosses a millisecond boundary
    assert all(r["cost_s"] > r["time_s"] for r in inside) and len(inside) >= epoch // 32 // 2
    assert [r["samples_seen"] for r in inside] == sorted({r["samples_seen"] for r in inside})
    assert rounds[-1]["cost_s"] == rounds[-1]["time_s"]  # the epoch's end: nothing ahead
