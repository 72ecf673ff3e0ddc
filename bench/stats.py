"""Intervals for the benchmark's figures, and the rule that stops sampling.

A shared machine's timings are skewed (a preempted call takes many times the
usual) and drift, so every figure is a median with the distribution-free
order-statistic interval of the median.  A ratio is the ratio of two medians, so
that it agrees with the two figures printed beside it; its interval is a
percentile bootstrap, resampling whole rounds where both were timed in the same
rounds (a slow moment slows both) and each sample on its own for two runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
# The fewest samples whose order-statistic interval reaches CONFIDENCE: with 6 the
# interval [min, max] misses the median with probability 2 / 2**6 = 3.1 %.
MIN_SAMPLES = 6
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A median and its CONFIDENCE interval; ``low``/``high`` are NaN where there
    are too few samples for one."""

    median: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """The larger distance from the median to a bound, relative to the median."""
        return max(self.median - self.low, self.high - self.median) / self.median

    def within(self, relative: float) -> bool:
        """Whether both bounds lie within ±``relative`` of the median (False when
        there is no interval)."""
        return math.isfinite(self.low) and math.isfinite(self.high) and self.half_width <= relative


def median_interval(values) -> Interval:
    """The median of ``values`` and the order-statistic interval of the population
    median (exact binomial coverage ≥ CONFIDENCE, no assumption on the distribution)."""
    values = np.asarray(values, dtype=float)
    median = float(np.median(values))
    ci = stats.quantile_test(values, q=median, p=0.5).confidence_interval(CONFIDENCE)
    return Interval(median, float(ci.low), float(ci.high))


def _ratio_of_medians(a, b, axis=-1):
    return np.median(a, axis=axis) / np.median(b, axis=axis)


def _bootstrap_ratio(numerators, denominators, paired: bool, seed: int) -> Interval:
    a, b = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    ci = stats.bootstrap((a, b), _ratio_of_medians, paired=paired, n_resamples=BOOTSTRAP_RESAMPLES,
                         confidence_level=CONFIDENCE, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval
    return Interval(float(_ratio_of_medians(a, b)), float(ci.low), float(ci.high))


def paired_ratio_interval(numerators, denominators, seed: int = 0) -> Interval:
    """median(numerators) / median(denominators), sample i of both from round i, with
    a percentile-bootstrap interval that resamples rounds."""
    return _bootstrap_ratio(numerators, denominators, paired=True, seed=seed)


def unpaired_ratio_interval(numerators, denominators, seed: int = 0) -> Interval:
    """median(numerators) / median(denominators) with a percentile-bootstrap interval,
    each sample resampled on its own (two runs share no rounds)."""
    return _bootstrap_ratio(numerators, denominators, paired=False, seed=seed)


def precise_enough(series: list, paired: list, relative: float) -> bool:
    """The stopping rule: every series' median interval, and the interval of every
    paired ratio (i, j) = series[i] / series[j], within ±``relative`` (the cheap
    order-statistic intervals first: a bootstrap takes milliseconds)."""
    if min(len(s) for s in series) < MIN_SAMPLES:
        return False
    return (all(median_interval(s).within(relative) for s in series)
            and all(paired_ratio_interval(series[i], series[j]).within(relative) for i, j in paired))
