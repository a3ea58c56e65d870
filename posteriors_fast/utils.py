"""Curvature products, linearised predictions, CG and small helpers, with the
API of ``posteriors.utils`` 0.0.5 plus a ``backend=`` keyword on the functions
that have hot paths (see :mod:`posteriors_fast.backends`)."""

import contextlib  # noqa: F401  (posteriors 0.0.5 exposes it here)
import math
import operator  # noqa: F401  (as above)
from functools import partial, wraps
from typing import Any, Callable, Sequence, Tuple

import torch
from optree import tree_flatten, tree_leaves, tree_map, tree_reduce  # noqa: F401  (tree_flatten: as above)
from optree.integrations.torch import tree_ravel
from torch.distributions import Normal  # noqa: F401  (as above)
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp  # noqa: F401  (jacfwd, jacrev: as above)

from posteriors_fast import ops
from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal import lowrank, products
from posteriors_fast._internal.cholesky import CholeskyError
from posteriors_fast._internal.errors import NO_AUX_ERROR_MSG, NON_TENSOR_AUX_ERROR_MSG, CatchAuxError
from posteriors_fast._internal.jacobian import jacobian_from_pullback, output_jacobian, output_pullback
from posteriors_fast._internal.jacobian_budget import budget_bytes
from posteriors_fast._internal.jacobian_chunks import ggn_diag_rows
from posteriors_fast._internal.loss_hessian import loss_hessian_times
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.sample_jacobian import sample_jacobian
from posteriors_fast.ops.separable_jacobian import learn_separability, per_sample_evaluation
from posteriors_fast.tree_utils import tree_size
from posteriors_fast.types import ForwardFn, Tensor, TensorTree

__all__ = [
    "NO_AUX_ERROR_MSG",
    "NON_TENSOR_AUX_ERROR_MSG",
    "CatchAuxError",
    "model_to_function",
    "linearized_forward_diag",
    "linearized_forward_lowrank",
    "hvp",
    "fvp",
    "empirical_fisher",
    "ggnvp",
    "ggn",
    "diag_ggn",
    "cg",
    "diag_normal_log_prob",
    "diag_normal_sample",
    "per_samplify",
    "is_scalar",
    "L_from_flat",
    "L_to_flat",
]

# Attribute set by per_samplify on its result: the batch-level function it wraps.
# Seeing it, empirical_fisher knows the function is sample-separable and builds
# the Jacobian one sample at a time (O(N·P)) instead of N full-batch passes.
PER_SAMPLE_SOURCE = "_posteriors_fast_per_sample_source"


class UnsupportedArgument(ValueError, AssertionError):
    """An argument value that posteriors 0.0.5 rejects with a bare ``assert``.

    A ValueError with a message, that still satisfies code catching the
    reference's AssertionError."""


def model_to_function(model: torch.nn.Module) -> Callable[[TensorTree, Any], Any]:
    """Functional view of ``model``: ``f(params, *args, **kwargs)`` runs the
    module with ``params`` (a dict name → tensor, as ``dict(model.named_parameters())``)
    in place of its own parameters, via ``torch.func.functional_call``.

    Args:
        model: A ``torch.nn.Module``.

    Returns:
        The function ``f(params, *args, **kwargs) -> model output``.
    """

    def call_with(params, *args, **kwargs):
        return functional_call(model, params, args=args, kwargs=kwargs)

    return call_with


def linearized_forward_diag(
    forward_func: ForwardFn,
    params: TensorTree,
    batch: TensorTree,
    sd_diag: TensorTree,
    backend: str | None = None,
) -> Tuple[TensorTree, Tensor, TensorTree]:
    """Predictive mean and covariance factor of the model linearised at ``params``
    under a diagonal Gaussian over the parameters:

    $$ f(x | θ) ≈ N\\big(f(x | θ_m),\\ J(x | θ_m)\\, Σ\\, J(x | θ_m)ᵀ\\big), \\quad
    Σ = \\mathrm{diag}(σ^2) $$

    (the linearised Laplace predictive, Foong et al. 2019,
    https://arxiv.org/abs/1906.11537).

    Args:
        forward_func: ``forward_func(params, batch) -> (outputs, aux)`` with
            outputs a (N, C) tensor, sample dimension first.
        params: Pytree of parameters θ_m.
        batch: Model input.
        sd_diag: Pytree like ``params`` of standard deviations σ.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``(forward_vals, chol, aux)``: the outputs f(x | θ_m), the (N, C, C) lower
        Cholesky factors of the per-sample covariances J Σ Jᵀ, and ``aux``.
    """
    backend = resolve(backend)
    _checks.same_structure(sd_diag, params, "sd_diag", "params")
    forward_vals, jac, aux = _forward_and_jacobian(forward_func, params, batch, backend)
    var = tree_ravel(sd_diag)[0] ** 2
    cov = ops.jsjt.jsjt(jac, var, backend=backend)
    chol = _cholesky_per_sample(cov, "sd_diag (zeros in sd_diag, or outputs that depend on too few parameters)")
    return forward_vals, chol, aux


