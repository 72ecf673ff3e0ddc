"""The benchmark's statistics on synthetic samples: the order-statistic interval
of the median, the paired and unpaired ratio intervals, and the stopping rule.
Every expected value is derived here independently of bench/stats.py."""
import math

import numpy as np
import pytest

from bench import stats


def order_statistic_bounds(n, confidence=0.95):
    """1-based ranks (l, n + 1 - l) of the shortest symmetric interval of the median:
    the largest l with P(Binomial(n, 1/2) < l) <= (1 - confidence) / 2."""
    def below(l):
        return sum(math.comb(n, k) for k in range(l)) / 2**n
    l = max((l for l in range(1, n // 2 + 1) if below(l) <= (1 - confidence) / 2), default=None)
    return None if l is None else (l, n + 1 - l)


@pytest.mark.parametrize("n, ranks", [(6, (1, 6)), (10, (2, 9)), (20, (6, 15)), (50, (18, 33))])
def test_order_statistic_ranks_by_hand(n, ranks):
    # n = 10: P(B < 2) = (1 + 10) / 1024 = 1.07 % <= 2.5 %, P(B < 3) = 56 / 1024 = 5.5 % > 2.5 %.
    assert order_statistic_bounds(n) == ranks


@pytest.mark.parametrize("n", [6, 7, 10, 20, 33, 50, 101])
def test_median_interval_is_the_order_statistics(n):
    values = np.random.default_rng(n).lognormal(size=n)
    lo, hi = order_statistic_bounds(n)
    ordered = np.sort(values)
    iv = stats.median_interval(values)
    assert iv.median == np.median(values)
    assert (iv.low, iv.high) == (ordered[lo - 1], ordered[hi - 1])


def test_too_few_samples_have_no_interval():
    iv = stats.median_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # 2 / 2**5 = 6.25 % > 5 %
    assert iv.median == 3.0 and math.isnan(iv.low) and math.isnan(iv.high)
    assert not iv.within(0.5)
    assert stats.MIN_SAMPLES == 6 and order_statistic_bounds(5) is None


def numpy_bootstrap(a, b, paired, draws=20000, seed=7):
    """2.5 / 97.5 percentiles of median(a*) / median(b*), written out with numpy:
    rounds resampled together when ``paired``, each sample on its own when not."""
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, a.size, (draws, a.size))
    ib = ia if paired else rng.integers(0, b.size, (draws, b.size))
    return np.percentile(np.median(a[ia], axis=1) / np.median(b[ib], axis=1), [2.5, 97.5])


def test_paired_ratio_is_the_ratio_of_the_medians_printed_beside_it():
    rng = np.random.default_rng(1)
    step, sgd = rng.gamma(30, 0.5, size=40), rng.gamma(30, 0.3, size=40)
    iv = stats.paired_ratio_interval(step, sgd)
    assert iv.median == np.median(step) / np.median(sgd)
    low, high = numpy_bootstrap(step, sgd, paired=True)
    assert iv.low == pytest.approx(low, rel=0.02) and iv.high == pytest.approx(high, rel=0.02)


def test_paired_ratio_cancels_a_drift_shared_by_the_round():
    baseline = np.linspace(5.0, 11.0, 30)  # the machine slows down 2x over the run
    step = 1.5 * baseline  # and the step with it, round by round
    iv = stats.paired_ratio_interval(step, baseline)
    # Every resample of rounds has median(1.5 b*) / median(b*) = 1.5: no width at all.
    assert (iv.median, iv.low, iv.high) == pytest.approx((1.5, 1.5, 1.5))
    # The same times, unpaired, spread over the drift.
    assert not stats.unpaired_ratio_interval(step, baseline).within(0.05)
    assert not stats.median_interval(step).within(0.05)


def test_unpaired_ratio_matches_a_numpy_percentile_bootstrap():
    rng = np.random.default_rng(2)
    a, b = rng.gamma(20, 0.1, size=40), rng.gamma(20, 0.2, size=25)
    iv = stats.unpaired_ratio_interval(a, b)
    assert iv.median == np.median(a) / np.median(b)
    low, high = numpy_bootstrap(a, b, paired=False)
    assert iv.low == pytest.approx(low, rel=0.02) and iv.high == pytest.approx(high, rel=0.02)


def test_unpaired_ratio_of_identical_runs_contains_one():
    x = np.random.default_rng(3).lognormal(0, 0.1, size=30)
    iv = stats.unpaired_ratio_interval(x, x)
    assert iv.median == 1.0 and iv.low < 1.0 < iv.high


def test_within_bounds_both_sides():
    assert stats.Interval(100.0, 95.0, 105.0).within(0.05)
    assert not stats.Interval(100.0, 99.0, 105.5).within(0.05)  # the upper side decides
    assert stats.Interval(100.0, 99.0, 105.5).half_width == pytest.approx(0.055)


def test_stopping_rule_needs_the_series_and_their_paired_ratio():
    steady = [100.0, 101.0] * 10
    assert stats.precise_enough([steady, steady], [(0, 1)], 0.05)
    assert not stats.precise_enough([steady[:5], steady[:5]], [], 0.05)  # no interval below 6 samples
    noisy = [100.0, 130.0] * 10  # interval [100, 130] around a median of 115: ±13 %
    assert not stats.precise_enough([steady, noisy], [], 0.05)
    # Each series alone within ±4 %, but they move in opposite directions round by
    # round: a resample with more of one kind of round has medians 96 / 104 = 0.92
    # or 104 / 96 = 1.08, so the ratio's interval stays ±8 % wide.
    up, down = [96.0, 104.0] * 10, [104.0, 96.0] * 10
    assert stats.precise_enough([up, down], [], 0.05)
    assert not stats.precise_enough([up, down], [(0, 1)], 0.05)
