"""Learning rate scaled with the batch size (linear or square root), with warm-up."""
from __future__ import annotations

import math
from typing import Optional

import torch


class ScaledLR:
    """Sets every param group's lr to ``base_lr · scale(batch) · warm-up(step) · decay``.

    ``base_lr`` is each group's lr when this is created, meant for
    ``base_batch_size``.  ``rule`` "linear" scales by batch/base (Goyal et al.
    2017), "sqrt" by its square root (Krizhevsky 2014), None not at all.  During
    the first ``warmup_steps`` steps the lr ramps linearly from 1/warmup_steps of
    its value to all of it.
    """

    RULES = {"linear": lambda q: q, "sqrt": math.sqrt, None: lambda q: 1.0}

    def __init__(self, optimizer: torch.optim.Optimizer, base_batch_size: int, *,
                 rule: Optional[str] = "linear", warmup_steps: int = 0):
        if rule not in self.RULES:
            raise ValueError(f"rule must be 'linear', 'sqrt' or None, got {rule!r}")
        if base_batch_size < 1:
            raise ValueError(f"base_batch_size must be >= 1, got {base_batch_size!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}")
        self.optimizer = optimizer
        self.base_batch_size = base_batch_size
        self.rule = rule
        self.warmup_steps = warmup_steps
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]

    def factor(self, batch_size: int, step: int, decay: float = 1.0) -> float:
        """The multiplier of the base lr at this batch size and step (counted from 0)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.RULES[self.rule](batch_size / self.base_batch_size) * warmup * decay

    def apply(self, batch_size: int, step: int, decay: float = 1.0) -> float:
        """Write the lr of every group for this step; returns the factor used."""
        factor = self.factor(batch_size, step, decay)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            if isinstance(group["lr"], torch.Tensor):   # a tensor lr (e.g. captured in a graph) stays one
                group["lr"].fill_(base * factor)
            else:
                group["lr"] = base * factor
        return factor