def _forward_and_jacobian(forward_func, params, batch, backend):
    """``(outputs (N, C), jac (N, C, P), aux)`` of ``forward_func`` at ``params``."""
    fast = None
    if not (
        torch.is_grad_enabled()
        and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves((params, batch)))
    ):
        # A forward already found sample-separable (with a per-sample aux, and
        # outputs that carried no autograd graph, so a closure needing grad
        # keeps the batch call): outputs, Jacobian and aux from one per-sample
        # graph without autograd, no batch call. Anything that needs grad
        # with grad enabled takes the batch call, which records the graph.
        with torch.no_grad(), CatchAuxError():
            fast = per_sample_evaluation(forward_func, params, batch, "forward", backend=backend)
    if fast is not None:
        jac, forward_vals, aux, _ = fast
        return forward_vals, jac.reshape(*forward_vals.shape[:2], jac.shape[-1]), aux
    forward_vals, aux = forward_func(params, batch)
    with torch.no_grad(), CatchAuxError():
        jac = learn_separability(forward_func, params, batch, "forward", forward_vals, aux, backend=backend)
        if jac is None:
            jac, out, _ = output_jacobian(forward_func, (params, batch), 0, has_aux=True)
            jac = jac.reshape(*out.shape[:2], jac.shape[-1])
    return forward_vals, jac, aux


def _cholesky_per_sample(cov: torch.Tensor, given: str) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        bad = int(torch.nonzero(info)[0, 0])
        raise CholeskyError(
            f"J Σ Jᵀ of sample {bad} is not positive definite, so it has no Cholesky "
            "factor: the outputs of that sample do not vary enough with the parameters "
            f"given {given}"
        )
    return chol


def linearized_forward_lowrank(
    forward_func: ForwardFn,
    params: TensorTree,
    batch: TensorTree,
    prec_diag: TensorTree,
    prec_factor: Tensor,
    backend: str | None = None,
) -> Tuple[TensorTree, Tensor, TensorTree]:
    """Predictive mean and covariance factor of the model linearised at
    ``params`` under a Gaussian over the parameters with a
    diagonal-plus-low-rank precision (the states of ``ekf.lowrank_fisher``,
    ``laplace.lowrank_fisher`` and ``laplace.lowrank_ggn``):

    $$ f(x | θ) ≈ N\\big(f(x | θ_m),\\ J Σ Jᵀ\\big), \\quad
    Σ = (D + UUᵀ)^{-1}, \\quad J Σ Jᵀ = J D^{-1} Jᵀ - Y Yᵀ, $$

    with Y = J D⁻¹ U L⁻ᵀ and L Lᵀ = I + UᵀD⁻¹U (r × r): Σ is never formed
    (Foong et al. 2019, https://arxiv.org/abs/1906.11537, for the
    linearised predictive).

    Args:
        forward_func: ``forward_func(params, batch) -> (outputs, aux)`` with
            outputs a (N, C) tensor, sample dimension first.
        params: Pytree of parameters θ_m.
        batch: Model input.
        prec_diag: Pytree like ``params``: d, positive everywhere.
        prec_factor: U, the (P, r) factor of the precision in the raveled
            parameter order.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``(forward_vals, chol, aux)``: the outputs f(x | θ_m), the (N, C, C) lower
        Cholesky factors of the per-sample covariances J Σ Jᵀ, and ``aux``.
    """
    backend = resolve(backend)
    _checks.same_structure(prec_diag, params, "prec_diag", "params")
    diag = tree_ravel(prec_diag)[0].detach()
    size = diag.numel()
    if not isinstance(prec_factor, torch.Tensor) or prec_factor.ndim != 2 or prec_factor.shape[0] != size:
        got = tuple(prec_factor.shape) if isinstance(prec_factor, torch.Tensor) else type(prec_factor).__name__
        raise ValueError(f"prec_factor must be ({size}, rank) for the {size} parameters, got {got}")
    if not bool((diag > 0).all()):
        raise ValueError("prec_diag must be positive everywhere (the covariance needs D⁻¹)")
    forward_vals, jac, aux = _forward_and_jacobian(forward_func, params, batch, backend)
    with torch.no_grad():
        jsjt = partial(ops.jsjt.jsjt, backend=backend)
        cov = lowrank.output_covariance(jac, diag.to(jac.dtype), prec_factor.detach().to(jac.dtype), jsjt)
    return forward_vals, _cholesky_per_sample(cov, "prec_diag and prec_factor"), aux


