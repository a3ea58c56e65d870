"""Argument validation with errors that name the argument and what is wrong.

Expensive checks of user matrices (symmetry, definiteness) are remembered per
tensor object and version, so passing the same tensor on every update costs one
check, not one per step.
"""

import contextlib
import math
from typing import Any, Iterator

import torch
from optree import tree_leaves, tree_paths, tree_structure

from posteriors_fast._internal.memo import TensorMemo

_validated = TensorMemo()


def scalar_value(x: Any, name: str) -> float:
    """``x`` as a Python float, or a TypeError if it is not a single number."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a number, got a bool")
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach().reshape(()).item())
    raise TypeError(f"{name} must be a number or a one-element tensor, got {type(x).__name__}")


def is_number(x: Any) -> bool:
    """A Python number or a one-element tensor (not a bool)."""
    if isinstance(x, bool):
        return False
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def finite_value(x: Any, name: str) -> float:
    """``x`` as a Python float, which must be finite (not NaN or inf)."""
    value = scalar_value(x, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def positive_finite(x: Any, name: str) -> float:
    """Validate a learning-rate-like hyperparameter: finite and > 0."""
    value = scalar_value(x, name)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and positive, got {value}")
    return value


def float_params(params: Any, name: str = "params") -> None:
    """Every leaf a floating-point tensor, and at least one leaf."""
    leaves = tree_leaves(params)
    if not leaves:
        raise ValueError(f"{name} has no tensors: nothing to put a distribution on")
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{name} must be a pytree of tensors; found a {type(leaf).__name__} leaf")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name} must hold floating-point tensors; found dtype {leaf.dtype} "
                f"(shape {tuple(leaf.shape)}). Convert it, e.g. with .float()."
            )


def _leading_dims(batch: Any) -> dict:
    """Leading dimension -> the shape of the first tensor leaf with it (0-d
    leaves under the key None)."""
    sizes: dict = {}
    for leaf in tree_leaves(batch):
        if isinstance(leaf, torch.Tensor):
            sizes.setdefault(leaf.shape[0] if leaf.ndim else None, tuple(leaf.shape))
    return sizes


def batch_leading_dim(batch: Any, name: str = "batch") -> int:
    """The common leading (sample) dimension of every tensor leaf of ``batch``
    (for methods that split the batch into samples); ValueError naming
    ``name`` when a leaf has none or the leaves disagree."""
    sizes = _leading_dims(batch)
    if None in sizes:
        raise ValueError(f"{name} has a 0-d tensor leaf; every leaf needs a leading sample dimension")
    if not sizes:
        raise ValueError(f"{name} contains no tensors with a sample dimension")
    if len(sizes) > 1:
        shapes = ", ".join(str(s) for s in sizes.values())
        raise ValueError(f"{name} leaves disagree on the leading (sample) dimension: shapes {shapes}")
    return next(iter(sizes))


def common_leading_dim(batch: Any) -> int | None:
    """The leading dimension every tensor leaf of ``batch`` shares, or None."""
    sizes = _leading_dims(batch)
    return next(iter(sizes)) if len(sizes) == 1 else None


@contextlib.contextmanager
def blame_batch(batch: Any, what: str, name: str = "batch") -> Iterator[None]:
    """Around a call of the user's function ``what`` on the whole batch: if it
    raises and the batch's tensor leaves disagree on their leading dimension,
    raise a ValueError that says so (chained to the original error) instead
    of the shape error from deep inside the model. A batch whose extra
    leaves have other sizes (class weights, say) is fine as long as the
    function accepts it."""
    try:
        yield
    except Exception as err:
        sizes = _leading_dims(batch)
        if len(sizes) > 1:
            shapes = ", ".join(str(s) for s in sizes.values())
            raise ValueError(
                f"{what} failed on this batch, whose leaves disagree on the leading (sample) "
                f"dimension (shapes {shapes}); make every leaf hold one entry per sample "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
            ) from err
        raise


def covariance(
    value: Any,
    size: int,
    like: torch.Tensor,
    name: str,
    allow_zero: bool,
) -> torch.Tensor | float:
    """Validate a covariance given as a scalar c (meaning c·I) or a (P, P) tensor.

    Args:
        value: The user's argument.
        size: P, the number of parameters.
        like: A tensor with the parameters' dtype and device.
        name: Argument name for messages.
        allow_zero: True for a transition covariance (positive semi-definite is
            enough), False for an initial covariance (positive definite).

    Returns:
        A Python float for scalar input, else the tensor on ``like``'s device and
        dtype (not copied if already there).
    """
    need = "positive semi-definite" if allow_zero else "positive definite"
    if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        c = scalar_value(value, name)
        if not math.isfinite(c) or c < 0 or (c == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{name} as a scalar c means c·I and needs c {bound} and finite, got {c}")
        return c
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a number or a ({size}, {size}) tensor, got {type(value).__name__}")
    if value.shape != (size, size):
        raise ValueError(
            f"{name} must be a scalar or a square ({size}, {size}) matrix matching the "
            f"{size} parameters, got shape {tuple(value.shape)}"
        )
    matrix = value.detach().to(device=like.device, dtype=like.dtype)
    tag = (name, allow_zero, like.dtype)
    if _validated.get(value, tag):
        return matrix
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} contains NaN or inf")
    scale = matrix.abs().max().clamp_min(torch.finfo(matrix.dtype).tiny)
    tol = 100 * torch.finfo(matrix.dtype).eps * scale
    if bool((matrix - matrix.mT).abs().max() > tol):
        raise ValueError(f"{name} must be symmetric; max |A - Aᵀ| = {float((matrix - matrix.mT).abs().max()):.3g}")
    if allow_zero:
        lowest = float(torch.linalg.eigvalsh(matrix).min())
        ok = lowest >= -float(tol) * size
    else:
        _, info = torch.linalg.cholesky_ex(matrix)
        ok = int(info) == 0
        lowest = float(torch.linalg.eigvalsh(matrix).min()) if not ok else 0.0
    if not ok:
        raise ValueError(f"{name} must be {need}; its smallest eigenvalue is {lowest:.3g}")
    _validated.put(value, True, tag)
    return matrix


def same_structure(tree: Any, reference: Any, name: str, reference_name: str) -> None:
    """``tree`` has the pytree structure and leaf shapes of ``reference``."""
    if tree_structure(tree) != tree_structure(reference):
        raise ValueError(
            f"{name} must have the same pytree structure as {reference_name}: "
            f"got {tree_structure(tree)}, expected {tree_structure(reference)}"
        )
    for a, b in zip(tree_leaves(tree), tree_leaves(reference)):
        if getattr(a, "shape", None) != getattr(b, "shape", None):
            raise ValueError(
                f"{name} leaf shapes must match {reference_name}: got "
                f"{tuple(getattr(a, 'shape', ()))}, expected {tuple(getattr(b, 'shape', ()))}"
            )


def finite_witness(tensors) -> torch.Tensor:
    """The sum of every entry of ``tensors`` (a non-empty list of floating-point
    tensors), as one 0-d tensor. Finite proves every entry finite (NaN or ±inf make the sum NaN or
    inf); not finite means a bad entry or finite entries so large that their
    sum overflows, which only an exact check can tell apart. Summing is one
    fast vectorised pass per tensor, and it fuses into a compiled graph."""
    if len(tensors) == 1:  # one op, not three: the common single-matrix check
        return tensors[0].sum()
    return torch.stack([t.sum() for t in tensors]).sum()


def witness_finite(witness: torch.Tensor) -> bool:
    """Whether a one-element :func:`finite_witness` is finite: one host sync
    through ``item()`` (``bool(torch.isfinite(w))`` launches a kernel first,
    several microseconds more per step)."""
    return math.isfinite(witness.item())


def all_finite(leaves) -> bool:
    """Whether every entry of every leaf is finite, with one host sync.

    Uses :func:`finite_witness`, one summing pass (a per-leaf
    ``isfinite().all()`` writes a boolean temporary per leaf and syncs per
    leaf). Only a non-finite witness pays for the exact check.
    """
    floats = [g for g in leaves if g.is_floating_point() or g.is_complex()]
    if not floats:
        return True
    if witness_finite(finite_witness(floats)):
        return True
    return all(bool(torch.isfinite(g).all()) for g in floats)


def _leaf_path(path) -> str:
    return "".join(f"[{key!r}]" for key in path)


def _where(obj, kind: str) -> str | None:
    """Where ``obj`` first holds NaN or inf, as the message suffix of its
    kind, or None if it is finite: ``"tensor"`` (no suffix), ``"sample"`` (a
    tensor whose leading dimension is the batch's samples) or ``"leaf"`` (a
    pytree of tensors)."""
    if kind == "leaf":
        leaves, paths = tree_leaves(obj), tree_paths(obj)
        for path, leaf in zip(paths, leaves):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
                return f" (leaf {_leaf_path(path)})" if path else ""
        return None
    if bool(torch.isfinite(obj).all()):
        return None
    if kind == "sample" and obj.dim() > 0:
        bad = ~torch.isfinite(obj.reshape(obj.shape[0], -1)).all(1)
        return f" (first at sample {int(bad.nonzero()[0, 0])} of this batch)"
    return ""


def _floats(obj, kind: str):
    leaves = tree_leaves(obj) if kind == "leaf" else [obj]
    return [x for x in leaves if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())]


def first_non_finite(labelled, witness: torch.Tensor | None = None) -> str | None:
    """The message for the first entry of ``labelled`` that holds NaN or inf,
    else None; one host sync when everything is finite.

    Each entry is ``(tensor, label)`` or ``(obj, label, kind)`` with ``kind``
    one of ``"tensor"``, ``"sample"`` (the message names the first bad
    sample) or ``"leaf"`` (``obj`` is a pytree; the message names the leaf).
    ``witness``, when given, is the :func:`finite_witness` of all of them
    already computed (inside a compiled graph, say)."""
    entries = [(e[0], e[1], e[2] if len(e) > 2 else "tensor") for e in labelled]
    if witness is None:
        tensors = [t for obj, _, kind in entries for t in _floats(obj, kind)]
        if not tensors:
            return None
        witness = finite_witness(tensors)
    if witness_finite(witness):
        return None
    for obj, label, kind in entries:
        where = _where(obj, kind)
        if where is not None:
            return label + where
    return None


def require_finite(labelled, witness: torch.Tensor | None = None) -> None:
    """Raise ``ValueError("<label><where>; the state was not changed")`` for
    the first entry of ``labelled`` holding NaN or inf (see
    :func:`first_non_finite`): the check every update makes before it writes
    anything."""
    bad = first_non_finite(labelled, witness)
    if bad is not None:
        raise ValueError(f"{bad}; the state was not changed")


def finite_params(params: Any, name: str = "params") -> None:
    """Every entry of every leaf of ``params`` finite; the error names the leaf."""
    bad = first_non_finite([(params, f"{name} hold a non-finite value (NaN or inf)", "leaf")])
    if bad is not None:
        raise ValueError(bad)
