"""evaluate and infer on a checkpoint trained briefly by Ray Train on the bundled sample (real minilm)."""
import json

import pytest
import torch

from cube_ray import evaluate, infer
from cube_ray.checkpoint import CheckpointError
from cube_ray.config import DataConfig, TrainConfig
from cube_ray.model import AdapterConfig, CubeConfig, LossConfig, Student
from cube_ray.train.data import Pairs
from cube_ray.train.run import fit
from cube_ray.train.snapshot import load_for_eval
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("eval")
    cfg = TrainConfig(teachers=["minilm"], data=DataConfig(limit=300), epochs=2, batch_size=32, lr=3e-3,
                      cube=CubeConfig(dims=[4, 4, 4], min_steps=1, max_steps=3), loss=LossConfig(cosine=1.0, infonce=0.5),
                      adapter=AdapterConfig(io="volume", out="volume"), eval_samples=0)
    fit(cfg, root / "store", root / "run")
    return root / "run" / "best_eval"


@pytest.mark.parametrize("center", [False, True])
def test_an_untrained_residual_student_scores_exactly_the_identity_row(center):
    """In every teacher space, raw or centred: the residual student starts where doing nothing is."""
    g = torch.Generator().manual_seed(0)
    widths = {"minilm": 384, "smollm2": 576}

    def pairs(n: int) -> Pairs:
        q = {t: torch.randn(n, w, generator=g) + 3.0 for t, w in widths.items()}  # an offset, as in raw spaces
        a = {t: x + torch.randn(x.shape, generator=g) for t, x in q.items()}
        if center:
            a, q = {t: x - 3.0 for t, x in a.items()}, {t: x - 3.0 for t, x in q.items()}
        return Pairs([str(i) for i in range(n)], [f"q{i}" for i in range(n)], [f"a{i}" for i in range(n)], q, a,
                     [f"d{i // 4}" for i in range(n)])

    student = Student(CubeConfig(dims=[4, 4, 4], max_steps=3), AdapterConfig(), widths)
    held_out = pairs(80)
    table = evaluate.comparison(student, pairs(200), held_out)
    for rows in table.values():
        assert {k: rows["model"][k] for k in ("cos", "r1", "r5", "mrr")} == rows["identity"]
        assert rows["identity"]["mrr"] > 0.2 > rows["mean_answer"]["mrr"]  # a task where doing nothing retrieves
    # so a round before the first step scores the inputs instead of running the cube (train/loop.py)
    shortcut = evaluate.student_metrics(student, held_out, untrained=True)
    whole = evaluate.student_metrics(student, held_out)
    for t, run in whole.items():
        assert {k: v for k, v in run.items() if k != "steps"} == {k: v for k, v in shortcut[t].items() if k != "steps"}


def test_scoring_some_queries_ranks_them_among_every_answer():
    """A round that scores part of its slice's queries (train/loop.py) ranks them among all of the slice's answers:
    the parts average to the whole, and a part scored on its own (fewer distractors) would score higher."""
    g = torch.Generator().manual_seed(1)
    q = {"t": torch.randn(120, 16, generator=g)}
    a = {"t": q["t"] + 1.5 * torch.randn(120, 16, generator=g)}  # a hard task: MRR well below 1
    pairs = Pairs([str(i) for i in range(120)], [f"q{i}" for i in range(120)], [f"a{i}" for i in range(120)], q, a)
    student = Student(CubeConfig(dims=[4, 4, 4], max_steps=3), AdapterConfig(), {"t": 16})
    whole = evaluate.student_metrics(student, pairs)["t"]["mrr"]
    halves = [range(0, 120, 2), range(1, 120, 2)]
    parts = [evaluate.student_metrics(student, pairs, queries=rows)["t"]["mrr"] for rows in halves]
    assert whole < 0.7 and sum(parts) / 2 == pytest.approx(whole, abs=1e-12) and parts[0] != pytest.approx(parts[1])
    alone = Pairs([str(i) for i in halves[0]], [f"q{i}" for i in halves[0]], [f"a{i}" for i in halves[0]],
                  {"t": q["t"][::2]}, {"t": a["t"][::2]})
    assert evaluate.student_metrics(student, alone)["t"]["mrr"] > parts[0] + 0.05


