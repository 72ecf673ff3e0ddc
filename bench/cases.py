"""The (optimizer, backend, variant) table: what one run measures side by side.

Every case builds an optimizer over the suite's parameters and returns its
step; the bytes each step must move come from the (optimizer, variant)
traffic model below, the same for every implementation of that variant, so
achieved GB/s compares implementations doing the same job (bench/README.md).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import cblr_ext
from cblr_ext.hyperparams import BACKENDS
from cblr_ext.lamb import ADAM_BACKENDS

# One set of hyperparameters for every optimizer (momentum and weight decay on,
# as in large-batch training), so all cases do the same elementwise work.
LR, MOMENTUM, WEIGHT_DECAY, TRUST = 0.01, 0.9, 1e-4, 1e-3
# curvature_interval of the reuse variant: the second call measures (the first has no
# s_{t−1}), every later one reuses κ̄; the runner's untimed calls cover both.
CBLR_NEVER = 10**9


@dataclass(frozen=True)
class Pass:
    """One pass over the parameters: the op whose time is the pass's (its name in
    torch.profiler; None: the whole step, for optimizers not split into our ops) and its
    element reads + writes per parameter element, of parameter-dtype tensors (w, g and
    their copies) and of state-dtype tensors (momentum v, m, s, scratch)."""

    op: Optional[str]
    param: int
    state: int
    counted: str

    def bytes(self, numel: int, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
        return numel * (self.param * param_dtype.itemsize + self.state * state_dtype.itemsize)


@dataclass(frozen=True)
class Traffic:
    """A step's minimum traffic: its passes, in order."""

    passes: tuple

    @property
    def param(self) -> int:
        return sum(p.param for p in self.passes)

    @property
    def state(self) -> int:
        return sum(p.state for p in self.passes)

    @property
    def counted(self) -> str:
        return "; ".join(p.counted for p in self.passes)

    def bytes_per_step(self, numel: int, param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
        return sum(p.bytes(numel, param_dtype, state_dtype) for p in self.passes)

    def whole_step(self) -> "Traffic":
        """The same traffic as one pass, the step: for another implementation of the job,
        whose ops are not ours."""
        return Traffic((Pass(None, self.param, self.state, self.counted),))


UPDATE = Pass("layerwise_update_", 3, 2, "update: read w, g, v; write w, v")
PASS1 = Pass("layerwise_reduce", 2, 0, "pass 1: read w, g")
CHECK = Pass("layerwise_reduce", 1, 0, "non-finite check: read g")
QUOTIENTS = Pass("layerwise_reduce", 2, 2, "median pass: read w, g, write + read quotients")
AMP_CHECK = "aten::_amp_foreach_non_finite_check_and_unscale_"
INF_CHECK = Pass(AMP_CHECK, 1, 0, "GradScaler's Inf check: read g")
UNSCALE = Pass(AMP_CHECK, 2, 0, "scaler.unscale_: read g, write g/S")
ADAM_PASS1 = Pass("adam_reduce", 2, 2, "pass 1: read w, g, m, v")
ADAM_UPDATE = Pass("adam_update_", 3, 4, "update: read w, g, m, v; write w, m, v")


def _with(base: Pass, note: str) -> Pass:
    return Pass(base.op, base.param, base.state, f"{base.counted} ({note})")


TRAFFIC = {
    ("SGD", ""): Traffic((Pass(None, 3, 2, "update: read w, g, v; write w, v"),)),
    ("AdamW", ""): Traffic((Pass(None, 3, 4, "update: read w, g, m, v; write w, m, v"),)),
    ("LAMB", "no-clip"): Traffic((ADAM_PASS1, ADAM_UPDATE)),
    ("LAMB", "clip"): Traffic((Pass("grad_sq_sums", 1, 0, "global ‖g‖: read g"), ADAM_PASS1, ADAM_UPDATE)),
    ("LARS", "lag=0"): Traffic((PASS1, UPDATE)),
    ("LARS", "lag=0,reuse-w-norm"): Traffic((Pass(PASS1.op, 1, 0, "pass 1: read g (‖w‖ from the last update)"),
                                            _with(UPDATE, "‖w‖ of the result on the fly"))),
    ("LARS", "lag=1"): Traffic((CHECK, _with(UPDATE, "norms for the next step on the fly"))),
    ("LARS", "lag=1,no-skip"): Traffic((_with(UPDATE, "norms for the next step on the fly; skip_nonfinite=False: "
                                              "no pass 1"),)),
    ("MCLR", "exact"): Traffic((QUOTIENTS, UPDATE)),
    ("MCLR", "approx"): Traffic((Pass(PASS1.op, 2, 0, "median pass: read w, g (histogram on chip)"), UPDATE)),
    ("MCLR", "exact,lag=1"): Traffic((CHECK, Pass(UPDATE.op, 3, 4, f"{UPDATE.counted}; write + read quotients"))),
    ("MCLR", "approx,lag=1"): Traffic((CHECK, _with(UPDATE, "histogram on the fly"))),
    ("CBLR", "reuse"): Traffic((CHECK, _with(UPDATE, "norms on the fly; closure's grad write not counted"))),
    ("LARS", "lag=0,GradScaler"): Traffic((INF_CHECK, PASS1, _with(UPDATE, "g unscaled as read"))),
    ("LARS", "lag=0,unscale_"): Traffic((UNSCALE, PASS1, UPDATE)),
    ("MCLR", "exact,GradScaler"): Traffic((INF_CHECK, QUOTIENTS, _with(UPDATE, "g unscaled as read"))),
    ("MCLR", "exact,unscale_"): Traffic((UNSCALE, QUOTIENTS, UPDATE)),
    ("CBLR", "re-measure"): Traffic((
        Pass("probe_shift_", 3, 2, "shift: read w, s, write the copy of w, w + s and the realised "
             "displacement Δ (‖w_t‖ on the way)"),
        Pass(PASS1.op, 2, 1, "pass 1: read g, g(w+s), Δ (secant)"),
        Pass(UPDATE.op, 3, 2, "update: read the copy, g, v; write w, v (g is set aside, not copied; closures' "
             "grad writes not counted)"))),
}

# The cblr_ext variants: (optimizer, variant) -> constructor keywords.
VARIANTS = {
    ("LARS", "lag=0"): dict(lag=0),
    ("LARS", "lag=0,reuse-w-norm"): dict(lag=0, reuse_weight_norm=True),
    ("LARS", "lag=1"): dict(lag=1),
    ("LARS", "lag=1,no-skip"): dict(lag=1, skip_nonfinite=False),
    ("MCLR", "exact"): dict(median="exact"),
    ("MCLR", "approx"): dict(median="approx"),
    ("MCLR", "exact,lag=1"): dict(median="exact", lag=1),
    ("MCLR", "approx,lag=1"): dict(median="approx", lag=1),
    ("CBLR", "re-measure"): dict(curvature_interval=1),
    ("CBLR", "reuse"): dict(curvature_interval=CBLR_NEVER),
    ("LARS", "lag=0,GradScaler"): dict(lag=0),
    ("LARS", "lag=0,unscale_"): dict(lag=0),
    ("MCLR", "exact,GradScaler"): dict(median="exact"),
    ("MCLR", "exact,unscale_"): dict(median="exact"),
}
# Steps driven by torch.amp.GradScaler (scale 1, so the same gradients serve every step):
# variant -> whether scaler.unscale_ runs first (torch's way for an optimizer that cannot
# unscale) or the kernels unscale as they read.
AMP = {"lag=0,GradScaler": False, "exact,GradScaler": False, "lag=0,unscale_": True, "exact,unscale_": True}
# torch.compile of the reference step: the rules without a closure protocol.
COMPILED_VARIANTS = (("LARS", "lag=0"), ("MCLR", "exact"))
COMPILED = "torch.compile(reference)"


@dataclass
class Step:
    """A built case: ``run()`` is one optimizer step.  A CBLR step is
    ``step_with(closure)``; its closure only writes gradients, and the runner times
    each of its calls inside the step to leave it out (timing.own_work_timer)."""

    run: Callable[[], None]
    closure: Optional[Callable[[], None]] = None
    step_with: Optional[Callable[[Callable], None]] = None


@dataclass(frozen=True)
class Case:
    optimizer: str
    backend: str
    variant: str
    traffic: Traffic
    build: Callable  # (params, grad_sets) -> Step
    # The (optimizer, variant) whose reference-backend time the speed-up is taken over.
    compare_to: Optional[tuple] = None
    # cblr_ext keeps fp32 state for fp16/bf16 parameters; torch keeps the parameter dtype.
    fp32_state: bool = False
    isolated: bool = False  # run in a child process under a time limit (compilation)

    @property
    def key(self) -> tuple:
        return (self.optimizer, self.backend, self.variant)

    def state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(param_dtype, torch.float32) if self.fp32_state else param_dtype


def _cblr_ext_step(optimizer, backend, variant, compiled=False):
    cls = getattr(cblr_ext, optimizer)
    kwargs = dict(lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, backend=backend, **VARIANTS[optimizer, variant])
    if optimizer != "CBLR":
        kwargs["trust_coefficient"] = TRUST

    def build(params, grad_sets):
        opt = cls(params, **kwargs)
        if variant in AMP:
            return Step(_scaled_step(opt, params[0].device, unscale_first=AMP[variant]))
        if optimizer != "CBLR" and compiled:
            # An eager step creates the state first: the first compiled call is then the only
            # compilation (its time is the record's first_call_s), none is left to a timed call.
            opt.step()
            return Step(torch.compile(opt.step))
        if optimizer != "CBLR":
            return Step(opt.step)
        calls = itertools.count()

        def closure():
            # Alternate two gradient sets so the secant sees a real gradient change.
            for p, g in zip(params, grad_sets[next(calls) % 2]):
                p.grad.copy_(g)

        return Step(lambda: opt.step(closure), closure, opt.step)

    return build


def _scaled_step(opt, device, unscale_first):
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=2**30)
    scaler.scale(torch.ones((), device=device))  # creates its scale (the gradients stand for scaled ones)

    def run():
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    return run


