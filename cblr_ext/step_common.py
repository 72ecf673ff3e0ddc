"""What every optimizer of the package does around its ops in a step, one copy each: the
layers of a group that have gradients (checked before any state exists), the step-wide
skip decision, GradScaler's scale on the device, state a step creates, and the per-layer
statistics by name."""
from __future__ import annotations

import torch

from .contract import STAT_NAMES


def _read_step_applies(found_inf: torch.Tensor) -> bool:
    return not bool(found_inf)


# _read_step_applies as torch.compile runs it: a quiet graph break (no item() warning), on
# a layer's first step only.  Made when a group is added, not on import: importing
# torch._dynamo imports the Triton package, which must follow TRITON_INTERPRET (see backends/).
_step_applies = None


def prepare_step_applies() -> None:
    global _step_applies
    if _step_applies is None:
        _step_applies = torch.compiler.disable(_read_step_applies)


class NewState:
    """The state buffers of one step's update: a layer's own where it has them, else made
    for this step and kept only if the step applies (a skipped step creates no state: only
    then, once per step, is ``found_inf`` read on the host; ``prepare_step_applies`` first)."""

    def __init__(self, found_inf: torch.Tensor):
        self.found_inf = found_inf
        self.keep = None

    def buffers(self, key: str, likes: list, states: list, make) -> list:
        tensors = []
        for like, s in zip(likes, states):
            tensor = s.get(key)
            if tensor is None:
                if self.keep is None:
                    self.keep = _step_applies(self.found_inf)
                tensor = make(like)
                if self.keep:
                    s[key] = tensor
            tensors.append(tensor)
        return tensors


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


# fp64 layers whose sums of squares would leave fp64's normal range (docs/algorithm.md,
# "The fp64 range"): n·max|x|² ≥ 2^1020 (Σx², and Σ(Δd)² of three such terms, could overflow)
# for w, g, a probe's g and s; 0 < max|w| < 2^-511 (Σw² could be subnormal or 0).
_SQUARES_LIMIT = 2.0 ** 1020
_SMALLEST_WEIGHT = 2.0 ** -511


def _peaks(tensors: list, scale=None) -> torch.Tensor:
    peak = torch.stack(torch._foreach_norm(tensors, float("inf"))).double()
    return peak if scale is None else peak / scale.double()


def _squares_overflow(peak: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return peak.square() * sizes >= _SQUARES_LIMIT


def fp64_out_of_range(params: list, grads: list, grad_scale=None, probe_grads=None, probe_steps=None):
    """[L] bool, True for an fp64 layer outside the range its sums of squares represent (the
    step then counts it as non-finite); None when the group has no fp64 layer (no pass)."""
    wide = [i for i, p in enumerate(params) if p.dtype == torch.float64 and p.numel()]  # max of none: no identity
    if not wide:
        return None
    device = params[wide[0]].device
    sizes = torch.tensor([float(params[i].numel()) for i in wide], dtype=torch.float64, device=device)
    w = _peaks([params[i] for i in wide])
    out = ((w > 0) & (w < _SMALLEST_WEIGHT)) | _squares_overflow(w, sizes)
    out = out | _squares_overflow(_peaks([grads[i] for i in wide], grad_scale), sizes)
    probed = [j for j, i in enumerate(wide) if probe_grads and probe_grads[i] is not None]
    if probed:
        n = sizes[probed]
        g_s = _peaks([probe_grads[wide[j]] for j in probed], grad_scale)
        s = _peaks([probe_steps[wide[j]] for j in probed])
        out[probed] = out[probed] | _squares_overflow(g_s, n) | _squares_overflow(s, n)
    flags = torch.zeros(len(params), dtype=torch.bool, device=device)
    flags[wide] = out
    return flags


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
