"""Laplace approximation with a diagonal-plus-low-rank empirical-Fisher
precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, Λ⁻¹) with Λ = diag(d) + U Uᵀ, U of shape (P, r): the prior diagonal
precision plus the empirical Fisher of the data (see
:mod:`posteriors_fast.laplace.dense_fisher`), accumulated batch by batch
into this form. Each batch appends its per-sample gradients g_i (the rows of
the (N, P) Jacobian J of the log posterior) to the factor and truncates:

$$ A = [U,\\ Jᵀ], \\qquad U_{new} = A V_{:, 1..r}, \\qquad
d_{new} = d + \\mathrm{rowsum}(A^2) - \\mathrm{rowsum}(U_{new}^2), $$

with AᵀA = V Λ Vᵀ in decreasing order (:mod:`posteriors_fast.ops.lowrank_truncate`).

What is guaranteed: the diagonal of the precision is exact,
d + rowsum(U²) = init_prec_diag + Σ_i g_i² over every sample seen; after
each batch the low-rank part is the best rank-r approximation (Frobenius and
spectral norms) of the previous factor's U Uᵀ plus JᵀJ (earlier truncations
are not revisited); with r >= P nothing is dropped and Λ equals
``laplace.dense_fisher``'s precision (up to rounding). This is the
diagonal-plus-low-rank form of LoFi (Chang et al. 2023,
https://arxiv.org/abs/2305.19535) used for a Laplace approximation
(Daxberger et al. 2021, https://arxiv.org/abs/2106.14806). No P×P matrix is
formed.
"""

from functools import partial
from typing import Any

import torch

from posteriors_fast._internal import lowrank as _lowrank
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.jacobian_chunks import log_density_jacobian_rows
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _lowrank as _common
from posteriors_fast.laplace._lowrank import LowRankLaplaceState
from posteriors_fast.types import LogProbFn, TensorTree, Transform

__all__ = ["LowRankLaplaceState", "build", "init", "update", "sample"]


def build(
    log_posterior: LogProbFn,
    rank: int,
    per_sample: bool = False,
    init_prec_diag: TensorTree | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``: one
            scalar for the batch (``per_sample=False``; evaluated one sample at
            a time) or one value per sample, shape (N,) (``per_sample=True``).
        rank: r, the number of columns of the precision's low-rank factor; a
            positive integer.
        per_sample: See ``log_posterior``.
        init_prec_diag: Prior diagonal precision: a scalar >= 0 or a
            non-negative tree like the parameters.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank gets the state
            of one process on the whole batch (one all-gather of the N·(P+1)
            Jacobian rows and values per step, before the truncation).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    rank = _lowrank.check_rank(rank)
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.lowrank_fisher")
    return Transform(
        partial(init, rank=rank, init_prec_diag=init_prec_diag, process_group=group),
        partial(
            update,
            log_posterior=log_posterior,
            rank=rank,
            per_sample=per_sample,
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
    group = resolve_group(process_group, "laplace.lowrank_fisher.init")
    return _common.initial_state(params, rank, init_prec_diag, group, "laplace.lowrank_fisher.init")


def update(
    state: LowRankLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    rank: int,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> LowRankLaplaceState:
    """Add the batch's empirical Fisher JᵀJ to the precision and truncate.

    Args:
        state: Current ``LowRankLaplaceState``.
        batch: Data for ``log_posterior``; its tensor leaves share their
            leading (sample) dimension N.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        rank: Columns of the factor (must match ``state.prec_factor``).
        per_sample: Whether ``log_posterior`` returns one value per sample.
        inplace: Write into the tensors of ``state.prec_diag`` and
            ``state.prec_factor`` (versions advance); nothing is written
            unless the whole update succeeds.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``LowRankLaplaceState``.

    Raises:
        TypeError, ValueError: ``rank`` not a positive integer, a bad batch or
            output shape, or NaN/inf in the parameters or the gradients of
            ``log_posterior``.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.lowrank_fisher.update")
    rank = _lowrank.check_rank(rank)
    checked = _lowrank.check_state(state, "LowRankLaplaceState", rank)
    with torch.no_grad(), CatchAuxError():
        compute = partial(
            log_density_jacobian_rows,
            log_posterior,
            state.params,
            batch,
            per_sample=per_sample,
            what="log_posterior",
            backend=backend,
            values_must_be_finite=False,
        )
        if group is None:
            jac, _, aux = compute()
        else:
            what = "laplace.lowrank_fisher.update"
            jac, _, aux = group.gather_jacobian(
                compute, what=what, params=state.params, batch=batch, extra=(rank, per_sample)
            )
    return _common.add_to_prec(state, checked, [jac], rank, aux, inplace, backend)


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
