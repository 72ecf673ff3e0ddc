"""Study tools for large-batch training (Gao & Zhong, arXiv 2012.08795): small-loss
discarding, batch-size schedules with learning-rate scaling, and structural
telemetry (per-layer ‖g‖, ‖s‖, κ, r and the loss change per step).

The optimizers never import this package; it uses only their public API.
"""
from .discard import discard_small_losses
from .lr_scaling import ScaledLR
from .schedule import BatchSizeSchedule
from .telemetry import StructureLogger

__all__ = ["discard_small_losses", "BatchSizeSchedule", "ScaledLR", "StructureLogger"]