def hvp(
    f: Callable,
    primals: tuple,
    tangents: tuple,
    has_aux: bool = False,
    backend: str | None = None,
) -> Tuple[float, TensorTree] | Tuple[float, TensorTree, Any]:
    """Hessian-vector product ``H(primals) @ tangents`` of a scalar function,
    forward-over-reverse (a ``jvp`` of ``grad``), with the calling convention of
    ``torch.func.jvp``.

    Args:
        f: Function with scalar output.
        primals: Tuple of arguments (tensors or pytrees) at which to evaluate.
        tangents: Tuple of the same structure as ``primals``.
        has_aux: Whether ``f`` returns ``(value, aux)``.
        backend: Accepted for a uniform API and validated: both backends run
            the same code (plain autograd, or ``torch.func`` where it is needed).

    Returns:
        ``(gradient, hvp_out)``, or ``(gradient, hvp_out, aux)`` with has_aux.
    """
    resolve(backend)
    if products.applicable(primals, tangents):
        return products.hvp(f, primals[0], tangents[0], has_aux)
    return jvp(grad(f, has_aux=has_aux), primals, tangents, has_aux=has_aux)


_PRODUCTS = "one product costs a few passes of the user's model, which a fixed kernel cannot serve"
for _name in ("hvp", "fvp", "ggnvp"):
    neutral(f"utils.{_name}", _PRODUCTS)


def _leading_dim(tree) -> int:
    return tree_leaves(tree)[0].shape[0]


def fvp(
    f: Callable,
    primals: tuple,
    tangents: tuple,
    has_aux: bool = False,
    normalize: bool = False,
    backend: str | None = None,
) -> Tuple[float, TensorTree] | Tuple[float, TensorTree, Any]:
    """Empirical-Fisher-vector product ``JᵀJ v`` where J is the Jacobian of the
    (typically per-sample log-likelihood) outputs of ``f`` at ``primals``
    (Martens 2020, https://jmlr.org/papers/volume21/17-678/17-678.pdf).

    Args:
        f: Function with tensor output, e.g. per-sample log-likelihoods.
        primals: Tuple of arguments at which to evaluate.
        tangents: Tuple of the same structure as ``primals`` (the vector v).
        has_aux: Whether ``f`` returns ``(value, aux)``.
        normalize: Divide by the size of the output's leading dimension (the
            batch size).
        backend: Accepted for a uniform API and validated: both backends run
            the same code (plain autograd, or ``torch.func`` where it is needed).

    Returns:
        ``(output, fvp_out)``, or ``(output, fvp_out, aux)`` with has_aux; the
        product is for the first primal.
    """
    resolve(backend)
    if products.applicable(primals, tangents):
        return products.fvp(f, primals[0], tangents[0], has_aux, normalize)
    forward = jvp(f, primals, tangents, has_aux=has_aux)
    pullback = vjp(f, *primals, has_aux=has_aux)[1]
    product = pullback(forward[1])[0]
    if normalize:
        n = _leading_dim(forward[0])
        product = tree_map(lambda x: x / n, product)
    return forward[0], product, *forward[2:]


def per_samplify(
    f: Callable[[TensorTree, TensorTree], Any],
) -> Callable[[TensorTree, TensorTree], Any]:
    """Per-sample version of a batch-level function.

    ``per_samplify(f)(params, batch)`` evaluates ``f(params, sample)`` on every
    sample of ``batch`` (each given a leading dimension of one) with
    ``torch.vmap`` and stacks the results. ``f`` should return something whose
    size does not depend on the batch size (e.g. a mean).

    The result remembers ``f``, so curvature functions such as
    :func:`empirical_fisher` can use per-sample reverse passes instead of a
    Jacobian of the whole batch.

    Args:
        f: ``f(params, batch) -> output`` (output may be ``(value, aux)``).

    Returns:
        ``g(params, batch)`` with outputs stacked over samples.
    """

    def one_sample(params, sample):
        return f(params, tree_map(lambda x: x.unsqueeze(0), sample))

    batched = torch.vmap(one_sample, in_dims=(None, 0))

    @wraps(f)
    def per_sample(params, batch):
        _checks.batch_leading_dim(batch)
        return batched(params, batch)

    setattr(per_sample, PER_SAMPLE_SOURCE, f)
    return per_sample


