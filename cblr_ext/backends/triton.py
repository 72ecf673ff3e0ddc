"""The Triton backend: the ops of ``cblr_ext.ops`` as multi-tensor kernels
(``cblr_ext.kernels``), one launch per pass per dtype of a param group, and the
per-layer math on device as [L] tensors through ``layer_math``.  Nothing is read on
the host during a step.  The module-level functions ``layerwise_reduce``,
``layerwise_update_``, ``probe_shift_`` and ``probe_restore_``, and the Adam base's
``grad_sq_sums``, ``adam_reduce`` and ``adam_update_``, have the op schemas'
signatures (``contract.SCHEMAS``): they are registered as the CUDA kernels where the
CUDA extension is not loaded, and
``backend="triton"`` calls them directly (CPU tensors, in the interpreter).  Their
semantics are those of ``backends/reference.py`` and ``backends/reference_adam.py``.

Triton is imported on first use, not with ``cblr_ext``: on the CPU the kernels
run in the Triton interpreter, which ``TRITON_INTERPRET=1`` selects only when
set before triton is imported.

What pass 1 leaves out (``Reduction.flags``): under lag=1 the layers with a stash
(``lagged_valid``) are not measured in pass 1 (FLAG_NORMS false; with
``check_nonfinite=False`` their g is not read at all); the update pass reads their w_t
and g anyway and measures them for the next step's stash.  MCLR takes the median of
the layers that measure (lag=0), of every layer (lag=1, multi-pass median), or of the
layers without a stash (lag=1 with a one-pass median: the update pass histograms the
others).  A reduction made elsewhere (another backend, merged shards) may leave out
more: the update then takes what its ratio needs in a pass of its own first.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import weakref

import torch
from torch import Tensor

from .. import layer_math as lm
from .. import ops
from ..contract import (ADAM_OPS, FLAG_COLUMNS, FLAG_MEASURED, FLAG_MEDIAN, FLAG_NORMS, SCALAR_DTYPE, STAT_COLUMNS,
                          SUM_COLUMNS, SUM_DIFF2, SUM_G2, SUM_STEP2, SUM_W2)

name = "triton"

# Elements per program (one chunk).  A power of two; tests lower it to split
# layers over many chunks.
CHUNK = 4096

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available(device) -> bool | str:
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True
        return "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"no Triton support for {device.type} tensors"


# ------------------------------------------------------------------ checks
# Every op checks all of its inputs before it launches anything (a clear error, and
# nothing modified).

def dense(t: Tensor) -> bool:
    """Elements are the ``numel`` consecutive slots from ``data_ptr`` in some order."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return (t.numel() == 0 or t.is_contiguous()
            or (t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()])))


def _check(tensors: list, what: str, like: list | None = None) -> None:
    """What the kernels cannot address (None entries are skipped)."""
    for i, t in enumerate(tensors):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton backend: {what} {i} has dtype {t.dtype}; supported are "
                             "float32, float16 and bfloat16 (use backend='reference' or 'cpp')")
        if not dense(t):
            raise ValueError(f"triton backend: {what} {i} is not dense (strides {t.stride()})")
        if like is not None:
            p = like[i]
            if t.shape != p.shape or t.device != p.device or (
                    t.numel() and (t.dtype, t.stride()) != (p.dtype, p.stride())):
                raise ValueError(f"triton backend: {what} {i} must have the shape, dtype, strides and device "
                                 f"of its parameter ({tuple(p.shape)}, {p.dtype}, {p.stride()}, {p.device}), "
                                 f"got ({tuple(t.shape)}, {t.dtype}, {t.stride()}, {t.device})")


def _check_fp32_like(buffers: list, params: list, what: str) -> None:
    """Optimizer-state tensors (momentum, s_{t−1}): fp32 with their parameter's layout."""
    for i, (buf, p) in enumerate(zip(buffers, params)):
        if buf is not None and (buf.dtype != torch.float32 or buf.shape != p.shape or buf.device != p.device
                                or (p.numel() and buf.stride() != p.stride())):
            raise ValueError(f"triton backend: {what} of layer {i} must be float32 with the "
                             f"parameter's shape, strides and device")


def _check_lengths(n: int, optional: dict, required: dict) -> None:
    for what, values in required.items():
        if len(values) != n:
            raise ValueError(f"triton backend: {len(values)} {what} for {n} parameters")
    for what, values in optional.items():
        if values and len(values) != n:
            raise ValueError(f"triton backend: {len(values)} {what} for {n} parameters (give one per "
                             "parameter, or none)")


def _check_small(tensors: list, what: str, numel: int, device, dtype: torch.dtype) -> None:
    """Per-layer state (κ̄: one SCALAR_DTYPE element; age: one fp32; the lag stash: three SCALAR_DTYPE)."""
    for i, t in enumerate(tensors):
        if t.dtype != dtype or t.numel() != numel or t.device != device:
            raise ValueError(f"triton backend: {what} {i} must be a {dtype} tensor of {numel} element(s) on "
                             f"{device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _check_shape(t: Tensor, what: str, shape: tuple, dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        raise ValueError(f"triton backend: {what} must be {dtype} of shape {shape} on {device}, "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")


