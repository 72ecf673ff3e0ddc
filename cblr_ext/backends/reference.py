"""The reference backend: the ops of ``cblr_ext.ops`` as readable single-tensor loops.

It is the ground truth every fused backend is tested against and the default kernel
of every op on any device, so it favours clarity over speed and may read values on
the host.  The signatures are the op schemas (``ops.SCHEMAS``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import layer_math as lm
from ..functional import (FLAG_COLUMNS, FLAG_MEASURED, FLAG_MEDIAN, FLAG_NONFINITE, FLAG_NORMS, STAT_COLUMNS,
                          SUM_COLUMNS, SUM_DIFF2, SUM_G2, SUM_STEP2, SUM_W2, state_dtype)


def _squares(x: Tensor) -> Tensor:
    """Σx² in fp64 (a 0-d tensor): finite for any finite fp32 input, and mergeable."""
    return x.double().square().sum()


def _unscaler(grad_scale, dtype):
    """g ↦ g·fl32(1/S) in ``dtype`` (GradScaler.unscale_'s factor), or g itself."""
    if grad_scale is None:
        return lambda g: g
    inv = grad_scale.double().reciprocal().float().reshape(()).to(dtype)
    return lambda g: g * inv


def _median(w: Tensor, g: Tensor, weight_decay: float, approx: bool) -> Tensor:
    q = lm.curvature_quotients(lm.decayed_grad(g, w, weight_decay), w)
    return lm.lower_median(q, approx=approx)


def layerwise_reduce(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, w_sq, w_sq_known,
                     grad_scale, weight_decay, curvature_interval, lag, approx_median, check_nonfinite, workspace):
    """Pass 1: every layer's Σw², Σg² (and median, MCLR), the secant sums where a probe
    gradient is given (CBLR), the measured and non-finite flags (of g and the probe gradient).  Reads w, so a probe's
    parameters must be back at w_t (this backend's shift is always restored first)."""
    n = len(params)
    device = params[0].device
    sums = torch.zeros((n, SUM_COLUMNS), dtype=torch.float64, device=device)
    median = torch.zeros((n,), dtype=torch.float32, device=device)
    flags = torch.zeros((n, FLAG_COLUMNS), dtype=torch.bool, device=device)
    for i, (p, grad) in enumerate(zip(params, grads)):
        unscale = _unscaler(grad_scale, state_dtype(p))
        w, g = p.to(state_dtype(p)), unscale(grad.to(state_dtype(p)))
        sums[i, SUM_W2], sums[i, SUM_G2] = _squares(w), _squares(g)
        nonfinite = not bool(torch.isfinite(g).all())
        flags[i, FLAG_NORMS] = True
        if rule == "mclr":
            median[i] = _median(w, g, weight_decay, approx_median)
            flags[i, FLAG_MEDIAN] = True
        if rule == "cblr":
            measures = bool(probe_grads) and probe_grads[i] is not None
            if measures:
                s, g_s = probe_steps[i], unscale(probe_grads[i].to(w.dtype))
                diff = lm.secant_difference(g, g_s, s.to(w.dtype), weight_decay)
                sums[i, SUM_DIFF2], sums[i, SUM_STEP2] = _squares(diff), _squares(s)
                nonfinite = nonfinite or not bool(torch.isfinite(g_s).all())  # an overflow at w_t + s
        else:
            measures = bool(lm.measurement_due(ages[i], curvature_interval))
        flags[i, FLAG_MEASURED] = adapt[i] and measures
        flags[i, FLAG_NONFINITE] = nonfinite
    return sums, median, flags


def _current_inputs(rule, sums, median, flags, i, w, g, weight_decay, eps, approx_median):
    """(‖w‖, ‖g‖, κ) of layer i's current inputs: from the reduction, completed from w and
    g where it left something out (a fused backend's pass 1 reads only what it needs)."""
    if flags[i, FLAG_NORMS]:
        w_norm, g_norm = lm.norm_from_sum(sums[i, SUM_W2]), lm.norm_from_sum(sums[i, SUM_G2])
    else:
        w_norm, g_norm = lm.norm_from_sum(_squares(w)), lm.norm_from_sum(_squares(g))
    m = median[i]
    if rule == "mclr" and not flags[i, FLAG_MEDIAN]:
        m = _median(w, g, weight_decay, approx_median)
    kappa = lm.reduction_kappa(rule, w_norm, g_norm, sums[i, SUM_DIFF2], sums[i, SUM_STEP2], m, weight_decay, eps)
    return torch.stack([w_norm, g_norm, kappa.float()])


def layerwise_update_(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved,
                      adapt, sums, median, flags, found_inf, grad_scale, lr, momentum, nesterov, weight_decay, eps,
                      trust_coefficient, curvature_ema, max_ratio, fallback_trust, curvature_interval, lag,
                      approx_median, workspace, next_w_sq):
    """Pass 2: ratio and update of every layer; when ``found_inf`` nothing changes but the
    restore of parameters that sit at a probe point (``saved``)."""
    skip = bool(found_inf)
    stats = torch.zeros((len(params), STAT_COLUMNS), dtype=torch.float32, device=params[0].device)
    for i, (p, grad) in enumerate(zip(params, grads)):
        w_t = saved[i] if saved and saved[i] is not None else p
        dtype = state_dtype(p)
        w, g = w_t.to(dtype, copy=True), _unscaler(grad_scale, dtype)(grad.to(dtype))
        current = _current_inputs(rule, sums, median, flags, i, w, g, weight_decay, eps, approx_median)
        # lag=1: the ratio uses ‖w‖, ‖g‖ and κ of the previous step's inputs.
        w_norm, g_norm, kappa = lagged[i].clone() if lag and lagged_valid[i] else current  # written below
        measured = flags[i, FLAG_MEASURED]
        ratio, new_bar, used, fallback = lm.layer_ratio(
            kappa, measured, kappas[i], w_norm, g_norm, torch.tensor(adapt[i], device=p.device),
            trust_coefficient=trust_coefficient, curvature_ema=curvature_ema, max_ratio=max_ratio,
            weight_decay=weight_decay, eps=eps, fallback_trust=fallback_trust)
        alpha = ratio * lr
        step_norm = torch.zeros((), device=p.device)
        if skip:
            if w_t is not p:
                p.copy_(w_t)
        else:
            d = lm.decayed_grad(g, w, weight_decay)
            v = momentum_buffers[i] if momentum_buffers else None
            s = lm.momentum_update(w, d, v, alpha, momentum, nesterov)
            p.copy_(w)
            if prev_steps:
                prev_steps[i].copy_(s)
            kappas[i].copy_(new_bar)
            ages[i].copy_(lm.next_age(ages[i], measured))
            if lag:
                lagged[i].copy_(current)
            step_norm = lm.norm_from_sum(_squares(s))
        stats[i] = torch.stack([w_norm, g_norm, step_norm, used, ratio, alpha, fallback.float()])
    return stats


def probe_shift_(params, steps, saved, displacements):
    """saved ← w, then w ← w + s_{t−1} (s rounded to w's dtype first), Δ ← the new w − w_t
    in the state dtype; Σw_t² per layer."""
    w_sq = torch.zeros((len(params),), dtype=torch.float64, device=params[0].device if params else "cpu")
    for i, (p, s, w, delta) in enumerate(zip(params, steps, saved, displacements)):
        w.copy_(p)
        w_sq[i] = _squares(w.to(state_dtype(p)))
        p.add_(s.to(p.dtype))
        delta.copy_(lm.realised_displacement(p.to(delta.dtype), w.to(delta.dtype)))
    return w_sq


def probe_restore_(params, saved):
    for p, w in zip(params, saved):
        p.copy_(w)
