"""fp64 parameters at the edges of their range (docs/algorithm.md, "The fp64 range"): a
layer whose sums of squares would overflow, or whose Σw² would be subnormal, counts as
non-finite and the step is skipped with nothing written; inside the range the ratio is
the formula's, computed here from norms scaled by hand."""
import math

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LAMB, LARS, MCLR

BACKENDS = [b for b in cblr_ext.available_backends("cpu") if b in ("reference", "cpp")]
RULES = [LARS, MCLR, CBLR]


def scaled_norm(x: torch.Tensor) -> float:
    """‖x‖ without squaring x: max·‖x / max‖ (exact scaling by the peak)."""
    peak = x.abs().max().item()
    return 0.0 if peak == 0 else peak * math.sqrt(((x / peak) ** 2).sum().item())


def step(cls, backend, w0, g0, steps=1, **kw):
    w = torch.nn.Parameter(torch.full((4, 4), w0, dtype=torch.float64))
    opt = cls([w], lr=1.0, backend=backend, **kw)
    for _ in range(steps):
        w.grad = torch.full((4, 4), g0, dtype=torch.float64)
        opt.step()
    return w, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", RULES)
@pytest.mark.parametrize("w0, g0", [(1.0, 1e200), (1.0, 2.0 ** 508), (1e-163, 1.0), (2.0 ** -512, 1.0), (1e200, 1.0)],
                         ids=["g1e200", "g_at_limit", "w1e-163", "w_below_range", "w1e200"])
def test_a_layer_outside_the_range_skips_the_step(cls, backend, w0, g0):
    w, opt = step(cls, backend, w0, g0, steps=2)
    assert torch.equal(w.detach(), torch.full((4, 4), w0, dtype=torch.float64))
    assert opt.skipped_steps == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w0, g0", [(1.0, 2.0 ** 507), (2.0 ** -510, 1.0), (1e-150, 1e-150), (1e150, 1e150)])
def test_inside_the_range_the_ratio_is_the_formula(backend, w0, g0):
    """Just inside the bounds (16·(2^507)² = 2^1018 < 2^1020; 2^-510 ≥ 2^-511)."""
    w, opt = step(LARS, backend, w0, g0, weight_decay=0.0, eps=0.0)
    assert opt.skipped_steps == 0
    w_ref, g_ref = torch.full((4, 4), w0, dtype=torch.float64), torch.full((4, 4), g0, dtype=torch.float64)
    r = 1e-3 * scaled_norm(w_ref) / scaled_norm(g_ref)
    row = opt.layer_stats()["0.0"]
    assert row["fallback"] is False
    assert row["ratio"] == pytest.approx(r, rel=1e-12)
    assert torch.allclose(w.detach(), w_ref - r * g_ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_are_in_range(backend):
    w, opt = step(LARS, backend, 0.0, 1.0)
    assert opt.skipped_steps == 0 and torch.equal(w.detach(), torch.full((4, 4), -1.0, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_fp64_layers_are_checked_and_the_whole_step_skips(backend):
    """An fp32 layer with gradients at fp32's edge steps; an fp64 layer out of range beside
    another layer skips the whole step (no layer half-updated)."""
    big32 = torch.nn.Parameter(torch.ones(3, 3))
    opt = LARS([big32], lr=1.0, backend=backend)
    big32.grad = torch.full((3, 3), 3e38)
    opt.step()
    assert opt.skipped_steps == 0 and torch.isfinite(big32).all() and not torch.equal(big32.detach(), torch.ones(3, 3))
    a = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([a, b], lr=1.0, backend=backend)
    a.grad, b.grad = torch.ones(3, dtype=torch.float64), torch.full((2, 2), 1e300, dtype=torch.float64)
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(a.detach(), torch.ones(3, dtype=torch.float64))


def test_lamb_skips_an_fp64_layer_outside_the_range():
    w, opt = step(LAMB, "reference", 1.0, 1e200)
    assert opt.skipped_steps == 1 and torch.equal(w.detach(), torch.ones(4, 4, dtype=torch.float64))
    assert not any(torch.is_tensor(v) and v.abs().sum() > 0 for s in opt.state.values() for k, v in s.items()
                   if k in ("exp_avg", "exp_avg_sq"))


def test_skip_nonfinite_false_still_steps():
    """The check feeds the non-finite flag: with skip_nonfinite=False the step is taken (the fallback)."""
    w, opt = step(LARS, "reference", 1.0, 1e200, skip_nonfinite=False)
    assert opt.skipped_steps == 0 and not torch.equal(w.detach(), torch.ones(4, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_fp64_layer_is_in_range(backend):
    """Found by the fuzz suite: the max of an empty layer has no identity."""
    w = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
    opt = LARS([w], lr=1.0, backend=backend)
    w.grad = torch.zeros(0, dtype=torch.float64)
    opt.step()
    assert opt.skipped_steps == 0
