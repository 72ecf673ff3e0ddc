"""Where a CPU step's time goes, pass by pass: torch.profiler over a few untimed steps,
each pass of the traffic model (cases.Pass) timed by its op, beside the bytes the model
counts for it.  The package's ops and the collectives the model does not name get rows
of their own, without bytes; the time of everything else (Python between the ops, small
torch ops, a closure's gradient writes) is the row "other".  On a GPU an op's host time
is its launch, not its work: the passes are profiled on the CPU only."""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

PACKAGE = "cblr_ext"  # the namespaces of the package's ops: cblr_ext, cblr_ext_reference, ...
COLLECTIVES = "c10d::"


def _op_of(event: str) -> tuple:
    """(op, whether it gets a row even unnamed): a package op's event by its op name alone
    (each backend registers its kernels in a namespace of its own), a collective's and any
    other event by its full name."""
    namespace, _, name = event.partition("::")
    if namespace.startswith(PACKAGE) and name:
        return name, True
    return event, event.startswith(COLLECTIVES)


def profile_ops(run, steps: int) -> tuple:
    """({op: (calls per step, ms per step)}, the ops that get a row unnamed, step ms) over
    ``steps`` calls of ``run``; an op's time includes the events it called."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall_ms = (time.perf_counter() - start) * 1e3
    ops, own = {}, set()
    for e in prof.key_averages():
        op, has_row = _op_of(e.key)
        calls, ms = ops.get(op, (0.0, 0.0))
        ops[op] = (calls + e.count / steps, ms + e.cpu_time_total / 1e3 / steps)
        if has_row:
            own.add(op)
    return ops, own, wall_ms / steps


def passes(run, steps: int, traffic=None, numel: int = 0, param_dtype: torch.dtype = torch.float32,
           state_dtype: torch.dtype = torch.float32) -> list:
    """One row per pass of ``traffic`` ({op, counted, calls_per_step, ms, bytes, gbps}; a
    pass of op None is the whole step; no traffic: no modelled rows), then the package's
    ops and collectives it does not name, then "other"."""
    ops, own, step_ms = profile_ops(run, steps)
    rows, named = [], set()
    for p in traffic.passes if traffic is not None else ():
        calls, ms = (1.0, step_ms) if p.op is None else ops.get(p.op, (0.0, 0.0))
        nbytes = p.bytes(numel, param_dtype, state_dtype)
        named.add(p.op)
        rows.append(dict(op=p.op or "step", counted=p.counted, calls_per_step=calls, ms=ms, bytes=nbytes,
                         gbps=nbytes / (ms * 1e6) if ms > 0 else None))
    rows += [dict(op=op, counted=None, calls_per_step=calls, ms=ms, bytes=None, gbps=None)
             for op, (calls, ms) in sorted(ops.items()) if op in own and op not in named]
    timed = sum(r["ms"] for r in rows)
    rows.append(dict(op="other", counted=None, calls_per_step=None, ms=max(step_ms - timed, 0.0), bytes=None,
                     gbps=None))
    return rows
