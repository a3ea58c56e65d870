"""The test suite's one tolerance table and its tree comparison.

``TOL[dtype][kind]`` with two kinds of computation:

* ``"op"``: one kernel or hot op against a float64 oracle (a few roundings
  per entry, relative to the result's scale);
* ``"method"``: a method's step, utils function or solve, against posteriors
  0.0.5 or a float64 dense formula (factorisations and solves included);
* ``"solve"``: iterates of an iterative solver (CG) against another
  implementation: each iteration amplifies summation-order differences.
"""

import optree
import torch

TOL = {
    torch.float32: {
        "op": dict(rtol=2e-5, atol=2e-5),
        "method": dict(rtol=2e-4, atol=2e-5),
        "solve": dict(rtol=2e-3, atol=2e-4),
    },
    torch.float64: {
        "op": dict(rtol=1e-11, atol=1e-11),
        "method": dict(rtol=1e-9, atol=1e-10),
        "solve": dict(rtol=1e-9, atol=1e-10),
    },
}


def tol(dtype: torch.dtype, kind: str = "method", **override) -> dict:
    """``dict(rtol=..., atol=...)`` for ``assert_close`` (``override`` wins)."""
    return {**TOL[dtype][kind], **override}


def _is_state(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def assert_tree_close(actual, expected, dtype=None, kind: str = "method", **override) -> None:
    """``actual`` and ``expected`` have the same pytree structure (NamedTuple
    states: the same field names, compared field by field, since the two
    libraries' state classes differ), the same leaf shapes, and close values.

    ``dtype`` picks the tolerance (default: each leaf's own); ``expected`` is
    cast to ``actual``'s dtype. Non-tensor leaves must be equal.
    """
    if _is_state(actual) or _is_state(expected):
        assert _is_state(actual) and _is_state(expected), (type(actual), type(expected))
        assert actual._fields == expected._fields, (actual._fields, expected._fields)
        for field, a, b in zip(actual._fields, actual, expected):
            try:
                assert_tree_close(a, b, dtype, kind, **override)
            except AssertionError as err:
                raise AssertionError(f"field {field!r}: {err}") from err
        return
    got, want = optree.tree_structure(actual), optree.tree_structure(expected)
    assert got == want, f"tree structures differ: {got} vs {want}"
    for a, b in zip(optree.tree_leaves(actual), optree.tree_leaves(expected)):
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"expected a tensor leaf, got {type(a).__name__}"
            assert a.shape == b.shape, f"leaf shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
            torch.testing.assert_close(a, b.to(a.dtype), **tol(dtype or a.dtype, kind, **override))
        else:
            assert a == b, f"{a!r} != {b!r}"


def assert_close_to_oracle(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """A kernel's result against a float64 oracle: ``"op"`` tolerance with the
    absolute part relative to the oracle's largest entry (at least 1)."""
    t = TOL[dtype]["op"]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=t["rtol"], atol=t["atol"] * scale)
