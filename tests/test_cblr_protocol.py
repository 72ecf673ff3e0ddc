"""CBLR's closure protocol: closure calls per step, bit-exact restore of the
parameters and .grad, and the error without a closure."""
import pytest
import torch

from cblr_ext import CBLR
from cblr_ext import functional as F


def setup(curvature_interval, momentum=0.9, nesterov=False, backend="reference", group_per_layer=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 2))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    params = ([{"params": model[0].parameters()}, {"params": model[2].parameters()}] if group_per_layer
              else model.parameters())
    opt = CBLR(params, lr=0.1, momentum=momentum, nesterov=nesterov, curvature_interval=curvature_interval,
               backend=backend)
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
def test_parameters_and_grads_restored_bit_exactly(momentum, nesterov, monkeypatch):
    model, opt, closure, seen = setup(1, momentum, nesterov)
    opt.step(closure)
    params = list(model.parameters())
    w_t = [p.detach().clone() for p in params]
    state = [opt.state[p] for p in params]
    seen_steps = [(st["prev_step"] if "prev_step" in st else st["momentum_buffer"]).clone() for st in state]

    # What step 2 must see: .grad at w_t, then the update from there.
    expected_grads = None

    def recording_closure():
        nonlocal expected_grads
        loss = closure()
        if expected_grads is None:
            expected_grads = [p.grad.clone() for p in params]
        return loss

    # The reference is restored to w_t before pass 1 (cpp updates from the copy): capture what
    # its update sees.
    captured = {}
    original_update = F.layerwise_update_

    def update_and_capture(*args, **kwargs):
        captured["params"] = [p.detach().clone() for p in params]
        captured["grads"] = [p.grad.clone() for p in params]
        return original_update(*args, **kwargs)
    monkeypatch.setattr(F, "layerwise_update_", update_and_capture)
    opt.step(recording_closure)
    assert len(seen) == 3
    # the probe ran at w_t + s, yet before the update the parameters are w_t again, bit for bit
    assert all(torch.equal(a, b + s) for a, b, s in zip(seen[2], w_t, seen_steps))
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


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_pass_1_that_fails_after_the_probe_leaves_w_as_it_was(backend, monkeypatch):
    """The probe restores w_t before pass 1 (reference) or the update writes from the copy
    (cpp); when pass 1 raises for one group, every group still shifted is restored by the
    probe protocol, bit for bit."""
    model, opt, closure, _ = setup(1, backend=backend, group_per_layer=True)
    opt.step(closure)
    w_t = [p.detach().clone() for p in model.parameters()]
    real_reduce, calls = F.layerwise_reduce, []

    def reduce_then_fail(*args, **kwargs):
        calls.append(kwargs.get("probe_grads") is not None)
        if len(calls) == 2:
            raise RuntimeError("pass 1 failed")
        return real_reduce(*args, **kwargs)
    monkeypatch.setattr(F, "layerwise_reduce", reduce_then_fail)
    with pytest.raises(RuntimeError, match="pass 1 failed"):
        opt.step(closure)
    assert calls == [True, True]  # both groups were probed (shifted)
    for p, w in zip(model.parameters(), w_t):
        assert torch.equal(p, w)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_an_update_that_fails_restores_the_groups_it_did_not_reach(backend, monkeypatch):
    """The fused update restores from the copy as it writes w: when it raises for the
    second group, the first is updated as in an unbroken step and the second is w_t."""
    model, opt, closure, _ = setup(1, backend=backend, group_per_layer=True)
    twin, twin_opt, twin_closure, _ = setup(1, backend=backend, group_per_layer=True)
    opt.step(closure)
    twin_opt.step(twin_closure)
    w_t = [p.detach().clone() for p in model.parameters()]
    twin_opt.step(twin_closure)
    real_update, calls = F.layerwise_update_, []

    def update_then_fail(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("update failed")
        return real_update(*args, **kwargs)
    monkeypatch.setattr(F, "layerwise_update_", update_then_fail)
    with pytest.raises(RuntimeError, match="update failed"):
        opt.step(closure)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    for p, want in zip(params[:2], twin_params[:2]):
        assert torch.equal(p, want)
    for p, w in zip(params[2:], w_t[2:]):
        assert torch.equal(p, w)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_non_finite_gradient_on_a_remeasure_step_skips_and_restores(backend):
    """A NaN in g_t is found after the probe; the step is skipped and every shifted
    parameter is w_t again, bit for bit, with the state untouched."""
    model, opt, closure, _ = setup(1, backend=backend)
    opt.step(closure)
    params = list(model.parameters())
    w_t = [p.detach().clone() for p in params]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in params]
    calls = 0

    def nan_at_w_t():
        nonlocal calls
        calls += 1
        loss = closure()
        if calls == 1:
            params[0].grad[0, 0] = float("nan")
        return loss
    opt.step(nan_at_w_t)
    assert calls == 2 and opt.skipped_steps == 1
    for p, w, v in zip(params, w_t, buffers):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], v)
