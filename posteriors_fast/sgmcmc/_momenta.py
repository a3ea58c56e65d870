"""Initial momenta shared by SGHMC and SGNHT."""

import torch
from optree import tree_map

from posteriors_fast._internal import checks as _checks
from posteriors_fast.utils import is_scalar


def initial_momenta(params, momenta):
    """``None`` → standard normal draws; a scalar → that constant; a tree like
    ``params`` → a copy of it (so in-place updates never write into the
    caller's tensors)."""
    _checks.float_params(params, "params")
    _checks.finite_params(params, "params")
    if momenta is None:
        return tree_map(lambda x: torch.randn_like(x, requires_grad=x.requires_grad), params)
    if is_scalar(momenta):
        value = _checks.finite_value(momenta, "momenta")
        return tree_map(lambda x: torch.full_like(x, value, requires_grad=x.requires_grad), params)
    _checks.same_structure(momenta, params, "momenta", "params")
    _checks.finite_params(momenta, "momenta")
    return tree_map(lambda m: m.detach().clone().requires_grad_(m.requires_grad), momenta)
