"""Shared pieces of the SG-MCMC steps: hyperparameter validation and the
gradient evaluation with its checks.

The arithmetic runs as ``torch._foreach_*`` kernels over the lists of leaves
(one fused launch per operation for all leaves, instead of a Python loop of
per-leaf expressions). With ``backend="eager"`` noise is drawn leaf by leaf in
pytree order with ``torch.randn_like``, exactly as posteriors 0.0.5 draws it,
so seeded runs give the same chains; the compiled backend draws all leaves at
once from a faster generator (:mod:`posteriors_fast.ops.normal`): same
distribution, different numbers.
"""

import math
from typing import Any, List, Tuple

import torch
from optree import tree_flatten

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.ops.value_grad import value_grad


def number(value, name: str, *, positive: bool = False) -> float:
    """A finite hyperparameter, > 0 when ``positive`` else >= 0."""
    x = _checks.scalar_value(value, name)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {x}")
    return x


def noise_scale(temperature: float, lr: float, friction: float, beta: float, what: str) -> float:
    """sqrt(T·lr·(2·friction − T·lr·β)), the standard deviation of the injected noise."""
    variance = temperature * lr * (2 * friction - temperature * lr * beta)
    if variance < 0:
        raise ValueError(
            f"the noise variance temperature·lr·(2·{what} − temperature·lr·beta) is negative "
            f"({variance:.3g}): lower lr or beta"
        )
    return math.sqrt(variance)


def hmc_settings(lr, alpha, beta, sigma, temperature) -> Tuple[float, float]:
    """Validate the SGHMC/SGNHT hyperparameters; returns (noise scale, σ⁻²)."""
    lr = number(lr, "lr", positive=True)
    alpha = number(alpha, "alpha")
    beta = number(beta, "beta")
    sigma = number(sigma, "sigma", positive=True)
    temperature = number(temperature, "temperature")
    return noise_scale(temperature, lr, alpha, beta, "alpha"), sigma**-2


def gradient(log_posterior, params, batch, backend: str) -> Tuple[List[torch.Tensor], Any, torch.Tensor, Any]:
    """``(grad leaves, treespec, log posterior, aux)``, with the parameters,
    the value and the gradient checked for NaN and inf with one host sync
    (:mod:`posteriors_fast.ops.value_grad`)."""
    with CatchAuxError(), _checks.blame_batch(batch, "log_posterior"):
        grads, value, aux, witness = value_grad(log_posterior, params, batch, "log_posterior", backend=backend)
    leaves, spec = tree_flatten(grads)
    _checks.require_finite(
        [
            (params, "state.params hold a non-finite value (NaN or inf)", "leaf"),
            (value, "log_posterior returned NaN or inf for this batch"),
            (grads, "the gradient of log_posterior is NaN or inf for this batch", "leaf"),
        ],
        witness,
    )
    return leaves, spec, value, aux
