"""torch.optim's copy, pickle and state-dict conventions as every optimizer of the package
keeps them, one copy: a copy or pickle keeps the optimizer-wide options and the count of
skipped steps and leaves defaults and groups as they were; a state dict carries
``skipped_steps``; loading one refuses wrong-shaped state before anything is loaded,
gives the scalar state its dtype and keeps every other tensor's own (torch would cast fp32
state of 16-bit parameters to 16 bits), keeps each group's backend and gives an older
checkpoint's groups the keys added since."""
from __future__ import annotations

import torch
from torch.optim import Optimizer

from .step_common import prepare_step_applies


class CheckpointedOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` with the conventions above.  A subclass keeps its last
    step's results in the dict ``_results`` (``skipped_steps`` among them) and gives:

    ``_PICKLED``: attributes a copy or pickle keeps besides torch's (defaults, state,
        param_groups), with the value an older pickle without them gets;
    ``_CACHES``: attributes rebuilt, not kept, by a copy or pickle: name -> factory;
    ``_STATE_SHAPES``: state key -> the shape of every loaded tensor of it (a key not
        listed: its parameter's shape);
    ``_SCALAR_STATE``: state key -> the dtype a loaded tensor of it takes (a key not listed
        keeps its own).
    """

    _PICKLED: dict = {}
    _CACHES: dict = {}
    _STATE_SHAPES: dict = {}
    _SCALAR_STATE: dict = {}

    def _empty_results(self, skipped_steps) -> dict:
        """``_results`` before a step: the count of skipped steps, no statistics (the last
        step's are a cache, rebuilt by the next step)."""
        return {"skipped_steps": skipped_steps, "stats": []}

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient held NaN/Inf (reading it syncs the device)."""
        return int(self._results["skipped_steps"])

    def __getstate__(self):
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        state["_skipped_steps"] = self._results["skipped_steps"]
        return state

    def __setstate__(self, state):
        # torch's load_state_dict calls this too, with state and param_groups alone.
        state = dict(state)
        skipped_steps = state.pop("_skipped_steps", 0)
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        # torch's __setstate__ adds defaults["differentiable"], which these optimizers do not
        # take: a copy, pickle or load must leave defaults (and so the groups) as they were.
        if not had_differentiable:
            self.defaults.pop("differentiable", None)
        self.__dict__["_results"] = self._empty_results(skipped_steps)
        for key, value in self._PICKLED.items():
            self.__dict__.setdefault(key, value)
        for key, make in self._CACHES.items():
            self.__dict__.setdefault(key, make())
        prepare_step_applies()
        for group in self.param_groups:  # groups of older versions get the keys added since
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def state_dict(self):
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict):
        """torch's, with load-state-dict hooks honoured; state of another model is refused
        before anything is loaded; loaded tensors keep their own dtype (fp32 state of 16-bit
        parameters), where torch casts floating state to the parameter's, but ``_SCALAR_STATE``
        takes its dtypes; every group keeps the backend it has (a checkpoint from any backend
        loads under any other) and gets the keys an older checkpoint lacks from the defaults
        (``__setstate__``, which torch's load calls)."""
        chosen = [group["backend"] for group in self.param_groups]
        loaded = _load_state_own_dtypes(self, state_dict, self._SCALAR_STATE, self._check_loaded_shapes)
        for group, backend in zip(self.param_groups, chosen):
            group["backend"] = backend
        self._results["skipped_steps"] = loaded.get("skipped_steps", 0)

    def _check_loaded_shapes(self, state_dict) -> None:
        """A clear error, before anything is loaded, for state of another model."""
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for pid, p in zip(saved_group["params"], group["params"]):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if not isinstance(value, torch.Tensor):
                        continue
                    want = self._STATE_SHAPES.get(key, tuple(p.shape))
                    if tuple(value.shape) != want:
                        raise ValueError(f"loaded state[{key!r}] of parameter {pid} has shape "
                                         f"{tuple(value.shape)}, expected {want} (a checkpoint of another model?)")


def _load_state_own_dtypes(optimizer, state_dict, dtypes: dict, check) -> dict:
    """torch's ``load_state_dict`` (its pre- and post-hooks honoured), then every loaded state
    tensor copied in with its own dtype (torch casts floating state to the parameter's: fp32
    state of 16-bit parameters would become 16-bit) and storage (not shared with the dict
    loaded); the keys of ``dtypes`` take theirs.  ``check(sd)`` runs before torch loads
    anything.  Returns the state dict torch loaded (after the user's pre-hooks)."""
    hooked = {}

    def capture(opt, sd):
        check(sd)
        hooked["sd"] = sd

    handle = optimizer.register_load_state_dict_pre_hook(capture)
    try:
        Optimizer.load_state_dict(optimizer, state_dict)
    finally:
        handle.remove()
    loaded = hooked["sd"]
    for saved_group, group in zip(loaded["param_groups"], optimizer.param_groups):
        for pid, p in zip(saved_group["params"], group["params"]):
            for key, value in loaded["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    optimizer.state[p][key] = value.to(device=p.device, dtype=dtypes.get(key, value.dtype), copy=True)
    return loaded
