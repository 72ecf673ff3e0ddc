"""Measure one case on one suite: fixed parameters and gradients, repeated steps.

Every case of a (suite, dtype) starts from copies of the same parameters and
gradients (seeded), and its step keeps updating them (nothing is reset between
timed steps).  Cases that compile run in a child process under a time limit,
so a compilation that fails or hangs becomes a record, not a crash.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
import traceback

import torch

from . import launches, machine, passes, stats, timing
from .clock import for_device as clock_for

SEED = 0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_tensors(suite, dtype: torch.dtype, device: torch.device):
    """(parameters, [gradients, other gradients]) of ``suite``, the same for every call."""
    gen = torch.Generator().manual_seed(SEED)

    def draw(scale):
        return [(torch.randn(shape, generator=gen) * scale).to(device, dtype) for _, shape in suite.shapes]

    return draw(0.02), [draw(1e-3), draw(1e-3)]


def build(case, params_master, grad_sets):
    """``case``'s optimizer over fresh copies of the parameters and gradients."""
    params = [w.clone().requires_grad_() for w in params_master]
    for p, g in zip(params, grad_sets[0]):
        p.grad = g.clone()
    return case.build(params, grad_sets)


def measure(case, params_master, grad_sets, budget: timing.Budget, device: torch.device, flush=None,
            baseline=None, count_launches=False) -> dict:
    """Timings of ``case``'s step, starting from the given parameters and gradients,
    each call with cold caches when ``flush`` (timing.CacheFlush) is given.  The
    ``baseline`` case (fused SGD, on its own copies) takes turns with the step, one
    call each per round, and the ratio is taken round by round.  A CBLR step's
    closure calls are timed inside the step and left out, call by call.  With
    ``count_launches``, one more (untimed) step counts the GPU's kernels (launches.py).
    On the CPU, a few more (untimed, profiled) steps time each pass (passes.py)."""
    clock = clock_for(device)
    step = build(case, params_master, grad_sets)
    clock.sync()
    start = time.perf_counter()
    step.run()  # the first call compiles (torch.compile) and allocates state
    clock.sync()
    first_call_s = time.perf_counter() - start
    timers = [timing.call_timer(step.run) if step.closure is None
              else timing.own_work_timer(step.step_with, step.closure)]
    if baseline is not None:
        base = build(baseline, params_master, grad_sets)
        base.run()
        timers.append(timing.call_timer(base.run))
    cpu = machine.CpuMeter()
    result = timing.sample(timers, budget, clock, flush, paired=[(0, 1)] if baseline is not None else [])
    own = result.series[0]
    out = timing.summarize(own["seconds"])
    out.update(first_call_s=first_call_s, precise=result.precise, rejected_rounds=len(result.rejected),
               rejected=result.rejected[:5], **cpu.read())
    if step.closure is not None:
        out.update(with_closure_ms=stats.median_interval(own["with_closure_seconds"]).median * 1e3,
                   closure_ms=stats.median_interval(own["closure_seconds"]).median * 1e3,
                   closure_calls=int(statistics.median_low(own["closure_calls"])))
    if baseline is not None:
        sgd = timing.summarize(result.series[1]["seconds"])
        ratio = stats.paired_ratio_interval(own["seconds"], result.series[1]["seconds"])
        out.update(fused_sgd_ms=sgd["median_ms"], fused_sgd_ci_low_ms=sgd["ci_low_ms"],
                   fused_sgd_ci_high_ms=sgd["ci_high_ms"], fused_sgd_samples_ms=sgd["samples_ms"],
                   ratio_to_fused_sgd=ratio.median, ratio_ci_low=ratio.low, ratio_ci_high=ratio.high)
    if count_launches and (counts := launches.per_step(step, device)) is not None:
        out.update(counts)
    if device.type == "cpu":
        first = params_master[0]
        out["passes"] = passes.passes(step.run, budget.profiled_steps, case.traffic,
                                      sum(p.numel() for p in params_master), first.dtype, case.state_dtype(first.dtype))
    return out


def _child(conn, case_key, baseline_key, suite, dtype, device, budget, torch_threads, cold, count_launches):
    from .cases import all_cases, find  # imported here: the child is a fresh interpreter
    torch.set_num_threads(torch_threads)
    try:
        cases = all_cases(device, compile_reference=True)[0]
        params, grad_sets = make_tensors(suite, dtype, device)
        conn.send(measure(find(cases, case_key), params, grad_sets, budget, device,
                          timing.CacheFlush(device) if cold else None, baseline=find(cases, baseline_key),
                          count_launches=count_launches))
    except Exception as exc:  # reported as the record's error
        conn.send({"error": f"{type(exc).__name__}: {exc}".strip()[:500],
                   "traceback": traceback.format_exc(limit=3)[-2000:]})
    finally:
        conn.close()


def measure_isolated(case, baseline, suite, dtype, device, budget: timing.Budget, timeout_s: float,
                     cold: bool = True, count_launches: bool = False) -> dict:
    """``measure`` in a child process (same seeded tensors, ``baseline`` in turn as
    in-process), killed after ``timeout_s``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, case.key, baseline.key, suite, dtype, device, budget,
                                            torch.get_num_threads(), cold, count_launches), daemon=True)
    proc.start()
    child.close()
    try:
        if parent.poll(timeout_s):
            return parent.recv()
        return {"error": f"timed out: compilation + measurement took over {timeout_s:.0f} s"}
    except EOFError:
        return {"error": f"child process died (exit code {proc.exitcode})"}
    finally:
        proc.join(timeout=30)  # let a child that answered exit cleanly
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
