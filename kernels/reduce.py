"""Pass 1: per-chunk partial sums of Σw², Σg², the non-finite flag of g (and of the probe
gradient), CBLR's secant
sums Σ(d(w_t) − d(w_t + s))² and Σs², and the radix-select histograms of the MCLR
curvature quotients h = |d| / |w|."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, lanes_if, sum_of_squares, tensor_ptr
from .closure import secant_difference

# Partial columns written by ``chunk_stats_kernel`` (``.value`` on the host).
P_W2, P_G2, P_NONFINITE, P_H_NAN, P_DIFF2, P_STEP2 = (tl.constexpr(i) for i in range(6))
STAT_PARTIALS = tl.constexpr(6)
# Roles of the pointer table: w, g, and with SECANT the gradient at w + s and s (fp32).
ROLE_W, ROLE_G, ROLE_GP, ROLE_STEP = (tl.constexpr(i) for i in range(4))
# Bits of a layer's mode byte: what pass 1 takes of it.
MODE_W2, MODE_G2, MODE_CHECK, MODE_SECANT = (tl.constexpr(1 << i) for i in range(4))
NAN_KEY = tl.constexpr(0x7FFFFFFF)  # NaN quotients sort last (their layer's median is NaN anyway)


@triton.jit
def abs_quotient_keys(d, w):
    """The fp32 bits of h = fl(|d| / |w|) as int32 keys; non-negative, so integer order
    is value order.  Correctly rounded division (not the fast one).  Elements with w = 0
    are not quotients; the caller masks them out."""
    h = tl.math.div_rn(tl.abs(d), tl.abs(tl.where(w != 0, w, 1.0)))  # w = 0 is not selected
    return tl.where(h != h, NAN_KEY, h.to(tl.int32, bitcast=True))


@triton.jit
def quotient_keys(w, g, weight_decay):
    """``abs_quotient_keys`` of d = fl(g + fl(β·w))."""
    return abs_quotient_keys(g + w * weight_decay, w)


@triton.jit
def count_bins(hist, row, key, selected, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
               FILTER: tl.constexpr):
    """Histogram of bits [SHIFT, SHIFT+BITS) of the keys whose higher bits equal the
    prefix found by the previous passes (integer atomics: exact; relaxed, as only the
    counts matter)."""
    if FILTER:
        high = SHIFT + BITS
        selected = selected & ((key >> high) == (tl.load(prefix + row) >> high))
    bins = (key >> SHIFT) & ((1 << BITS) - 1)
    tl.atomic_add(hist + row * (1 << BITS) + bins, 1, mask=selected, sem="relaxed")


@triton.jit
def chunk_stats_kernel(chunks, ptrs, n_layers, partials, hist, prefix, modes, measure, weight_decay, unscale,
                       DTYPE: tl.constexpr, STATS: tl.constexpr, SECANT: tl.constexpr, HIST: tl.constexpr,
                       FILTER: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a chunk.  STATS: write the partial row as the layer's mode byte
    ``modes[row]`` asks: Σw² (MODE_W2), Σg² (MODE_G2), the non-finite flag of the g it
    read (MODE_CHECK or MODE_G2), with SECANT the secant sums (MODE_SECANT), and the NaN
    quotient flag.  HIST: add the quotients to the layer's histogram if ``measure[row]``.
    Only what is needed is read: a layer whose mode is 0 and that does not measure costs
    the load of two bytes.  Gradients are read as g·unscale (GradScaler's fl32(1/S), or 1);
    a non-finite probe gradient counts as a non-finite g."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    if STATS:
        mode = tl.load(modes + row).to(tl.int32)
        w2_mask = lanes_if((mode & MODE_W2) != 0, mask, BLOCK)
        g2_mask = lanes_if((mode & MODE_G2) != 0, mask, BLOCK)
        g_mask = lanes_if((mode & (MODE_G2 | MODE_CHECK | MODE_SECANT)) != 0, mask, BLOCK)
        w_mask = w2_mask
    if HIST:
        hist_mask = lanes_if(tl.load(measure + row) != 0, mask, BLOCK)
        if STATS:
            w_mask = w_mask | hist_mask
            g_mask = g_mask | hist_mask
        else:
            g_mask = hist_mask
            w_mask = hist_mask
    inv = tl.load(unscale)
    g = tl.load(tensor_ptr(ptrs, ROLE_G, n_layers, row, DTYPE) + offs, mask=g_mask, other=0.0).to(tl.float32) * inv
    w = tl.load(tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs, mask=w_mask, other=0.0).to(tl.float32)
    if HIST:
        key = quotient_keys(w, g, weight_decay)
        selected = hist_mask & (w != 0)
        count_bins(hist, row, key, selected, prefix, SHIFT, BITS, FILTER)
    if STATS:
        out = partials + c * STAT_PARTIALS
        nonfinite = g_mask & ~(tl.abs(g) < float("inf"))
        tl.store(out + P_W2, sum_of_squares(w, w2_mask))
        tl.store(out + P_G2, sum_of_squares(g, g2_mask))
        if HIST:
            tl.store(out + P_H_NAN, tl.max(tl.where(selected & (key == NAN_KEY), 1.0, 0.0), axis=0))
        else:
            tl.store(out + P_H_NAN, 0.0)
        if SECANT:
            s_mask = lanes_if((mode & MODE_SECANT) != 0, mask, BLOCK)
            g_p = tl.load(tensor_ptr(ptrs, ROLE_GP, n_layers, row, DTYPE) + offs, mask=s_mask,
                          other=0.0).to(tl.float32) * inv
            nonfinite = nonfinite | (s_mask & ~(tl.abs(g_p) < float("inf")))
            s = tl.load(tensor_ptr(ptrs, ROLE_STEP, n_layers, row, tl.float32) + offs, mask=s_mask, other=0.0)
            diff = secant_difference(g, g_p, s, weight_decay)
            tl.store(out + P_DIFF2, sum_of_squares(diff, s_mask))
            tl.store(out + P_STEP2, sum_of_squares(s, s_mask))
        else:
            tl.store(out + P_DIFF2, 0.0)
            tl.store(out + P_STEP2, 0.0)
        tl.store(out + P_NONFINITE, tl.max(tl.where(nonfinite, 1.0, 0.0), axis=0))
