"""Extended Kalman filter with a dense covariance and the empirical Fisher.

Each update treats the batch log-likelihood, tempered by ε = ``lr``, as a
Gaussian observation of the parameters linearised at the current mean μ:

$$ \\log p(θ | y) ≈ \\log p(θ) + ε\\, g(μ)ᵀ(θ - μ) - \\tfrac12 ε\\, (θ - μ)ᵀ F(μ) (θ - μ), $$

with g the mean per-sample gradient and F = JᵀJ / N the empirical Fisher of
the N per-sample log-likelihoods (J their (N, P) Jacobian). The predict and
update steps are

$$ Σ_p = Σ + Q, \\qquad Σ_{new} = \\big(Σ_p^{-1} + ε F\\big)^{-1}, \\qquad
μ_{new} = μ + ε\\, Σ_{new}\\, g. $$

Ollivier (2019), "The extended Kalman filter is a natural gradient descent in
trajectory space", https://arxiv.org/abs/1703.00209, relates this filter to
online natural gradient descent. Unlike posteriors 0.0.5, which subtracts ε F,
the precision grows with data. One per-sample Jacobian J gives both g and F;
when N < P the covariance is updated in Woodbury form,
Σ_new = Σ_p − Wᵀ W with W = L⁻¹ J Σ_p and L Lᵀ = (N/ε) I + J Σ_p Jᵀ, in O(N·P²)
and without a P×P inverse (:mod:`posteriors_fast.ops.lowrank_update`).
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree.integrations.torch import tree_ravel
from torch.func import grad_and_value  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.cholesky import robust_cholesky
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.memo import TensorMemo
from posteriors_fast._internal.sampling import unravel_draws
from posteriors_fast._internal.state import rebind_, rebind_tree_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import _sharded as sharding
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.lowrank_update import lowrank_update
from posteriors_fast.ops.separable_jacobian import log_density_jacobian
from posteriors_fast.tree_utils import tree_insert_, tree_size  # noqa: F401  (posteriors 0.0.5 exposes them here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import empirical_fisher, is_scalar, per_samplify  # noqa: F401  (as above)


def build(
    log_likelihood: LogProbFn,
    lr: float,
    transition_cov: torch.Tensor | float = 0.0,
    per_sample: bool = False,
    init_cov: torch.Tensor | float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the hyperparameters of the dense-Fisher EKF into a ``Transform``.

    Args:
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``. With
            ``per_sample=False`` the value is one scalar for the batch and is
            evaluated one sample at a time; with ``per_sample=True`` it is a
            tensor of shape (N,), one log-likelihood per sample.
        lr: Inverse temperature ε of the likelihood (acts as a learning rate);
            finite and positive.
        transition_cov: Transition noise Q added to the covariance before each
            update: a scalar c (meaning c·I, c >= 0) or a (P, P) positive
            semi-definite tensor.
        per_sample: See ``log_likelihood``.
        init_cov: Initial covariance: a scalar c > 0 (c·I) or a (P, P) positive
            definite tensor.
        backend: ``"eager"``, ``"compiled"`` or None for the current default;
            resolved now, once.
        process_group: None (one process), a ``torch.distributed``
            process group or ``posteriors_fast.distributed.data_parallel(...)``
            (each rank passes its shard of the batch; every rank gets the
            state of one process on the whole batch: one all-gather of the
            N·(P+1) Jacobian rows and values per step), or
            ``posteriors_fast.distributed.sharded(...)`` (the covariance split
            by rows across ranks; about 2·N·P + N² values per step, see
            :mod:`posteriors_fast.distributed`).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    _checks.positive_finite(lr, "lr")
    # Scalar covariances are checked now; matrices need P, known at init/update.
    for value, name, allow_zero in ((transition_cov, "transition_cov", True), (init_cov, "init_cov", False)):
        if _checks.is_number(value):
            _checks.covariance(value, 1, None, name, allow_zero=allow_zero)
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.dense_fisher", ("data", "sharded"))
    init_fn = partial(init, init_cov=init_cov, process_group=group)
    update_fn = partial(
        update,
        log_likelihood=log_likelihood,
        lr=lr,
        transition_cov=transition_cov,
        per_sample=per_sample,
        backend=backend,
        process_group=group,
    )
    return Transform(init_fn, update_fn)


class EKFDenseState(NamedTuple):
    """Gaussian N(params, cov) over the parameters.

    Attributes:
        params: Mean μ, a pytree of tensors.
        cov: (P, P) covariance Σ in the raveled parameter order
            (``optree.integrations.torch.tree_ravel``); with a sharded
            process group, this rank's rows of it as a
            ``posteriors_fast.distributed.ShardedMatrix``.
        log_likelihood: Mean per-sample log-likelihood of the last batch.
        aux: Auxiliary output of the last ``log_likelihood`` call (stacked
            over samples when ``per_sample=False``).
    """

    params: TensorTree
    cov: torch.Tensor
    log_likelihood: torch.Tensor = torch.tensor([])
    aux: Any = None


def init(
    params: TensorTree,
    init_cov: torch.Tensor | float = 1.0,
    process_group=None,
) -> EKFDenseState:
    """Initial state: mean ``params`` and covariance ``init_cov``.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference, so
            in-place updates write into them).
        init_cov: A scalar c > 0 meaning c·I, or a (P, P) symmetric positive
            definite tensor (copied).
        process_group: As in ``build``; every rank's params must agree
            (checked). Sharded: this rank's rows of ``init_cov``.

    Returns:
        ``EKFDenseState`` with the covariance and log-likelihood on the
        parameters' device and dtype.
    """
    group = resolve_group(process_group, "ekf.dense_fisher.init", ("data", "sharded"))
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    flat = tree_ravel(params)[0]
    size = flat.numel()
    if group is not None:
        group.check_params(params, "ekf.dense_fisher.init")
        if group.sharded:
            cov = sharding.shard(init_cov, group, flat, "init_cov", allow_zero=False)
            return EKFDenseState(params, cov, torch.tensor([], dtype=flat.dtype, device=flat.device))
    cov = _checks.covariance(init_cov, size, flat, "init_cov", allow_zero=False)
    if isinstance(cov, float):
        cov = torch.eye(size, dtype=flat.dtype, device=flat.device).mul_(cov)
    else:
        cov = cov.clone()
    empty = torch.tensor([], dtype=flat.dtype, device=flat.device)
    return EKFDenseState(params, cov, empty)


def update(
    state: EKFDenseState,
    batch: Any,
    log_likelihood: LogProbFn,
    lr: float,
    transition_cov: torch.Tensor | float = 0.0,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> EKFDenseState:
    """One EKF step on ``batch`` (the maths are in the module docstring).

    Args:
        state: Current ``EKFDenseState``.
        batch: Data passed to ``log_likelihood``; its tensor leaves share their
            leading (sample) dimension N.
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``.
        lr: Inverse temperature ε, finite and positive.
        transition_cov: Q, a scalar c >= 0 (c·I) or a (P, P) PSD tensor.
        per_sample: Whether ``log_likelihood`` already returns one value per sample.
        inplace: Write the new mean, covariance and log-likelihood into the
            tensors of ``state`` (their version counters advance). Nothing is
            written unless the whole step succeeds.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard of
            the global batch, N and the means are over the global batch, and
            ``aux`` is this rank's.

    Returns:
        The updated ``EKFDenseState``.

    Raises:
        ValueError: bad hyperparameters, batch or output shape, or NaN/inf in
            the parameters, the log-likelihood, its gradient or the result
            (the message names which).
        CholeskyError: a matrix that must be positive definite is not.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.dense_fisher.update", ("data", "sharded"))
    lr = _checks.positive_finite(lr, "lr")
    flat, unravel = _check_state(state, group)
    transition = _checks.covariance(transition_cov, flat.numel(), flat, "transition_cov", allow_zero=True)
    with torch.no_grad(), CatchAuxError():
        compute = partial(
            log_density_jacobian,
            log_likelihood,
            state.params,
            batch,
            per_sample=per_sample,
            what="log_likelihood",
            backend=backend,
        )
        if group is None:
            jac, values, aux = compute()
        else:
            settings = (lr, per_sample, transition if isinstance(transition, float) else tuple(transition.shape))
            jac, values, aux = group.gather_jacobian(
                compute, what="ekf.dense_fisher.update", params=state.params, batch=batch, extra=settings
            )
        mean_log_lik = values.mean()
        if group is not None and group.sharded:
            cov = state.cov
            plan = sharding.woodbury(cov, transition, jac.to(flat.dtype), lr / jac.shape[0])
        else:
            cov = state.cov if state.cov.dtype == flat.dtype else state.cov.to(flat.dtype)
            plan = lowrank_update(cov, transition, jac.to(flat.dtype), lr / jac.shape[0], backend=backend)
        new_flat = torch.add(flat, plan.mean_step, alpha=lr)
    # Nothing below can fail: the state is only written from here on.
    with torch.no_grad():
        new_cov = plan.write(state.cov if inplace and cov is state.cov else None)
    new_params = unravel(new_flat)
    if not inplace:
        return EKFDenseState(new_params, new_cov, mean_log_lik, aux)
    rebind_tree_(state.params, new_params)
    if new_cov is not state.cov:
        rebind_(state.cov, new_cov)
    return write_field(state, "log_likelihood", mean_log_lik, aux=aux)


