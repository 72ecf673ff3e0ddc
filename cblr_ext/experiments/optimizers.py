"""The optimizers compared, each with its learning-rate grid (the same size for all)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .. import CBLR, LAMB, LARS, MCLR

MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# SGD's grid is of its lr at this batch size; the linear scaling rule sets the rest.
SGD_BASE_BATCH = 128


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    make: Callable[[list, float], torch.optim.Optimizer]
    lr_grid: Tuple[float, ...]
    lr_rule: Optional[str]   # ScaledLR rule: how the lr follows the batch size
    base_batch: int = SGD_BASE_BATCH


def _layerwise(cls, **options):
    """``cls`` with the study's momentum and weight decay; ``options`` override its defaults."""
    return lambda params, lr: cls(params, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **options)


def _cblr(interval):
    return _layerwise(CBLR, curvature_interval=interval)


# Five points a factor 2 apart around the rules' usual scales (docs/algorithm.md: LARS/MCLR
# γ around 1-100 with η = 1e-3, CBLR γ the fraction of the secant-Newton step, around 1);
# a first sweep with three points picked the grid's edge in many large-batch cells, and
# adapting 1-D tensors (the LARS and MCLR defaults since issue 21) moved LARS's best γ on
# MNIST-1D from 16 to 64 (docs/experiments.md).
CBLR_GRID = (0.2, 0.4, 0.8, 1.6, 3.2)
OPTIMIZERS = {
    "SGD": OptimizerSpec("SGD", lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM,
                                                                 weight_decay=WEIGHT_DECAY),
                         (0.0125, 0.025, 0.05, 0.1, 0.2), "linear"),
    "LARS": OptimizerSpec("LARS", lambda params, lr: LARS(params, lr=lr, momentum=MOMENTUM,
                                                          weight_decay=WEIGHT_DECAY),
                          (8.0, 16.0, 32.0, 64.0, 128.0), None),
    "MCLR": OptimizerSpec("MCLR", lambda params, lr: MCLR(params, lr=lr, momentum=MOMENTUM,
                                                          weight_decay=WEIGHT_DECAY),
                          (2.0, 4.0, 8.0, 16.0, 32.0), None),
    "CBLR-k1": OptimizerSpec("CBLR-k1", _cblr(1), CBLR_GRID, None),
    "CBLR-k4": OptimizerSpec("CBLR-k4", _cblr(4), CBLR_GRID, None),
    "CBLR-k16": OptimizerSpec("CBLR-k16", _cblr(16), CBLR_GRID, None),
}

# Candidates for the defaults (docs/experiments.md, "MNIST-1D"): each names every option
# whose default depends on the rule, so its meaning does not change when the defaults do.
SCREENED_OPTIONS = ("exclude_1d", "curvature_ema", "max_ratio")
_CANDIDATES = {
    "LARS-x1d": (LARS, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=None), (2.0, 4.0, 8.0, 16.0, 32.0)),
    "LARS-all": (LARS, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=None), (8.0, 16.0, 32.0, 64.0, 128.0)),
    "MCLR-x1d": (MCLR, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=None), (1.0, 2.0, 4.0, 8.0, 16.0)),
    "MCLR-x1d-cap1": (MCLR, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=1.0), (1.0, 2.0, 4.0, 8.0, 16.0)),
    "MCLR-all": (MCLR, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=None), (4.0, 8.0, 16.0, 32.0, 64.0)),
    "MCLR-all-cap1": (MCLR, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=1.0), (4.0, 8.0, 16.0, 32.0, 64.0)),
    "MCLR-all-ema0.9": (MCLR, dict(exclude_1d=False, curvature_ema=0.9, max_ratio=None), (4.0, 8.0, 16.0, 32.0, 64.0)),
    "MCLR-all-cap1-ema0": (MCLR, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=1.0), (2.0, 4.0, 8.0, 16.0, 32.0)),
    "MCLR-all-cap1-ema0.5": (MCLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=1.0), (2.0, 4.0, 8.0, 16.0, 32.0)),
    "CBLR-x1d": (CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=None), (0.1, 0.2, 0.4, 0.8, 1.6)),
    "CBLR-all": (CBLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=None), (0.1, 0.2, 0.4, 0.8, 1.6)),
    "CBLR-all-ema0.9": (CBLR, dict(exclude_1d=False, curvature_ema=0.9, max_ratio=None), (0.1, 0.2, 0.4, 0.8, 1.6)),
    "CBLR-x1d-nocap": (CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=None), CBLR_GRID),
    "CBLR-x1d-cap2": (CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=2.0), CBLR_GRID),
    "CBLR-x1d-cap2-ema0": (CBLR, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=2.0), CBLR_GRID),
    # the defaults the transfer protocol chose, by the names its recorded run gave them
    "MCLR-cap0.25": (MCLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=0.25), (2.0, 4.0, 8.0, 16.0, 32.0)),
    "CBLR-cap1": (CBLR, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=1.0), CBLR_GRID),
}
OPTIMIZERS.update({name: OptimizerSpec(name, _layerwise(cls, **options), grid, None)
                   for name, (cls, options, grid) in _CANDIDATES.items()})


def root2_grid(centre: float, low: int = -2, high: int = 2) -> Tuple[float, ...]:
    """Points a factor √2 apart, ``centre``·2^(k/2) for k = low … high (five by default): a
    finer look at the edge of stability."""
    return tuple(centre * 2.0 ** (k / 2) for k in range(low, high + 1))


