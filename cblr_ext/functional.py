"""The functional core: one param group's layers as a ``LayerBatch`` and the two
backend passes over it.

A step is ``reduce`` (pass 1: per-layer norms, measurement, non-finite flag)
over every group, one step-wide non-finite decision, then ``apply`` (ratio and
update, pass 2) over every group.  Backends implement the two passes (and the
CBLR closure-protocol ops); everything here is backend-independent.
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
# NaN where a lag=1 stash replaces them: only its own ``apply`` reads the columns.
RED_W_NORM, RED_G_NORM, RED_KAPPA, RED_MEASURED, RED_NONFINITE = range(5)
REDUCTION_COLUMNS = 5

# Columns of the per-layer statistics returned by ``Backend.apply``.
STAT_NAMES = ("w_norm", "g_norm", "step_norm", "kappa", "ratio", "alpha", "fallback")
STAT_COLUMNS = len(STAT_NAMES)


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
    # CBLR only: [L, 2] (‖d(w) − d(w+s)‖, ‖s‖) with NaN rows for layers not probed this step.
    secant: Optional[Tensor] = None
    names: list = field(default_factory=list)

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
