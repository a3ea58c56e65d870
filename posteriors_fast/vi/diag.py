"""Variational inference with a diagonal Gaussian q = N(μ, diag(σ²)), σ = exp(log_sd),
fitted by a torchopt optimizer on the Monte Carlo negative ELBO

$$ \\mathrm{nelbo}(μ, σ) = -\\mathbb{E}_{θ \\sim q}\\big[\\log p(θ | \\text{batch})
- T \\log q(θ)\\big], $$

which minimises KL(q ‖ p_T) for the tempered posterior p_T ∝ exp(log p / T)
(variational inference: Blei et al., 2017, https://arxiv.org/abs/1601.00670),
with the reparameterisation θ = μ + σ ε and, with ``stl``, the "sticking the
landing" estimator (Roeder et al., 2017, https://arxiv.org/abs/1703.09194):
log q is evaluated with μ and σ held constant.
"""

from functools import partial
from typing import Any, Callable, NamedTuple, Tuple

import torch
from optree import tree_map
from torch.func import grad_and_value, vmap  # noqa: F401  (grad_and_value: posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal import optional
from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.state import write_field
from posteriors_fast._internal.torchopt_step import step
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.tree_utils import tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import diag_normal_log_prob, diag_normal_sample, is_scalar
from posteriors_fast.vi import _settings
from posteriors_fast.vi._settings import check_settings

torchopt = optional.load("torchopt")  # posteriors 0.0.5 exposes the module here (None if absent)


neutral("vi.diag", "the step's cost is the user's log posterior and its gradient")


def build(
    log_posterior: Callable[[TensorTree, Any], float],
    optimizer: Any,
    temperature: float = 1.0,
    n_samples: int = 1,
    stl: bool = True,
    init_log_sds: TensorTree | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the settings into a ``Transform``.

    Args:
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        optimizer: A torchopt ``GradientTransformation`` (e.g. ``torchopt.adam(1e-2)``).
        temperature: T >= 0, the weight of the entropy term.
        n_samples: Monte Carlo samples per step (>= 1).
        stl: Use the sticking-the-landing gradient estimator.
        init_log_sds: Initial log standard deviations, a scalar or a tree like params.
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
    group = resolve_group(process_group, "vi.diag", _settings.MODES)
    return Transform(
        partial(init, optimizer=optimizer, init_log_sds=init_log_sds, process_group=group),
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


def init(params: TensorTree, optimizer: Any, init_log_sds: TensorTree | float = 0.0, process_group=None) -> VIDiagState:
    """Initial state: mean ``params``, log standard deviations ``init_log_sds``
    (copied if a tree) and ``optimizer.init([params, log_sds])``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference).
        optimizer: The torchopt optimizer of ``build``.
        init_log_sds: A scalar for every entry or a tree like ``params``.
        process_group: As in ``build``; a data-parallel group's ranks must hold
            the same params (checked).

    Returns:
        ``VIDiagState`` with its own (empty) ``nelbo`` tensor.
    """
    optional.torchopt("posteriors_fast.vi")
    group = resolve_group(process_group, "vi.diag.init", _settings.MODES)
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None and group.mode != "chains":
        group.check_params(params, "vi.diag.init")
    if is_scalar(init_log_sds):
        value = _checks.finite_value(init_log_sds, "init_log_sds")
        log_sds = tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    else:
        _checks.same_structure(init_log_sds, params, "init_log_sds", "params")
        _checks.finite_params(init_log_sds, "init_log_sds")
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
    process_group=None,
) -> VIDiagState:
    """One optimizer step on the negative ELBO of ``batch``.

    Args:
        state: Current ``VIDiagState``.
        batch: Data for ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        optimizer: The torchopt optimizer of ``init``.
        temperature: T >= 0, the weight of the entropy term.
        n_samples: Monte Carlo draws from q (>= 1).
        stl: Use the sticking-the-landing gradient estimator.
        inplace: Update the mean, log standard deviations and optimizer state
            in place; nothing changes unless the ELBO and its gradient are
            finite.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The new ``VIDiagState``, carrying the advanced optimizer state in
        both modes.

    Raises:
        ValueError: bad settings, or NaN/inf in the state, the value of
            ``log_posterior`` at the draws, or the gradient.
    """
    check_settings(temperature, n_samples)
    group = resolve_group(process_group, "vi.diag.update", _settings.MODES)
    temperature_here = _settings.local_temperature(group, temperature, batch)

    def objective(mean, log_sds):
        with _checks.blame_batch(batch, "log_posterior"):
            return nelbo(mean, tree_map(torch.exp, log_sds), batch, log_posterior, temperature_here, n_samples, stl)

    with _settings.noise(group, state.params):
        (mean, log_sds), opt_state, value, aux = step(
            objective,
            (state.params, state.log_sd_diag),
            (),
            state.opt_state,
            optimizer,
            inplace=inplace,
            what="the negative ELBO",
            names=("params", "log_sd_diag"),
            value_label=_VALUE_LABEL,
            grad_label=_GRAD_LABEL,
            needed_by="posteriors_fast.vi",
            group=group,
            batch=batch,
            settings=(temperature, n_samples, stl),
        )
    if inplace:
        return write_field(state, "nelbo", value, opt_state=opt_state, aux=aux)
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
    """Monte Carlo negative ELBO of q = N(mean, diag(sd_diag²)),

    $$ \\text{nelbo} = -\\frac1S \\sum_{s=1}^S \\big(\\log p(θ_s) - T \\log q(θ_s)\\big),
    \\qquad θ_s = \\text{mean} + \\text{sd\\_diag} \\odot ε_s. $$

    Args:
        mean: Pytree of the variational mean.
        sd_diag: Pytree like ``mean`` of standard deviations.
        batch: Data passed to ``log_posterior``.
        log_posterior: ``log_posterior(params, batch) -> (value, aux)``.
        temperature: T, the weight of the entropy term.
        n_samples: S, reparameterised draws; a single draw is evaluated
            without ``vmap`` (many models do not support it).
        stl: Sticking-the-landing estimator: hold the mean and standard
            deviations constant inside log q.

    Returns:
        ``(nelbo, aux)``: the 0-d estimate and ``log_posterior``'s aux (stacked
        over draws when S > 1).
    """
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
    """Draw from q = N(params, diag(exp(log_sd_diag)²)).

    Args:
        state: State with mean and log standard deviations.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return diag_normal_sample(state.params, tree_map(torch.exp, state.log_sd_diag), sample_shape=sample_shape)


_VALUE_LABEL = "log_posterior returned NaN or inf at a draw from q (the negative ELBO is not finite)"
_GRAD_LABEL = "the gradient of the negative ELBO is NaN or inf (from log_posterior at a draw from q)"