def _torch_sgd(flag):
    def build(params, grad_sets):
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **{flag: True})
        return Step(opt.step)
    return build


def _torch_adamw(flag):
    def build(params, grad_sets):
        return Step(torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **{flag: True}).step)
    return build


# LAMB's variants: the global gradient-norm clipping off, and at apex's (and pytorch-optimizer's) 1.0.
LAMB_CLIP = {"no-clip": None, "clip": 1.0}


def _lamb(backend, variant):
    def build(params, grad_sets):
        return Step(cblr_ext.LAMB(params, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=LAMB_CLIP[variant],
                                  backend=backend).step)
    return build


def _pytorch_optimizer_lamb(foreach):
    def build(params, grad_sets):
        from pytorch_optimizer import Lamb  # optional: pip install -e ".[bench]"
        # pre_norm: its global clipping (max_grad_norm alone does not clip); it scales .grad in place
        return Step(Lamb(params, lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=LAMB_CLIP["clip"], pre_norm=True,
                         foreach=foreach).step)
    return build


def _pytorch_optimizer_lars(foreach):
    def build(params, grad_sets):
        from pytorch_optimizer import LARS  # optional: pip install -e ".[bench]"
        opt = LARS(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coefficient=TRUST,
                   foreach=foreach)
        return Step(opt.step)
    return build


