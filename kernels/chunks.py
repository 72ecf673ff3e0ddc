"""Multi-tensor launch: the chunk table and the device-side pointer table.

One launch covers every layer of a param group.  Each program handles one
chunk of at most ``BLOCK`` elements of one layer, described by a row
(layer, start, count) of the chunk table; the layer's tensors are found
through a pointer table ``[roles, layers]`` of ``data_ptr()`` values.  Chunks
of a layer are contiguous in the table, so a second small kernel can sum the
per-chunk partials of each layer in a fixed order (deterministic results).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Launch options shared by every kernel: no fused multiply-add, so that
# d = fl(g + fl(β·w)) and the momentum update round exactly like the reference.
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)
CHUNK_WARPS = 8  # a 4096-element chunk is 16 elements per thread


@triton.jit
def chunk_span(chunks, BLOCK: tl.constexpr):
    """(chunk id, layer row, element offsets, mask) of this program's chunk."""
    c = tl.program_id(0)
    row = tl.load(chunks + c * 3)
    start = tl.load(chunks + c * 3 + 1)
    count = tl.load(chunks + c * 3 + 2)
    lane = tl.arange(0, BLOCK)
    return c, row, start + lane, lane < count


@triton.jit
def lanes_if(cond, mask, BLOCK: tl.constexpr):
    """``mask`` where the scalar ``cond`` holds, else all false.  Built as a vector
    compare: the interpreter rejects a broadcast scalar mask."""
    return mask & (tl.arange(0, BLOCK) < tl.where(cond, BLOCK, 0))


@triton.jit
def tensor_ptr(ptrs, role, n_layers, row, DTYPE: tl.constexpr):
    """Pointer to the first element of layer ``row``'s tensor of ``role``."""
    return tl.load(ptrs + role * n_layers + row).to(tl.pointer_type(DTYPE))


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 → DTYPE, round to nearest even (what ``Tensor.to`` does).  bf16 is rounded
    in integer form, as the hardware does it: the interpreter's own cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def sum_of_squares(x, mask):
    """Σx² over the lanes in ``mask``, the squares and their sum in fp64 (as
    ``layer_math``: no square of an fp32 value overflows or underflows)."""
    d = tl.where(mask, x.to(tl.float64), 0.0)
    return tl.sum(d * d, axis=0)


@triton.jit
def sum_partials_kernel(partials, chunk_begin, rows, out, N_COLS: tl.constexpr,
                        COLS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage two of a reduction: out[row] = Σ partials[c] over the layer's chunks,
    always in the same order (no float atomics)."""
    j = tl.program_id(0)
    begin = tl.load(chunk_begin + j)
    end = tl.load(chunk_begin + j + 1)
    row = tl.load(rows + j)
    lane = tl.arange(0, BLOCK_C)
    col = tl.arange(0, COLS)
    acc = tl.zeros((BLOCK_C, COLS), dtype=tl.float64)
    # A while loop, not range(begin, end, BLOCK_C): Triton 3.6's interpreter cannot take
    # loaded values as range bounds.
    c0 = begin
    while c0 < end:
        c = c0 + lane
        mask = (c < end)[:, None] & (col < N_COLS)[None, :]
        acc += tl.load(partials + c[:, None] * N_COLS + col[None, :], mask=mask, other=0.0)
        c0 += BLOCK_C
    tl.store(out + row * N_COLS + col, tl.sum(acc, axis=0), mask=col < N_COLS)


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of the layers of one dtype within a list of tensors."""

    dtype: torch.dtype
    rows: torch.Tensor         # [Lb] int64: the list index of each layer
    chunks: torch.Tensor       # [C, 3] int64: (row, start, count)
    chunk_begin: torch.Tensor  # [Lb + 1] int64: layer j owns chunks chunk_begin[j]:chunk_begin[j+1]
    n_chunks: int
    block: int


_plans: dict = {}
_pointer_tables: dict = {}
_MAX_POINTER_TABLES = 64  # grads set to None and re-created move; keep recent layouts only


def to_device(values: list, device: torch.device) -> torch.Tensor:
    """A host list as a device int64 tensor without a host sync (pinned, non-blocking)."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def chunk_plans(tensors: list, block: int) -> list:
    """One ``ChunkPlan`` per dtype of ``tensors`` (cached per layout)."""
    device = tensors[0].device
    key = (device, block, tuple((t.dtype, t.numel()) for t in tensors))
    plans = _plans.get(key)
    if plans is None:
        plans = []
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            rows, chunks, begin = [], [], [0]
            for row, t in enumerate(tensors):
                if t.dtype != dtype:
                    continue
                rows.append(row)
                chunks += [(row, start, min(block, t.numel() - start)) for start in range(0, t.numel(), block)]
                begin.append(len(chunks))
            plans.append(ChunkPlan(dtype, to_device(rows, device),
                                   to_device(chunks or [(0, 0, 0)], device).reshape(-1, 3),
                                   to_device(begin, device), len(chunks), block))
        _plans[key] = plans
    return plans


def pointer_table(roles: list) -> torch.Tensor:
    """[len(roles), L] int64 device tensor of data pointers; ``roles`` are equally long
    lists of tensors (None for a layer without that tensor).  Cached by the pointers,
    so a steady training loop (and a CUDA graph) reuses the same device table."""
    device = next(t.device for role in roles for t in role if t is not None)
    ptrs = tuple(0 if t is None else t.data_ptr() for role in roles for t in role)
    key = (device, len(roles), ptrs)
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= _MAX_POINTER_TABLES:
            _pointer_tables.pop(next(iter(_pointer_tables)))
        table = _pointer_tables[key] = to_device(list(ptrs), device).reshape(len(roles), -1)
    return table


def sum_per_layer(plan: ChunkPlan, partials: torch.Tensor, out: torch.Tensor) -> None:
    """out[row, :] = Σ over the layer's chunks of partials[c, :] for the layers of ``plan``
    (``out`` comes zeroed)."""
    if plan.n_chunks == 0:
        return  # every layer of the plan is empty: its rows of ``out`` stay as they are
    n_cols = partials.shape[1]
    sum_partials_kernel[(plan.rows.numel(),)](
        partials, plan.chunk_begin, plan.rows, out, N_COLS=n_cols,
        COLS=triton.next_power_of_2(n_cols), BLOCK_C=64, num_warps=2)
