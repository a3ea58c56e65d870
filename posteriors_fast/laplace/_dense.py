"""What the dense Laplace methods share: the state, ``init``, the atomic
precision update and ``sample`` (factor once, one triangular solve for all draws)."""

from typing import Any, NamedTuple

import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel
from torch.func import vmap

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.memo import TensorMemo
from posteriors_fast._internal.cholesky import robust_cholesky
from posteriors_fast.types import TensorTree


class DenseLaplaceState(NamedTuple):
    """Gaussian N(params, prec⁻¹) with a dense precision.

    Attributes:
        params: Mean (the mode), a pytree of tensors.
        prec: (P, P) precision in the raveled parameter order.
        aux: Auxiliary output of the last call of the user's function.
    """

    params: TensorTree
    prec: torch.Tensor
    aux: Any = None


def init(params: TensorTree, init_prec: torch.Tensor | float = 0.0) -> DenseLaplaceState:
    """Initial state: mean ``params``, precision ``init_prec`` (a scalar c >= 0
    meaning c·I on the params' device and dtype, or a (P, P) symmetric PSD
    tensor, copied)."""
    _checks.float_params(params, "params")
    flat = tree_ravel(params)[0]
    prec = _checks.covariance(init_prec, flat.numel(), flat, "init_prec", allow_zero=True)
    if isinstance(prec, float):
        prec = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device).mul_(prec)
    else:
        prec = prec.clone()
    return DenseLaplaceState(params, prec)


def check_state(state) -> None:
    if not all(hasattr(state, f) for f in ("params", "prec", "_replace")):
        raise TypeError(f"state must be a DenseLaplaceState, got {type(state).__name__}")
    leaves = tree_leaves(state.params)
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError("state.params must be a pytree of tensors")
    size = sum(x.numel() for x in leaves)  # as raveled, without copying every leaf
    if not isinstance(state.prec, torch.Tensor) or state.prec.shape != (size, size):
        raise ValueError(f"state.prec must be ({size}, {size}) for the parameters of state.params")


def require_finite(tensor: torch.Tensor, what: str, witness: torch.Tensor | None = None) -> None:
    """Raise unless ``tensor`` is finite. ``witness``: a finite witness of it
    (and possibly of other tensors) already computed; when it is not finite,
    ``tensor`` alone is checked exactly."""
    _checks.require_finite([(tensor, f"{what} contains NaN or inf")], witness)


def add_to_prec(state, term: torch.Tensor, aux, inplace: bool):
    """``prec + term`` (``term`` already checked finite), written in place or new.

    ``term`` must be the caller's own new tensor: the new precision is written
    into it when it has the precision's dtype and device (no further P×P
    allocation; with ``"compiled"`` it may come from the block pool), and
    ``term + prec`` equals ``prec + term`` exactly."""
    if inplace:
        with torch.no_grad():
            state.prec.add_(term.to(state.prec.dtype))
        return state._replace(aux=aux)
    tracked = torch.is_grad_enabled() and (state.prec.requires_grad or term.requires_grad)
    if term.dtype == state.prec.dtype and term.device == state.prec.device and not tracked:
        return type(state)(state.params, term.add_(state.prec), aux)
    return type(state)(state.params, state.prec + term, aux)


_factors = TensorMemo()


def sample(state, sample_shape: torch.Size = torch.Size([])) -> TensorTree:
    """Draw from N(params, prec⁻¹): with prec = L Lᵀ (factored once per
    precision and cached), draws are ``mean + L⁻ᵀ ε`` from one triangular solve.

    Returns:
        Pytree like ``state.params`` with leaves ``sample_shape + leaf.shape``.
    """
    check_state(state)
    flat, unravel = tree_ravel(state.params)
    chol = _factors.get(state.prec)
    if chol is None:
        chol = robust_cholesky(
            state.prec, "state.prec", "The precision must be positive definite to sample: add a prior precision (init_prec > 0)."
        )
        _factors.put(state.prec, chol)
    shape = torch.Size(sample_shape)
    noise = torch.randn(flat.numel(), shape.numel(), dtype=flat.dtype, device=flat.device)
    draws = torch.linalg.solve_triangular(chol.mT.to(flat.dtype), noise, upper=True).mT + flat
    if len(shape) == 0:
        return unravel(draws.reshape(flat.shape))
    return tree_map(lambda x: x.reshape(shape + x.shape[1:]), vmap(unravel)(draws))
