"""Why a rule wins or loses on a task: runs recorded step by step (docs/experiments.md,
"Why the defaults lost").

Per step and layer: r, α, ‖s‖/‖w‖, κ̄ and the fallback flag from ``layer_stats()``, and
the LARS κ = (‖g‖ + β‖w‖ + ε)/‖w‖ from the same ‖w‖, ‖g‖ (to set MCLR's and CBLR's κ
beside it).  At a few steps, every layer's element-wise quotients h_i = |d_i|/|w_i|
(MCLR's median against ‖d‖/‖w‖).  Reads the statistics every step (one host copy per
step: fine for the study's small models, not for training).

``python -m cblr_ext.experiments.diagnose --out docs/figures`` writes the figures and
``diagnosis.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
from torch.utils.data import DataLoader

from .. import layer_math as lm
from ..train import BatchSizeSchedule, ScaledLR
from .models import MODELS
from .optimizers import OPTIMIZERS
from .report import _json_safe
from .run import WARMUP_FRACTION, RunSpec, _Batches, _unbatched, accuracy, load_data, total_steps

QUOTIENT_STEPS = 4      # steps at which the quotients are kept, spread over the run
QUOTIENT_SAMPLE = 2000  # quotients kept per layer and step (a random subset, for histograms)
COLUMNS = ("ratio", "alpha", "step_over_w", "kappa", "lars_kappa", "fallback")


def _quotients(model, weight_decay, gen):
    out = {}
    for name, p in model.named_parameters():
        w = p.detach().float()
        d = lm.decayed_grad(p.grad.float(), w, weight_decay)
        h = lm.curvature_quotients(d, w)
        out[name] = {"median": float(lm.lower_median(h)), "norm_ratio": float(d.norm() / w.norm()),
                     "sample": h[torch.randperm(h.numel(), generator=gen)[:QUOTIENT_SAMPLE]].tolist()}
    return out


def _append(layers, stats, weight_decay, eps):
    for name, row in stats.items():
        entry = layers[name]
        w, g = torch.tensor(row["w_norm"]), torch.tensor(row["g_norm"])
        defined = row["w_norm"] > 0
        entry["ratio"].append(row["ratio"])
        entry["alpha"].append(row["alpha"])
        entry["step_over_w"].append(row["step_norm"] / row["w_norm"] if defined else math.nan)
        entry["kappa"].append(row["kappa"])
        entry["lars_kappa"].append(float(lm.lars_kappa(w, g, weight_decay, eps)) if defined else math.nan)
        entry["fallback"].append(row["fallback"])


def record(spec: RunSpec) -> dict:
    """Train ``spec`` (the plain variant: fixed batch, warm-up and cosine as ``train_run``)
    and return {"layers": {name: {column: per-step list}}, "quotients": {step: {name: …}},
    "steps", "val_acc", "test_acc"}."""
    data = load_data(spec)
    torch.manual_seed(spec.seed)
    model = MODELS[spec.model](data.input_shape, data.classes)
    opt_spec = OPTIMIZERS[spec.optimizer]
    opt = opt_spec.make(list(model.named_parameters()), spec.lr)
    group = opt.param_groups[0]
    sampler = BatchSizeSchedule(len(data.x_train), {0: spec.batch_size}, seed=spec.seed)
    loader = DataLoader(_Batches(data.x_train, data.y_train), batch_sampler=sampler, collate_fn=_unbatched)
    steps = total_steps(sampler, spec.epochs)
    lr_rule = ScaledLR(opt, opt_spec.base_batch, rule=opt_spec.lr_rule,
                       warmup_steps=max(1, round(WARMUP_FRACTION * steps)))
    keep_at = {round(steps * (k + 0.5) / QUOTIENT_STEPS) for k in range(QUOTIENT_STEPS)}
    layers = {name: {c: [] for c in COLUMNS} for name, _ in model.named_parameters()}
    quotients, step, gen = {}, 0, torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.epochs):
        for x, y in loader:
            lr_rule.apply(len(y), step, 0.5 * (1 + math.cos(math.pi * step / steps)))

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            if step in keep_at:   # the gradient this step will use, before the step
                closure()
                quotients[step] = _quotients(model, group["weight_decay"], gen)
            opt.step(closure)
            _append(layers, opt.layer_stats(), group["weight_decay"], group["eps"])
            step += 1
    return {"spec": spec.__dict__, "layers": layers, "quotients": quotients, "steps": steps,
            "val_acc": accuracy(model, data.x_val, data.y_val), "test_acc": accuracy(model, data.x_test, data.y_test)}


# The runs of docs/experiments.md: each candidate at the best lr of the batch-4096 screen.
RUNS = (("LARS-x1d", 16.0), ("LARS-all", 64.0), ("MCLR-all", 16.0), ("CBLR-x1d", 1.6), ("CBLR-all", 0.8))


def main(argv=None) -> int:
    from .diagnosis_plots import write_all
    p = argparse.ArgumentParser(prog="python -m cblr_ext.experiments.diagnose", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="cblr-diagnosis", help="folder for diagnosis.json and the figures")
    p.add_argument("--task", default="mnist1d/mlp", help="DATASET/MODEL")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--runs", nargs="+", metavar="OPTIMIZER=LR", help="the runs (default: docs/experiments.md's)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every run")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dataset, _, model = args.task.partition("/")
    runs = [(r.split("=")[0], float(r.split("=")[1])) for r in args.runs] if args.runs else RUNS
    recorded = {}
    for name, lr in runs:
        recorded[name] = record(RunSpec(dataset, model, name, lr, args.batch_size, args.epochs, args.seed))
        print(f"{name} lr {lr:g}: val {100 * recorded[name]['val_acc']:.1f}%  test {100 * recorded[name]['test_acc']:.1f}%")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "diagnosis.json"), "w") as f:
        json.dump(_json_safe({name: {k: v for k, v in r.items() if k != "quotients"} for name, r in recorded.items()}), f)
    for path in write_all(recorded, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
