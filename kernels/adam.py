"""The Adam base's passes (LAMB, and the median rule on the Adam direction) over every
layer of a group in one launch each.

Both passes form, per element, g ← g·unscale (÷ the global clip divisor with CLIP),
m ← β1·m + (1 − β1)·g, v ← β2·v + (1 − β2)·g² and u = (m / c1) / (√(v / c2) + ε) + λ·w,
c1 and c2 the layer's bias corrections (given per layer: the host computes nothing).
Every operation is rounded once in fp32 (no fused multiply-add, correctly rounded
division and square root), as ``backends/reference_adam.py`` rounds them; m and v are
fp32 state whatever the parameter's dtype.

``adam_stats_kernel`` (pass 1) writes nothing but its partials: Σw², Σu², the
non-finite flag of g, and the radix-select histograms of |u_i|/|w_i| (the median rule).
``adam_update_kernel`` (pass 2) stores w ← w − α·u (rounded to w's dtype), m and v, and
the layer's first chunk advances its step count; when the step-wide skip flag is set
it reads and writes nothing.  Its partial is Σ(α·u)².
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, lanes_if, round_to, sum_of_squares, tensor_ptr
from .reduce import NAN_KEY, abs_quotient_keys, count_bins

# Roles of the pointer table: w, g, m, v (fp32) and the step count (one fp32 element).
ROLE_W, ROLE_G, ROLE_M, ROLE_V, ROLE_STEP = (tl.constexpr(i) for i in range(5))
# Partial columns of pass 1 (``.value`` on the host).
A_W2, A_U2, A_NONFINITE, A_H_NAN = (tl.constexpr(i) for i in range(4))
STATS_PARTIALS = tl.constexpr(4)
# Partial column of pass 2.
A_MOVE2 = tl.constexpr(0)
UPDATE_PARTIALS = tl.constexpr(1)


@triton.jit
def adam_chunk(ptrs, n_layers, row, offs, mask, bc1, bc2, unscale, clip, beta1, one_minus_beta1, beta2,
               one_minus_beta2, eps, weight_decay, DTYPE: tl.constexpr, CLIP: tl.constexpr):
    """(w, g, new m, new v, u) of the lanes in ``mask`` (fp32; 0 elsewhere)."""
    w = tl.load(tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(ptrs, ROLE_G, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = g * tl.load(unscale)  # GradScaler's fl32(1/S), or 1
    if CLIP:
        g = tl.math.div_rn(g, tl.load(clip))
    m = tl.load(tensor_ptr(ptrs, ROLE_M, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    v = tl.load(tensor_ptr(ptrs, ROLE_V, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    c1 = tl.load(bc1 + row)
    c2 = tl.load(bc2 + row)
    u = tl.math.div_rn(tl.math.div_rn(m, c1), tl.sqrt_rn(tl.math.div_rn(v, c2)) + eps) + w * weight_decay
    return w, g, m, v, u


@triton.jit
def adam_stats_kernel(chunks, ptrs, n_layers, partials, hist, prefix, bc1, bc2, unscale, clip, beta1,
                      one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, DTYPE: tl.constexpr,
                      CLIP: tl.constexpr, STATS: tl.constexpr, HIST: tl.constexpr, FILTER: tl.constexpr,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 over a chunk.  STATS: the partial row (Σw², Σu², non-finite g, a NaN
    quotient).  HIST: the quotients |u_i|/|w_i| (w_i ≠ 0) into the layer's histogram,
    with FILTER only those whose higher bits match the prefix selected so far."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    w, g, m, v, u = adam_chunk(ptrs, n_layers, row, offs, mask, bc1, bc2, unscale, clip, beta1, one_minus_beta1,
                               beta2, one_minus_beta2, eps, weight_decay, DTYPE, CLIP)
    if HIST:
        key = abs_quotient_keys(u, w)
        selected = mask & (w != 0)
        count_bins(hist, row, key, selected, prefix, SHIFT, BITS, FILTER)
    if STATS:
        out = partials + c * STATS_PARTIALS
        tl.store(out + A_W2, sum_of_squares(w, mask))
        tl.store(out + A_U2, sum_of_squares(u, mask))
        tl.store(out + A_NONFINITE, tl.max(tl.where(mask & ~(tl.abs(g) < float("inf")), 1.0, 0.0), axis=0))
        if HIST:
            tl.store(out + A_H_NAN, tl.max(tl.where(selected & (key == NAN_KEY), 1.0, 0.0), axis=0))
        else:
            tl.store(out + A_H_NAN, 0.0)


@triton.jit
def adam_update_kernel(chunks, ptrs, n_layers, partials, alpha, skip, bc1, bc2, unscale, clip, beta1,
                       one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, DTYPE: tl.constexpr,
                       CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 2 over a chunk: w ← w − α·u, m and v stored, the step count + 1 (by the
    layer's first chunk); nothing read or written when the step is skipped."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    kept = tl.load(skip) == 0
    mask = lanes_if(kept, mask, BLOCK)
    w, g, m, v, u = adam_chunk(ptrs, n_layers, row, offs, mask, bc1, bc2, unscale, clip, beta1, one_minus_beta1,
                               beta2, one_minus_beta2, eps, weight_decay, DTYPE, CLIP)
    move = u * tl.load(alpha + row)
    tl.store(tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs, round_to(w - move, DTYPE), mask=mask)
    tl.store(tensor_ptr(ptrs, ROLE_M, n_layers, row, tl.float32) + offs, m, mask=mask)
    tl.store(tensor_ptr(ptrs, ROLE_V, n_layers, row, tl.float32) + offs, v, mask=mask)
    # One lane of one program per layer advances the count (a two-lane vector: the
    # interpreter rejects a scalar mask).
    lane = tl.arange(0, 2)
    first = lanes_if(kept & (tl.load(chunks + c * 3 + 1) == 0), lane < 1, 2)
    step_ptr = tensor_ptr(ptrs, ROLE_STEP, n_layers, row, tl.float32) + lane
    tl.store(step_ptr, tl.load(step_ptr, mask=first, other=0.0) + 1.0, mask=first)
    tl.store(partials + c * UPDATE_PARTIALS + A_MOVE2, sum_of_squares(move, mask))  # 0 on a skipped step


# CBLR on the Adam direction: roles of its pointer table (g and g_s in the parameters'
# dtype, the realised displacement Δ and v fp32) and its partial columns.
ROLE_S_G, ROLE_S_GS, ROLE_S_DELTA, ROLE_S_V = (tl.constexpr(i) for i in range(4))
S_DIFF2, S_STEP2 = (tl.constexpr(i) for i in range(2))
SECANT_PARTIALS = tl.constexpr(2)


@triton.jit
def adam_secant_kernel(chunks, ptrs, n_layers, partials, bc2, unscale, clip, beta2, one_minus_beta2, eps,
                       DTYPE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """The secant's sums over a chunk: Σ((g − g_s)/(√v̂ + ε))², v̂ of this step's v (g and
    g_s ÷ grad scale ÷ clip, as ``adam_chunk`` takes g), and ΣΔ²; writes nothing else."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    g = tl.load(tensor_ptr(ptrs, ROLE_S_G, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g_s = tl.load(tensor_ptr(ptrs, ROLE_S_GS, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(tensor_ptr(ptrs, ROLE_S_DELTA, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    v = tl.load(tensor_ptr(ptrs, ROLE_S_V, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    g = g * tl.load(unscale)
    g_s = g_s * tl.load(unscale)
    if CLIP:
        g = tl.math.div_rn(g, tl.load(clip))
        g_s = tl.math.div_rn(g_s, tl.load(clip))
    v = v * beta2 + (g * g) * one_minus_beta2
    d = tl.math.div_rn(g - g_s, tl.sqrt_rn(tl.math.div_rn(v, tl.load(bc2 + row))) + eps)
    out = partials + c * SECANT_PARTIALS
    tl.store(out + S_DIFF2, sum_of_squares(d, mask))
    tl.store(out + S_STEP2, sum_of_squares(delta, mask))
