"""Built-in data sets (no download), split into train / validation / test."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Splits:
    """A classification data set: the validation split picks learning rates, the test split
    is only reported."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def input_shape(self):
        return tuple(self.x_train.shape[1:])


def _split(name, x, y, classes, val_size, test_size, gen) -> Splits:
    order = torch.randperm(len(x), generator=gen)
    x, y = x[order], y[order]
    train = len(x) - val_size - test_size
    return Splits(name, x[:train], y[:train], x[train:train + val_size], y[train:train + val_size],
                  x[train + val_size:], y[train + val_size:], classes)


def teacher(train_size: int = 32768, *, inputs: int = 16, classes: int = 10, label_noise: float = 0.1,
            seed: int = 0) -> Splits:
    """Gaussian inputs labelled by a fixed random teacher MLP; ``label_noise`` of the labels
    (train, validation and test alike) are replaced by random classes, so a student that
    memorises its training set generalises worse (the gap large batches are known for).
    Validation 4096 and test 8192 samples, enough to resolve a 1% accuracy difference."""
    if train_size < 2:
        raise ValueError(f"train_size must be >= 2, got {train_size!r}")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise!r}")
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(inputs, 64, generator=gen) / inputs ** 0.5
    w2 = torch.randn(64, classes, generator=gen) / 8.0
    val_size, test_size = 4096, 8192
    x = torch.randn(train_size + val_size + test_size, inputs, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    noisy = torch.rand(len(y), generator=gen) < label_noise
    y = torch.where(noisy, torch.randint(0, classes, y.shape, generator=gen), y)
    return _split("teacher", x, y, classes, val_size, test_size, gen)


def digits(*, seed: int = 0) -> Splits:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, a real data set):
    1257 train, 180 validation, 360 test, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install 'cblr_ext[study]'") from exc
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return _split("digits", x, y, 10, 180, 360, torch.Generator().manual_seed(seed))


DATASETS = {"teacher": teacher, "digits": digits}
