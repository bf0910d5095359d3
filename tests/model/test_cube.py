import pytest
import torch

import contextlib
import dataclasses
import os
import subprocess
import sys

from cube_ray.model import AdapterConfig, CubeConfig, Cube, ReferenceCube, Student, cost, fused
from cube_ray.model import cube as cube_module
from cube_ray.model.cube import depthwise3d, torch_path

PATHS = {"fused": contextlib.nullcontext, "torch": torch_path}  # the fused kernel, and the plain PyTorch ops


def random_cube(**kw) -> Cube:
    """A cube whose zero-initialised last layers are randomised, so that every step does something."""
    torch.manual_seed(0)
    cube = Cube(CubeConfig(**kw))
    for rule in cube.rules:
        for last in (rule.w2, getattr(rule, "out", rule.w2)):  # an attention block's two zero-initialised layers
            torch.nn.init.normal_(last.weight, std=0.3)
            torch.nn.init.normal_(last.bias, std=0.1)
    return cube


def run_and_grad(model, cube, u, steps, seed):
    """Final state, input gradient and parameter gradients of a random linear function of all states."""
    for p in cube.parameters():
        p.grad = None
    u = u.clone().requires_grad_()
    torch.manual_seed(seed)  # the same update masks in both implementations
    states = list(model.run(u, steps))
    weights = torch.randn(len(states), *states[0].shape, generator=torch.Generator().manual_seed(1))
    sum((s * w).sum() for s, w in zip(states, weights)).backward()
    return states[-1].detach(), u.grad, {n: p.grad.clone() for n, p in cube.named_parameters()}


@pytest.mark.parametrize("kw", [
    dict(dims=[8, 8, 12]),
    dict(dims=[6, 8, 16], attention=True, skip_input=True, layers=2),
    dict(dims=[4, 4, 4], channels=6, hidden=16, attention=True, attention_heads=3, state_bound=0.5),
    dict(dims=[3, 5, 2], channels=4, layers=3, skip_input=True),
    dict(dims=[4, 4, 6], mixer="alternate", attention=True, skip_input=True, layers=2, mixer_heads=2),
    dict(dims=[3, 4, 5], channels=4, mixer="attention"),
])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_fast_cube_equals_conv3d_reference(kw, training, path):
    cube = random_cube(**kw)
    reference = ReferenceCube(cube)
    cube.train(training), reference.train(training)
    u = torch.randn(3, cube.cfg.cells, cube.cfg.channels)
    with PATHS[path]():
        fast = run_and_grad(cube, cube, u, 5, seed=7)
    ref = run_and_grad(reference, cube, u, 5, seed=7)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], rtol=1e-4, atol=1e-4)
    for name in fast[2]:
        torch.testing.assert_close(fast[2][name], ref[2][name], rtol=1e-4, atol=1e-3, msg=name)


def test_plain_linear_fallback_matches(monkeypatch):
    """Off CPU (or without oneDNN) the MLP runs on F.linear; both paths give the same numbers."""
    cube = random_cube(dims=[4, 4, 4])
    u = torch.randn(2, cube.cfg.cells, cube.cfg.channels)
    with torch_path():
        onednn = run_and_grad(cube, cube, u, 3, seed=0)
        monkeypatch.setattr(cube_module, "_ONEDNN", False)
        plain = run_and_grad(cube, cube, u, 3, seed=0)
    torch.testing.assert_close(onednn[0], plain[0])
    for name in onednn[2]:
        torch.testing.assert_close(onednn[2][name], plain[2][name], rtol=1e-4, atol=1e-4)


def test_depthwise_gradients_match_finite_differences():
    dims = [3, 4, 2]
    state = torch.randn(2, 24, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w: depthwise3d(s, dims, w), (state, weight))


@pytest.mark.parametrize("mixer", ["local", "attention", "alternate"])
def test_cube_starts_as_identity_and_stays_bounded(mixer):
    cube = Cube(CubeConfig(dims=[4, 4, 4], mixer=mixer)).train()
    u = torch.randn(2, 64, 8)
    assert torch.equal(list(cube.run(u, 3))[-1], u)  # zero-initialised last layers
    loud = random_cube(dims=[4, 4, 4], state_bound=1.0, mixer=mixer)
    for state in loud.run(10 * u, 6):
        assert state.abs().max() <= 1.0


