"""Every ``torch.ops.cblr_ext`` op, declared once: schema, fake, and the default kernel.

| op | reads | writes | returns |
| --- | --- | --- | --- |
| ``layerwise_reduce`` | w, g ÷ grad scale (probe: g at w + s, s) | the workspace | ``Reduction`` tensors (sums, median, flags) |
| ``layerwise_update_`` | w (or the probe's saved w_t), g ÷ grad scale, a reduction | w, v, s_{t−1}, κ̄, age, lag stash | [L, 7] statistics |
| ``probe_shift_`` | w, s_{t−1} | saved ← w, w ← w + s, Δ ← (w + s) − w as stored | Σw_t² per layer (fp64) |
| ``probe_restore_`` | saved | w ← saved | |
| ``cpu_isa`` | | | the C++ kernels' instruction set |

Kernels per device (the dispatcher picks): the reference backend is the
``CompositeExplicitAutograd`` kernel (any device), also the only kernel of the same four
ops in ``torch.ops.cblr_ext_reference``, which ``backend="reference"`` calls; the C++ extension registers the
CPU kernels (``TORCH_LIBRARY_IMPL(cblr_ext, CPU, m)`` in csrc/binding.cpp); the CUDA
extension ``cblr_ext._C_cuda`` the CUDA kernels (csrc/cuda/binding.cpp) when it is
built, else the Triton backend does, when a GPU and triton are present (without
importing triton here).  Importing this module loads the extensions
(``_build.load``: compiled, or JIT-built; ``_build.load_cuda``, only where torch has
CUDA); when that fails the reference kernels run and ``cpp`` / ``cuda`` report why
they are unavailable (``LOAD_ERROR`` / ``CUDA_LOAD_ERROR``).
"""
from __future__ import annotations

import importlib.util

import torch

from . import _build
from .functional import FLAG_COLUMNS, SCALAR_DTYPE, STAT_COLUMNS, SUM_COLUMNS

LIBRARY = torch.library.Library("cblr_ext", "DEF")  # noqa: the namespace's one definition

SCHEMAS = {
    "layerwise_reduce": (
        "layerwise_reduce(str rule, Tensor[] params, Tensor[] grads, Tensor[] ages, bool[] adapt, "
        "bool[] lagged_valid, Tensor?[] probe_grads, Tensor?[] probe_steps, Tensor? w_sq, bool[] w_sq_known, "
        "Tensor? grad_scale, float weight_decay, int curvature_interval, bool lag, bool approx_median, bool check_nonfinite, "
        "Tensor(a!) workspace) -> (Tensor sums, Tensor median, Tensor flags)"),
    "layerwise_update_": (
        "layerwise_update_(str rule, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] prev_steps, Tensor(d!)[] kappas, Tensor(e!)[] ages, Tensor(f!)[] lagged, "
        "bool[] lagged_valid, Tensor?[] saved, bool[] adapt, Tensor sums, Tensor median, Tensor flags, "
        "Tensor found_inf, Tensor? grad_scale, Tensor lr, float momentum, bool nesterov, float weight_decay, float eps, "
        "float trust_coefficient, float curvature_ema, float? max_ratio, float fallback_trust, "
        "int curvature_interval, bool lag, bool approx_median, Tensor(g!) workspace, "
        "Tensor(h!)? next_w_sq) -> Tensor"),
    "probe_shift_": ("probe_shift_(Tensor(a!)[] params, Tensor[] steps, Tensor(b!)[] saved, "
                     "Tensor(c!)[] displacements) -> Tensor"),
    "probe_restore_": "probe_restore_(Tensor(a!)[] params, Tensor[] saved) -> ()",
    "cpu_isa": "cpu_isa() -> str",
}
STEP_OPS = ("layerwise_reduce", "layerwise_update_", "probe_shift_", "probe_restore_")
# The reference kernels again, as opaque ops of their own: what ``backend="reference"`` calls,
# so that torch.compile keeps each op one graph node (inductor would otherwise generate
# ~19 loop nests per layer from the traced reference and compile them for minutes).
REFERENCE_LIBRARY = torch.library.Library("cblr_ext_reference", "DEF")  # noqa: its one definition
for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_schema)
    if _name in STEP_OPS:
        REFERENCE_LIBRARY.define(_schema)


def _layers_device(params):
    return params[0].device if params else torch.device("cpu")


