"""Flat Jacobians of arbitrary functions: one (R, P) matrix whose columns
follow optree's ravel order (sorted dict keys) of the differentiated
arguments and whose R rows are the function's raveled outputs.

This is the general construction (one forward pass, then a ``vmap`` of its
vector-Jacobian product over the R unit cotangents); the per-sample
constructions for sample-separable functions are the hot ops
:mod:`posteriors_fast.ops.sample_jacobian` and
:mod:`posteriors_fast.ops.separable_jacobian`.
"""

from typing import Any, Callable, Sequence, Tuple

import torch
from optree.integrations.torch import tree_ravel
from torch.func import vjp, vmap

from posteriors_fast._internal.errors import split_aux

#: torch.func transforms only carry tensors through aux; stands in for "no aux".
NO_AUX = torch.empty(0)


def ravel_output(out) -> torch.Tensor:
    """A tensor output flattened, or a pytree output raveled in optree order."""
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return tree_ravel(out)[0]


def output_pullback(f: Callable, args: Sequence[Any], argnums: int | Sequence[int], has_aux: bool) -> Tuple:
    """One forward pass of ``f(*args)`` ready for vector-Jacobian products of
    its raveled output with respect to the arguments selected by ``argnums``
    (raveled together, as optree ravels the tuple of them).

    Returns:
        ``(raveled, pullback, output, aux)``: ``raveled`` (R,) the raveled
        output, ``pullback(u) -> (uᵀJ,)`` for u of shape (R,), ``output`` the
        value returned by ``f``, ``aux`` (None without has_aux).
    """
    args = list(args)
    if isinstance(argnums, int):
        selected = args[argnums]
    else:
        selected = tuple(args[i] for i in argnums)
    flat, unravel = tree_ravel(selected)

    def of_flat(flat_params):
        new_args = list(args)
        chosen = unravel(flat_params)
        if isinstance(argnums, int):
            new_args[argnums] = chosen
        else:
            for i, value in zip(argnums, chosen):
                new_args[i] = value
        value, aux = split_aux(f(*new_args), has_aux)
        return ravel_output(value), (value, aux if has_aux else NO_AUX)

    raveled, pullback, (output, aux) = vjp(of_flat, flat, has_aux=True)
    return raveled, pullback, output, aux if has_aux else None


def jacobian_from_pullback(pullback: Callable, raveled: torch.Tensor) -> torch.Tensor:
    """The whole (R, P) Jacobian: ``pullback`` of every unit cotangent."""
    basis = torch.eye(raveled.numel(), dtype=raveled.dtype, device=raveled.device)
    return vmap(pullback)(basis)[0]


def output_jacobian(
    f: Callable, args: Sequence[Any], argnums: int | Sequence[int], has_aux: bool
) -> Tuple[torch.Tensor, Any, Any]:
    """Jacobian of the raveled output of ``f(*args)`` with respect to the
    arguments selected by ``argnums`` (see :func:`output_pullback`).

    Returns:
        ``(jac, output, aux)``: ``jac`` (R, P), ``output`` the value returned by
        ``f`` (unraveled, detached from the transforms), ``aux`` (None without
        has_aux).
    """
    raveled, pullback, output, aux = output_pullback(f, args, argnums, has_aux)
    return jacobian_from_pullback(pullback, raveled), output, aux
