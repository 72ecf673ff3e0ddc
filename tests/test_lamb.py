"""LAMB and the median rule on the Adam direction, against an independent fp64 formula
written here (apex FusedLAMB's semantics), against pytorch-optimizer's Lamb (mapped), and
the step's contracts: a skipped step changes nothing, no state before a step applies."""
import copy
import math

import pytest
import torch

from cblr_ext import LAMB

SHAPES = [(6, 5), (5,), (3, 4, 2)]
BACKENDS = ["auto", "reference"]


def _problem(seed, steps=20, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * scale for s in SHAPES] for _ in range(steps)]
    return ws, grads


def lamb_formula(ws, grads, lr, betas, eps, weight_decay, bias_correction=True, max_grad_norm=None, rule="lars",
                 trust=1.0, max_ratio=None, adapt=None):
    """apex FusedLAMB in fp64, layer by layer (docs/algorithm.md, "The Adam base")."""
    b1, b2 = betas
    w = [x.double().clone() for x in ws]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    adapt = [True] * len(w) if adapt is None else adapt
    for t, gs in enumerate(grads, start=1):
        g = [x.double() for x in gs]
        if max_grad_norm is not None:
            total = math.sqrt(sum(float((x * x).sum()) for x in g))
            g = [x / max(1.0, total / max_grad_norm) for x in g]
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            c1, c2 = (1 - b1 ** t, 1 - b2 ** t) if bias_correction else (1.0, 1.0)
            u = (m[i] / c1) / ((v[i] / c2).sqrt() + eps) + weight_decay * w[i]
            wn, un = float(w[i].norm()), float(u.norm())
            if rule == "lars":
                r = trust * wn / un if wn > 0 and un > 0 else 1.0
            else:
                q = (u.abs() / w[i].abs())[w[i] != 0].flatten()
                med = float(q.sort().values[(q.numel() - 1) // 2]) if q.numel() else 0.0
                r = trust / (med + eps) if med > 0 else 1.0
            if max_ratio is not None:
                r = min(r, max_ratio)
            w[i] = w[i] - lr * (r if adapt[i] else 1.0) * u
    return w


def _run(ws, grads, **kwargs):
    params = [torch.nn.Parameter(x.clone()) for x in ws]
    opt = LAMB(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(weight_decay=0.01),
    dict(weight_decay=0.1, max_grad_norm=1.0),
    dict(weight_decay=0.01, bias_correction=False, max_ratio=0.5),
    dict(weight_decay=0.05, rule="mclr", trust=0.02),
])
def test_matches_the_formula_over_20_steps(backend, case):
    ws, grads = _problem(0, scale=3.0)
    formula = dict(case)
    trust = formula.pop("trust", 1.0)
    expected = lamb_formula(ws, grads, 0.01, (0.9, 0.999), 1e-6, trust=trust, **formula)
    case = dict(case)
    case.setdefault("max_grad_norm", None)
    if "trust" in case:
        case["trust_coefficient"] = case.pop("trust")
    params, opt = _run(ws, grads, lr=0.01, eps=1e-6, backend=backend, **case)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)
    assert opt.skipped_steps == 0


def test_matches_pytorch_optimizer_lamb():
    """pytorch-optimizer's Lamb divides its step by 1 − β1^t, does not correct v, clamps ‖w‖
    at 10 and takes r = ‖w‖/(‖u‖ + ε): ours at λ = 0 with bias_correction=False,
    nvlamb=True, no clipping, and γ_t = γ/(1 − β1^t) as a tensor lr moved every step."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ws, grads = _problem(1)
    ours = [torch.nn.Parameter(x.clone()) for x in ws]
    lr = torch.tensor(0.02)
    opt = LAMB(ours, lr=lr, eps=1e-8, weight_decay=0.0, bias_correction=False, max_grad_norm=None, nvlamb=True)
    theirs = [torch.nn.Parameter(x.clone()) for x in ws]
    reference = pytorch_optimizer.Lamb(theirs, lr=0.02, eps=1e-8, weight_decay=0.0, foreach=False)
    for t, gs in enumerate(grads, start=1):
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        lr.fill_(0.02 / (1 - 0.9 ** t))
        opt.step()
        reference.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_zero_decay_is_not_adapted_without_nvlamb():
    """apex: with use_nvlamb off, a group with λ = 0 takes r = 1 (Adam's step)."""
    ws, grads = _problem(2, steps=5)
    params, opt = _run(ws, grads, lr=0.01, weight_decay=0.0, max_grad_norm=None)
    expected = lamb_formula(ws, grads, 0.01, (0.9, 0.999), 1e-6, 0.0, adapt=[False] * len(ws))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)
    assert all(s["ratio"] == 1.0 and not s["fallback"] for s in opt.layer_stats().values())


