"""The fused C++ CPU backend (backend="cpp") against the reference backend.

Parity over ≥ 15 steps on mixed shapes for every rule and option, the exact MCLR
median bit-equal to torch.median (direct, bracketed and fallback selection paths),
non-finite skipping, state_dict round trips between backends, thread-count
independence, input checks, the fake (meta) implementations, reductions interchangeable
between the cpp and reference updates, and a JIT build from clean sources.  Op-level
tests call ``cblr_ext.functional`` with ``backend="cpp"`` (the dispatcher's CPU kernels
of csrc/) or ``torch.ops.cblr_ext``.
"""
import dataclasses
import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from cblr_ext import CBLR, LARS, MCLR, backends
from cblr_ext import functional as F
from cblr_ext import layer_math as lm
from cblr_ext.backends import cpp

RULES = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}
# Odd sizes, excluded 1-D layers, 4-D convs, an empty tensor, a layer whose gradient is
# exactly zero (index 6), one over the direct-median limit (16384) that spans two
# 64K-element chunks (index 4), and one bracketed layer in a single chunk (index 7).
SHAPES = [(37, 13), (64, 3, 3, 3), (17,), (0, 5), (300, 301), (129,), (5, 7), (20, 1001)]
ZERO_GRAD = 6


@pytest.fixture(scope="module", autouse=True)
def cpp_backend():
    reason = backends.why_unavailable("cpp", "cpu")
    assert reason is None, f"the cpp backend must build and load here: {reason}"


def make_problem(seed=0, dtype=torch.float32):
    """Initial weights and fixed per-element curvatures h of g = h ⊙ w + noise (a well-posed
    quadratic, so that rounding differences between backends do not grow)."""
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(s, generator=gen) * 0.1).to(dtype) for s in SHAPES]
    weights[1].view(-1)[::7] = 0.0  # zero weights are left out of the median
    curvature = [(torch.rand(s, generator=gen) * 1.5 + 0.5).to(dtype) for s in SHAPES]
    return weights, curvature


def train(cls, backend, steps=15, problem=None, params=None, opt=None, start=0, **kw):
    weights, curvature = problem or make_problem()
    if params is None:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
    if opt is None:
        opt = cls(params, backend=backend, **kw)

    def closure(t):
        def fill():
            for i, p in enumerate(params):
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * t + i)).to(p.dtype)
                p.grad = curvature[i] * p.detach() + 0.1 * noise
                if i == ZERO_GRAD:
                    p.grad.zero_()
            return torch.zeros(())
        return fill

    for t in range(start, start + steps):
        c = closure(t)
        c()
        opt.step(c)
    return params, opt


def max_rel_diff(xs, ys):
    worst = 0.0
    for x, y in zip(xs, ys):
        if x.numel():
            x, y = x.detach().double(), y.detach().double()
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-30)).item())
    return worst


def state_tensors(opt, params):
    out = []
    for p in params:
        st = opt.state[p]
        out += [st[k] for k in sorted(st) if isinstance(st[k], torch.Tensor)]
    return out


def grid():
    for rule, (momentum, nesterov), wd, ema, k in itertools.product(
            RULES, [(0.0, False), (0.9, False), (0.9, True)], [0.0, 1e-3], [0.0, 0.9], [1, 3]):
        variants = [{}] + ([{"lag": 1}] if rule != "cblr" else []) + ([{"median": "approx"}] if rule == "mclr" else [])
        for extra in variants:
            yield dict(rule=rule, momentum=momentum, nesterov=nesterov, weight_decay=wd, curvature_ema=ema,
                       curvature_interval=k, **extra)


def config_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", list(grid()), ids=config_id)
def test_parity_with_reference(cfg):
    cfg = dict(cfg)
    cls = RULES[cfg.pop("rule")]
    ref, ref_opt = train(cls, "reference", lr=0.1, **cfg)
    got, got_opt = train(cls, "cpp", lr=0.1, **cfg)
    assert max_rel_diff(ref, got) <= 1e-5
    # The per-layer state agrees too (κ̄, age, momentum, prev_step, lag stash).  Looser than
    # the parameters: the reference's fp32 norms carry ~5e-7 relative error, which moves
    # the ratios, and a momentum buffer is a sum of ratio-scaled steps.
    for p_ref, p_got in zip(ref, got):
        s_ref, s_got = ref_opt.state[p_ref], got_opt.state[p_got]
        assert sorted(s_ref) == sorted(s_got)
        for key in s_ref:
            a, b = s_ref[key].double(), s_got[key].double()
            if key == "lagged" and b[2].isnan() and not a[2].isnan():
                # cpp measures the stash's κ only where the next step measures (adapted and due).
                assert p_got.ndim <= 1 or s_got["age"] < cfg["curvature_interval"] - 1
                a, b = a[:2], b[:2]
            assert torch.equal(a.isnan(), b.isnan()), key
            assert max_rel_diff([a.nan_to_num()], [b.nan_to_num()]) <= 1e-4, key
    stats_ref, stats_got = ref_opt.layer_stats(), got_opt.layer_stats()
    for name in stats_ref:
        for col in ("ratio", "alpha", "kappa", "step_norm", "w_norm", "g_norm"):
            a, b = stats_ref[name][col], stats_got[name][col]
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12), (name, col)
        assert stats_ref[name]["fallback"] == stats_got[name]["fallback"]


def cpp_ops():
    from cblr_ext import ops  # noqa: F401
    return torch.ops.cblr_ext


