"""The radix select of cblr_ext.distributed against torch.median of the whole layer, bit for
bit, on data chosen to break it (ties, zeros, infinities, subnormals, empty shards), with
the ranks simulated in this process: their histograms summed as the all_reduce sums them.
Each case runs with the reference and the C++ kernel of the histogram op."""
from types import SimpleNamespace

import pytest
import torch

from cblr_ext import backends
from cblr_ext import functional as F
from cblr_ext import layer_math as lm
from cblr_ext.distributed import _MedianSelect


def _reduction():
    flags = torch.zeros((1, F.FLAG_COLUMNS), dtype=torch.bool)
    flags[0, F.FLAG_MEASURED] = True
    return F.Reduction(torch.zeros((1, F.SUM_COLUMNS), dtype=torch.float64), torch.zeros(1), flags)


BACKENDS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    backends.why_unavailable("cpp", "cpu") is not None, reason="the C++ extension is not built"))]


def _group(w, g, own, approx, weight_decay, backend):
    return SimpleNamespace(sharding=SimpleNamespace(owns=[own]), local_params=[w], local_grads=[g],
                           hp=SimpleNamespace(approx_median=approx, weight_decay=weight_decay),
                           backend=backends.get(backend, "cpu"))


def sharded_median(w, g, ranks, weight_decay, approx, owns=None, backend="reference", grad_scale=None):
    """The median the ranks agree on, ``w``/``g`` split into ``ranks`` uneven shards."""
    bounds = sorted(torch.randint(0, w.numel() + 1, (ranks - 1,), generator=torch.Generator().manual_seed(3)).tolist())
    pieces = list(zip(torch.tensor_split(w.flatten(), bounds), torch.tensor_split(g.flatten(), bounds)))
    owns = owns or [True] * ranks
    selects = [_MedianSelect(_group(wp, gp, own, approx, weight_decay, backend), _reduction(), grad_scale)
               for (wp, gp), own in zip(pieces, owns)]
    nans = sum(s.nan_counts for s in selects)
    for s in selects:
        s.nan_counts = nans
    for r in range(len(selects[0].schedule)):
        merged = sum(s.histogram(r) for s in selects)
        for s in selects:
            s.choose(r, merged)
    medians = []
    for s in selects:
        reduction = _reduction()
        s.write(reduction)
        medians.append(reduction.median[0])
    assert all(torch.equal(m.view(torch.int32), medians[0].view(torch.int32)) for m in medians)  # every rank
    return medians[0]


def whole_layer_median(w, g, weight_decay, approx):
    q = lm.curvature_quotients(lm.decayed_grad(g, w, weight_decay), w)
    return lm.lower_median(q, approx=approx)


def _cases():
    gen = torch.Generator().manual_seed(0)
    n = 1001
    yield "smooth", torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    yield "even", torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    ties = torch.randint(1, 4, (n,), generator=gen).float()
    yield "ties", torch.ones(n), ties
    w = torch.randn(n, generator=gen)
    w[::3] = 0  # excluded quotients
    yield "zeros in w", w, torch.randn(n, generator=gen)
    w = torch.randn(n, generator=gen)
    w[: n // 2 + 3] = 1e-40  # subnormal weights: quotients overflow to +inf, the median among them
    yield "infinite quotients", w, torch.full((n,), 1e30)
    yield "subnormal quotients", torch.ones(n), torch.randn(n, generator=gen) * 1e-42
    yield "one element", torch.tensor([0.5]), torch.tensor([0.25])
    yield "all zero", torch.zeros(n), torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    g[7] = float("nan")
    yield "a NaN", torch.randn(n, generator=gen), g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [1, 2, 5])
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_radix_select_is_torch_median_bit_for_bit(case, approx, ranks, backend):
    _, w, g = case
    for weight_decay in (0.0, 1e-3):
        got = sharded_median(w, g, ranks, weight_decay, approx, backend=backend)
        want = whole_layer_median(w, g, weight_decay, approx)
        if torch.isnan(want):
            assert torch.isnan(got)
        else:
            assert got.view(torch.int32) == want.view(torch.int32), (got.item(), want.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_replicas_that_do_not_own_the_layer_add_nothing(backend):
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(301, generator=gen), torch.randn(301, generator=gen)
    # 3 ranks each holding the whole layer (replicated), only the first counting it.
    selects = []
    for own in (True, False, False):
        selects.append(_MedianSelect(_group(w, g, own, False, 0.0, backend), _reduction()))
    for r in range(3):
        merged = sum(s.histogram(r) for s in selects)
        for s in selects:
            s.choose(r, merged)
    reduction = _reduction()
    selects[1].write(reduction)
    assert reduction.median[0] == torch.median(g.abs() / w.abs())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_quotients_are_of_the_unscaled_gradient(backend):
    """Under GradScaler the shards' gradients are S·g: the median is of g·fl32(1/S), as pass 1
    and the single-process kernels read them."""
    gen = torch.Generator().manual_seed(2)
    w, g = torch.randn(2001, generator=gen), torch.randn(2001, generator=gen) * 3.0
    scale = torch.tensor([3.0])
    unscaled = g * torch.tensor(1 / 3.0, dtype=torch.float32)
    want = whole_layer_median(w, unscaled, 1e-3, False)
    got = sharded_median(w, g, 2, 1e-3, False, backend=backend, grad_scale=scale)
    assert got.view(torch.int32) == want.view(torch.int32)
