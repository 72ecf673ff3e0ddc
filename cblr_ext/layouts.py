"""Parameters the kernels cannot address where they lie (a strided view with gaps), one
copy for every optimizer of the package: such a layer is stepped on a dense copy, with its
gradient and state in the copy's layout, and the copy is written back into the view after
the update (also on a skipped step: it is then unchanged, so the view is bit-identical)."""
from __future__ import annotations

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense


def in_layout_of(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the strides of ``like`` (itself when it has them)."""
    return tensor if tensor.stride() == like.stride() else torch.empty_like(like, dtype=tensor.dtype).copy_(tensor)


def dense_copies(local_params: list, local_grads: list, substitutes: list, backend) -> None:
    """Each layer of ``local_params`` that ``backend``'s kernels cannot address (and that
    ``substitutes`` does not already replace) becomes a dense copy, its gradient in the
    copy's layout; ``(view, copy)`` is appended to ``substitutes``, for the write-back."""
    substituted = {id(w) for _, w in substitutes}
    for i, w in enumerate(local_params):
        if id(w) not in substituted and not backend.takes_layout(w):
            local_params[i] = w.contiguous()
            local_grads[i] = in_layout_of(local_grads[i], local_params[i])
            substitutes.append((w, local_params[i]))


def state_layouts(params: list, local_params: list, substitutes: list) -> list:
    """Per layer, what its state is laid out (and made) like: what the kernels update in the
    parameter's place (a dense copy, not its view), else the parameter as the optimizer
    holds it (a DTensor's state is one)."""
    substitute_ids = {id(w) for _, w in substitutes}
    return [w if id(w) in substitute_ids else p for p, w in zip(params, local_params)]


def _laid_out_like(buffer: torch.Tensor, like: torch.Tensor) -> bool:
    """``buffer`` has the layout ``torch.empty_like(like)`` gives (contiguous for a view with
    gaps); the strides are compared first: the density check costs graph nodes per layer
    in a compiled step."""
    return buffer.stride() == like.stride() or (buffer.is_contiguous() and not is_non_overlapping_and_dense(like))


def relayout_state(states: list, state_like: list, keys: tuple) -> None:
    """Buffers ``keys`` kept from another layout (state loaded from a contiguous model now
    channels_last, or from a backend that stepped a view where it lies) are copied into
    the layout of what the kernels update: they read both as flat memory."""
    for state, like in zip(states, state_like):
        for key in keys:
            buffer = state.get(key)
            if buffer is not None and buffer.shape == like.shape and not _laid_out_like(buffer, like):
                state[key] = torch.empty_like(like, dtype=buffer.dtype).copy_(buffer)
