"""The reference backend: a readable single-tensor for-loop over the layers.

It is the ground truth every fused backend is tested against, so it favours
clarity over speed and may read values on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import layer_math as lm
from ..functional import (LayerBatch, REDUCTION_COLUMNS, STAT_COLUMNS, finish_probe, state_dtype, times_lr)

name = "reference"


def available(device: torch.device) -> bool:
    return True


def _layer_kappa(batch: LayerBatch, i: int, w: Tensor, g: Tensor, w_norm: Tensor, g_norm: Tensor,
                 secant: Tensor) -> Tensor:
    """This step's curvature measurement of layer i by the group's rule."""
    hp = batch.hp
    if batch.rule == "lars":
        return lm.lars_kappa(w_norm, g_norm, hp["weight_decay"], hp["eps"])
    if batch.rule == "mclr":
        q = lm.curvature_quotients(lm.decayed_grad(g, w, hp["weight_decay"]), w)
        return lm.median_kappa(lm.lower_median(q, approx=hp["median"] == "approx"), hp["eps"])
    diff_norm, step_norm = secant[i]
    return lm.secant_kappa(diff_norm, step_norm, hp["eps"])


def reduce(batch: LayerBatch) -> Tensor:
    """Pass 1: per layer ‖w‖, ‖g‖, the measurement κ, whether it counts, and the
    non-finite flag, all of the current inputs (CBLR: after finishing the probe)."""
    hp = batch.hp
    secant = finish_probe(batch, secant_norms, restore) if batch.rule == "cblr" else None
    out = torch.full((len(batch), REDUCTION_COLUMNS), float("nan"), dtype=torch.float32, device=batch.device)
    for i, (p, grad, state) in enumerate(zip(batch.params, batch.grads, batch.states)):
        w, g = p.to(state_dtype(p)), grad.to(state_dtype(p))
        w_norm = torch.linalg.vector_norm(w).float()
        g_norm = torch.linalg.vector_norm(g).float()
        kappa = _layer_kappa(batch, i, w, g, w_norm, g_norm, secant).float()
        if batch.rule == "cblr":
            measured = torch.tensor(batch.adapt[i], device=p.device) & ~torch.isnan(secant[i, 1])
        else:
            measured = torch.tensor(batch.adapt[i], device=p.device) & lm.measurement_due(
                state["age"], hp["curvature_interval"])
        out[i] = torch.stack([w_norm, g_norm, kappa, measured.float(), (~torch.isfinite(g).all()).float()])
    return out


def apply(batch: LayerBatch, red: Tensor, found_inf: Tensor) -> Tensor:
    """Pass 2: ratio and update of every layer; nothing changes when ``found_inf``."""
    hp = batch.hp
    skip = bool(found_inf)
    stats = torch.zeros((len(batch), STAT_COLUMNS), dtype=torch.float32, device=batch.device)
    for i, (p, grad, state) in enumerate(zip(batch.params, batch.grads, batch.states)):
        current = red[i, :3]
        # lag=1: the ratio uses ‖w‖, ‖g‖ and κ of the previous step's inputs.
        w_norm, g_norm, kappa = state["lagged"] if hp["lag"] and "lagged" in state else current
        measured = red[i, 3] > 0
        ratio, new_bar, used, fallback = lm.layer_ratio(
            kappa, measured, state["kappa"], w_norm, g_norm,
            torch.tensor(batch.adapt[i], device=p.device),
            trust_coefficient=hp["trust_coefficient"], curvature_ema=hp["curvature_ema"],
            max_ratio=hp["max_ratio"], weight_decay=hp["weight_decay"], eps=hp["eps"],
            fallback_trust=hp["fallback_trust"])
        alpha = times_lr(ratio, hp["lr"])
        step_norm = torch.zeros((), device=p.device)
        if not skip:
            dtype = state_dtype(p)
            w = p.to(dtype)  # p itself when already fp32/fp64
            d = lm.decayed_grad(grad.to(dtype), w, hp["weight_decay"])
            v = None
            if batch.uses_momentum:
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype)
                v = state["momentum_buffer"]
            s = lm.momentum_update(w, d, v, alpha, hp["momentum"], hp["nesterov"])
            if w is not p:
                p.copy_(w)
            if batch.keeps_prev_step:
                state["prev_step"] = s.clone() if s is v else s
            state["kappa"] = new_bar
            state["age"] = lm.next_age(state["age"], measured)
            if hp["lag"]:
                state["lagged"] = current.clone()
            step_norm = torch.linalg.vector_norm(s).float()
        stats[i] = torch.stack([w_norm, g_norm, step_norm, used, ratio, alpha, fallback.float()])
    return stats


def shift(params: list, steps: list, saved: list) -> None:
    """saved ← w, then w ← w + s_{t−1} (s rounded to w's dtype first).  No ‖w_t‖:
    ``reduce`` measures the restored parameters."""
    for p, s, w in zip(params, steps, saved):
        w.copy_(p)
        p.add_(s.to(p.dtype))


def restore(dst: list, src: list) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


def secant_norms(params: list, g_t: list, g_p: list, steps: list, weight_decay: float) -> Tensor:
    """Per layer (‖d(w_t) − d(w_t + s)‖, ‖s‖), d = g + β·w, g_t and g_p (at w_t + s) on the
    same batch, s as the shift added it (rounded to the parameter's dtype)."""
    rows = []
    for p, gt, gp, s in zip(params, g_t, g_p, steps):
        dtype = state_dtype(p)
        diff = lm.secant_difference(gt.to(dtype), gp.to(dtype), s.to(p.dtype).to(dtype), weight_decay)
        rows.append(torch.stack([torch.linalg.vector_norm(diff), torch.linalg.vector_norm(s)]).float())
    return torch.stack(rows)