def empirical_fisher(
    f: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    normalize: bool = False,
    backend: str | None = None,
    process_group=None,
) -> Callable:
    """Build a function returning the empirical Fisher ``F = JᵀJ`` of ``f``.

    J is the Jacobian of the raveled outputs of ``f`` (typically per-sample
    log-likelihoods) with respect to the arguments selected by ``argnums``,
    raveled as ``optree.integrations.torch.tree_ravel`` does, so F is square in
    the flat parameter dimension (Martens 2020).

    When ``f`` was made by :func:`per_samplify` and is called as ``(params,
    batch)``, J is built from one reverse pass per sample; otherwise from
    reverse passes of the whole function (as ``torch.func.jacrev``).

    Args:
        f: Function of one or more arguments returning tensor(s).
        argnums: Which positional argument(s) to differentiate.
        has_aux: Whether ``f`` returns ``(output, aux)``.
        normalize: Divide F by the number of outputs of ``f`` (the batch size).
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank calls ``fisher`` on its shard and every rank gets F of the
            concatenated outputs (one all-gather of the Jacobian rows;
            ``normalize`` divides by the global number of outputs; aux is
            this rank's).

    Returns:
        ``fisher(*args, **kwargs)`` returning F, or ``(F, aux)`` with has_aux.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "empirical_fisher")
    source = getattr(f, PER_SAMPLE_SOURCE, None)

    def jacobian(*args, **kwargs):
        if source is not None and argnums == 0 and len(args) == 2 and not kwargs:
            _checks.batch_leading_dim(args[1])
            jac, _, aux = sample_jacobian(source, args[0], args[1], has_aux, backend=backend)
        else:
            fn = partial(f, **kwargs) if kwargs else f
            jac, _, aux = output_jacobian(fn, args, argnums, has_aux)
        return jac, aux

    def fisher(*args, **kwargs):
        if group is None:
            jac, aux = jacobian(*args, **kwargs)
        else:
            differentiated = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
            # An empty shard of a per_samplify function is not evaluated (vmap needs a sample).
            empty = source is not None and len(args) == 2 and not kwargs and _checks.common_leading_dim(args[1]) == 0
            result, counts, _ = group.agree(
                None if empty else partial(jacobian, *args, **kwargs),
                what="empirical_fisher",
                params=differentiated,
                count=lambda r: r[0].shape[0] if r else 0,
                extra=(normalize, has_aux),
            )
            if sum(counts) == 0:
                raise ValueError("empirical_fisher: no outputs on any rank")
            if result is None:
                flat = tree_ravel(differentiated)[0]
                result = flat.new_zeros((0, flat.numel())), None
            jac, aux = result
            jac = group.gather_rows(jac, counts)
        scale = 1.0 / jac.shape[0] if normalize else 1.0
        result = ops.syrk.gram(jac, scale, backend=backend)
        return (result, aux) if has_aux else result

    return fisher


def ggnvp(
    forward: Callable,
    loss: Callable,
    primals: tuple,
    tangents: tuple,
    forward_has_aux: bool = False,
    loss_has_aux: bool = False,
    normalize: bool = False,
    backend: str | None = None,
) -> Tuple[float, TensorTree] | Tuple[float, TensorTree, Any] | Tuple[float, TensorTree, Any, Any]:
    """Generalised Gauss-Newton-vector product ``J_fᵀ H_l J_f v`` with z = f(θ)
    the output of ``forward`` and H_l the Hessian of the scalar ``loss`` at z.
    For an exponential-family negative log-likelihood in its natural parameter
    this is the Fisher-vector product (Martens 2020).

    Args:
        forward: Function of the primals with tensor output z.
        loss: Function of z with scalar output.
        primals: Tuple of arguments of ``forward``.
        tangents: Tuple of the same structure (the vector v).
        forward_has_aux: Whether ``forward`` returns ``(z, aux)``.
        loss_has_aux: Whether ``loss`` returns ``(value, aux)``.
        normalize: Divide by the leading dimension of z (the batch size).
        backend: Accepted for a uniform API and validated: both backends run
            the same code (plain autograd, or ``torch.func`` where it is needed).

    Returns:
        ``((z, grad_z loss), ggnvp_out)``, followed by the forward aux and/or the
        loss aux when requested.
    """
    resolve(backend)
    if products.applicable(primals, tangents):
        return products.ggnvp(forward, loss, primals[0], tangents[0], forward_has_aux, loss_has_aux, normalize)
    forward_out = jvp(forward, primals, tangents, has_aux=forward_has_aux)
    z, jv = forward_out[0], forward_out[1]
    loss_out = jvp(grad(loss, has_aux=loss_has_aux), (z,), (jv,), has_aux=loss_has_aux)
    hjv = loss_out[1]
    if normalize:
        n = _leading_dim(z)
        hjv = tree_map(lambda x: x / n, hjv)
    pullback = vjp(forward, *primals, has_aux=forward_has_aux)[1]
    product = pullback(hjv)[0]
    return (z, loss_out[0]), product, *forward_out[2:], *loss_out[2:]


def _require_argnums_zero(argnums) -> None:
    if not (isinstance(argnums, int) and argnums == 0):
        raise UnsupportedArgument(
            f"argnums={argnums!r} is not supported: only argnums=0 (differentiate the "
            "first argument of forward) is, as in posteriors 0.0.5"
        )


def _ggn_parts(forward, loss, forward_has_aux, loss_has_aux, normalize, params):
    """Flat output Jacobian J (d, P), ``H J`` with H the loss Hessian in output
    space (scaled by 1/batch with normalize; the (d, d) Hessian is never
    formed), the unravel function, the list of auxes and the outputs z."""
    flat, unravel = tree_ravel(params)

    def forward_of_flat(flat_params):
        return forward(unravel(flat_params))

    jac, z, forward_aux = output_jacobian(forward_of_flat, (flat,), 0, forward_has_aux)
    z = torch.stack(tree_leaves(z))[0] if not isinstance(z, torch.Tensor) else z

    def loss_value(z_):
        return loss(z_)[0] if loss_has_aux else loss(z_)

    hess_jac = loss_hessian_times(loss_value, z, jac)
    if normalize:
        hess_jac = hess_jac / z.shape[0]
    auxes = []
    if forward_has_aux:
        auxes.append(forward_aux)
    if loss_has_aux:
        auxes.append(loss(z)[1])
    return jac, hess_jac, unravel, auxes, z


def ggn(
    forward: Callable,
    loss: Callable,
    argnums: int | Sequence[int] = 0,
    forward_has_aux: bool = False,
    loss_has_aux: bool = False,
    normalize: bool = False,
    backend: str | None = None,
    process_group=None,
) -> Callable:
    """Build a function returning the dense generalised Gauss-Newton matrix
    ``G = J_fᵀ H_l J_f`` (P, P) in the raveled parameter order of
    ``optree.integrations.torch.tree_ravel``; see :func:`ggnvp` for the terms.

    ``forward`` must return a tensor (whose first dimension is the batch, used
    by ``normalize``) and ``loss`` maps it to a scalar.

    Args:
        forward: ``forward(params) -> z`` (or ``(z, aux)``).
        loss: ``loss(z) -> scalar`` (or ``(scalar, aux)``).
        argnums: Must be 0.
        forward_has_aux: Whether ``forward`` returns aux.
        loss_has_aux: Whether ``loss`` returns aux.
        normalize: Divide by the batch size.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank's ``forward`` closes over its shard and every rank gets the
            GGN of the concatenated outputs (one all-gather of the rows of J
            and H J; each rank's ``loss`` is taken as a sum over its samples
            unless the group says ``reduction="mean"``; ``normalize`` divides
            by the global batch size).

    Returns:
        ``ggn(params)`` returning G, followed by the requested auxes as a tuple
        ``(G, *auxes)`` when any aux is requested.
    """
    _require_argnums_zero(argnums)
    backend = resolve(backend)
    group = resolve_group(process_group, "ggn")

    def dense_ggn(params):
        if group is not None:
            jac, hess_jac, auxes = _distributed_ggn_parts(
                group, "ggn", forward, loss, forward_has_aux, loss_has_aux, normalize, params
            )
            result = ops.syrk.gram(jac, 1.0, hess_jac, backend=backend)
            return (result, *auxes) if auxes else result
        jac, hess_jac, _, auxes, _ = _ggn_parts(forward, loss, forward_has_aux, loss_has_aux, normalize, params)
        result = ops.syrk.gram(jac, 1.0, hess_jac, backend=backend)
        return (result, *auxes) if auxes else result

    return dense_ggn


def diag_ggn(
    forward: Callable,
    loss: Callable,
    argnums: int | Sequence[int] = 0,
    forward_has_aux: bool = False,
    loss_has_aux: bool = False,
    normalize: bool = False,
    backend: str | None = None,
    process_group=None,
) -> Callable:
    """Build a function returning the diagonal of the generalised Gauss-Newton
    matrix (see :func:`ggn`) as a pytree shaped like the parameters. The P×P
    matrix is never formed, and beyond the Jacobian memory budget
    (``POSTERIORS_FAST_JACOBIAN_MB``, docs/environment.md) the rows of the
    output Jacobian are made a block at a time.

    Args:
        forward: ``forward(params) -> z`` (or ``(z, aux)``).
        loss: ``loss(z) -> scalar`` (or ``(scalar, aux)``).
        argnums: Must be 0.
        forward_has_aux: Whether ``forward`` returns aux.
        loss_has_aux: Whether ``loss`` returns aux.
        normalize: Divide by the batch size.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in :func:`ggn`; one all-reduce of P values.

    Returns:
        ``diag_ggn(params)`` returning the diagonal tree, or ``(diag, *auxes)``.
    """
    _require_argnums_zero(argnums)
    backend = resolve(backend)
    group = resolve_group(process_group, "diag_ggn")

    def diagonal_ggn(params):
        if group is not None:
            return _distributed_diag_ggn(
                group, forward, loss, forward_has_aux, loss_has_aux, normalize, params, backend
            )
        diagonal, unravel, auxes = _diag_ggn_term(
            forward, loss, forward_has_aux, loss_has_aux, normalize, params, backend
        )
        result = unravel(diagonal)
        return (result, *auxes) if auxes else result

    return diagonal_ggn


def _diag_ggn_term(forward, loss, forward_has_aux, loss_has_aux, normalize, params, backend):
    """``(diag(Jᵀ H J), unravel, auxes)`` from one forward pass: the whole
    Jacobian when it fits in the Jacobian memory budget, otherwise a block of
    rows at a time (:func:`~posteriors_fast._internal.jacobian_chunks.ggn_diag_rows`)."""
    flat, unravel = tree_ravel(params)
    raveled, pullback, z, forward_aux = output_pullback(
        lambda flat_params: forward(unravel(flat_params)), (flat,), 0, forward_has_aux
    )
    z = torch.stack(tree_leaves(z))[0] if not isinstance(z, torch.Tensor) else z

    def loss_value(z_):
        return loss(z_)[0] if loss_has_aux else loss(z_)

    if raveled.numel() * flat.numel() * flat.element_size() > budget_bytes() and raveled.numel() > 1:
        diagonal = ggn_diag_rows(pullback, loss_value, z, flat.numel(), normalize)
    else:
        jac = jacobian_from_pullback(pullback, raveled)
        hess_jac = loss_hessian_times(loss_value, z, jac)
        if normalize:
            hess_jac = hess_jac / z.shape[0]
        diagonal = ops.ggn_diag.ggn_diag(jac, hess_jac, backend=backend)
    auxes = []
    if forward_has_aux:
        auxes.append(forward_aux)
    if loss_has_aux:
        auxes.append(loss(z)[1])
    return diagonal, unravel, auxes


def _distributed_ggn_parts(group, what, forward, loss, forward_has_aux, loss_has_aux, normalize, params):
    """Every rank's J and H J rows, gathered in rank order (each rank's H J
    weighted as the group's reduction says, then divided by the global batch
    size with ``normalize``) and this rank's auxes."""

    def compute():
        return _ggn_parts(forward, loss, forward_has_aux, loss_has_aux, False, params)

    result, counts, rows = group.agree(
        compute, what=what, params=params, count=lambda r: _leading(r[4]), rows=lambda r: r[0].shape[0]
    )
    jac, hess_jac, _, auxes, _ = result
    weight = group.weights(counts, "ggn")
    if normalize:
        weight /= sum(counts)
    both = group.gather_rows(torch.cat([jac, hess_jac * weight if weight != 1.0 else hess_jac], 1), rows)
    size = jac.shape[1]
    return both[:, :size], both[:, size:], auxes


