"""Laplace approximation with a dense generalised Gauss-Newton precision: each
batch adds ``J_fᵀ H J_f`` of the forward function and the negative outer
log-likelihood (see :func:`posteriors_fast.ggn`)."""

from functools import partial
from typing import Any

import torch

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
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from posteriors_fast.laplace._ggn import batch_ggn_factors
from posteriors_fast.ops.syrk import gram

__all__ = ["build", "DenseLaplaceState", "init", "update", "sample"]


def build(
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    init_prec: TensorTree | float = 0.0,
    backend: str | None = None,
) -> Transform:
    """Bind the model into a ``Transform``.

    Args:
        forward: ``forward(params, batch) -> (z, aux)``, the model output.
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``.
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P) PSD tensor.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    return Transform(
        partial(init, init_prec=init_prec),
        partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood, backend=backend),
    )


def update(
    state: DenseLaplaceState,
    batch: Any,
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    inplace: bool = False,
    backend: str | None = None,
) -> DenseLaplaceState:
    """Add the batch's GGN (with loss ``-outer_log_likelihood``) to the precision."""
    backend = resolve(backend)
    check_state(state)
    with torch.no_grad(), CatchAuxError():
        jac, hess_jac, aux = batch_ggn_factors(
            state.params, batch, forward, outer_log_likelihood, backend=backend
        )
        term = gram(jac, 1.0, hess_jac, backend=backend)
    require_finite(term, "the GGN of this batch")
    return add_to_prec(state, term, aux, inplace)
