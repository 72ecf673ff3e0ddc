"""The sampling loop on a fake clock: the stopping rule ends a steady case at the
fewest samples, a noisy one at its budget, and a round with an impossible time
(a clock that steps back, so that a CBLR step minus its closure calls comes out
negative) is discarded and repeated instead of becoming a figure."""
import itertools

import pytest

from bench import stats, timing


class ScriptedClock:
    """Marks come from a script (seconds), one per ``mark()``; a real clock's
    differences are end − start, and so are these."""

    def __init__(self, marks):
        self._marks = iter(marks)
        self.calls = 0

    def sync(self):
        pass

    def mark(self):
        self.calls += 1
        return next(self._marks)

    def seconds(self, start, end):
        return end - start


def steady_marks(duration):
    """start, end, start, end, ...: every call takes ``duration``."""
    now = itertools.count()
    for t in now:
        yield float(t)
        yield t + duration


def budget(**changes):
    return timing.Budget(**{**dict(warmup=0, min_samples=stats.MIN_SAMPLES, max_samples=50, seconds=60.0),
                            **changes})


def test_a_steady_case_stops_at_the_fewest_samples():
    clock = ScriptedClock(steady_marks(0.010))
    out = timing.sample([timing.call_timer(lambda: None)], budget(), clock)
    assert out.precise and len(out.series[0]["seconds"]) == stats.MIN_SAMPLES
    assert out.series[0]["seconds"] == pytest.approx([0.010] * stats.MIN_SAMPLES)


def test_a_noisy_case_runs_until_max_samples_and_is_marked():
    durations = itertools.cycle([0.010, 0.020])

    def marks():
        for t in itertools.count():
            yield float(t)
            yield t + next(durations)

    out = timing.sample([timing.call_timer(lambda: None)], budget(max_samples=31), ScriptedClock(marks()))
    assert not out.precise and len(out.series[0]["seconds"]) == 31


def test_the_time_budget_ends_a_noisy_case_after_the_fewest_samples():
    durations = itertools.cycle([0.010, 0.020])

    def marks():
        for t in itertools.count():
            yield float(t)
            yield t + next(durations)

    out = timing.sample([timing.call_timer(lambda: None)], budget(seconds=0.0), ScriptedClock(marks()))
    assert not out.precise and len(out.series[0]["seconds"]) == stats.MIN_SAMPLES


def own_work_marks(bad_rounds):
    """Marks of a CBLR step with two closure calls: step start, (closure start, end) × 2,
    step end.  Good rounds: 3 ms of own work + 2 × 1 ms of closure.  In a bad round the
    clock steps back before the step ends: total 1 ms, closures 2 ms, own work −1 ms."""
    for r in itertools.count():
        t = 100.0 * r
        good = [t, t + 1e-3, t + 2e-3, t + 3e-3, t + 4e-3, t + 5e-3]
        yield from ([t, t + 1e-3, t + 2e-3, t + 3e-3, t + 4e-3, t + 1e-3] if r in bad_rounds else good)


def cblr_like_step(closure):
    closure()
    closure()


def test_a_negative_own_work_time_is_repeated_not_recorded():
    clock = ScriptedClock(own_work_marks(bad_rounds={2}))
    timer = timing.own_work_timer(cblr_like_step, lambda: None)
    out = timing.sample([timer], budget(), clock)
    series = out.series[0]
    assert len(series["seconds"]) == stats.MIN_SAMPLES  # the round was repeated ...
    assert clock.calls == 6 * (stats.MIN_SAMPLES + 1)  # ... one more round was timed
    assert series["seconds"] == pytest.approx([3e-3] * stats.MIN_SAMPLES)  # ... and never recorded
    assert series["closure_calls"] == [2] * stats.MIN_SAMPLES
    assert series["closure_seconds"] == pytest.approx([1e-3] * stats.MIN_SAMPLES)
    assert series["with_closure_seconds"] == pytest.approx([5e-3] * stats.MIN_SAMPLES)
    (rejected,) = out.rejected
    assert rejected["round"] == 2 and rejected["measured"]["seconds"] == pytest.approx(-1e-3)


def test_a_rejected_round_drops_every_timer_of_that_round():
    """The baseline's time of a rejected round goes too: the series stay paired."""
    step = timing.own_work_timer(cblr_like_step, lambda: None)
    baseline = timing.call_timer(lambda: None)
    own = own_work_marks(bad_rounds={0})

    def marks():  # per round: the step's 6 marks, then the baseline's 2 (2 ms each)
        for r in itertools.count():
            yield from itertools.islice(own, 6)
            yield 100.0 * r + 50
            yield 100.0 * r + 50 + 2e-3 * (1 + r)  # the baseline slows round by round

    out = timing.sample([step, baseline], budget(seconds=0.0), ScriptedClock(marks()), paired=[(0, 1)])
    assert len(out.rejected) == 1
    assert out.series[1]["seconds"] == pytest.approx([2e-3 * (1 + r) for r in range(1, stats.MIN_SAMPLES + 1)])


def test_a_clock_that_keeps_failing_gives_an_error_not_a_figure():
    clock = ScriptedClock(own_work_marks(bad_rounds=set(range(1000))))
    with pytest.raises(timing.MeasurementError, match="impossible"):
        timing.sample([timing.own_work_timer(cblr_like_step, lambda: None)], budget(), clock)


def test_warmup_rounds_are_not_samples():
    clock = ScriptedClock(steady_marks(0.010))
    out = timing.sample([timing.call_timer(lambda: None)], budget(warmup=2), clock)
    assert len(out.series[0]["seconds"]) == stats.MIN_SAMPLES and clock.calls == 2 * (2 + stats.MIN_SAMPLES)


def test_summary_in_milliseconds():
    s = timing.summarize([0.001 * k for k in range(1, 11)])
    assert s["median_ms"] == pytest.approx(5.5) and s["samples"] == 10 and s["min_ms"] == pytest.approx(1.0)
    assert (s["ci_low_ms"], s["ci_high_ms"]) == pytest.approx((2.0, 9.0))  # ranks 2 and 9 of 10


def test_the_clock_follows_the_device():
    """The same sampling runs on CUDA events on a GPU (constructing one touches no GPU)."""
    import torch
    from bench import clock
    assert isinstance(clock.for_device(torch.device("cpu")), clock.WallClock)
    assert isinstance(clock.for_device(torch.device("cuda", 0)), clock.CudaEventClock)
