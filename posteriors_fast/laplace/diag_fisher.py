"""Laplace approximation with a diagonal empirical-Fisher precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, diag(λ)⁻¹) with λ the prior diagonal precision plus the diagonal of the
empirical Fisher, accumulated batch by batch:

$$ λ ← λ + \\sum_{i ∈ \\text{batch}} g_i ⊙ g_i, \\qquad g_i = ∇_θ \\log p(y_i, θ | x_i), $$

the column sums of J² for J the (N, P) per-sample Jacobian of the log
posterior; no P×P matrix is formed. When J would exceed the Jacobian memory budget (``POSTERIORS_FAST_JACOBIAN_MB``,
docs/environment.md) it is built a block of samples at a time and only its
column sums are kept. The empirical Fisher: Martens (2020),
https://jmlr.org/papers/volume21/17-678/17-678.pdf; Laplace approximations
in deep learning: Daxberger et al. (2021), https://arxiv.org/abs/2106.14806.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from torch.func import jacrev  # noqa: F401  (as above)

from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.jacobian_chunks import LogDensityChunks, fisher_sums
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _diag
from posteriors_fast.tree_utils import flexi_tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import diag_normal_sample, is_scalar, per_samplify  # noqa: F401  (as above)


def build(
    log_posterior: LogProbFn,
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
        per_sample: See ``log_posterior``.
        init_prec_diag: Prior diagonal precision: a scalar >= 0 or a
            non-negative tree like the parameters.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch (one all-reduce of Σ g_i ⊙ g_i,
            P values, per step).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.diag_fisher")
    return Transform(
        partial(init, init_prec_diag=init_prec_diag, process_group=group),
        partial(update, log_posterior=log_posterior, per_sample=per_sample, backend=backend, process_group=group),
    )


class DiagLaplaceState(NamedTuple):
    """Gaussian N(params, diag(prec_diag)⁻¹).

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec_diag: Diagonal precision λ, a pytree like ``params``.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    prec_diag: TensorTree
    aux: Any = None


def init(params: TensorTree, init_prec_diag: TensorTree | float = 0.0, process_group=None) -> DiagLaplaceState:
    """Initial state: mean ``params`` and diagonal precision ``init_prec_diag``.

    Args:
        params: Pytree of finite floating-point tensors (the mode; kept by reference).
        init_prec_diag: A scalar >= 0 for every entry, or a non-negative tree
            like ``params`` (copied).
        process_group: As in ``build``; every rank's params must agree (checked).

    Returns:
        ``DiagLaplaceState`` with ``aux=None``.
    """
    group = resolve_group(process_group, "laplace.diag_fisher.init")
    return DiagLaplaceState(params, _diag.initial_prec_diag(params, init_prec_diag, group))


def update(
    state: DiagLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> DiagLaplaceState:
    """Add ``Σ_i g_i ⊙ g_i`` of this batch to the diagonal precision.

    Args:
        state: Current ``DiagLaplaceState``.
        batch: Data for ``log_posterior``; its tensor leaves share their
            leading (sample) dimension N.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        per_sample: Whether ``log_posterior`` returns one value per sample.
        inplace: Write into the tensors of ``state.prec_diag`` (versions
            advance); nothing is written unless the gradients are finite.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``DiagLaplaceState``.

    Raises:
        ValueError: a bad batch or output shape, NaN/inf in the parameters
            or the gradients of ``log_posterior``, or a ``state.prec_diag``
            whose structure or leaf shapes differ from ``state.params``.
        TypeError: a ``state.prec_diag`` leaf that is not a tensor.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.diag_fisher.update")
    with torch.no_grad(), CatchAuxError():
        chunks = LogDensityChunks(
            log_posterior,
            state.params,
            batch,
            per_sample=per_sample,
            what="log_posterior",
            backend=backend,
            values_must_be_finite=False,
        )
        if group is None:
            term, _, _, aux = fisher_sums(chunks, with_grad=False)
        else:
            (term,), _, aux = group.reduce_sums(
                partial(fisher_sums, chunks, with_grad=False),
                lambda r: (r[0],),
                what="laplace.diag_fisher.update",
                params=state.params,
                batch=batch,
                shapes=("P",),
                extra=per_sample,
                count=lambda r: r[2].shape[0],
            )
    return _diag.add_to_prec(state, term, aux, inplace)


def sample(state: DiagLaplaceState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, diag(prec_diag)⁻¹).

    Args:
        state: State with mean and diagonal precision (positive).
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return _diag.sample(state, sample_shape)
