"""cblr_ext: curvature-based layer-wise learning rates for large-batch training.

``LARS``, ``MCLR`` and ``CBLR`` are ``torch.optim`` optimizers sharing one
implementation (docs/algorithm.md), with interchangeable backends; ``LAMB`` applies the
layer-wise ratios to the Adam direction.
"""
from . import amp
from .backends import BackendUnavailable, available_backends
from .lamb import LAMB
from .optimizer import CBLR, LARS, MCLR, LayerwiseOptimizer

__all__ = ["LARS", "MCLR", "CBLR", "LAMB", "LayerwiseOptimizer", "available_backends", "BackendUnavailable"]
__version__ = "0.1.0"
