"""What the diagonal Laplace methods share: the state, ``init``, the atomic
update and ``sample``."""

from typing import Any, NamedTuple

import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast.tree_utils import tree_insert_
from posteriors_fast.types import TensorTree
from posteriors_fast.utils import diag_normal_sample, is_scalar


class DiagLaplaceState(NamedTuple):
    """Gaussian N(params, diag(prec_diag)⁻¹).

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec_diag: Diagonal precision, a pytree like ``params``.
        aux: Auxiliary output of the last call of the user's function.
    """

    params: TensorTree
    prec_diag: TensorTree
    aux: Any = None


def init(params: TensorTree, init_prec_diag: TensorTree | float = 0.0) -> DiagLaplaceState:
    """Initial state: mean ``params``, diagonal precision ``init_prec_diag``
    (a scalar >= 0 or a non-negative tree like ``params``, copied)."""
    _checks.float_params(params, "params")
    if is_scalar(init_prec_diag):
        value = _checks.scalar_value(init_prec_diag, "init_prec_diag")
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"init_prec_diag must be finite and >= 0, got {value}")
        prec = tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    else:
        _checks.same_structure(init_prec_diag, params, "init_prec_diag", "params")
        if not bool((tree_ravel(init_prec_diag)[0] >= 0).all()):
            raise ValueError("init_prec_diag must be non-negative")
        prec = tree_map(lambda p: p.detach().clone().requires_grad_(p.requires_grad), init_prec_diag)
    return DiagLaplaceState(params, prec)


def add_to_prec(state, term_flat: torch.Tensor, aux, inplace: bool):
    """``prec_diag + term`` (``term_flat`` raveled like params, checked finite)."""
    if not bool(torch.isfinite(term_flat).all()):
        raise ValueError("the curvature of this batch contains NaN or inf; the state was not changed")
    _checks.same_structure(state.prec_diag, state.params, "state.prec_diag", "state.params")
    flat, unravel = tree_ravel(state.prec_diag)
    new = unravel(flat.detach() + term_flat.to(flat.dtype))
    if inplace:
        tree_insert_(state.prec_diag, new)
        return state._replace(aux=aux)
    return type(state)(state.params, new, aux)


def sample(state, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, diag(prec_diag)⁻¹)."""
    sd = tree_map(lambda x: x.sqrt().reciprocal(), state.prec_diag)
    return diag_normal_sample(state.params, sd, sample_shape=sample_shape)
