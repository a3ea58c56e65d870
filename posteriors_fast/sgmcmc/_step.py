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

import contextlib
import math
from typing import Any, List, Tuple

import torch
from optree import tree_flatten, tree_leaves

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


def gradient(
    log_posterior, params, batch, backend: str, group=None, what: str = "", settings: Any = ()
) -> Tuple[List[torch.Tensor], Any, torch.Tensor, Any]:
    """``(grad leaves, treespec, log posterior, aux)``, with the parameters,
    the value and the gradient checked for NaN and inf with one host sync
    (:mod:`posteriors_fast.ops.value_grad`). With a data-parallel ``group``
    (a ``posteriors_fast.distributed.Group``), the reduced gradient and value
    over every rank's shard of the batch (one all-reduce of P + 1 values;
    ``aux`` is this rank's), after every rank's checks passed."""
    if group is not None and group.mode != "chains":

        def local():
            leaves, _, value, aux = gradient(log_posterior, params, batch, backend)
            return leaves, value, aux

        grads, value, aux = group.reduce_gradient(local, what=what, params=params, batch=batch, extra=settings)
        leaves, spec = tree_flatten(grads)
        return leaves, spec, value, aux
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


def noise(group, params, draws: bool = True):
    """Context for one step's noise draws: as they are without a group (or
    when nothing is drawn); from the group's noise stream with one (the same
    on every rank of a data-parallel group, seed + rank for ``chains``)."""
    if group is None or not draws:
        return contextlib.nullcontext()
    leaves = tree_leaves(params)
    return group.noise(leaves[0].device if leaves else None)


def check_params(group, params, what: str) -> None:
    """At init: a data-parallel group's ranks hold the same parameters
    (independent chains may start anywhere)."""
    if group is not None and group.mode != "chains":
        group.check_params(params, what)
