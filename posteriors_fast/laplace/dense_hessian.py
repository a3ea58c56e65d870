"""Laplace approximation with a dense Hessian precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, Λ⁻¹) with Λ the prior precision plus the Hessian of the negative log
posterior, accumulated batch by batch:

$$ Λ ← Λ + s\\, \\big(-∇_θ^2 \\log p(θ | \\text{batch})\\big) + ε I, $$

with s = ``rescale`` (e.g. the number of batches when ``log_posterior`` is a
mean) and ε = ``epsilon``. The Hessian is exact and dense (P
forward-over-reverse products; use it for small models) and is not
guaranteed positive definite away from a mode: ε > 0 keeps Λ invertible.
The term is symmetrised exactly. The Laplace approximation in deep learning:
Daxberger et al. (2021), https://arxiv.org/abs/2106.14806.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from optree.integrations.torch import tree_ravel
from torch.func import jacfwd, jacrev

from posteriors_fast._internal import checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import _sharded as sharding
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _dense
from posteriors_fast.tree_utils import tree_size  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import is_scalar  # noqa: F401  (as above)

neutral("laplace.dense_hessian", "the cost is the user's P forward-over-reverse products (torch.func.jacfwd of jacrev)")


def build(
    log_posterior: LogProbFn,
    init_prec: torch.Tensor | float = 0.0,
    epsilon: float = 0.0,
    rescale: float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, a
            scalar for the batch.
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P)
            symmetric positive semi-definite tensor.
        epsilon: ε >= 0 added to the diagonal of each batch's term.
        rescale: s >= 0, the factor on each batch's Hessian.
        backend: Accepted for a uniform API: both backends run the same
            torch code here (``torch.func.jacfwd`` of ``jacrev``, whose cost is
            the model's own P forward-over-reverse products).
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)`` (each
            rank passes its shard of the batch; the ranks' Hessians are
            combined with one all-reduce of P×P values, weighted by their
            number of samples: exact for a ``log_posterior`` that is a
            per-datum mean; ``reduction="sum"`` adds them); or
            ``posteriors_fast.distributed.sharded(...)`` (the precision split
            by rows; each rank computes its Hessian rows block by block, each
            block reduced to its owner: P² values in all).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    resolve(backend)
    _settings(epsilon, rescale)
    group = resolve_group(process_group, "laplace.dense_hessian", _dense.MODES)
    return Transform(
        partial(init, init_prec=init_prec, process_group=group),
        partial(update, log_posterior=log_posterior, epsilon=epsilon, rescale=rescale, process_group=group),
    )


class DenseLaplaceState(NamedTuple):
    """Gaussian N(params, prec⁻¹) with a dense precision.

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec: (P, P) precision Λ in the raveled parameter order.
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
    group = resolve_group(process_group, "laplace.dense_hessian.init", _dense.MODES)
    return DenseLaplaceState(params, _dense.initial_prec(params, init_prec, group))


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    epsilon: float = 0.0,
    rescale: float = 1.0,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> DenseLaplaceState:
    """Add ``rescale · (−∇² log_posterior) + epsilon · I`` of this batch to the
    precision (the identity on the params' device and dtype).

    Args:
        state: Current ``DenseLaplaceState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        epsilon: ε >= 0 added to the diagonal of the term.
        rescale: s >= 0, the factor on the Hessian.
        inplace: Add into ``state.prec`` (its version counter advances);
            nothing is written unless the term is finite.
        backend: Validated; both backends run the same code (see ``build``).
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``DenseLaplaceState``.

    Raises:
        ValueError: bad ``epsilon``/``rescale``, or NaN/inf in the parameters,
            the value of ``log_posterior`` or its Hessian.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    resolve(backend)
    group = resolve_group(process_group, "laplace.dense_hessian.update", _dense.MODES)
    eps, scale = _settings(epsilon, rescale)
    _dense.check_state(state, group)
    flat, unravel = tree_ravel(state.params)

    def negative(p_flat):
        value, aux = log_posterior(unravel(p_flat), batch)
        return -value, aux

    def local_term():
        with torch.no_grad(), CatchAuxError(), checks.blame_batch(batch, "log_posterior"):
            hess, aux = jacfwd(jacrev(negative, has_aux=True), has_aux=True)(flat)
            term = torch.add(hess, hess.mT).mul_(0.5 * scale)  # exactly symmetric
        _require_finite(term, state.params, batch, log_posterior)
        return term, aux

    what, settings = "laplace.dense_hessian.update", (eps, scale)
    if group is None:
        term, aux = local_term()
    elif group.sharded:
        # Rows a:b of the Hessian: reverse mode over the gradient's entries a:b.
        def local_rows(a, b):
            def gradient_rows(p_flat):
                gradient, aux = jacrev(negative, has_aux=True)(p_flat)
                return gradient[a:b], aux

            with torch.no_grad(), CatchAuxError(), checks.blame_batch(batch, "log_posterior"):
                rows, aux = jacrev(gradient_rows, has_aux=True)(flat)
            rows = rows.mul_(scale)
            _require_finite(rows, state.params, batch, log_posterior)
            return rows, aux

        rows, aux = sharding.add_row_blocks(
            state.prec, local_rows, what=what, params=state.params, batch=batch, kind="scalar", extra=settings
        )
        rows.diagonal(state.prec.start).add_(eps)
        return state._replace(prec=sharding.add_rows(state.prec, rows, inplace, what), aux=aux)
    else:
        term, aux = group.reduce_term(
            local_term, what=what, params=state.params, batch=batch, kind="scalar", shape="PxP", extra=settings
        )
    term.diagonal().add_(eps)
    return _dense.add_to_prec(state, term, aux, inplace)


def _require_finite(term, params, batch, log_posterior) -> None:
    """Raise naming the culprit if ``term`` (a Hessian, or rows of it) holds
    NaN or inf: the parameters, the value of ``log_posterior`` or its Hessian."""
    if checks.all_finite([term]):
        return
    with torch.no_grad(), CatchAuxError():
        value = log_posterior(params, batch)[0]
    checks.require_finite(
        [
            (params, "state.params hold a non-finite value (NaN or inf)", "leaf"),
            (value, "log_posterior returned NaN or inf for this batch"),
            (term, "the Hessian of log_posterior is NaN or inf for this batch"),
        ]
    )


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


def _settings(epsilon, rescale):
    eps = checks.scalar_value(epsilon, "epsilon")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"epsilon must be finite and >= 0, got {eps}")
    scale = checks.scalar_value(rescale, "rescale")
    if not 0 <= scale < float("inf"):
        raise ValueError(f"rescale must be finite and >= 0, got {scale}")
    return eps, scale
