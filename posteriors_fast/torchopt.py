"""Optimisation with a ``torchopt`` functional optimizer (optional dependency:
``pip install torchopt``), in the build/init/update form of every method:
each update takes the gradient of ``loss_fn`` and applies the optimizer's
update, e.g. Adam (Kingma and Ba, 2015, https://arxiv.org/abs/1412.6980)."""

from functools import partial
from typing import Any, NamedTuple

import torch

from posteriors_fast._internal import optional
from posteriors_fast._internal.checks import blame_batch, finite_params
from posteriors_fast._internal.errors import CatchAuxError  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast._internal.state import write_field
from posteriors_fast._internal.torchopt_step import step
from posteriors_fast.backends import neutral, resolve
from posteriors_fast.distributed import resolve as resolve_group
from posteriors_fast.tree_utils import tree_insert_  # noqa: F401  (posteriors 0.0.5 exposes it here)
from posteriors_fast.types import LogProbFn, TensorTree, Transform

torchopt = optional.load("torchopt")  # posteriors 0.0.5 exposes the module here (None if absent)


neutral("torchopt", "the step's cost is the user's loss and its gradient")


def build(loss_fn: LogProbFn, optimizer: Any, backend: str | None = None, process_group=None) -> Transform:
    """Bind a loss and a ``torchopt`` optimizer into a ``Transform``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)`` to minimise.
        optimizer: A ``torchopt.base.GradientTransformation``, e.g. ``torchopt.adam(1e-3)``.
        backend: Accepted for a uniform API: both backends run the same torch
            code (the step's cost is the user's loss and its gradient).
        process_group: None (one process); a ``torch.distributed`` process
            group or ``posteriors_fast.distributed.data_parallel(...)``: each
            rank passes its shard of the batch and every rank applies the
            ranks' weighted mean gradient (Σ n_r g_r / Σ n_r: exact for a
            per-datum mean loss; ``reduction="sum"`` adds them; one all-reduce
            of P + 1 values per step); or ``posteriors_fast.distributed.chains()``:
            an independent optimisation per rank, nothing reduced.

    Returns:
        ``Transform(init, update)``.
    """
    resolve(backend)
    group = resolve_group(process_group, "torchopt", _MODES)
    return Transform(
        partial(init, optimizer=optimizer, process_group=group),
        partial(update, optimizer=optimizer, loss_fn=loss_fn, process_group=group),
    )


_MODES = ("data", "chains")


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


def init(params: TensorTree, optimizer: Any, process_group=None) -> TorchOptState:
    """Initial state: ``params`` (kept by reference) and ``optimizer.init(params)``.

    Args:
        params: Pytree of finite floating-point tensors.
        optimizer: The torchopt optimizer of ``build``.
        process_group: As in ``build``; a data-parallel group's ranks must
            hold the same params (checked).

    Returns:
        ``TorchOptState`` with its own (empty) loss tensor.
    """
    optional.torchopt("posteriors_fast.torchopt")
    group = resolve_group(process_group, "torchopt.init", _MODES)
    finite_params(params, "params")
    if group is not None and group.mode != "chains":
        group.check_params(params, "torchopt.init")
    return TorchOptState(params, optimizer.init(params), torch.tensor([]))


def update(
    state: TorchOptState,
    batch: TensorTree,
    loss_fn: LogProbFn,
    optimizer: Any,
    inplace: bool = False,
    process_group=None,
) -> TorchOptState:
    """One optimizer step on ``batch``.

    Args:
        state: Current ``TorchOptState``.
        batch: Data for ``loss_fn``.
        loss_fn: ``loss_fn(params, batch) -> (loss, aux)``.
        optimizer: The torchopt optimizer of ``init``.
        inplace: Update the parameters and the optimizer state in place.
            Without it neither is modified.
        process_group: As in ``build``: ``batch`` is this rank's shard; ``aux``
            is this rank's.

    Returns:
        The new state, with the advanced optimizer state in both modes.

    Raises:
        ValueError: NaN/inf in the parameters, the loss or its gradient
            (nothing is changed).
    """

    def objective(params, batch_):
        with blame_batch(batch_, "loss_fn"):
            return loss_fn(params, batch_)

    (params,), opt_state, loss, aux = step(
        objective,
        (state.params,),
        (batch,),
        state.opt_state,
        optimizer,
        inplace=inplace,
        what="loss_fn",
        names=("params",),
        value_label="loss_fn returned NaN or inf for this batch",
        grad_label="the gradient of loss_fn is NaN or inf for this batch",
        needed_by="posteriors_fast.torchopt",
        group=resolve_group(process_group, "torchopt.update", _MODES),
        batch=batch,
    )
    if not inplace:
        return TorchOptState(params, opt_state, loss, aux)
    return write_field(state, "loss", loss, opt_state=opt_state, aux=aux)
