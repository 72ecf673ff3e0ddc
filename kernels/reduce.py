"""Pass 1: per-chunk partial sums of ‖w‖², ‖g‖², the non-finite flag of g, and
the radix-select histograms of the MCLR curvature quotients h = |d| / |w|."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, lanes_if, tensor_ptr

# Partial columns written by ``chunk_stats_kernel`` (``.value`` on the host).
P_W2, P_G2, P_NONFINITE, P_H_NAN = (tl.constexpr(i) for i in range(4))
STAT_PARTIALS = tl.constexpr(4)
# Roles of the pointer table.
ROLE_W, ROLE_G = tl.constexpr(0), tl.constexpr(1)
NAN_KEY = tl.constexpr(0x7FFFFFFF)  # NaN quotients sort last (their layer's median is NaN anyway)


@triton.jit
def quotient_keys(w, g, weight_decay):
    """The fp32 bits of h = fl(|fl(g + fl(β·w))| / |w|) as int32 keys; non-negative,
    so integer order is value order.  Correctly rounded division (not the fast one).
    Elements with w = 0 are not quotients; the caller masks them out."""
    d = g + w * weight_decay
    h = tl.math.div_rn(tl.abs(d), tl.abs(tl.where(w != 0, w, 1.0)))  # w = 0 is not selected
    return tl.where(h != h, NAN_KEY, h.to(tl.int32, bitcast=True))


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
def chunk_stats_kernel(chunks, ptrs, n_layers, partials, hist, prefix, norm_rows, measure, weight_decay,
                       DTYPE: tl.constexpr, STATS: tl.constexpr, HIST: tl.constexpr, FILTER: tl.constexpr,
                       SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a chunk.  STATS: write the partial row: non-finite g, ‖w‖² and ‖g‖²
    if ``norm_rows[row]`` (lag=1 skips layers whose previous norms are stashed), NaN
    quotients.  HIST: add the quotients to the layer's histogram if ``measure[row]``.
    Only what is needed is read: g for the non-finite check, w for norms or quotients."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    if STATS:
        g_mask = mask
        norm_mask = lanes_if(tl.load(norm_rows + row) != 0, mask, BLOCK)
        w_mask = norm_mask
    if HIST:
        hist_mask = lanes_if(tl.load(measure + row) != 0, mask, BLOCK)
        if STATS:
            w_mask = w_mask | hist_mask
        else:
            g_mask = hist_mask
            w_mask = hist_mask
    g = tl.load(tensor_ptr(ptrs, ROLE_G, n_layers, row, DTYPE) + offs, mask=g_mask, other=0.0).to(tl.float32)
    w = tl.load(tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs, mask=w_mask, other=0.0).to(tl.float32)
    if HIST:
        key = quotient_keys(w, g, weight_decay)
        selected = hist_mask & (w != 0)
        count_bins(hist, row, key, selected, prefix, SHIFT, BITS, FILTER)
    if STATS:
        out = partials + c * STAT_PARTIALS
        finite = tl.abs(g) < float("inf")
        tl.store(out + P_NONFINITE, tl.max(tl.where(mask & ~finite, 1.0, 0.0), axis=0))
        tl.store(out + P_W2, tl.sum(tl.where(norm_mask, w * w, 0.0), axis=0))
        tl.store(out + P_G2, tl.sum(tl.where(norm_mask, g * g, 0.0), axis=0))
        if HIST:
            tl.store(out + P_H_NAN, tl.max(tl.where(selected & (key == NAN_KEY), 1.0, 0.0), axis=0))
        else:
            tl.store(out + P_H_NAN, 0.0)
