"""Laplace approximation with a dense generalised Gauss-Newton precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, Λ⁻¹) with Λ the prior precision plus the GGN of the data, accumulated
batch by batch:

$$ Λ ← Λ + J_fᵀ H_l J_f, \\qquad z = f(θ, \\text{batch}),\\quad
l(z) = -\\log p(\\text{batch} | z), $$

J_f the (N·C, P) Jacobian of the model outputs z and H_l the Hessian of the
negative outer log-likelihood in output space. For an exponential-family
likelihood in its natural parameter z this is the Fisher information
(Martens, 2020, https://jmlr.org/papers/volume21/17-678/17-678.pdf); its use
in Laplace approximations: Daxberger et al. (2021),
https://arxiv.org/abs/2106.14806.

When the forward is sample-separable (checked on the fly), J_f comes from one
reverse pass per sample; H_l is applied through its per-sample blocks, never
as an (N·C)×(N·C) matrix; the product is computed on the upper triangle only
and mirrored, so Λ stays exactly symmetric.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from optree.integrations.torch import tree_ravel  # noqa: F401  (as above)

from posteriors_fast._internal import checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import _sharded as sharding
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _dense
from posteriors_fast.laplace._ggn import batch_ggn_factors
from posteriors_fast.ops.syrk import gram
from posteriors_fast.tree_utils import tree_size  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from posteriors_fast.utils import ggn, is_scalar  # noqa: F401  (as above)


def build(
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    init_prec: TensorTree | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the model into a ``Transform``.

    Args:
        forward: ``forward(params, batch) -> (z, aux)``: the model outputs z
            (e.g. logits, one row per sample, not reduced over the batch).
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``, the
            log-likelihood of the outputs (no aux).
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P)
            symmetric positive semi-definite tensor.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)`` (each
            rank passes its shard of the batch; one all-gather of the rows of
            J_f and H_l J_f, 2·N·C·P values, per step; each rank's
            ``outer_log_likelihood`` is taken as a sum over its samples unless
            the group says ``reduction="mean"``); or
            ``posteriors_fast.distributed.sharded(...)`` (the precision split
            by rows).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.dense_ggn", _dense.MODES)
    return Transform(
        partial(init, init_prec=init_prec, process_group=group),
        partial(
            update,
            forward=forward,
            outer_log_likelihood=outer_log_likelihood,
            backend=backend,
            process_group=group,
        ),
    )


class DenseLaplaceState(NamedTuple):
    """Gaussian N(params, prec⁻¹) with a dense precision.

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec: (P, P) precision Λ in the raveled parameter order.
        aux: Auxiliary output of the last ``forward`` call.
    """

    params: TensorTree
    prec: torch.Tensor
    aux: Any = None


def init(params: TensorTree, init_prec: torch.Tensor | float = 0.0, process_group=None) -> DenseLaplaceState:
    """Initial state: mean ``params`` and precision ``init_prec``.

    Args:
        params: Pytree of finite floating-point tensors (the mode; kept by reference).
        init_prec: A scalar c >= 0 meaning c·I on the params' device and
            dtype, or a (P, P) symmetric positive semi-definite tensor (copied).
        process_group: As in ``build``.

    Returns:
        ``DenseLaplaceState`` with ``aux=None``.
    """
    group = resolve_group(process_group, "laplace.dense_ggn.init", _dense.MODES)
    return DenseLaplaceState(params, _dense.initial_prec(params, init_prec, group))


def update(
    state: DenseLaplaceState,
    batch: Any,
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> DenseLaplaceState:
    """Add the batch's GGN (loss ``-outer_log_likelihood``) to the precision.

    Args:
        state: Current ``DenseLaplaceState``.
        batch: Data for ``forward`` and ``outer_log_likelihood``.
        forward: ``forward(params, batch) -> (z, aux)``.
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``.
        inplace: Add into ``state.prec`` (its version counter advances);
            nothing is written unless the GGN is finite.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``DenseLaplaceState``.

    Raises:
        ValueError: NaN/inf in the parameters, the outputs of ``forward``,
            their gradient, or the Hessian of ``outer_log_likelihood``.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.dense_ggn.update", _dense.MODES)
    _dense.check_state(state, group)
    with torch.no_grad(), CatchAuxError():
        compute = partial(batch_ggn_factors, state.params, batch, forward, outer_log_likelihood, backend=backend)
        if group is None:
            jac, hess_jac, aux = compute()
        else:
            what = "laplace.dense_ggn.update"
            jac, hess_jac, aux = group.gather_factors(compute, what=what, params=state.params, batch=batch)
            if group.sharded:
                return state._replace(prec=sharding.add_product(state.prec, jac, hess_jac, inplace, what), aux=aux)
        term = gram(jac, 1.0, hess_jac, backend=backend)
    checks.require_finite([(term, "the GGN of this batch overflowed (NaN or inf)")])
    return _dense.add_to_prec(state, term, aux, inplace)


def sample(state: DenseLaplaceState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, prec⁻¹) (the factor is cached per precision; one
    triangular solve for all draws).

    Args:
        state: State with mean and precision (positive definite).
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return _dense.sample(state, sample_shape)
