"""Laplace approximation with a diagonal generalised Gauss-Newton precision
(see :func:`posteriors_fast.diag_ggn`; P×P is never formed)."""

from functools import partial
from typing import Any

import torch

from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.laplace._diag import DiagLaplaceState, add_to_prec, init, sample
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from posteriors_fast.laplace._ggn import batch_ggn_factors
from posteriors_fast.ops.ggn_diag import ggn_diag

__all__ = ["build", "DiagLaplaceState", "init", "update", "sample"]


def build(
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    init_prec_diag: TensorTree | float = 0.0,
    backend: str | None = None,
) -> Transform:
    """Bind the model into a ``Transform``.

    Args:
        forward: ``forward(params, batch) -> (z, aux)``.
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``.
        init_prec_diag: Prior diagonal precision: scalar >= 0 or a tree like params.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    return Transform(
        partial(init, init_prec_diag=init_prec_diag),
        partial(update, forward=forward, outer_log_likelihood=outer_log_likelihood, backend=backend),
    )


def update(
    state: DiagLaplaceState,
    batch: Any,
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    inplace: bool = False,
    backend: str | None = None,
) -> DiagLaplaceState:
    """Add the batch's diagonal GGN (loss ``-outer_log_likelihood``)."""
    backend = resolve(backend)
    with torch.no_grad(), CatchAuxError():
        jac, hess_jac, aux = batch_ggn_factors(
            state.params, batch, forward, outer_log_likelihood, backend=backend
        )
        term = ggn_diag(jac, hess_jac, backend=backend)
    return add_to_prec(state, term, aux, inplace)
