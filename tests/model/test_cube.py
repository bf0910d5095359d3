import pytest
import torch

from cube_ray.model import CubeConfig, Cube, ReferenceCube, cost
from cube_ray.model import cube as cube_module
from cube_ray.model.cube import depthwise3d


def random_cube(**kw) -> Cube:
    """A cube whose zero-initialised last layers are randomised, so that every step does something."""
    torch.manual_seed(0)
    cube = Cube(CubeConfig(**kw))
    for rule in cube.rules:
        torch.nn.init.normal_(rule.w2.weight, std=0.3)
        torch.nn.init.normal_(rule.w2.bias, std=0.1)
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
])
@pytest.mark.parametrize("training", [False, True])
def test_fast_cube_equals_conv3d_reference(kw, training):
    cube = random_cube(**kw)
    reference = ReferenceCube(cube)
    cube.train(training), reference.train(training)
    u = torch.randn(3, cube.cfg.cells, cube.cfg.channels)
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


def test_cube_starts_as_identity_and_stays_bounded():
    cube = Cube(CubeConfig(dims=[4, 4, 4])).train()
    u = torch.randn(2, 64, 8)
    assert torch.equal(list(cube.run(u, 3))[-1], u)  # zero-initialised last layer
    loud = random_cube(dims=[4, 4, 4], state_bound=1.0)
    for state in loud.run(10 * u, 6):
        assert state.abs().max() <= 1.0


def test_eval_is_deterministic_training_is_stochastic():
    cube = random_cube(dims=[4, 4, 4])
    u = torch.randn(2, 64, 8)
    cube.eval()
    assert torch.equal(list(cube.run(u, 3))[-1], list(cube.run(u, 3))[-1])
    cube.train()
    assert not torch.equal(list(cube.run(u, 3))[-1], list(cube.run(u, 3))[-1])


def test_cost_counts_parameters_and_flops():
    cfg = CubeConfig(dims=[8, 8, 12], channels=8, hidden=32, max_steps=8)
    c = cost(cfg)
    per_rule = 8 * 27 + (16 * 32 + 32) + (32 * 8 + 8)  # depthwise kernel, first layer, last layer
    assert c["params"] == per_rule
    per_cell_step = 2 * (8 * 27 + 16 * 32 + 32 * 8)  # multiply-adds of the convolution and the two layers
    assert c["flops_per_sample"] == 8 * 768 * per_cell_step
    assert cost(CubeConfig(max_steps=16))["flops_per_sample"] == 2 * c["flops_per_sample"]