def sample(state: EKFDenseState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(state.params, state.cov).

    The Cholesky factor of the covariance is computed once per covariance (an
    update, in place or not, invalidates it) and all draws come from one
    matrix product; for the same seed the draws equal posteriors 0.0.5's.

    With a sharded covariance every rank must call ``sample`` (the factor is
    computed across the ranks once per covariance, never gathered) and every
    rank gets the same draws (see :mod:`posteriors_fast.distributed`).

    Args:
        state: State with mean and covariance.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves of shape ``sample_shape + leaf.shape``.
    """
    flat, unravel = _check_state(state)
    shape = torch.Size(sample_shape)
    if isinstance(state.cov, sharding.ShardedMatrix):
        return unravel_draws(sharding.sample_covariance(flat, state.cov, shape.numel()), unravel, shape)
    chol = _factor(state.cov)
    noise = torch.empty(shape + flat.shape, dtype=flat.dtype, device=flat.device).normal_()
    draws = torch.addmm(flat, noise.reshape(-1, flat.numel()), chol.to(flat.dtype).mT)
    return unravel_draws(draws, unravel, shape)


def _check_state(state: EKFDenseState, group=None):
    """``(flat params, unravel)`` after checking the state's fields (and that
    a sharded covariance goes with a sharded group, a dense one with none or
    a data-parallel one)."""
    if not all(hasattr(state, field) for field in ("params", "cov", "_replace")):
        raise TypeError(
            "state must be an EKFDenseState (a NamedTuple with params, cov, "
            f"log_likelihood and aux), got {type(state).__name__}"
        )
    _checks.float_params(state.params, "state.params")
    flat, unravel = tree_ravel(state.params)
    size = flat.numel()
    if sharding.check_layout(state.cov, size, group, "state.cov"):
        return flat, unravel
    if not isinstance(state.cov, torch.Tensor) or state.cov.shape != (size, size):
        shape = tuple(state.cov.shape) if isinstance(state.cov, torch.Tensor) else type(state.cov).__name__
        raise ValueError(f"state.cov must be ({size}, {size}) for the {size} parameters of state.params, got {shape}")
    return flat, unravel


# Lower Cholesky factors of covariances already sampled from, keyed on the
# covariance tensor and its version: any update invalidates the entry.
_factors = TensorMemo()


def _factor(cov: torch.Tensor) -> torch.Tensor:
    chol = _factors.get(cov)
    if chol is None:
        chol = robust_cholesky(cov, "state.cov", "The covariance must be positive definite to sample from it.")
        _factors.put(cov, chol)
    return chol
