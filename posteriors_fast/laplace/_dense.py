"""What the dense Laplace methods share: the initial precision, the state
check, the atomic precision update and sampling (factor once, one triangular
solve for all draws). Each public module defines its own state class, as
posteriors 0.0.5 does; these helpers take any of them."""

import torch
from optree import tree_leaves
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.cholesky import robust_cholesky
from posteriors_fast._internal.memo import TensorMemo
from posteriors_fast._internal.sampling import unravel_draws
from posteriors_fast.distributed import _sharded as sharding
from posteriors_fast.types import TensorTree

#: The modes of posteriors_fast.distributed the dense Laplace methods run in.
MODES = ("data", "sharded")


def initial_prec(params: TensorTree, init_prec, group=None) -> torch.Tensor:
    """The (P, P) prior precision: c·I on the params' device and dtype for a
    scalar c >= 0, or a copy of a symmetric PSD tensor (checked). With a
    process group every rank's params must agree (checked); sharded: this
    rank's rows, a ``ShardedMatrix``."""
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    flat = tree_ravel(params)[0]
    if group is not None:
        group.check_params(params, "laplace init")
        if group.sharded:
            return sharding.shard(init_prec, group, flat, "init_prec", allow_zero=True)
    prec = _checks.covariance(init_prec, flat.numel(), flat, "init_prec", allow_zero=True)
    if isinstance(prec, float):
        return torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device).mul_(prec)
    return prec.clone()


def check_state(state, group=None) -> None:
    """A NamedTuple with ``params`` (tensors) and a (P, P) ``prec`` (sharded
    with a sharded group, dense otherwise)."""
    if not all(hasattr(state, f) for f in ("params", "prec", "_replace")):
        raise TypeError(f"state must be a DenseLaplaceState (params, prec, aux), got {type(state).__name__}")
    leaves = tree_leaves(state.params)
    if not all(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError("state.params must be a pytree of tensors")
    size = sum(x.numel() for x in leaves)  # as raveled, without copying every leaf
    if sharding.check_layout(state.prec, size, group, "state.prec"):
        return
    if not isinstance(state.prec, torch.Tensor) or state.prec.shape != (size, size):
        got = tuple(state.prec.shape) if isinstance(state.prec, torch.Tensor) else type(state.prec).__name__
        raise ValueError(f"state.prec must be ({size}, {size}) for the parameters of state.params, got {got}")


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


# Lower Cholesky factors of precisions already sampled from, keyed on the
# precision tensor and its version: any update invalidates the entry.
_factors = TensorMemo()


def sample(state, sample_shape: torch.Size) -> TensorTree:
    """Draws from N(params, prec⁻¹): with prec = L Lᵀ (factored once per
    precision and cached), ``mean + L⁻ᵀ ε`` from one triangular solve."""
    check_state(state)
    flat, unravel = tree_ravel(state.params)
    shape = torch.Size(sample_shape)
    if isinstance(state.prec, sharding.ShardedMatrix):
        return unravel_draws(sharding.sample_precision(flat, state.prec, shape.numel()), unravel, shape)
    chol = _factors.get(state.prec)
    if chol is None:
        chol = robust_cholesky(
            state.prec,
            "state.prec",
            "The precision must be positive definite to sample: add a prior precision (init_prec > 0).",
        )
        _factors.put(state.prec, chol)
    noise = torch.randn(flat.numel(), shape.numel(), dtype=flat.dtype, device=flat.device)
    draws = torch.linalg.solve_triangular(chol.mT.to(flat.dtype), noise, upper=True).mT + flat
    return unravel_draws(draws, unravel, shape)
