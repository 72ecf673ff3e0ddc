"""Where one sharded MCLR step's time goes: the bench's setup (ResNet-50's shapes as
``Shard(0)`` DTensors over 2 gloo ranks of one thread each), with each phase of the step
timed by wrapping it (pass 1, the merge's collectives, the histogram rounds, the bucket
choice, pass 2, the step norms).  Run from the repository root:
``PYTHONPATH=. python bench/results/sharded-median/profile_step.py [rule ...]``; prints rank 0's
per-step mean of each phase (ms) for each rule."""
import collections
import functools
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import distributed as bench_distributed
from bench import suites

STEPS = 8


def _timed(owner, name, totals, label=None):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label or name] += time.perf_counter() - start
    setattr(owner, name, wrapper)


def _rank(rank, port, rules, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    import cblr_ext
    from cblr_ext import distributed, optimizer
    mesh = init_device_mesh("cpu", (2,))
    shapes = [shape for _, shape in suites.get("resnet50").shapes]
    totals = collections.Counter()
    base = optimizer.LayerwiseOptimizer
    _timed(base, "_reduce", totals, "pass 1 (reduce, complete_norms)")
    _timed(base, "_update", totals, "pass 2 (update)")
    _timed(distributed, "merge_reductions", totals, "merge_reductions (all of it)")
    _timed(distributed, "_select_rounds", totals, "  rounds after the first (all of it)")
    _timed(distributed, "_all_reduce", totals, "  all collectives (incl. waiting for the other rank)")
    _timed(distributed._MedianSelect, "_counts", totals, "  median_histogram op, every round")
    _timed(distributed._MedianSelect, "choose", totals, "  choose (bucket pick, torch)")
    _timed(distributed._MedianSelect, "write", totals, "  write (medians into the reduction)")
    _timed(distributed, "merge_step_norms", totals, "merge_step_norms")
    result = {}
    for rule in rules:
        name, kwargs = bench_distributed.RULES[rule]
        params, grads = bench_distributed._model(shapes, mesh)
        opt = getattr(cblr_ext, name)(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **kwargs)
        for _ in range(3):
            opt.step()
        totals.clear()
        start = time.perf_counter()
        for _ in range(STEPS):
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            totals["step"] += time.perf_counter() - t
        result[rule] = {k: 1e3 * v / STEPS for k, v in totals.items()}
    dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)


if __name__ == "__main__":
    rules = sys.argv[1:] or ["MCLR exact", "MCLR approx", "LARS"]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(bench_distributed._free_port(), rules, out), nprocs=2, start_method="spawn")
        for r in range(2):
            print(f"rank {r}", json.dumps(json.load(open(os.path.join(out, f"rank{r}.json"))), indent=1))
