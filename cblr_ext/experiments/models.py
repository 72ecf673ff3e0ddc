"""The models of the study: an MLP and a small CNN with BatchNorm."""
from __future__ import annotations

import math

from torch import nn


def mlp(input_shape, classes: int, width: int = 256) -> nn.Module:
    """Two hidden ReLU layers; flattens its input, so it takes images too."""
    inputs = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def small_cnn(input_shape, classes: int, channels: int = 32) -> nn.Module:
    """Two 3×3 conv-BatchNorm-ReLU blocks (the second strided), global average pool, linear."""
    if len(input_shape) != 3:
        raise ValueError(f"small_cnn needs (channels, height, width) inputs, got input_shape {input_shape!r}")
    return nn.Sequential(
        nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * channels),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * channels, classes))


MODELS = {"mlp": mlp, "cnn": small_cnn}
