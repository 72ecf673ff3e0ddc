"""The backends a user may name (``backend=``), and which kernels they run.

``"auto"`` calls the ops through the torch dispatcher, which picks the kernel the
parameters' device registered (``cblr_ext.ops``).  A named backend calls its own
implementation of the same ops directly: ``reference`` on any device (for
debugging), ``triton`` on CPU tensors in the Triton interpreter, or on CUDA tensors
when the CUDA extension owns the CUDA key.  Everything here is resolved once per
(name, device type), when a param group is added (``prepare``), never per step.

| backend | devices | kernels | updates a probe from the saved w_t |
| --- | --- | --- | --- |
| reference | any | ``backends/reference.py`` (``torch.ops.cblr_ext_reference``) | no: restored before pass 1 |
| cpp | cpu | csrc/ (``TORCH_LIBRARY_IMPL(cblr_ext, CPU)``) | yes |
| triton | cuda (cpu: ``TRITON_INTERPRET=1``) | ``backends/triton.py`` + ``cblr_ext.kernels`` | no |
| cuda | cuda (fp32, fp16, bf16) | csrc/cuda/ (``cblr_ext._C_cuda``, ``TORCH_LIBRARY_IMPL(cblr_ext, CUDA)``) | yes |
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

from .. import ops
from ..contract import ADAM_OPS
from . import cpp, reference, reference_adam, triton  # noqa: F401 (they register their kernels on import)

NAMES = ("reference", "cpp", "triton", "cuda")
# Fastest first, per device type.
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


class BackendUnavailable(RuntimeError):
    """A backend that is not built or cannot run on the parameters' device."""


def _any_layout(t: torch.Tensor) -> bool:
    """The reference kernels' layouts: any strides (they are torch ops)."""
    return True


@dataclass(frozen=True)
class Backend:
    """A resolved backend: ``ops`` has the four ops' functions (``torch.ops.cblr_ext`` when
    the dispatcher picks); ``hooks`` the backend's Python side for what only its kernels
    take (scratch kept between steps, values carried from one step to the next), or None.
    The optimizer asks for these through the methods below, never by the backend's name."""

    name: str
    ops: Any
    updates_from_saved: bool
    hooks: Any = None
    # Whether the kernels address a tensor where it lies; the optimizer steps any other
    # parameter on a dense copy, written back after the update.
    takes_layout: Callable[[torch.Tensor], bool] = _any_layout

    def reduce_extras(self, rule: str, params: list, lag: bool, scratch: dict, reuse_weight_norm: bool,
                      w_sq_given: bool) -> dict:
        """Keywords of ``layerwise_reduce`` that this backend adds (``rule``: the one pass 1 runs)."""
        if self.hooks is None:
            return {}
        return self.hooks.reduce_extras(rule, params, lag, scratch, reuse_weight_norm, w_sq_given)

    def update_extras(self, rule: str, params: list, lag: bool, scratch: dict, reuse_weight_norm: bool,
                      found_inf: torch.Tensor) -> tuple:
        """(keywords of ``layerwise_update_`` that this backend adds, what ``after_update`` takes)."""
        if self.hooks is None:
            return {}, None
        return self.hooks.update_extras(rule, params, lag, scratch, reuse_weight_norm, found_inf)

    def after_update(self, params: list, extras: dict, carried, scratch: dict) -> None:
        if self.hooks is not None:
            self.hooks.after_update(params, extras, carried, scratch)


