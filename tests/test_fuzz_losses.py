"""CBLR's secant under fuzzing, on gradients of a real loss of the weights: a random
quadratic ½(x − c)ᵀA(x − c) over all layers' weights x (A symmetric positive definite,
coupling the layers), evaluated by the closure at w_t and at the probe point w_t + s.
Then d(w) − d(w + Δ) = −(A + βI)Δ exactly, so every measured κ is checked against an fp64
evaluation of (‖((A + βI)Δ)_layer‖ + ε) / ‖Δ_layer‖, within the rounding of the
gradients the closure produced; every backend follows the reference element-wise.
Example budget: CBLR_EXT_FUZZ_EXAMPLES (as test_fuzz.py)."""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cblr_ext
from cblr_ext import CBLR

from optim_db import BACKEND_DTYPES, TOLERANCE

EXAMPLES = max(int(os.environ.get("CBLR_EXT_FUZZ_EXAMPLES", "250")) // 10, 10)
BACKENDS = cblr_ext.available_backends("cpu")
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)


class Quadratic:
    def __init__(self, sizes, spread, seed):
        gen = torch.Generator().manual_seed(seed)
        n = sum(sizes)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        eig = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 2 * spread - spread)
        self.a = (q * eig) @ q.T
        self.a = (self.a + self.a.T) / 2
        self.c = torch.randn(n, generator=gen, dtype=torch.float64)
        self.sizes = sizes

    def flat(self, tensors):
        return torch.cat([t.detach().double().reshape(-1) for t in tensors])

    def split(self, x):
        return list(torch.split(x, self.sizes))

    def write_grads(self, params):
        grad = self.a @ (self.flat(params) - self.c)
        for p, g in zip(params, self.split(grad)):
            p.grad = g.reshape(p.shape).to(p.dtype)


@st.composite
def problems(draw):
    sizes = draw(st.lists(st.integers(1, 24), min_size=1, max_size=3))
    hp = dict(lr=draw(st.sampled_from([1e-3, 0.05, 0.5])),
              momentum=draw(st.sampled_from([0.0, 0.9])),
              weight_decay=draw(st.sampled_from([0.0, 1e-2])),
              eps=draw(st.sampled_from([0.0, 1e-8])),
              curvature_ema=0.0,  # κ̄ = this step's κ: the statistics report the measurement
              curvature_interval=draw(st.sampled_from([1, 2])),
              exclude_1d=False)
    hp["nesterov"] = hp["momentum"] > 0 and draw(st.booleans())
    return sizes, hp, draw(st.sampled_from([torch.float32, torch.float64])), draw(st.integers(0, 3)), \
        draw(st.integers(0, 2**16))


def run(sizes, hp, dtype, spread, seed, backend, steps=4):
    """Steps of CBLR on the quadratic; per step the parameters after it and, per measured
    layer, (κ reported, κ of the fp64 evaluation, tolerance)."""
    loss = Quadratic(sizes, spread, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)) for n in sizes]
    opt = CBLR(params, backend=backend, **hp)
    history = []
    for _ in range(steps):
        w_t = [p.detach().clone() for p in params]
        steps_before = [opt.state[p].get("prev_step", opt.state[p].get("momentum_buffer")) if opt.state.get(p) else None
                        for p in params]
        steps_before = [None if s is None else s.detach().clone() for s in steps_before]
        grads_seen = []

        def closure():
            loss.write_grads(params)
            grads_seen.append(loss.flat([p.grad for p in params]))
            return None
        opt.step(closure)
        checks = []
        if all(s is not None for s in steps_before) and len(grads_seen) == 2:
            delta = [((w + s.to(w.dtype)) - w).double() for w, s in zip(w_t, steps_before)]
            shifted = loss.a @ loss.flat(delta) + hp["weight_decay"] * loss.flat(delta)
            # g's rounding: the cast to fp32, or (fp64) the matrix product's n-term sums
            unit, terms = (2.0 ** -24, 1) if dtype == torch.float32 else (2.0 ** -53, sum(sizes))
            g_size = [grads_seen[0][o:o + n].norm().item() + grads_seen[1][o:o + n].norm().item()
                      for o, n in zip([sum(sizes[:i]) for i in range(len(sizes))], sizes)]
            for (name, row), d, part, gs in zip(opt.layer_stats().items(), delta, loss.split(shifted), g_size):
                step_norm, diff = d.norm().item(), part.norm().item()
                if step_norm == 0 or diff == 0 or math.isnan(row["kappa"]):
                    continue
                expected = (diff + hp["eps"]) / step_norm
                tolerance = 1e-9 + 4 * unit * (gs * terms + diff) / diff
                checks.append((row["kappa"], expected, tolerance))
        history.append(([p.detach().clone() for p in params], checks, w_t))
    return history


@fuzz
@given(problem=problems())
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_secant_is_the_fp64_curvature_of_a_real_loss(backend, problem):
    sizes, hp, dtype, spread, seed = problem
    if dtype not in BACKEND_DTYPES.get(backend, (torch.float32, torch.float64)):
        dtype = torch.float32
    history = run(sizes, hp, dtype, spread, seed, backend)
    for _, checks, _ in history:
        for kappa, expected, tolerance in checks:
            assert kappa == pytest.approx(expected, rel=tolerance), (backend, kappa, expected)
    if backend != "reference":
        reference = run(sizes, hp, dtype, spread, seed, "reference")
        for (params, _, before), (params_ref, _, _) in zip(history, reference):
            for a, b, w in zip(params_ref, params, before):
                bound = TOLERANCE[dtype] * (a.double().abs() + w.double().abs()) + 1e-300
                assert ((a.double() - b.double()).abs() <= bound).all(), backend


def test_the_quadratic_measures_a_curvature():
    """The property above is not vacuous: a plain run measures κ on most steps."""
    history = run([5, 7], dict(lr=0.05, momentum=0.0, weight_decay=0.0, eps=0.0, curvature_ema=0.0,
                               curvature_interval=1, exclude_1d=False, nesterov=False), torch.float64, 1, 3, "reference")
    checks = [c for _, cs, _ in history for c in cs]
    assert len(checks) >= 4
    for kappa, expected, tolerance in checks:
        assert kappa == pytest.approx(expected, rel=1e-9)
