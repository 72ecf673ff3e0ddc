"""Wall-clock timing of one call repeated: warm-up, then samples until a count
or a time budget is reached, summarised by median and interquartile range."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Budget:
    """How long to measure one case: ``warmup`` untimed calls (after the runner's
    first call, which also compiles and allocates state), then at least
    ``min_samples`` and at most ``max_samples`` timed calls, stopping after
    ``seconds`` once ``min_samples`` are in."""

    warmup: int
    min_samples: int
    max_samples: int
    seconds: float


FULL = Budget(warmup=1, min_samples=3, max_samples=30, seconds=3.0)
QUICK = Budget(warmup=1, min_samples=3, max_samples=5, seconds=0.5)


def synchronizer(device: torch.device):
    """What to call so that the clock stops after queued device work finished."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


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


def sample(fns: list, budget: Budget, device: torch.device, flush=None) -> list:
    """Seconds per call of each of ``fns`` (no arguments): one list per function, one
    entry per timed call.  The functions take turns, one call each per round, so that
    on a machine whose speed drifts (a shared VM) every function is timed under the
    same conditions and their ratios hold; ``flush`` (untimed) runs before each call."""
    sync = synchronizer(device)
    for _ in range(budget.warmup):
        for fn in fns:
            fn()
    sync()
    samples = [[] for _ in fns]
    deadline = time.perf_counter() + budget.seconds
    while len(samples[0]) < budget.max_samples and (
            len(samples[0]) < budget.min_samples or time.perf_counter() < deadline):
        for fn, out in zip(fns, samples):
            if flush is not None:
                flush()
                sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return samples


def summarize(samples: list) -> dict:
    """Median and spread (interquartile range) in milliseconds."""
    ms = [s * 1e3 for s in samples]
    q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
            "min_ms": min(ms), "samples": len(ms)}


def copy_bandwidth(device: torch.device, megabytes: int, budget: Budget, flush=None) -> dict:
    """Achievable memory bandwidth: ``dst.copy_(src)`` on a buffer larger than the
    caches, counting 2 × size bytes (one read, one write) per copy."""
    numel = megabytes * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched: no page faults in the timed copies
    (copies,) = sample([lambda: dst.copy_(src)], budget, device, flush)
    stats = summarize(copies)
    stats["buffer_mb"] = megabytes
    stats["gbps"] = 2 * numel * 4 / (stats["median_ms"] * 1e-3) / 1e9
    return stats
