"""Training toolkit: synthetic large-batch tasks and a loop that records the
per-layer ratios, for demos, examples and end-to-end tests (no data download)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class TeacherTask:
    """Classification of Gaussian inputs labelled by a fixed random teacher MLP."""

    inputs: int = 32
    classes: int = 10
    train_size: int = 32768
    test_size: int = 4096
    seed: int = 0

    def __post_init__(self):
        gen = torch.Generator().manual_seed(self.seed)
        teacher = [torch.randn(self.inputs, 64, generator=gen) / self.inputs ** 0.5,
                   torch.randn(64, self.classes, generator=gen) / 8.0]
        x = torch.randn(self.train_size + self.test_size, self.inputs, generator=gen)
        y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)
        self.x_train, self.x_test = x[:self.train_size], x[self.train_size:]
        self.y_train, self.y_test = y[:self.train_size], y[self.train_size:]

    def model(self, width=128, seed=0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(self.inputs, width), torch.nn.ReLU(),
            torch.nn.Linear(width, width), torch.nn.ReLU(),
            torch.nn.Linear(width, self.classes))

    def batches(self, batch_size, steps, seed=1):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, self.train_size, (batch_size,), generator=gen)
            yield self.x_train[idx], self.y_train[idx]

    @torch.no_grad()
    def evaluate(self, model):
        logits = model(self.x_test)
        loss = torch.nn.functional.cross_entropy(logits, self.y_test)
        return float(loss), float((logits.argmax(1) == self.y_test).float().mean())


@dataclass
class RunResult:
    losses: list = field(default_factory=list)
    test_loss: float = float("nan")
    test_accuracy: float = float("nan")
    ratios: dict = field(default_factory=dict)


def train(task: TeacherTask, model: torch.nn.Module, opt: torch.optim.Optimizer, *, batch_size: int,
          steps: int, desc: str = "train", progress: bool = True) -> RunResult:
    """Train with ``opt.step(closure)`` (the convention CBLR needs; the others accept it)."""
    result = RunResult()
    for x, y in tqdm(task.batches(batch_size, steps), total=steps, desc=desc, disable=not progress,
                     leave=False):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        result.losses.append(float(opt.step(closure).detach()))
    result.test_loss, result.test_accuracy = task.evaluate(model)
    if hasattr(opt, "layer_stats"):
        result.ratios = {name: s["ratio"] for name, s in opt.layer_stats().items()}
    return result
