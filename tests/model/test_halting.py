import pytest
import torch

from cube_ray.model import CubeConfig, PonderCube, Pondered
from cube_ray.model import halting

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


def whole_batch_halting(model, u, read, timeout=None, keep_steps=False) -> Pondered:
    """The spec: inference halting as it was before compaction, stepping the whole batch until every sample
    has stopped (halted samples are still computed, and add nothing)."""
    cap, eps = model.cfg.max_steps, model.cfg.halt_eps
    deadline = None if timeout is None else halting.time.monotonic() + timeout
    b = u.shape[0]
    output, probs, outputs = None, [], []
    remaining = u.new_ones(b)
    running = torch.ones(b, dtype=torch.bool)
    steps_run = torch.full((b,), cap, dtype=torch.long)
    timed_out = False
    for n, state in enumerate(model.cube.run(u, cap), start=1):
        lam = model._lambda(state, n, cap)
        stop = running & (remaining * (1 - lam) <= eps)
        if deadline is not None and halting.time.monotonic() >= deadline and (running & ~stop).any():
            timed_out, stop = True, running
        p = torch.where(stop, remaining, remaining * lam) * running
        field = read(state)
        weighted = p.view(-1, *[1] * (field.dim() - 1)) * field
        output = weighted if output is None else output + weighted
        probs.append(p)
        if keep_steps:
            outputs.append(field)
        remaining = torch.where(stop, 0.0, remaining * (1 - lam))
        steps_run = torch.where(stop, n, steps_run)
        running = running & ~stop
        if not running.any():
            break
    p = torch.stack(probs, dim=1)
    return Pondered(output, p @ torch.arange(1, p.shape[1] + 1, dtype=p.dtype), p, steps_run, timed_out,
                    outputs or None)


def staggered_gate():
    """A non-trivial cube and a gate on the mean of channel 0, with inputs (in shuffled order) whose channel-0
    offsets make samples halt at steps 2, 3, 5 and 8 of 8."""
    model = ponder(min_steps=2, max_steps=8).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(model.cube.rules[0].w2.weight, std=0.3, generator=g)  # the state moves
        model.halt.weight.zero_()
        model.halt.weight[0, 0] = 4.0
        model.halt.bias.zero_()
    u = 0.1 * torch.randn(16, 64, 4, generator=g)
    u[:, :, 0] += torch.linspace(0.0, 1.5, 16)[torch.randperm(16, generator=g), None]
    return model, u


def record_step_rows(model, monkeypatch) -> list[int]:
    """Wrap the cube's step to record the number of rows it is called on."""
    rows, step = [], model.cube.step

    def recording(state, u, i):
        assert state.shape[0] == u.shape[0]  # the input field is compacted along with the state
        rows.append(state.shape[0])
        return step(state, u, i)

    monkeypatch.setattr(model.cube, "step", recording)
    return rows


def fake_clock(monkeypatch):
    """time.monotonic in halting (and the spec) ticks 1 s per reading, so a timeout cuts at a known step."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(halting.time, "monotonic", lambda: float(next(ticks)))


def read_part(state):  # a readout of a few cells, as an adapter's read picks a face
    return 2 * state[:, :16, :3]


@pytest.mark.parametrize("timeout", [None, 3.5])
def test_halted_samples_leave_the_batch_with_the_same_results(monkeypatch, timeout):
    model, u = staggered_gate()
    if timeout is not None:
        fake_clock(monkeypatch)
    with torch.no_grad():
        expected = whole_batch_halting(model, u, read_part, timeout)
        rows = record_step_rows(model, monkeypatch)
        run = model(u, read_part, timeout=timeout)
    assert len(set(expected.steps_run.tolist())) >= (4 if timeout is None else 3)
    assert run.timed_out == expected.timed_out == (timeout is not None)
    assert torch.equal(run.steps_run, expected.steps_run)
    for name in ("output", "expected_steps", "halt_probs"):
        torch.testing.assert_close(getattr(run, name), getattr(expected, name), rtol=1e-6, atol=1e-7)
    assert run.step_outputs is None
    # Each sample is stepped exactly as many times as it runs, on fewer rows as samples halt.
    assert sum(rows) == run.steps_run.sum().item() and len(rows) == run.steps_run.max().item()
    assert rows[0] == 16 and rows == sorted(rows, reverse=True) and rows[-1] < rows[0]
    assert rows == [(run.steps_run >= n).sum().item() for n in range(1, len(rows) + 1)]


def test_keep_steps_steps_the_whole_batch_for_true_step_outputs(monkeypatch):
    model, u = staggered_gate()
    with torch.no_grad():
        expected = whole_batch_halting(model, u, read_part, keep_steps=True)
        rows = record_step_rows(model, monkeypatch)
        run = model(u, read_part, keep_steps=True)
    assert rows == [16] * 8  # no compaction: a halted sample's later readouts are its true later states
    assert torch.equal(run.steps_run, expected.steps_run)
    for got, want in zip([run.output, run.halt_probs, *run.step_outputs],
                         [expected.output, expected.halt_probs, *expected.step_outputs], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