def cpp_median(w, g, weight_decay=0.0, approx=False):
    """κ with ε = 0, i.e. the median itself (NaN where undefined), from the cpp reduce."""
    hp = F.Hyperparams(weight_decay=weight_decay, median="approx" if approx else "exact")
    red = F.layerwise_reduce("mclr", [w], [g], [torch.tensor(math.inf)], [True], hp, backend="cpp")
    assert red.flags[0, F.FLAG_MEDIAN]
    return lm.median_kappa(red.median[0], 0.0)


def torch_median(w, g, weight_decay=0.0, approx=False):
    q = lm.curvature_quotients(lm.decayed_grad(g, w, weight_decay), w)
    m = lm.lower_median(q, approx=approx)
    return m if m > 0 else torch.tensor(math.nan)  # κ = m + 0 is undefined at 0


def bit_equal(a, b):
    a, b = a.float().reshape(()), b.float().reshape(())
    return (a.isnan() and b.isnan()) or a.view(torch.int32) == b.view(torch.int32)


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 16384, 16385, 70001, 200000])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
@pytest.mark.parametrize("approx", [False, True])
def test_median_bit_equal_to_torch_median(n, weight_decay, approx):
    gen = torch.Generator().manual_seed(n)
    w, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    w[::11] = 0.0
    assert bit_equal(cpp_median(w, g, weight_decay, approx), torch_median(w, g, weight_decay, approx))


def test_median_with_ties_and_fp64():
    gen = torch.Generator().manual_seed(5)
    w = torch.ones(50000)
    g = torch.randint(0, 4, (50000,), generator=gen).float()  # quotients 0..3, massive ties
    assert bit_equal(cpp_median(w, g), torch_median(w, g))
    w64, g64 = torch.randn(30000, dtype=torch.float64, generator=gen), torch.randn(30000, dtype=torch.float64,
                                                                                   generator=gen)
    assert bit_equal(cpp_median(w64, g64, 1e-3), torch_median(w64, g64, 1e-3).float())


@pytest.mark.parametrize("n", [16000, 300000])  # direct selection; bracketed
def test_median_in_a_narrow_range(n):
    """Quotients 1 + k·ulp (k < 5000, many ties): keys that differ only in their low 13
    bits, so the selection's rounds start there and take two digits."""
    gen = torch.Generator().manual_seed(n)
    w = torch.ones(n)
    g = 1.0 + torch.randint(0, 5000, (n,), generator=gen).float() * 2.0**-23
    assert bit_equal(cpp_median(w, g), torch_median(w, g))
    assert bit_equal(cpp_median(w, g, approx=True), torch_median(w, g, approx=True))


@pytest.mark.parametrize("zeros", [0.45, 0.6])  # a positive median; a zero median (κ undefined)
@pytest.mark.parametrize("approx", [False, True])
def test_median_among_signed_zero_gradients(zeros, approx):
    """Gradients of −0 on negative weights (β = 0) give quotients |−0| / |w| = +0, as torch's
    abs does; the selection's keys and the approx bins count them as the zeros they are."""
    n = 50000
    gen = torch.Generator().manual_seed(2)
    w, g = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    zero = torch.rand(n, generator=gen) < zeros
    g[zero] = torch.where(w[zero] < 0, -0.0, 0.0)
    assert bit_equal(cpp_median(w, g, 0.0, approx), torch_median(w, g, 0.0, approx))


def test_median_nan_and_empty():
    w, g = torch.randn(40000), torch.randn(40000)
    g[12345] = math.nan
    assert cpp_median(w, g).isnan()  # torch.median propagates NaN
    assert cpp_median(torch.zeros(40000), g).isnan()  # no w ≠ 0: no quotient


def sampled_runs(n, runs=256, run=16):
    """Where the cpp median samples a layer of n elements (csrc/cpu/median.h, make_bracket:
    the LCG seeded with n, run-aligned starts), so that a test can mislead it."""
    mask = (1 << 64) - 1
    state = (0x9E3779B97F4A7C15 ^ n) & mask
    starts = []
    for _ in range(runs):
        state = (state * 6364136223846793005 + 1442695040888963407) & mask
        starts.append(((state >> 33) % (n - run)) & ~(run - 1))
    return starts


def misleading_grads(n, seed=9):
    """g with huge quotients (w = 1) exactly in the sampled runs: the sample's bracket lies
    far above the true median, so the exact median needs the fallback selection."""
    g = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    for start in sampled_runs(n):
        g[start:start + 16] += 1000.0
    return g


def test_median_when_the_sample_misleads():
    n = 100000
    w = torch.ones(n)
    g = misleading_grads(n)
    assert bit_equal(cpp_median(w, g), torch_median(w, g))


@pytest.mark.parametrize("n", [100000, 5000000])  # the second keeps its quotients with streaming stores
def test_lag_median_when_the_sample_misleads(n):
    """lag=1: the update pass brackets the median of its inputs for the next step; when the
    sample misleads, the selection over the quotients the pass kept is still exact."""
    w = torch.ones(n // 100, 100)
    g = misleading_grads(n)
    param = torch.nn.Parameter(w.clone())
    param.grad = g.view_as(w).clone()
    opt = MCLR([param], lr=0.1, eps=0.0, lag=1, backend="cpp")
    opt.step()
    assert bit_equal(opt.state[param]["lagged"][2], torch_median(w.flatten(), g))


def test_median_with_weights_near_the_fp32_limit_under_flush_to_zero():
    """|w| ≥ 2^126 has a subnormal reciprocal, 0 when denormals are flushed: the AVX-512
    classification must not take such a quotient (≈ 1 here) for one below the bracket."""
    n = 200000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0)) + 0.5
    w = torch.ones(n)
    w[::50] = 1e38
    g = w * u
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # flush_denormal sets the calling thread only
    try:
        if not torch.set_flush_denormal(True):
            pytest.skip("this CPU cannot flush denormals")
        got = cpp_median(w, g)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
    assert bit_equal(got, torch_median(w, g))


