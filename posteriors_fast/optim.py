"""Optimisation of a loss with a ``torch.optim`` optimizer, in the
build/init/update form of every posteriors_fast method.

``update`` is in place only (the optimizer owns the parameters), as in
posteriors 0.0.5.
"""

from functools import partial
from typing import Any, NamedTuple, Type

import torch
from optree import tree_leaves

from posteriors_fast._internal.checks import blame_batch, finite_params, first_non_finite
from posteriors_fast._internal.errors import CatchAuxError
from posteriors_fast._internal.state import write_field
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.tree_utils import tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform


class InplaceOnlyError(NotImplementedError):
    """``posteriors_fast.optim.update`` was asked for ``inplace=False``."""


neutral("optim", "torch.optim steps the parameters itself")


def build(
    loss_fn: LogProbFn,
    optimizer: Type[torch.optim.Optimizer],
    *,
    backend: str | None = None,
    process_group=None,
    **kwargs: Any,
) -> Transform:
    """Bind a loss and a ``torch.optim`` optimizer class into a ``Transform``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)`` to minimise.
        optimizer: A ``torch.optim.Optimizer`` subclass, e.g. ``torch.optim.Adam``.
        backend: Accepted for a uniform API: both backends run the same torch
            code (``torch.optim`` steps the parameters itself).
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank steps with the
            ranks' weighted mean gradient (Σ n_r g_r / Σ n_r: exact for a
            per-datum mean loss; ``reduction="sum"`` adds them; one all-reduce
            of P + 1 values per step); or ``posteriors_fast.distributed.chains()``:
            an independent optimisation per rank, nothing reduced.
        **kwargs: Passed to the optimizer's constructor (e.g. ``lr``).

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    group = resolve_group(process_group, "optim", _MODES)
    init_fn = partial(init, optimizer_cls=optimizer, process_group=group, **kwargs)
    update_fn = partial(update, loss_fn=loss_fn, process_group=group)
    return Transform(init_fn, update_fn)


_MODES = ("data", "chains")


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


def init(
    params: TensorTree,
    optimizer_cls: Type[torch.optim.Optimizer],
    *args: Any,
    process_group=None,
    **kwargs: Any,
) -> OptimState:
    """Create the optimizer over ``params`` (a tensor or an iterable/dict of
    tensors, as ``torch.optim`` accepts) and the initial state.

    Args:
        params: Parameters to optimise; they must require grad.
        optimizer_cls: ``torch.optim.Optimizer`` subclass.
        *args: Positional arguments for the optimizer.
        process_group: As in ``build``; a data-parallel group's ranks must
            hold the same params (checked).
        **kwargs: Keyword arguments for the optimizer.

    Returns:
        ``OptimState`` with its own (empty) loss tensor.
    """
    group = resolve_group(process_group, "optim.init", _MODES)
    finite_params(params, "params")
    if group is not None and group.mode != "chains":
        group.check_params(params, "optim.init")
    optimizer = optimizer_cls([params] if isinstance(params, torch.Tensor) else params, *args, **kwargs)
    return OptimState(params, optimizer, torch.tensor([]))


def update(
    state: OptimState,
    batch: TensorTree,
    loss_fn: LogProbFn,
    inplace: bool = True,
    process_group=None,
) -> OptimState:
    """One optimizer step on ``batch``: zero the gradients, back-propagate
    ``loss_fn``, step.

    Args:
        state: Current ``OptimState``.
        batch: Data for ``loss_fn``.
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)``.
        inplace: Must be True (the optimizer updates its parameters in place).
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's; the parameters' ``.grad`` hold the reduced gradient.

    Returns:
        The state with the new loss and aux.

    Raises:
        InplaceOnlyError: ``inplace=False`` (a ``NotImplementedError``, as in
            posteriors 0.0.5).
        ValueError: the loss is NaN or inf (no step is taken).
        posteriors_fast.distributed.RankError: with a process group, the
            step failed on some rank (raised on every rank; no step taken).
    """
    if not inplace:
        raise InplaceOnlyError("posteriors_fast.optim.update only supports inplace=True")
    group = resolve_group(process_group, "optim.update", _MODES)
    if group is None or group.mode == "chains":
        loss, aux = _backward(state, batch, loss_fn)
    else:
        leaves = _leaves(state.params)

        def local():
            value, extra = _backward(state, batch, loss_fn)
            return [p.grad if p.grad is not None else torch.zeros_like(p) for p in leaves], value, extra

        grads, loss, aux = group.reduce_gradient(
            local, what="optim.update", params=state.params, batch=batch, like=leaves
        )
        for p, g in zip(leaves, grads):
            p.grad = g
    state.optimizer.step()
    return write_field(state, "loss", loss.detach(), aux=aux)


def _backward(state: OptimState, batch, loss_fn):
    """Zero the gradients, back-propagate ``loss_fn`` and check: ``(loss, aux)``
    with the gradients in the parameters' ``.grad``."""
    state.optimizer.zero_grad()
    with CatchAuxError(), blame_batch(batch, "loss_fn"):
        loss, aux = loss_fn(state.params, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor as its first output")
    if bool(torch.isfinite(loss.detach()).all()):
        loss.backward()
    grads = [p.grad for p in _leaves(state.params) if p.grad is not None]
    bad = first_non_finite(
        [
            (state.params, "state.params hold a non-finite value (NaN or inf)", "leaf"),
            (loss.detach(), "loss_fn returned NaN or inf for this batch"),
            (grads, "the gradient of loss_fn is NaN or inf for this batch", "leaf"),
        ]
    )
    if bad is not None:
        raise ValueError(f"{bad}; no step was taken")
    return loss, aux


def _leaves(params):
    return [params] if isinstance(params, torch.Tensor) else tree_leaves(params)
