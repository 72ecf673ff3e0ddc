"""The parity table, in the style of torch's ``OptimizerInfo``/``optim_db``: every
optimizer with its own valid settings and their variants, the backends and dtypes it
runs, an independent implementation where one exists, and what its conformance checks
need (which state it keeps, which hyperparameters it refuses, which checks do not apply).

An optimizer inherits the whole parity suite (tests/test_parity.py) and conformance suite
(tests/test_conformance.py) by an entry here; a new backend inherits them by being
available on the machine (``cblr_ext.available_backends``) and listing its dtypes here.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

from cblr_ext import CBLR, LAMB, LARS, MCLR


@dataclass(frozen=True)
class Independent:
    """An implementation outside this package that a variant of ours equals step by step:
    ``ours`` our keywords, ``build(params)`` theirs, and our learning rate at step t
    (from 1) is ``ours["lr"] * lr_factor(t)`` where the mapping needs a schedule."""

    name: str
    ours: dict
    build: Callable
    lr_factor: Callable = lambda t: 1.0


@dataclass(frozen=True)
class OptimizerInfo:
    cls: type
    # The keywords every variant starts from and the conformance checks construct with:
    # settings this optimizer accepts (LAMB refuses momentum, the SGD rules betas).
    base: dict
    # variant name -> keywords on top of ``base``
    variants: dict
    # The fused backends it has kernels in (the reference runs everything).
    backends: tuple = ("cpp", "triton", "cuda")
    independent: Optional[Independent] = None
    # Optimizer-wide options (not group keys), each set away from its default: a copy keeps them.
    optimizer_wide: dict = field(default_factory=dict)
    # A 0-d state tensor of every parameter and the dtype a loaded one takes.
    scalar_state: tuple = ()
    # A state tensor shaped like its parameter.
    shaped_state: str = ""
    # Group keys an older checkpoint lacks (loading gives them their defaults).
    newer_group_keys: tuple = ()
    # ((keywords, the error message), ...): tensor hyperparameters it refuses.
    bad_tensor_hyperparameters: tuple = ()
    # conformance check -> why it does not apply to this optimizer (a skip).
    not_applicable: dict = field(default_factory=dict)
    # conformance check -> what this optimizer does instead (a strict xfail: it flips when fixed).
    known_gaps: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def marks(self, check: str) -> list:
        """The pytest marks of conformance check ``check`` for this optimizer."""
        if check in self.not_applicable:
            return [pytest.mark.skip(reason=f"{self.name}: {self.not_applicable[check]}")]
        if check in self.known_gaps:
            return [pytest.mark.xfail(strict=True, reason=f"{self.name}: {self.known_gaps[check]}")]
        return []


SGD_BASE = dict(lr=0.5, momentum=0.9, weight_decay=5e-3)
SGD_CONFORMANCE = dict(
    optimizer_wide=dict(skip_nonfinite=False, reuse_weight_norm=False),
    scalar_state=("kappa", torch.float64),  # κ̄: SCALAR_DTYPE, whatever a checkpoint holds
    shaped_state="momentum_buffer",
    newer_group_keys=("adapt", "lag", "median", "curvature_interval", "backend"),
    bad_tensor_hyperparameters=(
        (dict(momentum=torch.tensor(0.9)), "momentum must be a Python number"),
        (dict(weight_decay=torch.tensor(0.1)), "weight_decay must be a Python number"),
        (dict(lr=torch.tensor(-1.0)), "Invalid learning rate: -1.0"),
        (dict(lr=torch.tensor([0.1, 0.2])), "one-element"),
        (dict(lr=torch.tensor(1)), "floating"),
    ),
)


def _pytorch_optimizer_lamb(params):
    """pytorch-optimizer's Lamb (the test extra), imported when its check runs."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    return pytorch_optimizer.Lamb(params, lr=0.02, eps=1e-8, weight_decay=0.0, foreach=False)


LAMB_BETA1 = 0.9

