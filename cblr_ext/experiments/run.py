"""One training run of the study: a data set, model, optimizer, lr, batch size and seed."""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..train import BatchSizeSchedule, ScaledLR, StructureLogger, discard_small_losses
from .data import DATASETS
from .models import MODELS
from .optimizers import OPTIMIZERS

WARMUP_FRACTION = 0.1      # of the steps, for every optimizer
DISCARD_FRACTION = 0.2     # the "discard" variant drops this fraction of each batch ...
DISCARD_WARMUP = 0.25      # ... after this fraction of the epochs
VARIANTS = ("plain", "discard", "schedule")


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    model: str
    optimizer: str
    lr: float
    batch_size: int
    epochs: int
    seed: int
    variant: str = "plain"
    train_size: int = 32768   # teacher task only

    def __post_init__(self):
        for field, choices in (("dataset", DATASETS), ("model", MODELS), ("optimizer", OPTIMIZERS),
                               ("variant", VARIANTS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {sorted(choices)}, got {getattr(self, field)!r}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {self.batch_size!r}, {self.epochs!r}")


class _Batches(TensorDataset):
    """A TensorDataset that hands the DataLoader whole batches (one index per tensor, not per
    example)."""

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _unbatched(batch):
    return batch


def batch_milestones(batch_size: int, epochs: int, variant: str) -> dict:
    """The "schedule" variant grows the batch, B/4 for the first quarter of the epochs, B/2 for
    the second, then B; the others keep B."""
    if variant != "schedule" or epochs < 4 or batch_size < 4:
        return {0: batch_size}
    return {0: batch_size // 4, epochs // 4: batch_size // 2, epochs // 2: batch_size}


def load_data(spec: RunSpec):
    return _cached_data(spec.dataset, spec.train_size if spec.dataset == "teacher" else None)


@functools.lru_cache(maxsize=4)
def _cached_data(dataset, train_size):
    # a sweep trains many runs on the same data; no run modifies it
    return DATASETS[dataset](train_size) if train_size else DATASETS[dataset]()


@torch.no_grad()
def accuracy(model, x, y, chunk=8192) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train()
    return correct / len(x)


def total_steps(sampler: BatchSizeSchedule, epochs: int) -> int:
    sizes = [sampler.batch_size_at(e) for e in range(epochs)]
    return sum(math.ceil(sampler.dataset_size / b) for b in sizes)


def train_run(spec: RunSpec, *, telemetry_points: int = 40) -> dict:
    """Train and return the metrics, the per-epoch (wall time, val/test accuracy) curve and the
    structural telemetry (per-layer series of about ``telemetry_points`` samples)."""
    data = load_data(spec)
    torch.manual_seed(spec.seed)
    model = MODELS[spec.model](data.input_shape, data.classes)
    opt_spec = OPTIMIZERS[spec.optimizer]
    opt = opt_spec.make(list(model.named_parameters()), spec.lr)
    sampler = BatchSizeSchedule(len(data.x_train), batch_milestones(spec.batch_size, spec.epochs, spec.variant),
                                seed=spec.seed)
    loader = DataLoader(_Batches(data.x_train, data.y_train), batch_sampler=sampler, collate_fn=_unbatched)
    steps = total_steps(sampler, spec.epochs)
    lr_rule = ScaledLR(opt, opt_spec.base_batch, rule=opt_spec.lr_rule,
                       warmup_steps=max(1, round(WARMUP_FRACTION * steps)))
    logger = StructureLogger(model.named_parameters(), opt, every=max(1, steps // telemetry_points))
    discard = DISCARD_FRACTION if spec.variant == "discard" else 0.0
    discard_warmup = round(DISCARD_WARMUP * spec.epochs)

    curve, train_seconds, step = [], 0.0, 0
    for epoch in range(spec.epochs):
        started = time.perf_counter()
        for x, y in loader:
            # cosine decay after the warm-up, the same shape for every optimizer
            decay = 0.5 * (1 + math.cos(math.pi * step / steps))
            lr_rule.apply(len(y), step, decay)

            def closure():
                opt.zero_grad()
                losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
                loss = discard_small_losses(losses, discard, step=epoch, warmup=discard_warmup)
                loss.backward()
                return loss
            logger.step(closure)
            step += 1
        train_seconds += time.perf_counter() - started
        curve.append({"epoch": epoch + 1, "wall_s": train_seconds,
                      "val_acc": accuracy(model, data.x_val, data.y_val),
                      "test_acc": accuracy(model, data.x_test, data.y_test)})
    logger.flush()
    final_loss = logger.rows[-1]["loss"]
    return {
        "spec": asdict(spec), "steps": step, "wall_s": train_seconds,
        "train_acc": accuracy(model, data.x_train, data.y_train),
        "val_acc": curve[-1]["val_acc"], "test_acc": curve[-1]["test_acc"],
        "final_train_loss": final_loss, "diverged": not math.isfinite(final_loss),
        "curve": curve, "telemetry": summarise(logger),
    }


def summarise(logger: StructureLogger) -> dict:
    """Per layer: the sampled κ and r series and the means of ‖g‖, ‖s‖ over the run; per run:
    the mean loss decrease per step (same batch where measured, next batch always)."""
    layers = {}
    for layer, param in zip(logger.layers, logger.params):
        entry = {"ndim": param.dim()}
        for column in ("kappa", "ratio"):
            steps, values = logger.series(column, layer)
            entry[column] = {"steps": steps, "values": values}
        for column in ("g_norm", "step_norm"):
            _, values = logger.series(column, layer)
            entry[f"mean_{column}"] = sum(values) / len(values) if values else math.nan
        layers[layer] = entry

    def mean_drop(column):
        _, values = logger.series(column, logger.layers[0])
        return -sum(values) / len(values) if values else math.nan
    return {"layers": layers, "mean_loss_drop_same_batch": mean_drop("loss_change_same_batch"),
            "mean_loss_drop_next_batch": mean_drop("loss_change_next_batch")}
