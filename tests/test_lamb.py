"""LAMB and the median rule on the Adam direction, against an independent fp64 formula
written here (apex FusedLAMB's semantics), and the step's contracts: a skipped step
changes nothing, no state before a step applies.  Parity between backends, against
pytorch-optimizer's Lamb (mapped) and the state-dict round trips: the parity table
(tests/optim_db.py)."""
import copy
import math

import pytest
import torch

from cblr_ext import LAMB, ops
from cblr_ext.contract import ADAM_OPS

SHAPES = [(6, 5), (5,), (3, 4, 2)]
BACKENDS = ["auto", "reference", "cpp"]


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
    (dict(rule="secant"), "Invalid rule"), (dict(backend="tpu"), "the others have no kernels of its ops"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm"),
])
def test_bad_hyperparameters_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        LAMB([torch.nn.Parameter(torch.ones(2))], **bad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_parameters_keep_fp32_moments(backend):
    ws, grads = _problem(7, steps=3)
    params = [torch.nn.Parameter(x.bfloat16()) for x in ws]
    opt = LAMB(params, lr=0.01, backend=backend)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.bfloat16()
        opt.step()
    assert all(s["exp_avg"].dtype == torch.float32 and s["step"].item() == 3 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------- the C++ kernels (cpp)

def test_cpp_registers_every_adam_op_for_the_cpu():
    """backend="cpp" and "auto" on CPU run the C++ kernels, not the reference's composite."""
    for name in ADAM_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{name}", "CPU"), name


def _adam_state(n, dtype, seed):
    """w (every 7th element 0: no quotient there), m, v and step as after a few steps."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.promote_types(dtype, torch.float32)
    w = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    w[::7] = 0
    m = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.1).to(state)
    v = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.01).to(state)
    return w, m, v, torch.tensor(3.0)


def _one_step(kernels, rule, dtype, sizes, seed, grad_scale, clip, found_inf=False):
    """(parameters, moments, steps, the reduction, the statistics) of one step of ``kernels``."""
    states = [_adam_state(n, dtype, seed + i) for i, n in enumerate(sizes)]
    gen = torch.Generator().manual_seed(seed + 100)
    scale = 1.0 if grad_scale is None else float(grad_scale)
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype) for n in sizes]
    ws, ms, vs, steps = ([s[k] for s in states] for k in range(4))
    hp = (0.9, 0.999, 1e-6, 0.01, True)
    red = kernels.adam_reduce(rule, ws, grads, ms, vs, steps, grad_scale, clip, *hp)
    stats = kernels.adam_update_(rule, ws, grads, ms, vs, steps, [True] * len(ws), *red, torch.tensor(found_inf),
                                 grad_scale, clip, torch.tensor(0.02), *hp, 1.0, None)
    return ws, ms, vs, steps, red, stats


PARITY_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("rule", ["lars", "mclr"])
@pytest.mark.parametrize("dtype", PARITY_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("scaled_and_clipped", [False, True])
def test_cpp_matches_the_reference_element_wise_across_the_chunk_boundary(rule, dtype, scaled_and_clipped):
    """One step on layers of 65536 ± 1 and 131073 elements (a work chunk is 65536: the
    last chunk of a layer holds 1 element) and a small one, against the reference kernels.
    m, v and the step count are bit-identical (the same fp32/fp64 operations in the same
    order); u may differ by an ulp where torch's CPU fp32 square root is not correctly
    rounded (the kernel's is), and the norms are summed in another order, so w, the sums
    and the statistics agree to a relative 1e-6 (16-bit w: within one rounding step)."""
    sizes = [65535, 65536, 65537, 131073, 10]
    grad_scale = torch.tensor([1024.0]) if scaled_and_clipped else None
    clip = torch.tensor(1.7) if scaled_and_clipped else None
    got = _one_step(ops.OPS, rule, dtype, sizes, 11, grad_scale, clip)
    want = _one_step(ops.REFERENCE_OPS, rule, dtype, sizes, 11, grad_scale, clip)
    for name, a, b in zip(("exp_avg", "exp_avg_sq", "step"), got[1:4], want[1:4]):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), name
    ulp = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)  # 16-bit: one rounding of w
    for x, y in zip(got[0], want[0]):
        torch.testing.assert_close(x.double(), y.double(), rtol=ulp, atol=ulp * float(y.abs().max()))
    red_got, red_want = got[4], want[4]
    torch.testing.assert_close(red_got[0], red_want[0], rtol=1e-6, atol=0)
    assert torch.equal(red_got[2], red_want[2])
    torch.testing.assert_close(red_got[1], red_want[1], rtol=1e-6, atol=0)
    if rule == "mclr":
        assert (red_got[1] > 0).all()
    torch.testing.assert_close(got[5], want[5], rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_cpp_skipped_step_writes_nothing_and_reports_the_step_it_would_take(rule):
    """found_inf: w, m, v and the step count bit-identical, the statistics those of the
    reference (step_norm 0)."""
    sizes = [70000, 9]
    fresh = _one_step(ops.OPS, rule, torch.float32, sizes, 5, None, None, found_inf=False)
    skipped = _one_step(ops.OPS, rule, torch.float32, sizes, 5, None, None, found_inf=True)
    want = _one_step(ops.REFERENCE_OPS, rule, torch.float32, sizes, 5, None, None, found_inf=True)
    for i, n in enumerate(sizes):
        w, m, v, step = _adam_state(n, torch.float32, 5 + i)
        assert torch.equal(skipped[0][i], w) and torch.equal(skipped[1][i], m)
        assert torch.equal(skipped[2][i], v) and torch.equal(skipped[3][i], step)
        assert not torch.equal(fresh[0][i], w) and fresh[3][i].item() == 4.0
    assert (skipped[5][:, 2] == 0).all()
    torch.testing.assert_close(skipped[5], want[5], rtol=1e-6, atol=0, equal_nan=True)


def test_cpp_flags_a_nonfinite_gradient_and_sums_the_clip_pass():
    ws, ms, vs, steps = (list(t) for t in zip(*[_adam_state(n, torch.float32, 20 + n) for n in (100, 66000)]))
    grads = [torch.randn(100), torch.randn(66000)]
    grads[1][65999] = float("inf")
    sums, _, flags = ops.OPS.adam_reduce("lars", ws, grads, ms, vs, steps, None, None, 0.9, 0.999, 1e-6, 0.0, True)
    assert flags[:, 3].tolist() == [False, True]
    assert flags[:, :2].all() and not flags[:, 2].any()
    scale = torch.tensor([8.0])
    expected = torch.stack([(g.double() * 0.125).square().sum() for g in grads])
    torch.testing.assert_close(ops.OPS.grad_sq_sums(grads, scale), expected, rtol=1e-12, atol=0)


def test_cpp_update_takes_missing_norms_and_median_itself():
    """A reduction without FLAG_NORMS / FLAG_MEDIAN: the update takes them, as the reference."""
    sizes = [70000, 33]
    results = []
    for kernels in (ops.OPS, ops.REFERENCE_OPS):
        ws, ms, vs, steps = (list(t) for t in zip(*[_adam_state(n, torch.float32, 40 + n) for n in sizes]))
        grads = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
        hp = (0.9, 0.999, 1e-6, 0.01, True)
        sums = torch.zeros(2, 4, dtype=torch.float64)
        median = torch.zeros(2)
        flags = torch.zeros(2, 4, dtype=torch.bool)
        stats = kernels.adam_update_("mclr", ws, grads, ms, vs, steps, [True, True], sums, median, flags,
                                     torch.tensor(False), None, None, torch.tensor(0.01), *hp, 1.0, None)
        results.append((ws, stats))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=0, equal_nan=True)
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rule", ["lars", "mclr"])
def test_cpp_adam_ops_pass_opcheck(rule, dtype):
    """The C++ kernels against the ops' schemas and fakes, with a grad scale and a clip divisor."""
    states = [_adam_state(n, dtype, 60 + n) for n in (30, 70000)]
    ws, ms, vs, steps = ([s[k] for s in states] for k in range(4))
    grads = [torch.randn(w.shape).to(dtype) for w in ws]
    scale, clip = torch.tensor([4.0]), torch.tensor(1.5)
    hp = (0.9, 0.999, 1e-6, 0.01, True)
    torch.library.opcheck(ops.OPS.grad_sq_sums.default, (grads, scale))
    reduce_args = (rule, ws, grads, ms, vs, steps, scale, clip, *hp)
    torch.library.opcheck(ops.OPS.adam_reduce.default, reduce_args)
    red = ops.OPS.adam_reduce(*reduce_args)
    for found_inf in (False, True):
        torch.library.opcheck(ops.OPS.adam_update_.default,
                              (rule, [w.clone() for w in ws], grads, [m.clone() for m in ms],
                               [v.clone() for v in vs], [s.clone() for s in steps], [True, True], *red,
                               torch.tensor(found_inf), scale, clip, torch.tensor(0.01), *hp, 1.0, 2.0))


@pytest.mark.parametrize("bad, message", [
    (lambda a: a.__setitem__(3, [torch.zeros(3)] * 2), "exp_avg of layer 0 has dtype|must have its parameter's"),
    (lambda a: a.__setitem__(5, [torch.zeros(2), torch.zeros(())]), "step of layer 0 must be"),
    (lambda a: a.__setitem__(7, torch.tensor([1.0, 2.0])), "clip must be a one-element fp32"),
    (lambda a: a.__setitem__(0, "cblr"), "runs the rules lars and mclr"),
    (lambda a: a.__setitem__(2, [torch.zeros(4, dtype=torch.float64)] * 2), "gradient of layer 0 has dtype"),
])
def test_cpp_refuses_bad_input_before_writing(bad, message):
    ws = [torch.randn(4, dtype=torch.float16), torch.randn(3)]
    args = ["lars", ws, [torch.randn(4, dtype=torch.float16), torch.randn(3)],
            [torch.zeros(4), torch.zeros(3)], [torch.zeros(4), torch.zeros(3)], [torch.zeros(()), torch.zeros(())],
            None, None, 0.9, 0.999, 1e-6, 0.0, True]
    bad(args)
    before = [w.clone() for w in ws]
    with pytest.raises(RuntimeError, match=message):
        ops.OPS.adam_reduce(*args)
    red = ops.REFERENCE_OPS.adam_reduce("lars", ws, [torch.randn(4, dtype=torch.float16), torch.randn(3)],
                                        [torch.zeros(4), torch.zeros(3)], [torch.zeros(4), torch.zeros(3)],
                                        [torch.zeros(()), torch.zeros(())], None, None, 0.9, 0.999, 1e-6, 0.0, True)
    with pytest.raises(RuntimeError, match=message):
        ops.OPS.adam_update_(*args[:6], [True, True], *red, torch.tensor(False), *args[6:8], torch.tensor(0.1),
                             *args[8:], 1.0, None)
    assert all(torch.equal(a, b) for a, b in zip(ws, before))
