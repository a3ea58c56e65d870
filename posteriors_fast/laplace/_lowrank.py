"""What the low-rank Laplace methods share: the state class, the initial
state, the atomic update of the precision and sampling."""

from typing import Any, NamedTuple

import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal import lowrank as _lowrank
from posteriors_fast._internal.state import rebind_, rebind_tree_
from posteriors_fast.ops.lowrank_truncate import lowrank_truncate
from posteriors_fast.types import TensorTree


class LowRankLaplaceState(NamedTuple):
    """Gaussian N(params, (diag(d) + U Uᵀ)⁻¹).

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec_diag: d, the diagonal part of the precision, a pytree like
            ``params``.
        prec_factor: U, the (P, rank) low-rank factor of the precision in the
            raveled parameter order (``optree.integrations.torch.tree_ravel``):
            the precision is
            ``diag(tree_ravel(prec_diag)[0]) + prec_factor @ prec_factor.T``.
        aux: Auxiliary output of the last call of the user's function.
    """

    params: TensorTree
    prec_diag: TensorTree
    prec_factor: torch.Tensor
    aux: Any = None


def initial_state(params: TensorTree, rank: int, init_prec_diag, group, what: str) -> LowRankLaplaceState:
    """Precision diag(init_prec_diag) (a scalar >= 0 or a non-negative tree
    like ``params``) and a zero (P, rank) factor."""
    rank = _lowrank.check_rank(rank)
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None:
        group.check_params(params, what)
    flat, unravel = tree_ravel(params)
    prior = _lowrank.diagonal_argument(init_prec_diag, params, "init_prec_diag", positive=False)
    diag = torch.full_like(flat, prior) if isinstance(prior, float) else prior.clone()
    return LowRankLaplaceState(params, unravel(diag.detach()), flat.new_zeros(flat.numel(), rank))


def add_to_prec(state, checked, blocks, rank: int, aux, inplace: bool, backend: str):
    """The state with RᵀR added to the precision and truncated back to
    ``rank`` columns, R given as an iterable of row blocks (each (K_b, P),
    checked finite) folded in one after another; written in place (rebound,
    versions advanced) only once every block succeeded. ``checked`` is what
    ``_lowrank.check_state`` returned for ``state`` (the raveled state, made
    once per update); ``backend`` is resolved."""
    _, unravel, diag, factor = checked
    blocks = iter(blocks)
    with torch.no_grad():
        while (rows := next(blocks, None)) is not None:
            diag, factor, _, witness = lowrank_truncate(diag, factor, rows.to(diag.dtype), 1.0, rank, backend=backend)
            del rows  # before the next block is built: one block of rows at a time
            _checks.require_finite(
                [
                    (diag, "the precision diagonal of this batch overflowed (NaN or inf)"),
                    (factor, "the precision factor of this batch overflowed (NaN or inf)"),
                ],
                witness,
            )
    new_prec_diag = unravel(diag)
    if not inplace:
        return type(state)(state.params, new_prec_diag, factor, aux)
    rebind_tree_(state.prec_diag, new_prec_diag)
    rebind_(state.prec_factor, factor)
    return state._replace(aux=aux)


def sample(state, sample_shape: torch.Size) -> TensorTree:
    """Exact draws from N(params, (diag(d) + UUᵀ)⁻¹) (d > 0 everywhere)."""
    flat, unravel, diag, factor = _lowrank.check_state(state, "LowRankLaplaceState")
    return _lowrank.sample(flat.detach(), unravel, diag, factor, sample_shape)
