"""Curvature operators built once and applied many times (an addition to the
posteriors 0.0.5 API), made for :func:`posteriors_fast.cg`.

``hvp``, ``fvp`` and ``ggnvp`` re-run the model on every product. These
operators do the expensive part once at ``params`` and keep it:

* small problems (d·P ≤ ``MATERIALIZE_ENTRIES``, d the number of outputs): J and
  H·J are materialised, and a product is two matrix-vector products
  (``benchmarks/bench_cg.py``, "cg(50) ggn operator" at S/64: about 10x the
  reference's cg with its ggnvp closure);
* otherwise the autograd graph of one forward pass is kept and each product
  runs backward passes over it (J v by the double-backward trick, Jᵀu by a
  plain backward), with the loss Hessian applied through its per-sample blocks
  when it is block diagonal;
* where autograd's graph cannot be used (parameters that require grad, inside a
  ``torch.func`` transform), ``torch.func.linearize`` plus a saved ``vjp``.

``cg`` recognises these operators and iterates on their flat form directly.
"""

import logging
import warnings
from typing import Callable

import torch
from optree.integrations.torch import tree_ravel
from torch.func import grad, jvp, linearize, vjp

from posteriors_fast._internal import products
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast._internal.loss_hessian import hessian_blocks, loss_hessian_times
from posteriors_fast.types import TensorTree

logger = logging.getLogger("posteriors_fast")

#: Largest d·P (outputs × parameters) for which J is materialised.
MATERIALIZE_ENTRIES = 1 << 22


class CurvatureOperator:
    """Symmetric linear operator ``v ↦ A v`` (PSD for GGN and Fisher).

    Call it on a pytree shaped like the parameters, or use :attr:`flat_matvec`
    on vectors in ``optree`` ravel order.

    Attributes:
        flat_matvec: ``(P,) -> (P,)`` product on flat vectors.
        size: P.
        rows: The batch size the operator was built on (the leading
            dimension of the outputs), or None when it does not know it
            (``hessian_operator``); ``cg`` over a process group weights the
            ranks by it.
        normalized: Whether the products are divided by ``rows``.
        kind: ``"ggn"`` for sums of per-output terms (GGN, Fisher: ranks add
            by default over a process group), ``"scalar"`` for the Hessian of
            one value for the batch (ranks average by default).
    """

    def __init__(
        self,
        flat_matvec: Callable,
        unravel: Callable,
        size: int,
        rows: int | None = None,
        normalized: bool = False,
        kind: str = "scalar",
    ):
        self.flat_matvec = flat_matvec
        self._unravel = unravel
        self.size = size
        self.rows = rows
        self.normalized = normalized
        self.kind = kind

    def __call__(self, tangent: TensorTree) -> TensorTree:
        return self._unravel(self.flat_matvec(tree_ravel(tangent)[0]))


def _linearized(fn: Callable, flat: torch.Tensor):
    """``(fn(flat), v ↦ J v)`` via ``torch.func.linearize``, or per-call ``jvp``
    when the function cannot be traced."""
    try:
        with warnings.catch_warnings():
            # torch.fx's constant folding warns about an internal get_attr node.
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
            return linearize(fn, flat)
    except Exception as err:  # data-dependent control flow and the like
        logger.info("posteriors_fast: linearize failed (%s); using jvp per product", err)
        return fn(flat), lambda v: jvp(fn, (flat,), (v,))[1]


class _Graph:
    """One recorded forward pass ``out = fn(flat)`` whose graph serves many
    products: ``jv(v) = J v`` (double backward through a dummy cotangent) and
    ``jtu(u) = Jᵀ u``."""

    def __init__(self, fn: Callable, flat: torch.Tensor):
        self.flat = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            self.out = fn(self.flat)
            self._dummy = torch.zeros_like(self.out, requires_grad=True)
            (self._pulled,) = torch.autograd.grad(self.out, self.flat, self._dummy, create_graph=True)

    def jv(self, v: torch.Tensor) -> torch.Tensor:
        if not self._pulled.requires_grad:  # J does not depend on a dummy: J = 0
            return torch.zeros_like(self.out)
        return torch.autograd.grad(self._pulled, self._dummy, v, retain_graph=True)[0]

    def jtu(self, u: torch.Tensor) -> torch.Tensor:
        return torch.autograd.grad(self.out, self.flat, u, retain_graph=True)[0]


def _leading(z) -> int:
    return z.shape[0] if z.ndim > 0 else 1


def _use_graph(params) -> bool:
    return products.applicable((params,), (params,))