def test_eval_is_deterministic_training_is_stochastic():
    cube = random_cube(dims=[4, 4, 4])
    u = torch.randn(2, 64, 8)
    cube.eval()
    assert torch.equal(list(cube.run(u, 3))[-1], list(cube.run(u, 3))[-1])
    cube.train()
    assert not torch.equal(list(cube.run(u, 3))[-1], list(cube.run(u, 3))[-1])


def test_the_mixer_sets_which_rule_each_step_applies():
    kinds = lambda **kw: [type(r).__name__ for r in Cube(CubeConfig(dims=[4, 4, 4], **kw)).rules]  # noqa: E731
    assert kinds() == ["Rule"]
    assert kinds(mixer="attention", layers=2) == ["CellAttention", "CellAttention"]
    assert kinds(mixer="alternate", layers=2) == ["Rule", "CellAttention", "Rule", "CellAttention"]


def test_cell_attention_is_softmax_attention_among_all_cells_then_a_cell_mlp():
    """The block by hand, in float64: per head, softmax(q k^T / sqrt(d)) v over every pair of cells."""
    cfg = CubeConfig(dims=[2, 3, 4], channels=4, mixer="attention", mixer_heads=2, skip_input=True, hidden=8)
    block = random_cube(**vars(cfg)).rules[0].double()
    state, u = torch.randn(3, 24, 4, dtype=torch.float64), torch.randn(3, 24, 4, dtype=torch.float64)
    norm = lambda x, ln: (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt() \
        * ln.weight + ln.bias  # noqa: E731
    x = norm(state, block.norm_attend) + block.position
    q, k, v = (x @ block.query_key_value.weight.T + block.query_key_value.bias).split(4, dim=-1)
    heads = lambda t: t.view(3, 24, 2, 2).transpose(1, 2)  # noqa: E731  (B, heads, cells, 2)
    scores = heads(q) @ heads(k).transpose(-1, -2) / 2 ** 0.5
    mixed = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(3, 24, 4)
    attended = mixed @ block.out.weight.T + block.out.bias
    hidden = torch.relu(torch.cat([norm(state + attended, block.norm_update), u], -1) @ block.w1.weight.T + block.w1.bias)
    expected = attended + hidden @ block.w2.weight.T + block.w2.bias
    torch.testing.assert_close(block(state, u), expected)


@pytest.mark.parametrize("mixer, reached", [("local", 8), ("attention", 64), ("alternate", 8)])
def test_an_attention_step_reaches_every_cell_a_local_step_its_neighbours(mixer, reached):
    """A change in one corner cell's input moves, after one step, its 2x2x2 neighbourhood (local rule, and the
    alternating cube's first step, which is local) or the whole lattice (attention)."""
    cube = random_cube(dims=[4, 4, 4], mixer=mixer).eval()
    u = torch.randn(1, 64, 8)
    moved = u.clone()
    moved[0, 0] += torch.randn(8)  # not a constant: layer norm would cancel it
    step = lambda x: next(cube.run(x, 1))  # noqa: E731
    changed = (step(moved) - step(u)).abs().amax(-1) > 1e-6
    assert int(changed.sum()) == reached


def test_cost_counts_parameters_and_flops():
    cfg = CubeConfig(dims=[8, 8, 12], channels=8, hidden=32, max_steps=8)
    c = cost(cfg)
    per_rule = 8 * 27 + (16 * 32 + 32) + (32 * 8 + 8)  # depthwise kernel, first layer, last layer
    assert c["params"] == per_rule
    per_cell_step = 2 * (8 * 27 + 16 * 32 + 32 * 8)  # multiply-adds of the convolution and the two layers
    assert c["flops_per_sample"] == 8 * 768 * per_cell_step
    assert cost(CubeConfig(max_steps=16))["flops_per_sample"] == 2 * c["flops_per_sample"]
    # The attention mixer: projections and the cell MLP per cell, and the scores and their values over cells^2.
    per_cell = 2 * (8 * 24 + 8 * 8 + 8 * 32 + 32 * 8)  # query/key/value, output, the MLP's two layers
    assert cost(dataclasses.replace(cfg, mixer="attention"))["flops_per_sample"] == \
        8 * (768 * per_cell + 2 * 2 * 768 * 768 * 8)  # q k^T and (scores) v, one head of 8 channels


def test_the_fused_kernel_splits_the_batch_over_threads_with_the_same_result():
    cube = random_cube(dims=[4, 5, 6], channels=12, skip_input=True).train()
    u = torch.randn(5, cube.cfg.cells, 12)
    one = run_and_grad(cube, cube, u, 4, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = run_and_grad(cube, cube, u, 4, seed=3)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)  # each sample is one thread's: the same sums
    torch.testing.assert_close(one[1], two[1], rtol=0, atol=0)
    for name in one[2]:  # the weight gradients add per-thread sums in double: equal to float rounding
        torch.testing.assert_close(one[2][name], two[2][name], rtol=1e-6, atol=1e-6, msg=name)


def test_training_on_the_fused_kernel_matches_the_plain_path():
    """Twenty Adam steps of a whole student (random update masks, halting, adapters): the same parameters."""
    def train(path):
        torch.manual_seed(0)
        student = Student(CubeConfig(dims=[4, 4, 6], channels=8, max_steps=4), AdapterConfig(), {"t": 32}).train()
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        x, y = torch.randn(16, 32), torch.randn(16, 32)
        with PATHS[path]():
            for _ in range(20):
                run = student(x, "t")
                loss = (1 - torch.cosine_similarity(run.output, y, dim=-1)).mean() + 0.01 * run.expected_steps.mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        return loss.item(), dict(student.named_parameters())
    fused_loss, fused_params = train("fused")
    plain_loss, plain_params = train("torch")
    assert fused_loss == pytest.approx(plain_loss, rel=1e-4)
    assert fused_loss < 0.98  # it trained: the loss of a random prediction is ~1
    for name, p in fused_params.items():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-3, atol=1e-4, msg=name)


