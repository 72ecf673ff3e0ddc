"""Sharded parameters (DTensor: FSDP2's ``fully_shard``, tensor parallelism): whole-layer
reductions across ranks (docs/algorithm.md, "Across ranks").

The backends run on the local shards.  Their per-layer partial sums (Σw², Σg², the CBLR
secant sums) and non-finite flags are added over the mesh in one packed collective per
pass for every sharded group of the step together, never one per layer; the MCLR median
is the exact median of the whole layer, by a radix select over the quotients' fp32 bits
whose first histogram travels in that same collective.  Groups without a DTensor never
reach this module (one dictionary lookup per group tells).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import layer_math as lm
from . import ops
from .functional import (FLAG_MEASURED, FLAG_MEDIAN, FLAG_NONFINITE, FLAG_NORMS, STAT_NAMES, SUM_G2, SUM_W2,
                         LayerState, state_dtype)

# Radix select over the quotients' fp32 bits, (shift, width) per round: non-negative
# floats order like their bits as integers.  The exact median needs all 31 (the sign is
# 0); median="approx" truncates to the top 16, so it stops there.
EXACT_ROUNDS = ((20, 11), (10, 10), (0, 10))
APPROX_ROUNDS = ((20, 11), (16, 4))
# A round with rounds after it gathers this rank's keys still candidates (the op
# median_candidates, a few per cent of them after the first round) so that the later
# rounds count those instead of reading w and g again; not where they exceed this share
# of the rank's quotients (ties can keep them all: the memory stays under 0.5 B/element).
_GATHER_SHARE = 1 / 8
_STEP_NORM = STAT_NAMES.index("step_norm")


def _dtensor_type():
    """DTensor's class, or None while torch.distributed.tensor is not imported (then no
    tensor can be one)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local(tensor):
    """The local shard of a DTensor (it shares the DTensor's storage: kernels write through
    it), or ``tensor`` itself."""
    dtensor = _dtensor_type()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def local_state(state: LayerState) -> LayerState:
    """The state lists the kernels take: local shards of the DTensor buffers (the optimizer
    keeps DTensors, so that torch.distributed.checkpoint saves and reshards them)."""
    return LayerState(kappas=state.kappas, ages=state.ages,
                      momentum_buffers=[local(t) for t in state.momentum_buffers],
                      prev_steps=[local(t) for t in state.prev_steps], lagged=state.lagged,
                      lagged_valid=state.lagged_valid)


@dataclass
class Sharding:
    """How one param group's layers lie across ranks: their mesh, and per layer whether
    this rank's copy is the one counted (its coordinate is 0 on every mesh dimension where
    the layer is replicated, so that replicas are not summed twice)."""

    mesh: object
    owns: list


def _is_shard(placement) -> bool:
    from torch.distributed.tensor import placement_types
    strided = getattr(placement_types, "_StridedShard", ())
    return placement.is_shard() or isinstance(placement, strided)


