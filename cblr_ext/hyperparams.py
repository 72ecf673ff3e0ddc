"""Group hyperparameters: defaults per rule and validation.

Validation runs when a group is added and again before every step (a user may
edit ``param_groups`` directly, as LR schedulers do), so a bad value is
reported before any tensor is modified; a tensor lr's value only when the group
is added (a step reads nothing on the host).
"""
from __future__ import annotations

import math
import numbers

import torch

RULES = ("lars", "mclr", "cblr")
BACKENDS = ("auto", "reference", "cpp", "triton", "cuda")
MEDIANS = ("exact", "approx")



class _RuleDefault:
    """The constructor default of an option whose value depends on the rule (RULE_DEFAULTS):
    for ``max_ratio`` None already means "no bound", so None cannot stand for "the default"."""

    def __repr__(self):
        return "RULE_DEFAULT"


RULE_DEFAULT = _RuleDefault()

# The rule-specific defaults: docs/algorithm.md ("Defaults"), chosen by the transfer protocol
# of docs/experiments.md (on MNIST-1D, checked on held-out tasks).  MCLR's and CBLR's ratios
# are bounded: MCLR's r = η/(m + ε) grows without limit as the median quotient m → 0;
# CBLR's through a loop (a long step lands where the secant along it measures a smaller κ,
# r = 1/κ̄ grows and the next step is longer).  MCLR's EMA (ρ = 0.5) damps the same loop;
# CBLR, bounded, follows its latest secant (ρ = 0).  A layer that is not adapted steps γ·d
# (r = 1): right at CBLR's γ (a fraction of the Newton step, SGD's scale), ~10³ too long at
# the γ of LARS and MCLR (η = 1e-3), so these two adapt 1-D tensors too.
RULE_DEFAULTS = {
    "lars": dict(trust_coefficient=1e-3, curvature_ema=0.0, max_ratio=None, exclude_1d=False),
    "mclr": dict(trust_coefficient=1e-3, curvature_ema=0.5, max_ratio=0.25, exclude_1d=False),
    "cblr": dict(trust_coefficient=1.0, curvature_ema=0.0, max_ratio=1.0, exclude_1d=True),
}


def _number(name, value):
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a Python number, got a tensor (only lr may be a tensor)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def _learning_rate(lr, read_tensor: bool):
    """γ as a float where it is read: a number, or a CPU tensor when ``read_tensor`` (an
    accelerator tensor's value is never read on the host: None)."""
    if not isinstance(lr, torch.Tensor):
        return _number("lr", lr)
    if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
        raise ValueError(f"lr must be a number or a one-element real floating tensor, got {lr.dtype} "
                         f"of shape {tuple(lr.shape)}")
    return float(lr) if read_tensor and lr.device.type == "cpu" else None


def check_learning_rate(lr, read_tensor: bool) -> None:
    """γ is finite and >= 0 where it is read (torch's wording)."""
    value = _learning_rate(lr, read_tensor)
    if value is not None and not 0 <= value < math.inf:
        shown = value if isinstance(lr, torch.Tensor) else lr
        raise ValueError(f"Invalid learning rate: {shown}{'' if math.isfinite(value) else ' (must be finite)'}")


def validate_group(group: dict, rule: str, read_tensor_lr: bool = False) -> None:
    """Raise ``ValueError`` naming the first bad hyperparameter of ``group``.  A tensor lr's
    value is read only with ``read_tensor_lr`` (when the group is added): a step reads
    nothing on the host, so that it neither syncs nor breaks a torch.compile graph; the
    tensor is then the caller's (an LR scheduler's) to keep valid."""
    check_learning_rate(group["lr"], read_tensor_lr)
    momentum = _number("momentum", group["momentum"])
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"Invalid momentum value: {group['momentum']} (must be in [0, 1))")
    if _number("weight_decay", group["weight_decay"]) < 0:
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
    if not _number("trust_coefficient", group["trust_coefficient"]) > 0:
        raise ValueError(f"Invalid trust_coefficient: {group['trust_coefficient']} (must be > 0)")
    if _number("eps", group["eps"]) < 0:
        raise ValueError(f"Invalid epsilon value: {group['eps']} (must be >= 0)")
    if group["max_ratio"] is not None and not _number("max_ratio", group["max_ratio"]) > 0:
        raise ValueError(f"Invalid max_ratio: {group['max_ratio']} (must be None or > 0)")
    check_curvature_options(group)
    if group["nesterov"] and momentum == 0:
        raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening")
    if group["backend"] not in BACKENDS:
        raise ValueError(f"Invalid backend: {group['backend']!r} (choose from {', '.join(BACKENDS)})")
    if group["median"] not in MEDIANS:
        raise ValueError(f"Invalid median: {group['median']!r} (choose from {', '.join(MEDIANS)})")
    if group["lag"] not in (0, 1) or isinstance(group["lag"], bool):
        raise ValueError(f"Invalid lag: {group['lag']!r} (must be 0 or 1)")
    if group["lag"] and rule == "cblr":
        raise ValueError("Invalid lag: lag=1 exists for LARS and MCLR only (CBLR measures with a closure)")
    check_flags(group, ("adapt", "maximize"))


def check_curvature_options(group: dict) -> None:
    """The running curvature's options (the SGD base's rules, and CBLR on the Adam base):
    η_F > 0, ρ in [0, 1), k an integer ≥ 1."""
    if not _number("fallback_trust", group["fallback_trust"]) > 0:
        raise ValueError(f"Invalid fallback_trust: {group['fallback_trust']} (must be > 0)")
    ema = _number("curvature_ema", group["curvature_ema"])
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"Invalid curvature_ema: {ema} (must be in [0, 1))")
    k = group["curvature_interval"]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"Invalid curvature_interval: {k!r} (must be an integer >= 1)")


def check_flags(group: dict, keys: tuple) -> None:
    """``keys`` of ``group`` and its ``decay`` (where ``decay_mask`` set it) are bools."""
    for key in (*keys, "decay"):
        if key in group and not isinstance(group[key], bool):
            raise ValueError(f"Invalid {key}: {group[key]!r} (must be a bool)")
