"""Extended Kalman filter with a diagonal covariance and the diagonal of the
empirical Fisher.

Each update tempers the batch log-likelihood by ε = ``lr`` and linearises it at
the current mean μ (see :mod:`posteriors_fast.ekf.dense_fisher`), keeping only
the diagonal of the covariance:

$$ σ_p^2 = σ^2 + τ^2, \\qquad σ_{new}^{-2} = σ_p^{-2} + ε\\, \\overline{J^2},
\\qquad μ_{new} = μ + ε\\, σ_{new}^2\\, ḡ, $$

with τ = ``transition_sd``, J the (N, P) per-sample Jacobian of the
log-likelihoods, J² its elementwise square averaged over samples (the diagonal
of the empirical Fisher) and ḡ its row mean. One Jacobian (O(N·P) for
``per_sample=False``) gives both, and the update runs as fused elementwise work
on the raveled parameters. P×P is never formed. When
J would exceed the Jacobian memory budget (``POSTERIORS_FAST_JACOBIAN_MB``,
docs/environment.md) it is built a block of samples at a time and only its
column sums are kept.

The filter and its relation to online natural gradient descent: Ollivier
(2019), https://arxiv.org/abs/1703.00209.
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel
from torch.func import jacrev  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.jacobian_chunks import LogDensityChunks, fisher_sums
from posteriors_fast._internal.state import rebind_tree_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.tree_utils import flexi_tree_map, tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes them here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform
from posteriors_fast.utils import diag_normal_sample, is_scalar, per_samplify  # noqa: F401  (per_samplify: as above)


def build(
    log_likelihood: LogProbFn,
    lr: float,
    transition_sd: float = 0.0,
    per_sample: bool = False,
    init_sds: TensorTree | float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the hyperparameters of the diagonal-Fisher EKF into a ``Transform``.

    Args:
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``; a batch
            scalar with ``per_sample=False`` (evaluated one sample at a time), a
            vector of per-sample values with ``per_sample=True``.
        lr: Inverse temperature ε of the likelihood; finite and positive.
        transition_sd: Standard deviation τ >= 0 of the transition noise added
            before each update.
        per_sample: See ``log_likelihood``.
        init_sds: Initial standard deviations: a scalar > 0 or a tree like the
            parameters with positive entries.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank gets the state
            of one process on the whole batch (one all-reduce of Σ J², Σ J
            and Σ log-likelihoods, 2P + 1 values, per step).

    Returns:
        ``Transform(init, update)``.
    """
    _checks.positive_finite(lr, "lr")
    _non_negative(transition_sd, "transition_sd")
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.diag_fisher")
    init_fn = partial(init, init_sds=init_sds, process_group=group)
    update_fn = partial(
        update,
        log_likelihood=log_likelihood,
        lr=lr,
        transition_sd=transition_sd,
        per_sample=per_sample,
        backend=backend,
        process_group=group,
    )
    return Transform(init_fn, update_fn)


class EKFDiagState(NamedTuple):
    """Gaussian over the parameters with a diagonal covariance.

    Attributes:
        params: Mean, a pytree of tensors.
        sd_diag: Standard deviations, a pytree like ``params``.
        log_likelihood: Mean per-sample log-likelihood of the last batch.
        aux: Auxiliary output of the last ``log_likelihood`` call.
    """

    params: TensorTree
    sd_diag: TensorTree
    log_likelihood: torch.Tensor = torch.tensor([])
    aux: Any = None


