"""``LAMB``: layer-wise ratios on the Adam direction (docs/algorithm.md, "The Adam base").

u = m̂/(√v̂ + ε) + λ·w per layer (bias-corrected moments, decoupled weight decay), then
w ← w − γ·r·u with r = η‖w‖/‖u‖ (``rule="lars"``: LAMB, apex's FusedLAMB) or
r = η / (median_i |u_i|/|w_i| + ε) (``rule="mclr"``: the paper's median rule on the Adam
direction, an extension of the paper) or r = η/κ̄ of the secant of the preconditioned
gradient, measured with ``step(closure)`` (``rule="cblr"``, cblr_ext/lamb_secant.py; also
an extension).  Two ops per group and step, one step-wide skip decision between them
(``contract.ADAM_OPS``; CBLR adds the secant's op and takes its own pass 2); with
``max_grad_norm`` a pass over the gradients before them forms the global clip divisor on
the device.  Nothing is read on the
host during a step: the step count is a device tensor per layer.  DTensor parameters
(FSDP2, tensor parallelism) step on their local shards with whole-layer norms, medians and
clip norm: one packed collective per pass for every sharded group (cblr_ext/distributed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from . import backends, distributed
from . import functional as F
from . import lamb_secant
from . import layer_math as lm
from .checkpoint import CheckpointedOptimizer
from .group_checks import ADAM_OPTIONS, add_param_groups, check_torch_options
from .hyperparams import _number, check_curvature_options, check_flags, check_learning_rate
from .layouts import dense_copies, relayout_state, state_layouts
from .masks import ParamMask, check_mask_names
from .probe import CurvatureProbe, ProbeBuffers
from .step_common import (fp64_out_of_range, grad_scale_on, layers_with_grads, prepare_step_applies, skip_decision,
                          stats_by_layer)

ADAM_RULES = ("lars", "mclr", "cblr")
# The backends with kernels of the Adam base's ops: the dispatcher's choice (the C++
# kernels on CPU, the CUDA extension's or else the Triton kernels on CUDA, the reference
# elsewhere), or one by name.
ADAM_BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")


@dataclass(frozen=True)
class _AdamGroup:
    """One param group's layers with a gradient this step, as the ops take them (the local
    shards of DTensors)."""

    index: int
    positions: tuple  # each layer's index in the group's params (names for layer_stats)
    hyperparams: dict  # the param group itself
    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    steps: list
    adapt: list
    ops: object
    sharding: distributed.Sharding = None  # None: no parameter is a DTensor
    states: list = None  # CBLR: the layers' state dicts
    probe: lamb_secant.SecantProbe = None  # CBLR: what the closure protocol shifts and measures
    written_back: tuple = ()  # (strided views, the dense copies the kernels update), copied after the update

    def median_inputs(self, grad_scale, clip) -> SimpleNamespace:
        """What ``distributed.merge_reductions`` reads of a sharded group: for MCLR, the
        quotients |u_i|/|w_i| of the direction this step takes (λ is inside u)."""
        rule = self.hyperparams["rule"]
        directions = None
        if rule == "mclr":
            hp = self.hyperparams
            directions = [lm.adam_step(w.to(F.state_dtype(w)), lm.adam_grad(g.to(F.state_dtype(w)), grad_scale, clip),
                                       m, v, step, *hp["betas"], float(hp["eps"]),
                                       float(F.applied_weight_decay(hp)), hp["bias_correction"])[2]
                          for w, g, m, v, step in zip(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs,
                                                      self.steps)]
        return SimpleNamespace(sharding=self.sharding, rule=rule, local_params=self.params, local_grads=directions,
                               hp=SimpleNamespace(approx_median=False, weight_decay=0.0),
                               backend=SimpleNamespace(ops=self.ops))


def _as_the_kernels_take(params: list, grads: list, sharding, backend: backends.Backend) -> tuple:
    """(params, grads, written_back, state_like) of a group as its kernels take them: the
    local shards of DTensors, a dense copy of a strided view the kernels cannot address
    (with its gradient in the copy's layout), ``(views, copies)`` to write back after the
    update, and per layer what its state is laid out like (cblr_ext.layouts)."""
    local_params, local_grads = [distributed.local(p) for p in params], [distributed.local(g) for g in grads]
    substitutes = []  # (view, its dense copy)
    if sharding is None:  # a DTensor's local shard is dense
        dense_copies(local_params, local_grads, substitutes, backend)
    return (local_params, local_grads, tuple(map(list, zip(*substitutes))),
            state_layouts(params, local_params, substitutes))


def _validate(group: dict, read_tensor_lr: bool = False) -> None:
    check_learning_rate(group["lr"], read_tensor_lr)
    beta1, beta2 = (_number("betas", b) for b in group["betas"])
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
    if not _number("eps", group["eps"]) >= 0:
        raise ValueError(f"Invalid epsilon value: {group['eps']}")
    if not _number("weight_decay", group["weight_decay"]) >= 0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if not _number("trust_coefficient", group["trust_coefficient"]) > 0:
        raise ValueError(f"Invalid trust_coefficient: {group['trust_coefficient']} (must be > 0)")
    if group["max_ratio"] is not None and not _number("max_ratio", group["max_ratio"]) > 0:
        raise ValueError(f"Invalid max_ratio: {group['max_ratio']} (must be None or > 0)")
    if group["max_grad_norm"] is not None and not _number("max_grad_norm", group["max_grad_norm"]) > 0:
        raise ValueError(f"Invalid max_grad_norm: {group['max_grad_norm']} (must be None or > 0)")
    if group["rule"] not in ADAM_RULES:
        raise ValueError(f"Invalid rule: {group['rule']!r} (choose from {', '.join(ADAM_RULES)})")
    if group["backend"] not in ADAM_BACKENDS:
        raise ValueError(f"Invalid backend: {group['backend']!r} (the Adam base runs on "
                         f"{', '.join(ADAM_BACKENDS)}: the others have no kernels of its ops)")
    check_curvature_options(group)
    check_flags(group, ("bias_correction", "exclude_1d", "adapt", "nvlamb", "maximize"))


class LAMB(CheckpointedOptimizer):
    """LAMB (You et al. 2019) with apex FusedLAMB's semantics, and the median and secant
    rules on the Adam direction.

    Args (every one but ``skip_nonfinite`` and the masks may be overridden per param group; any
    other group key is refused):
        lr: γ, a float or a 0-d tensor.
        betas, eps: Adam's (β1, β2) and ε (ε outside the square root, as apex).
        weight_decay: λ, decoupled: added to the direction, so it is scaled by r too.
        bias_correction: m̂ = m/(1 − β1^t), v̂ = v/(1 − β2^t).
        max_grad_norm: the gradients of the whole step (every group) are divided by
            max(1, ‖g‖/max_grad_norm) before the moments; None: no clipping.  apex's default 1.0.
        rule: "lars" (r = η‖w‖/‖u‖, LAMB), "mclr" (r = η/(median |u_i|/|w_i| + ε)) or
            "cblr" (r = η/κ̄, κ the secant of the preconditioned gradient along the last
            step: ``step(closure)`` required on measuring steps, as for ``CBLR``).
        trust_coefficient: η (1 for LAMB).
        max_ratio: the trust clip, an upper bound on r, or None.
        curvature_ema, curvature_interval, fallback_trust: "cblr" only: ρ of κ̄, re-measure
            every k-th step, η_F of the fallback r = η_F·‖w‖/‖u‖ (as ``CBLR``'s).
        exclude_1d: 0-d and 1-D tensors are not adapted (r = 1).
        nvlamb: adapt layers with λ = 0 too (apex's ``use_nvlamb``); without it, as apex,
            a group with weight_decay 0 is not adapted.
        adapt: False: no layer of the group is adapted (Adam with decoupled decay).
        skip_nonfinite: skip the whole step when a gradient holds NaN/Inf.
        backend: "auto", "reference", "cpp", "triton" or "cuda".
        adapt_mask, decay_mask: which parameters are adapted / take weight decay, by name
            (cblr_ext.masks; docs/algorithm.md, "Masks").
        maximize: ascend the objective, as torch.optim.Adam's: the moments take −g for g (one
            pass over the gradients more per step).
        foreach, differentiable, fused, amsgrad, capturable: torch.optim.Adam's, accepted at
            the values LAMB implements (False; None/False for foreach and fused) and refused
            otherwise.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 max_grad_norm=1.0, rule="lars", trust_coefficient=1.0, max_ratio=None, exclude_1d=False,
                 nvlamb=False, adapt=True, skip_nonfinite=True, backend="auto", adapt_mask=None, decay_mask=None, *,
                 curvature_ema=0.0, curvature_interval=1, fallback_trust=1e-3,
                 maximize=False, foreach=None, differentiable=False, fused=None, amsgrad=False, capturable=False):
        check_torch_options("LAMB", dict(foreach=foreach, differentiable=differentiable,
                                         fused=fused, amsgrad=amsgrad, capturable=capturable), ADAM_OPTIONS)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, max_grad_norm=max_grad_norm, rule=rule,
                        trust_coefficient=trust_coefficient, max_ratio=max_ratio, exclude_1d=exclude_1d,
                        nvlamb=nvlamb, adapt=adapt, backend=backend, maximize=maximize, curvature_ema=curvature_ema,
                        curvature_interval=curvature_interval, fallback_trust=fallback_trust)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._adapt_mask = None if adapt_mask is None else ParamMask(adapt_mask, "adapt_mask")
        self._decay_mask = None if decay_mask is None else ParamMask(decay_mask, "decay_mask")
        self._results = self._empty_results(0)
        self._probe_buffers = ProbeBuffers()  # CBLR: reused by every probe
        super().__init__(params, defaults)
        check_mask_names(self.param_groups, self._adapt_mask, self._decay_mask)

    def add_param_group(self, param_group):
        """torch's, after checks (cblr_ext.group_checks); the masks split the group (cblr_ext.masks)."""
        add_param_groups("LAMB", param_group, self._add_one_group, self.param_groups,
                         known={*self.defaults, "params", "param_names", "decay"}, torch_options=ADAM_OPTIONS,
                         optimizer_wide=("skip_nonfinite", "adapt_mask", "decay_mask"),
                         adapt_mask=self._adapt_mask, decay_mask=self._decay_mask)

    def _add_one_group(self, param_group):
        super().add_param_group(param_group)
        _validate(self.param_groups[-1], read_tensor_lr=True)
        prepare_step_applies()

    # The conventions of cblr_ext.checkpoint: what a copy or pickle keeps (with the value an
    # older pickle without it gets) and rebuilds, what loaded state must be shaped like
    # (other keys: the parameter's shape) and which dtype loaded scalar state takes (the
    # kernels advance an fp32 step count in place).
    _PICKLED = {"skip_nonfinite": True, "_adapt_mask": None, "_decay_mask": None}
    _CACHES = {"_probe_buffers": ProbeBuffers}
    _STATE_SHAPES = {"step": (), "kappa": (), "age": ()}
    _SCALAR_STATE = {"step": torch.float32, "kappa": F.SCALAR_DTYPE}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            _validate(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._init_groups()
        if not groups:
            self._results["stats"] = []
            return loss
        probed = [g.probe for g in groups if g.probe is not None and any(g.probe.measures)]
        if probed and closure is None:
            raise RuntimeError(
                "LAMB(rule='cblr') needs step(closure) on a re-measure step (every curvature_interval-th step): "
                "the closure re-evaluates the loss on the same batch at w + s. Nothing was modified.")
        with CurvatureProbe(self._probe_buffers) as probe:
            if probed:  # every shifted parameter is back at w_t when this returns
                probe.measure(probed, closure)
            self._run(groups, probe)
        return loss

    def _run(self, groups: list, probe: CurvatureProbe) -> None:
        """Pass 1 over every group (and CBLR's secant), one step-wide skip decision, pass 2."""
        device = groups[0].params[0].device
        grad_scale = grad_scale_on(getattr(self, "grad_scale", None), device)
        clip = self._clip_divisor(groups, grad_scale)
        reductions, measured = [], []
        for g in groups:
            hp = g.hyperparams
            # Sharded MCLR: a shard's median is not the layer's; merge_reductions takes it across
            # ranks.  CBLR takes the norms of pass 1 and its secant from the probe.
            rule = "lars" if g.sharding is not None or hp["rule"] == "cblr" else hp["rule"]
            reductions.append(F.Reduction(*g.ops.adam_reduce(
                rule, g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, grad_scale, clip, *hp["betas"],
                float(hp["eps"]), float(F.applied_weight_decay(hp)), hp["bias_correction"])))
            probe_inputs = {} if g.probe is None else probe.reduce_inputs(g.probe)
            measured.append(None if g.probe is None else
                            lamb_secant.measure_(g, reductions[-1], probe_inputs, grad_scale, clip))
            out_of_range = fp64_out_of_range(g.params, g.grads, grad_scale, probe_inputs.get("probe_grads"),
                                             probe_inputs.get("probe_steps"))
            if out_of_range is not None:
                reductions[-1].flags[:, F.FLAG_NONFINITE] |= out_of_range
        found_inf = skip_decision(device, getattr(self, "found_inf", None), reductions, self.skip_nonfinite)
        sharded = any(g.sharding is not None for g in groups)
        if sharded:  # the median's quotients are already unscaled
            merged = [g.median_inputs(grad_scale, clip) if g.sharding is not None else g for g in groups]
            found_inf = distributed.merge_reductions(merged, reductions, found_inf)
        stats = []
        for g, red, measured_layers in zip(groups, reductions, measured):
            hp = g.hyperparams
            if g.probe is not None:
                stats.append(lamb_secant.update_(g, red, measured_layers, found_inf, grad_scale, clip,
                                                 F.lr_value(hp["lr"], device)))
                continue
            stats.append(g.ops.adam_update_(
                hp["rule"], g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.steps, g.adapt, *red.tensors(), found_inf,
                grad_scale, clip, F.lr_value(hp["lr"], device), *hp["betas"], float(hp["eps"]),
                float(F.applied_weight_decay(hp)), hp["bias_correction"], float(hp["trust_coefficient"]),
                None if hp["max_ratio"] is None else float(hp["max_ratio"])))
        for g in groups:
            if g.written_back:  # also on a skipped step: the copies are then unchanged
                torch._foreach_copy_(*g.written_back)
        if sharded:
            distributed.merge_step_norms(merged, stats)
        self._results["stats"] = [((g.index, g.positions), s) for g, s in zip(groups, stats)]
        self._results["skipped_steps"] = found_inf + self._results["skipped_steps"]

    def _init_groups(self) -> list:
        """An ``_AdamGroup`` per group with gradients; every check runs before any state is created."""
        collected = []
        for gi, group in enumerate(self.param_groups):
            params, grads, positions, _ = layers_with_grads(type(self).__name__, gi, group)
            if params:
                collected.append((gi, positions, group, params, grads))
        groups = []
        shardings = [distributed.sharding(gi, group, params, grads, positions, "LAMB")
                     for gi, positions, group, params, grads in collected]
        for (gi, positions, group, params, grads), sharding in zip(collected, shardings):
            held_grads = grads
            if group.get("maximize", False):  # (absent in older checkpoints) the moments take −g of −f
                grads = torch._foreach_neg(grads)
            backend = backends.for_params(group["backend"], params[0].device, params)
            local_params, local_grads, written_back, state_like = _as_the_kernels_take(params, grads, sharding, backend)
            states = [self.state[p] for p in params]
            relayout_state(states, state_like, ("exp_avg", "exp_avg_sq", "prev_step"))
            for like, s in zip(state_like, states):
                if "step" not in s:  # fp32 state, as torch's Adam keeps it for 16-bit parameters
                    s["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
                    s["exp_avg"] = torch.zeros_like(like, dtype=F.state_dtype(like),
                                                    memory_format=torch.preserve_format)
                    s["exp_avg_sq"] = torch.zeros_like(like, dtype=F.state_dtype(like),
                                                       memory_format=torch.preserve_format)
            adapted = group["adapt"] and (group["nvlamb"] or group["weight_decay"] != 0)
            adapt = [adapted and not (group["exclude_1d"] and p.ndim <= 1) for p in params]
            probe = None
            if group["rule"] == "cblr":
                lamb_secant.init_state(states, params)
                probe = lamb_secant.make_probe(group, params, held_grads, states, adapt, local_params)
            local = distributed.local
            groups.append(_AdamGroup(gi, tuple(positions), group, local_params, local_grads,
                                     [local(s["exp_avg"]) for s in states],
                                     [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], adapt,
                                     backend.ops, sharding, states=states, probe=probe, written_back=written_back))
        return groups

    def _clip_divisor(self, groups: list, grad_scale):
        """max(1, ‖g‖/max_grad_norm) of the step's gradients, every group's together (fp32, on
        the device), or None without clipping.  One global norm, as apex: one bound for all groups, and whole-layer
        across ranks for sharded groups."""
        bounds = {g.hyperparams["max_grad_norm"] for g in groups}
        if bounds == {None}:
            return None
        if len(bounds) > 1:
            raise ValueError(f"max_grad_norm must be the same in every param group (a global norm), got {bounds}")
        sums = [g.ops.grad_sq_sums(g.grads, grad_scale) for g in groups]
        norm = distributed.global_sum(groups, sums).sqrt()
        return torch.clamp(norm / bounds.pop(), min=1.0).float()

    def layer_stats(self) -> dict:
        """Per layer of the last step: ‖w‖, ‖u‖ (as ``g_norm``), ‖s‖, κ, r, α, fallback."""
        return stats_by_layer(self.param_groups, self._results["stats"])
