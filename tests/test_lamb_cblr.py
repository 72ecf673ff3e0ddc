"""CBLR on the Adam direction (``LAMB(rule="cblr")``): κ against an independent fp64
evaluation on a random quadratic loss, the whole step against a formula written here, the
C++ secant kernel against the reference element-wise, and the step's contracts (a skipped
step changes nothing, exact resume, the closure required before anything is modified)."""
import copy
import math
import os

import pytest
import torch

from cblr_ext import LAMB, ops

SIZES = [12, 7, 5]
BACKENDS = ["reference", "cpp"]


class Quadratic:
    """½(x − c)ᵀA(x − c) over all layers' weights x (A symmetric positive definite, coupling
    the layers); its gradient written into ``.grad`` by the closure."""

    def __init__(self, seed, sizes=SIZES):
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        self.a = (q * 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)) @ q.T
        self.a = (self.a + self.a.T) / 2
        self.c = torch.randn(n, generator=gen, dtype=torch.float64)
        self.sizes = sizes

    def grad(self, xs):
        """fp64 gradient of every layer at the fp64 point ``xs``."""
        flat = torch.cat([x.reshape(-1) for x in xs])
        return list(torch.split(self.a @ (flat - self.c), self.sizes))

    def closure_for(self, params, calls=None):
        def closure():
            for p, g in zip(params, self.grad([p.detach().double() for p in params])):
                p.grad = g.to(p.dtype)
            if calls is not None:
                calls.append([p.detach().clone() for p in params])
            return torch.zeros(())
        return closure


def _params(seed, dtype=torch.float32, sizes=SIZES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)) for n in sizes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_kappa_matches_an_fp64_evaluation_on_a_quadratic(backend, clip):
    """g(w) − g(w + Δ) = −AΔ exactly, so κ of each layer is
    (‖(AΔ)_layer/c/(√v̂ + ε)‖ + ε)/‖Δ_layer‖, v̂ this step's second moment (of g_t ÷ the clip divisor c), evaluated here in fp64 from the
    state the optimizer held before the step (fp64 parameters: the gradients are exact to 1e-16;
    β2 = 1/2: the bias correction 1 − β2^t, formed in fp32 from the fp32 step count, is exact)."""
    loss = Quadratic(1)
    params = _params(2, torch.float64)
    eps, beta2 = 1e-6, 0.5
    opt = LAMB(params, lr=0.05, betas=(0.9, beta2), rule="cblr", weight_decay=0.01, eps=eps, max_grad_norm=clip,
               backend=backend)
    closure = loss.closure_for(params)
    opt.step(closure)
    for _ in range(4):
        w_t = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
        opt.step(closure)
        g = loss.grad(w_t)
        total = math.sqrt(sum(float(x.square().sum()) for x in g))
        c = 1.0 if clip is None else float(torch.tensor(max(1.0, total / clip)).float())  # fp32, as documented
        delta = [(w + s["prev_step"]) - w for w, s in zip(w_t, state)]  # what the shift realised
        a_delta = loss.grad([w + d for w, d in zip(w_t, delta)])
        a_delta = [y - x for x, y in zip(g, a_delta)]
        for i, (s, name) in enumerate(zip(state, opt.layer_stats())):
            v = beta2 * s["exp_avg_sq"] + (1 - beta2) * (g[i] / c) ** 2
            v_hat = v / (1 - beta2 ** (float(s["step"]) + 1))
            expected = (float((a_delta[i] / c / (v_hat.sqrt() + eps)).norm()) + eps) / float(delta[i].norm())
            got = opt.layer_stats()[name]["kappa"]
            assert got == pytest.approx(expected, rel=1e-9), (i, got, expected)


