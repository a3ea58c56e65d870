"""Laplace approximation with a diagonal generalised Gauss-Newton precision.

Around a mode θ (the state's params, fixed), the posterior is approximated by
N(θ, diag(λ)⁻¹) with λ the prior diagonal precision plus the diagonal of the
GGN of the data, accumulated batch by batch:

$$ λ ← λ + \\mathrm{diag}\\big(J_fᵀ H_l J_f\\big), \\qquad
z = f(θ, \\text{batch}),\\quad l(z) = -\\log p(\\text{batch} | z), $$

computed column by column as Σ_j J_f[j, ·] ⊙ (H_l J_f)[j, ·], never forming
P×P, and beyond the Jacobian memory budget (``POSTERIORS_FAST_JACOBIAN_MB``,
docs/environment.md) a block of samples' rows of J_f at a time (see
:mod:`posteriors_fast.laplace.dense_ggn` for the terms; Martens,
2020, https://jmlr.org/papers/volume21/17-678/17-678.pdf; Daxberger et al.,
2021, https://arxiv.org/abs/2106.14806).
"""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)

from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.laplace import _diag
from posteriors_fast.laplace._ggn import batch_ggn_diag
from posteriors_fast.tree_utils import flexi_tree_map  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import ForwardFn, OuterLogProbFn, TensorTree, Transform
from posteriors_fast.utils import diag_ggn, diag_normal_sample, is_scalar  # noqa: F401  (as above)


def build(
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    init_prec_diag: TensorTree | float = 0.0,
    backend: str | None = None,
    process_group=None,
) -> Transform:
    """Bind the model into a ``Transform``.

    Args:
        forward: ``forward(params, batch) -> (z, aux)``: the model outputs z
            (e.g. logits, one row per sample, not reduced over the batch).
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``, the
            log-likelihood of the outputs (no aux).
        init_prec_diag: Prior diagonal precision: a scalar >= 0 or a
            non-negative tree like the parameters.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: None (one process), or a ``torch.distributed`` process
            group / ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch (one all-reduce of P values
            per step; each rank's ``outer_log_likelihood`` is taken as a sum
            over its samples unless the group says ``reduction="mean"``).

    Returns:
        ``Transform(init, update)`` with these settings bound.
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.diag_ggn")
    return Transform(
        partial(init, init_prec_diag=init_prec_diag, process_group=group),
        partial(
            update,
            forward=forward,
            outer_log_likelihood=outer_log_likelihood,
            backend=backend,
            process_group=group,
        ),
    )


class DiagLaplaceState(NamedTuple):
    """Gaussian N(params, diag(prec_diag)⁻¹).

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec_diag: Diagonal precision λ, a pytree like ``params``.
        aux: Auxiliary output of the last ``forward`` call.
    """

    params: TensorTree
    prec_diag: TensorTree
    aux: Any = None


def init(params: TensorTree, init_prec_diag: TensorTree | float = 0.0, process_group=None) -> DiagLaplaceState:
    """Initial state: mean ``params`` and diagonal precision ``init_prec_diag``.

    Args:
        params: Pytree of finite floating-point tensors (the mode; kept by reference).
        init_prec_diag: A scalar >= 0 for every entry, or a non-negative tree
            like ``params`` (copied).
        process_group: As in ``build``; every rank's params must agree (checked).

    Returns:
        ``DiagLaplaceState`` with ``aux=None``.
    """
    group = resolve_group(process_group, "laplace.diag_ggn.init")
    return DiagLaplaceState(params, _diag.initial_prec_diag(params, init_prec_diag, group))


def update(
    state: DiagLaplaceState,
    batch: Any,
    forward: ForwardFn,
    outer_log_likelihood: OuterLogProbFn,
    inplace: bool = False,
    backend: str | None = None,
    process_group=None,
) -> DiagLaplaceState:
    """Add the diagonal of the batch's GGN (loss ``-outer_log_likelihood``).

    Args:
        state: Current ``DiagLaplaceState``.
        batch: Data for ``forward`` and ``outer_log_likelihood``.
        forward: ``forward(params, batch) -> (z, aux)``.
        outer_log_likelihood: ``outer_log_likelihood(z, batch) -> scalar``.
        inplace: Write into the tensors of ``state.prec_diag`` (versions
            advance); nothing is written unless the GGN is finite.
        backend: ``"eager"``, ``"compiled"`` or None for the current default.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The updated ``DiagLaplaceState``.

    Raises:
        ValueError: NaN/inf in the parameters, the outputs of ``forward``,
            their gradient, or the Hessian of ``outer_log_likelihood``, or a
            ``state.prec_diag`` whose structure or leaf shapes differ from
            ``state.params``.
        TypeError: a ``state.prec_diag`` leaf that is not a tensor.
        posteriors_fast.distributed.RankError: with a process group, the
            update failed on some rank (raised on every rank; nothing written).
    """
    backend = resolve(backend)
    group = resolve_group(process_group, "laplace.diag_ggn.update")

    def compute():
        return batch_ggn_diag(state.params, batch, forward, outer_log_likelihood, backend=backend)

    with torch.no_grad(), CatchAuxError():
        if group is None:
            term, aux = compute()
        else:
            what = "laplace.diag_ggn.update"
            term, aux = group.reduce_term(compute, what=what, params=state.params, batch=batch, kind="ggn", shape="P")
    return _diag.add_to_prec(state, term, aux, inplace)


def sample(state: DiagLaplaceState, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, diag(prec_diag)⁻¹).

    Args:
        state: State with mean and diagonal precision (positive).
        sample_shape: Leading shape of the draws.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    return _diag.sample(state, sample_shape)
