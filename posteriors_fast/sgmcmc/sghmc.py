"""Stochastic gradient Hamiltonian Monte Carlo (Chen et al., 2014,
https://arxiv.org/abs/1402.4102), with mass σ⁻² I and friction α:

$$ θ_{t+1} = θ_t + ε σ^{-2} m_t, $$
$$ m_{t+1} = m_t + ε ∇\\log p(θ_t | \\text{batch}) - ε σ^{-2} α m_t
+ \\sqrt{T ε (2α - T ε β)}\\, ξ_t. $$
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_flatten, tree_map, tree_unflatten  # noqa: F401  (tree_map: posteriors 0.0.5 exposes it here)
from torch.func import grad_and_value  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.state import copy_leaves_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.sghmc_step import sghmc_step
from posteriors_fast.sgmcmc import _step
from posteriors_fast.sgmcmc._momenta import initial_momenta
from posteriors_fast.tree_utils import flexi_tree_map, tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes them here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import is_scalar  # noqa: F401  (as above)


def build(
    log_posterior: LogProbFn,
    lr: float,
    alpha: float = 0.01,
    beta: float = 0.0,
    sigma: float = 1.0,
    temperature: float = 1.0,
    momenta: TensorTree | float | None = None,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the SGHMC hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: Step size ε > 0.
        alpha: Friction α >= 0.
        beta: Gradient-noise estimate β >= 0.
        sigma: Standard deviation σ > 0 of the momenta (mass σ⁻²).
        temperature: T >= 0.
        momenta: Initial momenta: None (standard normal), a scalar or a tree.
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
    group = resolve_group(process_group, "sgmcmc.sghmc", _MODES)
    _step.hmc_settings(lr, alpha, beta, sigma, temperature)
    return Transform(
        partial(init, momenta=momenta, process_group=group),
        partial(
            update,
            log_posterior=log_posterior,
            lr=lr,
            alpha=alpha,
            beta=beta,
            sigma=sigma,
            temperature=temperature,
            backend=backend,
            process_group=group,
        ),
    )


_MODES = ("data", "chains")


class SGHMCState(NamedTuple):
    """State of an SGHMC chain.

    Attributes:
        params: Current position.
        momenta: Current momenta, a tree like ``params``.
        log_posterior: Log posterior of the last batch.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    momenta: TensorTree
    log_posterior: torch.tensor = torch.tensor([])
    aux: Any = None


def init(params: TensorTree, momenta: TensorTree | float | None = None, process_group=None) -> SGHMCState:
    """Initial state at ``params`` with ``momenta``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference).
        momenta: None (standard normal draws), a scalar for every entry, or a
            tree like ``params`` (copied).
        process_group: As in ``build``; a data-parallel group's ranks must
            hold the same params (checked) and draw the same momenta.

    Returns:
        ``SGHMCState`` with its own (empty) log-posterior tensor.
    """
    group = resolve_group(process_group, "sgmcmc.sghmc.init", _MODES)
    _step.check_params(group, params, "sgmcmc.sghmc.init")
    with _step.noise(group, params, draws=momenta is None):
        return SGHMCState(params, initial_momenta(params, momenta), torch.tensor([]))


def update(
    state: SGHMCState,
    batch: Any,
    log_posterior: LogProbFn,
    lr: float,
    alpha: float = 0.01,
    beta: float = 0.0,
    sigma: float = 1.0,
    temperature: float = 1.0,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> SGHMCState:
    """One SGHMC step (see the module docstring).

    Args:
        state: Current ``SGHMCState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: ε > 0. alpha: α >= 0. beta: β >= 0. sigma: σ > 0. temperature: T >= 0.
        inplace: Overwrite the state's tensors (only after every check passed).
        backend: ``"eager"`` (the reference's noise draws), ``"compiled"`` or
            None for the current default (an addition to posteriors 0.0.5).
        process_group: As in ``build``: ``batch`` is this rank's shard (data
            parallel) or this chain's batch (chains); ``aux`` is this rank's.

    Returns:
        The new ``SGHMCState``.
    """
    scale, prec = _step.hmc_settings(lr, alpha, beta, sigma, temperature)
    backend = resolve(backend)
    group = resolve_group(process_group, "sgmcmc.sghmc.update", _MODES)
    grads, spec, value, aux = _step.gradient(
        log_posterior, state.params, batch, backend, group, "sgmcmc.sghmc.update", (lr, alpha, beta, sigma, temperature)
    )
    params = tree_flatten(state.params)[0]
    momenta = tree_flatten(state.momenta)[0]
    with _step.noise(group, params):
        new_params, new_momenta = sghmc_step(
            params, momenta, grads, lr * prec, 1.0 - lr * prec * alpha, lr, scale, backend=backend
        )
    if not inplace:
        return SGHMCState(tree_unflatten(spec, new_params), tree_unflatten(spec, new_momenta), value, aux)
    copy_leaves_(params + momenta, new_params + new_momenta)
    return write_field(state, "log_posterior", value, aux=aux)
