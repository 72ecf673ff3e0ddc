"""The radix select of cblr_ext.distributed against torch.median of the whole layer, bit for
bit, on data chosen to break it (ties, zeros, infinities, subnormals, empty shards), with
the ranks simulated in this process: their histograms summed as the all_reduce sums them."""
from types import SimpleNamespace

import pytest
import torch

from cblr_ext import functional as F
from cblr_ext import layer_math as lm
from cblr_ext.distributed import _MedianSelect


def _reduction():
    flags = torch.zeros((1, F.FLAG_COLUMNS), dtype=torch.bool)
    flags[0, F.FLAG_MEASURED] = True
    return F.Reduction(torch.zeros((1, F.SUM_COLUMNS), dtype=torch.float64), torch.zeros(1), flags)


def sharded_median(w, g, ranks, weight_decay, approx, owns=None):
    """The median the ranks agree on, ``w``/``g`` split into ``ranks`` uneven shards."""
    bounds = sorted(torch.randint(0, w.numel() + 1, (ranks - 1,), generator=torch.Generator().manual_seed(3)).tolist())
    pieces = list(zip(torch.tensor_split(w.flatten(), bounds), torch.tensor_split(g.flatten(), bounds)))
    owns = owns or [True] * ranks
    selects = [_MedianSelect(SimpleNamespace(sharding=SimpleNamespace(owns=[own]), local_params=[wp],
                                             local_grads=[gp], hp=SimpleNamespace(approx_median=approx,
                                                                                  weight_decay=weight_decay)),
                             _reduction()) for (wp, gp), own in zip(pieces, owns)]
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


@pytest.mark.parametrize("ranks", [1, 2, 5])
@pytest.mark.parametrize("approx", [False, True])
@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_radix_select_is_torch_median_bit_for_bit(case, approx, ranks):
    _, w, g = case
    for weight_decay in (0.0, 1e-3):
        got = sharded_median(w, g, ranks, weight_decay, approx)
        want = whole_layer_median(w, g, weight_decay, approx)
        if torch.isnan(want):
            assert torch.isnan(got)
        else:
            assert got.view(torch.int32) == want.view(torch.int32), (got.item(), want.item())


def test_replicas_that_do_not_own_the_layer_add_nothing():
    gen = torch.Generator().manual_seed(1)
    w, g = torch.randn(301, generator=gen), torch.randn(301, generator=gen)
    # 3 ranks each holding the whole layer (replicated), only the first counting it.
    selects = []
    for own in (True, False, False):
        group = SimpleNamespace(sharding=SimpleNamespace(owns=[own]), local_params=[w], local_grads=[g],
                                hp=SimpleNamespace(approx_median=False, weight_decay=0.0))
        selects.append(_MedianSelect(group, _reduction()))
    for r in range(3):
        merged = sum(s.histogram(r) for s in selects)
        for s in selects:
            s.choose(r, merged)
    reduction = _reduction()
    selects[1].write(reduction)
    assert reduction.median[0] == torch.median(g.abs() / w.abs())
