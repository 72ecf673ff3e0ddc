"""Pass 2: the per-element momentum update of every layer in one launch.

d = g + β·w_t;  v ← μ·v + α·d;  s = v (μ·v + α·d with Nesterov, α·d without
momentum);  w ← w_t − s.  fp32 math, w stored back rounded to its dtype; sums of squares in fp64.  w_t is
read from the W_T role (the probe's saved copy of a layer at w_t + s, else the
parameter itself).  The step-wide skip flag is read on the device: a skipped step
loads and stores nothing, but a layer at its probe point is put back to w_t (with
FROM_SAVED).  Partials per chunk: Σs²; with INPUT_NORMS the Σw_t², Σg² of the inputs;
INPUT_HIST adds the inputs' curvature quotients to a one-pass median histogram (the
lag=1 one-pass variant measures the next step's inputs here); with NEXT_W2 Σw² of
the result as stored (what pass 1 would sum next step).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .chunks import chunk_span, lanes_if, round_to, sum_of_squares, tensor_ptr
from .reduce import NAN_KEY, count_bins, quotient_keys

ROLE_W, ROLE_W_T, ROLE_G, ROLE_V, ROLE_S = (tl.constexpr(i) for i in range(5))
U_S2, U_W2, U_G2, U_H_NAN, U_NEXT_W2 = (tl.constexpr(i) for i in range(5))
UPDATE_PARTIALS = tl.constexpr(5)


@triton.jit
def momentum_update_kernel(chunks, ptrs, n_layers, partials, alpha, skip, hist, weight_decay, momentum, unscale,
                           DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                           STORE_STEP: tl.constexpr, FROM_SAVED: tl.constexpr, INPUT_NORMS: tl.constexpr,
                           INPUT_HIST: tl.constexpr, NEXT_W2: tl.constexpr, SHIFT: tl.constexpr,
                           BITS: tl.constexpr, BLOCK: tl.constexpr):
    c, row, offs, mask = chunk_span(chunks, BLOCK)
    skipped = tl.load(skip) != 0
    w_ptr = tensor_ptr(ptrs, ROLE_W, n_layers, row, DTYPE) + offs
    w_t_ptr = tensor_ptr(ptrs, ROLE_W_T, n_layers, row, DTYPE) + offs
    if FROM_SAVED:
        # A skipped step puts a layer that sits at its probe point back to w_t, bit-exactly.
        at_probe = tl.load(ptrs + ROLE_W_T * n_layers + row) != tl.load(ptrs + ROLE_W * n_layers + row)
        restore = lanes_if(skipped & at_probe, mask, BLOCK)
        tl.store(w_ptr, tl.load(w_t_ptr, mask=restore), mask=restore)
    mask = lanes_if(~skipped, mask, BLOCK)
    w = tl.load(w_t_ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(ptrs, ROLE_G, n_layers, row, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = g * tl.load(unscale)  # GradScaler's fl32(1/S), or 1
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
    w_new = round_to(w - s, DTYPE)
    tl.store(w_ptr, w_new, mask=mask)
    if STORE_STEP:
        tl.store(tensor_ptr(ptrs, ROLE_S, n_layers, row, tl.float32) + offs, s, mask=mask)
    out = partials + c * UPDATE_PARTIALS
    tl.store(out + U_S2, sum_of_squares(s, mask))  # lanes not read: 0 even if α is not finite
    if INPUT_NORMS:
        tl.store(out + U_W2, sum_of_squares(w, mask))
        tl.store(out + U_G2, sum_of_squares(g, mask))
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
    if NEXT_W2:
        tl.store(out + U_NEXT_W2, sum_of_squares(w_new.to(tl.float32), mask))
    else:
        tl.store(out + U_NEXT_W2, 0.0)
