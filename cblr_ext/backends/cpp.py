"""The fused C++ CPU backend: every pass is one multi-tensor op over all layers of a
param group (``torch.ops.cblr_ext``, csrc/), the layer math shared with the CUDA
kernels through csrc/layer_math.h.

This module packs a ``LayerBatch`` into tensor lists and flags, creates the state
tensors the ops write into (momentum buffers, ``prev_step``, ``lagged``), and keeps,
in the optimizer's workspace, the median scratch and LARS's ‖w‖ from the last update.
"""
from __future__ import annotations

import math

import torch

from ..functional import LayerBatch, lr_value, prev_step, state_dtype

name = "cpp"

_ops = None


def _load():
    global _ops
    if _ops is None:
        from .. import ops  # noqa: F401  (loads or JIT-builds the extension)
        _ops = torch.ops.cblr_ext
    return _ops


def available(device: torch.device):
    if device.type != "cpu":
        return "the cpp backend runs on CPU tensors only"
    try:
        _load()
    except Exception as exc:  # a failed JIT build is a reason, not a crash
        return f"the C++ extension could not be loaded or built: {exc}"
    return True


def kernel_isa() -> str:
    """The instruction-set variant of the C++ passes in use: "baseline", "avx2" or "avx512"
    (the widest this CPU runs, or the one named by the CBLR_EXT_CPU_ISA environment variable)."""
    return _load().cpu_isa()


def _lagged_valid(batch: LayerBatch) -> list:
    """Per layer: does state["lagged"] hold a stash from an earlier step (lag=1)?"""
    if not batch.hp["lag"]:
        return [False] * len(batch)
    return [("lagged" in s) for s in batch.states]


_NO_SCRATCH = torch.empty(0, dtype=torch.uint8)


def _workspace(batch: LayerBatch):
    """The median passes' scratch, kept in the optimizer's workspace: reused every step
    (no pages to fault in again) and freed with the optimizer. Rules without a median get
    an empty one, not None: inductor (torch 2.13) mis-lowers reduce when its only mutable
    argument is None."""
    if batch.rule != "mclr":
        return _NO_SCRATCH
    per_element = 2 if batch.hp["lag"] else 1  # candidates, and all quotients under lag=1
    # Each layer's slice starts 64-byte aligned (csrc/cpu/step_passes.h, MedianPlan).
    needed = per_element * sum(p.numel() * state_dtype(p).itemsize + 64 for p in batch.params)
    buffer = batch.workspace.get(name)
    if buffer is None or buffer.numel() < needed:
        buffer = batch.workspace[name] = torch.empty(needed, dtype=torch.uint8)
    return buffer


# Workspace entry: per parameter, (‖w‖, version, data_ptr) as the last update left it.
_W_NORMS = "cpp.w_norms"
_W_NORM_MIN_NUMEL = 65536  # one work chunk of csrc/cpu/layers.h


def _tracks_w_norm(p: torch.Tensor) -> bool:
    """Whether ‖w‖ of ``p`` is carried to the next step.  Smaller parameters are read
    again: that costs less than tracking them; so are 16-bit ones: their w costs half the
    bytes to read, and summing the update's (converted) result costs the update pass more
    than it saves pass 1 (measured)."""
    return p.numel() >= _W_NORM_MIN_NUMEL and p.element_size() >= 4


def _carries_w_norm(batch: LayerBatch) -> bool:
    """LARS reads w in pass 1 for ‖w‖ alone: the update pass measures it for the next step."""
    return batch.rule == "lars" and not batch.hp["lag"] and batch.hp.get("reuse_weight_norm", False)


def _known_w_norms(batch: LayerBatch):
    """‖w‖ per layer as the last update left it; NaN where unknown, or where the parameter
    changed since: its version counter moved (an in-place write) or its storage is other."""
    if not _carries_w_norm(batch):
        return None
    left = batch.workspace.get(_W_NORMS)
    if not left:  # nothing tracked (yet)
        return None
    values = [math.nan] * len(batch)
    for i, p in enumerate(batch.params):
        entry = left.get(p)  # only tracked parameters have one
        if entry is not None and entry[1:] == (p._version, p.data_ptr()):
            values[i] = entry[0]
    return torch.tensor(values, dtype=torch.float32)


def _probe_w_norms(batch: LayerBatch) -> torch.Tensor:
    """‖w_t‖ per layer as the shift measured it (NaN where not shifted)."""
    probe = batch.probe
    values = torch.full((len(batch),), math.nan, dtype=torch.float32)
    shifted = [i for i, w in enumerate(probe.saved) if w is not None]
    if shifted:
        values[shifted] = probe.w_norms
    return values