# ----------------------------------------------------------------- helpers

def _on_device(params: list):
    """The tensors' CUDA device made current: Triton launches there."""
    if params and params[0].is_cuda:
        return torch.cuda.device(params[0].device)
    return contextlib.nullcontext()


_vectors: dict = {}
_MAX_VECTORS = 256


def _vector(values, device, dtype: torch.dtype) -> Tensor:
    """A host list of per-layer flags or bytes as a device vector, cached per (device,
    values): a steady training loop copies nothing to the device."""
    from ..kernels.chunks import to_device
    key = (device, dtype, tuple(int(v) for v in values))
    vector = _vectors.get(key)
    if vector is None:
        if len(_vectors) >= _MAX_VECTORS:
            _vectors.pop(next(iter(_vectors)))
        vector = _vectors[key] = to_device(list(key[2]), device).to(dtype)
    return vector


def _stack(scalars: list) -> Tensor:
    """[L] of the layers' one-element state tensors."""
    return torch.stack([t.reshape(()) for t in scalars])


def _launch(kernel, plan, *args, **constexprs):
    from ..kernels.chunks import CHUNK_WARPS, LAUNCH_OPTIONS, TL_DTYPES
    if plan.n_chunks:
        kernel[(plan.n_chunks,)](plan.chunks, *args, DTYPE=TL_DTYPES[plan.dtype], BLOCK=plan.block,
                                 num_warps=CHUNK_WARPS, **constexprs, **LAUNCH_OPTIONS)


def _layer_sums(kernel, plans: list, n: int, columns: int, device, *args, **constexprs) -> Tensor:
    """[n, columns] fp64: the per-chunk partials of ``kernel`` summed per layer in a fixed
    order (rows of layers without elements stay 0)."""
    from ..kernels.chunks import sum_per_layer
    sums = torch.zeros((n, columns), dtype=torch.float64, device=device)
    for plan in plans:
        partials = torch.empty((plan.n_chunks, columns), dtype=torch.float64, device=device)
        _launch(kernel, plan, args[0], n, partials, *args[1:], **constexprs)
        sum_per_layer(plan, partials, sums)
    return sums


# Reductions made by this module's pass 1, by id(flags): (weak reference, flags' version,
# the configuration).  The update recognises them and knows, without reading the flags,
# that it needs no pass of its own before the ratio.
_made_here: dict = {}


def _remember(flags: Tensor, config: tuple) -> None:
    key = id(flags)

    def forget(ref, key=key):
        if _made_here.get(key, (None,))[0] is ref:
            del _made_here[key]
    _made_here[key] = (weakref.ref(flags, forget), flags._version, config)


def _made_here_for(flags: Tensor, config: tuple) -> bool:
    entry = _made_here.get(id(flags))
    return entry is not None and entry[0]() is flags and entry[1:] == (flags._version, config)


def _unscale(grad_scale, device) -> Tensor:
    """GradScaler's fl32(1/S) as the kernels read it (1 without a scale), on the device."""
    if grad_scale is None:
        return torch.ones((), dtype=torch.float32, device=device)
    if grad_scale.numel() != 1 or grad_scale.dtype != torch.float32 or grad_scale.device != device:
        raise ValueError(f"triton backend: grad_scale must be a one-element fp32 tensor on {device}, got "
                         f"{grad_scale.dtype} of shape {tuple(grad_scale.shape)} on {grad_scale.device}")
    return grad_scale.double().reciprocal().float().reshape(())


# ------------------------------------------------------------ median helpers

def _schedule(approx_median: bool, params: list, grads: list) -> tuple:
    from ..kernels import median
    data_bytes = sum(p.numel() * p.element_size() + g.numel() * g.element_size() for p, g in zip(params, grads))
    return median.passes("approx" if approx_median else "exact", len(params), data_bytes)


