"""What a param group may hold, checked when it is added (construction and
``add_param_group``), before anything is added: known keys only (a typo is refused with
the close key suggested), torch.optim's options only with the value these optimizers
implement, and floating parameters, each listed once."""
from __future__ import annotations

import difflib

import torch

from .masks import split_by_masks

# torch.optim options without a counterpart here: the values that mean what these
# optimizers do anyway (accepted, as constructor arguments or group keys), and why another
# value is refused.
_MULTI_TENSOR = "every backend steps a group's layers in multi-tensor kernels already; choose them with backend="
_COMMON_OPTIONS = {
    "differentiable": ((False,), "the step runs in fused kernels under no_grad, not through autograd"),
    "foreach": ((None, False), _MULTI_TENSOR),
    "fused": ((None, False), _MULTI_TENSOR),
}
SGD_OPTIONS = {
    **_COMMON_OPTIONS,
    "dampening": ((0,), "the momentum buffer takes the whole direction, as torch's SGD with dampening 0"),
}
ADAM_OPTIONS = {
    **_COMMON_OPTIONS,
    "amsgrad": ((False,), "the Adam base keeps the running v, not its maximum"),
    "capturable": ((False,), "LAMB keeps its step count on the device always: there is no mode to switch on"),
}


def check_torch_options(owner: str, options: dict, known: dict) -> None:
    """Refuse a torch.optim option (a constructor argument or a group key) whose value
    these optimizers do not implement."""
    for key, value in options.items():
        allowed, why = known[key]
        plain = value is None or isinstance(value, (bool, int, float))
        if not (plain and value in allowed):
            raise ValueError(f"{owner}: {key}={value!r} is not supported ({why}); "
                             f"allowed: {', '.join(repr(a) for a in allowed)}")


def check_group_keys(owner: str, group: dict, known: set, torch_options: dict, optimizer_wide: tuple) -> None:
    """Every key of ``group`` is one the optimizer honours: a hyperparameter (``known``),
    a torch.optim option at the value implemented, or else a ValueError naming it."""
    check_torch_options(owner, {k: v for k, v in group.items() if k in torch_options}, torch_options)
    for key in group:
        if key in known or key in torch_options:
            continue
        if key in optimizer_wide:
            raise ValueError(f"{owner}: {key!r} is an option of the whole optimizer, not of a param group: "
                             "pass it to the constructor")
        close = difflib.get_close_matches(key, sorted(known), n=1) if isinstance(key, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{owner}: unknown param group key {key!r}{hint}; "
                         f"a group may hold {', '.join(sorted(known))}")


def param_list(params) -> list:
    """A group's ``params`` as torch.optim takes them: one tensor, or an ordered iterable of
    tensors or (name, tensor) pairs (a set has no order: refused, as torch does)."""
    if isinstance(params, torch.Tensor):
        return [params]
    if isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                        "of tensors in sets will change between runs. Please use a list instead.")
    return list(params)


def check_params(owner: str, entries: list) -> None:
    """Floating parameters, each once in the group (torch only warns: a parameter stepped
    twice per step is a different update on every backend)."""
    seen = {}
    for i, entry in enumerate(entries):
        p = entry[1] if isinstance(entry, tuple) else entry
        if not isinstance(p, torch.Tensor):
            continue  # torch's add_param_group names the type
        if not p.is_floating_point():
            raise ValueError(f"{owner} does not support {p.dtype} parameters (parameter {i} of the group): "
                             "floating point only")
        if p in seen:
            raise ValueError(f"{owner}: parameter {i} of the param group is parameter {seen[p]} again; "
                             "list each parameter once")
        seen[p] = i


def add_param_groups(owner: str, param_group, add_one, param_groups: list, known: set, torch_options: dict,
                     optimizer_wide: tuple, adapt_mask, decay_mask) -> None:
    """``add_param_group``: ``param_group`` checked, split by the masks (cblr_ext.masks) and
    added by ``add_one`` (torch's add, then the optimizer's validation); a failure leaves
    ``param_groups`` as it was."""
    groups = [param_group]
    if isinstance(param_group, dict) and "params" in param_group:  # else torch's add names the fault
        check_group_keys(owner, param_group, known, torch_options, optimizer_wide)
        param_group["params"] = param_list(param_group["params"])
        check_params(owner, param_group["params"])
        groups = split_by_masks(param_group, adapt_mask, decay_mask)
    first = len(param_groups)
    try:
        for group in groups:
            add_one(group)
    except BaseException:
        del param_groups[first:]
        raise