def all_cases(device: torch.device, compile_reference: bool, only_backends=None) -> tuple:
    """(cases, {backend: why it is not benchmarked}) for ``device``; ``only_backends``
    restricts the fused backends (the reference, the speed-up base, always runs)."""
    device = torch.device(device)
    cases = [Case("SGD", "torch", "fused", TRAFFIC["SGD", ""], _torch_sgd("fused")),
             Case("SGD", "torch", "foreach", TRAFFIC["SGD", ""], _torch_sgd("foreach")),
             Case("AdamW", "torch", "fused", TRAFFIC["AdamW", ""], _torch_adamw("fused")),
             Case("AdamW", "torch", "foreach", TRAFFIC["AdamW", ""], _torch_adamw("foreach"))]
    backends = cblr_ext.available_backends(device)
    missing = {}
    if device.type == "cpu" and "triton" in backends:
        # TRITON_INTERPRET=1 runs kernels in a Python interpreter: for tests, not timing.
        backends.remove("triton")
        missing["triton"] = "runs on CPU only in the Triton interpreter (TRITON_INTERPRET=1): not timed"
    if only_backends is not None:
        for name in [b for b in backends if b != "reference" and b not in only_backends]:
            backends.remove(name)
            missing[name] = "not selected (--backend)"
    for name in BACKENDS:
        if name not in ("auto", *backends, *missing):
            reason = cblr_ext.backends.why_unavailable(name, device)
            if reason is not None:
                missing[name] = reason
    for (optimizer, variant), traffic in ((k, TRAFFIC[k]) for k in VARIANTS):
        for backend in backends:
            cases.append(Case(optimizer, backend, variant, traffic, _cblr_ext_step(optimizer, backend, variant),
                              compare_to=(optimizer, variant), fp32_state=True))
    if compile_reference:
        for optimizer, variant in COMPILED_VARIANTS:
            cases.append(Case(optimizer, COMPILED, variant, TRAFFIC[optimizer, variant].whole_step(),
                              _cblr_ext_step(optimizer, "reference", variant, compiled=True),
                              compare_to=(optimizer, variant), fp32_state=True, isolated=True))
    else:
        missing[COMPILED] = "skipped (--quick or --no-compile)"
    for foreach, variant in ((True, "foreach"), (False, "per-param")):
        cases.append(Case("LARS", "pytorch-optimizer", variant, TRAFFIC["LARS", "lag=0"].whole_step(),
                          _pytorch_optimizer_lars(foreach), compare_to=("LARS", "lag=0")))
    for variant in LAMB_CLIP:
        for backend in (b for b in backends if b in ADAM_BACKENDS):
            cases.append(Case("LAMB", backend, variant, TRAFFIC["LAMB", variant], _lamb(backend, variant),
                              compare_to=("LAMB", variant), fp32_state=True))
    for foreach, variant in ((True, "foreach"), (False, "per-param")):
        cases.append(Case("LAMB", "pytorch-optimizer", f"clip,{variant}", TRAFFIC["LAMB", "clip"].whole_step(),
                          _pytorch_optimizer_lamb(foreach), compare_to=("LAMB", "clip")))
    return cases, missing


def find(cases, key) -> Case:
    return next(c for c in cases if c.key == tuple(key))
