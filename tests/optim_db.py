"""The parity table, in the style of torch's ``OptimizerInfo``/``optim_db``: every rule
with its variants, the dtypes each backend runs, and per-dtype tolerances.

A new backend inherits the whole parity suite (tests/test_parity.py) by being
available on the machine (``cblr_ext.available_backends``) and listing its dtypes here.
"""
from dataclasses import dataclass, field

import torch

from cblr_ext import CBLR, LARS, MCLR


@dataclass(frozen=True)
class OptimizerInfo:
    cls: type
    # variant name -> keywords (on top of BASE)
    variants: dict = field(default_factory=dict)


BASE = dict(lr=0.5, momentum=0.9, weight_decay=5e-3)

optim_db = [
    OptimizerInfo(LARS, {
        "momentum": {},
        "nesterov": dict(nesterov=True),
        "no_momentum": dict(momentum=0.0),
        "ema": dict(curvature_ema=0.5),
        "interval": dict(curvature_interval=2),
        "lag": dict(lag=1),
        "max_ratio": dict(max_ratio=2e-3),
    }),
    OptimizerInfo(MCLR, {
        "momentum": {},
        "nesterov": dict(nesterov=True),
        "approx": dict(median="approx"),
        "interval": dict(curvature_interval=3),
        "lag": dict(lag=1),
        "lag_approx": dict(lag=1, median="approx"),
    }),
    OptimizerInfo(CBLR, {
        "momentum": dict(lr=0.1),
        "nesterov": dict(lr=0.1, nesterov=True),
        "no_momentum": dict(lr=0.1, momentum=0.0),
        "interval": dict(lr=0.1, curvature_interval=3),
        "ema": dict(lr=0.1, curvature_ema=0.9),
    }),
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


def cases():
    """(test id, OptimizerInfo, variant keywords) for every row of the table."""
    for info in optim_db:
        for name, kwargs in info.variants.items():
            yield f"{info.cls.__name__}-{name}", info, {**BASE, **kwargs}
