"""``LARS``, ``MCLR`` and ``CBLR``: one ``torch.optim.Optimizer`` implementation,
three curvature rules (docs/algorithm.md)."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from . import backends
from . import layer_math as lm
from .functional import (LayerBatch, Probe, RED_NONFINITE, STAT_NAMES, init_layer_state, prev_step)
from .hyperparams import RULE_DEFAULTS, validate_group


class LayerwiseOptimizer(Optimizer):
    """Shared implementation; subclasses set ``rule``.

    Args (every one but ``skip_nonfinite`` and ``reuse_weight_norm`` may be overridden per param group,
    plus ``adapt``):
        lr: γ, a float or a 0-d tensor.
        momentum, weight_decay, nesterov: as in ``torch.optim.SGD`` (dampening 0).
        trust_coefficient: η of r = η / κ̄.
        eps: ε of the curvature rules.
        exclude_1d: 0-d and 1-D tensors (biases, norms) are not adapted (r = 1).
        curvature_ema: ρ of κ̄ = ρ·κ̄ + (1−ρ)·κ.
        max_ratio: upper bound on r, or None.
        fallback_trust: η_F of the LARS fallback ratio.
        curvature_interval: re-measure κ every k-th step, reuse κ̄ in between.
        lag: 1 = LARS/MCLR measure on the previous step's inputs (one-pass variant).
        median: "exact" or "approx" (MCLR; see ``layer_math.lower_median``).
        skip_nonfinite: skip the whole step when any gradient holds NaN/Inf.
        reuse_weight_norm: LARS on the cpp backend takes ‖w_t‖ from the previous step's
            update pass (which measures its result) where the parameter has not changed
            since, as its version counter tells: pass 1 then reads g alone.  Writes through
            ``.data`` (or memory shared outside torch) bypass the counter, as they bypass
            autograd's checks: pass False if the training loop changes parameters that way.
        backend: "auto", "reference", "cpp", "triton" or "cuda".
    """

    rule = None

    def __init__(self, params, lr=1.0, momentum=0.0, weight_decay=0.0, trust_coefficient=None,
                 eps=1e-8, nesterov=False, exclude_1d=True, curvature_ema=None, max_ratio=None,
                 fallback_trust=1e-3, skip_nonfinite=True, backend="auto", curvature_interval=1,
                 lag=0, median="exact", adapt=True, reuse_weight_norm=True):
        rule_defaults = RULE_DEFAULTS[self.rule]
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay,
            trust_coefficient=rule_defaults["trust_coefficient"] if trust_coefficient is None else trust_coefficient,
            eps=eps, nesterov=nesterov, exclude_1d=exclude_1d,
            curvature_ema=rule_defaults["curvature_ema"] if curvature_ema is None else curvature_ema,
            max_ratio=max_ratio, fallback_trust=fallback_trust, backend=backend,
            curvature_interval=curvature_interval, lag=lag, median=median, adapt=adapt)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.reuse_weight_norm = bool(reuse_weight_norm)
        self._skipped_steps = 0
        self._stats = []
        # CBLR: .grad buffers of the probe closure and copies of w_t, reused every probe.
        self._probe_grads = {}
        self._probe_saved = {}
        self._workspace = {}  # backends' scratch (LayerBatch.workspace)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(group, self.rule)
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex parameters")
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_stats", [])
        self.__dict__.setdefault("_probe_grads", {})
        self.__dict__.setdefault("_probe_saved", {})
        self.__dict__.setdefault("_workspace", {})
        self.__dict__.setdefault("reuse_weight_norm", True)

    # ----------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step.  ``closure`` (zero grads, forward, backward, return
        the loss) is required by CBLR on re-measure steps and optional otherwise."""
        for group in self.param_groups:
            validate_group(group, self.rule)
        if self.rule == "cblr":
            return self._cblr_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run(self._batches())
        return loss

    def _batches(self):
        """Validate every group's gradients, then bundle each group's layers (one loop over
        the parameters: this runs every step, for every layer)."""
        batches = []
        state = self.state
        for gi, group in enumerate(self.param_groups):
            params, grads, states, positions = [], [], [], []
            device = None
            for pi, p in enumerate(group["params"]):
                if p.device != device:
                    if device is not None:
                        devices = sorted({str(q.device) for q in group["params"]})
                        raise ValueError(f"param group {gi} mixes devices {devices}; "
                                         "put parameters of each device in their own group")
                    device = p.device
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients "
                                       f"(param group {gi}, parameter {pi})")
                if grad.shape != p.shape:
                    raise RuntimeError(f"gradient of shape {tuple(grad.shape)} does not match "
                                       f"parameter {pi} of group {gi}, shape {tuple(p.shape)}")
                layer_state = state[p]
                init_layer_state(layer_state, p)
                params.append(p)
                grads.append(grad)
                states.append(layer_state)
                positions.append(pi)
            if not params:
                continue
            exclude_1d = group["exclude_1d"]
            adapt = [group["adapt"] and not (exclude_1d and p.ndim <= 1) for p in params]
            hp = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            # Backends may skip the non-finite check when nothing acts on it (lag=1: no pass 1).
            hp["skip_nonfinite"] = self.skip_nonfinite
            hp["reuse_weight_norm"] = self.reuse_weight_norm
            batches.append(LayerBatch(self.rule, params, grads, states, adapt, hp, positions=(gi, positions),
                                      workspace=self._workspace))
        return batches

    @staticmethod
    def _backend(batch):
        return backends.get(batch.hp["backend"], batch.device)

    def _run(self, batches):
        """Pass 1 over every group, one step-wide skip decision, pass 2 over every group."""
        work = [(b, self._backend(b)) for b in batches]
        if not work:
            return
        try:
            reductions = [backend.reduce(b) for b, backend in work]
            device = batches[0].device
            found_inf = None
            if self.skip_nonfinite:
                for red in reductions:  # the column is 0 or 1
                    flag = red[:, RED_NONFINITE].any().to(device)
                    found_inf = flag if found_inf is None else found_inf | flag
            else:
                found_inf = torch.zeros((), dtype=torch.bool, device=device)
            stats = [(b.positions, backend.apply(b, red, found_inf)) for (b, backend), red in zip(work, reductions)]
        except BaseException:
            # CBLR probes not restored yet (by pass 1, or by the update) leave w shifted.
            for b, backend in work:
                self._restore_probe(b, backend)
            raise
        self._stats = stats
        # A device tensor (int64: bool + int): counting skipped steps must not sync the host.
        self._skipped_steps = found_inf + self._skipped_steps

    def _cblr_step(self, closure):
        """CBLR: gradient at w_t, and on a re-measure step a second gradient on the same
        batch at w_t + s_{t−1}; pass 1 then measures the secant, and the step goes on
        from w_t, restored bit-exactly (.grad is restored right after the probe closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = self._batches()
        probes = [self._probe_mask(b) for b in batches]
        if any(any(mask) for mask in probes):
            if closure is None:
                raise RuntimeError(
                    "CBLR needs step(closure) on a re-measure step (every curvature_interval-th "
                    "step): the closure re-evaluates the loss on the same batch at w + s. "
                    "Nothing was modified.")
            # A non-finite g_t is found by pass 1 (no extra pass here); the step is
            # then skipped, probe or not.
            self._probe(batches, probes, closure)
        self._run(batches)
        return loss

    @staticmethod
    def _probe_mask(batch):
        """Layers of ``batch`` that measure this step: adapted, due, with a previous step.
        (One host read per group: the closure must know whether to run again.)"""
        ages = torch.stack([state["age"] for state in batch.states])
        due = lm.measurement_due(ages, batch.hp["curvature_interval"]).tolist()
        return [batch.adapt[i] and due[i] and prev_step(batch, i) is not None for i in range(len(batch))]

    @staticmethod
    def _reused(buffers, p, like, make):
        """``buffers[p]``, made by ``make(like)`` when missing or no longer like ``like``
        (reused: fixed addresses, and no fresh pages to fault in every probe)."""
        buffer = buffers.get(p)
        if buffer is None or (buffer.shape, buffer.stride(), buffer.dtype, buffer.device) != (
                like.shape, like.stride(), like.dtype, like.device):
            buffer = buffers[p] = make(like)
        return buffer

    def _probe(self, batches, probes, closure):
        """Shift every layer with a previous step to w_t + s_{t−1} (keeping w_t) and run
        the closure there.  The g_t tensors are set aside (not copied) meanwhile, with a
        spare buffer per parameter in ``.grad``, so a closure that zeroes in place
        (``zero_grad(set_to_none=False)``) keeps fixed addresses.  Sets ``b.probe``; the
        parameters stay shifted until a pass restores them (here, when anything fails)."""
        work = []
        for b in batches:
            shifted = [i for i in range(len(b)) if prev_step(b, i) is not None]
            saved = [None] * len(b)
            for i in shifted:
                saved[i] = self._reused(self._probe_saved, b.params[i], b.params[i], torch.empty_like)
            work.append((b, shifted, saved))
        try:
            for b, shifted, saved in work:
                for p in b.params:
                    p.grad = self._reused(self._probe_grads, p, p.grad, torch.zeros_like)
                w_norms = self._backend(b).shift([b.params[i] for i in shifted],
                                                 [prev_step(b, i) for i in shifted], [saved[i] for i in shifted])
                b.probe = Probe(saved=saved, grads=[None] * len(b), w_norms=w_norms)  # restore on failure
            with torch.enable_grad():
                closure()
            for (b, _, _), probe in zip(work, probes):
                grads = [p.grad if probe[i] else None for i, p in enumerate(b.params)]
                if any(probe[i] and g is None for i, g in enumerate(grads)):
                    raise RuntimeError("CBLR: the closure left a measured parameter without .grad")
                b.probe.grads = grads
        except BaseException:
            for b, _, _ in work:
                self._restore_probe(b, self._backend(b))
            raise
        finally:
            for b, _, _ in work:
                for p, g in zip(b.params, b.grads):
                    if p.grad is not None and p.grad is not g:
                        self._probe_grads[p] = p.grad
                    p.grad = g

    @staticmethod
    def _restore_probe(batch, backend):
        if batch.probe is not None:
            shifted = [i for i, w in enumerate(batch.probe.saved) if w is not None]
            backend.restore([batch.params[i] for i in shifted], [batch.probe.saved[i] for i in shifted])
            batch.probe = None

    # ---------------------------------------------------------- inspection

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN/Inf (reading it syncs the device)."""
        return int(self._skipped_steps)

    def layer_stats(self) -> dict:
        """Per layer of the last step: ‖w‖, ‖g‖, ‖s‖ (step length), κ (κ̄ used, NaN for the
        fallback and not-adapted layers), r, α and whether the fallback was used.

        Keyed by parameter name where names were given, else "group.index".  The
        statistics stay on the device during ``step()``; this call copies them.
        """
        out = {}
        for (gi, positions), stats in self._stats:
            names = self.param_groups[gi].get("param_names")
            rows = stats.detach().cpu().tolist()
            for pi, row in zip(positions, rows):
                entry = dict(zip(STAT_NAMES, row))
                entry["fallback"] = bool(entry["fallback"])
                out[names[pi] if names else f"{gi}.{pi}"] = entry
        return out

    # ----------------------------------------------------------- state dict

    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        skipped = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; ours keeps its own
        # (fp32 state for fp16/bf16 parameters, fp32 κ̄).
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(device=p.device, dtype=value.dtype, copy=True)
        self._skipped_steps = skipped


class LARS(LayerwiseOptimizer):
    """LARS (You et al. 2017): κ = (‖g‖ + β‖w‖ + ε) / ‖w‖, the CBLR special case."""

    rule = "lars"


class MCLR(LayerwiseOptimizer):
    """Median-curvature LR: κ = median_i |d_i| / |w_i| + ε over the layer's elements."""

    rule = "mclr"


class CBLR(LayerwiseOptimizer):
    """Curvature-based LR: κ = (‖d(w) − d(w + s_{t−1})‖ + ε) / ‖s_{t−1}‖ measured with
    ``step(closure)`` on the same mini-batch; η defaults to 1, ρ to 0.5."""

    rule = "cblr"

    def __init__(self, params, lr=0.1, **kwargs):
        super().__init__(params, lr=lr, **kwargs)
