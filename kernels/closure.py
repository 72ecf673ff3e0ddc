"""CBLR's closure protocol as multi-tensor kernels: save / exact restore (a copy),
the shift w ← w + s_{t−1}, and the per-chunk partials of the secant norms."""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, round_to, tensor_ptr

ROLE_DST, ROLE_SRC = tl.constexpr(0), tl.constexpr(1)
ROLE_W, ROLE_S = tl.constexpr(0), tl.constexpr(1)
ROLE_GT, ROLE_GP, ROLE_STEP = (tl.constexpr(i) for i in range(3))
SECANT_PARTIALS = tl.constexpr(2)  # ‖d(w_t) − d(w_t + s)‖², ‖s‖²


@triton.jit
def copy_kernel(chunks, ptrs, n_layers, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """dst ← src, bit-exact (same dtype)."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    x = tl.load(tensor_ptr(ptrs, ROLE_SRC, n_layers, row, DTYPE) + offs, mask=mask)
    tl.store(tensor_ptr(ptrs, ROLE_DST, n_layers, row, DTYPE) + offs, x, mask=mask)


@triton.jit
def shift_kernel(chunks, ptrs, n_layers, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """w ← w + s, with s (fp32 state) first rounded to w's dtype like ``p.add_(s.to(p.dtype))``."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    w_ptr = tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs
    s = tl.load(tensor_ptr(ptrs, ROLE_S, n_layers, row, tl.float32) + offs, mask=mask)
    w = tl.load(w_ptr, mask=mask).to(tl.float32)
    tl.store(w_ptr, round_to(w + round_to(s, DTYPE).to(tl.float32), DTYPE), mask=mask)


@triton.jit
def secant_partials_kernel(chunks, ptrs, n_layers, partials, weight_decay,
                           DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk Σ (d(w_t) − d(w_t + s))² = Σ ((g_t − g_p) − β·s)² (s rounded to the
    parameter's dtype, as the shift added it) and Σ s², in fp32."""
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    g_t = tl.load(tensor_ptr(ptrs, ROLE_GT, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g_p = tl.load(tensor_ptr(ptrs, ROLE_GP, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(tensor_ptr(ptrs, ROLE_STEP, n_layers, row, tl.float32) + offs, mask=mask, other=0.0)
    diff = (g_t - g_p) - round_to(s, DTYPE).to(tl.float32) * weight_decay
    out = partials + c * SECANT_PARTIALS
    tl.store(out, tl.sum(diff * diff, axis=0))
    tl.store(out + 1, tl.sum(s * s, axis=0))
