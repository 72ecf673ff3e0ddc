"""The layer math of docs/algorithm.md, once, in Python.

Every function is elementwise over tensors of per-layer scalars, so the same
code serves the reference backend and the Python side of the device backends
([L] tensors, one entry per layer).  The per-layer scalars (norms, κ, κ̄, r, α)
are fp64, formed from fp64 sums of squares: on finite fp32 input no square
overflows or underflows and no norm or curvature overflows, so r is the formula's
value rounded once wherever it is representable (docs/algorithm.md, "Precision").  No
function reads a value on the host: everything is ``torch.where`` so that a
step never synchronises with the device.  The C++/CUDA twin of this file is
``csrc/layer_math.h``; keep the two in step.
"""
from __future__ import annotations

import torch
from torch import Tensor

_APPROX_MASK = -65536  # 0xFFFF0000 as int32: keeps sign, exponent, 7 mantissa bits


def lars_kappa(w_norm: Tensor, g_norm: Tensor, weight_decay: float, eps: float) -> Tensor:
    """LARS curvature (‖g‖ + β‖w‖ + ε) / ‖w‖: the layer-aggregated secant slope."""
    return (g_norm + w_norm * weight_decay + eps) / w_norm


def median_kappa(median: Tensor, eps: float) -> Tensor:
    """MCLR curvature m + ε (fp64); undefined (NaN) when the median is 0 or missing."""
    m = median.double()
    return torch.where(m > 0, m + eps, torch.full_like(m, float("nan")))


def secant_kappa(diff_norm: Tensor, step_norm: Tensor, eps: float) -> Tensor:
    """CBLR curvature (‖d(w) − d(w+s)‖ + ε) / ‖s‖; undefined when either norm is 0."""
    defined = (diff_norm > 0) & (step_norm > 0)
    return torch.where(defined, (diff_norm + eps) / step_norm, torch.full_like(diff_norm, float("nan")))


def norm_from_sum(sum_sq: Tensor) -> Tensor:
    """‖x‖ from Σx², both fp64 (a fp32 norm would overflow above 3.4e38)."""
    return sum_sq.sqrt()


def reduction_kappa(rule: str, w_norm: Tensor, g_norm: Tensor, diff_sq: Tensor, step_sq: Tensor,
                    median: Tensor, weight_decay: float, eps: float) -> Tensor:
    """This step's κ by ``rule`` from a reduction's quantities (functional.Reduction):
    the norms, the secant's Σ(Δd)² and Σs² (CBLR), the median (MCLR)."""
    if rule == "lars":
        return lars_kappa(w_norm, g_norm, weight_decay, eps)
    if rule == "mclr":
        return median_kappa(median, eps)
    return secant_kappa(norm_from_sum(diff_sq), norm_from_sum(step_sq), eps)


def decayed_grad(g: Tensor, w: Tensor, weight_decay: float) -> Tensor:
    """d = g + β·w, rounded after the product and after the sum (no fused multiply-add),
    so that every backend forms bit-identical curvature quotients."""
    return g + w * weight_decay


def realised_displacement(shifted: Tensor, w: Tensor) -> Tensor:
    """Δ = fl(w + s) − w, what the probe really moved w by (in the state dtype: exact where
    the two points are within a factor 2, always for 16-bit parameters)."""
    return shifted - w


def secant_difference(g: Tensor, g_s: Tensor, s: Tensor, weight_decay: float) -> Tensor:
    """d(w) − d(w + s) = (g − g_s) − β·s, g_s the gradient at w + s and s the realised
    displacement Δ: the weight-decay part exact, not the difference of two rounded points."""
    return (g - g_s) - s * weight_decay


def curvature_quotients(d: Tensor, w: Tensor) -> Tensor:
    """h_i = |d_i| / |w_i| over the elements with w_i ≠ 0 (flattened)."""
    nonzero = w != 0
    return d.abs()[nonzero] / w.abs()[nonzero]


