"""The clocks a benchmark reads: the host's wall clock on a CPU, CUDA events on a
GPU.  Both mark instants and measure the seconds between two marks, so the
sampling and the statistics (timing.py, stats.py) are the same for both."""
from __future__ import annotations

import time

import torch


class WallClock:
    """``time.perf_counter``: CPU work is done when the call returns."""

    def sync(self):
        pass

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start


class CudaEventClock:
    """CUDA events recorded on the current stream: they time the device's work, not
    the host's launch; ``seconds`` waits for the end event."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        torch.cuda.synchronize(self.device)

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) * 1e-3  # elapsed_time is in milliseconds


def for_device(device: torch.device):
    return CudaEventClock(device) if device.type == "cuda" else WallClock()