@pytest.mark.parametrize("approx", [False, True])
def test_median_with_extreme_values(approx):
    """Subnormal and huge weights, infinite and subnormal gradients, and quotients a few
    ulps either side of the median, in a layer large enough for the bracketed path
    (whose AVX-512 variant classifies most quotients without dividing)."""
    gen = torch.Generator().manual_seed(11)
    n = 120000
    w, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    w[1::7] = 1e-40   # subnormal weights: huge quotients
    w[2::13] = 3e37   # huge weights: tiny quotients
    g[3::17] = math.inf
    g[4::19] = 1e-42  # subnormal gradients
    w[5::23] = -w[5::23]
    q = (g / w).abs()
    m = q.median()
    near = torch.arange(6, n, 29)  # quotients at the median and 1 or 2 ulps away
    g[near] = (m * w[near].abs()) * (1 + (torch.arange(len(near)) % 5 - 2).float() * 2**-23)
    assert bit_equal(cpp_median(w, g, 0.0, approx), torch_median(w, g, 0.0, approx))
    assert bit_equal(cpp_median(w, g, 1e-3, approx), torch_median(w, g, 1e-3, approx))
    w[7] = math.inf  # ∞/∞: a NaN quotient
    g[7] = math.inf
    assert cpp_median(w, g, 0.0, approx).isnan()


@pytest.mark.parametrize("rule,lag", [("lars", 0), ("lars", 1), ("mclr", 0), ("mclr", 1), ("cblr", 0)])
def test_nonfinite_step_is_skipped(rule, lag):
    cls = RULES[rule]
    ref, ref_opt = train(cls, "reference", steps=3, lr=0.1, momentum=0.9, lag=lag)
    got, got_opt = train(cls, "cpp", steps=3, lr=0.1, momentum=0.9, lag=lag)
    before = [p.detach().clone() for p in got] + [t.clone() for t in state_tensors(got_opt, got)]
    for params, opt in ((ref, ref_opt), (got, got_opt)):
        def closure(params=params):  # a gradient with one Inf, wherever CBLR evaluates it
            for p in params:
                p.grad = torch.ones_like(p)
            params[4].grad[7, 11] = math.inf
            return torch.zeros(())
        opt.step(closure)
    after = [p.detach() for p in got] + state_tensors(got_opt, got)
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())
               for a, b in zip(before, after))
    assert got_opt.skipped_steps == ref_opt.skipped_steps == 1
    # The skipped step still reports every layer's norms (read before the skip decision
    # where pass 1 left them to the update pass).
    stats_ref, stats_got = ref_opt.layer_stats(), got_opt.layer_stats()
    for name in stats_ref:
        for col in ("w_norm", "g_norm"):
            a, b = stats_ref[name][col], stats_got[name][col]
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12), (name, col)
    # And the run goes on as the reference does.
    train(cls, "reference", steps=3, params=ref, opt=ref_opt, start=3)
    train(cls, "cpp", steps=3, params=got, opt=got_opt, start=3)
    assert max_rel_diff(ref, got) <= 1e-5


def test_skipped_first_step_creates_no_state():
    params = [torch.nn.Parameter(w.clone()) for w in make_problem()[0]]
    opt = MCLR(params, lr=0.1, momentum=0.9, lag=1, backend="cpp")
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert all(set(opt.state[p]) <= {"kappa", "age"} for p in params)


@pytest.mark.parametrize("rule,extra", [("mclr", {"lag": 1, "momentum": 0.9}), ("cblr", {"momentum": 0.9, "nesterov": True}),
                                        ("lars", {"momentum": 0.9, "curvature_interval": 3})])
@pytest.mark.parametrize("first,second", [("cpp", "reference"), ("reference", "cpp")])
def test_state_dict_round_trip_between_backends(rule, extra, first, second):
    cls = RULES[rule]
    expected, _ = train(cls, "reference", steps=16, lr=0.1, **extra)
    params, opt = train(cls, first, steps=8, lr=0.1, **extra)
    saved = opt.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, lr=0.1, backend=second, **extra)
    resumed.load_state_dict(saved)
    for group in resumed.param_groups:
        group["backend"] = second  # the saved groups name the backend they ran under
    train(cls, second, steps=8, params=resumed_params, opt=resumed, start=8)
    assert max_rel_diff(expected, resumed_params) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-7), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rule", ["lars", "mclr", "cblr"])