def lower_median(q: Tensor, approx: bool = False) -> Tensor:
    """The ⌈n/2⌉-th smallest of ``q`` (what ``torch.median`` returns), NaN when n = 0.

    ``approx`` rounds the result toward zero to 8 significant bits (bfloat16
    precision): truncation is monotonic, so this equals the lower median of the
    truncated quotients, which one 2^16-bin histogram pass over the float bits
    finds exactly.  Relative error < 2^-7.
    """
    if q.numel() == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=q.device)
    m = q.median().float()
    if approx:
        m = (m.view(torch.int32) & _APPROX_MASK).view(torch.float32)
    return m


def fallback_ratio(w_norm: Tensor, g_norm: Tensor, weight_decay: float, eps: float,
                   fallback_trust: float) -> Tensor:
    """η_F·‖w‖ / (‖g‖ + β‖w‖ + ε), or 1 where that is undefined (‖w‖ = 0, ‖g‖ = 0, not finite)."""
    r = fallback_trust * w_norm / (g_norm + w_norm * weight_decay + eps)
    defined = (w_norm > 0) & (g_norm > 0) & torch.isfinite(r) & (r > 0)
    return torch.where(defined, r, torch.ones_like(r))


def layer_ratio(kappa: Tensor, measured: Tensor, kappa_bar: Tensor, w_norm: Tensor, g_norm: Tensor,
                adapt: Tensor, *, trust_coefficient: float, curvature_ema: float, max_ratio,
                weight_decay: float, eps: float, fallback_trust: float):
    """Ratio r of one step from a (possibly missing) measurement and the running κ̄.

    ``kappa``: this step's measurement (ignored where ``measured`` is False).
    ``kappa_bar``: κ̄ so far, NaN before the first valid measurement.
    Returns (ratio, new κ̄, κ̄ used or NaN, fallback flag); not-adapted layers get r = 1
    and keep κ̄ unchanged.
    """
    valid = measured & torch.isfinite(kappa) & (kappa > 0) & adapt
    ema_value = kappa_bar * curvature_ema + kappa * (1.0 - curvature_ema)
    new_bar = torch.where(valid, torch.where(torch.isnan(kappa_bar), kappa, ema_value), kappa_bar)
    # number / tensor is reciprocal(tensor)·number in torch (two roundings): divide once, as C++ does.
    rule_ratio = torch.full_like(new_bar, trust_coefficient) / new_bar
    # On a measuring step the fresh measurement decides; in between, κ̄ is reused.
    use_rule = torch.where(measured, valid, torch.isfinite(kappa_bar)) & adapt
    use_rule = use_rule & torch.isfinite(rule_ratio) & (rule_ratio > 0)
    ratio = torch.where(use_rule, rule_ratio,
                        fallback_ratio(w_norm, g_norm, weight_decay, eps, fallback_trust))
    if max_ratio is not None:
        ratio = torch.clamp(ratio, max=max_ratio)
    ratio = torch.where(adapt, ratio, torch.ones_like(ratio))
    used = torch.where(use_rule, new_bar, torch.full_like(new_bar, float("nan")))
    return ratio, new_bar, used, adapt & ~use_rule


def layer_alpha(ratio: Tensor, lr: Tensor) -> Tensor:
    """α = r·γ (fp64, γ the fp32 learning rate), rounded once; each layer's update rounds
    it to its math type."""
    return ratio * lr.double()


def measurement_due(age: Tensor, curvature_interval: int) -> Tensor:
    """A layer re-measures when ``curvature_interval`` steps have passed since its
    last attempt (``age`` starts at +inf, so the first opportunity measures)."""
    return age >= curvature_interval


def next_age(age: Tensor, measured: Tensor) -> Tensor:
    return torch.where(measured, torch.ones_like(age), age + 1)


def momentum_update(w: Tensor, d: Tensor, v, alpha, momentum: float, nesterov: bool):
    """v ← μ·v + α·d; s = v, or μ·v + α·d with Nesterov (s = α·d without momentum);
    w ← w − s.  Updates ``w`` and ``v`` in place and returns s."""
    scaled = d * alpha
    if v is None:
        s = scaled
    else:
        v.mul_(momentum).add_(scaled)
        s = v * momentum + scaled if nesterov else v
    w.sub_(s)
    return s


# ------------------------------------------------------------ the Adam base


