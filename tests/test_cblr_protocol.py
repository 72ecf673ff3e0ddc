"""CBLR's closure protocol: closure calls per step, bit-exact restore of the
parameters and .grad, and the error without a closure."""
import pytest
import torch

from cblr_ext import CBLR


def setup(curvature_interval, momentum=0.9, nesterov=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    opt = CBLR(model.parameters(), lr=0.1, momentum=momentum, nesterov=nesterov,
               curvature_interval=curvature_interval, backend="reference")
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    return model, opt, closure, seen


@pytest.mark.parametrize("k,expected", [(1, [1, 2, 2, 2, 2, 2, 2]), (3, [1, 2, 1, 1, 2, 1, 1])])
def test_closure_calls_per_step(k, expected):
    _, opt, closure, seen = setup(k)
    counts = []
    for _ in expected:
        before = len(seen)
        opt.step(closure)
        counts.append(len(seen) - before)
    assert counts == expected


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_parameters_and_grads_restored_bit_exactly(momentum, nesterov):
    model, opt, closure, seen = setup(1, momentum, nesterov)
    opt.step(closure)
    params = list(model.parameters())
    w_t = [p.detach().clone() for p in params]

    # What step 2 must see: .grad at w_t, then the update from there.
    expected_grads = None

    def recording_closure():
        nonlocal expected_grads
        loss = closure()
        if expected_grads is None:
            expected_grads = [p.grad.clone() for p in params]
        return loss

    captured = {}
    original_run = opt._run

    def run_and_capture(batches):
        captured["params"] = [p.detach().clone() for p in params]
        captured["grads"] = [p.grad.clone() for p in params]
        original_run(batches)
    opt._run = run_and_capture
    opt.step(recording_closure)
    assert len(seen) == 3
    # the probe ran at w_t + s, yet before the update the parameters are w_t again, bit for bit
    assert any(not torch.equal(a, b) for a, b in zip(seen[2], w_t))
    for a, b in zip(captured["params"], w_t):
        assert torch.equal(a, b)
    for a, b in zip(captured["grads"], expected_grads):
        assert torch.equal(a, b)
    for p, g in zip(params, expected_grads):
        assert torch.equal(p.grad, g)


def test_error_without_closure_on_a_remeasure_step():
    model, opt, closure, _ = setup(3)
    opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, v in opt.state[next(model.parameters())].items():
        torch.testing.assert_close(v, state_before[k], rtol=0, atol=0, equal_nan=True)


def test_no_closure_needed_between_measurements():
    model, opt, closure, _ = setup(3)
    opt.step(closure)
    opt.step(closure)  # measures
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()         # reuse step: the .grad left by the last closure
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert not opt.layer_stats()["0.0"]["fallback"]


def test_a_closure_that_raises_during_the_probe_leaves_w_and_grad_as_they_were():
    model, opt, closure, _ = setup(1)
    opt.step(closure)
    closure()
    w_t = [p.detach().clone() for p in model.parameters()]
    g_t = [p.grad.clone() for p in model.parameters()]
    calls = 0

    def failing_probe():
        nonlocal calls
        calls += 1
        if calls == 2:
            raise FloatingPointError("probe failed")
        return closure()
    with pytest.raises(FloatingPointError):
        opt.step(failing_probe)
    for p, w, g in zip(model.parameters(), w_t, g_t):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
