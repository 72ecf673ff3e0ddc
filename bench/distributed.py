"""``python -m bench --distributed``: the cost of whole-layer exactness across ranks.

ResNet-50's shapes as DTensor parameters sharded ``Shard(0)`` over 2 gloo ranks on this
machine's CPU (one thread each), against the same step in one process (two threads: the
same cores): the median step time of each rule and the bytes its collectives move per step
(counted by wrapping ``torch.distributed``'s collectives; CBLR's closure only copies
gradients, so every byte counted is the optimizer's), and where each rank's time goes, op
by op (passes.py: the package's ops, the collectives, the rest).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import passes, suites

RULES = {  # name -> (optimizer class name, keywords)
    "LARS": ("LARS", {}),
    "MCLR exact": ("MCLR", dict(curvature_interval=1)),
    "MCLR approx": ("MCLR", dict(median="approx", curvature_interval=1)),
    "CBLR": ("CBLR", dict(curvature_interval=1)),
}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "gather", "scatter", "all_to_all_single", "barrier", "all_gather_object")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def counting_collectives(counts: list):
    """Counts every torch.distributed collective (and the bytes of its first tensor) into
    ``counts[-1]``, except inside ``paused()`` (e.g. a closure's forward and backward)."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if not getattr(counting_collectives, "paused", False):
                tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
                counts[-1].append((name, 0 if tensor is None else tensor.numel() * tensor.element_size()))
            return fn(*args, **kwargs)
        return counted
    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def paused():
    counting_collectives.paused = True
    try:
        yield
    finally:
        counting_collectives.paused = False


def _model(shapes, mesh=None, seed=0):
    """Parameters with gradients (the same values on every rank; sharded when ``mesh``)."""
    from torch.distributed.tensor import Shard, distribute_tensor
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in shapes:
        w, g = torch.randn(shape, generator=gen) * 0.05, torch.randn(shape, generator=gen) * 1e-3
        if mesh is not None:
            w, g = distribute_tensor(w, mesh, [Shard(0)]), distribute_tensor(g, mesh, [Shard(0)])
        p = torch.nn.Parameter(w)
        p.grad = g.clone()
        params.append(p)
        grads.append(g)
    return params, grads


def _measure(rule: str, shapes, steps: int, mesh=None) -> dict:
    """Median step time (ms) and collectives per step of ``rule`` over ``shapes``."""
    import cblr_ext
    name, kwargs = RULES[rule]
    params, grads = _model(shapes, mesh)
    opt = getattr(cblr_ext, name)(params, lr=0.01, momentum=0.9, weight_decay=1e-4, **kwargs)

    def closure():
        for p, g in zip(params, grads):
            p.grad.copy_(g)
    for _ in range(3):  # state, probe buffers, workspaces
        opt.step(closure)
    times, counts = [], []
    for _ in range(steps):
        if mesh is not None:
            dist.barrier()
        counts.append([])
        start = time.perf_counter()
        with counting_collectives(counts) if mesh is not None else contextlib.nullcontext():
            opt.step(closure)
        times.append((time.perf_counter() - start) * 1e3)
    per_step = counts[-1]
    return dict(ms=statistics.median(times), collectives=len(per_step), bytes=sum(b for _, b in per_step),
                passes=passes.passes(lambda: opt.step(closure), steps))


def _rank(rank, port, shapes, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (WORLD,))
    try:
        result = {rule: _measure(rule, shapes, steps, mesh) for rule in RULES}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # the results are written; see tests/test_distributed_workers.py on gloo at exit


def run(small: bool, steps: int = 10, suite: str = "resnet50") -> dict:
    suite = suites.get(suite, small=small)
    shapes = [shape for _, shape in suite.shapes]
    torch.set_num_threads(WORLD)
    single = {rule: _measure(rule, shapes, steps) for rule in RULES}
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(_free_port(), shapes, steps, out), nprocs=WORLD, start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    rows = {}
    for rule in RULES:
        sharded = [r[rule] for r in ranks]
        rows[rule] = dict(single_ms=single[rule]["ms"], sharded_ms=max(r["ms"] for r in sharded),
                          collectives=sharded[0]["collectives"], collective_bytes=sharded[0]["bytes"],
                          single_passes=single[rule]["passes"], rank_passes=[r["passes"] for r in sharded])
    return dict(suite=suite.name, tensors=len(shapes), numel=suite.numel, world=WORLD, backend="gloo, CPU",
                threads="single process: 2; each rank: 1", steps=steps, rows=rows)


def print_table(result: dict) -> None:
    print(f"{result['suite']} ({result['tensors']} tensors, {result['numel'] / 1e6:.1f} M), "
          f"{result['world']} ranks on {result['backend']}, median of {result['steps']} steps")
    print(f"{'rule':<12} {'1 process ms':>13} {'2 ranks ms':>11} {'collectives':>12} {'bytes/step':>11}")
    for rule, row in result["rows"].items():
        print(f"{rule:<12} {row['single_ms']:>13.1f} {row['sharded_ms']:>11.1f} {row['collectives']:>12} "
              f"{row['collective_bytes']:>11}")
