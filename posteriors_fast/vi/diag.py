"""Variational inference with a diagonal Gaussian q = N(μ, diag(σ²)), σ = exp(log_sd),
fitted by a torchopt optimizer on the Monte Carlo negative ELBO

$$ \\mathrm{nelbo}(μ, σ) = -\\mathbb{E}_{θ \\sim q}\\big[\\log p(θ | \\text{batch})
- T \\log q(θ)\\big], $$

with the reparameterisation θ = μ + σ ε and, with ``stl``, the "sticking the
landing" estimator (Roeder et al., 2017, https://arxiv.org/abs/1703.09194):
log q is evaluated with μ and σ held constant.
"""

from functools import partial
from typing import Any, Callable, NamedTuple, Tuple

import torch
from optree import tree_map
from torch.func import vmap

from posteriors_fast._internal import checks as _checks
from posteriors_fast.backends import resolve
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import diag_normal_log_prob, diag_normal_sample, is_scalar
from posteriors_fast.vi import _optimizer


def build(
    log_posterior: Callable[[TensorTree, Any], float],
    optimizer: Any,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    init_log_sds: TensorTree | float = 0.0,
    backend: str | None = None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        optimizer: A torchopt ``GradientTransformation`` (e.g. ``torchopt.adam(1e-2)``).
        temperature: T >= 0, the weight of the entropy term.
        n_samples: Monte Carlo samples per step (>= 1).
        stl: Use the sticking-the-landing gradient estimator.
        init_log_sds: Initial log standard deviations, a scalar or a tree like params.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    _optimizer.check_settings(temperature, n_samples)
    return Transform(
        partial(init, optimizer=optimizer, init_log_sds=init_log_sds),
        partial(
            update,
            log_posterior=log_posterior,
            optimizer=optimizer,
            temperature=temperature,
            n_samples=n_samples,
            stl=stl,
        ),
    )


class VIDiagState(NamedTuple):
    """State of diagonal Gaussian VI.

    Attributes:
        params: Mean μ.
        log_sd_diag: log σ, a tree like ``params``.
        opt_state: The torchopt optimizer state.
        nelbo: Negative ELBO estimate of the last batch.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    log_sd_diag: TensorTree
    opt_state: Any
    nelbo: torch.tensor = torch.tensor([])
    aux: Any = None


_SHARED_DEFAULT = VIDiagState._field_defaults["nelbo"]


def init(params: TensorTree, optimizer: Any, init_log_sds: TensorTree | float = 0.0) -> VIDiagState:
    """Initial state: mean ``params``, log standard deviations ``init_log_sds``
    (copied if a tree) and ``optimizer.init([params, log_sds])``."""
    _optimizer.require_torchopt()
    _checks.float_params(params, "params")
    if is_scalar(init_log_sds):
        value = _checks.scalar_value(init_log_sds, "init_log_sds")
        log_sds = tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    else:
        _checks.same_structure(init_log_sds, params, "init_log_sds", "params")
        log_sds = tree_map(lambda s: s.detach().clone().requires_grad_(s.requires_grad), init_log_sds)
    return VIDiagState(params, log_sds, optimizer.init([params, log_sds]), torch.tensor([]))


def update(
    state: VIDiagState,
    batch: Any,
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    inplace: bool = False,
) -> VIDiagState:
    """One optimizer step on the negative ELBO of ``batch``.

    With ``inplace=True`` the mean, log standard deviations and optimizer state
    are updated in place (and the returned state carries the advanced optimizer
    state); nothing changes if the ELBO or its gradient is not finite.
    """
    _optimizer.check_settings(temperature, n_samples)

    def objective(mean, log_sds):
        return nelbo(mean, tree_map(torch.exp, log_sds), batch, log_posterior, temperature, n_samples, stl)

    mean, log_sds, opt_state, value, aux = _optimizer.step(
        objective, state.params, state.log_sd_diag, state.opt_state, optimizer, inplace
    )
    if inplace:
        return _optimizer.write_back(state, _SHARED_DEFAULT, opt_state, value, aux)
    return VIDiagState(mean, log_sds, opt_state, value, aux)


def nelbo(
    mean: dict,
    sd_diag: dict,
    batch: Any,
    log_posterior: LogProbFn,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
) -> Tuple[float, Any]:
    """Monte Carlo negative ELBO of N(mean, diag(sd_diag²)) with ``n_samples``
    reparameterised draws; returns ``(nelbo, aux)``. A single draw is evaluated
    without ``vmap`` (many models do not support it)."""
    draws = diag_normal_sample(mean, sd_diag, sample_shape=(n_samples,))
    if stl:
        mean = tree_map(lambda x: x.detach(), mean)
        sd_diag = tree_map(lambda x: x.detach(), sd_diag)
    if n_samples == 1:
        single = tree_map(lambda x: x[0], draws)
        log_p, aux = log_posterior(single, batch)
        log_q = diag_normal_log_prob(single, mean, sd_diag)
    else:
        log_p, aux = vmap(log_posterior, (0, None), (0, 0))(draws, batch)
        log_q = vmap(diag_normal_log_prob, (0, None, None))(draws, mean, sd_diag)
    return -(log_p - log_q * temperature).mean(), aux


def sample(state: VIDiagState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from q = N(params, diag(exp(log_sd_diag)²))."""
    return diag_normal_sample(state.params, tree_map(torch.exp, state.log_sd_diag), sample_shape=sample_shape)
