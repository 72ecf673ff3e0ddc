"""Mixed precision with ``torch.amp.GradScaler``.

The optimizers declare ``_step_supports_amp_scaling``: ``scaler.step(opt)`` checks g for
Inf/NaN (one read), hands the step its scale and that verdict, and the kernels read every
gradient as g·fl32(1/S) — no ``unscale_`` pass writes the gradients.  A skipped step
changes nothing and counts in ``skipped_steps``.

CBLR's probe gradient at w_t + s is scaled the same way and unscaled the same way; when it
overflows, the step is skipped.  GradScaler has no channel for an optimizer to report an
overflow of its own (the ``found_inf`` it hands over is a fresh sum), so ``update`` here
adds it to what GradScaler found before calling ``scaler.update()``; use it in place of
``scaler.update()``:

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        return loss

    closure()                    # g_t (scaled), which scaler.step checks
    scaler.step(opt, closure)    # positionally: GradScaler refuses a closure keyword
    cblr_ext.amp.update(scaler, opt)
"""
from __future__ import annotations

import torch


def update(scaler: torch.amp.GradScaler, *optimizers, new_scale=None) -> None:
    """``scaler.update(new_scale)``, the scale backing off also where the last step of one
    of ``optimizers`` was skipped for a reason GradScaler did not see (a CBLR probe
    gradient that overflowed).  Reads GradScaler's per-optimizer record of found infs
    (``_per_optimizer_states``, torch 2.x): no device sync."""
    for opt in optimizers:
        skipped = getattr(opt, "_found_inf", None)
        record = scaler._per_optimizer_states.get(id(opt), {}).get("found_inf_per_device", {})
        if skipped is None or not record:
            continue
        for found in record.values():
            found.add_(skipped.to(device=found.device, dtype=found.dtype, non_blocking=True))
    scaler.update(new_scale)
