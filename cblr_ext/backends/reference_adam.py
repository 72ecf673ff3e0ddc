"""The Adam base's ops (``contract.ADAM_OPS``, and CBLR's on it: ``ADAM_PROBE_OPS``) in
plain torch: the ground truth, and the default kernel on every device.  As
``reference.py``: per-layer quantities are [L] tensors, the elementwise parts
``torch._foreach_*``, and a skipped step a ``torch.where``: nothing is read on the host
(a CUDA graph can capture a step, and torch.compile traces it into one graph)."""
from __future__ import annotations

import sys

import torch

from .. import layer_math as lm
from .. import ops
from ..contract import ADAM_OPS, ADAM_PROBE_OPS, FLAG_MEDIAN, FLAG_NORMS, SUM_G2, SUM_W2, host_flags
from .reference import _in_state_dtype, _medians, _nonfinite, _sums, _unscaled, _write


def _inputs(params, grads, grad_scale, clip) -> tuple:
    """w and g (÷ grad scale, ÷ the global clip divisor) in the state dtype."""
    return _in_state_dtype(params, params), [lm.adam_grad(g, grad_scale, clip) for g in _in_state_dtype(grads, params)]


def _directions(ws, gs, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, weight_decay, bias_correction) -> tuple:
    """(new m, new v, u) of every layer, out of place."""
    steps = [lm.adam_step(*layer, beta1, beta2, eps, weight_decay, bias_correction)
             for layer in zip(ws, gs, exp_avgs, exp_avg_sqs, steps)]
    return tuple(map(list, zip(*steps))) if steps else ([], [], [])


def grad_sq_sums(grads, grad_scale):
    """Σg² of every layer (fp64), g ÷ grad scale."""
    return _sums(_unscaled(_in_state_dtype(grads, grads), grad_scale))


def adam_reduce(rule, params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, clip, beta1, beta2, eps,
                weight_decay, bias_correction):
    """Pass 1: Σw², Σu² and (MCLR) the median of |u_i|/|w_i| of the direction this step
    would take, and the non-finite flags of g; writes nothing."""
    n = len(params)
    device = params[0].device
    ws, gs = _inputs(params, grads, grad_scale, clip)
    _, _, us = _directions(ws, gs, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, weight_decay, bias_correction)
    zeros = torch.zeros((n,), dtype=torch.float64, device=device)
    median = _medians(ws, us, False) if rule == "mclr" else torch.zeros((n,), dtype=torch.float32, device=device)
    sums = torch.stack([_sums(ws), _sums(us), zeros, zeros], dim=1)
    every = torch.ones((n,), dtype=torch.bool, device=device)
    flags = torch.stack([every, every, every if rule == "mclr" else ~every, _nonfinite(gs)], dim=1)
    return sums, median, flags


def adam_update_(rule, params, grads, exp_avgs, exp_avg_sqs, steps, adapt, sums, median, flags, found_inf,
                 grad_scale, clip, lr, beta1, beta2, eps, weight_decay, bias_correction, trust_coefficient, max_ratio):
    """Pass 2: the ratio and w ← w − γ·r·u, m, v and the step count written; nothing
    changes when ``found_inf``."""
    device = params[0].device
    ws, gs = _inputs(params, grads, grad_scale, clip)
    ms, vs, us = _directions(ws, gs, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, weight_decay, bias_correction)
    w2 = torch.where(flags[:, FLAG_NORMS], sums[:, SUM_W2], _sums(ws))
    u2 = torch.where(flags[:, FLAG_NORMS], sums[:, SUM_G2], _sums(us))
    if rule == "mclr":
        median = torch.where(flags[:, FLAG_MEDIAN], median, _medians(ws, us, False))
    w_norm, u_norm = lm.norm_from_sum(w2), lm.norm_from_sum(u2)
    ratio, kappa, fallback = lm.adam_ratio(rule, w_norm, u_norm, median, host_flags(adapt, device),
                                           trust_coefficient=trust_coefficient, eps=eps, max_ratio=max_ratio)
    alpha = lm.layer_alpha(ratio, lr)
    step_norm = _apply(params, exp_avgs, exp_avg_sqs, steps, ws, ms, vs, us, alpha, found_inf)[1]
    return torch.stack([w_norm, u_norm, step_norm, kappa, ratio, alpha, fallback.double()], dim=1)


def _apply(params, exp_avgs, exp_avg_sqs, steps, ws, ms, vs, us, alpha, found_inf) -> tuple:
    """w ← w − α·u, m, v and the step count written (nothing when ``found_inf``); returns
    (the moves α·u, ‖α·u‖ per layer, 0 when skipped)."""
    skip = found_inf.to(torch.bool).reshape(())
    moves = torch._foreach_mul(us, [a.to(w.dtype) for a, w in zip(alpha.unbind(), ws)])
    _write(params, skip, ws, torch._foreach_sub(ws, moves))
    _write(exp_avgs, skip, exp_avgs, ms)
    _write(exp_avg_sqs, skip, exp_avg_sqs, vs)
    _write(steps, skip, steps, torch._foreach_add(steps, 1.0))
    return moves, torch.where(skip, 0.0, lm.norm_from_sum(_sums(moves)))


def adam_secant_sums(params, grads, probe_grads, probe_steps, exp_avg_sqs, steps, grad_scale, clip, beta2, eps,
                     bias_correction):
    """Σ((g − g_s)/(√v̂ + ε))² and Σs² of every layer ([L, 2] fp64), v̂ of this step's v
    (g ÷ grad scale ÷ clip, g_s likewise: the secant of the gradient the moments take)."""
    if not params:
        return torch.zeros((0, 2), dtype=torch.float64)
    ws, gs = _inputs(params, grads, grad_scale, clip)
    probes = [lm.adam_grad(g, grad_scale, clip) for g in _in_state_dtype(probe_grads, params)]
    diffs = []
    for g, g_s, v, step in zip(gs, probes, exp_avg_sqs, steps):
        v = lm.adam_moments(g, v, v, 0.0, beta2)[1]  # this step's v, as the update forms it (m unused)
        bc2 = lm.bias_corrections(step, 0.0, beta2, bias_correction)[1]
        diffs.append(lm.adam_secant_difference(g, g_s, v, bc2.to(g.dtype), eps))
    return torch.stack([_sums(diffs), _sums(_in_state_dtype(probe_steps, params))], dim=1)


def adam_secant_update_(params, grads, exp_avgs, exp_avg_sqs, steps, prev_steps, alpha, found_inf, grad_scale, clip,
                        beta1, beta2, eps, weight_decay, bias_correction):
    """Pass 2 of CBLR on the Adam direction: w ← w − α·u with each layer's α given, m, v,
    the step count and s ← α·u written; nothing changes when ``found_inf``."""
    if not params:
        return torch.zeros((0,), dtype=torch.float64)
    ws, gs = _inputs(params, grads, grad_scale, clip)
    ms, vs, us = _directions(ws, gs, exp_avgs, exp_avg_sqs, steps, beta1, beta2, eps, weight_decay, bias_correction)
    moves, step_norm = _apply(params, exp_avgs, exp_avg_sqs, steps, ws, ms, vs, us, alpha, found_inf)
    _write(prev_steps, found_inf.to(torch.bool).reshape(()), prev_steps, moves)
    return step_norm


for _library in (ops.LIBRARY, ops.REFERENCE_LIBRARY):
    ops.register(sys.modules[__name__], "CompositeExplicitAutograd", "reference", _library,
                 names=ADAM_OPS + ADAM_PROBE_OPS)
