"""Writing an update's results into a state in place, as torch's own in-place
ops would: every tensor written has its version counter advanced, so caches
keyed on ``(tensor, version)`` (the sampling factors) and autograd both see
the change, and the class-level default tensors of the NamedTuple states are
never written.

posteriors 0.0.5 declares defaults such as ``log_likelihood=torch.tensor([])``
on its state classes: one tensor object shared by every state built without
that field. Writing into it in place would change every such state at once,
so :func:`write_field` replaces it in the returned state instead.
"""

from typing import Any, NamedTuple, Sequence

import torch
from optree import tree_leaves
from torch.autograd.graph import increment_version


def rebind_(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``tensor.data = value`` (no copy; the shape may change) with the version
    counter advanced, which a bare ``.data`` assignment does not do."""
    tensor.data = value
    increment_version(tensor)
    return tensor


def copy_leaves_(targets: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Copy ``values`` into ``targets`` in place (one fused kernel for all
    leaves; a copy advances each target's version counter)."""
    with torch.no_grad():
        torch._foreach_copy_(list(targets), list(values))


def write_field(state: NamedTuple, field: str, value: torch.Tensor, **replace: Any) -> NamedTuple:
    """``state`` after an in-place update: ``value`` written into the tensor
    ``state.<field>`` (rebound, see :func:`rebind_`), or put in its place when
    that tensor is the state class's shared default; the other fields in
    ``replace`` are replaced.

    Returns:
        The state to return from ``update(..., inplace=True)``.
    """
    current = getattr(state, field)
    if current is type(state)._field_defaults.get(field) or not isinstance(current, torch.Tensor):
        return state._replace(**{field: value}, **replace)
    rebind_(current, value)
    return state._replace(**replace) if replace else state


def rebind_tree_(targets: Any, values: Any) -> Any:
    """:func:`rebind_` every leaf of the pytree ``targets`` to the matching
    leaf of ``values`` (same structure); returns ``targets``."""
    for target, value in zip(tree_leaves(targets), tree_leaves(values)):
        rebind_(target, value.data if isinstance(value, torch.Tensor) else value)
    return targets
