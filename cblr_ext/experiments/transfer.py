"""Defaults that transfer: choose each rule's options and γ on a *selection* suite, then run
them unchanged on a *held-out* suite whose tasks, data and seeds the choice never saw.

1. Selection: every candidate of every rule runs every γ of a ×√2 grid around its centre
   (per rule and batch) on every selection seed; the mean validation accuracy per γ gives
   the best γ (``choose_lr`` of the mean ``run_score``) and the good-γ window (windows.py).
2. Choice, per rule, for robustness: among the candidates whose mean best validation
   accuracy over the selection cells is within ``tolerance`` of the best candidate's, the
   one with the widest narrowest window (the minimum over the cells); ties: listed first.
3. Held out: the chosen candidate at the γ chosen for that batch, on the held-out seeds;
   test accuracy is reported, nothing is chosen.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import Dict, Tuple

from .optimizers import OPTIMIZERS, root2_grid
from .run import RunSpec
from .sweep import choose_lr, run_all, run_score
from .windows import window


@dataclass(frozen=True)
class Task:
    dataset: str
    model: str
    batch_sizes: Tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.model}"


@dataclass(frozen=True)
class TransferConfig:
    selection: Tuple[Task, ...]
    held_out: Tuple[Task, ...]
    candidates: Dict[str, Tuple[str, ...]]        # rule -> optimizer names, today's default first
    centres: Dict[str, Dict[int, float]]          # rule -> batch -> centre of its γ grid
    grid: Tuple[int, int] = (-2, 2)               # γ = centre·2^(k/2), k from .. to
    epochs: int = 15
    selection_seeds: Tuple[int, ...] = (0, 1, 2)
    held_out_seeds: Tuple[int, ...] = (100, 101, 102)
    train_size: int = 16384                       # the teacher task's training set
    tolerance: float = 1.0                        # accuracy points: the window and the choice

    def __post_init__(self):
        chosen_at = {b for task in self.selection for b in task.batch_sizes}
        problems = []
        if {(t.dataset, t.model) for t in self.selection} & {(t.dataset, t.model) for t in self.held_out} \
                or {t.dataset for t in self.selection} & {t.dataset for t in self.held_out}:
            problems.append("a data set is in both suites")
        if set(self.selection_seeds) & set(self.held_out_seeds):
            problems.append("a seed is in both suites")
        if any(b not in chosen_at for task in self.held_out for b in task.batch_sizes):
            problems.append(f"a held-out batch size has no γ chosen for it (selection batches {sorted(chosen_at)})")
        for rule, names in self.candidates.items():
            if not names or any(n not in OPTIMIZERS for n in names):
                problems.append(f"rule {rule}: candidates must be names in OPTIMIZERS, got {names!r}")
            if any(b not in self.centres.get(rule, {}) for b in chosen_at):
                problems.append(f"rule {rule}: no γ centre for some of the batch sizes {sorted(chosen_at)}")
        if not self.selection_seeds or not self.held_out_seeds or self.epochs < 1:
            problems.append("seeds must not be empty and epochs >= 1")
        if problems:
            raise ValueError("invalid transfer protocol: " + "; ".join(problems))

    def gammas(self, rule: str, batch: int) -> Tuple[float, ...]:
        return root2_grid(self.centres[rule][batch], *self.grid)

    def spec(self, task: Task, optimizer: str, gamma: float, batch: int, seed: int) -> RunSpec:
        return RunSpec(task.dataset, task.model, optimizer, gamma, batch, self.epochs, seed,
                       train_size=self.train_size)


def selection_specs(config: TransferConfig):
    """{(rule, candidate, batch): {γ: [RunSpec of each selection task and seed]}}."""
    batches = sorted({b for task in config.selection for b in task.batch_sizes})
    return {(rule, name, batch): {g: [config.spec(task, name, g, batch, seed) for task in config.selection
                                      if batch in task.batch_sizes for seed in config.selection_seeds]
                                  for g in config.gammas(rule, batch)}
            for rule, names in config.candidates.items() for name in names for batch in batches}


def _stats(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def select(config: TransferConfig, runs: Dict[RunSpec, dict]) -> dict:
    """The selection cells (grid, window, best γ) and the choice per rule, from ``runs``."""
    cells = []
    for (rule, name, batch), grid in selection_specs(config).items():
        val = {g: 100 * statistics.fmean(runs[s]["val_acc"] for s in specs) for g, specs in grid.items()}
        best = choose_lr({g: statistics.fmean(run_score(runs[s]) for s in specs) for g, specs in grid.items()})
        w = window(list(val), list(val.values()), config.tolerance)
        cells.append({"rule": rule, "candidate": name, "batch_size": batch, "gamma": best,
                      "grid": [{"gamma": g, "val_acc": val[g],
                                "diverged_seeds": sum(runs[s]["diverged"] for s in specs)} for g, specs in grid.items()],
                      "window": {"octaves": w.octaves, "low_gamma": w.low_gamma, "high_gamma": w.high_gamma,
                                 "low_censored": w.low_censored, "high_censored": w.high_censored},
                      "val_acc": val[best], "test_acc": _stats([100 * runs[s]["test_acc"] for s in grid[best]])})
    choice = {}
    for rule, names in config.candidates.items():
        summary = {}
        for name in names:
            mine = [c for c in cells if c["candidate"] == name and c["rule"] == rule]
            summary[name] = {"mean_best_val": statistics.fmean(c["val_acc"] for c in mine),
                             "min_window": min(c["window"]["octaves"] for c in mine)}
        top = max(s["mean_best_val"] for s in summary.values())
        near = [n for n in names if summary[n]["mean_best_val"] >= top - config.tolerance]
        picked = max(near, key=lambda n: (summary[n]["min_window"], -names.index(n)))
        choice[rule] = {"candidate": picked, "candidates": summary,
                        "gamma": {c["batch_size"]: c["gamma"] for c in cells if c["candidate"] == picked
                                  and c["rule"] == rule}}
    return {"cells": cells, "choice": choice}


def held_out_specs(config: TransferConfig, choice: dict):
    """{(task name, batch, rule): [RunSpec of each held-out seed]}: the chosen candidate at
    the γ chosen for the batch."""
    return {(task.name, batch, rule): [config.spec(task, pick["candidate"], pick["gamma"][batch], batch, seed)
                                       for seed in config.held_out_seeds]
            for task in config.held_out for batch in task.batch_sizes for rule, pick in choice.items()}


def evaluate(config: TransferConfig, choice: dict, runs: Dict[RunSpec, dict], baseline: str = "SGD") -> dict:
    """Held-out rows (test accuracy per seed) and, per batch and rule, the mean over the
    held-out tasks of its lead over ``baseline`` (in points)."""
    rows = []
    for (task, batch, rule), specs in held_out_specs(config, choice).items():
        rows.append({"task": task, "batch_size": batch, "rule": rule, "candidate": specs[0].optimizer,
                     "gamma": specs[0].lr, "diverged_seeds": sum(runs[s]["diverged"] for s in specs),
                     "test_acc": _stats([100 * runs[s]["test_acc"] for s in specs])})
    mean = {(r["task"], r["batch_size"], r["rule"]): r["test_acc"]["mean"] for r in rows}
    lead = {}
    for (task, batch, rule), acc in mean.items():
        if baseline in choice and rule != baseline:
            lead.setdefault((batch, rule), []).append(acc - mean[(task, batch, baseline)])
    summary = [{"batch_size": b, "rule": rule, "tasks": len(v), "mean_lead": statistics.fmean(v),
                "ahead_on": sum(d > 0 for d in v)} for (b, rule), v in sorted(lead.items())]
    return {"rows": rows, "lead_over_" + baseline: summary}


def run_protocol(config: TransferConfig, *, jobs: int = 1, progress: bool = True) -> dict:
    grids = selection_specs(config)
    runs = run_all([s for grid in grids.values() for specs in grid.values() for s in specs], jobs,
                   "selection suite", progress)
    selection = select(config, runs)
    held = held_out_specs(config, selection["choice"])
    runs.update(run_all([s for specs in held.values() for s in specs], jobs, "held-out suite", progress))
    return {"selection": selection, "held_out": evaluate(config, selection["choice"], runs)}


# The protocol of docs/experiments.md ("Defaults that transfer"): each rule's defaults
# ("MCLR", "CBLR-k1") against the previous ones (r_max 1 and 2). The centres are the best γ
# of the 30-epoch MNIST-1D sweep (docs/experiments.md, "The sweep") for each rule and batch.
LARGE_BATCHES = (1024, 4096, 8192)
PROTOCOL = TransferConfig(
    selection=(Task("mnist1d", "mlp", LARGE_BATCHES),),
    held_out=(Task("mnist1d-shifted", "mlp", LARGE_BATCHES), Task("mnist1d-seed2", "mlp-w128-d3", LARGE_BATCHES),
              Task("digits", "cnn", (1024,)), Task("teacher", "mlp", LARGE_BATCHES)),
    candidates={"SGD": ("SGD",), "LARS": ("LARS",), "MCLR": ("MCLR", "MCLR-all-cap1-ema0.5"),
                "CBLR": ("CBLR-k1", "CBLR-x1d-cap2-ema0")},
    centres={"SGD": {1024: 0.2, 4096: 0.025, 8192: 0.0125}, "LARS": {1024: 32.0, 4096: 64.0, 8192: 64.0},
             "MCLR": {1024: 16.0, 4096: 16.0, 8192: 8.0}, "CBLR": {1024: 0.8, 4096: 1.6, 8192: 1.6}},
)
# What fits about half an hour on 2 cores shared with other jobs (~10 s a 15-epoch run
# there): the two ends of the batch range, 10 epochs, two selection seeds; the held-out
# suite keeps its tasks and its three seeds.
ENDS = (1024, 8192)
SHORT = replace(
    PROTOCOL, selection=(Task("mnist1d", "mlp", ENDS),),
    held_out=tuple(replace(t, batch_sizes=tuple(b for b in t.batch_sizes if b in ENDS))
                   for t in PROTOCOL.held_out),
    epochs=10, selection_seeds=(0, 1))
# Seconds: the protocol end to end, for the tests and a first look at the output.
TINY = TransferConfig(selection=(Task("teacher", "mlp", (256,)),), held_out=(Task("digits", "mlp", (256,)),),
                      candidates={"SGD": ("SGD",), "CBLR": ("CBLR-k1", "CBLR-x1d-cap2-ema0")},
                      centres={"SGD": {256: 0.05}, "CBLR": {256: 0.8}}, grid=(-1, 1), epochs=1,
                      selection_seeds=(0,), held_out_seeds=(100,), train_size=1024)
TRANSFER_PRESETS = {"full": PROTOCOL, "short": SHORT, "tiny": TINY}
