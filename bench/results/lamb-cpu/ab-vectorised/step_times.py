"""Median step times (ms) on the full-size ResNet-50 fp32 shapes, as one JSON line: the
cpp LAMB step (without and with the global clipping) beside torch's AdamW(fused=True)
and pytorch-optimizer's per-parameter Lamb.  Which cblr_ext build runs is the one on
sys.path (PYTHONPATH), printed as "extension"."""
import json
import statistics
import sys
import time

import torch

import cblr_ext
from bench import suites

STEPS, WARMUP = 15, 3


def parameters():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s) * 0.05) for _, s in suites.get("resnet50").shapes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def median_ms(step):
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    from pytorch_optimizer import Lamb
    cases = {
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=1e-4, fused=True),
        "LAMB cpp no-clip": lambda ps: cblr_ext.LAMB(ps, lr=0.01, weight_decay=1e-4, max_grad_norm=None, backend="cpp"),
        "LAMB cpp clip": lambda ps: cblr_ext.LAMB(ps, lr=0.01, weight_decay=1e-4, max_grad_norm=1.0, backend="cpp"),
        "pytorch-optimizer Lamb per-param": lambda ps: Lamb(ps, lr=0.01, weight_decay=1e-4, max_grad_norm=1.0,
                                                             pre_norm=True, foreach=False),
    }
    import cblr_ext._C
    out = {"extension": cblr_ext._C.__file__}
    for name, make in cases.items():
        out[name] = round(median_ms(make(parameters()).step), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
