"""Backend registry.

Each backend is one module exposing ``available(device)``, ``reduce``, ``apply``
and the CBLR protocol ops ``shift`` and ``restore`` (see ``reference.py``, the
ground truth). ``reduce`` finishes a pending probe: the reference and triton
backends through ``functional.finish_probe`` and their ``secant_norms``; cpp fuses
the secant into its pass 1 and the restore into ``apply``. Modules are imported on
first use so that a backend whose compiled part is missing ("cuda" is not built
yet) costs nothing until it is asked for.
"""
from __future__ import annotations

import importlib
import warnings

import torch

_MODULES = {
    "reference": "cblr_ext.backends.reference",
    "cpp": "cblr_ext.backends.cpp",
    "triton": "cblr_ext.backends.triton",
    "cuda": "cblr_ext.backends.cuda",
}
# Fastest first, per device type.
_AUTO_ORDER = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


class BackendUnavailable(RuntimeError):
    """A backend that is not built or cannot run on the parameters' device."""


def _load(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailable(f"cblr_ext backend {name!r} is not built: {exc}") from exc


def get(name: str, device: torch.device):
    """The backend module ``name`` for ``device``; a clear error when it cannot run there."""
    if name == "auto":
        return _auto(device)
    module = _load(name)
    reason = module.available(device)
    if reason is not True:
        raise BackendUnavailable(f"cblr_ext backend {name!r} cannot run on {device}: {reason}")
    return module


_warned = set()


def _auto(device: torch.device):
    for name in _AUTO_ORDER.get(device.type, ()):
        try:
            return get(name, device)
        except BackendUnavailable as exc:
            last = exc
    if device.type not in _warned:
        _warned.add(device.type)
        why = f" ({last})" if _AUTO_ORDER.get(device.type) else ""
        warnings.warn(f"cblr_ext: no fused backend available on {device.type}, using 'reference'{why}",
                      RuntimeWarning, stacklevel=4)
    return _load("reference")


def available_backends(device="cpu") -> list:
    """Names of the backends that can run on ``device``."""
    device = torch.device(device)
    names = []
    for name in _MODULES:
        try:
            get(name, device)
            names.append(name)
        except BackendUnavailable:
            pass
    return names


def resolve(name: str, device) -> str:
    """The name of the backend that ``backend=name`` runs on ``device`` ("auto" picks)."""
    return get(name, torch.device(device)).name


def why_unavailable(name: str, device):
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    try:
        get(name, torch.device(device))
    except BackendUnavailable as exc:
        return str(exc)
    return None