def reduce(batch: LayerBatch) -> torch.Tensor:
    """Pass 1; on a CBLR re-measure step it measures the secant from g_t, the probe
    gradient and s alone (‖w_t‖ is the shift's): the parameters stay at the probe point,
    and ``apply`` updates them from the saved w_t."""
    hp = batch.hp
    probe_grads, steps, w_norms = [], [], _known_w_norms(batch)
    if batch.probe is not None:
        probe_grads = batch.probe.grads
        steps = [prev_step(batch, i) if g is not None else None for i, g in enumerate(probe_grads)]
        w_norms = _probe_w_norms(batch)
    return _load().reduce(
        batch.rule, batch.params, batch.grads, [s["age"] for s in batch.states], batch.adapt,
        _lagged_valid(batch), probe_grads, steps, float(hp["weight_decay"]), float(hp["eps"]),
        int(hp["curvature_interval"]), bool(hp["lag"]), hp["median"] == "approx",
        bool(hp.get("skip_nonfinite", True)), _workspace(batch), w_norms)


def _state_tensors(batch: LayerBatch, key: str, make, keep: bool) -> list:
    """state[key] of every layer; where missing, ``make(param)``, stored in the state if
    ``keep``.  A kept tensor laid out unlike its parameter (state loaded from a contiguous
    model now channels_last, say) is copied into the parameter's layout and kept so: the
    passes read both as flat memory, and a group must not fail after others were updated."""
    out = []
    for p, state in zip(batch.params, batch.states):
        tensor = state.get(key)
        if tensor is None:
            tensor = make(p)
            if keep:
                state[key] = tensor
        elif tensor.stride() != p.stride() and tensor.shape == p.shape:
            tensor = state[key] = torch.empty_like(p, dtype=tensor.dtype).copy_(tensor)
        out.append(tensor)
    return out


def apply(batch: LayerBatch, red: torch.Tensor, found_inf: torch.Tensor) -> torch.Tensor:
    """Pass 2; a CBLR probe's shifted parameters are updated from the saved w_t (restored
    to it when the step is skipped), which clears ``batch.probe``."""
    hp = batch.hp
    lagged_valid = _lagged_valid(batch)
    # A skipped step creates no state, as in the reference (found_inf lives on the CPU).
    skip = bool(found_inf)
    momentum_buffers, prev_steps, lagged = [], [], []
    if batch.uses_momentum and not skip:
        momentum_buffers = _state_tensors(
            batch, "momentum_buffer", lambda p: torch.zeros_like(p, dtype=state_dtype(p)), True)
    if batch.keeps_prev_step and not skip:
        prev_steps = _state_tensors(
            batch, "prev_step", lambda p: torch.empty_like(p, dtype=state_dtype(p)), True)
    if hp["lag"]:  # the stash of a layer without one is only read after this step writes it
        lagged = _state_tensors(batch, "lagged", lambda p: torch.empty(3, dtype=torch.float32), not skip)
    tracked = [_tracks_w_norm(p) for p in batch.params] if _carries_w_norm(batch) and not skip else []
    next_w_norms = torch.empty(len(batch), dtype=torch.float32) if any(tracked) else None
    stats = _load().apply(
        batch.rule, batch.params, batch.grads, momentum_buffers, prev_steps,
        [s["kappa"] for s in batch.states], [s["age"] for s in batch.states], lagged,
        [] if batch.probe is None else batch.probe.saved, batch.adapt,
        lagged_valid, red, found_inf, lr_value(hp["lr"], batch.device),
        float(hp["momentum"]), bool(hp["nesterov"]), float(hp["weight_decay"]), float(hp["eps"]),
        float(hp["trust_coefficient"]), float(hp["curvature_ema"]),
        None if hp["max_ratio"] is None else float(hp["max_ratio"]), float(hp["fallback_trust"]),
        int(hp["curvature_interval"]), bool(hp["lag"]), hp["median"] == "approx", _workspace(batch), next_w_norms)
    batch.probe = None
    if next_w_norms is not None:  # versions read after the op's writes
        left = batch.workspace.setdefault(_W_NORMS, {})
        for p, norm, keep in zip(batch.params, next_w_norms.tolist(), tracked):
            if keep:
                left[p] = (norm, p._version, p.data_ptr())
    return stats


def shift(params: list, steps: list, saved: list):
    """saved ← w and w ← w + s_{t−1}, in one pass that also measures ‖w_t‖ (returned,
    per layer, for ``reduce``)."""
    if params:
        return _load().shift(params, steps, saved)
    return None


def restore(dst: list, src: list) -> None:
    if dst:
        _load().restore(dst, src)
