"""Stochastic gradient Nosé-Hoover thermostat (Ding et al., 2014,
https://proceedings.neurips.cc/paper/2014/hash/21fe5b8ba755eeaece7a450849876228-Abstract.html):
SGHMC whose friction ξ adapts so the momenta keep temperature T:

$$ θ_{t+1} = θ_t + ε σ^{-2} m_t, $$
$$ m_{t+1} = m_t + ε ∇\\log p(θ_t | \\text{batch}) - ε σ^{-2} ξ_t m_t
+ \\sqrt{T ε (2α - T ε β)}\\, η_t, $$
$$ ξ_{t+1} = ξ_t + ε \\big(σ^{-2}\\, \\overline{m_t^2} - T\\big). $$
"""

import math
from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_flatten, tree_map, tree_unflatten  # noqa: F401  (tree_map: posteriors 0.0.5 exposes it here)
from optree.integrations.torch import tree_ravel
from torch.func import grad_and_value  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.state import copy_leaves_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.normal import normal
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
    xi: float = None,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the SGNHT hyperparameters into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: Step size ε > 0.
        alpha: Friction α >= 0 of the injected noise (and the default initial ξ).
        beta: Gradient-noise estimate β >= 0.
        sigma: Standard deviation σ > 0 of the momenta.
        temperature: T >= 0.
        momenta: Initial momenta: None (standard normal), a scalar or a tree.
        xi: Initial thermostat ξ; ``None`` (or 0, as in posteriors 0.0.5) means α.
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
    group = resolve_group(process_group, "sgmcmc.sgnht", _MODES)
    _step.hmc_settings(lr, alpha, beta, sigma, temperature)
    return Transform(
        partial(init, momenta=momenta, xi=xi or alpha, process_group=group),
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


class SGNHTState(NamedTuple):
    """State of an SGNHT chain.

    Attributes:
        params: Current position.
        momenta: Current momenta, a tree like ``params``.
        xi: Thermostat (adaptive friction), a 0-d tensor.
        log_posterior: Log posterior of the last batch.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    momenta: TensorTree
    xi: torch.tensor = torch.tensor([])
    log_posterior: torch.tensor = torch.tensor([])
    aux: Any = None


def init(
    params: TensorTree,
    momenta: TensorTree | float | None = None,
    xi: float | torch.Tensor = 0.01,
    process_group=None,
) -> SGNHTState:
    """Initial state at ``params`` with ``momenta`` and thermostat ``xi``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference).
        momenta: None (standard normal draws), a scalar for every entry, or a
            tree like ``params`` (copied).
        xi: Initial thermostat, a finite number or one-element tensor (copied).
        process_group: As in ``build``; a data-parallel group's ranks must
            hold the same params (checked) and draw the same momenta.

    Returns:
        ``SGNHTState`` with its own (empty) log-posterior tensor.
    """
    group = resolve_group(process_group, "sgmcmc.sgnht.init", _MODES)
    if not math.isfinite(_checks.scalar_value(xi, "xi")):
        raise ValueError(f"xi must be finite, got {xi!r}")
    xi = xi.detach().clone() if isinstance(xi, torch.Tensor) else torch.tensor(xi)
    _step.check_params(group, params, "sgmcmc.sgnht.init")
    with _step.noise(group, params, draws=momenta is None):
        return SGNHTState(params, initial_momenta(params, momenta), xi, torch.tensor([]))


def update(
    state: SGNHTState,
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
) -> SGNHTState:
    """One SGNHT step (see the module docstring).

    Args:
        state: Current ``SGNHTState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        lr: ε > 0. alpha: α >= 0. beta: β >= 0. sigma: σ > 0. temperature: T >= 0.
        inplace: Overwrite the state's tensors (only after every check passed).
        backend: ``"eager"`` (the reference's noise draws), ``"compiled"`` or
            None for the current default (an addition to posteriors 0.0.5).
        process_group: As in ``build``: ``batch`` is this rank's shard (data
            parallel) or this chain's batch (chains); ``aux`` is this rank's.

    Returns:
        The new ``SGNHTState``.
    """
    scale, prec = _step.hmc_settings(lr, alpha, beta, sigma, temperature)
    backend = resolve(backend)
    group = resolve_group(process_group, "sgmcmc.sgnht.update", _MODES)
    grads, spec, value, aux = _step.gradient(
        log_posterior, state.params, batch, backend, group, "sgmcmc.sgnht.update", (lr, alpha, beta, sigma, temperature)
    )
    params = tree_flatten(state.params)[0]
    momenta = tree_flatten(state.momenta)[0]
    with torch.no_grad(), _step.noise(group, params):
        xi = state.xi
        mean_square = tree_ravel(state.momenta)[0].square().mean()
        new_xi = xi + lr * (prec * mean_square - temperature)
        new_params = torch._foreach_add(params, momenta, alpha=lr * prec)
        new_momenta = torch._foreach_add(momenta, torch._foreach_mul(momenta, -lr * prec * xi))
        torch._foreach_add_(new_momenta, grads, alpha=lr)
        torch._foreach_add_(new_momenta, normal(momenta, backend=backend), alpha=scale)
    if not bool(torch.isfinite(new_xi).all()):
        raise ValueError("the thermostat xi became NaN or inf; the state was not changed")
    if not inplace:
        return SGNHTState(tree_unflatten(spec, new_params), tree_unflatten(spec, new_momenta), new_xi, value, aux)
    copy_leaves_(params + momenta, new_params + new_momenta)
    return write_field(write_field(state, "xi", new_xi), "log_posterior", value, aux=aux)