def test_parameter_dtypes(dtype, tol, rule):
    """Low-precision parameters keep fp32 state; ratios are fp32 math for every dtype."""
    cls = RULES[rule]
    problem = make_problem(dtype=dtype)
    ref, ref_opt = train(cls, "reference", steps=5, problem=problem, lr=0.1, momentum=0.9, weight_decay=1e-3)
    got, got_opt = train(cls, "cpp", steps=5, problem=problem, lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert all(p.dtype == dtype for p in got)
    assert all(got_opt.state[p]["momentum_buffer"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
               for p in got)
    assert max_rel_diff(ref, got) <= tol


def test_result_independent_of_thread_count():
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            params, opt = train(MCLR, "cpp", steps=4, lr=0.1, momentum=0.9, lag=1)
            results.append([p.detach().clone() for p in params] + state_tensors(opt, params))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(results[0], other))


CBLR_HP = F.Hyperparams(lr=0.1, momentum=0.9, weight_decay=1e-3, eps=1e-8, trust_coefficient=1.0,
                        curvature_ema=0.5, fallback_trust=1e-3, curvature_interval=3)


def cblr_apply(params, grads, buffers, saved, skip):
    """The cpp update of a CBLR group (μ = 0.9, β = 1e-3) with κ̄ = 2 carried; saved: the
    probe's w_t per layer, or []."""
    n = len(params)
    # Nothing measured (κ̄ is reused), no norms taken (the update takes them).
    reduction = F.Reduction(torch.zeros((n, F.SUM_COLUMNS), dtype=torch.float64), torch.zeros(n),
                            torch.zeros((n, F.FLAG_COLUMNS), dtype=torch.bool))
    state = F.LayerState(kappas=[torch.tensor(2.0, dtype=F.SCALAR_DTYPE) for _ in params], ages=[torch.tensor(1.0) for _ in params],
                         momentum_buffers=buffers)
    return F.layerwise_update_("cblr", params, grads, state, [True] * n, reduction, torch.tensor(skip), CBLR_HP,
                               saved=saved or None, backend="cpp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cblr_shift_secant_and_update_from_the_copy(dtype):
    """shift keeps w_t, moves to w_t + s like the reference and sums Σw_t²; pass 1 measures
    the secant like the reference's pass 1 (at w_t) without writing the parameters; the
    update from the saved copy equals restore + update bit for bit, and a skipped step
    restores w_t bit for bit."""
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    state = torch.float64 if dtype == torch.float64 else torch.float32
    steps = [(torch.randn(s, generator=gen) * 1e-2).to(state) for s in SHAPES]
    saved = [torch.full_like(w, 5.0) for w in ws]
    shifted, expected = [w.clone() for w in ws], [w.clone() for w in ws]
    expected_saved = [torch.empty_like(w) for w in ws]
    moved, expected_moved = [torch.empty_like(s) for s in steps], [torch.empty_like(s) for s in steps]
    w_sq = F.probe_shift_(shifted, steps, saved, moved, backend="cpp")
    F.probe_shift_(expected, steps, expected_saved, expected_moved, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(saved, ws))
    assert all(torch.equal(a, b) for a, b in zip(shifted, expected))
    assert all(torch.equal(a, b) for a, b in zip(moved, expected_moved))
    norms = torch.stack([torch.stack([torch.linalg.vector_norm(w.to(state)), torch.linalg.vector_norm(g.to(state))])
                         for w, g in zip(ws, gs)]).double()
    assert w_sq.dtype == torch.float64 and w_sq.shape == (len(ws),)
    torch.testing.assert_close(lm.norm_from_sum(w_sq), norms[:, 0], rtol=1e-5, atol=0)

    probe_g = [(g.to(state) + 0.5 * s).to(dtype) for g, s in zip(gs, steps)]
    measured = [i for i in range(len(SHAPES)) if i % 3 != 1]
    others = [i for i in range(len(ws)) if i not in measured]
    n = len(ws)
    probe = dict(probe_grads=[probe_g[i] if i in measured else None for i in range(n)],
                 probe_steps=[steps[i] if i in measured else None for i in range(n)])
    hp = F.Hyperparams(weight_decay=1e-3)
    ages = [torch.tensor(math.inf)] * n
    want = F.layerwise_reduce("cblr", ws, gs, ages, [True] * n, hp, backend="reference", **probe)
    at_probe = [w.clone() for w in shifted]
    red = F.layerwise_reduce("cblr", shifted, gs, ages, [True] * n, hp, w_sq=w_sq, w_sq_known=[True] * n,
                             backend="cpp", **probe)
    assert all(torch.equal(a, b) for a, b in zip(shifted, at_probe))  # pass 1 writes nothing
    # κ = (‖Δd‖ + 0) / ‖s‖ with ε = 0, from the secant sums of either backend
    def secant(r):
        return lm.secant_kappa(lm.norm_from_sum(r.sums[measured, F.SUM_DIFF2]),
                               lm.norm_from_sum(r.sums[measured, F.SUM_STEP2]), 0.0)
    torch.testing.assert_close(secant(red), secant(want), rtol=2e-5 if dtype != torch.float64 else 1e-6, atol=0,
                               equal_nan=True)
    assert (red.sums[others] == 0).all() and not red.flags[others, F.FLAG_NORMS].any()  # their norms: the update's
    assert torch.equal(red.measured, torch.tensor([i in measured for i in range(n)]))
    assert red.flags[measured, F.FLAG_NORMS].all() and not red.nonfinite.any()
    torch.testing.assert_close(lm.norm_from_sum(red.sums[measured, :2]), norms[measured], rtol=1e-5, atol=0)
    assert (red.median == 0).all() and not red.flags[:, F.FLAG_MEDIAN].any()  # not taken

    buffers = [(torch.randn(s, generator=gen) * 1e-2).to(state) for s in SHAPES]
    restored, restored_buffers = [w.clone() for w in ws], [v.clone() for v in buffers]
    from_copy, copy_buffers = [w.clone() for w in shifted], [v.clone() for v in buffers]
    want_stats = cblr_apply(restored, gs, restored_buffers, [], False)
    got_stats = cblr_apply(from_copy, gs, copy_buffers, saved, False)
    assert all(torch.equal(a, b) for a, b in zip(from_copy, restored))
    assert all(torch.equal(a, b) for a, b in zip(copy_buffers, restored_buffers))
    assert torch.equal(got_stats, want_stats)
    # The update took the norms pass 1 left out: of w_t (the copy), not of the probe point.
    w_col, g_col = F.STAT_NAMES.index("w_norm"), F.STAT_NAMES.index("g_norm")
    torch.testing.assert_close(got_stats[:, [w_col, g_col]], norms, rtol=1e-5, atol=0)
    skipped = [w.clone() for w in shifted]
    cblr_apply(skipped, gs, [], saved, True)
    assert all(torch.equal(a, b) for a, b in zip(skipped, ws))


def group_one_step_in(rule, lag, nesterov):
    """A group part-way into a run: κ̄ carried on most layers, every other layer due to
    measure (k = 2), momentum buffers, a valid lag stash on the layers not due (lag=1),
    and for CBLR the previous steps and the gradients at w_t + s of the measuring layers."""
    weights, curvature = make_problem(seed=5)
    gen = torch.Generator().manual_seed(6)
    n = len(weights)
    grads = [c * w + 0.1 * torch.randn(w.shape, generator=gen) for w, c in zip(weights, curvature)]
    grads[ZERO_GRAD].zero_()
    adapt = [w.ndim > 1 for w in weights]
    ages = [torch.tensor(math.inf if i % 2 == 0 else 1.0) for i in range(n)]
    state = F.LayerState(kappas=[torch.tensor(math.nan if i % 3 == 0 else 1.5 + i, dtype=F.SCALAR_DTYPE) for i in range(n)], ages=ages,
                         momentum_buffers=[torch.randn(w.shape, generator=gen) * 1e-2 for w in weights])
    if lag:
        state.lagged = [torch.tensor([1.0 + i, 0.5, 2.0 + i], dtype=F.SCALAR_DTYPE) for i in range(n)]
        state.lagged_valid = [i % 2 == 1 for i in range(n)]
    probe = None
    if rule == "cblr":
        steps = [torch.randn(w.shape, generator=gen) * 1e-2 for w in weights]
        if nesterov:
            state.prev_steps = steps
        measures = [adapt[i] and i % 2 == 0 for i in range(n)]
        probe = [(c * (w + s) + 0.1 * torch.randn(w.shape, generator=gen) if m else None, s if m else None)
                 for w, c, s, m in zip(weights, curvature, steps, measures)]
    hp = F.Hyperparams(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-3, curvature_ema=0.5,
                       curvature_interval=2, lag=lag, median="exact")
    return weights, grads, adapt, state, probe, hp


def cross_step(rule, reduce_backend, update_backend, lag=False, nesterov=False, median="exact"):
    """One step whose reduction comes from ``reduce_backend`` and whose update from
    ``update_backend``: (parameters and state after it, its statistics).  A cpp CBLR pass 1
    runs at the probe point (the shift's Σw_t²) and the update writes from the saved w_t;
    the reference's pass 1 runs at w_t."""
    weights, grads, adapt, state, probe, hp = group_one_step_in(rule, lag, nesterov)
    hp = dataclasses.replace(hp, median=median)
    params = [w.clone() for w in weights]
    n = len(params)
    kwargs, saved = {}, None
    if probe is not None:
        kwargs.update(probe_grads=[g for g, _ in probe], probe_steps=[s for _, s in probe])
        if reduce_backend == "cpp":
            shifted = [i for i, (g, _) in enumerate(probe) if g is not None]
            saved = [torch.empty_like(p) if i in shifted else None for i, p in enumerate(params)]
            w_sq = torch.zeros(n, dtype=torch.float64)
            w_sq[shifted] = F.probe_shift_([params[i] for i in shifted], [probe[i][1] for i in shifted],
                                           [saved[i] for i in shifted],
                                           [torch.empty_like(probe[i][1]) for i in shifted], backend="cpp")
            kwargs.update(w_sq=w_sq, w_sq_known=[i in shifted for i in range(n)])
    workspace = lambda backend: cpp.workspace(rule, params, lag, {}) if backend == "cpp" else None
    ages = state.ages
    reduction = F.layerwise_reduce(rule, params, grads, ages, adapt, hp, lagged_valid=state.lagged_valid or None,
                                   workspace=workspace(reduce_backend), backend=reduce_backend, **kwargs)
    stats = F.layerwise_update_(rule, params, grads, state, adapt, reduction, torch.tensor(False), hp, saved=saved,
                                workspace=workspace(update_backend), backend=update_backend)
    tensors = params + state.momentum_buffers + state.prev_steps + state.kappas + state.ages + state.lagged
    return tensors, stats


@pytest.mark.parametrize("rule,extra", [("lars", {}), ("lars", {"lag": True}), ("mclr", {}),
                                        ("mclr", {"median": "approx"}), ("mclr", {"lag": True}),
                                        ("cblr", {}), ("cblr", {"nesterov": True})])
def test_reductions_are_interchangeable_between_backends(rule, extra):
    """A cpp reduction fed to the reference update, and a reference reduction fed to the
    cpp update, give the step of the same-backend pair: the reduction is a contract, not a
    backend's private format.  The two reductions differ only in the summation order of
    their sums (the medians are bit-equal), so parameters and state agree to rounding."""
    for update_backend in ("reference", "cpp"):
        same, same_stats = cross_step(rule, update_backend, update_backend, **extra)
        other = "cpp" if update_backend == "reference" else "reference"
        mixed, mixed_stats = cross_step(rule, other, update_backend, **extra)
        for a, b in zip(same, mixed):
            assert torch.equal(a.isnan(), b.isnan())
            assert max_rel_diff([a.nan_to_num()], [b.nan_to_num()]) <= 1e-6, (update_backend, a.shape)
            if rule == "mclr" and not extra.get("lag"):  # κ from the (bit-equal) medians alone: bit for bit
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), (update_backend, a.shape)
        assert torch.equal(same_stats.isnan(), mixed_stats.isnan())
        torch.testing.assert_close(mixed_stats, same_stats, rtol=1e-6, atol=0, equal_nan=True)


def test_update_takes_missing_norms_and_rejects_a_missing_median():
    """The cpp update given a reduction without Σw², Σg² (FLAG_NORMS) for a measuring LARS
    layer takes them itself (the step of the complete reduction); one without the median
    of a measuring MCLR layer (and no lag stash) is an error, raised before anything is
    written."""
    gen = torch.Generator().manual_seed(8)
    w, g = torch.randn(300, 301, generator=gen), torch.randn(300, 301, generator=gen)
    hp = F.Hyperparams(lr=0.1, momentum=0.9, trust_coefficient=1e-2)

    def step(rule, reduction):
        params = [w.clone()]
        state = F.LayerState(kappas=[torch.tensor(0.5, dtype=F.SCALAR_DTYPE)], ages=[torch.tensor(math.inf)],
                             momentum_buffers=[torch.zeros_like(w)])
        try:
            stats = F.layerwise_update_(rule, params, [g], state, [True], reduction, torch.tensor(False), hp,
                                        backend="cpp")
        except RuntimeError as exc:
            return exc, [params[0], state.kappas[0], state.ages[0], state.momentum_buffers[0]]
        return stats, [params[0], state.kappas[0], state.ages[0], state.momentum_buffers[0]]

    complete = F.layerwise_reduce("lars", [w], [g], [torch.tensor(math.inf)], [True], hp, backend="cpp")
    assert complete.flags[0, F.FLAG_NORMS] and complete.measured[0]
    partial = F.Reduction(complete.sums.clone(), complete.median.clone(), complete.flags.clone())
    partial.sums[0, :2] = 0.0
    partial.flags[0, F.FLAG_NORMS] = False
    (want_stats, want), (got_stats, got) = step("lars", complete), step("lars", partial)
    assert max_rel_diff(want, got) <= 1e-6
    torch.testing.assert_close(got_stats, want_stats, rtol=1e-6, atol=0, equal_nan=True)

    red = F.layerwise_reduce("mclr", [w], [g], [torch.tensor(math.inf)], [True], hp, backend="cpp")
    red.flags[0, F.FLAG_MEDIAN] = False
    error, after = step("mclr", red)
    assert isinstance(error, RuntimeError) and "no median" in str(error)
    assert torch.equal(after[0], w) and after[1] == 0.5 and after[2] == math.inf and not after[3].any()


def test_large_restore_is_exact():
    # Over 16 MiB in all: the copies use streaming stores, here into unaligned
    # destinations (views starting 4 or 12 bytes into a buffer) with ragged tails.
    gen = torch.Generator().manual_seed(4)
    saved = [torch.randn(n, generator=gen) for n in (3_000_001, 1_500_003, 17)]
    ws = [t.clone() for t in saved]
    buffers = [torch.zeros(w.numel() + 3) for w in ws]
    targets = [buf[1:1 + w.numel()] if i % 2 == 0 else buf[3:] for i, (buf, w) in enumerate(zip(buffers, ws))]
    F.probe_restore_(targets, saved, backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(targets, ws))
    assert all(buf[0] == 0 for buf in buffers)


def test_bad_input_raises_before_anything_changes():
    good = torch.nn.Parameter(torch.randn(6, 5))
    bad = torch.nn.Parameter(torch.randn(8, 5))
    opt = LARS([good, bad], lr=0.1, momentum=0.9, backend="cpp")
    good.grad, bad.grad = torch.randn(6, 5), torch.randn(8, 10)[:, ::2]  # a gradient with gaps
    before = good.detach().clone(), bad.detach().clone()
    with pytest.raises(RuntimeError, match="memory layout"):
        opt.step()
    assert torch.equal(good.detach(), before[0]) and torch.equal(bad.detach(), before[1])


def test_fake_implementations_trace_shapes():
    ops = cpp_ops()
    with FakeTensorMode():
        ws = [torch.empty(4, 3), torch.empty(7)]
        gs = [torch.empty(4, 3), torch.empty(7)]
        ages = [torch.empty(()), torch.empty(())]
        workspace = torch.empty(0, dtype=torch.uint8)
        sums, median, flags = ops.layerwise_reduce("lars", ws, gs, ages, [True, False], [False, False], [], [], None,
                                                   [False, False], None, 0.0, 1, False, False, True, workspace)
        assert sums.shape == (2, 4) and sums.dtype == torch.float64
        assert median.shape == (2,) and median.dtype == torch.float32
        assert flags.shape == (2, 4) and flags.dtype == torch.bool
        stats = ops.layerwise_update_("lars", ws, gs, [], [], [torch.empty(()), torch.empty(())], ages, [],
                                      [False, False], [], [True, False], sums, median, flags,
                                      torch.empty((), dtype=torch.bool), None, torch.empty(()), 0.0, False, 0.0,
                                      1e-8,
                                      1e-3, 0.0, None, 1e-3, 1, False, False, workspace, None)
        assert stats.shape == (2, 7)
        w_sq = ops.probe_shift_(ws, gs, [torch.empty_like(w) for w in ws], [torch.empty_like(w) for w in ws])
        assert w_sq.shape == (2,) and w_sq.dtype == torch.float64
        sums, median, flags = ops.layerwise_reduce("cblr", ws, gs, ages, [True, False], [False, False],
                                                   [gs[0], None], [ws[0], None], w_sq, [True, True], None, 0.0, 1,
                                                   False, False, True, workspace)
        assert sums.shape == (2, 4) and flags.shape == (2, 4)


def test_opcheck_shift_and_probe_reduce():
    # Every layer measures: opcheck compares outputs without equal_nan, and a layer that
    # does not measure has statistics with κ = NaN (that path is compiled in
    # test_torch_compile_traces_the_ops).
    gen = torch.Generator().manual_seed(0)

    def tensors():
        return [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]

    ws, gs, probe, steps = tensors(), tensors(), tensors(), tensors()
    ops = cpp_ops()
    torch.library.opcheck(ops.probe_shift_, (ws, steps, [torch.empty_like(t) for t in ws],
                                             [torch.empty_like(t) for t in steps]))
    torch.library.opcheck(ops.probe_restore_, (ws, [t + 1 for t in ws]))
    ages = [torch.tensor(math.inf), torch.tensor(math.inf)]
    no_scratch = torch.empty(0, dtype=torch.uint8)
    torch.library.opcheck(ops.layerwise_reduce, ("cblr", ws, gs, ages, [True, True], [False, False], probe, steps,
                                                 torch.tensor([1.0, 2.0], dtype=torch.float64), [True, True],
                                                 torch.tensor(2.0), 0.1, 1,
                                                 False, False, True, no_scratch))
    workspace = cpp.workspace("mclr", ws, False, {})
    mclr = ("mclr", ws, gs, ages, [True, True], [False, False], [], [], None, [False, False], torch.tensor(0.5), 0.1,
            1, False, False, True, workspace)
    torch.library.opcheck(ops.layerwise_reduce, mclr)
    # The update from a complete reduction: every layer measured, κ defined (no NaN statistic).
    reduction = ops.layerwise_reduce(*mclr)
    buffers = [torch.zeros_like(w) for w in ws]
    torch.library.opcheck(ops.layerwise_update_, (
        "mclr", ws, gs, buffers, [], [torch.tensor(2.0, dtype=F.SCALAR_DTYPE), torch.tensor(3.0, dtype=F.SCALAR_DTYPE)], ages, [], [False, False], [],
        [True, True], *reduction, torch.tensor(False), torch.tensor(0.5), torch.tensor(0.1), 0.9, False, 0.1, 1e-8, 1e-3, 0.0, None,
        1e-3, 1, False, False, workspace, None))


def test_jit_build_from_clean_sources(tmp_path):
    """csrc/ compiles from nothing into a fresh directory and the result steps like the
    reference (in a subprocess: a process registers the cblr_ext kernels only once; the
    setup.py build is hidden from it, so that importing the ops JIT-builds them into
    TORCH_EXTENSIONS_DIR)."""
    script = textwrap.dedent("""
        import sys
        import torch
        sys.modules["cblr_ext._C"] = None  # not importable: _build.load() JIT-builds
        from cblr_ext import _build, ops, LARS
        assert ops.LOAD_ERROR is None, ops.LOAD_ERROR
        assert _build.load() == "jit"
        ps = {b: torch.nn.Parameter(torch.arange(12.0).reshape(3, 4) / 7) for b in ("cpp", "reference")}
        for b, p in ps.items():
            opt = LARS([p], lr=0.1, momentum=0.9, backend=b)
            p.grad = torch.ones(3, 4)
            opt.step()
        assert torch.allclose(ps["cpp"], ps["reference"], rtol=1e-6), (ps["cpp"], ps["reference"])
    """)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"), TORCH_EXTENSIONS_DIR=str(tmp_path))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=900)
    assert any(f.suffix == ".so" for f in tmp_path.rglob("*"))


def test_channels_last_parameters():
    """Dense non-contiguous layouts run as flat memory (state tensors share the layout)."""
    weights = [torch.randn(8, 5, 3, 3).to(memory_format=torch.channels_last), torch.randn(40000, 3).t()]
    results = []
    for backend in ("reference", "cpp"):
        params = [torch.nn.Parameter(w.clone(memory_format=torch.preserve_format)) for w in weights]
        opt = MCLR(params, lr=0.1, momentum=0.9, weight_decay=1e-3, backend=backend)
        for t in range(3):
            for i, p in enumerate(params):
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(t + 10 * i))
                p.grad = torch.empty_like(p).copy_(p.detach() * 0.5 + noise)  # the parameter's strides
            opt.step()
        results.append(params)
    assert not results[1][0].is_contiguous()
    assert max_rel_diff(*results) <= 1e-5


