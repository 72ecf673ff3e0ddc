"""The reference backend: the ops of ``cblr_ext.ops`` in plain torch.

It is the ground truth every fused backend is tested against and the default kernel
of every op on any device, so it favours clarity over speed; the signatures are the
op schemas (``contract.SCHEMAS``).  Nothing in a step is read on the host and nothing is
copied to the device from host data: the per-layer quantities are [L] tensors (the
rules of ``layer_math`` are elementwise over them), the elementwise parts are
``torch._foreach_*`` over the layers, and a skipped step is a ``torch.where``, so that
``torch.compile`` traces a step into one graph with a handful of nodes per op rather
than dozens per layer (docs/architecture.md, "torch.compile"), and a CUDA graph can
capture it.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from .. import layer_math as lm
from .. import ops
from ..contract import (host_flags, FLAG_MEASURED, FLAG_MEDIAN, FLAG_NORMS, SHARDED_OPS, STEP_OPS, SUM_DIFF2, SUM_G2, SUM_STEP2, SUM_W2,
                        state_dtype)


def _squares(x: Tensor) -> Tensor:
    """Σx² in fp64 (a 0-d tensor): finite for any finite fp32 input, and mergeable."""
    return x.double().square().sum()


def _sums(xs: list) -> Tensor:
    """Σx² of every layer, [L] fp64."""
    return torch.stack([_squares(x) for x in xs])


def _in_state_dtype(tensors: list, params: list) -> list:
    return [t.to(state_dtype(p)) for t, p in zip(tensors, params)]


def _decayed(gs: list, ws: list, weight_decay: float) -> list:
    """``lm.decayed_grad`` of every layer: g + β·w, the product rounded before the sum
    (no fused multiply-add, as the fused backends form it)."""
    return torch._foreach_add(gs, torch._foreach_mul(ws, weight_decay))


def _median(w: Tensor, d: Tensor, approx: bool) -> Tensor:
    """``lm.lower_median`` of ``lm.curvature_quotients(d, w)`` without its data-dependent
    shape (which would make torch.compile break the graph, and sync a GPU): the quotients
    of the elements with w_i = 0 are replaced by −inf (the first ``low`` of them) and +inf
    (the others), ``low`` chosen so that the lower median of all N elements is the lower
    median of the n quotients: torch.median takes the ((N − 1) // 2)-th smallest, that is
    the ((n − 1) // 2)-th quotient when low = (z + 1 − n mod 2) // 2, z = N − n.  NaN when
    n = 0; the value itself is torch.median's, bit for bit."""
    if w.numel() == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=w.device)
    w, d = w.flatten(), d.flatten()
    kept = w != 0
    excluded = ~kept
    n = kept.sum()
    low = (excluded.sum() + 1 - n % 2) // 2
    pad = torch.where(excluded.cumsum(0) <= low, float("-inf"), float("inf")).to(w.dtype)
    m = lm.lower_median(torch.where(kept, d.abs() / w.abs(), pad), approx=approx)
    return torch.where(n > 0, m, float("nan"))


def _medians(ws: list, ds: list, approx: bool) -> Tensor:
    return torch.stack([_median(w, d, approx) for w, d in zip(ws, ds)])


def _nonfinite(gs: list) -> Tensor:
    return torch.stack([~torch.isfinite(g).all() for g in gs])


def _unscaled(gs: list, grad_scale) -> list:
    """g·fl32(1/S) (GradScaler.unscale_'s factor) of every layer, or the gradients as given."""
    return [lm.unscaled(g, grad_scale) for g in gs]


def layerwise_reduce(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, w_sq, w_sq_known,
                     grad_scale, weight_decay, curvature_interval, lag, approx_median, check_nonfinite, workspace):
    """Pass 1: every layer's Σw², Σg² (and median, MCLR), the secant sums where a probe
    gradient is given (CBLR), the measured and non-finite flags (of g and the probe gradient).  Reads w, so a probe's
    parameters must be back at w_t (this backend's shift is always restored first)."""
    n = len(params)
    device = params[0].device
    ws, gs = _in_state_dtype(params, params), _unscaled(_in_state_dtype(grads, params), grad_scale)
    nonfinite = _nonfinite(gs)
    zeros = torch.zeros((n,), dtype=torch.float64, device=device)
    diff2, step2 = zeros, zeros
    median = torch.zeros((n,), dtype=torch.float32, device=device)
    if rule == "mclr":
        median = _medians(ws, _decayed(gs, ws, weight_decay), approx_median)
    if rule == "cblr":
        probes = [i for i in range(n) if probe_grads and probe_grads[i] is not None]
        zero = zeros[0]
        diff2, step2 = [zero] * n, [zero] * n
        probe_nonfinite = [nonfinite[i] for i in range(n)]
        for i in probes:
            w, s = ws[i], probe_steps[i]
            (g_s,) = _unscaled([probe_grads[i].to(w.dtype)], grad_scale)
            diff = lm.secant_difference(gs[i], g_s, s.to(w.dtype), weight_decay)  # s: the realised displacement
            diff2[i], step2[i] = _squares(diff), _squares(s)
            probe_nonfinite[i] = nonfinite[i] | ~torch.isfinite(g_s).all()  # an overflow at w_t + s
        diff2, step2, nonfinite = torch.stack(diff2), torch.stack(step2), torch.stack(probe_nonfinite)
        measured = host_flags([adapt[i] and i in probes for i in range(n)], device)
    else:
        measured = host_flags(adapt, device) & lm.measurement_due(torch.stack(ages), curvature_interval)
    sums = torch.stack([_sums(ws), _sums(gs), diff2, step2], dim=1)
    every = torch.ones((n,), dtype=torch.bool, device=device)
    flags = torch.stack([measured, every, every if rule == "mclr" else ~every, nonfinite], dim=1)
    return sums, median, flags


def _current_inputs(rule, sums, median, flags, ws, gs, weight_decay, eps, approx_median) -> Tensor:
    """(‖w‖, ‖g‖, κ) [L, 3] fp64 of the current inputs: from the reduction, completed from w and
    g where it left something out (a fused backend's pass 1 reads only what it needs;
    which it left out is on the device, so both are formed and the flags select)."""
    w2 = torch.where(flags[:, FLAG_NORMS], sums[:, SUM_W2], _sums(ws))
    g2 = torch.where(flags[:, FLAG_NORMS], sums[:, SUM_G2], _sums(gs))
    if rule == "mclr":
        median = torch.where(flags[:, FLAG_MEDIAN], median, _medians(ws, _decayed(gs, ws, weight_decay), approx_median))
    w_norm, g_norm = lm.norm_from_sum(w2), lm.norm_from_sum(g2)
    kappa = lm.reduction_kappa(rule, w_norm, g_norm, sums[:, SUM_DIFF2], sums[:, SUM_STEP2], median, weight_decay,
                               eps)
    return torch.stack([w_norm, g_norm, kappa], dim=1)


def _momentum_update(ws: list, ds: list, vs: list, alphas: list, momentum: float, nesterov: bool):
    """``lm.momentum_update`` of every layer, out of place: (w − s, the new v, s)."""
    scaled = torch._foreach_mul(ds, alphas)
    new_vs = torch._foreach_add(torch._foreach_mul(vs, momentum), scaled) if vs else []
    if not vs:
        steps = scaled
    elif nesterov:
        steps = torch._foreach_add(torch._foreach_mul(new_vs, momentum), scaled)
    else:
        steps = new_vs
    return torch._foreach_sub(ws, steps), new_vs, steps


def _write(targets: list, skip: Tensor, old: list, new: list) -> None:
    """targets ← old where the step is skipped, else new (decided on the device)."""
    if targets:
        torch._foreach_copy_(targets, [torch.where(skip, a, b) for a, b in zip(old, new)])


def layerwise_update_(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved,
                      adapt, sums, median, flags, found_inf, grad_scale, lr, momentum, nesterov, weight_decay, eps,
                      trust_coefficient, curvature_ema, max_ratio, fallback_trust, curvature_interval, lag,
                      approx_median, workspace, next_w_sq):
    """Pass 2: ratio and update of every layer; when ``found_inf`` nothing changes but the
    restore of parameters that sit at a probe point (``saved``)."""
    n = len(params)
    device = params[0].device
    w_t = [saved[i] if saved and saved[i] is not None else p for i, p in enumerate(params)]
    ws, gs = _in_state_dtype(w_t, params), _unscaled(_in_state_dtype(grads, params), grad_scale)
    current = _current_inputs(rule, sums, median, flags, ws, gs, weight_decay, eps, approx_median)
    # lag=1: the ratio uses ‖w‖, ‖g‖ and κ of the previous step's inputs.
    inputs = torch.stack([lagged[i] if lag and lagged_valid[i] else current[i] for i in range(n)])
    w_norm, g_norm, kappa = inputs.unbind(1)
    kappa_bar, age = torch.stack(kappas), torch.stack(ages)
    measured = flags[:, FLAG_MEASURED]
    ratio, new_bar, used, fallback = lm.layer_ratio(
        kappa, measured, kappa_bar, w_norm, g_norm, host_flags(adapt, device),
        trust_coefficient=trust_coefficient, curvature_ema=curvature_ema, max_ratio=max_ratio,
        weight_decay=weight_decay, eps=eps, fallback_trust=fallback_trust)
    alpha = lm.layer_alpha(ratio, lr)
    skip = found_inf.to(torch.bool).reshape(())
    new_ws, new_vs, steps = _momentum_update(ws, _decayed(gs, ws, weight_decay), momentum_buffers,
                                             [a.to(w.dtype) for a, w in zip(alpha.unbind(), ws)], momentum,
                                             nesterov)
    _write(params, skip, ws, new_ws)  # a skipped step restores a probe's w_t, writes w_t itself elsewhere
    _write(momentum_buffers, skip, momentum_buffers, new_vs)
    _write(prev_steps, skip, prev_steps, steps)
    _write(kappas, skip, kappas, list(new_bar.unbind()))
    _write(ages, skip, ages, list(lm.next_age(age, measured).unbind()))
    if lag:
        _write(lagged, skip, lagged, list(current.unbind()))
    step_norm = torch.where(skip, 0.0, lm.norm_from_sum(_sums(steps)))
    return torch.stack([w_norm, g_norm, step_norm, used, ratio, alpha, fallback.double()], dim=1)


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


def _median_keys(w, g, grad_scale, weight_decay):
    """One layer's quotient keys for the sharded median: the fp32 bits of |d| / |w|, rounded
    to fp32 from the state dtype (rounding is monotone, so the median of the rounded
    quotients is the rounded median); −1 where w = 0 or the quotient is NaN (−1 >> top
    matches no prefix ≥ 0).  Also whether each quotient is NaN where w ≠ 0."""
    dtype = state_dtype(w)
    w = w.to(dtype).flatten()
    (g,) = _unscaled([g.to(dtype).flatten()], grad_scale)
    q = (lm.decayed_grad(g, w, weight_decay).abs() / w.abs()).float()
    nan = torch.isnan(q) & (w != 0)
    return torch.where((w == 0) | nan, -1, q.view(torch.int32)), nan


def median_histogram(params, grads, grad_scale, weight_decay, prefix, shift, width):
    """One round of the sharded median's radix select (cblr_ext/distributed.py): per layer,
    its quotient keys (``_median_keys``; none where w = 0 or the quotient is NaN) whose bits
    above ``shift + width`` equal the layer's ``prefix``, counted by the ``width`` bits at
    ``shift`` ([L, 2^width] fp64), and its NaN quotients where w ≠ 0 ([L] fp64)."""
    bins, top = 1 << width, shift + width
    counts, nans = [], []
    for w, g, want in zip(params, grads, prefix):
        keys, nan = _median_keys(w, g, grad_scale, weight_decay)
        kept = (keys >> top) == (want >> top)
        counts.append(torch.bincount(torch.where(kept, (keys >> shift) & (bins - 1), 0), weights=kept.double(),
                                     minlength=bins))
        nans.append(nan.sum().double())
    device = prefix.device
    return (torch.stack(counts) if counts else torch.zeros((0, bins), dtype=torch.float64, device=device),
            torch.stack(nans) if nans else torch.zeros(0, dtype=torch.float64, device=device))


def median_candidates(params, grads, grad_scale, weight_decay, prefix, top):
    """The keys ``median_histogram`` would count under each layer's ``prefix`` (their bits
    above ``top`` equal the prefix's), layer after layer in each layer's element order
    ([K] int32), and their number per layer ([L] int64)."""
    keys = [k[(k >> top) == (want >> top)] for w, g, want in zip(params, grads, prefix)
            for k in [_median_keys(w, g, grad_scale, weight_decay)[0]]]
    device = prefix.device
    return (torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int32, device=device),
            torch.tensor([len(k) for k in keys], dtype=torch.int64, device=device))


def median_candidate_histogram(keys, layer_counts, prefix, shift, width):
    """``median_histogram``'s counts of round (``shift``, ``width``) from the keys
    ``median_candidates`` gathered: one bincount for every layer."""
    bins, top = 1 << width, shift + width
    keys = keys.long()
    rows = torch.repeat_interleave(torch.arange(len(prefix), device=keys.device), layer_counts)
    kept = (keys >> top) == (prefix[rows] >> top)
    index = rows * bins + ((keys >> shift) & (bins - 1))
    return torch.bincount(index[kept], minlength=len(prefix) * bins).double().view(len(prefix), bins)


# The default kernel of every op on any device, and the only one of ``cblr_ext_reference``.
for _library in (ops.LIBRARY, ops.REFERENCE_LIBRARY):
    ops.register(sys.modules[__name__], "CompositeExplicitAutograd", "reference", _library,
                 names=STEP_OPS + SHARDED_OPS)