def test_exclude_1d_takes_r_one_for_the_bias():
    ws, grads = _problem(3, steps=5)
    params, _ = _run(ws, grads, lr=0.01, weight_decay=0.01, exclude_1d=True, max_grad_norm=None)
    expected = lamb_formula(ws, grads, 0.01, (0.9, 0.999), 1e-6, 0.01, adapt=[True, False, True])
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["nan_grad", "grad_scaler"])
def test_a_skipped_step_changes_nothing(backend, how):
    ws, grads = _problem(4, steps=3)
    params, opt = _run(ws, grads, lr=0.01, weight_decay=0.01, backend=backend)
    before = copy.deepcopy((params, opt.state_dict()["state"]))
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    if how == "nan_grad":
        params[1].grad[0] = float("nan")
        opt.step()
    else:
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(1.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
    after = opt.state_dict()["state"]
    for p, b in zip(params, before[0]):
        assert torch.equal(p, b)
    for key, value in before[1].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after[key][name], value[name]), (key, name)
    assert opt.skipped_steps == 1


def test_grad_scaler_unscales_inside_the_step():
    """GradScaler's scale S goes to the ops (no unscale_ pass): the same step as unscaled grads."""
    ws, grads = _problem(5, steps=4)
    expected, _ = _run(ws, grads, lr=0.01, weight_decay=0.01)
    params = [torch.nn.Parameter(x.clone()) for x in ws]
    opt = LAMB(params, lr=0.01, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=1000)
    for gs in grads:
        loss = sum((p * g).sum() for p, g in zip(params, gs))  # ∂loss/∂p = g
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for p in params:
            p.grad = None
    for a, b in zip(params, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_state_dict_round_trip_and_resume():
    ws, grads = _problem(6, steps=6)
    straight, _ = _run(ws, grads, lr=0.01, weight_decay=0.01)
    params, opt = _run(ws, grads[:3], lr=0.01, weight_decay=0.01)
    sd = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LAMB(resumed, lr=0.01, weight_decay=0.01)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["param_groups"] == sd["param_groups"]
    for gs in grads[3:]:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_a_loaded_state_is_its_own_and_keeps_fp32_moments_of_bf16_parameters():
    """Loading in the same process: the twin's step counts and moments are copies (the
    original's steps do not advance the twin's), and bf16 parameters keep fp32 moments
    (torch's load_state_dict casts floating state to the parameter's dtype)."""
    params = [torch.nn.Parameter(torch.randn(4, 3).bfloat16())]
    opt = LAMB(params, lr=0.01)
    params[0].grad = torch.randn(4, 3).bfloat16()
    opt.step()
    twin = LAMB([torch.nn.Parameter(params[0].detach().clone())], lr=0.01)
    twin.load_state_dict(opt.state_dict())
    (state,) = twin.state.values()
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    opt.step()
    assert state["step"].item() == 1 and next(iter(opt.state.values()))["step"].item() == 2


@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1.0), "Invalid learning rate"), (dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
    (dict(rule="cblr"), "Invalid rule"), (dict(backend="cpp"), "fused kernels of its ops are not written yet"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm"),
])
def test_bad_hyperparameters_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LAMB([torch.nn.Parameter(torch.ones(2))], **bad)


def test_bfloat16_parameters_keep_fp32_moments():
    ws, grads = _problem(7, steps=3)
    params = [torch.nn.Parameter(x.bfloat16()) for x in ws]
    opt = LAMB(params, lr=0.01)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.bfloat16()
        opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 and s["step"].item() == 3 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in params)
