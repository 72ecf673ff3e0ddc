"""The functional core: one param group's layers as a ``LayerBatch`` and the two
backend passes over it.

A step is ``reduce`` (pass 1: per-layer norms, measurement, non-finite flag)
over every group, one step-wide non-finite decision, then ``apply`` (ratio and
update, pass 2) over every group.  Backends implement the two passes and the
CBLR protocol's ``shift`` and ``restore``.  On a CBLR re-measure step
(``LayerBatch.probe``) ``reduce`` measures the secant, and the shifted
parameters go back to w_t bit-exactly: restored by ``reduce`` (``finish_probe``),
or, in a fused backend, updated by ``apply`` from the saved copy (restored when the
step is skipped).  Whoever restores clears ``batch.probe``; the optimizer restores a
probe still pending when a pass raises.  Everything here is backend-independent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

# Columns of the per-layer reduction returned by ``Backend.reduce``.
# Pass 1 measures the current inputs (w_t, g_t); under lag=1, ``apply`` takes
# ‖w‖, ‖g‖ and κ from the previous step's inputs instead (state["lagged"]).
# A fused backend may leave κ NaN where the layer does not measure, and the norms
# NaN where a lag=1 stash replaces them or the layer does not measure (its ``apply``
# then takes them during the update, or first where the ratio falls back): only its
# own ``apply`` reads the columns.
RED_W_NORM, RED_G_NORM, RED_KAPPA, RED_MEASURED, RED_NONFINITE = range(5)
REDUCTION_COLUMNS = 5

# Columns of the per-layer statistics returned by ``Backend.apply``.
STAT_NAMES = ("w_norm", "g_norm", "step_norm", "kappa", "ratio", "alpha", "fallback")
STAT_COLUMNS = len(STAT_NAMES)


@dataclass
class Probe:
    """CBLR's probe of one group, per layer: ``saved`` holds w_t where the parameter
    now sits at w_t + s_{t−1} (None where it was not shifted), ``grads`` the
    gradient there where the layer measures (None elsewhere).  ``w_norms``: what the
    backend's ``shift`` returned, ‖w_t‖ of the shifted layers in order, or None."""

    saved: list
    grads: list
    w_norms: Optional[Tensor] = None


@dataclass
class LayerBatch:
    """The layers of one param group that have a gradient, with their state.

    ``states`` are the optimizer's per-parameter state dicts; backends read and
    write ``momentum_buffer``, ``kappa``, ``age``, ``lagged`` and
    ``prev_step`` in them (see ``init_layer_state``).
    """

    rule: str
    params: list
    grads: list
    states: list
    adapt: list
    hp: dict
    # CBLR re-measure steps: the probe that ``reduce`` finishes.
    probe: Optional[Probe] = None
    # (group index, each layer's index in the group's params): names for layer_stats.
    positions: tuple = ((), ())
    # Scratch a backend keeps between steps, owned by the optimizer (freed with it).
    workspace: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.params)

    @property
    def device(self):
        return self.params[0].device

    @property
    def uses_momentum(self) -> bool:
        return self.hp["momentum"] > 0

    @property
    def keeps_prev_step(self) -> bool:
        """CBLR needs s_{t−1}; it is the momentum buffer itself unless Nesterov or μ = 0."""
        return self.rule == "cblr" and (not self.uses_momentum or self.hp["nesterov"])


def state_dtype(param: Tensor) -> torch.dtype:
    """Math and optimizer state run in fp32 at least (fp64 stays fp64)."""
    return torch.promote_types(param.dtype, torch.float32)


def init_layer_state(state: dict, param: Tensor) -> None:
    """Create the per-layer scalars on the parameter's device (no host syncs later)."""
    if "kappa" not in state:
        state["kappa"] = torch.full((), float("nan"), dtype=torch.float32, device=param.device)
        state["age"] = torch.full((), float("inf"), dtype=torch.float32, device=param.device)


def prev_step(batch: LayerBatch, i: int) -> Optional[Tensor]:
    """s_{t−1} of layer i, or None before its first step."""
    state = batch.states[i]
    if batch.keeps_prev_step:
        return state.get("prev_step")
    return state.get("momentum_buffer")


def lr_value(lr, device) -> Tensor:
    """γ as an fp32 0-d tensor on ``device`` (a tensor lr is never read on the host)."""
    if isinstance(lr, Tensor):
        return lr.to(device=device, dtype=torch.float32).reshape(())
    return torch.tensor(float(lr), dtype=torch.float32, device=device)


def times_lr(x: Tensor, lr) -> Tensor:
    """x·γ in fp32: a float γ stays a kernel scalar (no host-to-device copy per
    step); a tensor γ is moved to x's device and never read on the host."""
    return x * lr_value(lr, x.device) if isinstance(lr, Tensor) else x * float(lr)


def finish_probe(batch: LayerBatch, secant_norms, restore) -> Tensor:
    """[L, 2] (‖d(w_t) − d(w_t + s)‖, ‖s‖), NaN rows where the layer does not measure,
    and every shifted parameter restored to w_t (``batch.probe`` cleared): the start of
    ``reduce`` for backends that do not fuse the restore into the update, from their
    ``secant_norms`` and ``restore``."""
    secant = torch.full((len(batch), 2), float("nan"), dtype=torch.float32, device=batch.device)
    probe = batch.probe
    if probe is None:
        return secant
    measured = [i for i, g in enumerate(probe.grads) if g is not None]
    if measured:
        secant[measured] = secant_norms(
            [batch.params[i] for i in measured], [batch.grads[i] for i in measured],
            [probe.grads[i] for i in measured], [prev_step(batch, i) for i in measured],
            batch.hp["weight_decay"])
    shifted = [i for i, w in enumerate(probe.saved) if w is not None]
    restore([batch.params[i] for i in shifted], [probe.saved[i] for i in shifted])
    batch.probe = None
    return secant
