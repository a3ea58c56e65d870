"""Optimisation of a loss with a ``torch.optim`` optimizer, in the
build/init/update form of every posteriors_fast method.

``update`` is in place only (the optimizer owns the parameters), as in
posteriors 0.0.5.
"""

from functools import partial
from typing import Any, NamedTuple, Type

import torch

from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast.backends import resolve
from posteriors_fast.types import LogProbFn, TensorTree, Transform


class InplaceOnlyError(NotImplementedError):
    """``posteriors_fast.optim.update`` was asked for ``inplace=False``."""


def build(
    loss_fn: LogProbFn,
    optimizer: Type[torch.optim.Optimizer],
    *,
    backend: str | None = None,
    **kwargs: Any,
) -> Transform:
    """Bind a loss and a ``torch.optim`` optimizer class into a ``Transform``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)`` to minimise.
        optimizer: A ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``.
        backend: Accepted for a uniform API; plain torch either way.
        **kwargs: Passed to the optimizer's constructor (e.g. ``lr``).

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    init_fn = partial(init, optimizer_cls=optimizer, **kwargs)
    update_fn = partial(update, loss_fn=loss_fn)
    return Transform(init_fn, update_fn)


class OptimState(NamedTuple):
    """State of an optimisation.

    Attributes:
        params: The parameters being optimised (leaves are the optimizer's).
        optimizer: The ``torch.optim.Optimizer`` instance.
        loss: Loss of the last batch.
        aux: Auxiliary output of the last ``loss_fn`` call.
    """

    params: TensorTree
    optimizer: torch.optim.Optimizer
    loss: torch.tensor = torch.tensor([])
    aux: Any = None


_SHARED_DEFAULT_LOSS = OptimState._field_defaults["loss"]


def init(
    params: TensorTree,
    optimizer_cls: Type[torch.optim.Optimizer],
    *args: Any,
    **kwargs: Any,
) -> OptimState:
    """Create the optimizer over ``params`` (a tensor or an iterable/dict of
    tensors, as ``torch.optim`` accepts) and the initial state.

    Args:
        params: Parameters to optimise; they must require grad.
        optimizer_cls: ``torch.optim.Optimizer`` subclass.
        *args: Positional arguments for the optimizer.
        **kwargs: Keyword arguments for the optimizer.

    Returns:
        ``OptimState`` with its own (empty) loss tensor.
    """
    optimizer = optimizer_cls([params] if isinstance(params, torch.Tensor) else params, *args, **kwargs)
    return OptimState(params, optimizer, torch.tensor([]))


def update(
    state: OptimState,
    batch: TensorTree,
    loss_fn: LogProbFn,
    inplace: bool = True,
) -> OptimState:
    """One optimizer step on ``batch``: zero the gradients, back-propagate
    ``loss_fn``, step.

    Args:
        state: Current ``OptimState``.
        batch: Data for ``loss_fn``.
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)``.
        inplace: Must be True (the optimizer updates its parameters in place).

    Returns:
        The state with the new loss and aux.

    Raises:
        InplaceOnlyError: ``inplace=False`` (a ``NotImplementedError``, as in
            posteriors 0.0.5).
        ValueError: the loss is NaN or inf (no step is taken).
    """
    if not inplace:
        raise InplaceOnlyError("posteriors_fast.optim.update only supports inplace=True")
    state.optimizer.zero_grad()
    with CatchAuxError():
        loss, aux = loss_fn(state.params, batch)
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError("loss_fn returned NaN or inf for this batch; no step was taken")
    loss.backward()
    state.optimizer.step()
    if state.loss is _SHARED_DEFAULT_LOSS:
        return state._replace(loss=loss.detach(), aux=aux)
    state.loss.data = loss.detach()
    return state._replace(aux=aux)
