"""The Triton backend: multi-tensor kernels (``cblr_ext.kernels``), one launch per
pass per dtype of a param group, and the per-layer math on device as [L]
tensors through ``layer_math``.  Nothing is read on the host during a step.

Triton is imported on first use, not with ``cblr_ext``: on the CPU the kernels
run in the Triton interpreter, which ``TRITON_INTERPRET=1`` selects only when
set before triton is imported.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from .. import layer_math as lm
from ..functional import LayerBatch, RED_KAPPA, RED_MEASURED, finish_probe, times_lr

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

def _dense(t: Tensor) -> bool:
    """Elements are the ``numel`` consecutive slots from ``data_ptr`` in some order."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return (t.numel() == 0 or t.is_contiguous()
            or (t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()])))


def _check(tensors: list, what: str, like: list | None = None) -> None:
    """A clear error, before anything is modified, for what the kernels cannot address."""
    for i, t in enumerate(tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"triton backend: {what} {i} has dtype {t.dtype}; supported are "
                             "float32, float16 and bfloat16 (use backend='reference' or 'cpp')")
        if not _dense(t):
            raise ValueError(f"triton backend: {what} {i} is not dense (strides {t.stride()})")
        if like is not None and t.numel() and (t.dtype, t.stride()) != (like[i].dtype, like[i].stride()):
            raise ValueError(f"triton backend: {what} {i} must have the dtype and strides of its "
                             f"parameter ({like[i].dtype}, {like[i].stride()}), got ({t.dtype}, {t.stride()})")


def _check_fp32_like(buffers: list, params: list, what: str) -> None:
    """Optimizer-state tensors (momentum, s_{t−1}): fp32 with their parameter's layout."""
    for i, (buf, p) in enumerate(zip(buffers, params)):
        if buf is not None and (buf.dtype != torch.float32 or buf.shape != p.shape
                                or (p.numel() and buf.stride() != p.stride())):
            raise ValueError(f"triton backend: {what} of layer {i} must be float32 with the "
                             f"parameter's shape and strides")


def _check_state(batch: LayerBatch) -> None:
    for key in ("momentum_buffer", "prev_step"):
        _check_fp32_like([s.get(key) for s in batch.states], batch.params, f"state[{key!r}]")


# ----------------------------------------------------------------- helpers

def _on_tensors_device(fn):
    """Run ``fn`` with the tensors' CUDA device current: Triton launches there."""
    @functools.wraps(fn)
    def wrapper(first, *args):
        tensors = first.params if isinstance(first, LayerBatch) else first
        if tensors and tensors[0].is_cuda:
            with torch.cuda.device(tensors[0].device):
                return fn(first, *args)
        return fn(first, *args)
    return wrapper


_flag_vectors: dict = {}


def _adapt_vector(batch: LayerBatch) -> Tensor:
    """The group's per-layer adapt flags on the device (cached: no copy per step)."""
    from ..kernels.chunks import to_device
    key = (batch.device, tuple(batch.adapt))
    if key not in _flag_vectors:
        _flag_vectors[key] = to_device([int(a) for a in batch.adapt], batch.device).bool()
    return _flag_vectors[key]


def _lag_stash(batch: LayerBatch) -> Tensor:
    """[L, 3] (‖w‖, ‖g‖, κ) of the previous step's inputs (lag=1); NaN rows where none is
    stashed (first step, or a first step that was skipped)."""
    missing = torch.full((3,), float("nan"), device=batch.device)
    return torch.stack([s.get("lagged", missing) for s in batch.states])


def _stack_state(states: list, key: str) -> Tensor:
    return torch.stack([s[key] for s in states])


def _launch(kernel, plan, *args, **constexprs):
    from ..kernels.chunks import CHUNK_WARPS, LAUNCH_OPTIONS, TL_DTYPES
    if plan.n_chunks:
        kernel[(plan.n_chunks,)](plan.chunks, *args, DTYPE=TL_DTYPES[plan.dtype], BLOCK=plan.block,
                                 num_warps=CHUNK_WARPS, **constexprs, **LAUNCH_OPTIONS)


# ------------------------------------------------------------------ pass 1

def _median_passes(batch: LayerBatch) -> tuple:
    from ..kernels import median
    data_bytes = sum(p.numel() * p.element_size() + g.numel() * g.element_size()
                     for p, g in zip(batch.params, batch.grads))
    return median.passes(batch.hp["median"], len(batch), data_bytes)


def _median_in_update(batch: LayerBatch) -> bool:
    """MCLR lag=1 with a one-pass median: the update pass histograms its inputs, the
    next step's κ, so pass 1 reads only g (and w of layers without a stash)."""
    return batch.rule == "mclr" and bool(batch.hp["lag"]) and len(_median_passes(batch)) == 1