def test_the_kernel_is_built_once_and_without_a_compiler_the_cube_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CUBE_RAY_CACHE", str(tmp_path / "cache"))
    load = "from cube_ray.model.fused import kernel; import sys; sys.exit(kernel(6, 0, 16) is None)"
    env = {**os.environ, "CUBE_RAY_CACHE": str(tmp_path / "cache")}
    assert subprocess.run([sys.executable, "-c", load], env=env).returncode == 0
    [built] = (tmp_path / "cache" / "kernels").glob("cube_step-c6e0h16-*.so")
    first = built.stat().st_mtime_ns
    assert subprocess.run([sys.executable, "-c", load], env={**env, "CC": "/bin/false"}).returncode == 0
    assert built.stat().st_mtime_ns == first  # the second process loaded it; it did not build (or it would fail)
    assert not list(built.parent.glob(".tmp-*"))
    built.chmod(0o757)  # writable by everyone: anyone could have swapped the code
    refused = subprocess.run([sys.executable, "-W", "always", "-c", load], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "writable by everyone" in refused.stderr and "PyTorch path" in refused.stderr

    fused.kernel.cache_clear()
    monkeypatch.setenv("CC", "/bin/false")  # a compiler that fails, for a shape not built yet
    try:
        with pytest.warns(RuntimeWarning, match="fused cube kernel is unavailable.*PyTorch path"):
            assert fused.kernel(4, 0, 16) is None
        cube = random_cube(dims=[3, 3, 3], channels=4, hidden=16).eval()
        u = torch.randn(2, 27, 4)
        with torch_path():
            expected = list(cube.run(u, 2))[-1]
        assert torch.equal(list(cube.run(u, 2))[-1], expected)  # it ran the PyTorch path
        monkeypatch.setenv("CUBE_RAY_KERNEL", "torch")
        fused.kernel.cache_clear()
        assert fused.kernel(6, 0, 16) is None  # chosen on purpose: no warning, no build
    finally:
        fused.kernel.cache_clear()