def _leading(z) -> int:
    return z.shape[0] if z.ndim > 0 else 1


def _distributed_diag_ggn(group, forward, loss, forward_has_aux, loss_has_aux, normalize, params, backend):
    """:func:`diag_ggn` over a process group: each rank's diagonal, weighted,
    summed with one all-reduce."""

    def compute():
        jac, hess_jac, unravel, auxes, z = _ggn_parts(forward, loss, forward_has_aux, loss_has_aux, False, params)
        return ops.ggn_diag.ggn_diag(jac, hess_jac, backend=backend), unravel, auxes, z

    (term, unravel, auxes, _), counts, _ = group.agree(
        compute, what="diag_ggn", params=params, count=lambda r: _leading(r[3])
    )
    weight = group.weights(counts, "ggn")
    if normalize:
        weight /= sum(counts)
    (total,) = group.all_reduce_sum([term * weight if weight != 1.0 else term])
    result = unravel(total)
    return (result, *auxes) if auxes else result


def _identity(x):
    return x


def cg(
    A: Callable,
    b: TensorTree,
    x0: TensorTree = None,
    *,
    maxiter: int = None,
    damping: float = 0.0,
    tol: float = 1e-5,
    atol: float = 0.0,
    M: Callable = _identity,
    backend: str | None = None,
    process_group=None,
) -> Tuple[TensorTree, Any]:
    """Solve ``(A + damping·I) x = b`` by (preconditioned) conjugate gradients,
    with ``A`` a function computing the product of a Hermitian positive definite
    operator with a pytree shaped like ``b``. Tolerances follow SciPy's
    non-legacy rule: stop when ``‖r‖² <= max(tol²‖b‖², atol²)`` or after
    ``maxiter`` iterations. The iteration runs on one flat vector.

    Args:
        A: ``A(x) -> A x`` on pytrees shaped like ``b``.
        b: Right-hand side.
        x0: Initial guess shaped like ``b`` (zeros by default).
        maxiter: Iteration cap (default ``10 * tree_size(b)``).
        damping: Added to the diagonal of ``A`` (regularisation).
        tol: Relative tolerance.
        atol: Absolute tolerance.
        M: Preconditioner ``M(r) -> z`` approximating ``A⁻¹ r``.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)`` with
            ``A`` a curvature operator of :mod:`posteriors_fast.operators`
            built on each rank's shard: every product is reduced over the
            ranks (one all-reduce of P values; weights as the operator's
            kind and the group's reduction say, a ``normalize``d operator
            divided by the global batch size), so every rank runs the same
            iterations on the operator of the concatenated batch. ``b``, ``x0``
            and ``M`` must be the same on every rank (``b`` and ``x0`` are
            checked).

    Returns:
        ``(x, info)`` with ``x`` shaped like ``b`` and ``info`` a dict with
        ``"error"`` (final squared residual measure), ``"converged"`` and ``"niter"``.
    """
    backend = resolve(backend)
    b_flat, unravel = tree_ravel(b)
    if x0 is None:
        x0_flat = torch.zeros_like(b_flat)
    else:
        _checks.same_structure(x0, b, "x0", "b")
        x0_flat = tree_ravel(x0)[0]
    if maxiter is None:
        maxiter = 10 * b_flat.numel()
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter!r}")
    for name, value in (("tol", tol), ("atol", atol), ("damping", damping)):
        if not _checks.scalar_value(value, name) >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    matvec = getattr(A, "flat_matvec", None)  # a posteriors_fast.operators operator
    group = resolve_group(process_group, "cg")
    if group is not None:
        matvec = _reduced_matvec(group, A, b_flat, x0_flat, (maxiter, damping, tol, atol))
    elif matvec is None or getattr(A, "size", None) != b_flat.numel():

        def matvec(v):
            return tree_ravel(A(unravel(v)))[0]

    precond = None
    if M is not _identity:

        def precond(v):
            return tree_ravel(M(unravel(v)))[0]

    x, info = ops.cg_step.solve(matvec, b_flat, x0_flat, maxiter, damping, tol, atol, precond, backend=backend)
    return unravel(x), info


