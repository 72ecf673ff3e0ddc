"""Pass 2: the per-element momentum update of every layer in one launch.

d = g + β·w;  v ← μ·v + α·d;  s = v (μ·v + α·d with Nesterov, α·d without
momentum);  w ← w − s.  fp32 math, w stored back rounded to its dtype.  The
step-wide skip flag is read on the device: a skipped step loads and stores
nothing.  Partials per chunk: ‖s‖², and with INPUT_NORMS the ‖w‖², ‖g‖² of the
inputs; INPUT_HIST adds the inputs' curvature quotients to a one-pass median
histogram (the lag=1 one-pass variant measures the next step's inputs here).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, lanes_if, round_to, tensor_ptr
from .reduce import NAN_KEY, count_bins, quotient_keys

ROLE_W, ROLE_G, ROLE_V, ROLE_S = (tl.constexpr(i) for i in range(4))
U_S2, U_W2, U_G2, U_H_NAN = (tl.constexpr(i) for i in range(4))
UPDATE_PARTIALS = tl.constexpr(4)


@triton.jit
def momentum_update_kernel(chunks, ptrs, n_layers, alpha, skip, partials, hist, weight_decay, momentum,
                           DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                           STORE_STEP: tl.constexpr, INPUT_NORMS: tl.constexpr, INPUT_HIST: tl.constexpr,
                           SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    mask = lanes_if(tl.load(skip) == 0, mask, BLOCK)
    w_ptr = tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs
    w = tl.load(w_ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(ptrs, ROLE_G, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    scaled = (g + w * weight_decay) * tl.load(alpha + row)
    if MOMENTUM:
        v_ptr = tensor_ptr(ptrs, ROLE_V, n_layers, row, tl.float32) + offs
        v = tl.load(v_ptr, mask=mask, other=0.0) * momentum + scaled
        tl.store(v_ptr, v, mask=mask)
        if NESTEROV:
            s = v * momentum + scaled
        else:
            s = v
    else:
        s = scaled
    tl.store(w_ptr, round_to(w - s, DTYPE), mask=mask)
    if STORE_STEP:
        tl.store(tensor_ptr(ptrs, ROLE_S, n_layers, row, tl.float32) + offs, s, mask=mask)
    out = partials + c * UPDATE_PARTIALS
    tl.store(out + U_S2, tl.sum(s * s, axis=0))
    if INPUT_NORMS:
        tl.store(out + U_W2, tl.sum(w * w, axis=0))
        tl.store(out + U_G2, tl.sum(g * g, axis=0))
    else:
        tl.store(out + U_W2, 0.0)
        tl.store(out + U_G2, 0.0)
    if INPUT_HIST:
        key = quotient_keys(w, g, weight_decay)
        selected = mask & (w != 0)
        count_bins(hist, row, key, selected, hist, SHIFT, BITS, False)
        tl.store(out + U_H_NAN, tl.max(tl.where(selected & (key == NAN_KEY), 1.0, 0.0), axis=0))
    else:
        tl.store(out + U_H_NAN, 0.0)
