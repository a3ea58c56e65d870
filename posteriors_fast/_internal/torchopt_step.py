"""One step of a ``torchopt`` functional optimizer on the gradient of an
objective, checked before anything is written: the step shared by
``posteriors_fast.torchopt`` and the variational methods (``vi.*``)."""

from typing import Any, Callable, Sequence, Tuple

from posteriors_fast._internal import checks, optional
from posteriors_fast._internal.autograd import grad_value_aux
from posteriors_fast._internal.errors import CatchAuxError


def step(
    objective: Callable,
    args: Tuple,
    static: Tuple,
    opt_state: Any,
    optimizer: Any,
    *,
    inplace: bool,
    what: str,
    names: Sequence[str],
    value_label: str,
    grad_label: str,
    needed_by: str,
    group: Any = None,
    batch: Any = None,
    settings: Any = (),
) -> Tuple[Tuple, Any, Any, Any]:
    """Differentiate ``objective(*args, *static) -> (value, aux)`` with respect
    to ``args`` (a tuple of pytrees), check, and apply the optimizer's update.

    Args:
        objective: The scalar objective to minimise, with aux.
        args: The optimised pytrees (the state's fields, in order).
        static: Further arguments passed as they are (e.g. the batch).
        opt_state: The optimizer's state.
        optimizer: A ``torchopt`` ``GradientTransformation``.
        inplace: Update ``args`` and ``opt_state`` in place.
        what: Name of the objective, for the error when it is not a scalar.
        names: The state's field name of each of ``args``, for messages.
        value_label: Message when the value is NaN or inf.
        grad_label: Message when the gradient is NaN or inf.
        needed_by: Who needs torchopt, for the ImportError.
        group: A data-parallel ``posteriors_fast.distributed.Group`` (or None,
            or a ``chains`` one: nothing reduced): the gradient and value are
            reduced over the ranks (each differentiating on its shard
            ``batch``) after every rank's checks passed, then every rank
            applies the same update.
        batch: This rank's batch (its size weights the mean).
        settings: Hyperparameters every rank must share (checked).

    Returns:
        ``(new args, new opt_state, value, aux)``; with ``inplace`` the new
        args are the same tensors, updated.

    Raises:
        ValueError: NaN/inf in ``args`` (naming the field and leaf), the value
            or the gradient; nothing is changed.
    """
    torchopt = optional.torchopt(needed_by)

    def local():
        with CatchAuxError():
            grads, value, aux = grad_value_aux(objective, args, what, static)
        entries = [
            (arg, f"state.{name} hold a non-finite value (NaN or inf)", "leaf") for arg, name in zip(args, names)
        ]
        checks.require_finite(entries + [(value, value_label), (grads, grad_label, "leaf")])
        return grads, value, aux

    if group is None or group.mode == "chains":
        grads, value, aux = local()
    else:
        where = f"{needed_by.removeprefix('posteriors_fast.')} update of {', '.join(names)}"
        grads, value, aux = group.reduce_gradient(local, what=where, params=args, batch=batch, extra=settings)
    params = args[0] if len(args) == 1 else list(args)
    grads = grads[0] if len(args) == 1 else list(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params=params, inplace=inplace)
    new = torchopt.apply_updates(params, updates, inplace=inplace)
    return ((new,) if len(args) == 1 else tuple(new)), opt_state, value, aux
