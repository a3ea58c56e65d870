"""Extended Kalman filter with a diagonal-plus-low-rank precision and the
empirical Fisher (LoFi's diagonal variant).

The filter of :mod:`posteriors_fast.ekf.dense_fisher` (ε = ``lr``, F = JᵀJ/N
the empirical Fisher of the N per-sample log-likelihoods, J their (N, P)
Jacobian, g the mean gradient) with the precision held as

$$ Σ^{-1} = Λ = \\mathrm{diag}(d) + U Uᵀ, \\qquad U ∈ ℝ^{P×r}. $$

Each update

1. predicts exactly at the same rank, Λ_p = (Λ⁻¹ + Q)⁻¹ = diag(d_p) + U_p U_pᵀ
   for a diagonal transition covariance Q (Woodbury twice; see
   :mod:`posteriors_fast.ops.lowrank_truncate`);
2. appends the scaled per-sample gradients, A = [U_p, √(ε/N) Jᵀ]
   (P × (r + N)), so that Λ_p + εF = diag(d_p) + A Aᵀ;
3. truncates A Aᵀ to its best rank-r approximation U_new U_newᵀ by an
   eigendecomposition of the (r + N)² Gram AᵀA, and adds the diagonal of the
   dropped part to d (:mod:`posteriors_fast.ops.lowrank_truncate`);
4. steps the mean with the new covariance by Woodbury,
   μ_new = μ + ε Σ_new g, Σ_new g = D⁻¹g − D⁻¹U K⁻¹UᵀD⁻¹g with the (r × r)
   capacitance K = I + UᵀD⁻¹U.

What is guaranteed:

* the diagonal of the precision is exact for the gradients the filter has
  seen: diag(Λ_new) = diag(Λ_p) + (ε/N) Σ_n J_n² (with Q = 0 this makes
  diag(Λ_t) = 1/init_cov + Σ_steps (ε/N) Σ_n J_n²);
* the low-rank part after each step is the best rank-r approximation (in the
  Frobenius and spectral norms) of U_p U_pᵀ + (ε/N) JᵀJ, the streamed
  factor plus the new batch (earlier truncations are not revisited);
* the predict step is exact; so with r >= P nothing is ever dropped and the
  filter equals ``ekf.dense_fisher`` (mean and covariance, up to rounding).

Chang, Durán-Martín, Shestopaloff, Jones and Murphy (2023), "Low-rank extended
Kalman filtering for online learning of neural networks from streaming data",
https://arxiv.org/abs/2305.19535. No P×P matrix is formed: memory is about
(N + 2r)·P values beyond the model's activations (the Jacobian, the state's
factor and the new one; the predicted factor is never stored). Measured by
``python -m benchmarks.scale`` (an MLP 1024-960-10, P = 9.9·10⁵, float32,
N = 64, r = 20), the peak resident memory an update adds, 483 MB, is that of
the per-sample Jacobian alone (486 MB).

Time (an MLP 1024-960-10, P = 9.9·10⁵, N = 64, r = 20, float32, two
threads, interleaved medians of 11): the update takes 456 ms with
``backend="compiled"`` and 579 ms with ``"eager"``, where its two unavoidable
parts take 206 ms (the per-sample Jacobian) and 115 ms (one Gram of the
(P, N + r) panel): 1.42x and 1.80x their sum. The difference is in
:mod:`posteriors_fast.ops.lowrank_truncate`: no panel copy, no (P, r) or
(N, P) temporaries, and under ``"compiled"`` one read of R for the new
factor, the fold and the Woodbury sums (a C++ kernel).
"""

import math
from functools import partial
from typing import Any, NamedTuple

import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal import lowrank as _lowrank
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.jacobian_chunks import log_density_jacobian_rows
from posteriors_fast._internal.state import rebind_, rebind_tree_, write_field
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.ops.lowrank_truncate import lowrank_truncate
from posteriors_fast.types import LogProbFn, TensorTree, Transform