def _reduced_matvec(group, A, b_flat, x0_flat, settings) -> Callable:
    """``v ↦ Σ_r w_r A_r v`` for a curvature operator ``A`` built on each
    rank's shard (one all-reduce per product), after the ranks agreed on b,
    x0 and the settings."""
    if getattr(A, "flat_matvec", None) is None or getattr(A, "size", None) != b_flat.numel():
        raise TypeError(
            "cg with a process_group needs A to be a posteriors_fast.operators curvature operator of the "
            "size of b (its products are reduced over the ranks); reduce a plain function A yourself"
        )
    kind = getattr(A, "kind", "scalar")
    rows = getattr(A, "rows", None)
    if rows is None and (A.normalized or group.resolved_reduction(kind) == "mean"):
        raise ValueError(
            "cg with a process_group and reduction='mean' weights each rank's operator by its batch size, which "
            "this operator does not know: set A.rows to this rank's batch size, or use reduction='sum'"
        )
    _, counts, _ = group.agree(
        None,
        what="cg",
        params=(b_flat, x0_flat),
        count=rows or 0,
        extra=(kind, A.normalized, settings),
        check_values=True,
    )
    weight = counts[group.rank] / sum(counts) if A.normalized else group.weights(counts, kind)

    def matvec(v):
        product = A.flat_matvec(v)
        return group.all_reduce_(product * weight if weight != 1.0 else product)

    return matvec


