"""Plain reverse-mode autograd on pytrees: the pieces shared by the
curvature-vector products (:mod:`posteriors_fast._internal.products`) and the
per-step gradients of the methods (VI, SG-MCMC, torchopt).

``torch.func`` transforms give the same numbers but wrap every tensor in
functorch layers, a fixed cost per call that dominates for small models
(``benchmarks/bench_value_grad.py`` and ``bench_vi.py`` time it against
``torch.func.grad_and_value``).
"""

from typing import Any, Callable, List, Tuple

import torch
from optree import tree_flatten, tree_map, tree_unflatten


def detach(tree):
    """``tree`` with every tensor leaf detached (other leaves as they are)."""
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def leaves_with_grad(tree) -> Tuple[List[torch.Tensor], Any]:
    """``(leaves, spec)``: detached copies of ``tree``'s leaves that require grad,
    so a graph can be recorded without touching the caller's tensors."""
    leaves, spec = tree_flatten(tree)
    return [x.detach().requires_grad_(True) for x in leaves], spec


def linear_product(outputs, inputs, cotangents) -> List[torch.Tensor]:
    """Σ_k ∂⟨outputs_k, cotangents_k⟩/∂inputs, skipping outputs without a graph
    (zero contributions) and giving zeros for inputs that are not reached."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and o.requires_grad]
    grads = (
        torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True)
        if pairs
        else [None] * len(inputs)
    )
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def grad_value_aux(fn: Callable, args: Tuple, what: str, static: Tuple = ()) -> Tuple[Tuple, torch.Tensor, Any]:
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
    leaves, spec = leaves_with_grad(args)
    with torch.enable_grad():
        value, aux = fn(*tree_unflatten(spec, leaves), *static)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{what} must return a scalar tensor as its first output")
        grads = linear_product([value], leaves, [torch.ones_like(value)])
    return tree_unflatten(spec, grads), value.detach(), detach(aux)
