"""Draws of a flat Gaussian turned back into parameter pytrees."""

from typing import Any, Callable

import torch
from optree import tree_map
from torch.func import vmap


def unravel_draws(draws: torch.Tensor, unravel: Callable, shape: torch.Size) -> Any:
    """Rows of ``draws`` (shape.numel(), P) as a pytree whose leaves have shape
    ``shape + leaf.shape`` (``unravel`` maps one flat vector to a pytree)."""
    if len(shape) == 0:
        return unravel(draws.reshape(draws.shape[-1]))
    tree = vmap(unravel)(draws.reshape(-1, draws.shape[-1]))
    return tree_map(lambda x: x.reshape(shape + x.shape[1:]), tree)
