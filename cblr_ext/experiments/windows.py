"""The good-γ window: how far γ may move from the best before accuracy drops by more than a
tolerance, in octaves (factors of 2), read off accuracy measured on a γ grid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Window:
    best_gamma: float
    best_acc: float
    low_gamma: float        # where the accuracy crosses best − tolerance below the best ...
    high_gamma: float       # ... and above it (linear interpolation in log2 γ between grid points)
    low_censored: bool      # the window reaches the grid's lowest point: it may be wider there
    high_censored: bool     # ... the highest point

    @property
    def octaves(self) -> float:
        return math.log2(self.high_gamma / self.low_gamma)

    @property
    def censored(self) -> bool:
        return self.low_censored or self.high_censored


def _crossing(x_in, a_in, x_out, a_out, threshold):
    """log2 γ where the accuracy, linear in log2 γ from (x_in, a_in ≥ threshold) to
    (x_out, a_out < threshold), equals the threshold."""
    return x_in + (a_in - threshold) / (a_in - a_out) * (x_out - x_in)


def window(gammas: Sequence[float], accuracies: Sequence[float], tolerance: float = 1.0) -> Window:
    """The contiguous run of grid points around the best accuracy (ties: the smaller γ) that
    stay within ``tolerance`` of it, widened to where the accuracy crosses best − tolerance.
    ``gammas`` increasing and positive; accuracies and tolerance in the same unit (points)."""
    if len(gammas) != len(accuracies) or not gammas:
        raise ValueError(f"need as many accuracies as gammas (at least one), got {len(gammas)} and {len(accuracies)}")
    if any(g <= 0 for g in gammas) or any(b <= a for a, b in zip(gammas, gammas[1:])):
        raise ValueError(f"gammas must be positive and increasing, got {list(gammas)}")
    if not all(math.isfinite(a) for a in accuracies) or not tolerance >= 0:
        raise ValueError(f"accuracies must be finite and tolerance >= 0, got {list(accuracies)}, {tolerance!r}")
    x = [math.log2(g) for g in gammas]
    best = max(range(len(gammas)), key=lambda i: (accuracies[i], -i))
    threshold = accuracies[best] - tolerance
    low = best
    while low > 0 and accuracies[low - 1] >= threshold:
        low -= 1
    high = best
    while high < len(gammas) - 1 and accuracies[high + 1] >= threshold:
        high += 1
    x_low = x[0] if low == 0 else _crossing(x[low], accuracies[low], x[low - 1], accuracies[low - 1], threshold)
    x_high = (x[-1] if high == len(x) - 1
              else _crossing(x[high], accuracies[high], x[high + 1], accuracies[high + 1], threshold))
    return Window(gammas[best], accuracies[best], 2.0 ** x_low, 2.0 ** x_high, low == 0, high == len(x) - 1)