def _select(hist: Tensor, prefix: Tensor, rank: Tensor, count: Tensor, shift: int, bits: int,
            first: bool) -> None:
    from ..kernels import median
    from ..kernels.chunks import LAUNCH_OPTIONS
    # One program scans a layer's whole histogram: about 32 bins per thread.
    median.radix_select_kernel[(prefix.numel(),)](hist, prefix, rank, count, SHIFT=shift, BITS=bits, FIRST=first,
                                                  num_warps=min(32, max(4, (1 << bits) // 1024)), **LAUNCH_OPTIONS)


def _median_value(prefix: Tensor, count: Tensor, h_nan: Tensor, measure: Tensor) -> Tensor:
    """The selected bits as fp32; NaN for no quotient or a NaN one (as ``torch.median``),
    0 for a layer not ``measure``d (not taken)."""
    missing = (count == 0) | (h_nan > 0)
    value = prefix.view(torch.float32)
    value = torch.where(missing, torch.full_like(value, float("nan")), value)
    return torch.where(measure != 0, value, torch.zeros_like(value))


def _selection_state(n: int, device) -> tuple:
    """(prefix, rank, count) int32 vectors of a radix selection."""
    return tuple(torch.zeros(n, dtype=torch.int32, device=device) for _ in range(3))


def _pass_one(ptrs: Tensor, plans: list, n: int, device, modes: Tensor, measure, schedule, weight_decay: float,
              secant: bool, unscale: Tensor) -> tuple:
    """Pass 1 over w (role 0) and g (role 1): the [n, STAT_PARTIALS] fp32 sums that the
    layers' mode bytes ask for and, when ``measure`` (uint8 [n]) is given, the lower
    median of the quotients of the measuring layers by radix selection (0 elsewhere:
    their histogram passes read nothing).  The first histogram is filled by the pass
    that takes the sums."""
    from ..kernels import reduce as kr
    columns = kr.STAT_PARTIALS.value

    def stats_pass(hist, prefix, shift, bits):
        return _layer_sums(kr.chunk_stats_kernel, plans, n, columns, device, ptrs, hist, prefix, modes, measure,
                           float(weight_decay), unscale, STATS=True, SECANT=secant, HIST=hist is not None, FILTER=False,
                           SHIFT=shift, BITS=bits)

    def hist_pass(plan, hist, prefix, shift, bits):
        _launch(kr.chunk_stats_kernel, plan, ptrs, n, None, hist, prefix, None, measure, float(weight_decay),
                unscale, STATS=False, SECANT=False, HIST=True, FILTER=True, SHIFT=shift, BITS=bits)

    if measure is None:
        return stats_pass(None, None, 0, 1), None
    sums, prefix, count = _radix_median(plans, n, device, schedule, stats_pass, hist_pass)
    return sums, _median_value(prefix, count, sums[:, kr.P_H_NAN.value], measure)


def _radix_median(plans: list, n: int, device, schedule, stats_pass, hist_pass) -> tuple:
    """The passes of a radix selection: ``stats_pass(hist, prefix, shift, bits)`` takes the
    sums ([n, columns]) and fills the first histogram, ``hist_pass(plan, hist, prefix, shift,
    bits)`` fills each further one.  Returns (sums, the selected prefix, the quotient counts)."""
    prefix, rank, count = _selection_state(n, device)
    for i, (shift, bits) in enumerate(schedule):
        hist = torch.zeros((n, 1 << bits), dtype=torch.int32, device=device)
        if i == 0:
            sums = stats_pass(hist, prefix, shift, bits)
        else:
            for plan in plans:
                hist_pass(plan, hist, prefix, shift, bits)
        _select(hist, prefix, rank, count, shift, bits, first=i == 0)
    return sums, prefix, count


# ------------------------------------------------------------------ pass 1

def layerwise_reduce(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, w_sq, w_sq_known,
                     grad_scale, weight_decay, curvature_interval, lag, approx_median, check_nonfinite, workspace):
    """Pass 1 (``reference.layerwise_reduce``): Σw², Σg², the median, the secant sums
    where a probe gradient is given (CBLR), the flags; what it leaves out is in the flags
    (module docstring).  ``w_sq`` where ``w_sq_known``: Σw_t² taken instead of reading w."""
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    if n == 0:
        return (torch.zeros((0, SUM_COLUMNS), dtype=torch.float64, device=device),
                torch.zeros((0,), dtype=torch.float32, device=device),
                torch.zeros((0, FLAG_COLUMNS), dtype=torch.bool, device=device))
    _check(params, "parameter")
    _check_lengths(n, dict(probe_grads=probe_grads, probe_steps=probe_steps, w_sq_known=w_sq_known),
                   dict(gradients=grads, ages=ages, adapt=adapt, lagged_valid=lagged_valid))
    _check(grads, "gradient", like=params)
    probed = [rule == "cblr" and bool(probe_grads) and probe_grads[i] is not None for i in range(n)]
    if any(probed):
        if not probe_steps or any(pr and probe_steps[i] is None for i, pr in enumerate(probed)):
            raise ValueError("triton backend: a probe gradient without its step s")
        _check([g if pr else None for g, pr in zip(probe_grads, probed)], "probe gradient", like=params)
        _check_fp32_like([s if pr else None for s, pr in zip(probe_steps, probed)], params, "probe step")
    if w_sq is not None:
        _check_shape(w_sq.reshape(-1), "w_sq", (n,), torch.float64, device)
    if rule != "cblr":
        _check_small(ages, "age", 1, device, torch.float32)
    with _on_device(params):
        return _reduce(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, probed, w_sq,
                       w_sq_known, _unscale(grad_scale, device), weight_decay, curvature_interval, bool(lag), bool(approx_median),
                       bool(check_nonfinite))


def _reduce(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, probed, w_sq, w_sq_known,
            unscale, weight_decay, curvature_interval, lag, approx_median, check_nonfinite) -> tuple:
    from ..kernels import reduce as kr
    from ..kernels.chunks import chunk_plans, pointer_table
    n, device = len(params), params[0].device
    stashed = [lag and bool(v) for v in lagged_valid]
    known = [w_sq is not None and bool(w_sq_known) and bool(w_sq_known[i]) and not stashed[i] for i in range(n)]
    modes_host = [(0 if stashed[i] else kr.MODE_G2.value | (0 if known[i] else kr.MODE_W2.value))
                  | (kr.MODE_CHECK.value if check_nonfinite else 0) | (kr.MODE_SECANT.value if probed[i] else 0)
                  for i in range(n)]
    adapt_vector = _vector(adapt, device, torch.bool)
    if rule == "cblr":
        measured = _vector([a and pr for a, pr in zip(adapt, probed)], device, torch.bool)
    else:
        measured = adapt_vector & lm.measurement_due(_stack(ages), curvature_interval)

    schedule, measure, measure_host, one_pass = None, None, None, False
    if rule == "mclr":
        schedule = _schedule(approx_median, params, grads)
        one_pass = lag and len(schedule) == 1
        if not lag:
            median_flag = measured
            measure = measured.to(torch.uint8)
        else:
            # lag=1 stashes κ of every layer (as the reference does) for the next step, which may be
            # due when this one is not; with a one-pass median the update pass takes it for the
            # layers with a stash.
            measure_host = [not s for s in stashed] if one_pass else [True] * n
            median_flag = _vector(measure_host, device, torch.bool)
            measure = _vector(measure_host, device, torch.uint8)
    else:
        median_flag = _vector([False] * n, device, torch.bool)

    if any(modes_host) or (measure is not None and (measure_host is None or any(measure_host))):
        secant = any(probed)
        roles = [params, grads]
        if secant:
            roles += [[g if pr else None for g, pr in zip(probe_grads, probed)],
                      [s if pr else None for s, pr in zip(probe_steps, probed)]]
        part, median = _pass_one(pointer_table(roles), chunk_plans(params, CHUNK), n, device,
                                 _vector(modes_host, device, torch.uint8), measure, schedule, weight_decay, secant,
                                 unscale)
    else:  # lag=1, every layer stashed, no non-finite check: pass 1 reads nothing
        part = torch.zeros((n, kr.STAT_PARTIALS.value), dtype=torch.float64, device=device)
        median = None
    if median is None:  # not taken: 0
        median = torch.zeros((n,), dtype=torch.float32, device=device)

    w2 = part[:, kr.P_W2.value]
    if any(known):
        w2 = torch.where(_vector(known, device, torch.bool), w_sq.reshape(n).to(torch.float64), w2)
    columns = {SUM_W2: w2, SUM_G2: part[:, kr.P_G2.value], SUM_DIFF2: part[:, kr.P_DIFF2.value],
               SUM_STEP2: part[:, kr.P_STEP2.value]}
    sums = torch.stack([columns[c] for c in range(SUM_COLUMNS)], dim=1)
    norms_flag = _vector([not s for s in stashed], device, torch.bool)
    nonfinite = part[:, kr.P_NONFINITE.value] > 0
    flags = torch.stack([measured, norms_flag, median_flag, nonfinite], dim=1)
    _remember(flags, (rule, lag, approx_median, tuple(stashed), one_pass))
    return sums, median, flags


# ------------------------------------------------------------------ pass 2

def layerwise_update_(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved,
                      adapt, sums, median, flags, found_inf, grad_scale, lr, momentum, nesterov, weight_decay, eps,
                      trust_coefficient, curvature_ema, max_ratio, fallback_trust, curvature_interval, lag,
                      approx_median, workspace, next_w_sq):
    """Pass 2 (``reference.layerwise_update_``): κ from the reduction
    (``layer_math.reduction_kappa``, completed where it left out what is needed), the
    ratio, the fused update of every layer from w_t (``saved[i]`` where given, the
    parameter otherwise), κ̄, age, the lag stash; when ``found_inf`` nothing is
    written but parameters at their probe point go back to w_t.  With ``next_w_sq``:
    Σw² of the result per layer (left as it was on a skipped step)."""
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    if n == 0:
        return torch.zeros((0, STAT_COLUMNS), dtype=SCALAR_DTYPE, device=device)
    _check(params, "parameter")
    _check_lengths(n, dict(momentum_buffers=momentum_buffers, prev_steps=prev_steps, lagged=lagged, saved=saved),
                   dict(gradients=grads, kappas=kappas, ages=ages, lagged_valid=lagged_valid, adapt=adapt))
    if lag and len(lagged) != n:
        raise ValueError("triton backend: lag=1 needs a stash tensor per layer (lagged)")
    _check(grads, "gradient", like=params)
    _check_fp32_like(momentum_buffers, params, "momentum buffer")
    _check_fp32_like(prev_steps, params, "previous step")
    _check(saved, "saved parameter", like=params)
    _check_small(kappas, "kappa", 1, device, SCALAR_DTYPE)
    _check_small(ages, "age", 1, device, torch.float32)
    if lag:
        _check_small(lagged, "lag stash", 3, device, SCALAR_DTYPE)
    _check_shape(sums, "the reduction's sums", (n, SUM_COLUMNS), torch.float64, device)
    _check_shape(median, "the reduction's median", (n,), torch.float32, device)
    _check_shape(flags, "the reduction's flags", (n, FLAG_COLUMNS), torch.bool, device)
    if next_w_sq is not None:
        _check_shape(next_w_sq, "next_w_sq", (n,), torch.float64, device)
    with _on_device(params):
        return _update(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved,
                       adapt, sums, median, flags, found_inf, _unscale(grad_scale, device), lr, float(momentum), bool(nesterov),
                       float(weight_decay), float(eps), float(trust_coefficient), float(curvature_ema),
                       max_ratio, float(fallback_trust), bool(lag), bool(approx_median), next_w_sq)


def _update(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved, adapt,
            sums, median, flags, found_inf, unscale, lr, momentum, nesterov, weight_decay, eps, trust_coefficient,
            curvature_ema, max_ratio, fallback_trust, lag, approx_median, next_w_sq) -> Tensor:
    from ..kernels import reduce as kr
    from ..kernels import update as ku
    from ..kernels.chunks import chunk_plans, pointer_table
    n, device = len(params), params[0].device
    stashed = [lag and bool(v) for v in lagged_valid]
    w_t = [saved[i] if saved and saved[i] is not None else p for i, p in enumerate(params)]
    plans = chunk_plans(params, CHUNK)
    schedule = _schedule(approx_median, params, grads) if rule == "mclr" else None
    one_pass = rule == "mclr" and lag and len(schedule) == 1
    stashed_vector = _vector(stashed, device, torch.bool)
    measured = flags[:, FLAG_MEASURED]
    norms_known, median_known = flags[:, FLAG_NORMS], flags[:, FLAG_MEDIAN]
    w2, g2, m = sums[:, SUM_W2], sums[:, SUM_G2], median

    # What the ratio needs before anything is written and the reduction left out (never for
    # one of this module's: the layers without norms or median are those whose stash gives
    # the ratio, and the update pass measures them for the next stash).
    if not _made_here_for(flags, (rule, lag, approx_median, tuple(stashed), one_pass)) and (
            not all(stashed) or (rule == "mclr" and not one_pass)):
        need_norms = ~norms_known & ~stashed_vector
        measure = None
        if rule == "mclr":
            wanted = (~stashed_vector if one_pass else torch.ones_like(measured)) if lag else measured
            need_median = ~median_known & wanted
            measure = need_median.to(torch.uint8)
        modes = need_norms.to(torch.uint8) * (kr.MODE_W2.value | kr.MODE_G2.value)
        part, pre_median = _pass_one(pointer_table([w_t, grads]), plans, n, device, modes, measure, schedule,
                                     weight_decay, secant=False, unscale=unscale)
        w2 = torch.where(norms_known, w2, part[:, kr.P_W2.value])
        g2 = torch.where(norms_known, g2, part[:, kr.P_G2.value])
        norms_known = norms_known | need_norms
        if rule == "mclr":
            m = torch.where(median_known, m, pre_median)
            median_known = median_known | need_median

    def inputs(w2, g2, m):
        """(‖w‖, ‖g‖, κ) [L, 3] of the step's inputs."""
        w_norm, g_norm = lm.norm_from_sum(w2), lm.norm_from_sum(g2)
        kappa = lm.reduction_kappa(rule, w_norm, g_norm, sums[:, SUM_DIFF2], sums[:, SUM_STEP2], m, weight_decay,
                                   eps)
        return torch.stack([w_norm, g_norm, kappa], dim=1)

    current = inputs(w2, g2, m)
    # lag=1: the ratio uses ‖w‖, ‖g‖ and κ of the previous step's inputs.
    stash = _stack_rows(lagged) if lag else None
    source = torch.where(stashed_vector[:, None], stash, current) if any(stashed) else current
    w_norm, g_norm, kappa = source.unbind(1)
    kappa_bar, age = _stack(kappas), _stack(ages)
    ratio, new_bar, used, fallback = lm.layer_ratio(
        kappa, measured, kappa_bar, w_norm, g_norm, _vector(adapt, device, torch.bool),
        trust_coefficient=trust_coefficient, curvature_ema=curvature_ema, max_ratio=max_ratio,
        weight_decay=weight_decay, eps=eps, fallback_trust=fallback_trust)
    alpha = lm.layer_alpha(ratio, lr.to(device=device, dtype=torch.float32).reshape(()))

    skip = found_inf.to(device=device, dtype=torch.bool).reshape(())
    median_in_update = one_pass and any(stashed)
    (shift, bits), = schedule if median_in_update else ((0, 1),)
    hist = torch.zeros((n, 1 << bits), dtype=torch.int32, device=device) if median_in_update else None
    momentum_on, store_step = bool(momentum_buffers), bool(prev_steps)
    written = list(params) + list(momentum_buffers) + list(prev_steps)
    # The kernel writes through raw pointers: tell autograd, as torch's in-place ops do (also on
    # a skipped step, which the host does not know of without a sync).
    torch.autograd.graph.increment_version(written)
    ptrs = pointer_table([params, w_t, grads, momentum_buffers or [None] * n, prev_steps or [None] * n])
    part = _layer_sums(ku.momentum_update_kernel, plans, n, ku.UPDATE_PARTIALS.value, device, ptrs, alpha.float(),
                       skip.to(torch.uint8), hist, weight_decay, momentum, unscale, MOMENTUM=momentum_on, NESTEROV=nesterov,
                       STORE_STEP=store_step, FROM_SAVED=any(w is not p for w, p in zip(w_t, params)),
                       INPUT_NORMS=any(stashed), INPUT_HIST=median_in_update, NEXT_W2=next_w_sq is not None,
                       SHIFT=shift, BITS=bits)
    step_norm = lm.norm_from_sum(part[:, ku.U_S2.value])  # 0 on a skipped step: nothing was read

    torch._foreach_copy_(kappas, list(torch.where(skip, kappa_bar, new_bar).unbind()))
    torch._foreach_copy_(ages, list(torch.where(skip, age, lm.next_age(age, measured)).unbind()))
    if lag:
        # The stash: this step's inputs, as the reduction had them or as the update pass read them.
        w2 = torch.where(norms_known, w2, part[:, ku.U_W2.value])
        g2 = torch.where(norms_known, g2, part[:, ku.U_G2.value])
        if median_in_update:
            prefix, rank, count = _selection_state(n, device)
            _select(hist, prefix, rank, count, shift, bits, first=True)
            in_update = _median_value(prefix, count, part[:, ku.U_H_NAN.value], stashed_vector)
            m = torch.where(median_known, m, in_update)
        torch._foreach_copy_(lagged, list(torch.where(skip, stash, inputs(w2, g2, m)).unbind()))
    if next_w_sq is not None:
        next_w_sq.copy_(torch.where(skip, next_w_sq, part[:, ku.U_NEXT_W2.value]))
    return torch.stack([w_norm, g_norm, step_norm, used, ratio, alpha, fallback.double()], dim=1)


def _stack_rows(lagged: list) -> Tensor:
    """[L, 3] of the stash tensors."""
    return torch.stack([t.reshape(3) for t in lagged])


# ------------------------------------------------------- CBLR probe primitives

def _copy(dst: list, src: list) -> None:
    from ..kernels import closure as kc
    from ..kernels.chunks import chunk_plans, pointer_table
    torch.autograd.graph.increment_version(dst)  # written through raw pointers
    ptrs = pointer_table([dst, src])
    for plan in chunk_plans(src, CHUNK):
        _launch(kc.copy_kernel, plan, ptrs, len(src))


def probe_shift_(params, steps, saved, displacements):
    """saved ← w, then w ← w + s_{t−1} (s rounded to w's dtype first, like the reference),
    displacements ← the realised (w + s) − w, in one pass that also sums Σw_t² per layer:
    returned as [L] fp64."""
    from ..kernels import closure as kc
    from ..kernels.chunks import chunk_plans, pointer_table
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    _check_lengths(n, {}, dict(steps=steps, saved=saved, displacements=displacements))
    if n == 0:
        return torch.zeros((0,), dtype=torch.float64, device=device)
    _check(params, "parameter")
    _check_fp32_like(steps, params, "step")
    _check_fp32_like(displacements, params, "displacement")
    if any(s is None for s in list(steps) + list(saved) + list(displacements)):
        raise ValueError("triton backend: the shift needs a step, a save buffer and a displacement buffer for "
                         "every parameter")
    _check(saved, "save buffer", like=params)
    with _on_device(params):
        # written through raw pointers
        torch.autograd.graph.increment_version(list(saved) + list(params) + list(displacements))
        w_sq = _layer_sums(kc.shift_kernel, chunk_plans(params, CHUNK), n, 1, device,
                           pointer_table([params, steps, saved, displacements]))
        return w_sq[:, 0]


def probe_restore_(params, saved):
    """w ← saved, bit-exactly."""
    _check_lengths(len(params), {}, dict(saved=saved))
    if not params:
        return
    _check(params, "parameter")
    if any(s is None for s in saved):
        raise ValueError("triton backend: the restore needs a saved copy for every parameter")
    _check(saved, "saved parameter", like=params)
    with _on_device(params):
        _copy(params, saved)


# ------------------------------------------------------------ the Adam base

def _check_adam(params, grads, exp_avgs, exp_avg_sqs, steps, clip, device) -> None:
    """The inputs both Adam passes read: m and v fp32 with their parameter's layout, one
    fp32 step count per layer, the clip divisor a one-element fp32 tensor."""
    n = len(params)
    _check(params, "parameter")
    _check_lengths(n, {}, dict(gradients=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps))
    _check(grads, "gradient", like=params)
    if any(t is None for t in list(exp_avgs) + list(exp_avg_sqs)):
        raise ValueError("triton backend: every parameter needs its exp_avg and exp_avg_sq")
    _check_fp32_like(exp_avgs, params, "exp_avg")
    _check_fp32_like(exp_avg_sqs, params, "exp_avg_sq")
    _check_small(steps, "step count", 1, device, torch.float32)
    if clip is not None:
        _check_shape(clip.reshape(-1), "the clip divisor", (1,), torch.float32, device)


def _adam_scalars(steps, unscale, clip, beta1, beta2, eps, weight_decay, bias_correction) -> tuple:
    """The kernels' arguments after the pointer table: the layers' bias corrections of this
    step (fp32 [L], from the step counts on the device), 1/S, the clip divisor, the
    hyperparameters (1 − β as the reference rounds it: in fp64, then to fp32)."""
    bc1, bc2 = lm.bias_corrections(_stack(steps), beta1, beta2, bias_correction)
    return (bc1, bc2, unscale, clip, float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps),
            float(weight_decay))


def grad_sq_sums(grads, grad_scale):
    """Σg² of every layer (fp64), g ÷ grad scale (``reference_adam.grad_sq_sums``)."""
    from ..kernels import reduce as kr
    from ..kernels.chunks import chunk_plans, pointer_table
    n = len(grads)
    device = grads[0].device if grads else torch.device("cpu")
    if n == 0:
        return torch.zeros((0,), dtype=torch.float64, device=device)
    _check(grads, "gradient")
    with _on_device(grads):
        # Pass 1 of the SGD base with Σg² alone (w is not read: the gradients fill its role).
        part, _ = _pass_one(pointer_table([grads, grads]), chunk_plans(grads, CHUNK), n, device,
                            _vector([kr.MODE_G2.value] * n, device, torch.uint8), None, None, 0.0, secant=False,
                            unscale=_unscale(grad_scale, device))
        return part[:, kr.P_G2.value]


def adam_reduce(rule, params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, clip, beta1, beta2, eps,
                weight_decay, bias_correction):
    """Pass 1 (``reference_adam.adam_reduce``): Σw², Σu² (in the SUM_G2 column), with
    rule "mclr" the median of |u_i|/|w_i|, and the non-finite flags of g, of every layer;
    writes nothing."""
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    if n == 0:
        return (torch.zeros((0, SUM_COLUMNS), dtype=torch.float64, device=device),
                torch.zeros((0,), dtype=torch.float32, device=device),
                torch.zeros((0, FLAG_COLUMNS), dtype=torch.bool, device=device))
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, steps, clip, device)
    with _on_device(params):
        scalars = _adam_scalars(steps, _unscale(grad_scale, device), clip, beta1, beta2, eps, weight_decay,
                                bias_correction)
        sums, median, flags = _adam_reduce(rule, params, grads, exp_avgs, exp_avg_sqs, steps, scalars)
        _remember(flags, ("adam", rule))
        return sums, median, flags


def _adam_reduce(rule, params, grads, exp_avgs, exp_avg_sqs, steps, scalars) -> tuple:
    from ..kernels import adam as ka
    from ..kernels.chunks import chunk_plans, pointer_table
    n, device = len(params), params[0].device
    plans = chunk_plans(params, CHUNK)
    ptrs = pointer_table([params, grads, exp_avgs, exp_avg_sqs, steps])
    clip_on = scalars[3] is not None

    def stats_pass(hist, prefix, shift, bits):
        return _layer_sums(ka.adam_stats_kernel, plans, n, ka.STATS_PARTIALS.value, device, ptrs, hist, prefix,
                           *scalars, CLIP=clip_on, STATS=True, HIST=hist is not None, FILTER=False, SHIFT=shift,
                           BITS=bits)

    def hist_pass(plan, hist, prefix, shift, bits):
        _launch(ka.adam_stats_kernel, plan, ptrs, n, None, hist, prefix, *scalars, CLIP=clip_on, STATS=False,
                HIST=True, FILTER=True, SHIFT=shift, BITS=bits)

    every = _vector([True] * n, device, torch.bool)
    if rule == "mclr":  # the exact median of every layer, as the reference takes it
        part, prefix, count = _radix_median(plans, n, device, _schedule(False, params, grads), stats_pass,
                                            hist_pass)
        median = _median_value(prefix, count, part[:, ka.A_H_NAN.value], every)
    else:
        part = stats_pass(None, None, 0, 1)
        median = torch.zeros((n,), dtype=torch.float32, device=device)
    zeros = torch.zeros((n,), dtype=torch.float64, device=device)
    sums = torch.stack([part[:, ka.A_W2.value], part[:, ka.A_U2.value], zeros, zeros], dim=1)
    flags = torch.stack([every, every, every if rule == "mclr" else ~every, part[:, ka.A_NONFINITE.value] > 0],
                        dim=1)
    return sums, median, flags


def adam_secant_sums(params, grads, probe_grads, probe_steps, exp_avg_sqs, steps, grad_scale, clip, beta2, eps,
                     bias_correction):
    """CBLR on the Adam direction (``reference_adam.adam_secant_sums``): Σ((g − g_s)/(√v̂ + ε))²
    and Σs² of every layer, [L, 2] fp64, in one launch per dtype; writes nothing."""
    from ..kernels import adam as ka
    from ..kernels.chunks import chunk_plans, pointer_table
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    if n == 0:
        return torch.zeros((0, 2), dtype=torch.float64, device=device)
    _check(params, "parameter")
    _check_lengths(n, {}, dict(gradients=grads, probe_gradients=probe_grads, probe_steps=probe_steps,
                               exp_avg_sqs=exp_avg_sqs, steps=steps))
    _check(grads, "gradient", like=params)
    _check(probe_grads, "probe gradient", like=params)
    _check_fp32_like(probe_steps, params, "probe step")
    _check_fp32_like(exp_avg_sqs, params, "exp_avg_sq")
    _check_small(steps, "step count", 1, device, torch.float32)
    if clip is not None:
        _check_shape(clip.reshape(-1), "the clip divisor", (1,), torch.float32, device)
    with _on_device(params):
        bc2 = lm.bias_corrections(_stack(steps), 0.0, beta2, bias_correction)[1]
        ptrs = pointer_table([grads, probe_grads, probe_steps, exp_avg_sqs])
        return _layer_sums(ka.adam_secant_kernel, chunk_plans(params, CHUNK), n, ka.SECANT_PARTIALS.value, device,
                           ptrs, bc2, _unscale(grad_scale, device), clip, float(beta2), 1.0 - beta2, float(eps),
                           CLIP=clip is not None)


def adam_update_(rule, params, grads, exp_avgs, exp_avg_sqs, steps, adapt, sums, median, flags, found_inf,
                 grad_scale, clip, lr, beta1, beta2, eps, weight_decay, bias_correction, trust_coefficient,
                 max_ratio):
    """Pass 2 (``reference_adam.adam_update_``): the ratio (``layer_math.adam_ratio``) from
    the reduction, completed by a pass of its own where it left out the norms or the
    median (a reduction made elsewhere), then w ← w − γ·r·u, m, v and the step count in
    one launch; nothing is written when ``found_inf``."""
    n = len(params)
    device = params[0].device if params else torch.device("cpu")
    if n == 0:
        return torch.zeros((0, STAT_COLUMNS), dtype=SCALAR_DTYPE, device=device)
    _check_adam(params, grads, exp_avgs, exp_avg_sqs, steps, clip, device)
    _check_lengths(n, {}, dict(adapt=adapt))
    _check_shape(sums, "the reduction's sums", (n, SUM_COLUMNS), torch.float64, device)
    _check_shape(median, "the reduction's median", (n,), torch.float32, device)
    _check_shape(flags, "the reduction's flags", (n, FLAG_COLUMNS), torch.bool, device)
    with _on_device(params):
        return _adam_update(rule, params, grads, exp_avgs, exp_avg_sqs, steps, adapt, sums, median, flags,
                            found_inf, _unscale(grad_scale, device), clip, lr, beta1, beta2, eps, weight_decay,
                            bias_correction, float(trust_coefficient), max_ratio)


def _adam_update(rule, params, grads, exp_avgs, exp_avg_sqs, steps, adapt, sums, median, flags, found_inf,
                 unscale, clip, lr, beta1, beta2, eps, weight_decay, bias_correction, trust_coefficient,
                 max_ratio) -> Tensor:
    from ..kernels import adam as ka
    from ..kernels.chunks import chunk_plans, pointer_table
    n, device = len(params), params[0].device
    scalars = _adam_scalars(steps, unscale, clip, beta1, beta2, eps, weight_decay, bias_correction)
    w2, u2 = sums[:, SUM_W2], sums[:, SUM_G2]
    if not _made_here_for(flags, ("adam", rule)):
        fresh_sums, fresh_median, _ = _adam_reduce(rule, params, grads, exp_avgs, exp_avg_sqs, steps, scalars)
        norms_known = flags[:, FLAG_NORMS]
        w2 = torch.where(norms_known, w2, fresh_sums[:, SUM_W2])
        u2 = torch.where(norms_known, u2, fresh_sums[:, SUM_G2])
        if rule == "mclr":
            median = torch.where(flags[:, FLAG_MEDIAN], median, fresh_median)
    w_norm, u_norm = lm.norm_from_sum(w2), lm.norm_from_sum(u2)
    ratio, kappa, fallback = lm.adam_ratio(rule, w_norm, u_norm, median, _vector(adapt, device, torch.bool),
                                           trust_coefficient=trust_coefficient, eps=eps, max_ratio=max_ratio)
    alpha = lm.layer_alpha(ratio, lr.to(device=device, dtype=torch.float32).reshape(()))
    skip = found_inf.to(device=device, dtype=torch.bool).reshape(())
    written = list(params) + list(exp_avgs) + list(exp_avg_sqs) + list(steps)
    torch.autograd.graph.increment_version(written)  # the kernel writes through raw pointers
    part = _layer_sums(ka.adam_update_kernel, chunk_plans(params, CHUNK), n, ka.UPDATE_PARTIALS.value, device,
                       pointer_table([params, grads, exp_avgs, exp_avg_sqs, steps]), alpha.float(),
                       skip.to(torch.uint8), *scalars, CLIP=clip is not None)
    # A layer without elements has no chunk to advance its count.
    empty = [s for s, p in zip(steps, params) if p.numel() == 0]
    if empty:
        torch._foreach_copy_(empty, [torch.where(skip, s, s + 1) for s in empty])
    step_norm = lm.norm_from_sum(part[:, ka.A_MOVE2.value])  # 0 on a skipped step: nothing was read
    return torch.stack([w_norm, u_norm, step_norm, kappa, ratio, alpha, fallback.double()], dim=1)


# Where the CUDA extension did not load, these kernels run the ops on CUDA tensors.
if ops.CUDA_LOAD_ERROR is not None and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    ops.register(sys.modules[__name__], "CUDA", "triton")
    ops.register(sys.modules[__name__], "CUDA", "triton", names=ADAM_OPS + ("adam_secant_sums",))
