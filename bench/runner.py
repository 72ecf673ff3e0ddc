"""Measure one case on one suite: fixed parameters and gradients, repeated steps.

Every case of a (suite, dtype) starts from copies of the same parameters and
gradients (seeded), and its step keeps updating them (nothing is reset between
timed steps).  Cases that compile run in a child process under a time limit,
so a compilation that fails or hangs becomes a record, not a crash.
"""
from __future__ import annotations

import logging
import multiprocessing
import time
import traceback

import torch

from . import timing

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
            baseline=None) -> dict:
    """Timings of ``case``'s step, starting from the given parameters and gradients,
    each call with cold caches when ``flush`` (timing.CacheFlush) is given.  A CBLR
    closure and the ``baseline`` case (fused SGD, on its own copies) are timed in turn
    with the step, so that their times and the step's come from the same moments."""
    step = build(case, params_master, grad_sets)
    sync = timing.synchronizer(device)
    start = time.perf_counter()
    step.run()  # the first call compiles (torch.compile) and allocates state
    sync()
    first_call_s = time.perf_counter() - start
    fns = [step.run]
    if step.closure is not None:
        fns.append(step.closure)
    if baseline is not None:
        base = build(baseline, params_master, grad_sets)
        base.run()
        fns.append(base.run)
    samples = timing.sample(fns, budget, device, flush)
    out = timing.summarize(samples[0])
    out["first_call_s"] = first_call_s
    if baseline is not None:
        out["fused_sgd_ms"] = timing.summarize(samples[-1])["median_ms"]
    if step.closure is not None:
        # The optimizer's own work: subtract the gradient-writing closure calls.
        closure_ms = timing.summarize(samples[1])["median_ms"]
        cost = step.closure_calls * closure_ms
        out.update(with_closure_ms=out["median_ms"], closure_ms=closure_ms, closure_calls=step.closure_calls)
        for key in ("median_ms", "q1_ms", "q3_ms", "min_ms"):
            out[key] -= cost
    return out


def _child(conn, case_key, suite, dtype, device, budget, torch_threads, cold):
    from .cases import all_cases, find  # imported here: the child is a fresh interpreter
    torch.set_num_threads(torch_threads)
    # Graph breaks in the reference backend (host reads) are expected: no warnings per break.
    torch._logging.set_logs(dynamo=logging.ERROR)
    try:
        case = find(all_cases(device, compile_reference=True)[0], case_key)
        params, grad_sets = make_tensors(suite, dtype, device)
        conn.send(measure(case, params, grad_sets, budget, device, timing.CacheFlush(device) if cold else None))
    except Exception as exc:  # reported as the record's error
        conn.send({"error": f"{type(exc).__name__}: {exc}".strip()[:500],
                   "traceback": traceback.format_exc(limit=3)[-2000:]})
    finally:
        conn.close()


def measure_isolated(case, suite, dtype, device, budget: timing.Budget, timeout_s: float, cold: bool = True) -> dict:
    """``measure`` in a child process (same seeded tensors), killed after ``timeout_s``."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, case.key, suite, dtype, device, budget,
                                            torch.get_num_threads(), cold), daemon=True)
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
