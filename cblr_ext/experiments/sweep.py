"""The sweep: tasks × batch sizes × optimizers × variants, the lr of each configuration
picked on the validation split, then test accuracy reported at that lr.

| ``select`` | runs per lr | picks the lr with the best | then |
| --- | --- | --- | --- |
| ``"seed0"`` | seed 0 | validation accuracy of seed 0 | the other seeds at that lr |
| ``"mean"`` | every seed | mean validation accuracy over the seeds | (nothing: all ran) |

``"mean"`` costs ``seeds`` × the grid, and does not pick a γ at the edge of stability that
one seed survives and another does not (a diverged run scores −1)."""
from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .optimizers import OPTIMIZERS
from .run import RunSpec, train_run


@dataclass
class SweepConfig:
    tasks: List[Tuple[str, str]]                 # (data set, model)
    batch_sizes: Dict[str, List[int]]            # per data set
    epochs: Dict[str, int]                       # per data set: the same budget for every optimizer
    optimizers: List[str]
    variants: List[str] = field(default_factory=lambda: ["plain"])
    variant_batch_sizes: Dict[str, List[int]] = field(default_factory=dict)   # where non-plain variants run
    variant_optimizers: List[str] = field(default_factory=list)
    seeds: int = 3
    train_size: int = 32768
    lr_points: Optional[int] = None              # the central points of each lr grid; None: all
    select: str = "seed0"                        # how the lr is picked (the module's table)
    lr_grids: Dict[str, Tuple[float, ...]] = field(default_factory=dict)   # per optimizer, in place of its own

    def lr_grid(self, optimizer: str) -> Tuple[float, ...]:
        grid = self.lr_grids.get(optimizer, OPTIMIZERS[optimizer].lr_grid)
        if self.lr_points is None:
            return grid
        if not 1 <= self.lr_points <= len(grid):
            raise ValueError(f"lr_points must be in 1..{len(grid)}, got {self.lr_points!r}")
        start = (len(grid) - self.lr_points) // 2
        return grid[start:start + self.lr_points]

    def cells(self):
        """(data set, model, optimizer, variant, batch size) of every configuration."""
        for dataset, model in self.tasks:
            for batch in self.batch_sizes[dataset]:
                for optimizer in self.optimizers:
                    for variant in self.variants:
                        if variant == "plain" or (batch in self.variant_batch_sizes.get(dataset, [])
                                                  and optimizer in self.variant_optimizers):
                            yield dataset, model, optimizer, variant, batch


def _worker_init():
    torch.set_num_threads(1)   # one thread per worker: the workers share the cores


def run_all(specs: List[RunSpec], jobs: int, desc: str, progress: bool) -> Dict[RunSpec, dict]:
    bar = tqdm(total=len(specs), desc=desc, disable=not progress)
    results = {}
    if jobs == 1:
        for spec in specs:
            results[spec] = train_run(spec)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
            futures = {pool.submit(train_run, spec): spec for spec in specs}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return results


SELECTIONS = ("seed0", "mean")


def run_score(run: dict) -> float:
    """A run's validation accuracy; −1 when it diverged, so that any finite run wins."""
    return -1.0 if run["diverged"] else run["val_acc"]


def choose_lr(scores: Dict[float, float]) -> float:
    """The lr of the best score (``run_score``, or its mean over seeds); ties go to the smaller lr."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def _stats(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def run_sweep(config: SweepConfig, *, jobs: int = 1, progress: bool = True) -> List[dict]:
    """One result per configuration: the chosen lr, the validation accuracy of every lr tried
    (its mean over the seeds that ran it), mean/std/values over seeds of the metrics, and seed 0's curve and telemetry."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs!r}")
    if config.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {config.seeds!r}")
    cells = list(config.cells())

    def spec(cell, lr, seed):
        dataset, model, optimizer, variant, batch = cell
        return RunSpec(dataset, model, optimizer, lr, batch, config.epochs[dataset], seed, variant,
                       config.train_size)

    if config.select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {config.select!r}")
    grid_seeds = range(config.seeds) if config.select == "mean" else range(1)
    grid = {cell: {lr: [spec(cell, lr, seed) for seed in grid_seeds] for lr in config.lr_grid(cell[2])}
            for cell in cells}
    tried = run_all([s for lrs in grid.values() for specs in lrs.values() for s in specs], jobs,
                     f"lr grid ({'every seed' if config.select == 'mean' else 'seed 0'})", progress)
    scores = {cell: {lr: statistics.fmean(run_score(tried[s]) for s in specs) for lr, specs in lrs.items()}
              for cell, lrs in grid.items()}
    chosen = {cell: choose_lr(scores[cell]) for cell in cells}
    rest = range(len(grid_seeds), config.seeds)
    extra = run_all([spec(cell, chosen[cell], seed) for cell in cells for seed in rest], jobs, "other seeds",
                     progress)
    tried.update(extra)

    results = []
    for cell in cells:
        lr = chosen[cell]
        runs = [tried[spec(cell, lr, seed)] for seed in range(config.seeds)]
        dataset, model, optimizer, variant, batch = cell
        results.append({
            "dataset": dataset, "model": model, "optimizer": optimizer, "variant": variant, "batch_size": batch,
            "epochs": config.epochs[dataset], "lr": lr, "select": config.select,
            "lr_grid_val_acc": {str(lr): statistics.fmean(tried[s]["val_acc"] for s in specs)
                                for lr, specs in grid[cell].items()},
            "seeds": config.seeds, "diverged_seeds": sum(r["diverged"] for r in runs),
            **{key: _stats([r[key] for r in runs]) for key in ("train_acc", "val_acc", "test_acc", "steps", "wall_s")},
            "gap": _stats([r["train_acc"] - r["test_acc"] for r in runs]),
            "curve": runs[0]["curve"], "telemetry": runs[0]["telemetry"],
        })
    return results
