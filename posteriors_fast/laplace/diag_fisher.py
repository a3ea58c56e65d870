"""Laplace approximation with a diagonal empirical-Fisher precision: each batch
adds the column sums of J² (J the per-sample Jacobian of the log posterior)."""

from functools import partial
from typing import Any

import torch

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.laplace._diag import DiagLaplaceState, add_to_prec, init, sample
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast.ops.sample_jacobian import sample_jacobian
from posteriors_fast.types import LogProbFn, TensorTree, Transform

__all__ = ["build", "DiagLaplaceState", "init", "update", "sample"]


def build(
    log_posterior: LogProbFn,
    per_sample: bool = False,
    init_prec_diag: TensorTree | float = 0.0,
    backend: str | None = None,
) -> Transform:
    """Bind the hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        per_sample: Whether ``log_posterior`` returns per-sample values.
        init_prec_diag: Prior diagonal precision: scalar >= 0 or a tree like params.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    return Transform(
        partial(init, init_prec_diag=init_prec_diag),
        partial(update, log_posterior=log_posterior, per_sample=per_sample, backend=backend),
    )


def update(
    state: DiagLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
) -> DiagLaplaceState:
    """Add ``Σ_n J_n²`` (elementwise) of this batch to the diagonal precision;
    never forms a P×P matrix."""
    backend = resolve(backend)
    if not per_sample:
        _checks.batch_leading_dim(batch, "batch")
    with torch.no_grad(), CatchAuxError():
        if per_sample:
            jac, _, aux = output_jacobian(log_posterior, (state.params, batch), 0, has_aux=True)
        else:
            jac, _, aux = sample_jacobian(
                log_posterior, state.params, batch, has_aux=True, backend=backend
            )
        term = jac.square().sum(0)
    return add_to_prec(state, term, aux, inplace)
