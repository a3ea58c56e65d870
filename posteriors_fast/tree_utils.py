"""Helpers for pytrees of tensors (optree conventions, global namespace)."""

from typing import Callable, Tuple

import torch
from optree import tree_map, tree_map_, tree_reduce

from posteriors_fast.types import TensorTree


def _numel(x) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else torch.tensor(x).numel()


def tree_size(tree: TensorTree) -> int:
    """Total number of scalar elements over all leaves of ``tree``.

    Non-tensor leaves (Python numbers) count as one element each. As in
    posteriors 0.0.5 the count is accumulated with ``torch.add``, so a tree with
    several leaves gives a 0-d integer tensor and a single leaf a Python int.

    Args:
        tree: A pytree of tensors or numbers.

    Returns:
        Number of elements.
    """
    return tree_reduce(torch.add, tree_map(_numel, tree))


def tree_extract(tree: TensorTree, f: Callable[[torch.Tensor], bool]) -> TensorTree:
    """Keep the leaves for which ``f`` is True; the others become empty tensors
    (on the leaf's device), so the tree keeps its structure.

    Args:
        tree: A pytree of tensors.
        f: Predicate evaluated on each leaf.

    Returns:
        A tree of the same structure.
    """

    def keep_or_empty(x):
        return x if f(x) else torch.tensor([], device=x.device)

    return tree_map(keep_or_empty, tree)


def tree_insert(
    full_tree: TensorTree,
    sub_tree: TensorTree,
    f: Callable[[torch.Tensor], bool] = lambda _: True,
) -> TensorTree:
    """New tree taking ``sub_tree``'s leaf wherever ``f(full_leaf)`` is True and
    ``full_tree``'s leaf elsewhere. Both trees share one structure.

    Args:
        full_tree: Tree supplying the leaves where ``f`` is False.
        sub_tree: Tree supplying the leaves where ``f`` is True.
        f: Predicate on the leaves of ``full_tree``; defaults to always True.

    Returns:
        The merged tree (no tensor is copied).
    """
    return tree_map(lambda sub, full: sub if f(full) else full, sub_tree, full_tree)


def tree_insert_(
    full_tree: TensorTree,
    sub_tree: TensorTree,
    f: Callable[[torch.Tensor], bool] = lambda _: True,
) -> TensorTree:
    """In-place :func:`tree_insert`: each selected leaf of ``full_tree`` has its
    ``.data`` rebound to the matching leaf of ``sub_tree``.

    Args:
        full_tree: Tree whose tensors are modified.
        sub_tree: Tree of new values.
        f: Predicate on the leaves of ``full_tree``; defaults to always True.

    Returns:
        ``full_tree`` itself.
    """

    def rebind(full, sub):
        if f(full):
            full.data = sub.data

    return tree_map_(rebind, full_tree, sub_tree)


def extract_requires_grad(tree: TensorTree) -> TensorTree:
    """:func:`tree_extract` keeping the leaves with ``requires_grad=True``."""
    return tree_extract(tree, lambda x: x.requires_grad)


def insert_requires_grad(full_tree: TensorTree, sub_tree: TensorTree) -> TensorTree:
    """:func:`tree_insert` at the leaves of ``full_tree`` that require grad."""
    return tree_insert(full_tree, sub_tree, lambda x: x.requires_grad)


def insert_requires_grad_(full_tree: TensorTree, sub_tree: TensorTree) -> TensorTree:
    """:func:`tree_insert_` at the leaves of ``full_tree`` that require grad."""
    return tree_insert_(full_tree, sub_tree, lambda x: x.requires_grad)


def extract_requires_grad_and_func(
    tree: TensorTree, func: Callable, inplace: bool = False
) -> Tuple[TensorTree, Callable]:
    """Split off the trainable leaves of ``tree`` and adapt ``func`` to them.

    Args:
        tree: Full pytree of tensors.
        func: Function taking the full tree as its first argument.
        inplace: If True the adapted function writes the subtree into ``tree``
            in place before calling ``func``; otherwise it builds a new tree.

    Returns:
        ``(subtree, subfunc)`` where ``subfunc(subtree, *args, **kwargs)`` calls
        ``func`` on the full tree with the subtree's values inserted.
    """
    subtree = extract_requires_grad(tree)
    insert = insert_requires_grad_ if inplace else insert_requires_grad

    def subfunc(sub, *args, **kwargs):
        return func(insert(tree, sub), *args, **kwargs)

    return subtree, subfunc


def inplacify(func: Callable) -> Callable:
    """Turn ``func(tensor, *args) -> new_tensor`` into a function that rebinds the
    first argument's ``.data`` to the result and returns that tensor."""

    def func_(tens, *args, **kwargs):
        tens.data = func(tens, *args, **kwargs)
        return tens

    return func_


def tree_map_inplacify_(
    func: Callable,
    tree: TensorTree,
    *rests: TensorTree,
    is_leaf: Callable[[TensorTree], bool] | None = None,
    none_is_leaf: bool = False,
    namespace: str = "",
) -> TensorTree:
    """Map a pure ``func`` over ``tree`` (and ``rests``), writing each result into
    the corresponding leaf of ``tree`` in place.

    Args:
        func: Pure function ``func(leaf, *rest_leaves) -> new_leaf``.
        tree: Tree whose leaves are overwritten.
        *rests: Trees with ``tree``'s structure (or having it as a prefix).
        is_leaf: optree ``is_leaf`` predicate.
        none_is_leaf: optree ``none_is_leaf`` flag.
        namespace: optree registry namespace.

    Returns:
        ``tree`` itself, modified.
    """
    return tree_map_(
        inplacify(func),
        tree,
        *rests,
        is_leaf=is_leaf,
        none_is_leaf=none_is_leaf,
        namespace=namespace,
    )


def flexi_tree_map(
    func: Callable,
    tree: TensorTree,
    *rests: TensorTree,
    inplace: bool = False,
    is_leaf: Callable[[TensorTree], bool] | None = None,
    none_is_leaf: bool = False,
    namespace: str = "",
) -> TensorTree:
    """``optree.tree_map`` when ``inplace=False``; :func:`tree_map_inplacify_`
    (results written into ``tree``'s tensors) when ``inplace=True``.

    Args:
        func: Pure function ``func(leaf, *rest_leaves) -> new_leaf`` of the
            same shape as ``leaf``.
        tree: Tree to map over.
        *rests: Trees with ``tree``'s structure (or having it as a prefix).
        inplace: Whether to overwrite ``tree``'s tensors.
        is_leaf: optree ``is_leaf`` predicate.
        none_is_leaf: optree ``none_is_leaf`` flag.
        namespace: optree registry namespace.

    Returns:
        A new tree, or ``tree`` itself when ``inplace=True``.
    """
    mapper = tree_map_inplacify_ if inplace else tree_map
    return mapper(
        func,
        tree,
        *rests,
        is_leaf=is_leaf,
        none_is_leaf=none_is_leaf,
        namespace=namespace,
    )
