"""Issue 21's defaults against the earlier ones, interleaved in one process: MCLR ρ = 0 vs 0.5,
CBLR r_max = None vs 2 (full-size ResNet-50 tensors, backend cpp, median of 25 steps after 3)."""
import json
import statistics
import time

import torch

import cblr_ext
from bench import suites

torch.manual_seed(0)
SHAPES = [s for _, s in suites.get("resnet50").shapes]
CASES = {
    "MCLR ρ=0 (A)": (cblr_ext.MCLR, dict(curvature_ema=0.0)), "MCLR ρ=0.5 (B)": (cblr_ext.MCLR, dict(curvature_ema=0.5)),
    # CBLR at ρ = 0.5, its default when this ran (the CBLR default is ρ = 0 since)
    "CBLR r_max=None (A)": (cblr_ext.CBLR, dict(max_ratio=None, curvature_ema=0.5)),
    "CBLR r_max=2 (B)": (cblr_ext.CBLR, dict(max_ratio=2.0, curvature_ema=0.5)),
}


def median_step_ms(cls, options, n=25):
    ps = [torch.nn.Parameter(torch.randn(s) * 0.05) for s in SHAPES]
    gs = [torch.randn(s) * 1e-3 for s in SHAPES]
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    opt = cls(ps, lr=0.01, momentum=0.9, weight_decay=1e-4, backend="cpp", **options)

    def closure():
        for p, g in zip(ps, gs):
            p.grad.copy_(g)
    times = []
    for i in range(n + 3):
        start = time.perf_counter()
        opt.step(closure)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


runs = {name: [] for name in CASES}
for _ in range(6):
    for name, (cls, options) in CASES.items():
        runs[name].append(round(median_step_ms(cls, options), 2))
print(json.dumps(runs))
for rule in ("MCLR", "CBLR"):
    a, b = [statistics.median(v) for k, v in runs.items() if k.startswith(rule)]
    print(f"{rule}: B / A of the medians {b / a:.3f}")