optim_db = [
    OptimizerInfo(LARS, SGD_BASE, {
        "momentum": {},
        "nesterov": dict(nesterov=True),
        "no_momentum": dict(momentum=0.0),
        "ema": dict(curvature_ema=0.5),
        "interval": dict(curvature_interval=2),
        "lag": dict(lag=1),
        "max_ratio": dict(max_ratio=2e-3),
    }, **SGD_CONFORMANCE),
    OptimizerInfo(MCLR, SGD_BASE, {
        "momentum": {},
        "nesterov": dict(nesterov=True),
        "approx": dict(median="approx"),
        "interval": dict(curvature_interval=3),
        "lag": dict(lag=1),
        "lag_approx": dict(lag=1, median="approx"),
    }, **SGD_CONFORMANCE),
    OptimizerInfo(CBLR, {**SGD_BASE, "lr": 0.1}, {
        "momentum": {},
        "nesterov": dict(nesterov=True),
        "no_momentum": dict(momentum=0.0),
        "interval": dict(curvature_interval=3),
        "ema": dict(curvature_ema=0.9),
    }, **SGD_CONFORMANCE),
    OptimizerInfo(
        LAMB, dict(lr=0.02, weight_decay=0.01, max_grad_norm=None), {
            "lars": {},
            # The bounds bind on some steps or layers of the parity scenario (tests/test_parity.py):
            # ‖g‖ is 0.37..0.63 there, r 0.20..0.63 (lars) and 0.004..0.015 (mclr).
            "lars_grad_clip": dict(max_grad_norm=0.5),
            "lars_trust_clip": dict(max_ratio=0.3),
            "lars_nvlamb": dict(weight_decay=0.0, nvlamb=True),
            "lars_no_decay": dict(weight_decay=0.0),  # not adapted without nvlamb: Adam's step
            "lars_exclude_1d": dict(exclude_1d=True),
            "lars_no_bias_correction": dict(bias_correction=False, max_grad_norm=1.0),
            "mclr": dict(rule="mclr", trust_coefficient=0.02),
            "mclr_grad_and_trust_clip": dict(rule="mclr", trust_coefficient=0.02, max_grad_norm=0.5, max_ratio=0.008),
            "mclr_nvlamb": dict(rule="mclr", trust_coefficient=0.02, weight_decay=0.0, nvlamb=True),
        },
        backends=("cpp", "triton"),
        # pytorch-optimizer's Lamb divides its step by 1 − β1^t, does not correct v, clamps
        # ‖w‖ at 10 and takes r = ‖w‖/(‖u‖ + ε) (docs/algorithm.md): ours at λ = 0 without
        # bias correction, adapting (nvlamb), unclipped, with γ_t = γ/(1 − β1^t).
        independent=Independent(
            "pytorch-optimizer Lamb",
            dict(lr=0.02, eps=1e-8, weight_decay=0.0, bias_correction=False, max_grad_norm=None, nvlamb=True),
            _pytorch_optimizer_lamb, lambda t: 1 / (1 - LAMB_BETA1 ** t)),
        optimizer_wide=dict(skip_nonfinite=False),
        scalar_state=("step", torch.float32),  # the bias correction's count, fp32 as torch's Adam
        shaped_state="exp_avg",
        newer_group_keys=("maximize",),
        bad_tensor_hyperparameters=(
            (dict(weight_decay=torch.tensor(0.1)), "weight_decay must be a Python number"),
            (dict(eps=torch.tensor(1e-6)), "eps must be a Python number"),
            (dict(betas=(torch.tensor(0.9), 0.999)), "betas must be a Python number"),
            (dict(lr=torch.tensor(-1.0)), "Invalid learning rate: -1.0"),
            (dict(lr=torch.tensor([0.1, 0.2])), "one-element"),
            (dict(lr=torch.tensor(1)), "floating"),
        ),
        not_applicable={
            "construct_with_an_unrunnable_backend": "its backends are checked at construction (there is no cuda one)",
        },
    ),
]

# The dtypes each fused backend runs (the reference runs every one).
BACKEND_DTYPES = {
    "cpp": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}

# Largest relative difference of any parameter from the reference after every step:
# backends sum norms in other orders, and a norm rounded to fp32 (the per-layer scalars
# are fp32 for every dtype, docs/algorithm.md) may then differ by an ulp, which moves the
# ratio by ~6e-8; 16-bit parameters may round the other way after such a move.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def cases(backend=None):
    """(test id, OptimizerInfo, variant keywords) for every row of the table; with
    ``backend``, the rows of the optimizers that have kernels in it."""
    for info in optim_db:
        if backend is not None and backend not in info.backends:
            continue
        for name, kwargs in info.variants.items():
            yield f"{info.name}-{name}", info, {**info.base, **kwargs}


def entries(check: str) -> list:
    """Every optimizer of the table as a pytest parameter of conformance check ``check``,
    with the entry's skip or strict xfail for it."""
    return [pytest.param(info, id=info.name, marks=info.marks(check)) for info in optim_db]
