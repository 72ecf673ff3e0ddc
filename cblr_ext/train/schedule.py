"""Batch size by epoch or step milestones, as a batch sampler for a standard DataLoader."""
from __future__ import annotations

import bisect
from typing import Dict, Iterator, List

import torch
from torch.utils.data import Sampler


class BatchSizeSchedule(Sampler[List[int]]):
    """Yields index batches whose size follows ``milestones``.

    ``milestones`` maps the first epoch (``unit="epoch"``) or the first global step
    (``unit="step"``) of each stage to its batch size, e.g. ``{0: 128, 5: 512}``;
    it must contain 0.  Sizes may grow or shrink.  Each pass over the sampler is
    one epoch: a (seeded, per-epoch) permutation of ``range(dataset_size)`` cut
    into consecutive batches, so every example appears exactly once per epoch; the
    last batch of an epoch holds what is left and may be smaller.

    Use it as ``DataLoader(dataset, batch_sampler=schedule)``.  The step counter is
    the number of batches yielded so far, which is the training step of a batch
    when it is consumed (prefetching workers only read ahead).
    """

    def __init__(self, dataset_size: int, milestones: Dict[int, int], *, unit: str = "epoch",
                 shuffle: bool = True, seed: int = 0):
        if dataset_size < 1:
            raise ValueError(f"dataset_size must be >= 1, got {dataset_size!r}")
        if unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {unit!r}")
        if not milestones or 0 not in milestones:
            raise ValueError(f"milestones must map 0 (the first {unit}) to a batch size, got {milestones!r}")
        for start, size in milestones.items():
            if not isinstance(start, int) or start < 0:
                raise ValueError(f"milestones keys must be {unit} numbers >= 0, got {start!r}")
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"milestones batch sizes must be ints >= 1, got {size!r}")
        self.dataset_size = dataset_size
        self.unit = unit
        self.shuffle = shuffle
        self.seed = seed
        self._starts = sorted(milestones)
        self._sizes = [milestones[s] for s in self._starts]
        self.epoch = 0   # of the next pass
        self.step = 0    # batches yielded so far

    def batch_size_at(self, position: int) -> int:
        """The batch size at epoch or step ``position`` (in the schedule's unit)."""
        return self._sizes[bisect.bisect_right(self._starts, position) - 1]

    def set_epoch(self, epoch: int) -> None:
        """Start the next pass at ``epoch`` (e.g. when resuming); the step counter is kept."""
        self.epoch = epoch

    def _sizes_of_epoch(self, step: int) -> List[int]:
        sizes, left = [], self.dataset_size
        while left:
            position = self.epoch if self.unit == "epoch" else step + len(sizes)
            sizes.append(min(self.batch_size_at(position), left))
            left -= sizes[-1]
        return sizes

    def __len__(self) -> int:
        """Batches in the next epoch."""
        return len(self._sizes_of_epoch(self.step))

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=gen).tolist()
        else:
            order = list(range(self.dataset_size))
        start = 0
        for size in self._sizes_of_epoch(self.step):
            self.step += 1
            yield order[start:start + size]
            start += size
        self.epoch += 1
