"""tree_utils against posteriors 0.0.5: outputs and in-place side effects."""

import optree
import pytest
import torch
from optree import tree_map

import posteriors_fast as pf

from ._trees import KINDS, random_params


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _with_grad_flags(tree):
    leaves, spec = optree.tree_flatten(tree)
    leaves = [leaf.clone().requires_grad_(i % 2 == 0) for i, leaf in enumerate(leaves)]
    return optree.tree_unflatten(spec, leaves)


def _equal(a, b):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        assert torch.equal(x.detach(), y.detach())


def test_tree_size(ref, kind):
    tree = random_params(kind, torch.float32)
    assert pf.tree_size(tree) == ref.tree_size(tree)
    assert type(pf.tree_size(tree)) is type(ref.tree_size(tree))
    assert pf.tree_size(torch.ones(4, 2)) == ref.tree_size(torch.ones(4, 2)) == 8
    assert pf.tree_size({"a": 1.0, "b": torch.ones(3)}) == ref.tree_size({"a": 1.0, "b": torch.ones(3)})


def test_extract_and_insert(ref, kind):
    tree = _with_grad_flags(random_params(kind, torch.float32))
    _equal(pf.extract_requires_grad(tree), ref.extract_requires_grad(tree))
    _equal(pf.tree_extract(tree, lambda x: x.ndim > 1), ref.tree_extract(tree, lambda x: x.ndim > 1))
    sub = tree_map(lambda x: x.detach() + 1, tree)
    _equal(pf.insert_requires_grad(tree, sub), ref.insert_requires_grad(tree, sub))
    _equal(pf.tree_insert(tree, sub, lambda x: x.ndim == 1), ref.tree_insert(tree, sub, lambda x: x.ndim == 1))
    _equal(pf.tree_insert(tree, sub), ref.tree_insert(tree, sub))


@pytest.mark.parametrize("fn", ["tree_insert_", "insert_requires_grad_"])
def test_inplace_inserts(ref, kind, fn):
    a = _with_grad_flags(random_params(kind, torch.float32))
    b = tree_map(lambda x: x.detach().clone().requires_grad_(x.requires_grad), a)
    sub = tree_map(lambda x: x.detach() * 3, a)
    out_a = getattr(pf, fn)(a, sub)
    out_b = getattr(ref, fn)(b, sub)
    assert out_a is a
    _equal(a, b)
    _equal(out_a, out_b)


@pytest.mark.parametrize("inplace", [False, True])
def test_extract_requires_grad_and_func(ref, kind, inplace):
    a = _with_grad_flags(random_params(kind, torch.float32))
    b = tree_map(lambda x: x.detach().clone().requires_grad_(x.requires_grad), a)

    def func(tree, scale):
        return sum(x.sum() for x in optree.tree_leaves(tree)) * scale

    sub_a, f_a = pf.extract_requires_grad_and_func(a, func, inplace=inplace)
    sub_b, f_b = ref.extract_requires_grad_and_func(b, func, inplace=inplace)
    _equal(sub_a, sub_b)
    new_sub = tree_map(lambda x: x.detach() + 2, sub_a)
    torch.testing.assert_close(f_a(new_sub, 2.0), f_b(new_sub, 2.0))
    _equal(a, b)


def test_inplacify(ref):
    x, y = torch.arange(4.0), torch.arange(4.0)
    out_x = pf.inplacify(lambda t, s: t * s)(x, 3.0)
    ref.inplacify(lambda t, s: t * s)(y, 3.0)
    assert out_x is x
    assert torch.equal(x, y)


@pytest.mark.parametrize("inplace", [False, True])
def test_flexi_tree_map(ref, kind, inplace):
    a = random_params(kind, torch.float32)
    b = tree_map(torch.clone, a)
    other = random_params(kind, torch.float32, seed=9)
    out_a = pf.flexi_tree_map(lambda x, y: x * 2 + y, a, other, inplace=inplace)
    out_b = ref.flexi_tree_map(lambda x, y: x * 2 + y, b, other, inplace=inplace)
    _equal(out_a, out_b)
    _equal(a, b)
    assert (out_a is a) == inplace


def test_tree_map_inplacify_(ref, kind):
    a = random_params(kind, torch.float64)
    b = tree_map(torch.clone, a)
    pf.tree_map_inplacify_(lambda x: x.exp(), a)
    ref.tree_map_inplacify_(lambda x: x.exp(), b)
    _equal(a, b)


def test_types_match_reference(ref):
    from posteriors_fast import types

    for name in (
        "TensorTree",
        "LogProbFn",
        "ForwardFn",
        "OuterLogProbFn",
        "TransformState",
        "InitFn",
        "UpdateFn",
        "Transform",
    ):
        assert hasattr(types, name), name
    assert types.Transform._fields == ref.types.Transform._fields
    assert types.TransformState._fields == ref.types.TransformState._fields