def cblr_adam_formula(loss, ws, steps, lr, betas, eps, weight_decay, trust, ema, interval, max_ratio,
                      fallback_trust, max_grad_norm):
    """The whole step in fp64, layer by layer (docs/algorithm.md, "The Adam base", CBLR)."""
    b1, b2 = betas
    w = [x.double().clone() for x in ws]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    kappa_bar = [math.nan] * len(w)
    age = [math.inf] * len(w)
    s = None
    for t in range(1, steps + 1):
        g = loss.grad(w)
        c = 1.0
        if max_grad_norm is not None:
            c = max(1.0, math.sqrt(sum(float(x.square().sum()) for x in g)) / max_grad_norm)
        g = [x / c for x in g]
        g_s = None if s is None else [x / c for x in loss.grad([a + b for a, b in zip(w, s)])]
        new_s = []
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            v_hat = v[i] / (1 - b2 ** t)
            u = (m[i] / (1 - b1 ** t)) / (v_hat.sqrt() + eps) + weight_decay * w[i]
            if g_s is not None and age[i] >= interval:
                kappa = (float(((g[i] - g_s[i]) / (v_hat.sqrt() + eps)).norm()) + eps) / float(s[i].norm())
                kappa_bar[i] = kappa if math.isnan(kappa_bar[i]) else ema * kappa_bar[i] + (1 - ema) * kappa
                age[i] = 1
            else:
                age[i] += 1
            if math.isnan(kappa_bar[i]):
                r = fallback_trust * float(w[i].norm()) / float(u.norm())
            else:
                r = trust / kappa_bar[i]
            if max_ratio is not None:
                r = min(r, max_ratio)
            new_s.append(lr * r * u)
            w[i] = w[i] - new_s[-1]
        s = new_s
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(curvature_ema=0.0, curvature_interval=1, max_ratio=None, max_grad_norm=None),
    dict(curvature_ema=0.5, curvature_interval=2, max_ratio=None, max_grad_norm=1.0),
    dict(curvature_ema=0.0, curvature_interval=1, max_ratio=0.02, max_grad_norm=None, trust_coefficient=0.5),
])
def test_matches_the_formula_over_20_steps(backend, case):
    """fp64 parameters: with fp32 ones the secant's g − g_s cancels to a few significant bits
    (the steps are ~1e-4 of w), so κ, and with it w, carries fp32 gradient noise of ~1e-5."""
    loss = Quadratic(3)
    params = _params(4, torch.float64)
    hp = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, fallback_trust=1e-2)
    hp.update(case)
    expected = cblr_adam_formula(loss, [p.detach() for p in params], 20, hp["lr"], hp["betas"], hp["eps"],
                                 hp["weight_decay"], hp.get("trust_coefficient", 1.0), hp["curvature_ema"],
                                 hp["curvature_interval"], hp["max_ratio"], hp["fallback_trust"],
                                 hp["max_grad_norm"])
    opt = LAMB(params, rule="cblr", backend=backend, **hp)
    for _ in range(20):
        opt.step(loss.closure_for(params))
    for p, e in zip(params, expected):
        assert float((p.detach() - e).abs().max()) <= 1e-6
    assert opt.skipped_steps == 0
    assert not any(row["fallback"] for row in opt.layer_stats().values())


def test_the_probe_evaluates_the_closure_at_w_plus_the_last_step_and_restores_w():
    loss = Quadratic(5)
    params = _params(6)
    opt = LAMB(params, lr=0.01, rule="cblr")
    opt.step(loss.closure_for(params))
    w_t = [p.detach().clone() for p in params]
    s = [opt.state[p]["prev_step"].clone() for p in params]
    calls = []
    opt.step(loss.closure_for(params, calls))
    assert len(calls) == 2  # g_t, then the probe
    assert all(torch.equal(a, b) for a, b in zip(calls[0], w_t))
    assert all(torch.equal(a, w + d) for a, w, d in zip(calls[1], w_t, s))
    moved = [w - p.detach() for w, p in zip(w_t, params)]  # w_t − w_{t+1}: the new step, from w_t
    for p, m in zip(params, moved):
        torch.testing.assert_close(opt.state[p]["prev_step"], m, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["nan_grad", "nan_probe_grad", "grad_scaler"])
