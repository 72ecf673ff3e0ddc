"""Issue 20 item 10: MCLR's ratio r = η / (m + ε) is bounded by default, so a layer whose
median quotient m is tiny cannot take an enormous step (finite input → finite parameters)."""
import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR

BACKENDS = cblr_ext.available_backends("cpu")


def _tiny_median_layer():
    """An 11×11 weight of ones whose gradient is 1e-30 on 61 elements (the lower median is
    1e-30) and 1e12 on the other 60: finite, ordinary in fp32."""
    w = torch.nn.Parameter(torch.ones(11, 11))
    g = torch.full((121,), 1e-30)
    g[:60] = 1e12
    w.grad = g.reshape(11, 11)
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_median_leaves_finite_parameters(backend):
    w = _tiny_median_layer()
    opt = MCLR([w], lr=1.0, eps=0.0, backend=backend)
    opt.step()
    assert torch.isfinite(w).all()
    stats = opt.layer_stats()["0.0"]
    assert stats["ratio"] == 0.25       # η/m = 1e-3/1e-30 = 1e27, bounded to the default 0.25
    # the ordinary elements moved by lr · r · g = 0.25 · 1e12, the tiny ones by 1e-30 (lost in 1)
    expected = torch.ones(121)
    expected[:60] = 1.0 - 0.25 * torch.tensor(1e12)
    assert torch.equal(w.detach().reshape(-1), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbounded_ratio_stays_reachable(backend):
    w = _tiny_median_layer()
    opt = MCLR([w], lr=1.0, eps=0.0, max_ratio=None, backend=backend)
    opt.step()
    assert opt.layer_stats()["0.0"]["ratio"] == pytest.approx(1e-3 / 1e-30, rel=1e-6)
    assert torch.isinf(w).any()         # 1e27 · 1e12 overflows fp32: what the bound prevents


def test_default_bounds_per_rule():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    assert MCLR(p).defaults["max_ratio"] == 0.25
    assert LARS(p).defaults["max_ratio"] is None and CBLR(p).defaults["max_ratio"] == 1.0
    assert MCLR(p, max_ratio=5.0).defaults["max_ratio"] == 5.0
    assert repr(MCLR.__init__.__defaults__).count("RULE_DEFAULT") >= 1
