import statistics, sys, time, json, itertools
import torch
import cblr_ext
from bench import suites
torch.manual_seed(0)
shapes = [s for _, s in suites.get("resnet50").shapes]
def make():
    ps = [torch.nn.Parameter(torch.randn(s) * 0.05) for s in shapes]
    gs = [torch.randn(s) * 1e-3 for s in shapes]
    for p, g in zip(ps, gs): p.grad = g.clone()
    return ps, gs
def time_it(step, n=25):
    for _ in range(3): step()
    t = []
    for _ in range(n):
        s = time.perf_counter(); step(); t.append(time.perf_counter() - s)
    return statistics.median(t) * 1e3
out = {}
ps, gs = make()
sgd = torch.optim.SGD(ps, lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
out["SGD fused"] = time_it(sgd.step)
for name, cls, kw in [("LARS", cblr_ext.LARS, dict(reuse_weight_norm=True, exclude_1d=True)),
                      ("MCLR exact", cblr_ext.MCLR, dict(curvature_interval=1, exclude_1d=True, max_ratio=None)),
                      ("CBLR re-measure", cblr_ext.CBLR, dict(curvature_interval=1))]:
    ps, gs = make()
    opt = cls(ps, lr=0.01, momentum=0.9, weight_decay=1e-4, backend="cpp", **kw)
    calls = itertools.count()
    def closure():
        for p, g in zip(ps, gs): p.grad.copy_(g)
    out[name] = time_it(lambda: opt.step(closure))
print(json.dumps(out))
