"""The torchopt step shared by the variational methods: gradients of the
negative ELBO with respect to (mean, scale parameters), checked, then applied
with the optimizer state carried forward in both modes."""

import math
from typing import Any, Callable

import torch
from optree import tree_leaves

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.autograd import grad_value_aux
from posteriors_fast._internal.errors import CatchAuxError

try:
    import torchopt as _torchopt
except ImportError:  # optional dependency, needed only by vi and posteriors_fast.torchopt
    _torchopt = None


def require_torchopt():
    if _torchopt is None:
        raise ImportError("posteriors_fast.vi needs the torchopt package: pip install torchopt")
    return _torchopt


def check_settings(temperature, n_samples) -> None:
    t = _checks.scalar_value(temperature, "temperature")
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {t}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")


def step(objective: Callable, first: Any, second: Any, opt_state: Any, optimizer: Any, inplace: bool):
    """One optimizer step on ``objective(first, second) -> (nelbo, aux)``.

    Returns ``(first, second, opt_state, nelbo, aux)``; nothing is modified
    before every check has passed.
    """
    torchopt = require_torchopt()
    with CatchAuxError():
        grads, value, aux = grad_value_aux(objective, (first, second), "the negative ELBO")
    value = value.detach()
    if not bool(torch.isfinite(value).all()):
        raise ValueError("the negative ELBO is NaN or inf for this batch; the state was not changed")
    if not _checks.all_finite(tree_leaves(grads)):
        raise ValueError("the gradient of the negative ELBO contains NaN or inf; the state was not changed")
    updates, opt_state = optimizer.update(grads, opt_state, params=[first, second], inplace=inplace)
    first, second = torchopt.apply_updates((first, second), updates, inplace=inplace)
    return first, second, opt_state, value, aux


def write_back(state, shared_default, opt_state, value, aux):
    """The in-place result: the advanced optimizer state and the new nelbo
    (written into ``state.nelbo`` unless that is the class-level default)."""
    if state.nelbo is shared_default:
        return state._replace(opt_state=opt_state, nelbo=value, aux=aux)
    state.nelbo.data = value
    return state._replace(opt_state=opt_state, aux=aux)
