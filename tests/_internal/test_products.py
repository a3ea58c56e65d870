"""hvp / fvp / ggnvp: the autograd forms against the torch.func forms and the
reference, and the fallbacks (several primals, leaves requiring grad, inside a
torch.func transform, unused leaves)."""

from functools import partial

import pytest
import torch
from optree import tree_leaves, tree_map

import posteriors_fast as pf
from posteriors_fast._internal import products

from .._trees import forward, random_batch, random_params


def _close(a, b):
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)


@pytest.fixture
def problem():
    params = random_params("nested", torch.float64)
    x, y = random_batch(5, torch.float64)
    v = tree_map(lambda t: torch.randn_like(t), params)
    return params, x, y, v


def test_applicable():
    p = {"a": torch.ones(2)}
    assert products.applicable((p,), (p,))
    assert not products.applicable((p, p), (p, p))
    assert not products.applicable(({"a": torch.ones(2, requires_grad=True)},), (p,))
    assert not products.applicable(({"a": torch.ones(2, dtype=torch.int64)},), (p,))


def test_autograd_forms_equal_transform_forms(ref, problem):
    params, x, y, v = problem
    loss = partial(torch.nn.functional.cross_entropy, target=y)

    def f(p):
        return loss(forward(p, x)), x.sum()

    def per_sample(p):
        return -torch.nn.functional.cross_entropy(forward(p, x), y, reduction="none")

    _close(products.hvp(f, params, v, True), ref.hvp(f, (params,), (v,), has_aux=True))
    _close(products.fvp(per_sample, params, v, False, True), ref.fvp(per_sample, (params,), (v,), normalize=True))
    _close(
        products.ggnvp(partial(forward, x=x), loss, params, v, False, False, True),
        ref.ggnvp(partial(forward, x=x), loss, (params,), (v,), normalize=True),
    )


def test_several_primals_fall_back(ref, problem):
    params, x, y, v = problem
    scale = torch.tensor(1.3, dtype=torch.float64)

    def f(p, s):
        return torch.nn.functional.cross_entropy(forward(p, x) * s, y)

    tangents = (v, torch.tensor(0.7, dtype=torch.float64))
    _close(pf.hvp(f, (params, scale), tangents), ref.hvp(f, (params, scale), tangents))


def test_params_requiring_grad_fall_back(ref, problem):
    params, x, y, v = problem
    params = tree_map(lambda t: t.clone().requires_grad_(True), params)

    def f(p):
        return torch.nn.functional.cross_entropy(forward(p, x), y)

    _close(pf.hvp(f, (params,), (v,)), ref.hvp(f, (params,), (v,)))


def test_inside_vmap_falls_back(ref, problem):
    params, x, y, _ = problem

    def f(p):
        return torch.nn.functional.cross_entropy(forward(p, x), y)

    tangents = tree_map(lambda t: torch.randn(3, *t.shape, dtype=t.dtype), params)
    ours = torch.func.vmap(lambda t: pf.hvp(f, (params,), (t,))[1])(tangents)
    theirs = torch.func.vmap(lambda t: ref.hvp(f, (params,), (t,))[1])(tangents)
    _close(ours, theirs)


def test_unused_leaf_gives_zeros(ref):
    params = {"used": torch.randn(3, dtype=torch.float64), "unused": torch.randn(2, dtype=torch.float64)}
    v = tree_map(torch.ones_like, params)

    def f(p):
        return (p["used"] ** 3).sum()

    ours = pf.hvp(f, (params,), (v,))
    _close(ours, ref.hvp(f, (params,), (v,)))
    assert torch.equal(ours[1]["unused"], torch.zeros(2, dtype=torch.float64))

    def g(p):
        return p["used"] * 2.0  # linear: zero Hessian, unused leaf

    _close(pf.fvp(g, (params,), (v,)), ref.fvp(g, (params,), (v,)))
    _close(pf.ggnvp(g, lambda z: z.sum(), (params,), (v,)), ref.ggnvp(g, lambda z: z.sum(), (params,), (v,)))
