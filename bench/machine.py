"""The state of the machine during a run: load average, the CPU time other
processes took, and the copy bandwidth at the start and at the end.  Other work
and a drifting memory speed distort the timings, so a run records them and warns."""
from __future__ import annotations

import os
import time
from pathlib import Path

# 1-minute load average at the start above which the machine counts as busy (the
# bench itself has not run long enough to add to it).
BUSY_LOAD_AVERAGE = 0.5
# Other processes' CPU use, in cores averaged over the run, that counts as busy.
BUSY_OTHER_CORES = 0.25
# Copy bandwidth change from start to end that counts as a drift (when the two
# intervals do not overlap either).
DRIFT = 0.10


def load_average():
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def _system_busy_seconds():
    """CPU seconds all processes spent, and the hypervisor stole, since boot (Linux
    /proc/stat), or None elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_seconds() -> float:
    """CPU seconds of this process and its finished children (the compile cases)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMeter:
    """From construction to ``read()``: how many cores other processes kept busy on
    average, and how many the hypervisor stole (a VM's neighbours)."""

    def __init__(self):
        self._start = (time.monotonic(), _own_seconds(), _system_busy_seconds())

    def read(self) -> dict:
        wall0, own0, system0 = self._start
        wall, own, system = time.monotonic() - wall0, _own_seconds() - own0, _system_busy_seconds()
        if system0 is None or system is None or wall <= 0:
            return {"other_cpu_cores": None, "steal_cores": None}
        busy, steal = system[0] - system0[0], system[1] - system0[1]
        # Tick accounting is coarse: a short interval can come out slightly negative.
        return {"other_cpu_cores": max(busy - own, 0.0) / wall, "steal_cores": steal / wall}


def warnings(state: dict) -> list:
    """Console warnings for a run's ``state`` (the JSON's "machine")."""
    out = []
    cores, start = state["cpu_count"], state["load_average_start"]
    others = state["other_cpu_cores"]
    if (start is not None and start > BUSY_LOAD_AVERAGE) or (others is not None and others > BUSY_OTHER_CORES):
        out.append(f"WARNING: the machine was busy: other processes used {_fmt(others)} of {cores} cores on "
                   f"average during the run (1-minute load average {_fmt(start)} at the start, "
                   f"{_fmt(state['load_average_end'])} at the end). Multithreaded steps suffer most: a parallel "
                   f"region waits for all its threads. Rerun on a quiet machine or with --threads below the free "
                   f"cores; the ratios to fused SGD (timed in turn) hold better than the times.")
    a, b = state["copy_start"], state["copy_end"]
    if b is not None and abs(b["gbps"] / a["gbps"] - 1) > DRIFT and (
            b["gbps_high"] < a["gbps_low"] or a["gbps_high"] < b["gbps_low"]):
        out.append(f"WARNING: the memory speed drifted during the run: copy bandwidth {_gbps(a)} at the start, "
                   f"{_gbps(b)} at the end. Times taken minutes apart do not compare; the ratios to fused SGD "
                   f"(timed in turn) do.")
    return out


def busy_at_start(load: float | None) -> str | None:
    if load is not None and load > BUSY_LOAD_AVERAGE:
        return (f"WARNING: the machine is busy: 1-minute load average {load:.2f} on {os.cpu_count()} cores "
                f"before the run; its timings will be noisy.")
    return None


def _fmt(value):
    return "?" if value is None else f"{value:.2f}"


def _gbps(copy: dict) -> str:
    return f"{copy['gbps']:.1f} GB/s [{copy['gbps_low']:.1f}, {copy['gbps_high']:.1f}]"
