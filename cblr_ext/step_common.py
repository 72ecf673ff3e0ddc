"""What every optimizer of the package does around its ops in a step, one copy each: the
layers of a group that have gradients (checked before any state exists), the step-wide
skip decision, GradScaler's scale on the device, and the per-layer statistics by name."""
from __future__ import annotations

import torch

from .contract import STAT_NAMES


def layers_with_grads(optimizer: str, gi: int, group: dict) -> tuple:
    """(params, grads, positions, device) of group ``gi``'s parameters with a gradient;
    refuses mixed devices, sparse gradients and mismatched shapes."""
    params, grads, positions = [], [], []
    device = None
    for pi, p in enumerate(group["params"]):
        if p.device != device:
            if device is not None:
                devices = sorted({str(q.device) for q in group["params"]})
                raise ValueError(f"param group {gi} mixes devices {devices}; "
                                 "put parameters of each device in their own group")
            device = p.device
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError(f"{optimizer} does not support sparse gradients (param group {gi}, parameter {pi})")
        if grad.shape != p.shape:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} does not match "
                               f"parameter {pi} of group {gi}, shape {tuple(p.shape)}")
        params.append(p)
        grads.append(grad)
        positions.append(pi)
    return params, grads, positions, device


def grad_scale_on(grad_scale, device):
    """GradScaler's scale as the ops take it (fp32 on the parameters' device), or None."""
    if grad_scale is None:
        return None
    return grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)


def skip_decision(device, amp_found_inf, reductions: list, skip_nonfinite: bool) -> torch.Tensor:
    """The step-wide skip flag (a device bool): GradScaler's check of g (which skips whatever
    ``skip_nonfinite`` says), or a non-finite gradient in any group's pass 1."""
    found_inf = torch.zeros((), dtype=torch.bool, device=device)
    if amp_found_inf is not None:
        found_inf = torch.as_tensor(amp_found_inf, device=device).reshape(()) != 0
    if skip_nonfinite:
        for red in reductions:
            found_inf = found_inf | red.nonfinite.any().to(device)
    return found_inf


def stats_by_layer(param_groups: list, stats: list) -> dict:
    """``layer_stats()``: rows of ``((group index, positions), [L, 7] stats)`` keyed by parameter
    name where names were given, else "group.index"; copies the statistics to the host."""
    out = {}
    for (gi, positions), table in stats:
        names = param_groups[gi].get("param_names")
        for pi, row in zip(positions, table.detach().cpu().tolist()):
            entry = dict(zip(STAT_NAMES, row))
            entry["fallback"] = bool(entry["fallback"])
            out[names[pi] if names else f"{gi}.{pi}"] = entry
    return out