def build(
    log_likelihood: LogProbFn,
    lr: float,
    rank: int,
    transition_cov: TensorTree | float = 0.0,
    per_sample: bool = False,
    init_cov: TensorTree | float = 1.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the hyperparameters of the low-rank EKF into a ``Transform``.

    Args:
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``; a
            batch scalar with ``per_sample=False`` (evaluated one sample at a
            time), one value per sample, shape (N,), with ``per_sample=True``.
        lr: Inverse temperature ε of the likelihood; finite and positive.
        rank: r, the number of columns of the precision's low-rank factor; a
            positive integer.
        transition_cov: Diagonal transition covariance Q added to the
            covariance before each update: a scalar c >= 0 (c·I) or a tree
            like the parameters of non-negative variances.
        per_sample: See ``log_likelihood``.
        init_cov: Initial (diagonal) covariance: a scalar c > 0 (c·I) or a
            tree like the parameters of positive variances.
        backend: ``"eager"``, ``"compiled"`` or None for the current default;
            resolved now, once.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank gets the state
            of one process on the whole batch (one all-gather of the N·(P+1)
            Jacobian rows and values per step, before the truncation).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    _checks.positive_finite(lr, "lr")
    rank = _lowrank.check_rank(rank)
    if _checks.is_number(transition_cov):
        _lowrank.diagonal_argument(transition_cov, None, "transition_cov", positive=False)
    if _checks.is_number(init_cov):
        _lowrank.diagonal_argument(init_cov, None, "init_cov", positive=True)
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.lowrank_fisher")
    init_fn = partial(init, rank=rank, init_cov=init_cov, process_group=group)
    update_fn = partial(
        update,
        log_likelihood=log_likelihood,
        lr=lr,
        rank=rank,
        transition_cov=transition_cov,
        per_sample=per_sample,
        backend=backend,
        process_group=group,
    )
    return Transform(init_fn, update_fn)


class EKFLowRankState(NamedTuple):
    """Gaussian N(params, (diag(d) + U Uᵀ)⁻¹) over the parameters.

    Attributes:
        params: Mean μ, a pytree of tensors.
        prec_diag: d, the diagonal part of the precision, a pytree like
            ``params``.
        prec_factor: U, the (P, rank) low-rank factor of the precision in the
            raveled parameter order (``optree.integrations.torch.tree_ravel``),
            so the precision is
            ``diag(tree_ravel(prec_diag)[0]) + prec_factor @ prec_factor.T``.
        log_likelihood: Mean per-sample log-likelihood of the last batch.
        aux: Auxiliary output of the last ``log_likelihood`` call.
    """

    params: TensorTree
    prec_diag: TensorTree
    prec_factor: torch.Tensor
    log_likelihood: torch.Tensor = torch.tensor([])
    aux: Any = None


def init(
    params: TensorTree,
    rank: int,
    init_cov: TensorTree | float = 1.0,
    process_group=None,
) -> EKFLowRankState:
    """Initial state: mean ``params``, precision diag(1/init_cov), factor zero.

    Args:
        params: Pytree of finite floating-point tensors (kept by reference, so
            in-place updates write into them).
        rank: Columns of the low-rank factor, a positive integer.
        init_cov: A scalar c > 0 (c·I) or a tree like ``params`` of positive
            variances.
        process_group: As in ``build``; every rank's params must agree (checked).

    Returns:
        ``EKFLowRankState`` on the parameters' device and dtype.
    """
    group = resolve_group(process_group, "ekf.lowrank_fisher.init")
    rank = _lowrank.check_rank(rank)
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None:
        group.check_params(params, "ekf.lowrank_fisher.init")
    flat, unravel = tree_ravel(params)
    cov = _lowrank.diagonal_argument(init_cov, params, "init_cov", positive=True)
    prec = torch.full_like(flat, 1.0 / cov) if isinstance(cov, float) else cov.reciprocal()
    factor = flat.new_zeros(flat.numel(), rank)
    empty = torch.tensor([], dtype=flat.dtype, device=flat.device)
    return EKFLowRankState(params, unravel(prec.detach()), factor, empty)


def update(
    state: EKFLowRankState,
    batch: Any,
    log_likelihood: LogProbFn,
    lr: float,
    rank: int,
    transition_cov: TensorTree | float = 0.0,
    per_sample: bool = False,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> EKFLowRankState:
    """One low-rank EKF step on ``batch`` (the maths are in the module docstring).

    Args:
        state: Current ``EKFLowRankState``.
        batch: Data passed to ``log_likelihood``; its tensor leaves share their
            leading (sample) dimension N.
        log_likelihood: ``log_likelihood(params, batch) -> (value, aux)``.
        lr: Inverse temperature ε, finite and positive.
        rank: Columns of the factor (must match ``state.prec_factor``).
        transition_cov: Q, a scalar c >= 0 (c·I) or a tree like the
            parameters of non-negative variances.
        per_sample: Whether ``log_likelihood`` already returns one value per sample.
        inplace: Write the new mean, precision and log-likelihood into the
            tensors of ``state`` (their version counters advance). Nothing is
            written unless the whole step succeeds.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard of the
            global batch, N and the means are over the global batch, and
            ``aux`` is this rank's.

    Returns:
        The updated ``EKFLowRankState``.

    Raises:
        TypeError, ValueError: bad hyperparameters (``rank`` not a positive
            integer, ...), batch or output shape, or NaN/inf in the
            parameters, the log-likelihood, its gradient or the result (the
            message names which).
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "ekf.lowrank_fisher.update")
    lr = _checks.positive_finite(lr, "lr")
    rank = _lowrank.check_rank(rank)
    flat, unravel, diag, factor = _lowrank.check_state(state, "EKFLowRankState", rank)
    transition = _lowrank.diagonal_argument(transition_cov, state.params, "transition_cov", positive=False)
    with torch.no_grad(), CatchAuxError():
        compute = partial(
            log_density_jacobian_rows,
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
            settings = (lr, rank, per_sample, transition if isinstance(transition, float) else "tree")
            jac, values, aux = group.gather_jacobian(
                compute, what="ekf.lowrank_fisher.update", params=state.params, batch=batch, extra=settings
            )
        jac = jac.to(flat.dtype)
        n = jac.shape[0]
        mean_log_lik = values.mean()
        # Jᵀ(1/N) as one GEMV: 24 ms where jac.mean(0) takes 36 ms (P = 10⁶, N = 64, float32, one thread).
        grad = torch.mv(jac.mT, jac.new_full((n,), 1.0 / n))
        new_diag, new_factor, step, witness = lowrank_truncate(
            diag, factor, jac, math.sqrt(lr / n), rank, grad, transition, backend=backend
        )
        new_flat = torch.add(flat.detach(), step, alpha=lr)
        _checks.require_finite(
            [
                (new_diag, "the updated precision diagonal"),
                (new_factor, "the updated precision factor"),
                (new_flat, "the updated mean"),
            ],
            witness + new_flat.sum(),
        )
    # Nothing below can fail: the state is only written from here on.
    new_params, new_prec_diag = unravel(new_flat), unravel(new_diag)
    if not inplace:
        return EKFLowRankState(new_params, new_prec_diag, new_factor, mean_log_lik, aux)
    rebind_tree_(state.params, new_params)
    rebind_tree_(state.prec_diag, new_prec_diag)
    rebind_(state.prec_factor, new_factor)
    return write_field(state, "log_likelihood", mean_log_lik, aux=aux)


def sample(state: EKFLowRankState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Exact draws from N(params, (diag(d) + U Uᵀ)⁻¹) without a P×P matrix
    (see :func:`posteriors_fast._internal.lowrank.sample`).

    Args:
        state: State with mean, precision diagonal (positive) and factor.
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves of shape ``sample_shape + leaf.shape``.
    """
    flat, unravel, diag, factor = _lowrank.check_state(state, "EKFLowRankState")
    return _lowrank.sample(flat.detach(), unravel, diag, factor, sample_shape)
