"""``value_grad``: the gradient of a scalar objective ``fn(params, batch) ->
(value, aux)`` with respect to ``params``, with its value, its aux and one
finiteness witness, for the per-step gradients of the samplers.

The witness is ``value + Σ grad + Σ params`` over all leaves
(:func:`posteriors_fast._internal.checks.finite_witness`): finite proves the
value, every gradient entry and every parameter finite, so the caller checks
everything with one host sync; only a non-finite witness needs the exact
per-tensor check.

Eager runs plain autograd. Compiled, the same computation is traced with
``torch.func.grad_and_value`` into one graph once the function is called
repeatedly with one signature (:mod:`posteriors_fast.backends.compile_policy`):
the forward, the reverse pass and the witness sums fuse into a few passes
over the parameters (``benchmarks/bench_value_grad.py``, 10⁶ float32 entries:
about 3x faster than eager autograd in the steady state).
"""

from typing import Any, Callable, Tuple

import torch
from optree import tree_flatten, tree_leaves, tree_unflatten

from posteriors_fast._internal.autograd import grad_value_aux
from posteriors_fast._internal.checks import finite_witness
from posteriors_fast.backends import decline, device_type_of, implementation, register
from posteriors_fast.backends.compile_policy import TieredCompile, signature_and_grad


def _witness(value: torch.Tensor, grads: Any, params: Any) -> torch.Tensor:
    # stack promotes mixed dtypes
    return finite_witness(
        [value.reshape(())] + tree_leaves(grads) + [x for x in tree_leaves(params) if x.is_floating_point()]
    )


def value_grad_eager(fn: Callable, params: Any, batch: Any, what: str) -> Tuple[Any, torch.Tensor, Any, torch.Tensor]:
    """``(grads, value, aux, witness)`` by reverse-mode autograd.

    Args:
        fn: ``fn(params, batch) -> (value, aux)`` with a one-element ``value``.
        params: Pytree of tensors; ``grads`` has its structure.
        batch: Passed to ``fn`` as it is.
        what: Name of ``fn`` for error messages, e.g. ``"log_posterior"``.

    Returns:
        Gradients, the detached value and aux, and the finiteness witness (a
        0-d tensor, see the module docstring).
    """
    (grads,), value, aux = grad_value_aux(fn, (params,), what, (batch,))
    return grads, value, aux, _witness(value, grads, params)


register(
    "value_grad",
    "eager",
    value_grad_eager,
    doc="gradient, value and aux of a scalar objective, with one finiteness witness",
)

_NOT_A_TENSOR = object()


def value_grad_traced(fn: Callable, params: Any, batch: Any, what: str) -> Tuple[Any, torch.Tensor, Any, torch.Tensor]:
    """:func:`value_grad_eager` through ``torch.func.grad_and_value``, which a
    graph can contain (dynamo does not trace ``torch.autograd.grad``).

    ``torch.func`` passes only tensors out through aux, so aux is split: its
    tensors go through the transform, everything else (structure, numbers,
    strings) is kept aside and put back.
    """
    kept = []

    def objective(p):
        value, aux = fn(p, batch)
        leaves, spec = tree_flatten(aux)
        kept.append((value.shape, spec, [_NOT_A_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]))
        return value.reshape(()), [x for x in leaves if isinstance(x, torch.Tensor)]

    grads, (value, tensors) = torch.func.grad_and_value(objective, has_aux=True)(params)
    shape, spec, leaves = kept[0]
    tensors = iter(tensors)
    aux = tree_unflatten(spec, [next(tensors) if x is _NOT_A_TENSOR else x for x in leaves])
    return grads, value.reshape(shape), aux, _witness(value, grads, params)


_tiered = TieredCompile(value_grad_traced, "the gradient of the log posterior", eager=value_grad_eager)


def value_grad_torch_compile(fn: Callable, params: Any, batch: Any, what: str):
    """Eager autograd for the first calls of ``fn`` with one signature, then
    :func:`value_grad_traced` compiled."""
    signature, needs_grad = signature_and_grad(params, batch)
    return _tiered(fn, (signature, what), fn, params, batch, what, needs_grad=needs_grad)


register("value_grad", "torch_compile", value_grad_torch_compile)
for _family in ("triton", "cpp"):
    decline(
        "value_grad", _family, "the gradient runs the user's function: torch.compile traces it, a fixed kernel cannot"
    )


def value_grad(fn: Callable, params: Any, batch: Any, what: str, *, backend: str):
    """Dispatching entry point (see :func:`value_grad_eager`); ``backend``
    must already be resolved."""
    return implementation("value_grad", backend, device_type_of(params))(fn, params, batch, what)
