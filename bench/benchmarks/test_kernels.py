"""Kernel-level microbenchmarks of each backend's two passes on one suite, through the
functional core: the norms pass (LARS ``layerwise_reduce``), the median pass (MCLR
``layerwise_reduce``) and the update pass (``layerwise_update_``)."""
import math

import pytest
import torch

from cblr_ext import backends
from cblr_ext import functional as F

from bench.cases import LR, MOMENTUM, WEIGHT_DECAY


def _group(rule, backend, tensors, median="exact"):
    """One param group's inputs as the optimizer hands them to the ops."""
    params_master, grad_sets = tensors
    params = [w.clone() for w in params_master]
    grads = [g.clone() for g in grad_sets[0]]
    device = params[0].device
    resolved = backends.get(backend, device)
    hp = F.Hyperparams(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, median=median)
    ages = [torch.full((), math.inf, device=device) for _ in params]
    workspace = resolved.reduce_extras(rule, params, False, {}, reuse_weight_norm=False, w_sq_given=False).get("workspace")
    return dict(rule=rule, params=params, grads=grads, ages=ages, adapt=[p.ndim > 1 for p in params], hp=hp,
                workspace=workspace, backend=resolved)


def _reduce(g):
    return F.layerwise_reduce(g["rule"], g["params"], g["grads"], g["ages"], g["adapt"], g["hp"],
                              workspace=g["workspace"], backend=g["backend"])


@pytest.mark.benchmark(group="norms pass (LARS reduce)")
def test_norms_pass(benchmark, backend, tensors):
    g = _group("lars", backend, tensors)
    red = benchmark(_reduce, g)
    assert red.sums.shape == (len(g["params"]), F.SUM_COLUMNS)


@pytest.mark.parametrize("median", ["exact", "approx"])
@pytest.mark.benchmark(group="median pass (MCLR reduce)")
def test_median_pass(benchmark, backend, median, tensors):
    g = _group("mclr", backend, tensors, median)
    red = benchmark(_reduce, g)
    assert red.median.shape == (len(g["params"]),)


@pytest.mark.benchmark(group="update pass (layerwise_update_)")
def test_update_pass(benchmark, backend, tensors):
    g = _group("lars", backend, tensors)
    red = _reduce(g)
    device = g["params"][0].device
    state = F.LayerState(kappas=[torch.full((), math.nan, dtype=F.SCALAR_DTYPE, device=device) for _ in g["params"]], ages=g["ages"],
                         momentum_buffers=[torch.zeros_like(p) for p in g["params"]])
    found_inf = torch.zeros((), dtype=torch.bool, device=device)
    stats = benchmark(F.layerwise_update_, g["rule"], g["params"], g["grads"], state, g["adapt"], red, found_inf,
                      g["hp"], workspace=g["workspace"], backend=g["backend"])
    assert stats.shape == (len(g["params"]), F.STAT_COLUMNS)
