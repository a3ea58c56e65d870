"""What the diagonal Laplace methods share: the initial precision, the
atomic precision update and sampling. Each public module defines its own
state class, as posteriors 0.0.5 does; these helpers take any of them."""

import torch
from optree import tree_flatten, tree_map, tree_unflatten
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.state import rebind_tree_
from posteriors_fast.types import TensorTree
from posteriors_fast.utils import diag_normal_sample, is_scalar


def initial_prec_diag(params: TensorTree, init_prec_diag, group=None) -> TensorTree:
    """The prior diagonal precision: a scalar >= 0 for every entry, or a copy
    of a non-negative tree like ``params``. With a process group every rank's
    params must agree (checked)."""
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if group is not None:
        group.check_params(params, "laplace init")
    if is_scalar(init_prec_diag):
        value = _checks.scalar_value(init_prec_diag, "init_prec_diag")
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"init_prec_diag must be finite and >= 0, got {value}")
        return tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    _checks.same_structure(init_prec_diag, params, "init_prec_diag", "params")
    flat = tree_ravel(init_prec_diag)[0]
    if not bool((flat >= 0).all()) or not bool(torch.isfinite(flat).all()):
        raise ValueError("init_prec_diag must be finite and non-negative")
    return tree_map(lambda p: p.detach().clone().requires_grad_(p.requires_grad), init_prec_diag)


def add_to_prec(state, term_flat: torch.Tensor, aux, inplace: bool):
    """``prec_diag + term`` (``term_flat`` raveled like params, from inputs
    already checked finite), written in place (rebound, versions advanced)
    or new.

    ``term_flat`` is added leaf by leaf through views of its pieces, in the
    promoted dtype and rounded once to the leaf's: 75–80 µs of a 1.1 ms eager
    ``diag_fisher`` update at P = 1045, N = 64, where raveling the precision
    and unraveling the sum took 91 µs."""
    _checks.require_finite([(term_flat, "the curvature of this batch overflowed (NaN or inf)")])
    leaves, spec = tree_flatten(state.prec_diag)
    other = next((x for x in leaves if not isinstance(x, torch.Tensor)), None)
    if other is not None:
        raise TypeError(f"state.prec_diag must be a pytree of tensors; found a {type(other).__name__} leaf")
    _checks.same_structure(state.prec_diag, state.params, "state.prec_diag", "state.params")
    pieces = term_flat.split([x.numel() for x in leaves])
    new = tree_unflatten(spec, [(x.detach() + p.view(x.shape)).to(x.dtype) for x, p in zip(leaves, pieces)])
    if inplace:
        rebind_tree_(state.prec_diag, new)
        return state._replace(aux=aux)
    return type(state)(state.params, new, aux)


def sample(state, sample_shape: torch.Size) -> TensorTree:
    """Draws from N(params, diag(prec_diag)⁻¹)."""
    sd = tree_map(lambda x: x.sqrt().reciprocal(), state.prec_diag)
    return diag_normal_sample(state.params, sd, sample_shape=sample_shape)
