"""Property-based steps (hypothesis): random shapes, dtypes, hyperparameters and gradient
contents, a few steps each.  Every step either succeeds with finite parameters or is
skipped with parameters and every state tensor bit-identical, and no step of finite gradients
is skipped; every hyperparameter is drawn; every fused backend follows the reference element
by element within the parity table's tolerance, also across each backend's chunk and thread
boundaries; LARS's reported ratio is the formula in fp64.

The example budget is CI's (250 per test, a fiftieth of it for the chunk-boundary sizes); CBLR_EXT_FUZZ_EXAMPLES changes it and CBLR_EXT_FUZZ_BACKENDS narrows the backends
(the long campaign: ``CBLR_EXT_FUZZ_EXAMPLES=50000 CBLR_EXT_FUZZ_BACKENDS=cpp``).  Gradient magnitudes span 1e-30 … 1e30 (and 0): the per-layer scalars are fp64 in every backend, so
the edges of the fp32 range are fuzzed too; the counterexamples found there are kept as
explicit tests in test_scalars_at_fp32_edges.py.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR

from optim_db import BACKEND_DTYPES, TOLERANCE

EXAMPLES = int(os.environ.get("CBLR_EXT_FUZZ_EXAMPLES", "250"))
# CBLR_EXT_FUZZ_BACKENDS (comma-separated) narrows the fused backends, e.g. "cpp" for a long
# campaign without the Triton interpreter's cost.
FUSED = [b for b in cblr_ext.available_backends("cpu") if b != "reference"
         and b in os.environ.get("CBLR_EXT_FUZZ_BACKENDS", b).split(",")]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
RULES = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)

shapes = st.lists(st.sampled_from([(), (0,), (1,), (1, 1), (7,), (3, 5), (2, 3, 4), (2, 3, 2, 2), (33, 17)]),
                  min_size=1, max_size=4)
magnitudes = st.sampled_from([0.0, 1e-30, 1e-15, 1e-6, 1e-3, 1.0, 1e3, 1e15, 1e30])
specials = st.sampled_from([None, None, None, "nan", "inf", "ties", "zeros"])


@st.composite
def configurations(draw):
    rule = draw(st.sampled_from(list(RULES)))
    hp = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0])),
              momentum=draw(st.sampled_from([0.0, 0.5, 0.9])),
              weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.1])),
              eps=draw(st.sampled_from([0.0, 1e-8])),
              nesterov=draw(st.booleans()),
              exclude_1d=draw(st.booleans()),
              curvature_interval=draw(st.sampled_from([1, 2])))
    if rule != "cblr":
        hp["lag"] = draw(st.sampled_from([0, 1]))
    if rule == "mclr":
        hp["median"] = draw(st.sampled_from(["exact", "approx"]))
    if hp["nesterov"] and hp["momentum"] == 0:
        hp["nesterov"] = False
    hp.update(every_other_hyperparameter(draw, rule))
    dtype = draw(st.sampled_from(DTYPES))
    if dtype in (torch.float16, torch.bfloat16):
        hp["master_weights"] = draw(st.booleans())
    return rule, hp, dtype, draw(shapes), draw(st.integers(0, 2**16))


def every_other_hyperparameter(draw, rule) -> dict:
    """The hyperparameters the configurations above leave at their defaults, drawn (None: the
    rule's default)."""
    hp = dict(trust_coefficient=draw(st.sampled_from([None, 1e-3, 0.02, 1.0])),
              curvature_ema=draw(st.sampled_from([None, 0.0, 0.5, 0.99])),
              max_ratio=draw(st.sampled_from([None, 1e-4, 10.0])),
              fallback_trust=draw(st.sampled_from([1e-3, 1.0])),
              adapt=draw(st.booleans()) or draw(st.booleans()),
              skip_nonfinite=draw(st.booleans()) or draw(st.booleans()),
              maximize=draw(st.booleans()))
    if rule == "lars":
        hp["reuse_weight_norm"] = draw(st.booleans())
    return {k: v for k, v in hp.items() if v is not None}


def gradients(shapes, dtype, seed, steps, magnitude_draws, special_draws):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        grads = []
        for i, shape in enumerate(shapes):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude_draws[(t + i) % len(magnitude_draws)]
            special = special_draws[(t + i) % len(special_draws)]
            if g.numel() and special == "nan":
                g.view(-1)[0] = math.nan
            elif g.numel() and special == "inf":
                g.view(-1)[-1] = -math.inf
            elif special == "ties":
                g = g.sign()
            elif special == "zeros":
                g = torch.zeros_like(g)
            grads.append(g.to(dtype))
        out.append(grads)
    return out


def run(rule, hp, dtype, shapes, seed, grads, backend):
    gen = torch.Generator().manual_seed(seed + 1)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen, dtype=torch.float64) + 0.1).to(dtype)) for s in shapes]
    opt = RULES[rule](params, backend=backend, **hp)
    history = []
    for step_grads in grads:
        before = ([p.detach().clone() for p in params], state_tensors(opt))

        def closure():
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
        closure()
        skipped = opt.skipped_steps
        opt.step(closure)
        history.append((before, opt.skipped_steps > skipped, [p.detach().clone() for p in params],
                        opt.layer_stats()))
    return history, state_tensors(opt)


