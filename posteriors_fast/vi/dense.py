"""Variational inference with a dense Gaussian q = N(μ, L Lᵀ), L lower triangular
and stored flat (``L_to_flat``), fitted by a torchopt optimizer on the Monte
Carlo negative ELBO (see :mod:`posteriors_fast.vi.diag` for the objective):
reparameterised gradients of a full-covariance Gaussian (Titsias and
Lázaro-Gredilla, 2014, "Doubly stochastic variational Bayes for non-conjugate
inference", https://proceedings.mlr.press/v32/titsias14.html), with the
"sticking the landing" estimator under ``stl`` (Roeder et al., 2017,
https://arxiv.org/abs/1703.09194).

L is used directly: draws are μ + L ε and log q(θ) = −½‖L⁻¹(θ − μ)‖² −
Σ log|L_ii| − (P/2) log 2π from one triangular solve; L Lᵀ is never formed
and never factored again.
"""

import math
from functools import partial
from typing import Any, Callable, NamedTuple, Tuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from optree.integrations.torch import tree_ravel
from torch.func import grad_and_value, vmap  # noqa: F401  (grad_and_value: posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal import optional
from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.sampling import unravel_draws
from posteriors_fast._internal.state import write_field
from posteriors_fast._internal.torchopt_step import step
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.tree_utils import tree_insert_, tree_size  # noqa: F401  (posteriors 0.0.5 exposes them here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import L_from_flat, L_to_flat, is_scalar
from posteriors_fast.vi import _settings
from posteriors_fast.vi._settings import check_settings

torchopt = optional.load("torchopt")  # posteriors 0.0.5 exposes the module here (None if absent)


neutral("vi.dense", "the step's cost is the user's log posterior and its gradient")


def build(
    log_posterior: Callable[[TensorTree, Any], float],
    optimizer: Any,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    init_L: torch.Tensor | float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        optimizer: A torchopt ``GradientTransformation``.
        temperature: T >= 0, the weight of the entropy term.
        n_samples: Monte Carlo samples per step (>= 1).
        stl: Use the sticking-the-landing gradient estimator.
        init_L: Initial Cholesky factor: a scalar c (c·I) or a (P, P) lower-triangular tensor.
        backend: Accepted for a uniform API: both backends run the same torch
            code (the step's cost is the user's log posterior and its gradient).
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)``: one
            fit, each rank passing its shard of the batch, the same draws
            from q on every rank and the ranks' gradients combined as a
            weighted mean (Σ n_r g_r / Σ n_r: exact for a per-datum mean log
            posterior; ``reduction="sum"`` adds the log-posterior terms; one
            all-reduce of the gradient per step); or
            ``posteriors_fast.distributed.chains(...)``: an independent fit per
            rank, draws from seed + rank.

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    check_settings(temperature, n_samples)
    group = resolve_group(process_group, "vi.dense", _settings.MODES)
    return Transform(
        partial(init, optimizer=optimizer, init_L=init_L, process_group=group),
        partial(
            update,
            log_posterior=log_posterior,
            optimizer=optimizer,
            temperature=temperature,
            n_samples=n_samples,
            stl=stl,
            process_group=group,
        ),
    )


class VIDenseState(NamedTuple):
    """State of dense Gaussian VI.

    Attributes:
        params: Mean μ.
        L_factor: Flat lower-triangular Cholesky factor of the covariance.
        opt_state: The torchopt optimizer state.
        nelbo: Negative ELBO estimate of the last batch.
        aux: Auxiliary output of the last ``log_posterior`` call.
    """

    params: TensorTree
    L_factor: torch.Tensor
    opt_state: Any
    nelbo: torch.tensor = torch.tensor([])
    aux: Any = None


def init(params: TensorTree, optimizer: Any, init_L: torch.Tensor | float = 1.0, process_group=None) -> VIDenseState:
    """Initial state: mean ``params``, factor ``init_L`` and
    ``optimizer.init([params, L_flat])``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference).
        optimizer: The torchopt optimizer of ``build``.
        init_L: A scalar c (c·I on the params' device and dtype) or a (P, P)
            lower-triangular tensor (its lower triangle is used).
        process_group: As in ``build``; a data-parallel group's ranks must hold
            the same params (checked).

    Returns:
        ``VIDenseState`` with ``L_factor`` the flat lower triangle
        (``L_to_flat``) and its own (empty) ``nelbo`` tensor.
    """
    optional.torchopt("posteriors_fast.vi")
    group = resolve_group(process_group, "vi.dense.init", _settings.MODES)
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None and group.mode != "chains":
        group.check_params(params, "vi.dense.init")
    flat = tree_ravel(params)[0]
    size = flat.numel()
    if is_scalar(init_L):
        L = torch.eye(size, dtype=flat.dtype, device=flat.device) * _checks.finite_value(init_L, "init_L")
    else:
        if not isinstance(init_L, torch.Tensor) or init_L.shape != (size, size):
            raise ValueError(f"init_L must be a scalar or a ({size}, {size}) lower-triangular tensor")
        L = init_L.detach().to(flat.dtype)
        if not bool(torch.isfinite(L).all()):
            raise ValueError("init_L holds a non-finite value (NaN or inf)")
    L_flat = L_to_flat(L)
    return VIDenseState(params, L_flat, optimizer.init([params, L_flat]), torch.tensor([]))


