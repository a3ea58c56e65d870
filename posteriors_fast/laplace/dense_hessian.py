"""Laplace approximation with a dense Hessian precision: each batch adds
``rescale · (−∇² log_posterior) + epsilon · I`` to the precision.

The Hessian is exact and dense (P forward-over-reverse products): use it for
small models, and ``epsilon`` to keep the precision positive definite away
from a mode."""

from functools import partial
from typing import Any

import torch
from optree.integrations.torch import tree_ravel
from torch.func import jacfwd, jacrev

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.laplace._dense import (
    DenseLaplaceState,
    add_to_prec,
    check_state,
    init,
    require_finite,
    sample,
)
from posteriors_fast.types import LogProbFn, Transform

__all__ = ["build", "DenseLaplaceState", "init", "update", "sample"]


def build(
    log_posterior: LogProbFn,
    init_prec: torch.Tensor | float = 0.0,
    epsilon: float = 0.0,
    rescale: float = 1.0,
    backend: str | None = None,
) -> Transform:
    """Bind the hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P) PSD tensor.
        epsilon: Added to the diagonal of each batch's term (>= 0).
        rescale: Factor on each batch's Hessian (e.g. dataset size / batch size).
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    _check(epsilon, rescale)
    return Transform(
        partial(init, init_prec=init_prec),
        partial(update, log_posterior=log_posterior, epsilon=epsilon, rescale=rescale, backend=backend),
    )


def _check(epsilon, rescale):
    eps = _checks.scalar_value(epsilon, "epsilon")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"epsilon must be finite and >= 0, got {eps}")
    scale = _checks.scalar_value(rescale, "rescale")
    if not 0 <= scale < float("inf"):
        raise ValueError(f"rescale must be finite and >= 0, got {scale}")
    return eps, scale


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    epsilon: float = 0.0,
    rescale: float = 1.0,
    inplace: bool = False,
    backend: str | None = None,
) -> DenseLaplaceState:
    """Add ``rescale · (−Hessian) + epsilon · I`` of this batch to the precision
    (the identity on the params' device and dtype)."""
    resolve(backend)
    eps, scale = _check(epsilon, rescale)
    check_state(state)
    flat, unravel = tree_ravel(state.params)

    def negative(p_flat):
        value, aux = log_posterior(unravel(p_flat), batch)
        return -value, aux

    with torch.no_grad(), CatchAuxError():
        hess, aux = jacfwd(jacrev(negative, has_aux=True), has_aux=True)(flat)
        term = torch.add(hess, hess.mT).mul_(0.5 * scale)  # exactly symmetric
        term.diagonal().add_(eps)
    require_finite(term, "the Hessian of this batch")
    return add_to_prec(state, term, aux, inplace)
