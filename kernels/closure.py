"""CBLR's closure protocol as multi-tensor kernels: the exact restore (a copy), the
shift saved ← w, w ← w + s_{t−1} (with Σw_t² per chunk), and the secant difference
that pass 1 (``reduce.chunk_stats_kernel``) sums."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, round_to, sum_of_squares, tensor_ptr

ROLE_DST, ROLE_SRC = tl.constexpr(0), tl.constexpr(1)
ROLE_W, ROLE_S, ROLE_SAVED, ROLE_DELTA = (tl.constexpr(i) for i in range(4))


@triton.jit
def secant_difference(g_t, g_p, s, weight_decay):
    """d(w_t) − d(w_t + s) = (g_t − g_p) − β·s in fp32, s the shift's realised displacement
    (``layer_math.secant_difference``)."""
    return (g_t - g_p) - s * weight_decay


@triton.jit
def copy_kernel(chunks, ptrs, n_layers, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """dst ← src, bit-exact (same dtype)."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    x = tl.load(tensor_ptr(ptrs, ROLE_SRC, n_layers, row, DTYPE) + offs, mask=mask)
    tl.store(tensor_ptr(ptrs, ROLE_DST, n_layers, row, DTYPE) + offs, x, mask=mask)


@triton.jit
def shift_kernel(chunks, ptrs, n_layers, partials, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """saved ← w, then w ← w + s, with s (fp32 state) first rounded to w's dtype like
    ``p.add_(s.to(p.dtype))``, and Δ ← (w + s as stored) − w (fp32); the chunk's Σw_t²
    (fp64) into ``partials[c]``."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    w_ptr = tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs
    s = tl.load(tensor_ptr(ptrs, ROLE_S, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    x = tl.load(w_ptr, mask=mask, other=0.0)
    tl.store(tensor_ptr(ptrs, ROLE_SAVED, n_layers, row, DTYPE) + offs, x, mask=mask)
    w = x.to(tl.float32)
    tl.store(partials + c, sum_of_squares(w, mask))
    shifted = round_to(w + round_to(s, DTYPE).to(tl.float32), DTYPE)
    tl.store(w_ptr, shifted, mask=mask)
    tl.store(tensor_ptr(ptrs, ROLE_DELTA, n_layers, row, tl.float32) + offs, shifted.to(tl.float32) - w, mask=mask)
