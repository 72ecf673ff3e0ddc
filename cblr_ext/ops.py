"""Every ``torch.ops.cblr_ext`` op declared once, from ``contract.SCHEMAS``, with its fake;
the C++ extensions loaded; and the one way a backend registers its kernels.

| namespace | kernels (who registers them) |
| --- | --- |
| ``cblr_ext`` | CompositeExplicitAutograd: the reference (``backends/reference.py``); CPU: the C++ extension (csrc/binding.cpp, loaded here); CUDA: the CUDA extension (csrc/cuda/binding.cpp, loaded here) or else the Triton backend (``backends/triton.py``, where a GPU and triton are present) |
| ``cblr_ext_reference`` | the reference kernels alone: what ``backend="reference"`` calls, so that torch.compile keeps each op one graph node (inductor would otherwise generate ~19 loop nests per layer from the traced reference and compile them for minutes) |

When an extension fails to load the reference kernels run and ``cpp`` / ``cuda`` report
why they are unavailable (``LOAD_ERROR`` / ``CUDA_LOAD_ERROR``).
"""
from __future__ import annotations

import torch

from . import _build
from .contract import ADAM_OPS, ADAM_PROBE_OPS, FLAG_COLUMNS, SCALAR_DTYPE, SCHEMAS, SHARDED_OPS, STAT_COLUMNS, STEP_OPS, SUM_COLUMNS

LIBRARY = torch.library.Library("cblr_ext", "DEF")  # noqa: the namespace's one definition
REFERENCE_LIBRARY = torch.library.Library("cblr_ext_reference", "DEF")  # noqa: its one definition
for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_schema)
    if _name in STEP_OPS + ADAM_OPS + ADAM_PROBE_OPS + SHARDED_OPS:
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


def _grad_sq_sums_fake(grads, grad_scale):
    return torch.empty((len(grads),), dtype=torch.float64, device=_layers_device(grads))


def _adam_reduce_fake(rule, params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale, clip, beta1, beta2, eps,
                      weight_decay, bias_correction):
    return _reduce_fake(rule, params, *([None] * 15))


def _adam_update_fake(rule, params, grads, exp_avgs, exp_avg_sqs, steps, adapt, sums, median, flags, found_inf,
                      grad_scale, clip, lr, beta1, beta2, eps, weight_decay, bias_correction, trust_coefficient,
                      max_ratio):
    return torch.empty((len(params), STAT_COLUMNS), dtype=SCALAR_DTYPE, device=_layers_device(params))


def _adam_secant_sums_fake(params, grads, probe_grads, probe_steps, exp_avg_sqs, steps, grad_scale, clip, beta2,
                           eps, bias_correction):
    return torch.empty((len(params), 2), dtype=torch.float64, device=_layers_device(params))


def _adam_secant_update_fake(params, grads, exp_avgs, exp_avg_sqs, steps, prev_steps, alpha, found_inf, grad_scale,
                             clip, beta1, beta2, eps, weight_decay, bias_correction):
    return torch.empty((len(params),), dtype=torch.float64, device=_layers_device(params))


def _median_histogram_fake(params, grads, grad_scale, weight_decay, prefix, shift, width):
    return (prefix.new_empty((len(params), 1 << width), dtype=torch.float64),
            prefix.new_empty((len(params),), dtype=torch.float64))


def _median_candidates_fake(params, grads, grad_scale, weight_decay, prefix, top):
    keys = torch.library.get_ctx().new_dynamic_size()  # how many keys lie under the prefixes
    return prefix.new_empty((keys,), dtype=torch.int32), prefix.new_empty((len(params),), dtype=torch.int64)


def _median_candidate_histogram_fake(keys, layer_counts, prefix, shift, width):
    return prefix.new_empty((len(prefix), 1 << width), dtype=torch.float64)


_FAKES = dict(zip(STEP_OPS + ADAM_OPS + ADAM_PROBE_OPS + SHARDED_OPS,
                  (_reduce_fake, _update_fake, _shift_fake, _restore_fake, _grad_sq_sums_fake, _adam_reduce_fake,
                   _adam_update_fake, _adam_secant_sums_fake, _adam_secant_update_fake, _median_histogram_fake,
                   _median_candidates_fake, _median_candidate_histogram_fake)))
for _namespace in ("cblr_ext", "cblr_ext_reference"):
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"{_namespace}::{_name}", _fake)

# Who registered the kernels of a dispatch key from Python (the extensions register theirs in C++).
_PYTHON_OWNERS: dict = {}


def register(kernels, dispatch_key: str, owner: str, library=LIBRARY, names=STEP_OPS) -> None:
    """Register ``kernels`` (an object with the ops ``names`` as attributes) for ``dispatch_key``."""
    for name in names:
        library.impl(name, getattr(kernels, name), dispatch_key)
    if library is LIBRARY:
        _PYTHON_OWNERS[dispatch_key] = owner


def cuda_kernels_registered() -> bool:
    """Whether a kernel of every op is registered for the CUDA dispatch key."""
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cblr_ext::{name}", "CUDA")
               for name in STEP_OPS)


def cuda_kernels():
    """Who runs the ops on CUDA tensors: "cuda" (cblr_ext._C_cuda), "triton", or None."""
    if CUDA_LOAD_ERROR is None:
        return "cuda"
    return _PYTHON_OWNERS.get("CUDA")


try:
    _build.load()
    LOAD_ERROR = None
except Exception as exc:  # a failed JIT build is a reason (backend "cpp" reports it), not a crash
    LOAD_ERROR = exc

if torch.version.cuda is None:  # the CPU wheel: nothing to load, nothing to register
    CUDA_LOAD_ERROR = ImportError(f"torch {torch.__version__} has no CUDA")
else:
    try:
        _build.load_cuda()
        CUDA_LOAD_ERROR = None
    except Exception as exc:  # a reason (backend "cuda" reports it), not a crash
        CUDA_LOAD_ERROR = exc

OPS = torch.ops.cblr_ext
REFERENCE_OPS = torch.ops.cblr_ext_reference