def ggn_operator(forward: Callable, loss: Callable, params: TensorTree, normalize: bool = False) -> CurvatureOperator:
    """Generalised Gauss-Newton operator ``v ↦ J_fᵀ H_l J_f v`` at ``params``.

    Args:
        forward: ``forward(params) -> z`` (tensor).
        loss: ``loss(z) -> scalar``.
        params: Linearisation point.
        normalize: Divide by the leading dimension of z (the batch size).

    Returns:
        A :class:`CurvatureOperator`; the same products as :func:`posteriors_fast.ggnvp`.
    """
    flat, unravel = tree_ravel(params)
    size = flat.numel()

    def forward_flat(fp):
        return forward(unravel(fp))

    with torch.no_grad():
        z = forward_flat(flat)
    scale = 1.0 / _leading(z) if normalize else 1.0
    about = dict(rows=_leading(z), normalized=normalize, kind="ggn")
    if z.numel() * size <= MATERIALIZE_ENTRIES:
        with torch.no_grad():
            jac, z, _ = output_jacobian(forward_flat, (flat,), 0, has_aux=False)
            hess_jac = loss_hessian_times(loss, z, jac).mul_(scale)
        return CurvatureOperator(lambda v: torch.mv(jac.mT, torch.mv(hess_jac, v)), unravel, size, **about)

    blocks = hessian_blocks(loss, z.detach())
    if blocks is not None:
        blocks = blocks * scale
        n, c, _ = blocks.shape

        def hess_times(u):
            return torch.bmm(blocks, u.reshape(n, c, 1)).reshape(z.shape)

    else:
        _, hess_times_unscaled = _linearized(grad(loss), z.detach())

        def hess_times(u):
            return hess_times_unscaled(u) * scale

    if _use_graph(params):
        graph = _Graph(forward_flat, flat)
        return CurvatureOperator(lambda v: graph.jtu(hess_times(graph.jv(v))), unravel, size, **about)

    _, j_v = _linearized(forward_flat, flat)
    _, pullback = vjp(forward_flat, flat)
    return CurvatureOperator(lambda v: pullback(hess_times(j_v(v)))[0], unravel, size, **about)


def fisher_operator(f: Callable, params: TensorTree, normalize: bool = False) -> CurvatureOperator:
    """Empirical Fisher operator ``v ↦ Jᵀ J v`` of the (per-sample) outputs of
    ``f(params)`` at ``params``; the products of :func:`posteriors_fast.fvp`.

    Args:
        f: ``f(params) -> tensor`` of per-sample values (e.g. log-likelihoods).
        params: Linearisation point.
        normalize: Divide by the leading dimension of the output.

    Returns:
        A :class:`CurvatureOperator`.
    """
    flat, unravel = tree_ravel(params)
    size = flat.numel()

    def f_flat(fp):
        return f(unravel(fp))

    with torch.no_grad():
        out = f_flat(flat)
    scale = 1.0 / _leading(out) if normalize else 1.0
    about = dict(rows=_leading(out), normalized=normalize, kind="ggn")
    if out.numel() * size <= MATERIALIZE_ENTRIES:
        with torch.no_grad():
            jac = output_jacobian(f_flat, (flat,), 0, has_aux=False)[0]
        return CurvatureOperator(lambda v: torch.mv(jac.mT, torch.mv(jac, v)).mul_(scale), unravel, size, **about)

    if _use_graph(params):
        graph = _Graph(f_flat, flat)
        return CurvatureOperator(lambda v: graph.jtu(graph.jv(v)).mul_(scale), unravel, size, **about)

    _, j_v = _linearized(f_flat, flat)
    _, pullback = vjp(f_flat, flat)
    return CurvatureOperator(lambda v: pullback(j_v(v))[0] * scale, unravel, size, **about)


def hessian_operator(f: Callable, params: TensorTree) -> CurvatureOperator:
    """Hessian operator ``v ↦ ∇²f(params) v`` of a scalar function; the
    products of :func:`posteriors_fast.hvp`.

    Args:
        f: ``f(params) -> scalar``.
        params: Point at which the Hessian is taken.

    Returns:
        A :class:`CurvatureOperator` (symmetric; PSD only where f is convex).
    """
    flat, unravel = tree_ravel(params)

    def f_flat(fp):
        return f(unravel(fp))

    if _use_graph(params):
        point = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(f_flat(point), point, create_graph=True)

        def matvec(v):
            if not gradient.requires_grad:  # f is linear: zero Hessian
                return torch.zeros_like(v)
            return torch.autograd.grad(gradient, point, v, retain_graph=True)[0]

        return CurvatureOperator(matvec, unravel, flat.numel())

    _, h_v = _linearized(grad(f_flat), flat)
    return CurvatureOperator(h_v, unravel, flat.numel())
