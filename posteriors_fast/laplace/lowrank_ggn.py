"""Laplace approximation with a diagonal-plus-low-rank generalised
Gauss-Newton precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, Λ⁻¹) with Λ = diag(d) + U Uᵀ, U of shape (P, r): the prior diagonal
precision plus the GGN of the data (see :mod:`posteriors_fast.laplace.dense_ggn`),
accumulated batch by batch into this form. Each batch's GGN is written as
RᵀR with R = diag(√λ) Eᵀ J_f, where H_l = E diag(λ) Eᵀ is the Hessian of the
negative outer log-likelihood in output space (decomposed per sample when it
is block diagonal, as for any loss summed over samples), and R's rows are
appended to the factor and truncated as in
:mod:`posteriors_fast.laplace.lowrank_fisher`
(:mod:`posteriors_fast.ops.lowrank_truncate`):

$$ A = [U,\\ Rᵀ], \\qquad U_{new} = A V_{:, 1..r}, \\qquad
d_{new} = d + \\mathrm{rowsum}(A^2) - \\mathrm{rowsum}(U_{new}^2). $$

What is guaranteed: the diagonal of the precision is exact (d + rowsum(U²)
equals the prior plus the diagonal of every batch's GGN); after each batch
the low-rank part is the best rank-r approximation of U Uᵀ + J_fᵀ H_l J_f;
with r >= P it equals ``laplace.dense_ggn``'s precision (up to rounding).
H_l must be positive semi-definite (``outer_log_likelihood`` concave in z,
true of exponential-family likelihoods in their natural parameters); a
clearly negative eigenvalue is an error. Chang et al. (2023),
https://arxiv.org/abs/2305.19535; Daxberger et al. (2021),
https://arxiv.org/abs/2106.14806. No P×P matrix is formed.
"""

from functools import partial
from typing import Any

import torch

from posteriors_fast._internal import lowrank as _lowrank
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.laplace import _lowrank as _common
from posteriors_fast.laplace._ggn import batch_ggn_root
from posteriors_fast.laplace._lowrank import LowRankLaplaceState
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform

__all__ = ["LowRankLaplaceState", "build", "init", "update", "sample"]


def _no_group(process_group, what: str) -> None:
    if process_group is not None:
        raise ValueError(
            f"{what} does not take a process_group yet (the per-rank GGN square roots would need "
            "their own gather); run it on one process, or use laplace.lowrank_fisher, which does"
        )


def build(
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    rank: int,
    init_prec_diag: TensorTree | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the model into a ``Transform``.

    Args:
        forward: ``forward(params, batch) -> (z, aux)``: the model outputs z
            (e.g. logits, one row per sample, not reduced over the batch).
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``, the
            log-likelihood of the outputs (no aux), concave in z.
        rank: r, the number of columns of the precision's low-rank factor; a
            positive integer.
        init_prec_diag: Prior diagonal precision: a scalar >= 0 or a
            non-negative tree like the parameters.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: Must be None: this method runs on one process (a
            ValueError says so otherwise).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    rank = _lowrank.check_rank(rank)
    _no_group(process_group, "laplace.lowrank_ggn")
    backend = resolve(backend)
    return Transform(
        partial(init, rank=rank, init_prec_diag=init_prec_diag),
        partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood, rank=rank, backend=backend),
    )


def init(
    params: TensorTree,
    rank: int,
    init_prec_diag: TensorTree | float = 0.0,
    process_group=None,
) -> LowRankLaplaceState:
    """Initial state: mean ``params``, precision diag(init_prec_diag), zero factor.

    Args:
        params: Pytree of finite floating-point tensors (the mode; kept by reference).
        rank: Columns of the low-rank factor, a positive integer.
        init_prec_diag: A scalar >= 0 for every entry, or a non-negative tree
            like ``params`` (copied).
        process_group: Must be None.

    Returns:
        ``LowRankLaplaceState`` with ``aux=None``.
    """
    _no_group(process_group, "laplace.lowrank_ggn.init")
    return _common.initial_state(params, rank, init_prec_diag, None, "laplace.lowrank_ggn.init")


def update(
    state: LowRankLaplaceState,
    batch: Any,
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    rank: int,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> LowRankLaplaceState:
    """Add the batch's GGN (loss ``-outer_log_likelihood``) to the precision
    and truncate.

    Args:
        state: Current ``LowRankLaplaceState``.
        batch: Data for ``forward`` and ``outer_log_likelihood``.
        forward: ``forward(params, batch) -> (z, aux)``.
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``.
        rank: Columns of the factor (must match ``state.prec_factor``).
        inplace: Write into the tensors of ``state.prec_diag`` and
            ``state.prec_factor`` (versions advance); nothing is written
            unless the whole update succeeds.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: Must be None.

    Returns:
        The updated ``LowRankLaplaceState``.

    Raises:
        TypeError, ValueError: ``rank`` not a positive integer, NaN/inf in the
            parameters, the outputs of ``forward``, their gradient, or the
            Hessian of ``outer_log_likelihood``, or a Hessian with a negative
            eigenvalue.
    """
    _no_group(process_group, "laplace.lowrank_ggn.update")
    backend = resolve(backend)
    rank = _lowrank.check_rank(rank)
    _lowrank.check_state(state, "LowRankLaplaceState", rank)
    with torch.no_grad(), CatchAuxError():
        rows, aux = batch_ggn_root(state.params, batch, forward, outer_log_likelihood, backend=backend)
    return _common.add_to_prec(state, rows, rank, aux, inplace, backend)


def sample(state: LowRankLaplaceState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Exact draws from N(params, (diag(d) + U Uᵀ)⁻¹) without a P×P matrix
    (d must be positive everywhere: use ``init_prec_diag > 0``).

    Args:
        state: State with mean, precision diagonal and factor.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return _common.sample(state, sample_shape)
