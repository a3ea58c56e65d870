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
the low-rank part is the best rank-r approximation of U Uᵀ + J_fᵀ H_l J_f
when the batch's N·C rows of R fit the Jacobian memory budget
(``POSTERIORS_FAST_JACOBIAN_MB``); with r >= P it equals
``laplace.dense_ggn``'s precision (up to rounding). Beyond the budget, when
H_l is block diagonal over samples and ``forward`` is sample-separable, the
rows are built and folded in a block of samples at a time, each block
truncated in turn: the state is the one that updates on those blocks as
separate batches give (the diagonal still exact, and still the dense
precision when r >= P), and memory stays at about one block of rows plus
2·r·P values, whatever N·C is.
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
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _lowrank as _common
from posteriors_fast.laplace._ggn import batch_ggn_root, batch_ggn_root_blocks
from posteriors_fast.laplace._lowrank import LowRankLaplaceState
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform

__all__ = ["LowRankLaplaceState", "build", "init", "update", "sample"]


def _gather_roots(group, compute, what: str, params, batch):
    """Every rank's GGN square-root rows R_r, weighted as the group's
    reduction says (√w_r R_r, so that Σ_r w_r R_rᵀR_r is the global GGN),
    in rank order, and this rank's aux. The rows travel twice through
    ``gather_factors`` (as J and as w_r·HJ), which weights them; the weight
    of each row is recovered as ⟨w R_i, R_i⟩ / ⟨R_i, R_i⟩."""

    def pair():
        rows, aux = compute()
        return rows, rows, aux

    rows, weighted, aux = group.gather_factors(pair, what=what, params=params, batch=batch)
    if weighted is rows or torch.equal(weighted, rows):
        return rows, aux
    norms = rows.square().sum(1)
    weight = (weighted * rows).sum(1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    return rows * weight.clamp_min(0.0).sqrt()[:, None], aux


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
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank gets the state
            of one process on the whole batch (one all-gather of the GGN
            square-root rows, twice: 2·N·C·P values per step; each rank's
            ``outer_log_likelihood`` is taken as a sum over its samples unless
            the group says ``reduction="mean"``).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    rank = _lowrank.check_rank(rank)
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.lowrank_ggn")
    return Transform(
        partial(init, rank=rank, init_prec_diag=init_prec_diag, process_group=group),
        partial(
            update,
            forward=forward,
            outer_log_likelihood=outer_log_likelihood,
            rank=rank,
            backend=backend,
            process_group=group,
        ),
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
        process_group: As in ``build``; every rank's params must agree (checked).

    Returns:
        ``LowRankLaplaceState`` with ``aux=None``.
    """
    group = resolve_group(process_group, "laplace.lowrank_ggn.init")
    return _common.initial_state(params, rank, init_prec_diag, group, "laplace.lowrank_ggn.init")


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
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``LowRankLaplaceState``.

    Raises:
        TypeError, ValueError: ``rank`` not a positive integer, NaN/inf in the
            parameters, the outputs of ``forward``, their gradient, or the
            Hessian of ``outer_log_likelihood``, or a Hessian with a negative
            eigenvalue.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.lowrank_ggn.update")
    rank = _lowrank.check_rank(rank)
    checked = _lowrank.check_state(state, "LowRankLaplaceState", rank)
    with torch.no_grad(), CatchAuxError():
        if group is None:
            blocks, _, aux = batch_ggn_root_blocks(state.params, batch, forward, outer_log_likelihood, backend=backend)
        else:
            compute = partial(batch_ggn_root, state.params, batch, forward, outer_log_likelihood, backend=backend)
            rows, aux = _gather_roots(group, compute, "laplace.lowrank_ggn.update", state.params, batch)
            blocks = [rows]
            del rows
        return _common.add_to_prec(state, checked, blocks, rank, aux, inplace, backend)


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
