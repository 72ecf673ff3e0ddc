"""Kernel-level microbenchmarks of each backend's two passes on one suite:
the norms pass (LARS ``reduce``), the median pass (MCLR ``reduce``) and the
update pass (``apply``)."""
import pytest
import torch

import cblr_ext
from cblr_ext import backends
from cblr_ext.functional import REDUCTION_COLUMNS, STAT_COLUMNS

from bench.cases import LR, MOMENTUM, WEIGHT_DECAY


def _batch(rule, backend, tensors, **kwargs):
    """One param group as the optimizer hands it to a backend (with state created)."""
    params_master, grad_sets = tensors
    params = [w.clone() for w in params_master]
    for p, g in zip(params, grad_sets[0]):
        p.grad = g.clone()
    opt = getattr(cblr_ext, rule)(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  backend=backend, **kwargs)
    (batch,) = opt._batches()
    return batch, backends.get(backend, batch.device)


@pytest.mark.benchmark(group="norms pass (LARS reduce)")
def test_norms_pass(benchmark, backend, tensors):
    batch, module = _batch("LARS", backend, tensors)
    red = benchmark(module.reduce, batch)
    assert red.shape == (len(batch), REDUCTION_COLUMNS)


@pytest.mark.parametrize("median", ["exact", "approx"])
@pytest.mark.benchmark(group="median pass (MCLR reduce)")
def test_median_pass(benchmark, backend, median, tensors):
    batch, module = _batch("MCLR", backend, tensors, median=median)
    red = benchmark(module.reduce, batch)
    assert red.shape == (len(batch), REDUCTION_COLUMNS)


@pytest.mark.benchmark(group="update pass (apply)")
def test_update_pass(benchmark, backend, tensors):
    batch, module = _batch("LARS", backend, tensors)
    red = module.reduce(batch)
    found_inf = torch.zeros((), dtype=torch.bool, device=batch.device)
    stats = benchmark(module.apply, batch, red, found_inf)
    assert stats.shape == (len(batch), STAT_COLUMNS)
