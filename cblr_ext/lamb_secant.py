"""CBLR on the Adam direction (``LAMB(rule="cblr")``; docs/algorithm.md, "The Adam base"):
the layer state it keeps, what the closure protocol (cblr_ext/probe.py) shifts and
measures, and its pass 2.

Per layer: κ = (‖(g − g_s)/(√v̂ + ε)‖ + ε) / ‖Δ‖, g_s the gradient at the probe point
w_t + s_{t−1} on the same batch and Δ the displacement the shift realised; κ̄ its running
average (ρ), r = η/κ̄ ≤ r_max, the fallback η_F·‖w‖/‖u‖ where no valid κ̄ exists (the SGD
base's ``layer_ratio`` with ‖u‖ for ‖g‖); then w ← w − γ·r·u and s_t = γ·r·u is kept.
State per layer: ``kappa`` (κ̄), ``age`` (steps since the last measurement) and
``prev_step`` (s), beside the Adam base's.  Nothing is read on the host but the due
flags (curvature_interval > 1, as the SGD base) and a new layer's first skip decision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends, distributed
from . import functional as F
from . import layer_math as lm
from . import ops
from .contract import host_flags
from .layouts import in_layout_of
from .step_common import NewState


@dataclass(frozen=True)
class SecantProbe:
    """What ``CurvatureProbe`` takes of one group (its duck type): ``params`` and ``grads``
    as the optimizer holds them (DTensors under FSDP2: ``.grad`` is swapped on these), the
    local shards it shifts and the previous steps as the kernels take them, which layers
    measure, and who shifts them.  The parameters go back to w_t right after the closure
    (the update reads w_t, not a saved copy)."""

    params: list
    grads: list
    probe_params: list  # the local shards of ``params`` (the same tensors where none is a DTensor)
    prev_steps: list   # s_{t−1} per layer (local shards), None before its first applied step
    measures: list     # host bools: adapted, due and with a previous step
    probe_backend: backends.Backend
    maximize: bool     # the moments take −g: so does the secant
    kernel_params: list  # what the kernels update per layer (a strided view's dense copy): its layout
    probe_restores = True

    def probe_grad(self, i: int, grad):
        # the local shard of g_s (as pass 1 takes g_t's), in the layout the kernels update
        grad = in_layout_of(distributed.local(grad), self.kernel_params[i])
        return -grad if self.maximize else grad


def init_state(states: list, params: list) -> None:
    """κ̄ (NaN: no valid measurement yet) and the age (+inf: never measured) of new layers."""
    for p, s in zip(params, states):
        if "kappa" not in s:
            s["kappa"] = torch.full((), float("nan"), dtype=F.SCALAR_DTYPE, device=p.device)
            s["age"] = torch.full((), float("inf"), dtype=torch.float32, device=p.device)


def make_probe(group: dict, params: list, grads: list, states: list, adapt: list, kernel_params: list) -> SecantProbe:
    """The group's probe for this step (``grads``: the gradients as ``.grad`` holds them;
    ``kernel_params``: what the kernels update)."""
    prev_steps = [None if s.get("prev_step") is None else distributed.local(s["prev_step"]) for s in states]
    k = group["curvature_interval"]
    due = [True] * len(states) if k == 1 else lm.measurement_due(torch.stack([s["age"] for s in states]), k).tolist()
    device = params[0].device
    local_params = [distributed.local(p) for p in params]
    probe_backend = backends.addressing(backends.for_params(group["backend"], device, params), local_params)
    return SecantProbe(params=params, grads=grads, probe_params=local_params, prev_steps=prev_steps,
                       measures=[a and d and s is not None for a, d, s in zip(adapt, due, prev_steps)],
                       probe_backend=probe_backend, maximize=bool(group.get("maximize", False)),
                       kernel_params=kernel_params)


def secant_op(group_ops, name: str):
    """The kernel of secant op ``name``: the group's backend's, or the dispatcher's (the
    reference where that backend has none: the Triton backend has no ``adam_secant_update_``)."""
    return getattr(group_ops, name, None) or getattr(ops.OPS, name)


def measure_(g, reduction: F.Reduction, probe_inputs: dict, grad_scale, clip) -> torch.Tensor:
    """The secant sums of the measuring layers of ``g`` (an ``lamb._AdamGroup``) into
    ``reduction`` (Σ(P·Δg)², Σs² columns; a non-finite probe gradient flags the layer
    non-finite, so the step is skipped); returns the measured flags ([L] bool)."""
    hp, measures = g.hyperparams, g.probe.measures
    n, device = len(g.params), g.params[0].device
    rows = {}
    measured = [i for i in range(n) if measures[i]]
    if measured:
        pick = lambda tensors: [tensors[i] for i in measured]  # noqa: E731
        sums = secant_op(g.ops, "adam_secant_sums")(
            pick(g.params), pick(g.grads), pick(probe_inputs["probe_grads"]), pick(probe_inputs["probe_steps"]),
            pick(g.exp_avg_sqs), pick(g.steps), grad_scale, clip, hp["betas"][1], float(hp["eps"]),
            hp["bias_correction"])
        rows = dict(zip(measured, sums.unbind()))
    zero = torch.zeros(2, dtype=torch.float64, device=device)
    secant = torch.stack([rows.get(i, zero) for i in range(n)])
    reduction.sums[:, F.SUM_DIFF2] = secant[:, 0]
    reduction.sums[:, F.SUM_STEP2] = secant[:, 1]
    reduction.flags[:, F.FLAG_NONFINITE] |= ~torch.isfinite(secant).all(dim=1)
    return host_flags(measures, device)


def update_(g, reduction: F.Reduction, measured: torch.Tensor, found_inf: torch.Tensor, grad_scale, clip,
            lr: torch.Tensor) -> torch.Tensor:
    """Pass 2 of ``g``: the ratio from the secant and κ̄, w ← w − γ·r·u, s kept (a layer's
    first ``prev_step`` only if the step applies); κ̄ and the age written unless the step is
    skipped.  Returns [L, 7] statistics."""
    hp, states = g.hyperparams, g.states
    device = g.params[0].device
    sums = reduction.sums
    w_norm, u_norm = lm.norm_from_sum(sums[:, F.SUM_W2]), lm.norm_from_sum(sums[:, F.SUM_G2])
    kappa = lm.secant_kappa(lm.norm_from_sum(sums[:, F.SUM_DIFF2]), lm.norm_from_sum(sums[:, F.SUM_STEP2]),
                            float(hp["eps"]))
    kappa_bars = torch.stack([s["kappa"] for s in states])
    ratio, new_bar, used, fallback = lm.layer_ratio(
        kappa, measured, kappa_bars, w_norm, u_norm, host_flags(g.adapt, device),
        trust_coefficient=float(hp["trust_coefficient"]), curvature_ema=float(hp["curvature_ema"]),
        max_ratio=None if hp["max_ratio"] is None else float(hp["max_ratio"]), weight_decay=0.0, eps=0.0,
        fallback_trust=float(hp["fallback_trust"]))
    alpha = lm.layer_alpha(ratio, lr)
    # Made like the parameters as the optimizer holds them (DTensors: DCP saves and reshards
    # s as it does m and v); the kernel writes their local shards.
    prev_steps = NewState(found_inf).buffers(
        "prev_step", g.probe.params, states,
        lambda p: torch.zeros_like(p, dtype=F.state_dtype(p), memory_format=torch.preserve_format))
    prev_steps = [distributed.local(s) for s in prev_steps]
    step_norm = secant_op(g.ops, "adam_secant_update_")(
        g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, prev_steps, alpha,
        found_inf, grad_scale, clip, *hp["betas"], float(hp["eps"]), float(F.applied_weight_decay(hp)),
        hp["bias_correction"])
    skip = found_inf.reshape(())
    ages = torch.stack([s["age"] for s in states])
    torch._foreach_copy_([s["kappa"] for s in states], list(torch.where(skip, kappa_bars, new_bar).unbind()))
    new_ages = torch.where(skip, ages, lm.next_age(ages, measured))
    torch._foreach_copy_([s["age"] for s in states], list(new_ages.unbind()))
    return torch.stack([w_norm, u_norm, step_norm, used, ratio, alpha, fallback.double()], dim=1)