def test_evaluate_json_has_model_and_the_baselines(checkpoint, capsys):
    assert evaluate.main([str(checkpoint), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = table["minilm"]
    assert set(rows) == {"model", "identity", "mean_answer", "ridge", "linear_adapter", "criteria"}
    # the plan's criteria: the autoencoder path's cosine on the held-out questions and answers; no cross-teacher
    # share (one teacher, a dialogue student)
    loaded = load_for_eval(checkpoint)
    texts = torch.cat([loaded.held_out.q["minilm"], loaded.held_out.a["minilm"]])
    recon = torch.nn.functional.cosine_similarity(loaded.student.predict(texts, "minilm")[0], texts).mean().item()
    found = rows.pop("criteria")
    assert set(found) == {"reconstruction_cos"} and found["reconstruction_cos"]["value"] == pytest.approx(recon, abs=1e-6)
    assert found["reconstruction_cos"]["threshold"] == 0.95 and found["reconstruction_cos"]["met"] == (recon > 0.95)
    for name, m in rows.items():
        assert {"cos", "r1", "r5", "mrr"} <= set(m), name
        assert 0 <= m["r1"] <= m["r5"] <= 1 and 0 < m["mrr"] <= 1
    assert rows["identity"]["mrr"] > 5 * rows["mean_answer"]["mrr"]  # the constant retrieves (almost) nothing


def test_evaluate_table_and_deterministic(checkpoint, capsys):
    evaluate.main([str(checkpoint)])
    first = capsys.readouterr().out
    evaluate.main([str(checkpoint)])
    assert capsys.readouterr().out == first
    assert "the best baseline, " in first and "linear_adapter" in first and "mean_answer" in first
    assert "| reconstruction cosine (autoencoder path, held-out texts) | > 0.95 | " in first


def test_evaluate_on_new_pairs(checkpoint, tmp_path, capsys):
    rows = [{"doc_id": f"d{i}", "question": f"What colour is cube number {i}?", "answer": f"Cube {i} is painted red."}
            for i in range(20)]
    path = str(write_jsonl(tmp_path / "new.jsonl", rows))
    assert evaluate.main([str(checkpoint), "--pairs", path, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["minilm"]
    loaded = load_for_eval(checkpoint, pairs=path)  # the same pairs, embedded and scored here directly
    assert len(loaded.held_out) == 20 and loaded.held_out.questions[7] == "What colour is cube number 7?"
    direct = evaluate.comparison(loaded.student, loaded.train, loaded.held_out)["minilm"]
    for row in ("model", "identity"):
        assert table[row] == pytest.approx({k: round(v, 6) for k, v in direct[row].items()}, abs=1e-6)
    assert table["identity"]["mrr"] > 2 * sum(1 / r for r in range(1, 21)) / 20  # far above a fixed ranking of 20


def test_infer_ranks_the_training_answers(checkpoint, capsys):
    assert infer.main([str(checkpoint), "When did the oil crisis begin?", "--k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Q: When did the oil crisis begin?") and len(out) == 4
    scores = [float(line.split()[1]) for line in out[1:]]
    assert scores == sorted(scores, reverse=True)
    infer.main([str(checkpoint), "When did the oil crisis begin?", "--k", "3"])
    assert capsys.readouterr().out.splitlines() == out  # deterministic


def test_infer_with_a_bank_file_and_timeout(checkpoint, tmp_path, capsys):
    bank = tmp_path / "bank.txt"
    bank.write_text("The crisis began in October 1973.\nCubes have six faces.\n")
    assert infer.main([str(checkpoint), "When did the crisis begin?", "--bank", str(bank), "--timeout-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "timed out" in out and "The crisis began in October 1973." in out


def test_corrupt_checkpoint_names_the_file(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"broken/model.safetensors: corrupt"):
        evaluate.main([str(broken)])
