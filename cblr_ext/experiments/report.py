"""The results table (text, with its columns explained) and the JSON file."""
from __future__ import annotations

import json
import math
import os
import platform

import torch

from .. import backends

COLUMNS = [
    ("task", "data set / model"),
    ("batch", "batch size (the final one for the 'schedule' variant, which grows it B/4 → B/2 → B)"),
    ("optimizer", "SGD: linear lr scaling from batch 128 + warm-up; LARS, MCLR: layer-wise rules; "
                  "CBLR-kN: secant curvature re-measured every N steps"),
    ("variant", "plain; discard: drop the 20% smallest per-sample losses after a quarter of the epochs; "
                "schedule: growing batch size"),
    ("lr", "learning rate picked on the validation split from the optimizer's grid (seed 0, or with "
           "--select mean the mean over the seeds)"),
    ("steps", "optimizer steps in the fixed epoch budget"),
    ("train", "accuracy on the training set at the end (mean ± std over seeds)"),
    ("test", "accuracy on the test set at the end (mean ± std over seeds)"),
    ("gap", "train − test accuracy"),
    ("wall s", "training time in seconds (evaluation excluded), mean over seeds"),
]


def _pm(stats, scale=100.0, digits=1):
    return f"{scale * stats['mean']:.{digits}f}±{scale * stats['std']:.{digits}f}"


def table(results) -> str:
    rows = [[f"{r['dataset']}/{r['model']}", str(r["batch_size"]), r["optimizer"], r["variant"], f"{r['lr']:g}",
             f"{r['steps']['mean']:.0f}", _pm(r["train_acc"]), _pm(r["test_acc"]), _pm(r["gap"]),
             f"{r['wall_s']['mean']:.1f}" + ("  (diverged)" if r["diverged_seeds"] else "")] for r in results]
    header = [name for name, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def legend() -> str:
    return "\n".join(f"  {name:<9} {text}" for name, text in COLUMNS)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "torch": torch.__version__, "backend": backends.resolve("auto", "cpu")}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, config, results) -> None:
    document = {"machine": machine(), "config": config, "columns": dict(COLUMNS), "results": results}
    with open(path, "w") as f:
        json.dump(_json_safe(document), f, indent=1)


def batch_effect(results) -> str:
    """Per task and optimizer (plain runs): test accuracy at the smallest and the largest batch."""
    lines = []
    for task in dict.fromkeys((r["dataset"], r["model"]) for r in results):
        rows = [r for r in results if (r["dataset"], r["model"]) == task and r["variant"] == "plain"]
        small, large = min(r["batch_size"] for r in rows), max(r["batch_size"] for r in rows)
        if small == large:
            continue
        lines.append(f"{task[0]}/{task[1]}: test accuracy at batch {small} → {large} (mean over seeds)")
        for name in dict.fromkeys(r["optimizer"] for r in rows):
            acc = {r["batch_size"]: 100 * r["test_acc"]["mean"] for r in rows if r["optimizer"] == name}
            if small in acc and large in acc:
                lines.append(f"  {name:<9} {acc[small]:5.1f}% → {acc[large]:5.1f}%  ({acc[large] - acc[small]:+.1f})")
    return "\n".join(lines)