def _broadcast_scalar(value, like: TensorTree) -> TensorTree:
    """A scalar (or one-element tree) as a tree like ``like`` of 0-d tensors."""
    if tree_size(value) != 1:
        return value
    (scalar,) = tree_leaves(value)
    if isinstance(scalar, torch.Tensor):
        return tree_map(lambda t: scalar.detach().to(t.device), like)
    return tree_map(lambda t: torch.tensor(scalar, device=t.device), like)


_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def diag_normal_log_prob(
    x: TensorTree,
    mean: float | TensorTree = 0.0,
    sd_diag: float | TensorTree = 1.0,
    normalize: bool = True,
) -> float:
    """Log density of ``x`` under a Gaussian with diagonal covariance.

    Scalar ``mean`` or ``sd_diag`` are broadcast to every element without
    materialising a full tree.

    Args:
        x: Pytree of tensors.
        mean: Mean, a scalar or a tree like ``x``.
        sd_diag: Standard deviations, a scalar or a tree like ``x``.
        normalize: Full normalised log density if True; otherwise only
            ``Σ -½((x - mean) / sd)²``.

    Returns:
        0-d tensor.
    """
    mean = _broadcast_scalar(mean, x)
    sd_diag = _broadcast_scalar(sd_diag, x)

    if normalize:

        def leaf_sum(v, m, sd):
            return (-((v - m) ** 2) / (2 * sd**2) - sd.log() - _LOG_SQRT_2PI).sum()

    else:

        def leaf_sum(v, m, sd):
            return (-0.5 * ((v - m) / sd) ** 2).sum()

    return tree_reduce(torch.add, tree_map(leaf_sum, x, mean, sd_diag))