def sharding(gi: int, group: dict, params: list, grads: list, positions: list, rule: str) -> Sharding | None:
    """The group's ``Sharding``, None when no parameter is a DTensor.  Raises, naming the
    parameter and its placements, where the whole-layer values cannot be formed from the
    shards; it reads and writes nothing."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(issubclass(t, dtensor) for t in set(map(type, params))):
        return None
    names = group.get("param_names")

    def fail(i, why):
        pi = positions[i]
        name = repr(names[pi]) if names else f"{pi}"
        raise ValueError(f"param group {gi}, parameter {name}: {why}. Nothing was modified.")

    if group.get("lag"):  # (the Adam base has no lag)
        fail(0, "lag=1 is not supported for DTensor (sharded) parameters: its stash of the previous "
                "step's norms is written from the local shard's sums; use lag=0")
    mesh = next(p.device_mesh for p in params if isinstance(p, dtensor))
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        fail(0, f"this rank ({dist.get_rank()}) is not in the parameters' mesh {mesh}")
    owns = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if not isinstance(p, dtensor):
            # A plain tensor beside DTensors is a replica on every rank (as under DDP).
            owns.append(all(c == 0 for c in coordinate))
            continue
        if p.device_mesh != mesh:
            fail(i, f"its mesh {p.device_mesh} differs from the group's other DTensors' {mesh}; put "
                    "parameters of each mesh in their own param group")
        for placement in p.placements:
            if not (placement.is_replicate() or _is_shard(placement)):
                fail(i, f"placements {tuple(p.placements)}: {rule.upper()} needs whole-layer sums of "
                        f"squares and medians, which {placement} shards cannot give; redistribute it to "
                        "Shard or Replicate")
        if not isinstance(g, dtensor) or g.device_mesh != mesh or tuple(g.placements) != tuple(p.placements):
            layout = tuple(g.placements) if isinstance(g, dtensor) else "a plain tensor"
            fail(i, f"its gradient's layout ({layout}) differs from the parameter's placements "
                    f"{tuple(p.placements)}")
        owns.append(all(c == 0 for c, placement in zip(coordinate, p.placements) if placement.is_replicate()))
    return Sharding(mesh, owns)


def _squares(x):
    return x.double().square().sum()


def complete_norms(reduction, params: list, grads: list, w_sq=None, w_sq_known=None) -> None:
    """Σw², Σg² of the local shards where pass 1 left them to the update (which would take
    them from its shards alone): every row must be summed across ranks before the ratio.
    ``w_sq``/``w_sq_known``: Σw_t² of layers that sit at a probe point."""
    missing = (~reduction.flags[:, FLAG_NORMS]).nonzero().flatten().tolist()
    for i in missing:
        dtype = state_dtype(params[i])
        known = w_sq_known is not None and w_sq_known[i]
        reduction.sums[i, SUM_W2] = w_sq[i] if known else _squares(params[i].to(dtype))
        reduction.sums[i, SUM_G2] = _squares(grads[i].to(dtype))
    reduction.flags[:, FLAG_NORMS] = True


def _all_reduce(buffer: torch.Tensor, mesh) -> None:
    """Sum over the whole mesh: one collective per mesh dimension (one for FSDP2's and
    tensor parallelism's 1-D meshes)."""
    for dim in range(mesh.ndim):
        dist.all_reduce(buffer, group=mesh.get_group(dim))


class _MedianSelect:
    """The exact lower median of each measuring MCLR layer's quotients over all ranks: a
    radix select over their fp32 bits, one batched histogram per round for all layers
    (the op ``median_histogram``: one pass over the group's shards per round, in the
    group's backend).  The second round's pass gathers the keys still candidates instead
    (``median_candidates``), and it and the later rounds count those alone
    (``median_candidate_histogram``; see ``_GATHER_SHARE``).  Round 0's counts are taken
    at construction."""

    def __init__(self, g, reduction, grad_scale=None):
        self.rows = [i for i, m in enumerate(reduction.flags[:, FLAG_MEASURED].tolist()) if m]
        self.schedule = APPROX_ROUNDS if g.hp.approx_median else EXACT_ROUNDS
        device = reduction.sums.device
        # The group's backend's ops; the dispatcher's (on its device) for one without them (Triton).
        self.histogram_op = getattr(g.backend.ops, "median_histogram", None) or ops.OPS.median_histogram
        self.candidates_op = getattr(g.backend.ops, "median_candidates", None) or ops.OPS.median_candidates
        self.candidate_histogram_op = (getattr(g.backend.ops, "median_candidate_histogram", None)
                                       or ops.OPS.median_candidate_histogram)
        self.weight_decay = float(g.hp.weight_decay)
        self.grad_scale = grad_scale
        # A replica that does not own its layer counts nothing: it passes an empty shard.
        self.params, self.grads = [], []
        for i in self.rows:
            p, grad = g.local_params[i], g.local_grads[i]
            owned = g.sharding.owns[i]
            self.params.append(p if owned else p.new_empty(0))
            self.grads.append(grad if owned else grad.new_empty(0))
        self.prefix = torch.zeros(len(self.rows), dtype=torch.int64, device=device)
        # NaN quotients per layer: this rank's, all ranks' once merged (torch.median is NaN then).
        self.first, self.nan_counts = self._counts(0)
        self.local = self.first  # this rank's counts of the latest round
        self.kept_here = None  # this rank's keys inside the buckets chosen so far
        self.keys = self.key_counts = None  # the gathered candidates, and their number per layer
        self.total = None  # the layer's number of quotients, all ranks
        self.rank = None  # the wanted element's 1-based rank inside the current bucket

    def _counts(self, r: int):
        shift, width = self.schedule[r]
        return self.histogram_op(self.params, self.grads, self.grad_scale, self.weight_decay, self.prefix, shift, width)

    def _gather(self, top: int) -> None:
        self.keys, self.key_counts = self.candidates_op(self.params, self.grads, self.grad_scale, self.weight_decay,
                                                        self.prefix, top)

    def histogram(self, r: int) -> torch.Tensor:
        """This rank's counts for round ``r`` ([rows, 2^width] fp64, flattened): of the keys
        inside the buckets chosen so far."""
        if r > 0:
            shift, width = self.schedule[r]
            few = self.kept_here <= _GATHER_SHARE * sum(p.numel() for p in self.params)
            if self.keys is None and r + 1 < len(self.schedule) and bool(few):
                self._gather(shift + width)
            self.local = (self._counts(r)[0] if self.keys is None else
                          self.candidate_histogram_op(self.keys, self.key_counts, self.prefix, shift, width))
        return self.local.flatten()

    def choose(self, r: int, merged: torch.Tensor) -> None:
        """Pick each layer's bucket of round ``r`` from the counts of all ranks."""
        shift, width = self.schedule[r]
        counts = merged.view(len(self.rows), 1 << width)
        if r == 0:
            self.total = counts.sum(1)
            self.rank = torch.floor((self.total + 1) / 2)  # the lower median: the ⌈n/2⌉-th smallest
        below = counts.cumsum(1)
        bucket = (below < self.rank[:, None]).sum(1).clamp(max=(1 << width) - 1)
        before = torch.where(bucket > 0, below.gather(1, (bucket - 1).clamp(min=0)[:, None])[:, 0],
                             torch.zeros_like(self.rank))
        self.rank = self.rank - before
        self.prefix = self.prefix | (bucket << shift)
        self.kept_here = self.local.view(len(self.rows), 1 << width).gather(1, bucket[:, None]).sum()

    def write(self, reduction) -> None:
        """The medians into the reduction: NaN where the layer has no quotient or a NaN one."""
        median = self.prefix.to(torch.int32).view(torch.float32)
        undefined = (self.total == 0) | (self.nan_counts > 0)
        median = torch.where(undefined, torch.full_like(median, float("nan")), median)
        reduction.median[self.rows] = median
        reduction.flags[self.rows, FLAG_MEDIAN] = True


def _by_mesh(groups: list, items: list) -> dict:
    meshes = {}
    for g, item in zip(groups, items):
        if g.sharding is not None:
            meshes.setdefault(g.sharding.mesh, []).append((g, item))
    return meshes


def _owns(g, device) -> torch.Tensor:
    return torch.tensor(g.sharding.owns, dtype=torch.float64, device=device)


def merge_reductions(groups: list, reductions: list, found_inf: torch.Tensor, grad_scale=None) -> torch.Tensor:
    """Make the reductions of the sharded groups whole-layer, in place, and return the
    step's skip flag OR-ed over all ranks (``found_inf``: this rank's, over every group;
    ``grad_scale``: GradScaler's, the median's quotients read g·fl32(1/S) as pass 1 does)."""
    result = found_inf
    for mesh, members in _by_mesh(groups, reductions).items():
        device = members[0][1].sums.device
        selects = [_MedianSelect(g, red, grad_scale) if g.rule == "mclr" else None for g, red in members]
        pieces = []
        for (g, red), select in zip(members, selects):
            pieces += [(red.sums * _owns(g, device)[:, None]).flatten(), red.nonfinite.double()]
            if select is not None:
                pieces += [select.nan_counts, select.histogram(0)]
        pieces.append(found_inf.double().reshape(1))
        buffer = torch.cat(pieces)
        _all_reduce(buffer, mesh)
        offset = 0
        for (g, red), select in zip(members, selects):
            n = red.sums.numel()
            red.sums.copy_(buffer[offset:offset + n].view_as(red.sums))
            offset += n
            red.flags[:, FLAG_NONFINITE] = buffer[offset:offset + len(red.nonfinite)] > 0
            offset += len(red.nonfinite)
            if select is not None:
                select.nan_counts = buffer[offset:offset + len(select.rows)]
                offset += len(select.rows)
                size = len(select.rows) << select.schedule[0][1]
                select.choose(0, buffer[offset:offset + size])
                offset += size
        result = result | (buffer[-1] > 0)
        _select_rounds(mesh, [s for s in selects if s is not None and s.rows])
        for (g, red), select in zip(members, selects):
            if select is not None and select.rows:
                select.write(red)
    return result


def _select_rounds(mesh, selects: list) -> None:
    """The radix rounds after the first: one collective per round for every layer."""
    for r in range(1, max((len(s.schedule) for s in selects), default=0)):
        active = [s for s in selects if r < len(s.schedule)]
        counts = [s.histogram(r) for s in active]
        buffer = torch.cat(counts)
        _all_reduce(buffer, mesh)
        offset = 0
        for s, c in zip(active, counts):
            s.choose(r, buffer[offset:offset + len(c)])
            offset += len(c)


def global_sum(groups: list, sums: list) -> torch.Tensor:
    """Σ over every layer of every group of the per-layer ``sums`` ([L] fp64 each), whole
    across ranks: the sharded groups' counted once per layer (one collective per mesh), the
    plain groups' (the same on every rank) added as they are."""
    total = torch.stack([s.sum() for g, s in zip(groups, sums) if g.sharding is None]).sum() \
        if any(g.sharding is None for g in groups) else None
    for mesh, members in _by_mesh(groups, sums).items():
        device = members[0][1].device
        part = torch.stack([(s * _owns(g, device)).sum() for g, s in members]).sum().reshape(1)
        _all_reduce(part, mesh)
        total = part[0] if total is None else total + part[0]
    return total


def merge_step_norms(groups: list, stats: list) -> None:
    """‖s‖ of the sharded layers' statistics from the shards' (the update reports its local
    step): one collective for every sharded group of the step."""
    for mesh, members in _by_mesh(groups, stats).items():
        device = members[0][1].device
        squares = torch.cat([stat[:, _STEP_NORM].double().square() * _owns(g, device) for g, stat in members])
        _all_reduce(squares, mesh)
        offset = 0
        for g, stat in members:
            stat[:, _STEP_NORM] = lm.norm_from_sum(squares[offset:offset + len(stat)])
            offset += len(stat)
