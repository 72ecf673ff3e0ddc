"""``python -m cblr_ext``: train one small network at a large batch with SGD,
LARS, MCLR and CBLR on synthetic data and print loss and per-layer ratios."""
from __future__ import annotations

import argparse
import math

import torch

from . import CBLR, LARS, MCLR, backends
from .training import TeacherTask, train

# (name, factory); the learning rates are the rules' usual scales (docs/algorithm.md).
OPTIMIZERS = [
    ("SGD", lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=5e-4)),
    ("LARS", lambda p: LARS(p, lr=4.0, momentum=0.9, weight_decay=5e-4)),
    ("MCLR", lambda p: MCLR(p, lr=4.0, momentum=0.9, weight_decay=5e-4)),
    ("CBLR", lambda p: CBLR(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    task = TeacherTask()
    print(f"synthetic teacher task: {task.train_size} samples, batch {args.batch_size}, {args.steps} steps")
    rows = []
    for name, factory in OPTIMIZERS:
        model = task.model()
        opt = factory(model.named_parameters())
        result = train(task, model, opt, batch_size=args.batch_size, steps=args.steps, desc=name,
                       progress=not args.no_progress)
        backend = backends.get(opt.defaults["backend"], torch.device("cpu")).name if name != "SGD" else "torch"
        rows.append((name, backend, result))

    layers = [n for n in rows[1][2].ratios if n.endswith("weight")]
    header = f"{'optimizer':<9} {'backend':<9} {'first loss':>10} {'final loss':>10} {'test loss':>9} {'test acc':>8}  " + \
        "  ".join(f"r[{n}]".rjust(12) for n in layers)
    print(header)
    print("-" * len(header))
    for name, backend, r in rows:
        ratios = "  ".join(f"{r.ratios[n]:12.3e}" if n in r.ratios else f"{'-':>12}" for n in layers)
        print(f"{name:<9} {backend:<9} {r.losses[0]:10.4f} {r.losses[-1]:10.4f} {r.test_loss:9.4f} {r.test_accuracy:8.3f}  "
              f"{ratios}")
    return 0 if all(math.isfinite(r.losses[-1]) for *_, r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