def update(
    state: VIDenseState,
    batch: Any,
    log_posterior: LogProbFn,
    optimizer: Any,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    inplace: bool = False,
    process_group=None,
) -> VIDenseState:
    """One optimizer step on the negative ELBO of ``batch``.

    Args:
        state: Current ``VIDenseState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        optimizer: The torchopt optimizer of ``init``.
        temperature: T >= 0, the weight of the entropy term.
        n_samples: Monte Carlo draws from q (>= 1).
        stl: Use the sticking-the-landing gradient estimator.
        inplace: Update the mean, the factor and the optimizer state in place;
            nothing changes unless the ELBO and its gradient are finite.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The new ``VIDenseState``, carrying the advanced optimizer state in
        both modes.

    Raises:
        ValueError: bad settings, or NaN/inf in the state, the value of
            ``log_posterior`` at the draws, or the gradient.
    """
    check_settings(temperature, n_samples)
    group = resolve_group(process_group, "vi.dense.update", _settings.MODES)
    temperature_here = _settings.local_temperature(group, temperature, batch)

    def objective(mean, L_flat):
        with _checks.blame_batch(batch, "log_posterior"):
            return nelbo(mean, L_flat, batch, log_posterior, temperature_here, n_samples, stl)

    with _settings.noise(group, state.params):
        (mean, L_flat), opt_state, value, aux = step(
            objective,
            (state.params, state.L_factor),
            (),
            state.opt_state,
            optimizer,
            inplace=inplace,
            what="the negative ELBO",
            names=("params", "L_factor"),
            value_label=_VALUE_LABEL,
            grad_label=_GRAD_LABEL,
            needed_by="posteriors_fast.vi",
            group=group,
            batch=batch,
            settings=(temperature, n_samples, stl),
        )
    if inplace:
        return write_field(state, "nelbo", value, opt_state=opt_state, aux=aux)
    return VIDenseState(mean, L_flat, opt_state, value, aux)


def nelbo(
    mean: dict,
    L_factor: torch.Tensor,
    batch: Any,
    log_posterior: LogProbFn,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
) -> Tuple[float, Any]:
    """Monte Carlo negative ELBO of q = N(mean, L Lᵀ),

    $$ \\text{nelbo} = -\\frac1S \\sum_{s=1}^S \\big(\\log p(θ_s) - T \\log q(θ_s)\\big),
    \\qquad θ_s = \\text{mean} + L ε_s, \\; ε_s \\sim N(0, I), $$

    with log q computed from L directly (one triangular solve, never L Lᵀ).

    Args:
        mean: Pytree of the variational mean.
        L_factor: Flat lower triangle of L (``L_to_flat`` order).
        batch: Data passed to ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        temperature: T, the weight of the entropy term.
        n_samples: S, reparameterised draws (one draw is evaluated without
            ``vmap``).
        stl: Sticking-the-landing estimator: hold the mean and L constant
            inside log q (posteriors 0.0.5 detaches only L: its
            ``mean_flat.detach()`` result is discarded).

    Returns:
        ``(nelbo, aux)``: the 0-d estimate and ``log_posterior``'s aux (stacked
        over draws when S > 1).
    """
    mean_flat, unravel = tree_ravel(mean)
    L = L_from_flat(L_factor)
    noise = torch.empty((n_samples, mean_flat.numel()), dtype=mean_flat.dtype, device=mean_flat.device).normal_()
    draws = mean_flat + noise @ L.mT
    loc, L_q = (mean_flat.detach(), L.detach()) if stl else (mean_flat, L)
    if n_samples == 1:
        log_p, aux = log_posterior(unravel(draws[0]), batch)
        log_q = _log_q(draws[:1], loc, L_q)[0]
    else:
        log_p, aux = vmap(log_posterior, (0, None), (0, 0))(vmap(unravel)(draws), batch)
        log_q = _log_q(draws, loc, L_q)
    return -(log_p - log_q * temperature).mean(), aux


def sample(state: VIDenseState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from q = N(params, L Lᵀ): ``mean + L ε`` with one matrix product.

    Args:
        state: State with mean and flat factor.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    flat, unravel = tree_ravel(state.params)
    L = L_from_flat(state.L_factor)
    shape = torch.Size(sample_shape)
    noise = torch.empty(shape + flat.shape, dtype=flat.dtype, device=flat.device).normal_()
    draws = flat + noise.reshape(-1, flat.numel()) @ L.mT
    return unravel_draws(draws, unravel, shape)


_VALUE_LABEL = "log_posterior returned NaN or inf at a draw from q (the negative ELBO is not finite)"
_GRAD_LABEL = "the gradient of the negative ELBO is NaN or inf (from log_posterior at a draw from q)"


def _log_q(x: torch.Tensor, loc: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """log N(x; loc, L Lᵀ) for rows of x, from L directly."""
    z = torch.linalg.solve_triangular(L, (x - loc).mT, upper=False)
    half_log_det = L.diagonal().abs().log().sum()
    return -0.5 * z.square().sum(0) - half_log_det - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
