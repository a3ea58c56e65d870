"""Laplace approximation with a dense empirical-Fisher precision: each batch adds
``JᵀJ`` (J the per-sample Jacobian of the log posterior, unnormalised) to the
precision; samples come from N(params, prec⁻¹)."""

from functools import partial
from typing import Any

import torch

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.laplace._dense import DenseLaplaceState, check_state, init, require_finite, sample
from posteriors_fast.ops.new_matrix import new_matrix
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast.ops.sample_jacobian import sample_jacobian
from posteriors_fast.ops.syrk import syrk_
from posteriors_fast.types import LogProbFn, Transform

__all__ = ["build", "DenseLaplaceState", "init", "update", "sample"]


def build(
    log_posterior: LogProbFn,
    per_sample: bool = False,
    init_prec: torch.Tensor | float = 0.0,
    backend: str | None = None,
) -> Transform:
    """Bind the hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``, a batch
            scalar (``per_sample=False``) or per-sample values.
        per_sample: See ``log_posterior``.
        init_prec: Prior precision: a scalar c >= 0 (c·I) or a (P, P) PSD tensor.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    return Transform(
        partial(init, init_prec=init_prec),
        partial(update, log_posterior=log_posterior, per_sample=per_sample, backend=backend),
    )


def update(
    state: DenseLaplaceState,
    batch: Any,
    log_posterior: LogProbFn,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
) -> DenseLaplaceState:
    """Add the batch's empirical Fisher ``JᵀJ`` to the precision.

    One per-sample Jacobian (O(N·P) for ``per_sample=False``) and one symmetric
    rank-N product fused with the copy (or in place with ``inplace=True``).
    """
    backend = resolve(backend)
    check_state(state)
    if not per_sample:
        _checks.batch_leading_dim(batch, "batch")
    with torch.no_grad(), CatchAuxError():
        if per_sample:
            jac, _, aux = output_jacobian(log_posterior, (state.params, batch), 0, has_aux=True)
            witness = None
        else:
            # The witness sums the values too; only J's exact check decides.
            jac, _, aux, witness = sample_jacobian(
                log_posterior, state.params, batch, has_aux=True, witness=True, backend=backend
            )
        require_finite(jac, "the per-sample gradients of log_posterior", witness)
        jac = jac.to(state.prec.dtype)
        if inplace:
            syrk_(state.prec, jac, None, None, 1.0, 1.0, backend=backend)
            return state._replace(aux=aux)
        new = syrk_(new_matrix(state.prec.shape, state.prec, backend=backend), jac, None, state.prec, 1.0, 1.0, backend=backend)
    return DenseLaplaceState(state.params, new, aux)
