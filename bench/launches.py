"""Kernel launches per optimizer step on a GPU, counted with torch.profiler: every kernel
the device ran during one (untimed) step, memory copies and fills counted apart.  A
CBLR step's closure calls (the benchmark's gradient writes) are counted alone and left
out, as the timing leaves out their time."""
from __future__ import annotations

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

MEMORY_OPS = ("Memcpy", "Memset")


def device_activities(fn) -> dict:
    """{"kernels", "memory_ops"}: what the GPU ran during ``fn()``."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    on_device = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    memory = sum(name.startswith(MEMORY_OPS) for name in on_device)
    return {"kernels": len(on_device) - memory, "memory_ops": memory}


def per_step(step, device: torch.device):
    """{"kernels_per_step", "memory_ops_per_step"} of one call of ``step`` (a
    cases.Step), or None off a GPU."""
    if device.type != "cuda":
        return None
    if step.closure is None:
        counts = device_activities(step.run)
    else:
        calls = []

        def counted_closure():
            calls.append(None)
            return step.closure()
        counts = device_activities(lambda: step.step_with(counted_closure))
        closure = device_activities(step.closure)
        counts = {k: v - len(calls) * closure[k] for k, v in counts.items()}
    return {"kernels_per_step": counts["kernels"], "memory_ops_per_step": counts["memory_ops"]}