def init(params: TensorTree, init_sds: TensorTree | float = 1.0, process_group=None) -> EKFDiagState:
    """Initial state: mean ``params`` and standard deviations ``init_sds``.

    Args:
        params: Pytree of floating-point tensors (kept by reference).
        init_sds: A scalar > 0 used for every parameter, or a tree like
            ``params`` of positive standard deviations (copied).
        process_group: As in ``build``; every rank's params must agree (checked).

    Returns:
        ``EKFDiagState``.
    """
    group = resolve_group(process_group, "ekf.diag_fisher.init")
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None:
        group.check_params(params, "ekf.diag_fisher.init")
    if is_scalar(init_sds):
        value = _checks.positive_finite(init_sds, "init_sds")
        sds = tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    else:
        _checks.same_structure(init_sds, params, "init_sds", "params")
        if not bool((tree_ravel(init_sds)[0] > 0).all()):
            raise ValueError("init_sds must be positive everywhere")
        sds = tree_map(lambda s, x: s.detach().to(x.dtype).clone().requires_grad_(x.requires_grad), init_sds, params)
    empty = torch.tensor([], dtype=tree_ravel(params)[0].dtype, device=tree_ravel(params)[0].device)
    return EKFDiagState(params, sds, empty)


def update(
    state: EKFDiagState,
    batch: Any,
    log_likelihood: LogProbFn,
    lr: float,
    transition_sd: float = 0.0,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> EKFDiagState:
    """One diagonal EKF step on ``batch`` (see the module docstring).

    Args:
        state: Current ``EKFDiagState``.
        batch: Data for ``log_likelihood``; with ``per_sample=False`` every tensor
            leaf shares its leading (sample) dimension.
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``.
        lr: Inverse temperature ε, finite and positive.
        transition_sd: τ >= 0.
        per_sample: Whether ``log_likelihood`` already returns per-sample values.
        inplace: Write the results into the tensors of ``state``; nothing is
            written unless the whole step succeeds.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; the
            means are over the global batch; ``aux`` is this rank's.

    Returns:
        The updated ``EKFDiagState``.

    Raises:
        ValueError: bad hyperparameters or batch, or a non-finite
            log-likelihood, gradient or result.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.diag_fisher.update")
    lr = _checks.positive_finite(lr, "lr")
    tau = _non_negative(transition_sd, "transition_sd")
    _checks.float_params(state.params, "state.params")
    _checks.same_structure(state.sd_diag, state.params, "state.sd_diag", "state.params")
    flat, unravel = tree_ravel(state.params)
    sd = tree_ravel(state.sd_diag)[0].detach()
    with torch.no_grad(), CatchAuxError():
        chunks = LogDensityChunks(
            log_likelihood, state.params, batch, per_sample=per_sample, what="log_likelihood", backend=backend
        )
        if group is None:
            square_sum, grad_sum, values, aux = fisher_sums(chunks)
            n = values.shape[0]
            fisher, grad, mean_log_lik = square_sum / n, grad_sum / n, values.mean()
        else:
            (fisher, grad, mean_log_lik), n, aux = group.reduce_sums(
                partial(fisher_sums, chunks),
                lambda r: (r[0], r[1], r[2].sum()),
                what="ekf.diag_fisher.update",
                params=state.params,
                batch=batch,
                shapes=("P", "P", ()),
                extra=(lr, tau, per_sample),
                count=lambda r: r[2].shape[0],
            )
            fisher, grad, mean_log_lik = fisher / n, grad / n, mean_log_lik / n
        precision = (sd.square() + tau**2).reciprocal_().add_(fisher, alpha=lr)
        new_var = precision.reciprocal_()
        new_flat = torch.addcmul(flat.detach(), new_var, grad, value=lr)
        new_sd = new_var.sqrt_()
        _checks.require_finite([(new_sd, "the updated standard deviations"), (new_flat, "the updated mean")])
    new_params, new_sds = unravel(new_flat), unravel(new_sd)
    if not inplace:
        return EKFDiagState(new_params, new_sds, mean_log_lik, aux)
    rebind_tree_(state.params, new_params)
    rebind_tree_(state.sd_diag, new_sds)
    return write_field(state, "log_likelihood", mean_log_lik, aux=aux)


def sample(state: EKFDiagState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(state.params, diag(state.sd_diag²)).

    Args:
        state: State with mean and standard deviations.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return diag_normal_sample(state.params, state.sd_diag, sample_shape=sample_shape)


def _non_negative(value, name: str) -> float:
    number = _checks.scalar_value(value, name)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{name} must be finite and >= 0, got {number}")
    return number
