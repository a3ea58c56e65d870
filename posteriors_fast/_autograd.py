"""Gradient and value of a function of pytrees by one plain autograd pass.

``torch.func.grad_and_value`` gives the same numbers but wraps every tensor in
functorch layers; for the per-step gradients of the methods (VI, SG-MCMC)
that costs a fixed few hundred µs. Measured on the S MLP (P = 1045, N = 64):
a vi.diag step 1.45 ms with ``torch.func``, 1.04 ms with this.
"""

from typing import Any, Callable, Tuple

import torch
from optree import tree_flatten, tree_map, tree_unflatten


def grad_value_aux(
    fn: Callable, args: Tuple, what: str, static: Tuple = ()
) -> Tuple[Tuple, torch.Tensor, Any]:
    """``(grads, value, aux)`` of ``fn(*args, *static) -> (value, aux)``,
    differentiated with respect to ``args`` only.

    ``grads`` has the structure of ``args`` (one gradient tree per argument;
    zeros where the value does not depend on a leaf). ``value`` and ``aux``
    come back detached, as ``torch.func`` returns them; the caller's tensors
    are neither modified nor given gradients.

    Args:
        fn: Function of the trees in ``args`` returning ``(scalar, aux)``.
        args: Tuple of pytrees of tensors.
        what: Name of the value for the error message, e.g. "log_posterior".
        static: Further arguments passed as they are (e.g. the batch).
    """
    leaves, spec = tree_flatten(args)
    inputs = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        value, aux = fn(*tree_unflatten(spec, inputs), *static)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{what} must return a scalar tensor as its first output")
        grads = torch.autograd.grad(value, inputs, allow_unused=True) if value.requires_grad else [None] * len(inputs)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    aux = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux, none_is_leaf=True)
    return tree_unflatten(spec, grads), value.detach(), aux
