"""Type aliases and the `Transform` container shared by every method module."""

from typing import Any, Callable, NamedTuple, Protocol, Tuple, TypeAlias

from optree import registry
from optree.typing import PyTreeTypeVar
from torch import Tensor

TensorTree: TypeAlias = PyTreeTypeVar("TensorTree", Tensor)  # type: ignore

#: optree's global registry namespace (posteriors 0.0.5's ``types.namespace``).
namespace = registry.__GLOBAL_NAMESPACE

#: ``log_prob(params, batch) -> (value, aux)``
LogProbFn = Callable[[TensorTree, TensorTree], Tuple[float, TensorTree]]
#: ``forward(params, batch) -> (outputs, aux)``
ForwardFn = Callable[[TensorTree, TensorTree], Tuple[Tensor, TensorTree]]
#: ``log_prob(params, batch) -> value`` (no aux)
OuterLogProbFn = Callable[[TensorTree, TensorTree], float]


class TransformState(NamedTuple):
    """Base shape of every method's state: a NamedTuple holding at least the
    current ``params`` and the ``aux`` returned by the user's function.

    Method modules define their own NamedTuple with these two fields plus
    whatever the algorithm needs (a covariance, a momentum, ...).
    """

    params: TensorTree
    aux: Any


class InitFn(Protocol):
    @staticmethod
    def __call__(params: TensorTree) -> TransformState:
        """``state = init(params)``: build the initial state from a params tree.

        The method module's own ``init`` may take more arguments; ``build`` binds
        them so that the stored function has this one-argument signature.
        """


class UpdateFn(Protocol):
    @staticmethod
    def __call__(state: TransformState, batch: Any, inplace: bool = False) -> TransformState:
        """``state = update(state, batch, inplace=False)``: one step of the method.

        With ``inplace=True`` the tensors of ``state`` are overwritten and the
        returned state refers to them.
        """


class Transform(NamedTuple):
    """The pair of functions returned by every ``build``: ``init`` and ``update``,
    with all hyperparameters already bound."""

    init: InitFn
    update: UpdateFn
