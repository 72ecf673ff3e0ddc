"""CBLR's closure protocol (docs/algorithm.md, "CBLR's closure protocol"): the second
gradient at w_t + s_{t−1} on the same batch, and who puts w_t back.

This module alone decides who restores w_t:

| when | who restores |
| --- | --- |
| the backend cannot update from the saved copy | ``measure`` restores, right after the closure |
| it can (cpp) | ``layerwise_update_`` writes w_{t+1} from the copy (w_t when the step is skipped) |
| anything raises before the update returns | ``CurvatureProbe.__exit__`` restores every pending layer |
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import functional as F


@dataclass
class GroupProbe:
    """One group's probe: per layer the copy of w_t (None: not shifted), the gradient at
    w_t + s (None: not measured), the displacement the shift realised (fl(w_t + s) − w_t,
    what the secant divides by), and Σw_t² as the shift measured it."""

    saved: list
    grads: list
    steps: list  # the displacements of the measuring layers (None elsewhere)
    displacements: list
    w_sq: torch.Tensor = None
    pending: bool = False  # shifted layers not yet back at w_t (nor updated from the copy)


@dataclass
class ProbeBuffers:
    """Buffers reused by every probe (fixed addresses, no fresh pages each time), owned by
    the optimizer: the closure's ``.grad`` stand-ins, the copies of w_t and the realised
    displacements."""

    grads: dict = field(default_factory=dict)
    saved: dict = field(default_factory=dict)
    displacements: dict = field(default_factory=dict)

    @staticmethod
    def reused(buffers: dict, p, like, make):
        """``buffers[p]``, made by ``make(like)`` when missing or no longer like ``like``."""
        buffer = buffers.get(p)
        if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype, buffer.device) != (
                like.shape, like.stride(), like.dtype, like.device):
            buffer = buffers[p] = make(like)
        return buffer


class CurvatureProbe:
    """``with CurvatureProbe(buffers) as probe: probe.measure(groups, closure); ...``.

    ``groups``: objects with ``params``, ``grads`` (as the optimizer holds them: ``.grad`` is
    swapped on these), ``probe_params`` (what the closure evaluates, as the kernels take it:
    the 16-bit parameters where the kernels update fp32 masters), ``probe_grad(i, grad)``
    (a probe gradient as the reduction takes it), ``probe_restores`` (the parameters go back
    to w_t right after the closure), ``local_params`` and ``local(tensor)`` (what the kernels take: the
    local shards of DTensor parameters, else the same tensors), ``prev_steps`` (s_{t−1} per
    layer as the kernels take it, None before the first step), ``measures`` (host bools),
    ``backend`` (a ``backends.Backend``, whose kernels update) and ``probe_backend`` (the one
    that shifts and restores ``probe_params``).
    """

    def __init__(self, buffers: ProbeBuffers):
        self.buffers = buffers
        self.groups = {}  # id(group) -> (group, GroupProbe)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.restore_pending()
        return False

    def measure(self, groups: list, closure) -> None:
        """Shift every layer with a previous step to w_t + s_{t−1}, set the g_t tensors aside
        (a spare buffer stands in ``.grad``, so a closure zeroing in place keeps fixed
        addresses), run the closure, collect the probe gradients of the measuring layers,
        and give ``.grad`` back its g_t."""
        for g in groups:
            shifted = [i for i, s in enumerate(g.prev_steps) if s is not None]
            saved, moved = [None] * len(g.params), [None] * len(g.params)
            for i in shifted:
                saved[i] = self.buffers.reused(self.buffers.saved, g.params[i], g.probe_params[i], torch.empty_like)
                moved[i] = self.buffers.reused(self.buffers.displacements, g.params[i], g.prev_steps[i],
                                               torch.empty_like)
            self.groups[id(g)] = (g, GroupProbe(saved=saved, grads=[None] * len(g.params),
                                                steps=[moved[i] if g.measures[i] else None
                                                       for i in range(len(g.params))], displacements=moved))
        try:
            for g in groups:
                probe = self.groups[id(g)][1]
                for p in g.params:
                    p.grad = self.buffers.reused(self.buffers.grads, p, p.grad, torch.zeros_like)
                shifted = [i for i, w in enumerate(probe.saved) if w is not None]
                if not shifted:
                    continue
                # The shift checks its inputs before it writes: pending once it has returned.
                w_sq = F.probe_shift_([g.probe_params[i] for i in shifted], [g.prev_steps[i] for i in shifted],
                                      [probe.saved[i] for i in shifted], [probe.displacements[i] for i in shifted],
                                      backend=g.probe_backend)
                probe.pending = True
                probe.w_sq = w_sq if len(shifted) == len(g.params) else self._spread(w_sq, shifted, len(g.params))
            with torch.enable_grad():
                closure()
            for g in groups:
                probe = self.groups[id(g)][1]
                probe.grads = [g.probe_grad(i, p.grad) if g.measures[i] else None for i, p in enumerate(g.params)]
                if any(g.measures[i] and grad is None for i, grad in enumerate(probe.grads)):
                    raise RuntimeError("CBLR: the closure left a measured parameter without .grad")
        finally:
            for g in groups:
                for p, grad in zip(g.params, g.grads):
                    if p.grad is not None and p.grad is not grad:
                        self.buffers.grads[p] = p.grad
                    p.grad = grad
        for g in groups:
            if g.probe_restores:
                self._restore(g, self.groups[id(g)][1])

    @staticmethod
    def _spread(values, positions: list, n: int):
        """[n] with ``values`` at ``positions``, 0 elsewhere, on the device (indexing by a
        host list would copy it to the device every step)."""
        at = dict(zip(positions, values.unbind()))
        zero = values.new_zeros(())
        return torch.stack([at.get(i, zero) for i in range(n)])

    def reduce_inputs(self, group) -> dict:
        """The keywords of ``layerwise_reduce`` for ``group``: the probe gradients and steps,
        and Σw_t² of the layers still at the probe point."""
        entry = self.groups.get(id(group))
        if entry is None:
            return {}
        probe = entry[1]
        known = [probe.pending and w is not None for w in probe.saved]
        return dict(probe_grads=probe.grads, probe_steps=probe.steps,
                    w_sq=probe.w_sq if any(known) else None, w_sq_known=known if any(known) else None)

    def saved_for_update(self, group):
        """The copies of w_t the update writes from (None when every layer is at w_t)."""
        entry = self.groups.get(id(group))
        if entry is None or not entry[1].pending:
            return None
        return entry[1].saved

    def updated(self, group) -> None:
        """``group``'s update has returned: it wrote every shifted layer from the copy."""
        entry = self.groups.get(id(group))
        if entry is not None:
            entry[1].pending = False

    def restore_pending(self) -> None:
        for g, probe in self.groups.values():
            self._restore(g, probe)

    @staticmethod
    def _restore(group, probe: GroupProbe) -> None:
        if probe.pending:
            shifted = [i for i, w in enumerate(probe.saved) if w is not None]
            F.probe_restore_([group.probe_params[i] for i in shifted], [probe.saved[i] for i in shifted],
                             backend=group.probe_backend)
            probe.pending = False