def unscaled(g: Tensor, grad_scale) -> Tensor:
    """g·fl32(1/S) (GradScaler.unscale_'s factor), or g when ``grad_scale`` is None."""
    if grad_scale is None:
        return g
    inv = grad_scale.double().reciprocal().float().reshape(())
    return g * inv.to(g.dtype)


def adam_grad(g: Tensor, grad_scale, clip) -> Tensor:
    """The gradient the moments take: unscaled, then divided by the global clip divisor (or not)."""
    g = unscaled(g, grad_scale)
    return g if clip is None else g / clip.to(g.dtype)


def adam_moments(g: Tensor, m: Tensor, v: Tensor, beta1: float, beta2: float) -> tuple:
    """m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g² (out of place)."""
    return m * beta1 + g * (1.0 - beta1), v * beta2 + (g * g) * (1.0 - beta2)


def bias_corrections(step: Tensor, beta1: float, beta2: float, bias_correction: bool) -> tuple:
    """(1 − β1^t, 1 − β2^t) for this step's t = step + 1 (fp32, on the device), or ones."""
    t = step.float() + 1
    if not bias_correction:
        return torch.ones_like(t), torch.ones_like(t)
    return 1 - torch.pow(beta1, t), 1 - torch.pow(beta2, t)


def adam_direction(m: Tensor, v: Tensor, w: Tensor, bc1: Tensor, bc2: Tensor, eps: float,
                   weight_decay: float) -> Tensor:
    """u = m̂ / (√v̂ + ε) + λ·w with m̂ = m / (1 − β1^t), v̂ = v / (1 − β2^t) (decoupled decay)."""
    return (m / bc1) / ((v / bc2).sqrt() + eps) + w * weight_decay


def adam_step(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, beta1: float, beta2: float, eps: float,
              weight_decay: float, bias_correction: bool) -> tuple:
    """(m', v', u) of one layer's step (out of place): the moments, then the direction."""
    m, v = adam_moments(g, m, v, beta1, beta2)
    bc1, bc2 = bias_corrections(step, beta1, beta2, bias_correction)
    return m, v, adam_direction(m, v, w, bc1.to(w.dtype), bc2.to(w.dtype), eps, weight_decay)


def adam_secant_difference(g: Tensor, g_s: Tensor, v: Tensor, bc2: Tensor, eps: float) -> Tensor:
    """(g − g_s) / (√v̂ + ε), v̂ = v / (1 − β2^t): the secant of the preconditioned gradient
    (CBLR on the Adam direction), g_s the gradient at the probe point, v this step's second
    moment; the division as u's gradient part takes it (``adam_direction``)."""
    return (g - g_s) / ((v / bc2).sqrt() + eps)


def adam_ratio(rule: str, w_norm: Tensor, u_norm: Tensor, median: Tensor, adapt: Tensor, *,
               trust_coefficient: float, eps: float, max_ratio) -> tuple:
    """Ratio r of the Adam direction and the curvature it stands for, fp64 [L]:
    "lars" (LAMB): κ = ‖u‖/‖w‖, r = η·‖w‖/‖u‖; "mclr": κ = median |u_i|/|w_i| + ε, r = η/κ.
    r = 1 where undefined (‖w‖ = 0, ‖u‖ = 0, no median) and for not-adapted layers; the
    bound ``max_ratio`` (LAMB's trust clip) applies to defined ratios.  Returns
    (ratio, κ or NaN where not used, fallback flag).  (CBLR's ratio on the Adam direction
    is the SGD base's ``layer_ratio`` with ‖u‖ for ‖g‖, no decay and no ε.)"""
    if rule == "lars":
        kappa = u_norm / w_norm
        r = trust_coefficient * w_norm / u_norm
    else:
        kappa = median_kappa(median.double(), eps)
        r = torch.full_like(kappa, trust_coefficient) / kappa
    defined = adapt & (w_norm > 0) & (u_norm > 0) & torch.isfinite(r) & (r > 0)
    if max_ratio is not None:
        r = torch.clamp(r, max=max_ratio)
    ratio = torch.where(defined, r, torch.ones_like(r))
    return ratio, torch.where(defined, kappa, torch.full_like(kappa, float("nan"))), adapt & ~defined
