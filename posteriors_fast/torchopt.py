"""Optimisation with a ``torchopt`` functional optimizer (optional dependency:
``pip install torchopt``), in the build/init/update form of every method."""

from functools import partial
from typing import Any, NamedTuple

import torch
from optree import tree_leaves

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.autograd import grad_value_aux
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.tree_utils import tree_insert_
from posteriors_fast.types import LogProbFn, TensorTree, Transform

try:
    import torchopt as _torchopt
except ImportError:  # optional: only this module needs it
    _torchopt = None


def _require_torchopt():
    if _torchopt is None:
        raise ImportError("posteriors_fast.torchopt needs the torchopt package: pip install torchopt")
    return _torchopt


def build(loss_fn: LogProbFn, optimizer: Any, backend: str | None = None) -> Transform:
    """Bind a loss and a ``torchopt`` optimizer into a ``Transform``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)`` to minimise.
        optimizer: A ``torchopt.base.GradientTransformation``, e.g. ``torchopt.adam(1e-3)``.
        backend: Accepted for a uniform API; plain torch either way.

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    return Transform(partial(init, optimizer=optimizer), partial(update, optimizer=optimizer, loss_fn=loss_fn))


class TorchOptState(NamedTuple):
    """State of a torchopt optimisation.

    Attributes:
        params: Current parameters.
        opt_state: The optimizer's state (e.g. Adam's moments and step count).
        loss: Loss of the last batch.
        aux: Auxiliary output of the last ``loss_fn`` call.
    """

    params: TensorTree
    opt_state: Any
    loss: torch.tensor = torch.tensor([])
    aux: Any = None


_SHARED_DEFAULT_LOSS = TorchOptState._field_defaults["loss"]


def init(params: TensorTree, optimizer: Any) -> TorchOptState:
    """Initial state: ``params`` and ``optimizer.init(params)``."""
    _require_torchopt()
    return TorchOptState(params, optimizer.init(params), torch.tensor([]))


def update(
    state: TorchOptState,
    batch: TensorTree,
    loss_fn: LogProbFn,
    optimizer: Any,
    inplace: bool = False,
) -> TorchOptState:
    """One optimizer step on ``batch``.

    Args:
        state: Current ``TorchOptState``.
        batch: Data for ``loss_fn``.
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)``.
        optimizer: The torchopt optimizer of ``init``.
        inplace: Update the parameters and the optimizer state in place.
            Without it neither is modified.

    Returns:
        The new state, with the advanced optimizer state in both modes.

    Raises:
        ValueError: the loss or its gradient is NaN or inf (nothing is changed).
    """
    torchopt = _require_torchopt()
    with CatchAuxError():
        (grads,), loss, aux = grad_value_aux(loss_fn, (state.params,), "loss_fn", (batch,))
    if not bool(torch.isfinite(loss).all()):
        raise ValueError("loss_fn returned NaN or inf for this batch; the state was not changed")
    if not _checks.all_finite(tree_leaves(grads)):
        raise ValueError("the gradient of loss_fn contains NaN or inf; the state was not changed")
    updates, opt_state = optimizer.update(grads, state.opt_state, params=state.params, inplace=inplace)
    params = torchopt.apply_updates(state.params, updates, inplace=inplace)
    loss = loss.detach()
    if not inplace:
        return TorchOptState(params, opt_state, loss, aux)
    if state.loss is _SHARED_DEFAULT_LOSS:
        return state._replace(opt_state=opt_state, loss=loss, aux=aux)
    tree_insert_(state.loss, loss)
    return state._replace(opt_state=opt_state, aux=aux)
