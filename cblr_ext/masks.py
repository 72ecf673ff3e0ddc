"""``adapt_mask`` and ``decay_mask``: which parameters get a layer-wise ratio and which get
weight decay, by name (optax's ``trust_ratio_mask`` / ``weight_decay_mask``).

A mask is a callable on (name, parameter) returning a bool, or a collection of names; the
names are those of ``model.named_parameters()``.  A group whose parameters the masks tell
apart is added as consecutive sub-groups, one per (adapt, decay) combination in the order
their first parameter appears; a sub-group gets ``adapt=False`` (r = 1) and/or
``decay=False`` (no weight decay, whatever a scheduler later writes into its
``weight_decay``).  A mask only turns these off: a group's own ``adapt=False`` or
``weight_decay=0`` stays."""
from __future__ import annotations


class ParamMask:
    """One mask as given: a predicate on (name, parameter), or a set of names."""

    def __init__(self, mask, which: str):
        self.which = which
        if callable(mask):
            self.predicate, self.names = mask, None
        elif isinstance(mask, (set, frozenset, list, tuple)) and all(isinstance(n, str) for n in mask):
            self.predicate, self.names = None, frozenset(mask)
        else:
            raise TypeError(f"{which} must be a callable on (name, parameter) or a set of parameter names, "
                            f"got {type(mask).__name__}")

    def __call__(self, name: str, param) -> bool:
        if self.names is not None:
            return name in self.names
        return bool(self.predicate(name, param))

    def check_names(self, names: set) -> None:
        """A listed name that is no parameter's (a typo) is refused, as an unknown group key is."""
        unknown = sorted(self.names - names) if self.names is not None else []
        if unknown:
            raise ValueError(f"{self.which} names {unknown}, which are not parameter names of the optimizer "
                             f"(names come from named_parameters())")


def split_by_masks(group: dict, adapt_mask: ParamMask | None, decay_mask: ParamMask | None) -> list:
    """``group`` (its ``params`` a list) as the groups to add: itself without masks, else
    one sub-group per (adapt, decay) combination its parameters take."""
    masks = [m for m in (adapt_mask, decay_mask) if m is not None]
    entries = group["params"]
    if not masks or not entries:
        return [group]
    if not all(isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], str) for e in entries):
        raise ValueError(f"{' and '.join(m.which for m in masks)} need{'s' if len(masks) == 1 else ''} parameter "
                         "names: build the optimizer "
                         "from model.named_parameters() (or groups of (name, parameter) pairs)")
    parts = {}
    for name, p in entries:
        key = (adapt_mask is None or adapt_mask(name, p), decay_mask is None or decay_mask(name, p))
        parts.setdefault(key, []).append((name, p))
    subgroups = []
    for (adapt, decay), part in parts.items():
        sub = {**group, "params": part}
        if not adapt:
            sub["adapt"] = False
        if not decay:
            sub["decay"] = False
        subgroups.append(sub)
    return subgroups


def check_mask_names(param_groups: list, *masks) -> None:
    """After construction: every name a mask lists is a parameter's."""
    names = {name for group in param_groups for name in group.get("param_names", ())}
    for mask in masks:
        if mask is not None:
            mask.check_names(names)
