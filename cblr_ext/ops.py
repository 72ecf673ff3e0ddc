"""The ``torch.ops.cblr_ext`` ops (schemas declared once, in csrc/binding.cpp) and their
fake implementations, so that ``torch.compile`` can trace around them.

Importing this module loads the extension (``_build.load``: compiled, or JIT-built).
"""
from __future__ import annotations

import torch

from . import _build
from .functional import REDUCTION_COLUMNS, STAT_COLUMNS

_build.load()


@torch.library.register_fake("cblr_ext::reduce")
def _reduce_fake(rule, params, grads, ages, adapt, lagged_valid, probe_grads, steps, weight_decay, eps,
                 curvature_interval, lag, approx_median, check_nonfinite=True, workspace=None, w_norms=None):
    return params[0].new_empty((len(params), REDUCTION_COLUMNS), dtype=torch.float32)


@torch.library.register_fake("cblr_ext::apply")
def _apply_fake(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, saved, adapt,
                lagged_valid, red, found_inf, lr, momentum, nesterov, weight_decay, eps,
                trust_coefficient, curvature_ema, max_ratio, fallback_trust, curvature_interval, lag,
                approx_median, workspace=None, next_w_norms=None):
    return params[0].new_empty((len(params), STAT_COLUMNS), dtype=torch.float32)


@torch.library.register_fake("cblr_ext::restore")
def _restore_fake(dst, src):
    return None


@torch.library.register_fake("cblr_ext::shift")
def _shift_fake(params, steps, saved):
    return params[0].new_empty((len(params),), dtype=torch.float32)