def _reduce_fake(rule, params, grads, ages, adapt, lagged_valid, probe_grads, probe_steps, w_sq, w_sq_known,
                 grad_scale, weight_decay, curvature_interval, lag, approx_median, check_nonfinite, workspace):
    n, device = len(params), _layers_device(params)
    return (torch.empty((n, SUM_COLUMNS), dtype=torch.float64, device=device),
            torch.empty((n,), dtype=torch.float32, device=device),
            torch.empty((n, FLAG_COLUMNS), dtype=torch.bool, device=device))


def _update_fake(rule, params, grads, momentum_buffers, prev_steps, kappas, ages, lagged, lagged_valid, saved,
                 adapt, sums, median, flags, found_inf, grad_scale, lr, momentum, nesterov, weight_decay, eps,
                 trust_coefficient, curvature_ema, max_ratio, fallback_trust, curvature_interval, lag,
                 approx_median, workspace, next_w_sq):
    return torch.empty((len(params), STAT_COLUMNS), dtype=SCALAR_DTYPE, device=_layers_device(params))


def _shift_fake(params, steps, saved, displacements):
    return torch.empty((len(params),), dtype=torch.float64, device=_layers_device(params))


def _restore_fake(params, saved):
    return None


for _namespace in ("cblr_ext", "cblr_ext_reference"):
    for _name, _fake in zip(STEP_OPS, (_reduce_fake, _update_fake, _shift_fake, _restore_fake)):
        torch.library.register_fake(f"{_namespace}::{_name}", _fake)


# ---- The sharded median's radix select (cblr_ext/distributed.py): one round's counts of
# every layer of a group.  Kernels: the reference (default, any device; the only kernel in
# cblr_ext_reference) and the C++ CPU kernel (csrc/binding.cpp).
MEDIAN_HISTOGRAM_SCHEMA = ("median_histogram(Tensor[] params, Tensor[] grads, Tensor? grad_scale, float weight_decay, "
                           "Tensor prefix, int shift, int width) -> (Tensor counts, Tensor nans)")


def _median_histogram_fake(params, grads, grad_scale, weight_decay, prefix, shift, width):
    return (prefix.new_empty((len(params), 1 << width), dtype=torch.float64),
            prefix.new_empty((len(params),), dtype=torch.float64))


def _define_median_histogram():
    from .backends import reference
    for library in (LIBRARY, REFERENCE_LIBRARY):
        library.define(MEDIAN_HISTOGRAM_SCHEMA)
        library.impl("median_histogram", reference.median_histogram, "CompositeExplicitAutograd")
        torch.library.register_fake(f"{library.ns}::median_histogram", _median_histogram_fake)


_define_median_histogram()
# ---- end of the sharded median's block

def _register(module, dispatch_key, library=LIBRARY):
    for name in STEP_OPS:
        library.impl(name, getattr(module, name), dispatch_key)


def _register_default_kernels():
    from .backends import reference
    for library in (LIBRARY, REFERENCE_LIBRARY):
        _register(reference, "CompositeExplicitAutograd", library)


def cuda_kernels_registered() -> bool:
    """Whether a kernel of every op is registered for the CUDA dispatch key."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{name}", "CUDA")
               for name in STEP_OPS)


def _load_cuda_kernels():
    """The CUDA extension owns the CUDA key when it loads; else the Triton backend takes
    it where a GPU and triton are present.  Returns (who, why the extension did not load)."""
    if torch.version.cuda is None:  # the CPU wheel: nothing to load, nothing to register
        return None, ImportError(f"torch {torch.__version__} has no CUDA")
    try:
        _build.load_cuda()
        return "cuda", None
    except Exception as exc:  # a reason (backend "cuda" reports it), not a crash
        error = exc
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        from .backends import triton  # imports triton itself only when a kernel runs
        _register(triton, "CUDA")
        return "triton", error
    return None, error


_register_default_kernels()

try:
    _build.load()
    LOAD_ERROR = None
except Exception as exc:  # a failed JIT build is a reason (backend "cpp" reports it), not a crash
    LOAD_ERROR = exc

# Who registered the CUDA kernels: "cuda" (cblr_ext._C_cuda), "triton", or None.
CUDA_KERNELS, CUDA_LOAD_ERROR = _load_cuda_kernels()

OPS = torch.ops.cblr_ext
REFERENCE_OPS = torch.ops.cblr_ext_reference
