"""Per-layer scalars at the edges of the fp32 range (issue 20, items 1-2): the norms, κ and r
are fp64 from fp64 sums of squares in every backend, so finite input whose LARS ratio is
representable gets that ratio and a finite step, the same in every backend.  Expected values
are the formula evaluated in fp64 here."""
import math

import pytest
import torch

import cblr_ext
from cblr_ext import CBLR, LARS, MCLR

from optim_db import TOLERANCE

BACKENDS = cblr_ext.available_backends("cpu")
FUSED = [b for b in BACKENDS if b != "reference"]


def lars_step(w, g, backend, lr, eps=1e-8):
    """One LARS step (no momentum, no weight decay) of a single layer: (w after, stats)."""
    p = torch.nn.Parameter(w.clone())
    opt = LARS([p], lr=lr, momentum=0.0, weight_decay=0.0, eps=eps, exclude_1d=False, backend=backend)
    p.grad = g.clone()
    opt.step()
    return p.detach(), opt.layer_stats()["0.0"]


def fp64_lars(w, g, lr, eps=1e-8):
    """(r, w − fl32(r·γ)·g) with r = η‖w‖/(‖g‖ + ε), all in fp64."""
    w64, g64 = w.double(), g.double()
    r = 1e-3 * w64.norm().item() / (g64.norm().item() + eps)
    alpha = torch.tensor(r * lr, dtype=torch.float64).float().double()  # the kernels' fp32 α
    return r, w64 - alpha * g64


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exploding_finite_gradient_takes_the_fp64_ratio_not_the_full_step(backend):
    """The issue's case: ‖g‖ = 8e38 overflows fp32; the old fp32 norm made κ NaN, r = 1, and
    γ = 10 drove the weights to −inf.  r = 1e-41 in fp64, a step of ~1e-2."""
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) + 1.0
    g = torch.full((8, 8), 1e38)
    after, stats = lars_step(w, g, backend, lr=10.0)
    r, expected = fp64_lars(w, g, lr=10.0)
    assert 1e-42 < r < 1e-40
    assert stats["fallback"] == 0.0
    assert stats["ratio"] == pytest.approx(r, rel=1e-12)
    assert stats["g_norm"] == pytest.approx(8e38, rel=1e-6)
    assert torch.isfinite(after).all()
    # α = 1e-40 is subnormal in fp32 (~1.4e-5 relative precision): the step of ~1e-2 to 1e-6.
    assert torch.allclose(after.double(), expected, rtol=0, atol=1e-6)
    assert (w - after).abs().min() > 1e-3  # a step was taken


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,value,eps", [
    ((1, 1), 1e20, 1e-8),     # a one-element layer: its square overflows fp32
    ((65_539,), 1e17, 1e-8),  # every square fits fp32, their sum does not
    ((3, 5), 1e-30, 0.0),     # squares below fp32's subnormals: ‖g‖ is 1e-30·√15, not 0
])
def test_every_backend_takes_the_fp64_lars_step(backend, shape, value, eps):
    w, g = torch.full(shape, 0.5), torch.full(shape, value)
    after, stats = lars_step(w, g, backend, lr=1.0, eps=eps)
    r, expected = fp64_lars(w, g, lr=1.0, eps=eps)
    assert stats["ratio"] == pytest.approx(r, rel=1e-9)
    assert torch.allclose(after.double(), expected, rtol=1e-6, atol=0)
    assert after.flatten()[0].item() == pytest.approx(0.4995, rel=1e-6)  # η·‖w‖ per unit of ĝ


def _two_steps(rule, shape, grad, backend, **hp):
    w = torch.nn.Parameter(torch.full(shape, 0.5))
    opt = {"lars": LARS, "mclr": MCLR, "cblr": CBLR}[rule]([w], lr=10.0, backend=backend, exclude_1d=False, **hp)

    def closure():
        w.grad = torch.full(shape, grad)
    for _ in range(2):
        closure()
        opt.step(closure)
    return w.detach().clone()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("rule,shape,grad", [
    ("cblr", (), 1e-30),       # found by the fuzz suite: the squares underflowed to 0 in fp32
    ("lars", (1, 1), 1e20),    # the issue's: the square overflowed fp32
    ("mclr", (4, 4), 1e38),
    ("cblr", (8, 8), 1e30),    # ‖g‖² beyond fp32 in the first step's fallback
])
def test_fused_backends_follow_the_reference_at_the_edges_of_fp32(rule, shape, grad, backend):
    reference = _two_steps(rule, shape, grad, "reference", momentum=0.0, weight_decay=1e-4)
    fused = _two_steps(rule, shape, grad, backend, momentum=0.0, weight_decay=1e-4)
    assert torch.isfinite(reference).all() and not math.isclose(reference.flatten()[0].item(), 0.5)
    torch.testing.assert_close(fused, reference, rtol=TOLERANCE[torch.float32], atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_r_is_one_only_where_the_spec_says(backend):
    """‖w‖ = 0 or ‖g‖ = 0 leave the LARS ratio undefined (r = 1, the fallback flag set);
    a huge or tiny but nonzero ‖g‖ does not."""
    cases = {"w = 0": (torch.zeros(4, 4), torch.ones(4, 4)), "g = 0": (torch.ones(4, 4), torch.zeros(4, 4)),
             "g = 1e-40": (torch.ones(4, 4), torch.full((4, 4), 1e-40)),
             "g = 3e38": (torch.ones(4, 4), torch.full((4, 4), 3e38))}
    for name, (w, g) in cases.items():
        _, stats = lars_step(w, g, backend, lr=1.0, eps=0.0)
        undefined = name in ("w = 0", "g = 0")
        assert (stats["ratio"] == 1.0) == undefined, name
        if not undefined:
            assert stats["ratio"] == pytest.approx(fp64_lars(w, g, 1.0, eps=0.0)[0], rel=1e-9), name
