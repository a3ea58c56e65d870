"""Stochastic gradient Langevin dynamics (Welling and Teh, 2011,
https://www.stats.ox.ac.uk/~teh/research/compstats/WelTeh2011a.pdf):

$$ θ_{t+1} = θ_t + ε ∇\\log p(θ_t | \\text{batch}) + \\sqrt{T ε (2 - T ε β)}\\, ξ_t,
\\qquad ξ_t \\sim N(0, I), $$

with ε = ``lr``, T = ``temperature`` and β an estimate of the gradient noise.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_flatten, tree_unflatten
from torch.func import grad_and_value  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.state import copy_leaves_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.normal import normal
from posteriors_fast.sgmcmc import _step
from posteriors_fast.tree_utils import flexi_tree_map, tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes them here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform


def build(
    log_posterior: LogProbFn,
    lr: float,
    beta: float = 0.0,
    temperature: float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the SGLD hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: Step size ε > 0.
        beta: Gradient-noise estimate β >= 0.
        temperature: T >= 0 (0 gives gradient ascent).
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)``: one
            chain, each rank passing its shard of the batch; the gradient and
            value are the ranks' weighted mean (Σ n_r g_r / Σ n_r, exact for a
            per-datum mean log posterior; ``reduction="sum"`` adds them; one
            all-reduce of P + 1 values per step) and the noise is the same on
            every rank, so the chain is bit-identical everywhere; or
            ``posteriors_fast.distributed.chains(...)``: an independent chain
            per rank on its own data, noise from seed + rank.

    Returns:
        ``Transform(init, update)``.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "sgmcmc.sgld", _MODES)
    _validate(lr, beta, temperature)
    return Transform(
        partial(init, process_group=group),
        partial(
            update,
            log_posterior=log_posterior,
            lr=lr,
            beta=beta,
            temperature=temperature,
            backend=backend,
            process_group=group,
        ),
    )


class SGLDState(NamedTuple):
    """State of an SGLD chain.

    Attributes:
        params: Current position.
        log_posterior: Log posterior of the last batch.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    log_posterior: torch.tensor = torch.tensor([])
    aux: Any = None


def init(params: TensorTree, process_group=None) -> SGLDState:
    """Initial state at ``params``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference).
        process_group: As in ``build``; a data-parallel group's ranks must
            hold the same params (checked).

    Returns:
        ``SGLDState`` with its own (empty) log-posterior tensor.
    """
    group = resolve_group(process_group, "sgmcmc.sgld.init", _MODES)
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    _step.check_params(group, params, "sgmcmc.sgld.init")
    return SGLDState(params, torch.tensor([]))


def update(
    state: SGLDState,
    batch: Any,
    log_posterior: LogProbFn,
    lr: float,
    beta: float = 0.0,
    temperature: float = 1.0,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> SGLDState:
    """One SGLD step (see the module docstring).

    Args:
        state: Current ``SGLDState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: Step size ε > 0.
        beta: Gradient-noise estimate β >= 0.
        temperature: T >= 0.
        inplace: Overwrite the state's tensors (only after every check passed).
        backend: ``"eager"`` (the reference's noise draws), ``"compiled"`` or
            None for the current default (an addition to posteriors 0.0.5).
        process_group: As in ``build``: ``batch`` is this rank's shard (data
            parallel) or this chain's batch (chains); ``aux`` is this rank's.

    Returns:
        The new ``SGLDState``.
    """
    scale = _validate(lr, beta, temperature)
    backend = resolve(backend)
    group = resolve_group(process_group, "sgmcmc.sgld.update", _MODES)
    grads, spec, value, aux = _step.gradient(
        log_posterior, state.params, batch, backend, group, "sgmcmc.sgld.update", (lr, beta, temperature)
    )
    params = tree_flatten(state.params)[0]
    with torch.no_grad(), _step.noise(group, params):
        new = torch._foreach_add(params, grads, alpha=lr)
        torch._foreach_add_(new, normal(params, backend=backend), alpha=scale)
    if not inplace:
        return SGLDState(tree_unflatten(spec, new), value, aux)
    copy_leaves_(params, new)
    return write_field(state, "log_posterior", value, aux=aux)


_MODES = ("data", "chains")


def _validate(lr, beta, temperature) -> float:
    """Check the hyperparameters; returns the noise scale."""
    lr = _step.number(lr, "lr", positive=True)
    beta = _step.number(beta, "beta")
    temperature = _step.number(temperature, "temperature")
    return _step.noise_scale(temperature, lr, 1.0, beta, "1")
