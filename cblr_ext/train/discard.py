"""Small-loss discarding: back-propagate only the hardest samples of a batch."""
from __future__ import annotations

import math
from typing import Callable, Union

import torch

Fraction = Union[float, Callable[[int], float]]


def discarded_count(batch_size: int, fraction: float) -> int:
    """How many samples a batch of ``batch_size`` drops: ⌊fraction·n⌋, at most n − 1.

    The 1e-9 keeps products like 0.29·100 = 28.999999999999996 from losing a sample
    to float rounding.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    return min(math.floor(fraction * batch_size + 1e-9), batch_size - 1)


def discard_small_losses(per_sample_losses: torch.Tensor, fraction: Fraction, *, step: int = 0,
                         warmup: int = 0, return_kept: bool = False):
    """The mean loss over the batch without its lowest-loss ``fraction``.

    ``per_sample_losses`` is the 1-D output of any loss with ``reduction="none"``.
    ``fraction`` is a float in [0, 1) or a schedule ``fraction(step) -> float``;
    ``step`` counts steps or epochs, whichever the schedule and ``warmup`` use:
    nothing is discarded while ``step < warmup``.  Ties are broken by position
    (among equal losses the earlier samples are dropped first), so the choice is
    deterministic.  The kept set is chosen on detached values, so the gradient
    flows only through the kept samples.  No host synchronisation: the count
    comes from the batch's shape.

    Returns the loss, or ``(loss, kept_indices)`` with ``return_kept=True``.
    """
    if per_sample_losses.dim() != 1 or per_sample_losses.numel() == 0:
        raise ValueError("per_sample_losses must be a non-empty 1-D tensor (use reduction='none'), "
                         f"got shape {tuple(per_sample_losses.shape)}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if step < warmup:
        value = 0.0
    else:
        value = fraction(step) if callable(fraction) else fraction
    n = per_sample_losses.numel()
    dropped = discarded_count(n, float(value))
    order = torch.sort(per_sample_losses.detach(), stable=True).indices
    kept = order[dropped:]
    loss = per_sample_losses.index_select(0, kept).mean()
    return (loss, kept) if return_kept else loss
