"""Hand-computed two-step examples of every rule, fallback and momentum form.

The expected numbers are written out with plain Python floats from the
formulas of docs/algorithm.md, independently of ``cblr_ext.layer_math``.
"""
import math

import pytest
import torch

from cblr_ext import CBLR, LARS, MCLR


def norm(xs):
    return math.sqrt(sum(x * x for x in xs))


def layer(values, dtype=torch.float32):
    """A 2-D (hence adapted) parameter holding ``values``."""
    return torch.nn.Parameter(torch.tensor([values], dtype=dtype))


def set_grad(p, values):
    p.grad = torch.tensor([values], dtype=p.dtype)


def assert_close(t, expected, rtol=1e-6, atol=1e-7):
    torch.testing.assert_close(t.detach().reshape(-1).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps(nesterov):
    w, g1, g2 = [3.0, 4.0], [0.6, 0.8], [0.0, 1.0]
    beta, eta, lr, mu = 0.1, 0.01, 2.0, 0.9
    p = layer(w)
    opt = LARS([p], lr=lr, momentum=mu, weight_decay=beta, trust_coefficient=eta, eps=0.0,
               nesterov=nesterov, backend="reference")

    # step 1: ‖w‖ = 5, ‖g‖ = 1, κ = (1 + 0.5)/5, r = η/κ
    r1 = eta / ((1.0 + beta * 5.0) / 5.0)
    d1 = [gi + beta * wi for gi, wi in zip(g1, w)]
    v1 = [lr * r1 * di for di in d1]
    s1 = [mu * vi + lr * r1 * di for vi, di in zip(v1, d1)] if nesterov else v1
    w1 = [wi - si for wi, si in zip(w, s1)]
    set_grad(p, g1)
    opt.step()
    assert_close(p, w1)
    stats = opt.layer_stats()["0.0"]
    assert stats["ratio"] == pytest.approx(r1, rel=1e-6)
    assert stats["kappa"] == pytest.approx(0.3, rel=1e-6)
    assert not stats["fallback"]

    # step 2
    wn = norm(w1)
    r2 = eta / ((norm(g2) + beta * wn) / wn)
    d2 = [gi + beta * wi for gi, wi in zip(g2, w1)]
    v2 = [mu * vi + lr * r2 * di for vi, di in zip(v1, d2)]
    s2 = [mu * vi + lr * r2 * di for vi, di in zip(v2, d2)] if nesterov else v2
    set_grad(p, g2)
    opt.step()
    assert_close(p, [wi - si for wi, si in zip(w1, s2)])
    assert_close(opt.state[p]["momentum_buffer"], v2)


def test_mclr_two_steps_median_of_quotients():
    # w_i = 0 is left out; quotients of step 1: |d|/|w| = 0.5, 0.5, 0.25, 0 -> lower median 0.25
    w = [1.0, -2.0, 4.0, 0.5, 0.0]
    g1 = [0.5, 1.0, -1.0, 0.0, 7.0]
    eta, lr, eps = 0.02, 3.0, 1e-3
    p = layer(w)
    opt = MCLR([p], lr=lr, trust_coefficient=eta, eps=eps, backend="reference")
    set_grad(p, g1)
    opt.step()
    r1 = eta / (0.25 + eps)
    w1 = [wi - lr * r1 * gi for wi, gi in zip(w, g1)]
    assert_close(p, w1)
    assert opt.layer_stats()["0.0"]["kappa"] == pytest.approx(0.25 + eps, rel=1e-6)

    g2 = [3.0, 1.0, 1.0, 1.0, 1.0]
    q = sorted(abs(gi) / abs(wi) for gi, wi in zip(g2, w1) if wi != 0)
    m = q[(len(q) + 1) // 2 - 1]
    r2 = eta / (0.5 * (0.25 + eps) + 0.5 * (m + eps))    # κ̄ with MCLR's default ρ = 0.5
    set_grad(p, g2)
    opt.step()
    assert_close(p, [wi - lr * r2 * gi for wi, gi in zip(w1, g2)], rtol=1e-5)


def test_mclr_fallback_when_median_is_zero():
    w, g = [1.0, 2.0, 3.0], [0.0, 0.0, 1.0]  # quotients 0, 0, 1/3: median 0
    beta, eps, eta_f, lr = 0.5, 1e-6, 0.01, 1.0
    p = layer(w)
    opt = MCLR([p], lr=lr, weight_decay=beta, eps=eps, fallback_trust=eta_f, backend="reference")
    set_grad(p, g)
    # with β = 0.5 the decayed quotients are 0.5, 0.5, 0.5+1/3: the median is not 0
    opt.step()
    assert not opt.layer_stats()["0.0"]["fallback"]

    p = layer(w)
    opt = MCLR([p], lr=lr, eps=eps, fallback_trust=eta_f, backend="reference")
    set_grad(p, g)
    opt.step()
    r = eta_f * norm(w) / (norm(g) + eps)
    assert_close(p, [wi - lr * r * gi for wi, gi in zip(w, g)])
    stats = opt.layer_stats()["0.0"]
    assert stats["fallback"] and math.isnan(stats["kappa"])
    assert stats["ratio"] == pytest.approx(r, rel=1e-6)


def test_fallback_undefined_gives_ratio_one():
    # n = 0 (all w zero): MCLR falls back, and the LARS fallback is undefined (‖w‖ = 0): r = 1
    p = layer([0.0, 0.0])
    opt = MCLR([p], lr=0.5, max_ratio=None, backend="reference")
    set_grad(p, [1.0, -2.0])
    opt.step()
    assert_close(p, [-0.5, 1.0])
    assert opt.layer_stats()["0.0"]["ratio"] == 1.0
    # r_max bounds the fallback too: MCLR's default 0.25 gives a quarter of that step
    p = layer([0.0, 0.0])
    opt = MCLR([p], lr=0.5, backend="reference")
    set_grad(p, [1.0, -2.0])
    opt.step()
    assert_close(p, [-0.125, 0.25])
    assert opt.layer_stats()["0.0"]["ratio"] == 0.25

    # LARS with g = 0 and β = ε = 0: κ = 0 is not positive, fallback undefined (‖g‖ = 0): r = 1
    q = layer([1.0, 1.0])
    opt = LARS([q], lr=0.5, eps=0.0, momentum=0.5, backend="reference")
    set_grad(q, [0.0, 0.0])
    opt.step()
    stats = opt.layer_stats()["0.0"]
    assert stats["fallback"] and stats["ratio"] == 1.0 and stats["step_norm"] == 0.0


def test_max_ratio_and_exclude_1d():
    w, g = [3.0, 4.0], [0.003, 0.004]
    p, b = layer(w), torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = LARS([p, b], lr=1.0, trust_coefficient=1.0, eps=0.0, max_ratio=10.0, exclude_1d=True,
               backend="reference")
    set_grad(p, g)
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    # unclipped r = ‖w‖/‖g‖ = 1000 -> 10; the 1-D bias is not adapted (r = 1)
    assert_close(p, [wi - 10.0 * gi for wi, gi in zip(w, g)])
    assert_close(b, [0.5, 1.5])
    stats = opt.layer_stats()
    assert stats["0.0"]["ratio"] == 10.0 and stats["0.1"]["ratio"] == 1.0
    assert math.isnan(stats["0.1"]["kappa"]) and not stats["0.1"]["fallback"]


def test_curvature_ema_and_interval():
    """LARS with ρ = 0.5 and k = 2: κ̄ averages the measurements of steps 1 and 3; step 2 reuses κ̄."""
    p = layer([3.0, 4.0])
    opt = LARS([p], lr=1.0, trust_coefficient=0.1, eps=0.0, curvature_ema=0.5, curvature_interval=2,
               backend="reference")
    ws, kappas = [[3.0, 4.0]], []
    for g in ([0.6, 0.8], [1.2, 1.6], [0.0, 2.0]):
        w = ws[-1]
        kappas.append(norm(g) / norm(w))
        set_grad(p, g)
        opt.step()
        ws.append(p.detach().reshape(-1).tolist())
    expected_bar = [kappas[0], kappas[0], 0.5 * kappas[0] + 0.5 * kappas[2]]
    for w_before, w_after, g, bar in zip(ws, ws[1:], ([0.6, 0.8], [1.2, 1.6], [0.0, 2.0]), expected_bar):
        r = 0.1 / bar
        assert w_after == pytest.approx([wi - r * gi for wi, gi in zip(w_before, g)], rel=1e-6)
    assert float(opt.state[p]["kappa"]) == pytest.approx(expected_bar[-1], rel=1e-6)


def quadratic_closure(p, a, opt, calls):
    """Loss ½ Σ a_i w_i²: gradient a ⊙ w, Hessian diag(a)."""
    a = torch.tensor([a], dtype=p.dtype)

    def closure():
        calls.append(p.detach().clone())
        opt.zero_grad()
        loss = 0.5 * (a * p * p).sum()
        loss.backward()
        return loss
    return closure


def test_cblr_three_steps_secant_of_a_quadratic():
    # fp64: the secant subtracts two close gradients, which costs fp32 about 4 digits here
    a, w0 = [1.0, 4.0], [1.0, 1.0]
    beta, eta, lr, rho, eta_f, eps = 0.1, 1.0, 0.5, 0.5, 0.01, 0.0
    p = layer(w0, torch.float64)
    opt = CBLR([p], lr=lr, weight_decay=beta, eps=eps, fallback_trust=eta_f, curvature_ema=rho, backend="reference")
    calls = []
    closure = quadratic_closure(p, a, opt, calls)
    assert opt.param_groups[0]["trust_coefficient"] == eta   # CBLR's default η

    # step 0: no previous step -> LARS fallback
    g0 = [ai * wi for ai, wi in zip(a, w0)]
    d0 = [gi + beta * wi for gi, wi in zip(g0, w0)]
    r0 = eta_f * norm(w0) / (norm(g0) + beta * norm(w0))
    s0 = [lr * r0 * di for di in d0]
    w1 = [wi - si for wi, si in zip(w0, s0)]
    opt.step(closure)
    assert len(calls) == 1
    assert_close(p, w1)
    assert opt.layer_stats()["0.0"]["fallback"]

    # step 1: secant along s0 of d = (a + β) ⊙ w: κ = ‖(a + β) ⊙ s0‖ / ‖s0‖
    k1 = norm([(ai + beta) * si for ai, si in zip(a, s0)]) / norm(s0)
    g1 = [ai * wi for ai, wi in zip(a, w1)]
    d1 = [gi + beta * wi for gi, wi in zip(g1, w1)]
    s1 = [lr * (eta / k1) * di for di in d1]
    w2 = [wi - si for wi, si in zip(w1, s1)]
    opt.step(closure)
    assert len(calls) == 3
    assert_close(calls[2], [wi + si for wi, si in zip(w1, s0)])  # the probe point w1 + s0
    assert_close(p, w2, rtol=1e-5)
    assert opt.layer_stats()["0.0"]["kappa"] == pytest.approx(k1, rel=1e-5)

    # step 2: EMA of the two measurements
    k2 = norm([(ai + beta) * si for ai, si in zip(a, s1)]) / norm(s1)
    bar = rho * k1 + (1 - rho) * k2
    g2 = [ai * wi for ai, wi in zip(a, w2)]
    d2 = [gi + beta * wi for gi, wi in zip(g2, w2)]
    opt.step(closure)
    assert len(calls) == 5
    assert_close(p, [wi - lr * (eta / bar) * di for wi, di in zip(w2, d2)], rtol=1e-5)
    assert float(opt.state[p]["kappa"]) == pytest.approx(bar, rel=1e-5)


def test_cblr_nesterov_keeps_its_own_step():
    """With Nesterov, s_{t−1} = μ·v + α·d is not the buffer: the probe must use s itself."""
    a, w0, mu, lr = [2.0, 3.0], [1.0, -1.0], 0.9, 0.2
    p = layer(w0, torch.float64)
    opt = CBLR([p], lr=lr, momentum=mu, nesterov=True, eps=0.0, backend="reference")
    calls = []
    closure = quadratic_closure(p, a, opt, calls)
    opt.step(closure)
    w1 = p.detach().clone()
    s0 = torch.tensor([w0], dtype=torch.float64) - w1
    torch.testing.assert_close(opt.state[p]["prev_step"], s0)
    opt.step(closure)
    torch.testing.assert_close(calls[2], w1 + s0)
    # secant of d = a ⊙ w along s0 (β = 0)
    expected = torch.linalg.vector_norm(torch.tensor([a], dtype=torch.float64) * s0) / torch.linalg.vector_norm(s0)
    assert opt.layer_stats()["0.0"]["kappa"] == pytest.approx(float(expected), rel=1e-5)


def test_cblr_fallbacks_zero_secant_and_zero_step():
    """A loss linear in w has a constant gradient: ‖d(w) − d(w+s)‖ = 0, no curvature seen.
    With γ = 0 the step is 0: ‖s‖ = 0.  Both fall back to the LARS ratio."""
    c = torch.tensor([[0.5, -1.5]], dtype=torch.float64)
    for lr in (0.3, 0.0):
        p = layer([2.0, 1.0], torch.float64)
        opt = CBLR([p], lr=lr, eps=0.0, fallback_trust=0.02, backend="reference")
        calls = 0

        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = (c * p).sum()
            loss.backward()
            return loss
        for _ in range(3):
            w = p.detach().reshape(-1).tolist()
            opt.step(closure)
            stats = opt.layer_stats()["0.0"]
            r = 0.02 * norm(w) / norm([0.5, 1.5])
            assert stats["fallback"] and stats["ratio"] == pytest.approx(r, rel=1e-6)  # fp32 scalars
        assert calls == 5  # steps 1 and 2 probed, and found no curvature
        assert torch.isnan(opt.state[p]["kappa"])


def test_lars_zero_weights_fall_back_to_ratio_one():
    p = layer([0.0, 0.0])
    opt = LARS([p], lr=0.1, weight_decay=0.1, backend="reference")
    set_grad(p, [1.0, 2.0])
    opt.step()  # κ = (‖g‖ + 0 + ε)/0 is not finite; the fallback η_F·0/‖g‖ is 0: r = 1
    assert_close(p, [-0.1, -0.2])
    stats = opt.layer_stats()["0.0"]
    assert stats["fallback"] and stats["ratio"] == 1.0
