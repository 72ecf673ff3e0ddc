"""Structural telemetry: per step and layer ‖g‖, ‖s‖, κ, r and the loss change per step.

The quantities Gao & Zhong follow across batch sizes.  Everything measured per
step stays on the device; the host copy happens every ``every`` steps (one copy
for all of them), so the training loop gains no synchronisation between those.
"""
from __future__ import annotations

import csv
import json
import math
from typing import Callable, Dict, Iterable, List, Tuple

import torch

COLUMNS = ["step", "layer", "g_norm", "step_norm", "kappa", "ratio", "loss",
           "loss_change_same_batch", "loss_change_next_batch"]


class StructureLogger:
    """Wraps ``optimizer.step(closure)`` and records, per step t and layer:

    * ``g_norm`` ‖g_t‖ (the gradient the step used) and ``step_norm`` ‖s_t‖ =
      ‖w_t − w_{t+1}‖, measured here from ``.grad`` and the parameters;
    * ``kappa`` κ̄ and ``ratio`` r from ``optimizer.layer_stats()``, sampled on the
      steps where the logger copies to the host (every ``every``-th step; NaN on
      the others and for optimizers without ``layer_stats``): that call copies the
      optimizer's statistics to the host, so calling it every step would add a
      synchronisation per step;
    * ``loss`` L_{B_t}(w_t), the first closure evaluation;
    * the loss update step length, as two columns:
      ``loss_change_same_batch`` L_{B_t}(w_t) − L_{B_t}(w_{t−1}), on the same batch,
      where the optimizer evaluated the closure a second time at
      w_t + s_{t−1} = w_{t−1} (CBLR's curvature probe; NaN on other steps), and
      ``loss_change_next_batch`` L_{B_{t+1}}(w_{t+1}) − L_{B_t}(w_t), which needs no
      extra forward but includes the change of batch (NaN on the last step).

    Layers are named by ``named_parameters`` whether the optimizer was built from
    ``model.parameters()`` or ``model.named_parameters()``: κ and r are matched to a
    layer by its parameter, not by the optimizer's key for it.  Keeps a copy of the
    parameters during each step (to measure ‖s‖).
    """

    def __init__(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]],
                 optimizer: torch.optim.Optimizer, *, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        named = list(named_parameters)
        if not all(isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) for pair in named):
            raise TypeError("StructureLogger names its layers: pass model.named_parameters(), "
                            "not model.parameters()")
        named = [(n, p) for n, p in named if p.requires_grad]
        if not named:
            raise ValueError("named_parameters holds no parameter that requires grad")
        self.layers = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.optimizer = optimizer
        self.every = every
        self.steps = 0
        self.rows: List[Dict] = []
        self._pending: List[torch.Tensor] = []   # per step: [loss, same-batch change, ‖g‖..., ‖s‖...]
        self._last_flushed_loss = math.nan

    def step(self, closure: Callable[[], torch.Tensor]):
        """``optimizer.step`` with the closure's losses recorded; returns its loss."""
        losses = []

        def recording_closure():
            loss = closure()
            losses.append(torch.as_tensor(loss).detach().reshape(()).float())
            return loss

        before = [p.detach().clone() for p in self.params]
        result = self.optimizer.step(recording_closure)
        if not losses:
            raise ValueError("the closure was never called: StructureLogger.step needs a step that evaluates it")
        same_batch = losses[0] - losses[1] if len(losses) > 1 else torch.full_like(losses[0], math.nan)
        g_norms = [torch.linalg.vector_norm(p.grad.float()) if p.grad is not None
                   else torch.zeros((), device=p.device) for p in self.params]
        s_norms = [torch.linalg.vector_norm((b.float() - p.detach().float())) for b, p in zip(before, self.params)]
        device = losses[0].device
        self._pending.append(torch.stack([losses[0], same_batch.to(device)]
                                         + [v.to(device) for v in g_norms + s_norms]))
        self.steps += 1
        if self.steps % self.every == 0:
            self.flush()
        return result

    def flush(self) -> None:
        """Copy the pending steps to the host (one copy) and sample κ, r of the last one."""
        if not self._pending:
            return
        values = torch.stack(self._pending).cpu().tolist()
        first = self.steps - len(values)
        stats = self._stats_by_layer()
        n = len(self.layers)
        # the next-batch change of the previous flush's last step is known now
        if self.rows and not math.isnan(self._last_flushed_loss):
            for row in self.rows[-n:]:
                row["loss_change_next_batch"] = values[0][0] - self._last_flushed_loss
        for k, row_values in enumerate(values):
            step = first + k
            next_loss = values[k + 1][0] if k + 1 < len(values) else math.nan
            for i, layer in enumerate(self.layers):
                sampled = stats.get(i) if k == len(values) - 1 else None
                self.rows.append({
                    "step": step, "layer": layer,
                    "g_norm": row_values[2 + i], "step_norm": row_values[2 + n + i],
                    "kappa": sampled["kappa"] if sampled else math.nan,
                    "ratio": sampled["ratio"] if sampled else math.nan,
                    "loss": row_values[0], "loss_change_same_batch": row_values[1],
                    "loss_change_next_batch": next_loss - row_values[0],
                })
        self._last_flushed_loss = values[-1][0]
        self._pending.clear()

    def _stats_by_layer(self) -> Dict[int, dict]:
        """``layer_stats()`` keyed by the logger's layer index: the optimizer keys a layer by
        its name where it was given names, else by "group.index"."""
        if not hasattr(self.optimizer, "layer_stats"):
            return {}
        stats = self.optimizer.layer_stats()
        index = {id(p): i for i, p in enumerate(self.params)}
        out = {}
        for gi, group in enumerate(self.optimizer.param_groups):
            names = group.get("param_names")
            for pi, param in enumerate(group["params"]):
                key = names[pi] if names else f"{gi}.{pi}"
                if id(param) in index and key in stats:
                    out[index[id(param)]] = stats[key]
        return out

    def series(self, column: str, layer: str) -> Tuple[List[int], List[float]]:
        """(steps, values) of one column for one layer, skipping NaN entries."""
        if column not in COLUMNS[2:]:
            raise ValueError(f"column must be one of {COLUMNS[2:]}, got {column!r}")
        if layer not in self.layers:
            raise ValueError(f"layer must be one of {self.layers}, got {layer!r}")
        pairs = [(r["step"], r[column]) for r in self.rows if r["layer"] == layer and not math.isnan(r[column])]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def to_csv(self, path) -> None:
        self.flush()
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)

    def to_json(self, path) -> None:
        self.flush()
        with open(path, "w") as f:
            # NaN is not JSON: missing values are null
            json.dump([{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                       for r in self.rows], f)
