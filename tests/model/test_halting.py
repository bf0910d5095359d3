import torch

from cube_ray.model import CubeConfig, PonderCube

CFG = dict(dims=[4, 4, 4], channels=4, hidden=8)


def ponder(**kw) -> PonderCube:
    torch.manual_seed(0)
    return PonderCube(CubeConfig(**{**CFG, **kw}))


def read_all(state):
    return state


def test_halting_distribution_at_init():
    model = ponder(min_steps=2, max_steps=8).train()
    run = model(torch.randn(5, 64, 4), read_all)
    assert run.halt_probs.shape == (5, 8)
    torch.testing.assert_close(run.halt_probs.sum(1), torch.ones(5))
    assert torch.all(run.halt_probs[:, :1] == 0)  # no halting before min_steps
    # bias -3: halting is unlikely at first, so training sees deep runs, not a collapse to one step
    assert torch.all(run.expected_steps > model.cfg.min_steps + 1)
    assert torch.all(run.steps_run == 8)


def test_training_output_is_the_expectation_over_steps():
    model = ponder(max_steps=4).train()
    u = torch.randn(2, 64, 4)
    with torch.no_grad():
        model.halt.weight.normal_()
        torch.manual_seed(3)
        run = model(u, read_all, keep_steps=True)
    expected = sum(p[:, None, None] * s for p, s in zip(run.halt_probs.T, run.step_outputs))
    torch.testing.assert_close(run.output, expected)
    steps = torch.arange(1, 5, dtype=torch.float32)
    torch.testing.assert_close(run.expected_steps, run.halt_probs @ steps)


def test_inference_halts_by_the_gate():
    model = ponder(min_steps=3, max_steps=8).eval()
    u = torch.randn(4, 64, 4)
    assert torch.all(model(u, read_all).steps_run == 8)  # lambda = 0.05: the mass never reaches 1 - eps early
    with torch.no_grad():
        model.halt.bias.fill_(10.0)  # lambda ~ 1: stop as soon as allowed
    run = model(u, read_all)
    assert torch.all(run.steps_run == 3) and not run.timed_out
    torch.testing.assert_close(run.halt_probs.sum(1), torch.ones(4))
    assert run.halt_probs.shape == (4, 3)


def test_step_cap_takes_the_remaining_mass():
    model = ponder(min_steps=2, max_steps=8).train()
    run = model(torch.randn(2, 64, 4), read_all, max_steps=3)
    assert run.halt_probs.shape == (2, 3)
    torch.testing.assert_close(run.halt_probs.sum(1), torch.ones(2))


def test_timeout_zero_returns_an_output_flagged():
    model = ponder(max_steps=8).eval()
    u = torch.randn(3, 64, 4)
    run = model(u, read_all, timeout=0.0)
    assert run.timed_out
    assert torch.all(run.steps_run == 1)
    assert run.output.shape == u.shape and torch.isfinite(run.output).all()
    torch.testing.assert_close(run.halt_probs.sum(1), torch.ones(3))
    assert not model(u, read_all, timeout=60.0).timed_out


def test_a_trained_gate_halts_each_sample_at_its_own_step():
    """Train the halting head alone: a thinking cost on one group of samples, a reward for steps on the other.
    In one batch at inference the groups then halt at different steps, each as it would alone."""
    model = ponder(min_steps=1, max_steps=6, update_prob=1.0).train()
    g = torch.Generator().manual_seed(0)
    u = 0.1 * torch.randn(16, 64, 4, generator=g)
    u[:8, :, 0] += 1.0  # group A: think little
    u[8:, :, 0] -= 1.0  # group B: think long
    cost = torch.cat([torch.ones(8), -torch.ones(8)])
    opt = torch.optim.Adam(model.halt.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (cost * model(u, read_all).expected_steps).mean().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        run = model(u, read_all)
        alone = [model(u[i:i + 1], read_all) for i in range(16)]
    assert run.steps_run[:8].float().mean() + 3 <= run.steps_run[8:].float().mean()
    assert len(set(run.steps_run.tolist())) >= 2
    for i, one in enumerate(alone):  # a sample's halting does not depend on its batch-mates
        assert one.steps_run.item() == run.steps_run[i].item()
        torch.testing.assert_close(one.output[0], run.output[i])