def diag_normal_sample(
    mean: TensorTree,
    sd_diag: float | TensorTree,
    sample_shape: torch.Size = torch.Size([]),
) -> dict:
    """Draw from a Gaussian with diagonal covariance, leaf by leaf.

    Args:
        mean: Pytree of means.
        sd_diag: Standard deviations, a scalar or a tree like ``mean``.
        sample_shape: Leading shape of the draws.

    Returns:
        Tree like ``mean`` whose leaves have shape ``sample_shape + leaf.shape``.
    """
    sd_diag = _broadcast_scalar(sd_diag, mean)
    shape = torch.Size(sample_shape)

    def draw(m, sd):
        # torch's default dtype, as posteriors 0.0.5, so seeded draws agree.
        return m + torch.randn(shape + m.shape, device=m.device) * sd

    return tree_map(draw, mean, sd_diag)


def is_scalar(x: Any) -> bool:
    """True for a Python int or float (bools included) or a one-element tensor."""
    return isinstance(x, (int, float)) or (torch.is_tensor(x) and x.numel() == 1)


def L_from_flat(L_flat: torch.Tensor) -> torch.Tensor:
    """Lower-triangular (n, n) matrix from its n(n+1)/2 row-major lower entries.

    Args:
        L_flat: 1-d tensor of the lower-triangular entries.

    Returns:
        The matrix, with ``L_flat``'s dtype and device.
    """
    if not isinstance(L_flat, torch.Tensor) or L_flat.ndim != 1:
        raise ValueError("L_flat must be a 1-d tensor of lower-triangular entries")
    k = L_flat.shape[0]
    n = (math.isqrt(8 * k + 1) - 1) // 2
    if n * (n + 1) // 2 != k:
        raise ValueError(
            f"L_flat has {k} entries, which is not n(n+1)/2 for any n: it cannot be "
            "the lower triangle of a square matrix"
        )
    rows, cols = torch.tril_indices(n, n, device=L_flat.device)
    L = L_flat.new_zeros((n, n))
    L[rows, cols] = L_flat
    return L


def L_to_flat(L: torch.Tensor) -> torch.Tensor:
    """The lower-triangular entries of the square matrix ``L``, row-major, as a
    new 1-d tensor (inverse of :func:`L_from_flat`)."""
    if not isinstance(L, torch.Tensor) or L.ndim != 2 or L.shape[0] != L.shape[1]:
        raise ValueError("L must be a square 2-d tensor")
    rows, cols = torch.tril_indices(L.shape[0], L.shape[0], device=L.device)
    return L[rows, cols].clone()