def state_tensors(opt) -> dict:
    return {(i, k): v.detach().clone() for i, s in enumerate(opt.state.values()) for k, v in s.items()
            if torch.is_tensor(v)}


def same_values(a, b) -> bool:
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


def check_steps(history, finite_inputs, opt_state_after):
    """A skipped step leaves parameters and every state tensor bit-identical; a step of finite
    gradients (every magnitude drawn is inside the fp64 range) is never skipped, and leaves
    every parameter finite unless the update asked for leaves the parameter's type
    (max|w| + ‖s‖ beyond its largest value, docs/algorithm.md: that overflow is the update's)
    or the parameter had left it in an earlier step."""
    states = [before[1] for before, *_ in history[1:]] + [opt_state_after]
    for ((params_before, state_before), skipped, params_after, stats), state_after in zip(history, states):
        if skipped:
            assert not finite_inputs
            for a, b in zip(params_before, params_after):
                assert same_values(a, b)
            assert state_before.keys() <= state_after.keys()
            for key, t in state_before.items():
                assert same_values(t, state_after[key]), key
        elif finite_inputs:
            for w, p, row in zip(params_before, params_after, stats.values()):
                if not torch.isfinite(p).all() and torch.isfinite(w).all():
                    assert w.double().abs().max().item() + row["step_norm"] > torch.finfo(w.dtype).max


# Roundings of one step's element-wise math: the bound on a cancelled layer's residues, in
# units of the type's ε, before its condition number amplifies them.
STEP_ROUNDINGS = 16


def elementwise_close(a, b, peak, tolerance, conditioning=1.0) -> bool:
    """|a_i − b_i| ≤ (tol + k·ε·c)·(|a_i| + the largest |w_i| of the reference so far) for
    every element (a: the reference).  The peak, not the last value: an update that cancels
    w_i (r·γ·β = 1, found by the long campaign) leaves residues of earlier roundings that
    differ by backend.  c is the layer's worst cancellation so far (‖w‖ before a step over
    ‖w‖ after it): the next ratio is formed from those residues, and their ε-sized relative
    differences grow by c in it (the campaign's second finding; k = STEP_ROUNDINGS)."""
    amplified = STEP_ROUNDINGS * torch.finfo(a.dtype).eps * conditioning
    a, b, peak = a.double(), b.double(), peak.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return False
    bound = (tolerance + amplified) * (a.abs() + peak).nan_to_num(posinf=0.0) + 1e-300
    return bool(((a - b).nan_to_num().abs() <= bound).all())


def cancellation(before, after) -> float:
    """‖before‖/‖after‖ of one layer's step where it shrank the layer (1 otherwise)."""
    n0, n1 = before.double().norm().item(), after.double().norm().item()
    return n0 / n1 if math.isfinite(n0) and 0 < n1 < n0 else 1.0


@fuzz
@given(config=configurations(), magnitude_draws=st.lists(magnitudes, min_size=1, max_size=3),
       special_draws=st.lists(specials, min_size=1, max_size=3))
def test_steps_are_finite_or_skipped_and_every_backend_follows_the_reference(config, magnitude_draws, special_draws):
    rule, hp, dtype, shapes, seed = config
    grads = gradients(shapes, dtype, seed, 3, magnitude_draws, special_draws)
    finite_inputs = all(torch.isfinite(g).all() for step in grads for g in step)
    compare_backends(rule, hp, dtype, shapes, seed, grads, finite_inputs, FUSED)


def compare_backends(rule, hp, dtype, shapes, seed, grads, finite_inputs, backends):
    reference, reference_state = run(rule, hp, dtype, shapes, seed, grads, "reference")
    check_steps(reference, finite_inputs, reference_state)
    for backend in backends:
        if dtype not in BACKEND_DTYPES.get(backend, ()):
            continue
        other, other_state = run(rule, hp, dtype, shapes, seed, grads, backend)
        check_steps(other, finite_inputs, other_state)
        peaks = [w.double().abs().nan_to_num() for w in reference[0][0][0]]
        previous = list(reference[0][0][0])
        conditioning = [1.0] * len(peaks)
        for (_, skip_ref, params_ref, _), (_, skip, params, _) in zip(reference, other):
            assert skip == skip_ref
            for i, (a, b) in enumerate(zip(params_ref, params)):
                peaks[i] = torch.maximum(peaks[i], a.double().abs().nan_to_num())
                assert elementwise_close(a, b, peaks[i], TOLERANCE[dtype], conditioning[i]), backend
                conditioning[i] = max(conditioning[i], cancellation(previous[i], a))
            previous = list(params_ref)