def test_a_skipped_step_changes_nothing(backend, how):
    loss = Quadratic(7)
    params = _params(8)
    opt = LAMB(params, lr=0.01, rule="cblr", curvature_ema=0.5, backend=backend)
    for _ in range(3):
        opt.step(loss.closure_for(params))
    before = copy.deepcopy(([p.detach() for p in params], opt.state_dict()["state"]))
    closure = loss.closure_for(params)
    calls = []

    def poisoned():
        closure()
        calls.append(None)
        if how == "nan_grad" and len(calls) == 1 or how == "nan_probe_grad" and len(calls) == 2:
            params[1].grad[0] = float("nan")
        return torch.zeros(())

    if how == "grad_scaler":
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step(poisoned)
    assert len(calls) == 2
    after = opt.state_dict()["state"]
    for p, b in zip(params, before[0]):
        assert torch.equal(p.detach(), b)
    for key, value in before[1].items():
        assert after[key].keys() == value.keys()
        for name in value:
            assert torch.equal(after[key][name], value[name]) or (
                torch.isnan(value[name]).all() and torch.isnan(after[key][name]).all()), (key, name)
    assert opt.skipped_steps == 1


def test_a_skipped_first_step_creates_no_previous_step():
    params = _params(9)
    opt = LAMB(params, lr=0.01, rule="cblr")
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad[0] = float("inf")
    opt.step()
    assert all("prev_step" not in opt.state[p] for p in params)
    assert all(opt.state[p]["step"].item() == 0 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_resume(backend):
    loss = Quadratic(10)
    hp = dict(lr=0.01, rule="cblr", curvature_ema=0.5, curvature_interval=2, backend=backend)
    straight = _params(11)
    opt = LAMB(straight, **hp)
    for _ in range(7):
        opt.step(loss.closure_for(straight))
    params = _params(11)
    opt = LAMB(params, **hp)
    for _ in range(3):
        opt.step(loss.closure_for(params))
    sd = copy.deepcopy(opt.state_dict())
    assert {"kappa", "age", "prev_step"} <= set(sd["state"][0])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LAMB(resumed, **hp)
    opt2.load_state_dict(sd)
    assert opt2.state_dict()["param_groups"] == sd["param_groups"]
    assert opt2.state[resumed[0]]["kappa"].dtype == torch.float64
    for _ in range(4):
        opt2.step(loss.closure_for(resumed))
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)


def test_a_measuring_step_without_a_closure_is_refused_before_anything_changes():
    loss = Quadratic(12)
    params = _params(13)
    opt = LAMB(params, lr=0.01, rule="cblr", curvature_interval=2)
    loss.closure_for(params)()
    opt.step()  # the first step has no previous step: nothing to measure, no closure needed
    assert all(row["fallback"] for row in opt.layer_stats().values())
    opt.step(loss.closure_for(params))  # measures: the age is 1 after it
    loss.closure_for(params)()
    opt.step()  # not due (curvature_interval=2): κ̄ reused, no closure needed
    assert not any(row["fallback"] for row in opt.layer_stats().values())
    loss.closure_for(params)()
    before = copy.deepcopy(([p.detach() for p in params], opt.state_dict()["state"]))
    with pytest.raises(RuntimeError, match="needs step\\(closure\\).*Nothing was modified"):
        opt.step()
    for p, b in zip(params, before[0]):
        assert torch.equal(p.detach(), b)
    for key, value in before[1].items():
        for name in value:
            assert torch.equal(opt.state_dict()["state"][key][name], value[name]), (key, name)


def test_bad_curvature_options_are_refused():
    params = _params(14)
    for bad, message in [(dict(curvature_ema=1.0), "curvature_ema"), (dict(curvature_interval=0), "curvature_interval"),
                         (dict(fallback_trust=0.0), "fallback_trust"), (dict(rule="secant"), "Invalid rule")]:
        with pytest.raises(ValueError, match=message):
            LAMB(params, rule=bad.pop("rule", "cblr"), **bad)


