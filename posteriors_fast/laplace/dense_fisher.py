"""Laplace approximation with a dense empirical-Fisher precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, Λ⁻¹) with Λ the prior precision plus the empirical Fisher of the data,
accumulated batch by batch:

$$ Λ ← Λ + \\sum_{i ∈ \\text{batch}} g_i g_iᵀ = Λ + JᵀJ, \\qquad
g_i = ∇_θ \\log p(y_i, θ | x_i), $$

with J the (N, P) per-sample Jacobian of the log posterior (unnormalised: a
sum over the batch, not a mean). The empirical Fisher is discussed by Martens
(2020), https://jmlr.org/papers/volume21/17-678/17-678.pdf, and its use in
Laplace approximations by Daxberger et al. (2021),
https://arxiv.org/abs/2106.14806.

One per-sample Jacobian (O(N·P) for ``per_sample=False``) and one symmetric
rank-N product fused with the copy (or in place with ``inplace=True``),
computed on the upper triangle only and mirrored, so Λ stays exactly symmetric.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from optree.integrations.torch import tree_ravel  # noqa: F401  (as above)

from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import _sharded as sharding
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _dense
from posteriors_fast.ops.new_matrix import new_matrix
from posteriors_fast.ops.separable_jacobian import log_density_jacobian
from posteriors_fast.ops.syrk import syrk_
from posteriors_fast.tree_utils import tree_size  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import empirical_fisher, is_scalar, per_samplify  # noqa: F401  (as above)


def build(
    log_posterior: LogProbFn,
    per_sample: bool = False,
    init_prec: torch.Tensor | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``: one
            scalar for the batch (``per_sample=False``; evaluated one sample at
            a time) or one value per sample, shape (N,) (``per_sample=True``).
        per_sample: See ``log_posterior``.
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P)
            symmetric positive semi-definite tensor.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)`` (each
            rank passes its shard of the batch; one all-gather of the N·P
            Jacobian rows per step, then every rank adds the same JᵀJ); or
            ``posteriors_fast.distributed.sharded(...)`` (the precision split
            by rows; each rank adds its rows of JᵀJ).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.dense_fisher", _dense.MODES)
    return Transform(
        partial(init, init_prec=init_prec, process_group=group),
        partial(update, log_posterior=log_posterior, per_sample=per_sample, backend=backend, process_group=group),
    )


class DenseLaplaceState(NamedTuple):
    """Gaussian N(params, prec⁻¹) with a dense precision.

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec: (P, P) precision Λ in the raveled parameter order
            (``optree.integrations.torch.tree_ravel``); with a sharded
            process group, this rank's rows as a ``ShardedMatrix``.
        aux: Auxiliary output of the last ``log_posterior`` call.
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
    group = resolve_group(process_group, "laplace.dense_fisher.init", _dense.MODES)
    return DenseLaplaceState(params, _dense.initial_prec(params, init_prec, group))


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> DenseLaplaceState:
    """Add the batch's empirical Fisher ``JᵀJ`` to the precision.

    Args:
        state: Current ``DenseLaplaceState``.
        batch: Data for ``log_posterior``; its tensor leaves share their
            leading (sample) dimension N.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        per_sample: Whether ``log_posterior`` returns one value per sample.
        inplace: Add into ``state.prec`` (its version counter advances);
            nothing is written unless the gradients are finite.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``DenseLaplaceState``.

    Raises:
        ValueError: a bad batch or output shape, or NaN/inf in the parameters
            or the gradients of ``log_posterior``.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.dense_fisher.update", _dense.MODES)
    _dense.check_state(state, group)
    with torch.no_grad(), CatchAuxError():
        # Only the gradients enter the precision: a NaN value alone is no error.
        compute = partial(
            log_density_jacobian,
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
            what = "laplace.dense_fisher.update"
            jac, _, aux = group.gather_jacobian(compute, what=what, params=state.params, batch=batch, extra=per_sample)
            if group.sharded:
                return state._replace(prec=sharding.add_product(state.prec, jac, jac, inplace, what), aux=aux)
        jac = jac.to(state.prec.dtype)
        if inplace:
            syrk_(state.prec, jac, None, None, 1.0, 1.0, backend=backend)
            return state._replace(aux=aux)
        new = new_matrix(state.prec.shape, state.prec, backend=backend)
        syrk_(new, jac, None, state.prec, 1.0, 1.0, backend=backend)
    return DenseLaplaceState(state.params, new, aux)


def sample(state: DenseLaplaceState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, prec⁻¹).

    The Cholesky factor Λ = L Lᵀ is computed once per precision (any update
    invalidates it) and all draws ``params + L⁻ᵀ ε`` come from one
    triangular solve.

    Args:
        state: State with mean and precision (positive definite).
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return _dense.sample(state, sample_shape)