def _select(hist: Tensor, prefix: Tensor, rank: Tensor, count: Tensor, shift: int, bits: int,
            first: bool) -> None:
    from ..kernels import median
    from ..kernels.chunks import LAUNCH_OPTIONS
    # One program scans a layer's whole histogram: about 32 bins per thread.
    median.radix_select_kernel[(prefix.numel(),)](hist, prefix, rank, count, SHIFT=shift, BITS=bits, FIRST=first,
                                                  num_warps=min(32, max(4, (1 << bits) // 1024)), **LAUNCH_OPTIONS)


def _median_value(prefix: Tensor, count: Tensor, h_nan: Tensor) -> Tensor:
    """The selected bits as fp32; NaN for no quotient or a NaN one (as ``torch.median``)."""
    missing = (count == 0) | (h_nan > 0)
    return torch.where(missing, torch.full_like(h_nan, float("nan")), prefix.view(torch.float32))


def _selection_state(n: int, device) -> tuple:
    """(prefix, rank, count) int32 vectors of a radix selection."""
    return tuple(torch.zeros(n, dtype=torch.int32, device=device) for _ in range(3))


def _median(batch: LayerBatch, ptrs: Tensor, plans: list, measuring: Tensor, h_nan: Tensor,
            run_first_pass) -> Tensor:
    """Per-layer lower median of the curvature quotients by radix selection; NaN for no
    quotient, a NaN quotient, or a layer not ``measuring`` (its histogram passes read
    nothing).  ``run_first_pass(hist, prefix, measure, shift, bits)`` runs
    pass 1, which also fills the first histogram."""
    from ..kernels import reduce as kr
    n = len(batch)
    measure = measuring.to(torch.uint8)
    prefix, rank, count = _selection_state(n, batch.device)
    for i, (shift, bits) in enumerate(_median_passes(batch)):
        hist = torch.zeros((n, 1 << bits), dtype=torch.int32, device=batch.device)
        if i == 0:
            run_first_pass(hist, prefix, measure, shift, bits)
        else:
            for plan in plans:
                _launch(kr.chunk_stats_kernel, plan, ptrs, n, None, hist, prefix, None, measure,
                        float(batch.hp["weight_decay"]), STATS=False, HIST=True, FILTER=True,
                        SHIFT=shift, BITS=bits)
        _select(hist, prefix, rank, count, shift, bits, first=i == 0)
    return _median_value(prefix, count, h_nan)


@_on_tensors_device
def reduce(batch: LayerBatch) -> Tensor:
    """Pass 1: per layer ‖w‖, ‖g‖, κ, measured, non-finite (see ``reference.reduce``).
    MCLR's κ is NaN where the layer does not measure (it is not used there).  Under
    lag=1, ‖w‖ and ‖g‖ (and LARS's κ) are measured only for layers without a stash
    (NaN elsewhere): the update pass measures them for the next step, so pass 1
    reads just g for the non-finite check (the one-pass variant)."""
    from ..kernels import reduce as kr
    from ..kernels.chunks import chunk_plans, pointer_table, sum_per_layer
    secant = finish_probe(batch, secant_norms, restore) if batch.rule == "cblr" else None
    _check(batch.params, "parameter")
    _check(batch.grads, "gradient", like=batch.params)
    _check_state(batch)
    hp, n, device = batch.hp, len(batch), batch.device
    ptrs = pointer_table([batch.params, batch.grads])
    plans = chunk_plans(batch.params, CHUNK)
    if hp["lag"]:
        norm_rows = torch.isnan(_lag_stash(batch)[:, 0])
    else:
        norm_rows = torch.ones(n, dtype=torch.bool, device=device)
    norm_flags = norm_rows.to(torch.uint8)
    sums = torch.zeros((n, kr.STAT_PARTIALS.value), dtype=torch.float32, device=device)
    adapt = _adapt_vector(batch)
    if batch.rule == "cblr":
        measured = adapt & ~torch.isnan(secant[:, 1])
    else:
        measured = adapt & lm.measurement_due(_stack_state(batch.states, "age"), hp["curvature_interval"])

    def first_pass(hist, prefix, measure, shift, bits):
        for plan in plans:
            partials = torch.empty((plan.n_chunks, kr.STAT_PARTIALS.value), dtype=torch.float32, device=device)
            _launch(kr.chunk_stats_kernel, plan, ptrs, n, partials, hist, prefix, norm_flags,
                    measure, float(hp["weight_decay"]), STATS=True, HIST=hist is not None, FILTER=False,
                    SHIFT=shift, BITS=bits)
            sum_per_layer(plan, partials, sums)

    if batch.rule == "mclr":
        if not hp["lag"]:
            measuring = measured
        elif _median_in_update(batch):
            measuring = norm_rows  # the others' κ was measured by the last update pass
        else:
            # lag=1 stashes κ of every layer (as the reference does) for the next step,
            # which may be due when this one is not.
            measuring = torch.ones_like(adapt)
        median = _median(batch, ptrs, plans, measuring, sums[:, kr.P_H_NAN.value], first_pass)
        kappa = lm.median_kappa(median, hp["eps"])
    else:
        first_pass(None, None, None, 0, 1)
    nan = torch.full((n,), float("nan"), device=device)
    w_norm = torch.where(norm_rows, sums[:, kr.P_W2.value].sqrt(), nan)
    g_norm = torch.where(norm_rows, sums[:, kr.P_G2.value].sqrt(), nan)
    if batch.rule == "lars":
        kappa = lm.lars_kappa(w_norm, g_norm, hp["weight_decay"], hp["eps"])
    elif batch.rule == "cblr":
        kappa = lm.secant_kappa(secant[:, 0], secant[:, 1], hp["eps"])
    nonfinite = sums[:, kr.P_NONFINITE.value] > 0
    return torch.stack([w_norm, g_norm, kappa, measured.float(), nonfinite.float()], dim=1)


# ------------------------------------------------------------------ pass 2

def _state_buffers(batch: LayerBatch, key: str, wanted: bool) -> list:
    """The fp32 per-layer buffers ``state[key]``, created as zeros on first use."""
    if not wanted:
        return [None] * len(batch)
    for p, state in zip(batch.params, batch.states):
        if key not in state:
            state[key] = torch.zeros_like(p, dtype=torch.float32)
    return [state[key] for state in batch.states]


def _stash_lagged(batch: LayerBatch, current: Tensor, stash: Tensor, keep: Tensor) -> None:
    """state["lagged"] ← this step's (‖w‖, ‖g‖, κ) unless the step is skipped (then a
    layer without a stash gets a NaN row, which counts as none)."""
    rows = torch.where(keep, stash, current).unbind()
    stashed = [i for i, s in enumerate(batch.states) if "lagged" in s]
    if stashed:
        torch._foreach_copy_([batch.states[i]["lagged"] for i in stashed], [rows[i] for i in stashed])
    for i, state in enumerate(batch.states):
        if "lagged" not in state:
            state["lagged"] = rows[i].clone()


@_on_tensors_device
def apply(batch: LayerBatch, red: Tensor, found_inf: Tensor) -> Tensor:
    """Pass 2: ratio (on device, ``layer_math``) and the fused update; nothing changes
    when ``found_inf``.  Returns the [L, 7] statistics of ``STAT_NAMES``."""
    from ..kernels import update as ku
    from ..kernels.chunks import chunk_plans, pointer_table, sum_per_layer
    hp, n, device = batch.hp, len(batch), batch.device
    current = red[:, :3]
    if hp["lag"]:
        # lag=1: the ratio uses the previous step's inputs (this step's where none is stashed).
        stash = _lag_stash(batch)
        source = torch.where(torch.isnan(stash[:, :1]), current, stash)
    else:
        source = current
    w_norm, g_norm, kappa = source.unbind(1)
    measured = red[:, RED_MEASURED] > 0
    kappa_bar = _stack_state(batch.states, "kappa")
    age = _stack_state(batch.states, "age")
    ratio, new_bar, used, fallback = lm.layer_ratio(
        kappa, measured, kappa_bar, w_norm, g_norm, _adapt_vector(batch),
        trust_coefficient=hp["trust_coefficient"], curvature_ema=hp["curvature_ema"],
        max_ratio=hp["max_ratio"], weight_decay=hp["weight_decay"], eps=hp["eps"],
        fallback_trust=hp["fallback_trust"])
    alpha = times_lr(ratio, hp["lr"])

    momentum = _state_buffers(batch, "momentum_buffer", batch.uses_momentum)
    steps = _state_buffers(batch, "prev_step", batch.keeps_prev_step)
    # The kernels write through raw pointers: tell autograd, as torch's in-place ops do
    # (also on a skipped step, which the host does not know of without a sync).
    torch.autograd.graph.increment_version([t for t in batch.params + momentum + steps if t is not None])
    ptrs = pointer_table([batch.params, batch.grads, momentum, steps])
    sums = torch.zeros((n, ku.UPDATE_PARTIALS.value), dtype=torch.float32, device=device)
    skip = found_inf.to(device=device, dtype=torch.uint8)
    median_in_update = _median_in_update(batch)
    (shift, bits), = _median_passes(batch) if median_in_update else ((0, 1),)
    hist = torch.zeros((n, 1 << bits), dtype=torch.int32, device=device) if median_in_update else None
    for plan in chunk_plans(batch.params, CHUNK):
        partials = torch.empty((plan.n_chunks, ku.UPDATE_PARTIALS.value), dtype=torch.float32, device=device)
        _launch(ku.momentum_update_kernel, plan, ptrs, n, alpha, skip, partials, hist, float(hp["weight_decay"]),
                float(hp["momentum"]), MOMENTUM=batch.uses_momentum, NESTEROV=bool(hp["nesterov"]),
                STORE_STEP=batch.keeps_prev_step, INPUT_NORMS=bool(hp["lag"]), INPUT_HIST=median_in_update,
                SHIFT=shift, BITS=bits)
        sum_per_layer(plan, partials, sums)
    step_norm = sums[:, ku.U_S2.value].sqrt()  # 0 on a skipped step: the kernel read nothing

    keep = found_inf.to(device)
    torch._foreach_copy_([s["kappa"] for s in batch.states], list(torch.where(keep, kappa_bar, new_bar)))
    torch._foreach_copy_([s["age"] for s in batch.states],
                         list(torch.where(keep, age, lm.next_age(age, measured))))
    if hp["lag"]:
        in_w, in_g = sums[:, ku.U_W2.value].sqrt(), sums[:, ku.U_G2.value].sqrt()
        if batch.rule == "lars":
            in_kappa = lm.lars_kappa(in_w, in_g, hp["weight_decay"], hp["eps"])
        elif median_in_update:
            prefix, rank, count = _selection_state(n, device)
            _select(hist, prefix, rank, count, shift, bits, first=True)
            in_kappa = lm.median_kappa(_median_value(prefix, count, sums[:, ku.U_H_NAN.value]), hp["eps"])
        else:
            in_kappa = red[:, RED_KAPPA]
        _stash_lagged(batch, torch.stack([in_w, in_g, in_kappa], dim=1), stash, keep)
    return torch.stack([w_norm, g_norm, step_norm, used, ratio, alpha, fallback.float()], dim=1)


# ------------------------------------------------------- CBLR closure protocol

def _copy(dst: list, src: list) -> None:
    from ..kernels import closure as kc
    from ..kernels.chunks import chunk_plans, pointer_table
    if not src:
        return
    torch.autograd.graph.increment_version(dst)  # written through raw pointers
    ptrs = pointer_table([dst, src])
    for plan in chunk_plans(src, CHUNK):
        _launch(kc.copy_kernel, plan, ptrs, len(src))


@_on_tensors_device
def restore(dst: list, src: list) -> None:
    _check(src, "saved tensor", like=dst)
    _copy(dst, src)


@_on_tensors_device
def shift(params: list, steps: list, saved: list) -> None:
    """saved ← w, then w ← w + s_{t−1} (s rounded to w's dtype first, like the reference)."""
    from ..kernels import closure as kc
    from ..kernels.chunks import chunk_plans, pointer_table
    _check(params, "parameter")
    _check_fp32_like(steps, params, "step")
    _check(saved, "save buffer", like=params)
    if not params:
        return
    _copy(saved, params)
    torch.autograd.graph.increment_version(params)
    ptrs = pointer_table([params, steps])
    for plan in chunk_plans(params, CHUNK):
        _launch(kc.shift_kernel, plan, ptrs, len(params))


@_on_tensors_device
def secant_norms(params: list, g_t: list, g_p: list, steps: list, weight_decay: float) -> Tensor:
    """Per layer (‖d(w_t) − d(w_t + s)‖, ‖s‖), d = g + β·w: [L, 2] fp32 (params: the
    parameters' dtypes, not read)."""
    from ..kernels import closure as kc
    from ..kernels.chunks import chunk_plans, pointer_table, sum_per_layer
    for what, tensors in (("gradient", g_t), ("probe gradient", g_p)):
        _check(tensors, what, like=params)
    _check_fp32_like(steps, params, "step")
    n, device = len(params), params[0].device
    ptrs = pointer_table([g_t, g_p, steps])
    sums = torch.zeros((n, kc.SECANT_PARTIALS.value), dtype=torch.float32, device=device)
    for plan in chunk_plans(params, CHUNK):
        partials = torch.empty((plan.n_chunks, kc.SECANT_PARTIALS.value), dtype=torch.float32, device=device)
        _launch(kc.secant_partials_kernel, plan, ptrs, n, partials, float(weight_decay))
        sum_per_layer(plan, partials, sums)
    return sums.sqrt()