# The ×√2 screen at batch 4096 on MNIST-1D (docs/experiments.md), in three rounds.  Round 1
# centres each grid between the best γ of the ×2 grid and the next point down (the best
# sat at the edge: the next point up diverged); round 2 moves the grids whose best was at
# an end, and bounds CBLR's and MCLR's ratios (r_max), which round 1 found to matter;
# round 3 brackets the defaults chosen from them.  Like the candidates above, each entry
# names every option whose default depends on the rule (SCREENED_OPTIONS).
_EDGE = {
    "SGD-edge": (1, torch.optim.SGD, {}, 0.025, "linear"),
    "LARS-edge": (1, LARS, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=None), 32.0 * 2 ** 0.5, None),
    "MCLR-edge": (1, MCLR, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=1.0), 8.0 * 2 ** 0.5, None),
    "MCLR-ema0.5-edge": (1, MCLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=1.0), 8.0 * 2 ** 0.5, None),
    "CBLR-edge": (1, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=None), 0.8 * 2 ** 0.5, None),
    "CBLR-ema0.9-edge": (1, CBLR, dict(exclude_1d=True, curvature_ema=0.9, max_ratio=None), 0.8 * 2 ** 0.5, None),
    "CBLR-cap2-edge": (1, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=2.0), 0.8 * 2 ** 0.5, None),
    "LARS-edge2": (2, LARS, dict(exclude_1d=False, curvature_ema=0.0, max_ratio=None), 64.0 * 2 ** 0.5, None),
    "CBLR-cap1-edge2": (2, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=1.0), 1.6 * 2 ** 0.5, None),
    "CBLR-cap2-edge2": (2, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=2.0), 1.6, None),
    "CBLR-cap4-edge2": (2, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=4.0), 1.6, None),
    "CBLR-cap2-ema0.9-edge2": (2, CBLR, dict(exclude_1d=True, curvature_ema=0.9, max_ratio=2.0), 1.6, None),
    "MCLR-ema0.5-cap0.25-edge2": (2, MCLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=0.25), 16 * 2 ** 0.5,
                                  None),
    "MCLR-ema0.5-cap0.1-edge2": (2, MCLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=0.1), 32 * 2 ** 0.5,
                                 None),
    "CBLR-cap3-edge3": (3, CBLR, dict(exclude_1d=True, curvature_ema=0.5, max_ratio=3.0), 1.6, None),
    "CBLR-cap2-ema0-edge3": (3, CBLR, dict(exclude_1d=True, curvature_ema=0.0, max_ratio=2.0), 1.6, None),
    "CBLR-cap2-all-edge3": (3, CBLR, dict(exclude_1d=False, curvature_ema=0.5, max_ratio=2.0), 1.6, None),
    "MCLR-ema0.3-edge3": (3, MCLR, dict(exclude_1d=False, curvature_ema=0.3, max_ratio=1.0), 16.0, None),
    "MCLR-ema0.7-edge3": (3, MCLR, dict(exclude_1d=False, curvature_ema=0.7, max_ratio=1.0), 16.0, None),
}
EDGE_ROUNDS = {k: tuple(name for name, spec in _EDGE.items() if spec[0] == k) for k in (1, 2, 3)}
OPTIMIZERS.update({name: OptimizerSpec(name, _layerwise(cls, **options), root2_grid(centre), rule)
                   for name, (_, cls, options, centre, rule) in _EDGE.items()})


# The Adam base (docs/experiments.md, "The Adam base"): AdamW, LAMB and the median and secant
# rules on the Adam direction, with the AdamW convention's weight decay (0.01, decoupled) for all four and
# otherwise each one's defaults (LAMB: apex's ε = 1e-6 and global clip 1.0; AdamW: torch's).
# Their γ follows the batch by the square-root rule (Malladi et al. 2022 for Adam; LARS's best
# γ on MNIST-1D doubled per ×4 batch, 16 → 32 → 64 from 256 to 4096), from batch 4096.  The
# centres: a ×4 look at batch 4096 (MNIST-1D, 15 epochs, seed 0) found every one's best
# validation accuracy at 0.064 (AdamW 1e-3 … 0.064: 44, 62, 71, 73 %; LAMB and LAMB-mclr
# 4e-3 … 0.256: 22/22, 51/53, 78/83, 9/9 %, the last diverged).  LAMB-cblr's γ is the fraction
# of the secant-Newton step (as CBLR's), so its look, the same ×4 points from 4e-3, went on
# to 65.536: 12, 18, 26, 38, 61, 72, 9, 10 %, the best at 4.096 (16.384 stalled at chance).
ADAM_WEIGHT_DECAY = 0.01
ADAM_BASE_BATCH = 4096


def _lamb(rule, **options):
    return lambda params, lr: LAMB(params, lr=lr, weight_decay=ADAM_WEIGHT_DECAY, rule=rule, **options)


_ADAM_BASE = {
    "AdamW": (lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=ADAM_WEIGHT_DECAY), 0.064),
    "LAMB": (_lamb("lars"), 0.064),
    "LAMB-mclr": (_lamb("mclr"), 0.064),
    # re-measuring κ every step, as the SGD base's CBLR-k1 (the main study's CBLR)
    "LAMB-cblr": (_lamb("cblr", curvature_interval=1), 4.096),
}
OPTIMIZERS.update({name: OptimizerSpec(name, make, tuple(centre * 2.0 ** k for k in range(-2, 3)), "sqrt",
                                       ADAM_BASE_BATCH)
                   for name, (make, centre) in _ADAM_BASE.items()})