def _secant_inputs(dtype, sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    state = torch.promote_types(dtype, torch.float32)
    rand = lambda n, scale=1.0: (torch.randn(n, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    params = [rand(n).to(dtype) for n in sizes]
    grads = [rand(n).to(dtype) for n in sizes]
    probe_grads = [(g.double() + rand(n, 0.05)).to(dtype) for g, n in zip(grads, sizes)]
    probe_steps = [rand(n, 1e-3).to(state) for n in sizes]
    exp_avg_sqs = [(torch.rand(n, generator=gen, dtype=torch.float64) * 0.01).to(state) for n in sizes]
    steps = [torch.tensor(float(i + 2)) for i in range(len(sizes))]
    return params, grads, probe_grads, probe_steps, exp_avg_sqs, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scaled_and_clipped", [False, True])
def test_cpp_secant_sums_match_the_reference_element_wise(dtype, scaled_and_clipped):
    """Per layer the same fp32/fp64 element math (layer_math.h); the sums of squares in another
    order, and torch's fp32 vector square root may be an ulp off (tests/test_lamb.py): 1e-6."""
    sizes = [70001, 65536, 9]
    inputs = _secant_inputs(dtype, sizes, 15)
    scale = 1024.0 if scaled_and_clipped else 1.0
    grads = [(g.double() * scale).to(dtype) for g in inputs[1]]
    probe_grads = [(g.double() * scale).to(dtype) for g in inputs[2]]
    extra = (torch.tensor([scale]), torch.tensor(1.7)) if scaled_and_clipped else (None, None)
    args = (inputs[0], grads, probe_grads, *inputs[3:], *extra, 0.999, 1e-6, True)
    got = ops.OPS.adam_secant_sums(*args)
    want = ops.REFERENCE_OPS.adam_secant_sums(*args)
    assert got.dtype == torch.float64 and got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (got > 0).all()


def test_cpp_registers_the_secant_sums_for_the_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cblr_ext::adam_secant_sums", "CPU")


def test_cpp_secant_sums_refuse_bad_input():
    params, grads, probe_grads, probe_steps, exp_avg_sqs, steps = _secant_inputs(torch.float32, [5, 4], 16)
    with pytest.raises(RuntimeError, match="probe gradient of layer 1"):
        ops.OPS.adam_secant_sums(params, grads, [probe_grads[0], torch.zeros(3)], probe_steps, exp_avg_sqs, steps,
                                 None, None, 0.999, 1e-6, True)
    with pytest.raises(RuntimeError, match="probe steps"):
        ops.OPS.adam_secant_sums(params, grads, probe_grads, probe_steps[:1], exp_avg_sqs, steps,
                                 None, None, 0.999, 1e-6, True)


@pytest.mark.parametrize("kernels", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_secant_ops_pass_opcheck(kernels, dtype):
    kernel_ops = ops.OPS if kernels == "cpp" else ops.REFERENCE_OPS
    params, grads, probe_grads, probe_steps, exp_avg_sqs, steps = _secant_inputs(dtype, [30, 70000], 17)
    scale, clip = torch.tensor([4.0]), torch.tensor(1.5)
    torch.library.opcheck(kernel_ops.adam_secant_sums.default,
                          (params, grads, probe_grads, probe_steps, exp_avg_sqs, steps, scale, clip, 0.999, 1e-6,
                           True))
    exp_avgs = [torch.zeros_like(v) for v in exp_avg_sqs]
    for found_inf in (False, True):
        torch.library.opcheck(kernel_ops.adam_secant_update_.default,
                              ([p.clone() for p in params], grads, [m.clone() for m in exp_avgs],
                               [v.clone() for v in exp_avg_sqs], [s.clone() for s in steps],
                               [s.clone() for s in probe_steps], torch.tensor([0.01, 0.02], dtype=torch.float64),
                               torch.tensor(found_inf), scale, clip, 0.9, 0.999, 1e-6, 0.01, True))


interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="TRITON_INTERPRET was not 1 when triton was imported")


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scaled_and_clipped", [False, True])
def test_triton_secant_sums_match_the_reference_element_wise(dtype, scaled_and_clipped):
    """The Triton kernel (in the interpreter) rounds every fp32 operation once, as the
    reference; its sums of squares are added in another order: 1e-6."""
    tb = pytest.importorskip("cblr_ext.backends.triton")
    sizes = [5000, 1025, 9]
    params, grads, probe_grads, probe_steps, exp_avg_sqs, steps = _secant_inputs(dtype, sizes, 18)
    extra = (torch.tensor([8.0]), torch.tensor(1.3)) if scaled_and_clipped else (None, None)
    args = (params, grads, probe_grads, probe_steps, exp_avg_sqs, steps, *extra, 0.999, 1e-6, True)
    got = tb.adam_secant_sums(*args)
    want = ops.REFERENCE_OPS.adam_secant_sums(*args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert (got > 0).all()


def _secant_update_inputs(dtype, sizes, seed):
    """w, g, m, v, step, s of each layer (m, v, s in the state dtype: fp32 for 16-bit w)."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.promote_types(dtype, torch.float32)
    rand = lambda n, scale=1.0: (torch.randn(n, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
    return ([rand(n).to(dtype) for n in sizes], [rand(n, 64.0).to(dtype) for n in sizes],
            [rand(n, 0.1).to(state) for n in sizes],
            [(torch.rand(n, generator=gen, dtype=torch.float64) * 0.01).to(state) for n in sizes],
            [torch.tensor(float(i + 2)) for i in range(len(sizes))], [rand(n, 1e-3).to(state) for n in sizes])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("found_inf", [False, True])
@pytest.mark.parametrize("sizes", [[70001, 65536, 9, 0], []], ids=["chunks", "empty"])
def test_cpp_secant_update_matches_the_reference(dtype, found_inf, sizes):
    """m, v and the step count bit-identical to the reference; w and s within an fp32 ulp
    (torch's vector square root, tests/test_lamb.py); a skipped step leaves every input's bits."""
    inputs = _secant_update_inputs(dtype, sizes, 21)
    before = [[t.clone() for t in role] for role in inputs]
    got_in, want_in = [[t.clone() for t in role] for role in inputs], [[t.clone() for t in role] for role in inputs]
    alpha = torch.linspace(0.01, 0.04, len(sizes), dtype=torch.float64)
    rest = (alpha, torch.tensor(found_inf), torch.tensor([64.0]), torch.tensor(1.7), 0.9, 0.999, 1e-6, 0.01, True)
    got = ops.OPS.adam_secant_update_(*got_in, *rest)
    want = ops.REFERENCE_OPS.adam_secant_update_(*want_in, *rest)
    assert got.dtype == torch.float64 and got.shape == (len(sizes),)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    if found_inf:
        for role, original in zip(got_in, before):
            assert all(torch.equal(a, b) for a, b in zip(role, original))
        return
    for name, k in (("exp_avg", 2), ("exp_avg_sq", 3), ("step", 4)):
        assert all(torch.equal(a, b) for a, b in zip(got_in[k], want_in[k])), name
    ulp = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    for k in (0, 5):
        for a, b in zip(got_in[k], want_in[k]):
            if b.numel():
                torch.testing.assert_close(a.double(), b.double(), rtol=ulp, atol=ulp * float(b.abs().max()))


def test_cpp_registers_the_secant_update_for_the_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("cblr_ext::adam_secant_update_", "CPU")


@pytest.mark.parametrize("backend, steps", [pytest.param("triton", 6, marks=interpreted), ("cpp", 20)])
def test_backend_steps_as_the_reference(backend, steps):
    loss = Quadratic(22)
    results = []
    for name in ("reference", backend):
        params = _params(23)
        opt = LAMB(params, lr=0.01, rule="cblr", curvature_ema=0.5, backend=name)
        for _ in range(steps):
            opt.step(loss.closure_for(params))
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
