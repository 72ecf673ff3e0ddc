"""The Python side of the fused C++ CPU backend (its kernels: csrc/, registered for the
CPU dispatch key of the ``cblr_ext`` ops).  It keeps, in the optimizer's scratch dict,
the median passes' workspace and LARS's Σw² as the last update left each parameter.

| hook (``Backend`` calls it) | gives the ops | when |
| --- | --- | --- |
| ``reduce_extras`` | ``workspace``; ``w_sq``/``w_sq_known`` carried from the last update | every pass 1; carried: LARS, lag=0, ``reuse_weight_norm`` |
| ``update_extras`` | ``workspace``; ``next_w_sq`` (what the update writes Σw² of its result into) | every pass 2; ``next_w_sq``: as above, on an applied step |
| ``after_update`` | | keeps the ``next_w_sq`` values for the next step |

The Adam base's ops (``contract.ADAM_OPS``: LAMB) take no hooks: the dispatcher runs their
C++ kernels with the arguments the optimizer gives, and the MCLR median's scratch is the
kernel's own.
"""
from __future__ import annotations

import torch

from .. import ops
from ..contract import state_dtype

_WORKSPACE = "cpp.workspace"
_W_SQ = "cpp.w_sq"  # per parameter: (Σw², version, data_ptr) as the last update left it
_W_SQ_MIN_NUMEL = 65536  # one work chunk of csrc/cpu/layers.h


def kernel_isa() -> str:
    """The instruction-set variant of the C++ passes in use: "baseline", "avx2" or "avx512"
    (the widest this CPU runs, or the one named by the CBLR_EXT_CPU_ISA environment variable)."""
    if ops.LOAD_ERROR is not None:
        raise RuntimeError(f"the C++ extension is not loaded: {ops.LOAD_ERROR}")
    return ops.OPS.cpu_isa()


def workspace(rule: str, params: list, lag: bool, scratch: dict) -> torch.Tensor:
    """The median passes' scratch, reused every step (no pages to fault in again) and freed
    with the optimizer; rules without a median get an empty one."""
    if rule != "mclr":
        return torch.empty(0, dtype=torch.uint8)
    per_element = 2 if lag else 1  # candidates, and all quotients under lag=1
    # Each layer's slice starts 64-byte aligned (csrc/cpu/step_passes.h, MedianPlan).
    needed = per_element * sum(p.numel() * state_dtype(p).itemsize + 64 for p in params)
    buffer = scratch.get(_WORKSPACE)
    if buffer is None or buffer.numel() < needed:
        buffer = scratch[_WORKSPACE] = torch.empty(needed, dtype=torch.uint8)
    return buffer


def carries_w_sq(rule: str, lag: bool, reuse_weight_norm: bool) -> bool:
    """LARS reads w in pass 1 for ‖w‖ alone: the update pass measures it for the next step.
    Not under torch.compile: the carried values are kept on the host, keyed by version
    counters and data pointers, which a traced step cannot read without breaking the graph."""
    return rule == "lars" and not lag and reuse_weight_norm and not torch.compiler.is_compiling()


def _tracked(p: torch.Tensor) -> bool:
    """Whether Σw² of ``p`` is carried to the next step.  Smaller parameters are read
    again: that costs less than tracking them; so are 16-bit ones: their w costs half the
    bytes to read, and summing the update's (converted) result costs the update pass more
    than it saves pass 1 (measured)."""
    return p.numel() >= _W_SQ_MIN_NUMEL and p.element_size() >= 4


def known_w_sq(params: list, scratch: dict):
    """(Σw² per layer, known flags) as the last update left them; unknown where the
    parameter changed since: its version counter moved (an in-place write) or its storage
    is other.  (None, None) when nothing is tracked."""
    left = scratch.get(_W_SQ)
    if not left:
        return None, None
    values, known = [0.0] * len(params), [False] * len(params)
    for i, p in enumerate(params):
        entry = left.get(p)
        if entry is not None and entry[1:] == (p._version, p.data_ptr()):
            values[i], known[i] = entry[0], True
    if not any(known):
        return None, None
    return torch.tensor(values, dtype=torch.float64), known


def next_w_sq(params: list):
    """(the [L] fp64 tensor the update writes Σw² of its result into, tracked flags), or
    (None, None) when no parameter is tracked."""
    tracked = [_tracked(p) for p in params]
    if not any(tracked):
        return None, None
    return torch.empty(len(params), dtype=torch.float64), tracked


def record_w_sq(params: list, w_sq: torch.Tensor, tracked: list, scratch: dict) -> None:
    """Keep Σw² of the update's results, with the versions the update left (read after it)."""
    left = scratch.setdefault(_W_SQ, {})
    for p, value, keep in zip(params, w_sq.tolist(), tracked):
        if keep:
            left[p] = (value, p._version, p.data_ptr())


def reduce_extras(rule: str, params: list, lag: bool, scratch: dict, reuse_weight_norm: bool,
                  w_sq_given: bool) -> dict:
    """``rule``: the rule pass 1 runs; ``w_sq_given``: the caller passes Σw² itself (the probe's)."""
    extras = {"workspace": workspace(rule, params, lag, scratch)}
    if not w_sq_given and carries_w_sq(rule, lag, reuse_weight_norm):
        extras["w_sq"], extras["w_sq_known"] = known_w_sq(params, scratch)
    return extras


def update_extras(rule: str, params: list, lag: bool, scratch: dict, reuse_weight_norm: bool,
                  found_inf: torch.Tensor) -> tuple:
    """(the update's keywords, what ``after_update`` needs: the tracked flags or None)."""
    extras = {"workspace": workspace(rule, params, lag, scratch)}
    tracked = None
    if carries_w_sq(rule, lag, reuse_weight_norm) and not bool(found_inf):  # opt-in, eager only: a host read
        extras["next_w_sq"], tracked = next_w_sq(params)
    return extras, tracked


def after_update(params: list, extras: dict, tracked, scratch: dict) -> None:
    if tracked is not None:
        record_w_sq(params, extras["next_w_sq"], tracked, scratch)
