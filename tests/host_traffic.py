"""What a step does between the host and the device, seen from torch on the CPU.

On the CPU a host read costs nothing and no copy crosses a bus, so a step that would
sync a GPU or copy host data to it runs just as well: ``HostTraffic`` records the
calls that would, at the torch level (the ops' kernels are black boxes: the C++
kernels inside the dispatcher, Triton launches while ``paused``):

- host reads: ``Tensor.item``/``bool``/``float`` (``aten._local_scalar_dense``),
  ``tolist``, ``numpy``, ``torch.equal``, and ops whose output shape depends on values
  (``nonzero``, ``masked_select``, a boolean index), which read the device to size it;
- host-to-device copies: tensors made from host data (``torch.tensor``,
  ``torch.as_tensor``: ``aten.lift_fresh``).
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
          torch.ops.aten.is_nonzero.default, torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default}
_COPIES = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}
_HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy}


def _boolean_index(func, args) -> bool:
    return func is torch.ops.aten.index.Tensor and any(
        i is not None and i.dtype == torch.bool for i in args[1])


class HostTraffic:
    """``with HostTraffic() as traffic: ...``; ``traffic.events``: (kind, what, where)."""

    def __init__(self):
        self.events = []
        self._paused = 0
        outer = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in _HOST_METHODS and not outer._paused:
                    outer._record("host read", func.__name__)
                return func(*args, **(kwargs or {}))

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not outer._paused:
                    if func in _READS or _boolean_index(func, args):
                        outer._record("host read", str(func))
                    elif func in _COPIES:
                        outer._record("host-to-device copy", str(func))
                return func(*args, **(kwargs or {}))

        self._modes = (_Functions(), _Dispatch())
        self._stack = None

    def _record(self, kind: str, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "cblr_ext" in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        self.events.append((kind, what, where))

    @contextlib.contextmanager
    def paused(self):
        """What runs inside is the device's own business (a kernel launch)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        for mode in self._modes:
            self._stack.enter_context(mode)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False
