"""The functional core: a step as two calls over the layers of one param group,
usable without the optimizer class (``torch.optim.sgd.sgd`` style: tensor lists,
flags and a small hyperparameter record).

    reduction = layerwise_reduce(rule, params, grads, ages, adapt, hp, ...)
    found_inf = reduction.nonfinite.any()          # over every group of the step
    stats = layerwise_update_(rule, params, grads, state, adapt, reduction, found_inf, hp, ...)

The ``Reduction`` is backend-independent: per-layer *sums* (so that partial
reductions of one layer's shards add up before the ratio), the median, and flags
saying what was measured.  The ratio is formed from it in one place per language
(``layer_math.reduction_kappa`` and csrc/layer_math.h): a reduction made by one
backend may be fed to another's update.  docs/architecture.md has the op table.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor

from .backends import resolve_ops
# The contract's names, as the functional API's users read them (F.Reduction, F.SUM_W2, ...).
from .contract import (FLAG_COLUMNS, FLAG_MEASURED, FLAG_MEDIAN, FLAG_NONFINITE, FLAG_NORMS,  # noqa: F401
                       SCALAR_DTYPE, STAT_COLUMNS, STAT_NAMES, SUM_COLUMNS, SUM_DIFF2, SUM_G2, SUM_STEP2, SUM_W2,
                       Reduction, state_dtype)


@dataclass(frozen=True)
class Hyperparams:
    """One group's hyperparameters, as the ops take them (docs/algorithm.md, Symbols)."""

    lr: object = 1.0  # a float or a one-element tensor (never read on the host)
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    eps: float = 1e-8
    trust_coefficient: float = 1e-3
    curvature_ema: float = 0.0
    max_ratio: Optional[float] = None
    fallback_trust: float = 1e-3
    curvature_interval: int = 1
    lag: bool = False
    median: str = "exact"
    check_nonfinite: bool = True  # False: lag=1 layers with a stash need not be read in pass 1

    @classmethod
    def from_group(cls, group: dict, check_nonfinite: bool = True) -> "Hyperparams":
        values = {k: group[k] for k in _GROUP_KEYS}
        values["lag"] = bool(values["lag"])
        values["weight_decay"] = applied_weight_decay(group)
        return cls(check_nonfinite=check_nonfinite, **values)

    @property
    def approx_median(self) -> bool:
        return self.median == "approx"


def applied_weight_decay(group: dict) -> float:
    """The group's weight decay as the step applies it: 0 in a group with ``decay=False``
    (made by ``decay_mask``), whatever its ``weight_decay`` (a scheduler may write it)."""
    return group["weight_decay"] if group.get("decay", True) else 0.0


# The param group keys of Hyperparams, listed once: torch.compile does not trace
# ``dataclasses.fields`` of a class (a graph break in every step).
_GROUP_KEYS = tuple(f.name for f in fields(Hyperparams) if f.name != "check_nonfinite")


@dataclass
class LayerState:
    """The per-layer state the update writes, as tensor lists (the optimizer owns it):
    ``kappas`` (κ̄, 0-d SCALAR_DTYPE), ``ages`` (0-d fp32), ``lagged`` ([3] SCALAR_DTYPE).
    ``momentum_buffers`` / ``prev_steps`` / ``lagged``: empty lists when not kept;
    ``lagged_valid[i]``: ``lagged[i]`` holds an earlier step's (‖w‖, ‖g‖, κ)."""

    kappas: list
    ages: list
    momentum_buffers: list = field(default_factory=list)
    prev_steps: list = field(default_factory=list)
    lagged: list = field(default_factory=list)
    lagged_valid: list = field(default_factory=list)


def lr_value(lr, device) -> Tensor:
    """γ as an fp32 0-d tensor on ``device`` (a tensor lr is never read on the host)."""
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def empty_workspace(device) -> Tensor:
    """The workspace of a backend that keeps none (inductor mis-lowers an op whose only
    mutable argument is None, torch 2.13)."""
    return torch.empty(0, dtype=torch.uint8, device=device)


def layerwise_reduce(rule: str, params: list, grads: list, ages: list, adapt: list, hp: Hyperparams, *,
                     lagged_valid=None, probe_grads=None, probe_steps=None, w_sq=None, w_sq_known=None,
                     grad_scale=None, workspace=None, backend="auto") -> Reduction:
    """Pass 1 over one group's layers (docs/architecture.md, ``layerwise_reduce``).

    ``probe_grads``/``probe_steps``: CBLR, per layer the gradient at w_t + s and s (None
    where the layer does not measure); ``w_sq``/``w_sq_known``: Σw_t² where already known
    (the probe's shift, or the last update), which a backend may use instead of reading w;
    ``grad_scale``: GradScaler's scale S (a one-element fp32 tensor): the kernels read every
    gradient, the probe's too, as g·fl32(1/S), as ``GradScaler.unscale_`` would write it.
    """
    n = len(params)
    device = params[0].device
    return Reduction(*resolve_ops(backend).layerwise_reduce(
        rule, params, grads, ages, [bool(a) for a in adapt],
        [False] * n if lagged_valid is None else list(lagged_valid),
        [] if probe_grads is None else list(probe_grads), [] if probe_steps is None else list(probe_steps),
        w_sq, [False] * n if w_sq_known is None else list(w_sq_known), grad_scale,
        float(hp.weight_decay), int(hp.curvature_interval), hp.lag, hp.approx_median, hp.check_nonfinite,
        empty_workspace(device) if workspace is None else workspace))


def layerwise_update_(rule: str, params: list, grads: list, state: LayerState, adapt: list,
                      reduction: Reduction, found_inf: Tensor, hp: Hyperparams, *, saved=None,
                      grad_scale=None, workspace=None, next_w_sq=None, backend="auto") -> Tensor:
    """Pass 2: ratio and update of every layer, nothing written when ``found_inf``;
    returns the [L, 7] statistics of ``STAT_NAMES``.  ``saved``: CBLR, w_t of the layers
    that sit at the probe point w_t + s (None elsewhere): they are updated from it (and
    restored to it when the step is skipped); ``grad_scale`` as for ``layerwise_reduce``."""
    n = len(params)
    device = params[0].device
    return resolve_ops(backend).layerwise_update_(
        rule, params, grads, state.momentum_buffers, state.prev_steps, state.kappas, state.ages, state.lagged,
        list(state.lagged_valid) if state.lagged_valid else [False] * n,
        [] if saved is None else list(saved), [bool(a) for a in adapt], *reduction.tensors(),
        found_inf.reshape(()), grad_scale, lr_value(hp.lr, device), float(hp.momentum), bool(hp.nesterov),
        float(hp.weight_decay), float(hp.eps), float(hp.trust_coefficient), float(hp.curvature_ema),
        None if hp.max_ratio is None else float(hp.max_ratio), float(hp.fallback_trust),
        int(hp.curvature_interval), hp.lag, hp.approx_median,
        empty_workspace(device) if workspace is None else workspace, next_w_sq)


def probe_shift_(params: list, steps: list, saved: list, displacements: list, *, backend="auto") -> Tensor:
    """saved ← w, w ← w + s (s rounded to w's dtype, the sum to w's), displacements ← the
    realised displacement fl(w + s) − w (state dtype: what CBLR's secant divides by);
    returns Σw_t² per layer (fp64)."""
    return resolve_ops(backend).probe_shift_(params, steps, saved, displacements)


def probe_restore_(params: list, saved: list, *, backend="auto") -> None:
    """w ← saved, bit-exactly."""
    if params:
        resolve_ops(backend).probe_restore_(params, saved)
