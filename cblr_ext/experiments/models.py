"""The models of the study: an MLP and a small CNN with BatchNorm."""
from __future__ import annotations

import functools
import math

from torch import nn


def mlp(input_shape, classes: int, width: int = 256, depth: int = 2) -> nn.Module:
    """``depth`` hidden ReLU layers of ``width`` units; flattens its input, so it takes images too."""
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got {depth!r}, {width!r}")
    sizes = [math.prod(input_shape)] + [width] * depth
    hidden = [layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), nn.ReLU())]
    return nn.Sequential(nn.Flatten(), *hidden, nn.Linear(width, classes))


def small_cnn(input_shape, classes: int, channels: int = 32) -> nn.Module:
    """Two 3×3 conv-BatchNorm-ReLU blocks (the second strided), global average pool, linear."""
    if len(input_shape) != 3:
        raise ValueError(f"small_cnn needs (channels, height, width) inputs, got input_shape {input_shape!r}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * channels),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, classes))


MODELS = {"mlp": mlp, "cnn": small_cnn, "mlp-w128-d3": functools.partial(mlp, width=128, depth=3)}
