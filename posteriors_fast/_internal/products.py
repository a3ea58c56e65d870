"""Curvature-vector products with plain reverse-mode autograd.

``torch.func`` transforms (``jvp`` of ``grad``, ``jvp`` then ``vjp``) carry a
large fixed cost per call for small models. The same products can be had
from ``torch.autograd.grad`` with ``create_graph=True``: a Hessian-vector
product as the gradient of ⟨∇f, v⟩, and a Jacobian-vector product J v by the
double-backward trick (J v = ∂/∂u ⟨Jᵀu, v⟩ for a dummy cotangent u)
(``benchmarks/bench_products.py``: the S-model cases against the reference's
``torch.func`` products).

These run only where they give the same result as the transforms: one primal
(so the Hessian block is symmetric), no leaf requiring grad and no torch.func
transform active (so nothing outside needs to differentiate through them).
Callers check :func:`applicable` and fall back to ``torch.func`` otherwise.
"""

from typing import Any, Callable, Tuple

import torch
from optree import tree_leaves, tree_unflatten

from posteriors_fast._internal.autograd import detach, leaves_with_grad, linear_product
from posteriors_fast._internal.errors import split_aux


def applicable(primals: tuple, tangents: tuple) -> bool:
    """Whether the autograd forms apply to these arguments."""
    if len(primals) != 1 or len(tangents) != 1:
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    leaves = tree_leaves(primals[0])
    return bool(leaves) and all(
        isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad for x in leaves
    )


def _jvp_by_double_backward(out: torch.Tensor, leaves, tangent_leaves):
    """J v for out = g(leaves) whose graph is recorded: the gradient with respect
    to a dummy cotangent u of ⟨Jᵀu, v⟩ (linear in u, so u = 0 will do)."""
    dummy = torch.zeros_like(out, requires_grad=True)
    pulled = torch.autograd.grad(out, leaves, dummy, create_graph=True, allow_unused=True)
    return linear_product(pulled, [dummy], tangent_leaves)[0]


def hvp(f: Callable, primal: Any, tangent: Any, has_aux: bool) -> Tuple:
    """``(∇f, H v[, aux])`` for scalar ``f`` of one pytree argument."""
    leaves, spec = leaves_with_grad(primal)
    with torch.enable_grad():
        value, aux = split_aux(f(tree_unflatten(spec, leaves)), has_aux)
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        products = linear_product(grads, leaves, tree_leaves(tangent))
    grads = [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, leaves)]
    out = (tree_unflatten(spec, grads), tree_unflatten(spec, products))
    return out + (detach(aux),) if has_aux else out


def fvp(f: Callable, primal: Any, tangent: Any, has_aux: bool, normalize: bool) -> Tuple:
    """``(f(θ), Jᵀ J v[, aux])`` for tensor-valued ``f`` of one pytree argument."""
    leaves, spec = leaves_with_grad(primal)
    with torch.enable_grad():
        out, aux = split_aux(f(tree_unflatten(spec, leaves)), has_aux)
        jv = _jvp_by_double_backward(out, leaves, tree_leaves(tangent))
        products = linear_product([out], leaves, [jv.detach()])
    if normalize:
        n = out.shape[0]
        products = [p / n for p in products]
    result = (out.detach(), tree_unflatten(spec, products))
    return result + (detach(aux),) if has_aux else result


def ggnvp(
    forward: Callable,
    loss: Callable,
    primal: Any,
    tangent: Any,
    forward_has_aux: bool,
    loss_has_aux: bool,
    normalize: bool,
) -> Tuple:
    """``((z, ∇_z l), J_fᵀ H_l J_f v[, forward aux][, loss aux])``."""
    leaves, spec = leaves_with_grad(primal)
    with torch.enable_grad():
        z, forward_aux = split_aux(forward(tree_unflatten(spec, leaves)), forward_has_aux)
        jv = _jvp_by_double_backward(z, leaves, tree_leaves(tangent)).detach()
        z_in = z.detach().requires_grad_(True)
        value, loss_aux = split_aux(loss(z_in), loss_has_aux)
        (loss_grad,) = torch.autograd.grad(value, z_in, create_graph=True)
        (hjv,) = linear_product([loss_grad], [z_in], [jv])
        if normalize:
            hjv = hjv / z.shape[0]
        products = linear_product([z], leaves, [hjv])
    result = ((z.detach(), loss_grad.detach()), tree_unflatten(spec, products))
    if forward_has_aux:
        result = result + (detach(forward_aux),)
    if loss_has_aux:
        result = result + (detach(loss_aux),)
    return result
