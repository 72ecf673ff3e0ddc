"""``LARS``, ``MCLR`` and ``CBLR``: one ``torch.optim.Optimizer`` implementation,
three curvature rules (docs/algorithm.md)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import backends, distributed
from . import functional as F
from . import layer_math as lm
from .checkpoint import CheckpointedOptimizer
from .group_checks import SGD_OPTIONS, add_param_groups, check_torch_options
from .hyperparams import RULE_DEFAULT, RULE_DEFAULTS, validate_group
from .layouts import dense_copies, in_layout_of, relayout_state, state_layouts
from .masks import ParamMask, check_mask_names
from .probe import CurvatureProbe, ProbeBuffers
from .step_common import (NewState, fp64_out_of_range, grad_scale_on, layers_with_grads, prepare_step_applies,
                          stats_by_layer)


@dataclass(frozen=True)
class _Group:
    """One param group's layers that have a gradient this step, made by ``_Group.build``
    alone and not changed after: ``params``/``grads`` as the optimizer holds them
    (DTensors under FSDP2; state is keyed and created by them), ``local_params``/
    ``local_grads`` as the ops take them (local shards; fp32 masters and fp32 gradients of
    16-bit parameters under ``master_weights``)."""

    index: int
    positions: tuple  # each layer's index in the group's params (names for layer_stats)
    params: list
    grads: list
    states: list     # the optimizer's state dicts (only the optimizer reads them)
    adapt: list
    hp: F.Hyperparams
    rule: str
    backend: backends.Backend
    lagged_valid: list
    keeps_prev_step: bool
    maximize: bool   # the local gradients (and the probe's) are −g
    local_params: list
    local_grads: list
    sharding: distributed.Sharding  # None: no parameter is a DTensor
    written_back: tuple  # (parameters, what the kernels update in their place: fp32 masters under
    #                      master_weights, dense copies of strided views), copied after the update; () without
    copies_views: bool   # some layer is stepped on a dense copy of a strided view (made anew each step)
    state_like: list     # per layer, what its state buffers are laid out (and made) like
    probe_backend: backends.Backend  # CBLR: shifts and restores probe_params (any-layout ops where the views are strided)
    probe_params: list   # CBLR: what the probe shifts (the local parameters, 16-bit ones under masters); None else
    prev_steps: list     # CBLR: s_{t−1} per layer (local shards), None before its first step; None else
    measures: list       # CBLR: the layer measures κ this step (host bools); None else

    @classmethod
    def build(cls, index: int, group: dict, params: list, grads: list, positions: list, states: list,
              sharding, backend: backends.Backend, rule: str, check_nonfinite: bool, master_weights: bool):
        hp = F.Hyperparams.from_group(group, check_nonfinite=check_nonfinite)
        adapt = [group["adapt"] and not (group["exclude_1d"] and p.ndim <= 1) for p in params]
        local = (lambda t: t) if sharding is None else distributed.local
        local_params, local_grads = [local(p) for p in params], [local(grad) for grad in grads]
        substitutes = []  # (parameter, what the kernels update in its place), written back after the update
        if master_weights:
            cls._masters(params, grads, states, local_params, local_grads, substitutes, backend)
        substituted = len(substitutes)
        if sharding is None:  # a DTensor's local shard is dense
            dense_copies(local_params, local_grads, substitutes, backend)
        copies_views = len(substitutes) > substituted
        written_back = tuple(map(list, zip(*substitutes)))
        state_like = state_layouts(params, local_params, substitutes)
        relayout_state(states, state_like, ("momentum_buffer", "prev_step"))
        maximize = group["maximize"]
        if maximize:  # the step descends −f: the kernels take −g
            local_grads = torch._foreach_neg(local_grads)
        keeps_prev_step = rule == "cblr" and (hp.momentum == 0 or hp.nesterov)
        probe_params = prev_steps = measures = None
        probe_backend = backend
        if rule == "cblr":
            probe_params = [local(p) for p in params]
            probe_backend = backends.addressing(backend, probe_params)  # the closure evaluates the views
            prev_steps = [local(s.get("prev_step" if keeps_prev_step else "momentum_buffer")) for s in states]
            # The closure must know whether to run again: one host read per group, but for
            # curvature_interval=1, where every layer is due (an age is never below 1).
            due = ([True] * len(states) if hp.curvature_interval == 1 else
                   lm.measurement_due(torch.stack([s["age"] for s in states]), hp.curvature_interval).tolist())
            measures = [a and d and s is not None for a, d, s in zip(adapt, due, prev_steps)]
        return cls(index, tuple(positions), params, grads, states, adapt, hp, rule, backend,
                   lagged_valid=[hp.lag and "lagged" in s for s in states], keeps_prev_step=keeps_prev_step,
                   maximize=maximize, local_params=local_params, local_grads=local_grads, sharding=sharding,
                   written_back=written_back, copies_views=copies_views, state_like=state_like, probe_backend=probe_backend,
                   probe_params=probe_params, prev_steps=prev_steps, measures=measures)

    @staticmethod
    def _masters(params, grads, states, local_params, local_grads, substitutes, backend) -> None:
        """The kernels take the fp32 masters of 16-bit parameters (made from them when
        missing, dense where the kernels need it) and fp32 copies of their gradients; the
        update writes the masters back."""
        for i, p in enumerate(params):
            if p.dtype in (torch.float16, torch.bfloat16):
                if "master" not in states[i]:
                    master = p.detach().float()
                    states[i]["master"] = master if backend.takes_layout(master) else master.contiguous()
                local_params[i] = states[i]["master"]
                local_grads[i] = in_layout_of(grads[i].float(), local_params[i])
                substitutes.append((p, local_params[i]))

    @property
    def probe_restores(self) -> bool:
        """The probe puts w_t back itself: the backend cannot update from the saved copy,
        or the update writes masters or dense copies, not the parameters the probe shifted."""
        return not self.backend.updates_from_saved or bool(self.written_back)

    def reuses_weight_norm(self, optimizer) -> bool:
        """The optimizer's ``reuse_weight_norm``, but for a group with dense copies: the
        carried Σw² is keyed by the tensor updated, and a copy is new each step."""
        return optimizer.reuse_weight_norm and not self.copies_views

    def probe_grad(self, i: int, grad):
        """The gradient at the probe point as the reduction takes it (fp32 for a master, in
        a dense copy's layout)."""
        grad = self.local(grad)
        grad = grad.float() if self.local_params[i].dtype != grad.dtype else grad
        grad = in_layout_of(grad, self.local_params[i])
        return -grad if self.maximize else grad

    def local(self, tensor):
        """A held tensor (parameter, gradient, state) as the kernels take it."""
        return tensor if self.sharding is None else distributed.local(tensor)


def _step_result(key: str) -> property:
    """An attribute kept in the optimizer's ``_results`` dict."""
    return property(lambda self: self._results[key], lambda self, value: self._results.__setitem__(key, value))


class LayerwiseOptimizer(CheckpointedOptimizer):
    """Shared implementation; subclasses set ``rule``.

    Args (every one but ``skip_nonfinite``, ``reuse_weight_norm``, ``master_weights`` and the
    masks may be overridden per param group, plus ``adapt``; any other group key is refused):
        lr: γ, a float or a 0-d tensor.  Its default (1; 0.1 for CBLR) is a safe start, not a
            choice: each rule's good γ window is narrower than an octave on the tasks
            measured, so sweep γ on a ×√2 grid (docs/algorithm.md, "Defaults", has where).
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (dampening 0).
        trust_coefficient: η of r = η / κ̄.
        eps: ε of the curvature rules.
        exclude_1d: 0-d and 1-D tensors (biases, norms) are not adapted (r = 1); by default
            False for LARS and MCLR, True for CBLR (docs/algorithm.md, "Defaults").
        curvature_ema: ρ of κ̄ = ρ·κ̄ + (1−ρ)·κ; by default 0.5 for MCLR, 0 for LARS and CBLR.
        max_ratio: upper bound on r, or None (no bound); by default None for LARS, 0.25 for
            MCLR, 1 for CBLR (docs/algorithm.md, "Defaults").
        fallback_trust: η_F of the LARS fallback ratio.
        curvature_interval: re-measure κ every k-th step, reuse κ̄ in between.
        lag: 1 = LARS/MCLR measure on the previous step's inputs (one-pass variant).
        median: "exact" or "approx" (MCLR; see ``layer_math.lower_median``).
        skip_nonfinite: skip the whole step when any gradient holds NaN/Inf.
        master_weights: fp16/bf16 parameters get fp32 copies (state "master") that the step
            updates from fp32 gradients, and then the parameters are set to them, rounded
            (not for DTensor parameters; CBLR probes the 16-bit parameters the closure
            evaluates, from where they are).
        reuse_weight_norm: opt-in (False by default): LARS on the fused CPU kernels takes ‖w_t‖
            from the previous step's update pass (which measures its result) where the
            parameter has not changed since, as its version counter tells: pass 1 then reads
            g alone.  Writes through ``.data`` (or memory shared outside torch) bypass the
            counter, as they bypass autograd's checks, and the step then uses a stale ‖w‖
            without a signal: only for training loops that never change parameters that way.
        backend: "auto" (the fastest for the parameters' device) or a name of
            ``cblr_ext.backends.NAMES``.
        adapt_mask, decay_mask: which parameters are adapted / take weight decay: a callable
            on (name, parameter) or a set of names, from ``named_parameters()`` (cblr_ext.masks;
            docs/algorithm.md, "Masks").  SSL's convention, no adaptation and no decay for
            biases and norms: ``adapt_mask=decay_mask=lambda name, p: p.ndim > 1``.
        maximize: ascend the objective, as torch.optim.SGD's: the step takes −g for g (one
            pass over the gradients more per step).
        dampening, foreach, differentiable, fused: torch.optim.SGD's, accepted (as arguments
            and group keys) at the values these optimizers implement (0, None/False, False,
            None/False) and refused otherwise.
    """

    rule = None
    # GradScaler.step hands the step its ``grad_scale`` and ``found_inf`` (as attributes):
    # the kernels unscale, the step skips on found_inf (cblr_ext.amp).
    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=None,
                 eps=1e-8, nesterov=False, exclude_1d=RULE_DEFAULT, curvature_ema=None, max_ratio=RULE_DEFAULT,
                 fallback_trust=1e-3, skip_nonfinite=True, backend="auto", curvature_interval=1,
                 lag=0, median="exact", adapt=True, reuse_weight_norm=False, master_weights=False,
                 adapt_mask=None, decay_mask=None, *, maximize=False, dampening=0, foreach=None,
                 differentiable=False, fused=None):
        check_torch_options(type(self).__name__, dict(dampening=dampening, foreach=foreach,
                                                      differentiable=differentiable, fused=fused), SGD_OPTIONS)
        rule_defaults = RULE_DEFAULTS[self.rule]
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=rule_defaults["trust_coefficient"] if trust_coefficient is None else trust_coefficient,
            eps=eps, nesterov=nesterov,
            exclude_1d=rule_defaults["exclude_1d"] if exclude_1d is RULE_DEFAULT else exclude_1d,
            curvature_ema=rule_defaults["curvature_ema"] if curvature_ema is None else curvature_ema,
            max_ratio=rule_defaults["max_ratio"] if max_ratio is RULE_DEFAULT else max_ratio,
            fallback_trust=fallback_trust, backend=backend,
            curvature_interval=curvature_interval, lag=lag, median=median, adapt=adapt, maximize=maximize)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.reuse_weight_norm = bool(reuse_weight_norm)
        self.master_weights = bool(master_weights)
        self._adapt_mask = None if adapt_mask is None else ParamMask(adapt_mask, "adapt_mask")
        self._decay_mask = None if decay_mask is None else ParamMask(decay_mask, "decay_mask")
        self._results = self._empty_results(0)
        self._probe_buffers = ProbeBuffers()  # CBLR: reused by every probe
        self._scratch = {}  # backends' scratch kept between steps (workspaces, carried Σw²)
        super().__init__(params, defaults)
        check_mask_names(self.param_groups, self._adapt_mask, self._decay_mask)

    # Options of the whole optimizer: refused as group keys (they would be ignored there).
    _OPTIMIZER_WIDE = ("skip_nonfinite", "reuse_weight_norm", "master_weights", "adapt_mask", "decay_mask")

    def add_param_group(self, param_group):
        """torch's, after checks (cblr_ext.group_checks): every key is honoured or refused,
        parameters are floating and listed once; the masks split the group (cblr_ext.masks)."""
        add_param_groups(type(self).__name__, param_group, self._add_one_group, self.param_groups,
                         known={*self.defaults, "params", "param_names", "decay"}, torch_options=SGD_OPTIONS,
                         optimizer_wide=self._OPTIMIZER_WIDE, adapt_mask=self._adapt_mask,
                         decay_mask=self._decay_mask)

    def _add_one_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        validate_group(group, self.rule, read_tensor_lr=True)
        prepare_step_applies()
        if group["params"]:
            # Resolved now: a step, traced by torch.compile too, then finds it cached.
            device = group["params"][0].device
            backends.prepare_group(group["backend"], device)

    # The conventions of cblr_ext.checkpoint: what a copy or pickle keeps (with the value an
    # older pickle without it gets) and rebuilds, what loaded state must be shaped like
    # (other keys: the parameter's shape) and which dtype loaded scalar state takes.
    _PICKLED = {"skip_nonfinite": True, "reuse_weight_norm": False, "master_weights": False, "_adapt_mask": None,
                "_decay_mask": None}
    _CACHES = {"_probe_buffers": ProbeBuffers, "_scratch": dict}
    _STATE_SHAPES = {"kappa": (), "age": (), "lagged": (3,)}
    _SCALAR_STATE = {"kappa": F.SCALAR_DTYPE, "lagged": F.SCALAR_DTYPE}  # fp32 in checkpoints before the fp64 scalars

    def _empty_results(self, skipped_steps) -> dict:
        # found_inf: the last step's skip decision (a device bool, for cblr_ext.amp.update)
        return {**super()._empty_results(skipped_steps), "found_inf": None}

    # ----------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.  ``closure`` (zero grads, forward, backward, return
        the loss) is required by CBLR on re-measure steps and optional otherwise."""
        for group in self.param_groups:
            validate_group(group, self.rule)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self._init_groups()
        with CurvatureProbe(self._probe_buffers) as probe:
            if self.rule == "cblr" and any(any(g.measures) for g in groups):
                if closure is None:
                    raise RuntimeError(
                        "CBLR needs step(closure) on a re-measure step (every curvature_interval-th "
                        "step): the closure re-evaluates the loss on the same batch at w + s. "
                        "Nothing was modified.")
                # A non-finite g_t is found by pass 1 (no extra pass here); the step is then
                # skipped, probe or not.
                probe.measure(groups, closure)
            self._run(groups, probe, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        return loss

    def _init_groups(self) -> list:
        """Validate every group's gradients and sharding, then create the state every step
        reads (nothing is created before every group has passed; this runs every step, for
        every layer)."""
        collected = []
        for gi, group in enumerate(self.param_groups):
            params, grads, positions, device = layers_with_grads(type(self).__name__, gi, group)
            if params:
                sharding = distributed.sharding(gi, group, params, grads, positions, self.rule)
                if sharding is not None and self.master_weights:
                    raise ValueError(f"param group {gi}: master_weights is not supported for DTensor parameters")
                collected.append((gi, group, params, grads, positions, device, sharding))
        groups = []
        for gi, group, params, grads, positions, device, sharding in collected:
            states = [self.state[p] for p in params]
            for p, layer_state in zip(params, states):
                self._init_layer_state(layer_state, p)
            groups.append(_Group.build(gi, group, params, grads, positions, states, sharding,
                                       backends.for_params(group["backend"], device, params), self.rule,
                                       check_nonfinite=self.skip_nonfinite, master_weights=self.master_weights))
        return groups

    @staticmethod
    def _init_layer_state(state: dict, p: torch.Tensor) -> None:
        """κ̄ (NaN: no valid measurement yet) and the measurement age (+inf: never measured),
        on the parameter's device."""
        if "kappa" not in state:
            state["kappa"] = torch.full((), float("nan"), dtype=F.SCALAR_DTYPE, device=p.device)
            state["age"] = torch.full((), float("inf"), dtype=torch.float32, device=p.device)

    @staticmethod
    def _update_state(g: _Group, found_inf: torch.Tensor) -> F.LayerState:
        """The state lists the update writes; buffers a layer does not have yet are created
        here, and kept unless the step is skipped (a skipped step creates no state: only
        then is ``found_inf`` read on the host)."""
        wanted = []
        if g.hp.momentum > 0:
            wanted.append(("momentum_buffer", lambda p: torch.zeros_like(p, dtype=F.state_dtype(p))))
        if g.keeps_prev_step:
            wanted.append(("prev_step", lambda p: torch.zeros_like(p, dtype=F.state_dtype(p))))
        if g.hp.lag:
            wanted.append(("lagged", lambda p: torch.zeros(3, dtype=F.SCALAR_DTYPE, device=p.device)))
        new = NewState(found_inf)
        lists = {key: new.buffers(key, g.state_like, g.states, make) for key, make in wanted}
        return F.LayerState(kappas=[s["kappa"] for s in g.states], ages=[s["age"] for s in g.states],
                            momentum_buffers=lists.get("momentum_buffer", []),
                            prev_steps=lists.get("prev_step", []), lagged=lists.get("lagged", []),
                            lagged_valid=g.lagged_valid)

    def _reduce(self, g: _Group, probe: CurvatureProbe, grad_scale) -> F.Reduction:
        kwargs = probe.reduce_inputs(g)
        kwargs["grad_scale"] = grad_scale
        if g.written_back and kwargs.get("probe_grads"):  # the shift measured the parameters, not what the kernels update
            kwargs["w_sq"] = torch.stack([w.double().square().sum() for w in g.local_params])
            kwargs["w_sq_known"] = [True] * len(g.local_params)
        # Sharded MCLR: the median of a shard is not the layer's; distributed.merge_reductions
        # takes it across ranks, so pass 1 takes the LARS sums alone (same flags, no median).
        rule = "lars" if g.sharding is not None and g.rule == "mclr" else g.rule
        kwargs.update(g.backend.reduce_extras(rule, g.local_params, g.hp.lag, self._scratch, g.reuses_weight_norm(self),
                                              w_sq_given=bool(kwargs.get("w_sq_known"))))
        reduction = F.layerwise_reduce(rule, g.local_params, g.local_grads, [s["age"] for s in g.states], g.adapt,
                                       g.hp, lagged_valid=g.lagged_valid, backend=g.backend, **kwargs)
        out_of_range = fp64_out_of_range(g.local_params, g.local_grads, grad_scale, kwargs.get("probe_grads"),
                                         kwargs.get("probe_steps"))
        if out_of_range is not None:
            reduction.flags[:, F.FLAG_NONFINITE] |= out_of_range
        if g.sharding is not None:
            distributed.complete_norms(reduction, g.local_params, g.local_grads, kwargs.get("w_sq"),
                                       kwargs.get("w_sq_known"))
        return reduction

    def _update(self, g: _Group, reduction: F.Reduction, found_inf: torch.Tensor,
                probe: CurvatureProbe, grad_scale) -> torch.Tensor:
        state = self._update_state(g, found_inf)
        if g.sharding is not None:
            state = distributed.local_state(state)
        kwargs, carried = g.backend.update_extras(g.rule, g.local_params, g.hp.lag, self._scratch,
                                                  g.reuses_weight_norm(self), found_inf)
        stats = F.layerwise_update_(g.rule, g.local_params, g.local_grads, state, g.adapt, reduction, found_inf,
                                    g.hp, saved=probe.saved_for_update(g), grad_scale=grad_scale,
                                    backend=g.backend, **kwargs)
        probe.updated(g)
        if g.written_back:  # also on a skipped step: the masters are then unchanged
            torch._foreach_copy_(*g.written_back)
        g.backend.after_update(g.local_params, kwargs, carried, self._scratch)
        return stats

    def _run(self, groups: list, probe: CurvatureProbe, grad_scale, amp_found_inf) -> None:
        """Pass 1 over every group, one step-wide skip decision, pass 2 over every group;
        sharded groups make their reductions and statistics whole-layer across ranks.
        ``grad_scale``/``amp_found_inf``: GradScaler's, or None."""
        if not groups:
            results = self._results  # written as a dict, not through the properties (see below)
            results["stats"] = []  # no layer stepped: layer_stats() says so (empty)
            results["found_inf"] = None
            return
        device = groups[0].params[0].device
        grad_scale = grad_scale_on(grad_scale, device)
        reductions = [self._reduce(g, probe, grad_scale) for g in groups]
        # step_common.skip_decision, inline: calling it from here stops dynamo tracing the first
        # step's _run frame (tests/test_compile.py, the first step's breaks)
        found_inf = torch.zeros((), dtype=torch.bool, device=device)
        if amp_found_inf is not None:  # GradScaler's check of g_t: skips whatever skip_nonfinite says
            found_inf = torch.as_tensor(amp_found_inf, device=device).reshape(()) != 0
        if self.skip_nonfinite:
            for red in reductions:
                found_inf = found_inf | red.nonfinite.any().to(device)
        sharded = any(g.sharding is not None for g in groups)
        if sharded:
            found_inf = distributed.merge_reductions(groups, reductions, found_inf, grad_scale)
        stats = [self._update(g, red, found_inf, probe, grad_scale) for g, red in zip(groups, reductions)]
        if sharded:
            distributed.merge_step_norms(groups, stats)
        results = self._results
        results["stats"] = [((g.index, g.positions), s) for g, s in zip(groups, stats)]
        # A device tensor (int64: bool + int): counting skipped steps must not sync the host.
        results["skipped_steps"] = found_inf + results["skipped_steps"]
        results["found_inf"] = found_inf  # cblr_ext.amp.update tells GradScaler of a probe overflow

    # The last step's results live in a dict behind these attributes: torch.compile (torch
    # 2.13) drops attribute assignments to an Optimizer made inside a compiled step, not
    # writes into a dict it holds; a step writes the dict itself (torch 2.11's dynamo
    # cannot trace a property's setter).
    _stats = _step_result("stats")
    _found_inf = _step_result("found_inf")

    # ---------------------------------------------------------- inspection

    def layer_stats(self) -> dict:
        """Per layer of the last step: ‖w‖, ‖g‖, ‖s‖ (step length), κ (κ̄ used, NaN for the
        fallback and not-adapted layers), r, α and whether the fallback was used.

        Keyed by parameter name where names were given, else "group.index".  The
        statistics stay on the device during ``step()``; this call copies them.
        """
        return stats_by_layer(self.param_groups, self._stats)


class LARS(LayerwiseOptimizer):
    """LARS (You et al. 2017): κ = (‖g‖ + β‖w‖ + ε) / ‖w‖, the CBLR special case."""

    rule = "lars"


class MCLR(LayerwiseOptimizer):
    """Median-curvature LR: κ = median_i |d_i| / |w_i| + ε over the layer's elements."""

    rule = "mclr"


class CBLR(LayerwiseOptimizer):
    """Curvature-based LR: κ = (‖d(w) − d(w + s_{t−1})‖ + ε) / ‖s_{t−1}‖ measured with
    ``step(closure)`` on the same mini-batch; η defaults to 1, ρ to 0, r_max to 1."""

    rule = "cblr"

    def __init__(self, params, lr=0.1, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
