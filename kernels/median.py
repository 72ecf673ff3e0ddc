"""Exact lower median per layer by radix selection over the fp32 bits of the
(non-negative) curvature quotients.

Keys are non-negative int32, so bit 31 is 0 and bits 30..0 are selected from
the top down: one histogram per layer per pass (``reduce.count_bins``), then
``radix_select_kernel`` finds the bucket holding the rank-k element
(k = ⌈n/2⌉) by a prefix scan and narrows the prefix and the rank.  The approx
median (bits ANDed with 0xFFFF0000) is the selection of bits 30..16 alone.
"""
from __future__ import annotations

import triton
import triton.language as tl

# (shift, bits) of each pass, most significant first.  The first pass runs with
# pass 1's norms; every further pass reads w and g again.
WIDE = {"exact": ((16, 15), (0, 16)), "approx": ((16, 15),)}
NARROW = {"exact": ((20, 11), (10, 10), (0, 10)), "approx": ((23, 8), (16, 7))}


def passes(median: str, n_layers: int, data_bytes: int):
    """The wide schedule (2^15- and 2^16-bin histograms: exact in two passes, approx in
    one) unless zeroing and scanning its histograms would move more bytes than the
    extra pass over w and g that the narrow one costs (many small layers)."""
    wide_histogram_bytes = n_layers * sum(4 << bits for _, bits in WIDE["exact"]) * 2
    return (WIDE if wide_histogram_bytes < data_bytes else NARROW)[median]


@triton.jit
def radix_select_kernel(hist, prefix, rank, count, SHIFT: tl.constexpr, BITS: tl.constexpr,
                        FIRST: tl.constexpr):
    """Per layer: choose the bucket of this pass that holds the element of rank k."""
    row = tl.program_id(0)
    bins = tl.arange(0, 1 << BITS)
    h = tl.load(hist + row * (1 << BITS) + bins)
    if FIRST:
        n = tl.sum(h, axis=0)  # the first pass sees every quotient of the layer
        tl.store(count + row, n)
        k = (n + 1) // 2
        known = 0
    else:
        k = tl.load(rank + row)
        known = tl.load(prefix + row)
    below = tl.cumsum(h, axis=0) < k  # buckets wholly below rank k
    bucket = tl.sum(below.to(tl.int32), axis=0)
    skipped = tl.sum(tl.where(below, h, 0), axis=0)
    tl.store(rank + row, k - skipped)
    tl.store(prefix + row, known | (bucket << SHIFT))