def test_torch_compile_traces_the_ops():
    """fullgraph compile through a mutating op (shift, functionalised) and a reduction."""
    ops = cpp_ops()

    def shift_and_measure(ws, steps, saved):
        w_sq = ops.probe_shift_(ws, steps, saved, [torch.empty_like(s) for s in steps])
        ages = [torch.full((), math.inf) for _ in ws]
        probe = [ws[0] * 2, None]  # the second layer does not measure
        no_scratch = torch.empty(0, dtype=torch.uint8)  # as the backend passes (cpp.workspace)
        return ops.layerwise_reduce("cblr", ws, steps, ages, [True] * len(ws), [False] * len(ws), probe,
                                    [steps[0], None], w_sq, [True] * len(ws), None, 0.1, 1, False, False, True,
                                    no_scratch)

    gen = torch.Generator().manual_seed(4)
    steps = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    compiled_ws = [torch.randn(5, 3, generator=gen), torch.randn(4, generator=gen)]
    eager_ws = [w.clone() for w in compiled_ws]
    got = torch.compile(shift_and_measure, fullgraph=True)(compiled_ws, steps, [torch.empty_like(w) for w in steps])
    want = shift_and_measure(eager_ws, steps, [torch.empty_like(w) for w in steps])
    assert got[2][0, F.FLAG_MEASURED] and not got[2][1, F.FLAG_MEASURED]
    for a, b in zip(got, want):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(compiled_ws, eager_ws))


