"""The invariants every method shares, over the table of tests/methods.py:
it matches posteriors 0.0.5, an in-place update equals the functional one,
dtype and device are kept, and the compiled backend equals eager without
recompiling on the next update."""

import pytest
import torch
from optree import tree_leaves, tree_map

import posteriors_fast
from tests._compare import assert_tree_close
from tests.methods import METHODS

STEPS = 2


def _ids(rows):
    return [m.name for m in rows]


def _run(method, lib, dtype, inplace, backend=None, quiet=False, steps=STEPS):
    params, _ = method.problem(dtype)
    params = tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad), params)
    transform = method.build(lib, backend=backend, quiet=quiet)
    state = transform.init(params)
    for step in range(steps):
        _, batch = method.problem(dtype, seed=10 + step)
        torch.manual_seed(step)
        state = transform.update(state, batch, inplace=inplace)
    return state


def _comparable(state):
    """The state without torch.optim's optimizer object (compared through params)."""
    return state._replace(optimizer=None) if hasattr(state, "optimizer") else state


@pytest.mark.parametrize(
    "method", [m for m in METHODS if not m.reference], ids=_ids([m for m in METHODS if not m.reference])
)
def test_matches_posteriors_005(ref, method, dtype, backend):
    if dtype == torch.float64 and method.reference_float64:
        pytest.skip(method.reference_float64)
    quiet = method.noisy and backend == "compiled"  # other noise numbers, same distribution
    inplace = method.inplace_only  # the reference's in-place VI/torchopt return a stale optimizer state
    ours = _run(method, posteriors_fast, dtype, inplace, backend=backend, quiet=quiet)
    theirs = _run(method, ref, dtype, inplace, quiet=quiet)
    assert type(ours).__name__ == type(theirs).__name__
    assert_tree_close(_comparable(ours), _comparable(theirs), dtype)


@pytest.mark.parametrize(
    "method", [m for m in METHODS if not m.inplace_only], ids=_ids([m for m in METHODS if not m.inplace_only])
)
def test_inplace_equals_functional_and_keeps_the_tensors(method, dtype, backend):
    functional = _run(method, posteriors_fast, dtype, False, backend=backend)
    params, _ = method.problem(dtype)
    transform = method.build(posteriors_fast, backend=backend)
    state = transform.init(params)
    tensors = [t for t in tree_leaves(state.params)]
    for step in range(STEPS):
        _, batch = method.problem(dtype, seed=10 + step)
        torch.manual_seed(step)
        new = transform.update(state, batch, inplace=True)
        assert all(a is b for a, b in zip(tree_leaves(new.params), tensors))
        state = new
    assert_tree_close(state, functional, dtype)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_dtype_and_device_are_kept(method, backend):
    state = _run(method, posteriors_fast, torch.float64, method.inplace_only, backend=backend, steps=1)
    for leaf in tree_leaves(_comparable(state)._replace(aux=None)):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            assert leaf.dtype == torch.float64 and leaf.device.type == "cpu"


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_compiled_equals_eager_and_the_next_update_does_not_recompile(compile_after, monkeypatch, method):
    # Compile on the first call, so the second update is the one that must
    # reuse the graphs.
    compile_after(1)
    dtype = torch.float64
    eager = _run(method, posteriors_fast, dtype, method.inplace_only, backend="eager", quiet=True, steps=3)
    params, _ = method.problem(dtype)
    transform = method.build(posteriors_fast, backend="compiled", quiet=True)
    state = transform.init(tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad), params))
    for step in range(3):
        _, batch = method.problem(dtype, seed=10 + step)
        torch.manual_seed(step)
        if step >= 1:  # the second update and the next
            with torch._dynamo.config.patch(error_on_recompile=True):
                state = transform.update(state, batch, inplace=method.inplace_only)
        else:
            state = transform.update(state, batch, inplace=method.inplace_only)
    assert_tree_close(_comparable(state), _comparable(eager), dtype)