def _reason(name: str, device: torch.device) -> Optional[str]:
    """Why ``name`` cannot run on ``device``, or None."""
    if name == "reference":
        return None
    if name == "cpp":
        if device.type != "cpu":
            return "the cpp backend runs on CPU tensors only"
        if ops.LOAD_ERROR is not None:
            return f"the C++ extension could not be loaded or built: {ops.LOAD_ERROR}"
        missing = [op for op in ("layerwise_reduce", *ADAM_OPS)
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{op}", "CPU")]
        if missing:
            return f"the C++ extension loaded but registers no CPU kernels of {', '.join(missing)} (a stale build?)"
        return None
    if name == "triton":
        reason = triton.available(device)
        return None if reason is True else reason
    if name == "cuda":
        if device.type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if ops.cuda_kernels() != "cuda":
            return f"the CUDA extension is not loaded: {ops.CUDA_LOAD_ERROR}"
        if not ops.cuda_kernels_registered():
            return "the CUDA extension loaded but registers no CUDA kernels (a stale build?)"
        missing = [op for op in ADAM_OPS
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{op}", "CUDA")]
        if missing:
            return f"the CUDA extension loaded but registers no CUDA kernels of {', '.join(missing)} (a stale build?)"
        return None
    raise ValueError(f"unknown cblr_ext backend {name!r} (choose from auto, {', '.join(NAMES)})")


def _dense_any_order(t: torch.Tensor) -> bool:
    """The C++/CUDA kernels' layouts: dense memory, no gaps or overlaps, in any order."""
    return t.is_contiguous() or t.numel() == 0 or is_non_overlapping_and_dense(t)


def _make(name: str, device: torch.device) -> Backend:
    if name == "reference":  # the reference kernels as opaque ops (one graph node each)
        return Backend(name, ops.REFERENCE_OPS, updates_from_saved=False)
    if name == "cpp":
        return Backend(name, ops.OPS, updates_from_saved=True, hooks=cpp, takes_layout=_dense_any_order)
    if name == "cuda":  # the dispatcher runs csrc/cuda/: pass 1 takes Σw_t² from the shift
        return Backend(name, ops.OPS, updates_from_saved=True, takes_layout=_dense_any_order)
    # The dispatcher runs the Triton kernels on CUDA when they own the CUDA key; else (the
    # CUDA extension owns it, or the interpreter on the CPU) they are called directly.
    on_dispatcher = device.type == "cuda" and ops.cuda_kernels() == "triton"
    return Backend(name, ops.OPS if on_dispatcher else triton, updates_from_saved=False,
                   takes_layout=triton.dense)


_resolved: dict = {}  # (name, device type) -> (Backend, why "auto" fell back to the reference, or None)
_warned: set = set()


def get(name: str, device) -> Backend:
    """The backend ``name`` runs on ``device``; ``BackendUnavailable`` when it cannot.
    A cached resolution is a dict lookup, which torch.compile traces; resolving is not
    (dispatcher queries, imports): ``prepare`` does it when a param group is added."""
    device = torch.device(device)
    key = (name, device.type)
    if key not in _resolved:
        _resolved[key] = _resolve(name, device)
    backend, fallback = _resolved[key]
    if fallback is not None and device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(f"cblr_ext: no fused backend available on {device.type}, using 'reference' ({fallback})",
                      RuntimeWarning, stacklevel=5)
    return backend


def prepare(name: str, device) -> None:
    """Resolve ``name`` on ``device`` into the cache ahead of the first step (which then
    reports an unavailable backend, or warns of the "auto" fallback, as before)."""
    device = torch.device(device)
    key = (name, device.type)
    if key not in _resolved:
        try:
            _resolved[key] = _resolve(name, device)
        except BackendUnavailable:
            pass


def _resolve(name: str, device: torch.device) -> tuple:
    if name == "auto":
        return _auto(device)
    reason = _reason(name, device)
    if reason is not None:
        raise BackendUnavailable(f"cblr_ext backend {name!r} cannot run on {device}: {reason}")
    return _make(name, device), None


def _auto(device: torch.device) -> tuple:
    reasons = []
    for name in _AUTO_ORDER.get(device.type, ()):
        reason = _reason(name, device)
        if reason is None:
            return _make(name, device), None
        reasons.append(f"{name}: {reason}")
    return Backend("reference", ops.OPS, updates_from_saved=False), "; ".join(reasons) or None


def _first_device(args: tuple):
    """The device of an op call's first tensor (the ops take their layers as lists), or None."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0].device
    return None


class _DeviceCheckedOps:
    """A backend's op functions called directly, each first checking (``get``: a dict
    lookup once resolved) that the backend runs on its tensors' device: resolved by name
    alone there is no device yet, and the kernels would fail unclearly on one they cannot
    run (CPU tensors without the Triton interpreter), or with triton not installed."""

    def __init__(self, name: str, module):
        self._name, self._module = name, module

    def __getattr__(self, attribute: str):
        value = getattr(self._module, attribute)
        if not callable(value):
            return value

        def checked(*args, **kwargs):
            device = _first_device(args)
            if device is not None:
                get(self._name, device)  # BackendUnavailable before the op reads or writes anything
            return value(*args, **kwargs)
        return checked


_CHECKED_TRITON = _DeviceCheckedOps("triton", triton)


def resolve_ops(backend):
    """The ops object a functional call runs: a ``Backend``'s, a backend name's on the
    dispatcher's device choice ("auto": ``torch.ops.cblr_ext``)."""
    if isinstance(backend, Backend):
        return backend.ops
    if backend == "auto":
        return ops.OPS
    if backend == "reference":
        return ops.REFERENCE_OPS
    if backend == "triton":
        return _CHECKED_TRITON
    if backend == "cuda":
        return get(backend, "cuda").ops
    return get(backend, "cpu").ops


def for_params(name: str, device, params: list) -> Backend:
    """The backend of a group of ``params``: "auto" takes the reference for a group with an
    fp64 parameter on a GPU (the GPU kernels run fp32/fp16/bf16 only)."""
    backend = get(name, device)
    if name != "auto" or backend.name == "reference":
        return backend
    if backend.name in ("cuda", "triton") and any(p.dtype == torch.float64 for p in params):
        return get("reference", device)
    return backend


def addressing(backend: Backend, tensors: list) -> Backend:
    """``backend`` where its kernels take every one of ``tensors`` where it lies, else the
    reference (CBLR's probe shifts strided views themselves: the closure evaluates them)."""
    if all(backend.takes_layout(t) for t in tensors):
        return backend
    return get("reference", tensors[0].device)


def prepare_group(name: str, device) -> None:
    """``prepare`` what a group of backend ``name`` may run on ``device`` (``for_params``
    may take the reference instead of "auto"'s choice)."""
    prepare(name, device)
    prepare("reference", device)


def resolve(name: str, device) -> str:
    """The name of the backend that ``backend=name`` runs on ``device`` ("auto" picks)."""
    return get(name, device).name


def why_unavailable(name: str, device) -> Optional[str]:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    try:
        get(name, device)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def available_backends(device="cpu") -> list:
    """Names of the backends that can run on ``device``."""
    return [name for name in NAMES if why_unavailable(name, device) is None]