def test_huge_finite_gradients_are_not_non_finite():
    """Squares of |g| > 1.8e19 overflow fp32 partial sums; the flag must still be 0."""
    w, g = torch.ones(1000), torch.full((1000,), 3e30)
    hp = F.Hyperparams()
    red = F.layerwise_reduce("lars", [w], [g], [torch.tensor(math.inf)], [True], hp, backend="cpp")
    assert not red.nonfinite[0]
    g[500] = math.nan
    red = F.layerwise_reduce("lars", [w], [g], [torch.tensor(math.inf)], [True], hp, backend="cpp")
    assert red.nonfinite[0]


def test_lag_without_nonfinite_skipping_is_one_pass():
    """lag=1 with skip_nonfinite=False: pass 1 does not read a layer with a stash at all
    (a NaN there goes unseen, as the step is applied as computed), and training matches
    the reference, which reads everything."""
    w, g = torch.ones(1000), torch.ones(1000)
    g[7] = math.nan
    for check, flag in ((True, True), (False, False)):
        hp = F.Hyperparams(lag=True, check_nonfinite=check)
        red = F.layerwise_reduce("lars", [w], [g], [torch.tensor(1.0)], [True], hp, lagged_valid=[True],
                                 backend="cpp")
        assert bool(red.nonfinite[0]) == flag
    for rule in ("lars", "mclr"):
        ref, _ = train(RULES[rule], "reference", lr=0.1, momentum=0.9, lag=1, skip_nonfinite=False)
        got, _ = train(RULES[rule], "cpp", lr=0.1, momentum=0.9, lag=1, skip_nonfinite=False)
        assert max_rel_diff(ref, got) <= 1e-5


