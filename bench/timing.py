"""Sampling of timed calls: warm-up, then rounds (every timer once per round, in
turn) until the medians and their ratios are precise enough or the time budget
is spent.  A round with an impossible time (not positive, not finite) is a
measurement error: it is discarded, counted and repeated, never a sample."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import stats


@dataclass(frozen=True)
class Budget:
    """How long to measure one case: ``warmup`` untimed rounds (after the runner's
    first call, which also compiles and allocates state), then rounds until every
    median interval and paired ratio interval is within ±``target`` of its median,
    at least ``min_samples`` and at most ``max_samples`` rounds, stopping after
    ``seconds`` once ``min_samples`` are in; then ``profiled_steps`` untimed steps under
    the profiler, pass by pass (passes.py, CPU only)."""

    warmup: int
    min_samples: int
    max_samples: int
    seconds: float
    target: float = 0.05
    profiled_steps: int = 5


FULL = Budget(warmup=1, min_samples=stats.MIN_SAMPLES, max_samples=400, seconds=10.0)
QUICK = Budget(warmup=1, min_samples=stats.MIN_SAMPLES, max_samples=60, seconds=1.0, profiled_steps=1)
# A case whose rejected rounds outnumber its accepted ones (and at least this many) has no figure.
MAX_REJECTED = 10


class MeasurementError(RuntimeError):
    """Too many rounds had impossible times: the case gets an error, not a figure."""


def last_level_cache_bytes(device: torch.device) -> int:
    """The largest cache's size: the GPU's L2, or the CPU's last level (Linux sysfs;
    64 MiB where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 * 2**20)


class CacheFlush:
    """Called before each timed call, untimed: reads a buffer twice the size of the
    largest cache.  In training the forward and backward passes stream far more than
    the caches hold between two optimizer steps, so every step starts cold; timed back
    to back, a step whose data happen to fit in the cache would look faster than it is.
    Reading leaves clean lines: no write-backs of the flush itself land in the timing."""

    def __init__(self, device: torch.device):
        self.bytes = 2 * last_level_cache_bytes(device)
        self._buffer = torch.ones(self.bytes, dtype=torch.uint8, device=device)

    def __call__(self):
        self._buffer.max()


def call_timer(fn):
    """A timer of ``fn()``: {"seconds": its duration} on the given clock."""
    def timed(clock) -> dict:
        start = clock.mark()
        fn()
        end = clock.mark()
        return {"seconds": clock.seconds(start, end)}
    return timed


def own_work_timer(step_with, closure):
    """A timer of ``step_with(closure)`` that leaves out the closure: every closure
    call is timed on the same clock inside the step and subtracted from that very
    step, so "seconds" is the optimizer's own work, sample by sample."""
    def timed(clock) -> dict:
        spans = []

        def timed_closure():
            start = clock.mark()
            result = closure()
            spans.append((start, clock.mark()))
            return result

        start = clock.mark()
        step_with(timed_closure)
        end = clock.mark()
        total = clock.seconds(start, end)
        in_closure = sum(clock.seconds(a, b) for a, b in spans)
        return {"seconds": total - in_closure, "with_closure_seconds": total,
                "closure_seconds": in_closure / max(len(spans), 1), "closure_calls": len(spans)}
    return timed


def impossible(measured: dict) -> bool:
    """Times must be positive and finite; a difference of two clock readings that is
    not means the clock or the subtraction failed for that call."""
    return not all(math.isfinite(v) and v > 0 for k, v in measured.items() if k != "closure_calls")


@dataclass
class Samples:
    """One dict of lists per timer (a key per measured quantity, an entry per
    accepted round), the rejected rounds and whether the stopping rule was met."""

    series: list
    rejected: list = field(default_factory=list)
    precise: bool = False


def sample(timers: list, budget: Budget, clock, flush=None, paired=()) -> Samples:
    """Rounds of every timer in turn (one call each per round), so that on a machine
    whose speed drifts every timer meets the same conditions and their per-round
    ratios hold; ``flush`` (untimed) runs before each call.  ``paired``: the (i, j)
    whose ratio series i / series j must be precise too."""
    for _ in range(budget.warmup):
        for timer in timers:
            timer(clock)
    clock.sync()
    out = Samples([{} for _ in timers])
    deadline = time.perf_counter() + budget.seconds
    accepted = checked = 0
    while accepted < budget.max_samples:
        measured = []
        for timer in timers:
            if flush is not None:
                flush()
                clock.sync()
            measured.append(timer(clock))
        bad = [(i, m) for i, m in enumerate(measured) if impossible(m)]
        if bad:  # the whole round goes, so that the series stay paired round by round
            out.rejected.append({"round": accepted + len(out.rejected), "timer": bad[0][0], "measured": bad[0][1]})
            if len(out.rejected) >= max(MAX_REJECTED, accepted):
                raise MeasurementError(f"{len(out.rejected)} rounds with impossible times "
                                       f"(e.g. {bad[0][1]}), {accepted} accepted")
            continue
        for series, m in zip(out.series, measured):
            for key, value in m.items():
                series.setdefault(key, []).append(value)
        accepted += 1
        # The rule is checked after every round at first, then every ~10 % more rounds:
        # its bootstrap costs more the more samples there are.
        if accepted >= budget.min_samples and accepted >= checked * 1.1:
            checked = accepted
            out.precise = stats.precise_enough([s["seconds"] for s in out.series], paired, budget.target)
            if out.precise:
                break
        if accepted >= budget.min_samples and time.perf_counter() > deadline:
            break
    if not out.precise and accepted != checked:  # rounds since the last check
        out.precise = stats.precise_enough([s["seconds"] for s in out.series], paired, budget.target)
    return out


def summarize(seconds: list) -> dict:
    """Median, its interval and the minimum in milliseconds, and the samples."""
    ms = [s * 1e3 for s in seconds]
    iv = stats.median_interval(ms)
    return {"median_ms": iv.median, "ci_low_ms": iv.low, "ci_high_ms": iv.high, "min_ms": min(ms),
            "samples": len(ms), "samples_ms": ms}


def copy_bandwidth(device: torch.device, megabytes: int, budget: Budget, clock, flush=None) -> dict:
    """Achievable memory bandwidth on ``device`` (device to device on a GPU):
    ``dst.copy_(src)`` on a buffer larger than the caches, counting 2 × size bytes
    (one read, one write) per copy; GB/s with the interval of the copy time."""
    return {"buffer_mb": megabytes, **copy_time(device, 2 * megabytes * 2**20, budget, clock, flush)}


def copy_time(device: torch.device, bytes_moved: int, budget: Budget, clock, flush=None) -> dict:
    """``dst.copy_(src)`` of fp32 buffers moving ``bytes_moved`` bytes (half read, half
    written): its time's median and interval, and the GB/s they give."""
    numel = max(bytes_moved // 8, 1)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched: no page faults in the timed copies
    result = sample([call_timer(lambda: dst.copy_(src))], budget, clock, flush)
    del src, dst
    stats_ms = summarize(result.series[0]["seconds"])
    gb = 2 * numel * 4 / 1e9
    return {"median_ms": stats_ms["median_ms"], "ci_low_ms": stats_ms["ci_low_ms"],
            "ci_high_ms": stats_ms["ci_high_ms"], "samples": stats_ms["samples"], "precise": result.precise,
            "gbps": gb / (stats_ms["median_ms"] * 1e-3),
            # a longer copy time is a lower bandwidth: the bounds swap
            "gbps_low": gb / (stats_ms["ci_high_ms"] * 1e-3), "gbps_high": gb / (stats_ms["ci_low_ms"] * 1e-3)}
