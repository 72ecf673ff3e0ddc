"""GradScaler drives every rule on every backend here: unscaling inside the kernels equals
an unscaled run, an overflow (in g_t, or in CBLR's probe gradient) skips the step with
nothing changed and backs the scale off."""
import copy

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR

from helpers import max_rel_diff, mlp

BACKENDS = cblr_ext.available_backends("cpu")
RULES = {"lars": (LARS, dict(lr=2.0)), "mclr": (MCLR, dict(lr=2.0)), "cblr": (CBLR, dict(lr=0.1))}
SCALE = 2.0 ** 12


def batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(steps)]


def make_closure(model, opt, x, y, scaler=None, poison=None):
    """zero grads, forward, backward (of the scaled loss under ``scaler``); ``poison(call)``
    may return a parameter whose gradient then gets an Inf on that call."""
    calls = [0]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        target = poison(calls[0]) if poison else None
        if target is not None:
            target.grad.view(-1)[0] = float("inf")
        calls[0] += 1
        return loss
    return closure


def optimizer(rule, model, backend):
    cls, kwargs = RULES[rule]
    return cls(model.parameters(), momentum=0.9, weight_decay=5e-3, backend=backend, **kwargs)


def scaled_step(model, opt, scaler, x, y, poison=None):
    closure = make_closure(model, opt, x, y, scaler, poison)
    closure()  # g_t, which scaler.step checks
    scaler.step(opt, closure)
    cblr_ext.amp.update(scaler, opt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_grad_scaler_steps_like_an_unscaled_run(rule, backend):
    plain, scaled = mlp(), mlp()
    opt_plain, opt_scaled = optimizer(rule, plain, backend), optimizer(rule, scaled, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    for x, y in batches(10):
        opt_plain.step(make_closure(plain, opt_plain, x, y))
        scaled_step(scaled, opt_scaled, scaler, x, y)
        for p, q in zip(plain.parameters(), scaled.parameters()):
            assert max_rel_diff(p, q) <= 1e-6
            # No unscale pass wrote the gradients: they still hold S·g.
            assert max_rel_diff(p.grad * SCALE, q.grad) <= 1e-6
    assert opt_scaled.skipped_steps == 0 and scaler.get_scale() == SCALE


def snapshot(model, opt):
    return copy.deepcopy([p.detach() for p in model.parameters()]), copy.deepcopy(opt.state_dict()["state"])


def assert_unchanged(before, after):
    (params0, state0), (params1, state1) = before, after
    for a, b in zip(params0, params1):
        assert torch.equal(a, b)
    assert state0.keys() == state1.keys()
    for key in state0:
        for name, value in state0[key].items():
            assert torch.equal(value.nan_to_num(), state1[key][name].nan_to_num()), name


def two_scaled_steps(rule, backend):
    """Two GradScaler steps; then (model, opt, scaler, the 3 batches, the snapshot, a weight)."""
    model = mlp()
    opt = optimizer(rule, model, backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    data = batches(3)
    for x, y in data[:2]:
        scaled_step(model, opt, scaler, x, y)
    return model, opt, scaler, data, snapshot(model, opt), next(model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_an_overflow_in_g_skips_the_step_and_backs_the_scale_off(rule, backend):
    model, opt, scaler, data, before, weight = two_scaled_steps(rule, backend)
    scaled_step(model, opt, scaler, *data[2], poison=lambda call: weight)  # g_t holds an Inf at every call
    assert_unchanged(before, snapshot(model, opt))
    assert opt.skipped_steps == 1 and scaler.get_scale() == SCALE / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_overflow_at_the_cblr_probe_point_skips_the_step_and_backs_the_scale_off(backend):
    model, opt, scaler, data, before, weight = two_scaled_steps("cblr", backend)
    # Calls: 0 = the loop's g_t, 1 = step's own at w_t, 2 = the probe at w_t + s.
    scaled_step(model, opt, scaler, *data[2], poison=lambda call: weight if call == 2 else None)
    assert_unchanged(before, snapshot(model, opt))
    assert opt.skipped_steps == 1 and scaler.get_scale() == SCALE / 2
    # And training goes on from there.
    scaled_step(model, opt, scaler, *data[2])
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_a_scaled_step_replays_in_a_cuda_graph(rule):
    """GradScaler's tensors as graph inputs: a captured step replays like eager steps, and
    setting found_inf between replays skips the replayed step."""
    cls, kwargs = RULES[rule]
    kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"], device="cuda"), momentum=0.9, weight_decay=5e-3)
    graphed, eager = mlp().cuda(), mlp().cuda()
    opt_graphed, opt_eager = cls(graphed.parameters(), **kwargs), cls(eager.parameters(), **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        p.grad = torch.randn(p.shape, generator=gen, device="cuda") * SCALE
        q.grad = p.grad.clone()
    for opt in (opt_graphed, opt_eager):
        opt.grad_scale = torch.full((), SCALE, device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the state exists before the capture
        for _ in range(3):
            opt_graphed.step()
            opt_eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graphed.step()
    for _ in range(2):
        graph.replay()
        opt_eager.step()
    torch.cuda.synchronize()
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert max_rel_diff(q, p) <= 1e-6
    before = [p.detach().clone() for p in graphed.parameters()]
    opt_graphed.found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, graphed.parameters()))