@pytest.mark.parametrize("lag", [0, 1])
def test_median_scratch_is_the_optimizers_workspace(lag):
    """The median passes use a workspace the optimizer owns (candidates, and all quotients
    under lag=1: 4 bytes per fp32 element each, every layer's slice 64-byte aligned),
    reused every step and freed with the optimizer; the steps match the reference's."""
    import gc
    import weakref
    ref, _ = train(MCLR, "reference", steps=4, lr=0.1, momentum=0.9, lag=lag)
    got, opt = train(MCLR, "cpp", steps=3, lr=0.1, momentum=0.9, lag=lag)
    workspace = opt._scratch["cpp.workspace"]
    assert workspace.dtype == torch.uint8 and workspace.numel() == (1 + lag) * sum(4 * p.numel() + 64 for p in got)
    train(MCLR, "cpp", steps=1, params=got, opt=opt, start=3)
    assert opt._scratch["cpp.workspace"] is workspace  # reused, not reallocated
    assert max_rel_diff(ref, got) <= 1e-5
    gone = weakref.ref(workspace)
    del opt, workspace
    gc.collect()
    assert gone() is None


def test_gradients_laid_out_like_their_parameters_up_to_size_one_dimensions():
    """Autograd gives a 1x1 conv weight fed channels_last input a gradient with other strides
    on its size-1 dimensions (same memory order): the cpp step accepts it and equals the
    reference's."""
    runs = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(8, 4, 1, bias=False)
        x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
        conv(x).square().sum().backward()
        assert conv.weight.grad.stride() != conv.weight.stride()
        LARS(conv.parameters(), lr=0.1, momentum=0.9, backend=backend).step()
        runs.append(conv.weight.detach().clone())
    assert max_rel_diff([runs[0]], [runs[1]]) <= 1e-6


def test_state_resumed_into_another_memory_layout():
    """Momentum buffers saved from a contiguous model, loaded into the same model converted
    to channels_last: the cpp step lays them out like their parameters (no group fails
    after another was updated) and matches the reference."""
    def model():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Conv2d(3, 4, 3))

    def set_grads(m):
        for i, p in enumerate(m.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(
                memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)

    source = model()
    set_grads(source)
    groups = lambda m: [{"params": list(m[0].parameters())}, {"params": list(m[1].parameters())}]
    opt = MCLR(groups(source), lr=0.1, momentum=0.9, backend="reference")
    opt.step()
    saved = opt.state_dict()
    runs = []
    for backend in ("reference", "cpp"):
        m = model().to(memory_format=torch.channels_last)
        m.load_state_dict(source.state_dict())
        resumed = MCLR(groups(m), lr=0.1, momentum=0.9, backend=backend)
        resumed.load_state_dict(saved)
        for group in resumed.param_groups:
            group["backend"] = backend  # the saved groups name the backend they ran under
        set_grads(m)
        resumed.step()
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(resumed.state[p]["momentum_buffer"].stride() == p.stride() for p in m.parameters())  # cpp
    assert max_rel_diff(runs[0], runs[1]) <= 1e-5
