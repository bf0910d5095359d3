import pytest
import torch

from cube_ray.losses import CombinedLoss
from cube_ray.model import FUSION, AdapterConfig, CubeConfig, LossConfig, Student, WeightingConfig

TEACHERS = {"minilm": 384, "smollm2": 576}


@pytest.mark.parametrize("dims", [[8, 8, 12], [6, 8, 16], [4, 4, 4]])
def test_forward_in_each_teacher_space(dims):
    student = Student(CubeConfig(dims=dims, max_steps=3), AdapterConfig(), TEACHERS)
    for name, width in TEACHERS.items():
        run = student(torch.randn(2, width), name)
        assert run.output.shape == (2, width)
        assert run.expected_steps.shape == (2,) and run.halt_probs.shape == (2, 3)
    student.eval()
    run = student(torch.randn(2, 384), "minilm", timeout=0.0)
    assert run.timed_out and run.output.shape == (2, 384) and torch.all(run.steps_run == 1)
    with pytest.raises(KeyError, match="unknown teacher"):
        student(torch.randn(2, 384), "llama")


@pytest.mark.parametrize("cube, adapter", [
    (dict(), dict()),
    (dict(dims=[4, 4, 4], attention=True, skip_input=True, skip_linear=True, layers=2), dict(strategy="hierarchical")),
    (dict(dims=[4, 4, 4]), dict(strategy="attention_based", io="volume", out="volume")),
    (dict(dims=[4, 4, 4]), dict(strategy="autoencoder", out="volume")),
])
def test_gradients_reach_every_parameter(cube, adapter):
    """The last layers start at zero, so some gradients appear only after a first update: take three steps."""
    torch.manual_seed(0)
    student = Student(CubeConfig(**cube), AdapterConfig(**adapter), TEACHERS)
    loss = CombinedLoss(LossConfig(cosine=1.0, think=0.01))
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    reached = {name: False for name, _ in student.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        for name, width in TEACHERS.items():
            x = torch.randn(4, width)
            run = student(x, name)
            loss(run.output, x.roll(1, 0), expected_steps=run.expected_steps)[0].backward()
        for n, p in student.named_parameters():
            reached[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        opt.step()
    assert [n for n, ok in reached.items() if not ok] == []


@pytest.mark.parametrize("residual", [True, False])
def test_skip_linear_starts_as_the_student_without_it(residual):
    torch.manual_seed(0)
    with_bypass = Student(CubeConfig(dims=[4, 4, 4], skip_linear=True, residual=residual), AdapterConfig(), {"t": 16}).eval()
    torch.manual_seed(0)
    without = Student(CubeConfig(dims=[4, 4, 4], residual=residual), AdapterConfig(), {"t": 16}).eval()
    x = torch.randn(3, 16)
    torch.testing.assert_close(with_bypass(x, "t").output, without(x, "t").output)


@pytest.mark.parametrize("adapter", [dict(), dict(strategy="hierarchical"), dict(strategy="attention_based")])
def test_an_untrained_residual_student_predicts_its_input(adapter):
    torch.manual_seed(0)
    student = Student(CubeConfig(dims=[4, 4, 4]), AdapterConfig(**adapter), TEACHERS, )
    for mode in (student.train, student.eval):
        mode()
        for name, width in TEACHERS.items():
            x = torch.randn(5, width)
            run = student(x, name, keep_steps=True)
            assert torch.equal(run.output, x) and all(torch.equal(s, x) for s in run.step_outputs)


def test_the_residual_leaves_outputs_in_another_teachers_space_to_the_cube():
    torch.manual_seed(0)
    student = Student(CubeConfig(dims=[4, 4, 4]), AdapterConfig(), TEACHERS)
    x = torch.randn(3, 384)
    assert torch.equal(student(x, "minilm", into="smollm2").output, torch.zeros(3, 576))  # no x added across spaces
    with torch.no_grad():
        student.adapters["smollm2"].last_layer().bias.fill_(1.0)
    assert torch.equal(student(x, "minilm", into="smollm2").output, torch.ones(3, 576))


def test_a_residual_student_learns_a_residual_map_and_the_pure_cube_any_map():
    """Targets x + xM: the residual starts at cos 0.70 and reaches 0.95; the pure cube learns targets unrelated to x."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 384, generator=g)
    m = torch.randn(384, 384, generator=g) / 384**0.5
    torch.manual_seed(0)
    residual = Student(CubeConfig(dims=[4, 4, 4], update_prob=1.0), AdapterConfig(), {"t": 384})
    assert torch.cosine_similarity(residual(x, "t").output, x + x @ m).mean() < 0.75
    assert overfit(residual, "t", x, x + x @ m, steps=400)[0] > 0.95
    torch.manual_seed(0)
    pure = Student(CubeConfig(dims=[4, 4, 4], update_prob=1.0, residual=False), AdapterConfig(), {"t": 384})
    assert overfit(pure, "t", x, x @ m, steps=300)[0] > 0.95


def test_distill_with_a_residual_needs_gradient_clipping():
    from cube_ray.config import TrainConfig

    with pytest.raises(ValueError, match="needs grad_clip > 0"):
        TrainConfig(teachers=["minilm", "smollm2"], mode="distill", grad_clip=0.0).validate()
    TrainConfig(teachers=["minilm", "smollm2"], mode="distill", grad_clip=0.0, cube=CubeConfig(residual=False)).validate()


def test_teacher_weighting():
    cube, adapter = CubeConfig(dims=[4, 4, 4]), AdapterConfig()
    uniform = Student(cube, adapter, TEACHERS)
    assert uniform.weights() == {"minilm": 0.5, "smollm2": 0.5}
    assert uniform.update_weights({"minilm": 0.1, "smollm2": 0.9}) == {"minilm": 0.5, "smollm2": 0.5}

    fixed = Student(cube, adapter, TEACHERS, WeightingConfig(mode="fixed", weights={"minilm": 3, "smollm2": 1}))
    assert fixed.weights() == {"minilm": 0.75, "smollm2": 0.25}
    with pytest.raises(ValueError, match="no weight for"):
        Student(cube, adapter, TEACHERS, WeightingConfig(mode="fixed", weights={"minilm": 1}))

    adaptive = Student(cube, adapter, TEACHERS, WeightingConfig(mode="adaptive", temperature=0.1))
    w = adaptive.update_weights({"minilm": 0.70, "smollm2": 0.30})  # MRRs: the WeightingConfig docstring's example
    assert w == pytest.approx({"minilm": 0.982, "smollm2": 0.018}, abs=1e-3)
    assert torch.equal(adaptive.state_dict()["teacher_weights"], torch.tensor(list(w.values())))  # checkpointed

    three = {"a": 8, "b": 8, "c": 8}  # agreements 0.4, 0.4, 0.2: the docstring's example
    agreeing = Student(cube, adapter, three, WeightingConfig(mode="agreement", temperature=0.1))
    assert agreeing.update_weights({"a": 0.4, "b": 0.4, "c": 0.2}) == pytest.approx({"a": 0.468, "b": 0.468, "c": 0.063},
                                                                                    abs=1e-3)
    with pytest.raises(ValueError, match=r"needs a score for every teacher, missing \['c'\]"):
        agreeing.update_weights({"a": 0.4, "b": 0.4})


def test_larger_thinking_cost_lowers_expected_steps():
    def train(lam: float) -> float:
        torch.manual_seed(0)
        student = Student(CubeConfig(dims=[3, 3, 3], channels=4, hidden=8, min_steps=1, max_steps=6),
                          AdapterConfig(io="volume", out="volume"), {"t": 16})
        loss = CombinedLoss(LossConfig(cosine=1.0, think=lam))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 16, generator=g)
        y = x @ torch.randn(16, 16, generator=g)
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        for _ in range(60):
            run = student(x, "t")
            total, _ = loss(run.output, y, expected_steps=run.expected_steps)
            opt.zero_grad()
            total.backward()
            opt.step()
        return run.expected_steps.mean().item()

    assert train(0.1) < train(0.01) - 1.0


def overfit(student, teacher, x, y, steps):
    """Adam on 1 - cos (+ a small thinking cost) until train cosine > 0.95; returns (cosine, steps taken)."""
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for step in range(steps):
        run = student(x, teacher)
        cos = torch.cosine_similarity(run.output, y).mean()
        if cos > 0.95:
            break
        opt.zero_grad()
        (1 - cos + 1e-3 * run.expected_steps.mean()).backward()
        opt.step()
    return cos.item(), step


def test_cost_covers_adapters_and_all_steps():
    student = Student(CubeConfig(dims=[4, 4, 4], channels=8, max_steps=4), AdapterConfig(), {"t": 16})
    c = student.cost("t")
    assert c["params"] == sum(p.numel() for p in student.parameters())
    adapters = 2 * 2 * 16 * (16 * 8)  # 16 -> 16 face cells x 8 channels and back, multiply-adds
    cube_steps = 4 * 64 * 2 * (8 * 27 + 16 * 32 + 32 * 8)
    halting = 2 * 2 * 8  # the head runs at steps 2 and 3: none before min_steps, the last step takes the rest
    expectation = 2 * 4 * 16 * 8  # sum over the 4 steps of p_n * readout
    assert c["flops_per_sample"] == adapters + cube_steps + halting + expectation


def test_student_translates_between_teachers():
    student = Student(CubeConfig(dims=[4, 4, 4], max_steps=3), AdapterConfig(), {"a": 384, "b": 576})
    out = student(torch.randn(5, 384), "a", into="b", all_steps=True)
    assert out.output.shape == (5, 576)
    out.output.sum().backward()
    assert any(p.grad is not None for p in student.adapters["a"].parameters())
    assert any(p.grad is not None for p in student.adapters["b"].parameters())


def test_overfits_64_real_squad_pairs():
    """The bundled sample's first 64 question -> answer pairs, embedded by the real minilm teacher."""
    from cube_ray.data.readers import read_pairs, sample_paths
    from cube_ray.teachers import get_teacher
    from cube_ray.teachers.model import Teacher

    pairs = read_pairs(sample_paths()[0], limit=64)
    teacher = Teacher(get_teacher("minilm"))
    x = torch.from_numpy(teacher.embed([p.question for p in pairs]))
    y = torch.from_numpy(teacher.embed([p.answer for p in pairs]))
    torch.manual_seed(0)
    # Volume I/O: memorising arbitrary pairs through one face is far slower (0.57 after 400 steps, measured).
    student = Student(CubeConfig(dims=[4, 4, 4], update_prob=1.0), AdapterConfig(io="volume", out="volume"),
                      {"minilm": 384})
    cos, step = overfit(student, "minilm", x, y, steps=400)
    assert cos > 0.95, f"train cosine {cos:.3f} after {step} steps"
    assert torch.cosine_similarity(x, y).mean() < 0.8  # the questions alone are far from it


def _fused(fusion, adapter=None, **cube):
    torch.manual_seed(0)
    return Student(CubeConfig(dims=[4, 4, 4], max_steps=3, **cube), AdapterConfig(**(adapter or {})), TEACHERS,
                   fusion=fusion).eval()


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_a_fused_student_starts_at_the_identity_in_every_space(fusion):
    student = _fused(fusion)
    xs = {t: torch.randn(3, w) for t, w in TEACHERS.items()}
    out = student(xs, FUSION)
    assert set(out) == set(TEACHERS)
    for t, x in xs.items():
        torch.testing.assert_close(out[t].output, x)
    # One run of the cube serves every space: the same halting, the same steps.
    assert torch.equal(out["minilm"].halt_probs, out["smollm2"].halt_probs)


def test_sum_fusion_writes_the_sum_of_the_teachers_fields():
    student = _fused("sum", residual=False)
    xs = {t: torch.randn(3, w) for t, w in TEACHERS.items()}
    lattice = sum(student.adapters[t].to_lattice(x) for t, x in xs.items())
    run = student.core(lattice, student.adapters["minilm"].read, max_steps=3)
    for t in TEACHERS:
        torch.testing.assert_close(student(xs, FUSION)[t].output, student.adapters[t].decode(run.output))


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_a_teacher_left_out_writes_nothing(fusion):
    """With one teacher's input, a fused student is that teacher's own student: the same lattice (concat's mix starts
    as the sum), the same read-outs; in the other space, the cube's read-out alone."""
    student = _fused(fusion, residual=False)
    x = torch.randn(3, 384)
    alone = student({"minilm": x}, FUSION)
    torch.testing.assert_close(alone["minilm"].output, student(x, "minilm").output)
    torch.testing.assert_close(alone["smollm2"].output, student(x, "minilm", into="smollm2").output)


def test_concat_fusion_learns_how_to_mix_the_teachers():
    student = _fused("concat", adapter=dict(io="volume")).train()  # the input reaches the output cells at once
    xs = {t: torch.randn(4, w) for t, w in TEACHERS.items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    start = student.concat_mix.weight.detach().clone()
    for _ in range(3):  # the decoders start at zero: the mix gets a gradient from the second step
        opt.zero_grad()
        out = student(xs, FUSION)
        sum(1 - torch.cosine_similarity(out[t].output, xs[t].roll(1, 0)).mean() for t in TEACHERS).backward()
        opt.step()
    assert student.concat_mix.weight.shape == (8, 16)
    assert not torch.allclose(student.concat_mix.weight, start)


def test_fused_predictions_in_chunks_match_one_batch():
    student = _fused("sum")
    xs = {t: torch.randn(10, w) for t, w in TEACHERS.items()}
    whole, steps = student.predict(xs, FUSION)
    chunked, _ = student.predict(xs, FUSION, chunk=3)
    assert set(whole) == set(TEACHERS) and 2 <= steps <= 3
    for t in TEACHERS:
        torch.testing.assert_close(whole[t], chunked[t])
    each, each_steps = student.predict_each(xs)
    assert each_steps == {t: steps for t in TEACHERS}
    torch.testing.assert_close(each["smollm2"], whole["smollm2"])


def test_fusion_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="at least two teachers"):
        Student(CubeConfig(), AdapterConfig(), {"minilm": 384}, fusion="sum")
    with pytest.raises(ValueError, match="fusion must be one of"):
        Student(CubeConfig(), AdapterConfig(), TEACHERS, fusion="mean")
    plain, fused = Student(CubeConfig(dims=[4, 4, 4]), AdapterConfig(), TEACHERS), _fused("sum")
    xs = {t: torch.randn(2, w) for t, w in TEACHERS.items()}
    with pytest.raises(ValueError, match="not fused"):
        plain(xs, FUSION)
    with pytest.raises(ValueError, match="every teacher's space"):
        fused(xs, FUSION, into="minilm")
    with pytest.raises(KeyError, match="unknown teacher 'llama'"):
        fused({"llama": torch.randn(2, 8)}, FUSION)


def test_a_fused_student_costs_one_run_of_the_cube_for_every_teacher():
    student = _fused("sum")
    fused, alone = student.cost(FUSION)["flops_per_sample"], {t: student.cost(t)["flops_per_sample"] for t in TEACHERS}
    assert max(alone.values()) < fused < sum(alone.values())


@pytest.mark.parametrize("fusion", ["none", "sum"])
def test_input_scales_put_every_teacher_on_one_scale(fusion):
    """With input scale s_t the student is the unscaled student on x_t / s_t, its predictions scaled back by s_t: the
    adapters see every teacher at norm ~1 (in every space a fused run reads out into, too)."""
    scaled, plain = _fused(fusion, residual=False), _fused(fusion, residual=False)
    scaled.set_input_scales({"minilm": 0.5, "smollm2": 20.0})
    xs = {t: torch.randn(3, w) for t, w in TEACHERS.items()}
    for t in TEACHERS:
        s = {"minilm": 0.5, "smollm2": 20.0}[t]
        if fusion == "none":
            got, want = scaled(xs[t], t).output, s * plain(xs[t] / s, t).output
        else:
            got = scaled(xs, FUSION)[t].output
            want = s * plain({u: x / {"minilm": 0.5, "smollm2": 20.0}[u] for u, x in xs.items()}, FUSION)[t].output
        torch.testing.assert_close(got, want)
    assert torch.equal(scaled.state_dict()["input_scale"], torch.tensor([0.5, 20.0]))  # saved with the weights
    with pytest.raises(ValueError, match="input scales must be positive"):
        scaled.set_input_scales({"minilm": 0.0, "smollm2": 1.0})