# The fused backends' boundaries: the C++ chunks (65,536 elements; threads above one chunk)
# and direct median selection (16,384), Triton's chunks (4,096); sizes around each.
BOUNDARY_SIZES = {"cpp": [16384, 16385, 65535, 65536, 65537, 131073], "triton": [4095, 4096, 4097, 8193]}


@settings(max_examples=max(EXAMPLES // 50, 3), deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True, database=None)
@given(config=configurations(), data=st.data())
@pytest.mark.parametrize("backend", FUSED)
def test_every_backend_follows_the_reference_across_its_chunk_boundaries(backend, config, data):
    rule, hp, dtype, _, seed = config
    if dtype not in BACKEND_DTYPES.get(backend, ()):
        dtype = torch.float32
        hp.pop("master_weights", None)
    sizes = data.draw(st.lists(st.sampled_from(BOUNDARY_SIZES[backend]), min_size=1, max_size=2))
    magnitude_draws = data.draw(st.lists(magnitudes, min_size=1, max_size=2))
    shapes = [(n,) if i % 2 else (n, 1) for i, n in enumerate(sizes)]
    grads = gradients(shapes, dtype, seed, 2, magnitude_draws, [None])
    finite_inputs = all(torch.isfinite(g).all() for step in grads for g in step)  # 16-bit casts may overflow
    compare_backends(rule, hp, dtype, shapes, seed, grads, finite_inputs, [backend])


@fuzz
@given(config=configurations(), magnitude=magnitudes)
def test_the_lars_ratio_is_the_formula_in_fp64(config, magnitude):
    _, hp, dtype, shapes, seed = config
    hp = {k: v for k, v in hp.items() if k in ("lr", "weight_decay", "eps", "exclude_1d")}
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) + 0.5) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * magnitude).to(dtype)
    expected = []
    for p in params:
        w, g = p.detach().double(), p.grad.double()
        w_norm, g_norm = w.norm().item(), g.norm().item()
        defined = w_norm > 0 and g_norm > 0 and not (hp["exclude_1d"] and p.ndim <= 1)
        expected.append(1e-3 * w_norm / (g_norm + hp["weight_decay"] * w_norm + hp["eps"]) if defined else None)
    for backend in ["reference"] + [b for b in FUSED if dtype in BACKEND_DTYPES.get(b, ())]:
        layers = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for q, p in zip(layers, params):
            q.grad = p.grad.clone()
        opt = LARS(layers, backend=backend, **hp)
        opt.step()
        for row, r in zip(opt.layer_stats().values(), expected):
            if r is not None and math.isfinite(r) and r > 0:  # the statistics are fp64: any such r
                assert row["ratio"] == pytest.approx(r, rel=1e-3), backend


@pytest.mark.skipif("cpp" not in FUSED, reason="the cpp backend did not build")
def test_the_rule_ratio_is_one_division_in_every_backend():
    """Found by the fuzz suite: η/κ̄ as ``number / tensor`` is reciprocal·η in torch, one ulp
    off C++'s division (r = 10.0 against 10.000001 for κ̄ = fl32(1e-4))."""
    ratios = []
    for backend in ("reference", "cpp"):
        w = torch.nn.Parameter(torch.tensor(0.7613514102182267, dtype=torch.float64))
        opt = MCLR([w], lr=1e-3, weight_decay=1e-4, eps=0.0, exclude_1d=False, backend=backend)
        w.grad = torch.zeros((), dtype=torch.float64)
        opt.step()
        ratios.append(opt.layer_stats()["0.0"]["ratio"])
    assert ratios[0] == ratios[1]


@pytest.mark.skipif("cpp" not in FUSED, reason="the cpp backend did not build")
def test_a_cancelled_weight_is_compared_within_its_condition_number():
    """The long campaign's finding: LARS with lag=1 and γ·β·r ≈ 1 cancels a layer (‖w‖ 23.4 →
    3e-7), the next lagged ratio is formed from the residues, whose last bits differ by
    backend, and the steps after it differ beyond fp64's element-wise tolerance.  Bounded by
    the cancellation's condition number (``elementwise_close``), the backends agree."""
    hp = dict(lr=1.0, momentum=0.0, weight_decay=0.1, eps=1e-8, nesterov=False, exclude_1d=False,
              curvature_interval=1, lag=1, trust_coefficient=1.0, fallback_trust=1e-3, adapt=True,
              skip_nonfinite=False, maximize=False, reuse_weight_norm=False)
    shapes = [(), (33, 17)]
    grads = gradients(shapes, torch.float64, 186, 3, [1e-3, 0.0, 0.0], [None])
    reference, _ = run("lars", hp, torch.float64, shapes, 186, grads, "reference")
    assert cancellation(reference[0][0][0][1], reference[0][2][1]) > 1e7   # γ·β·r ≈ 1: w cancels
    compare_backends("lars", hp, torch.float64, shapes, 186, grads, True, ["cpp"])
