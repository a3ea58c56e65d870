"""Curvature operators: same products as posteriors 0.0.5's ggnvp / fvp / hvp,
and cg with an operator equals cg with the equivalent closure."""

from functools import partial

import pytest
import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf
from posteriors_fast import operators
from tests._compare import assert_tree_close

from .ekf._problem import logits, make_problem


@pytest.fixture
def setup(dtype):
    params, batch = make_problem(9, dtype, seed=4)
    v = tree_map(lambda t: torch.randn_like(t), params)
    forward = partial(logits, x=batch["x"])
    loss = partial(torch.nn.functional.cross_entropy, target=batch["y"])
    return params, batch, v, forward, loss


@pytest.mark.parametrize("normalize", [False, True])
def test_ggn_operator_matches_reference_ggnvp(ref, setup, dtype, normalize):
    params, _, v, forward, loss = setup
    op = operators.ggn_operator(lambda p: forward(p), loss, params, normalize=normalize)
    want = ref.ggnvp(lambda p: forward(p), loss, (params,), (v,), normalize=normalize)[1]
    assert_tree_close(op(v), want, dtype)


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_operator_matches_reference_fvp(ref, setup, dtype, normalize):
    params, batch, v, forward, _ = setup

    def per_sample(p):
        return -torch.nn.functional.cross_entropy(forward(p), batch["y"], reduction="none")

    op = operators.fisher_operator(per_sample, params, normalize=normalize)
    assert_tree_close(op(v), ref.fvp(per_sample, (params,), (v,), normalize=normalize)[1], dtype)


def test_hessian_operator_matches_reference_hvp(ref, setup, dtype):
    params, _, v, forward, loss = setup

    def f(p):
        return loss(forward(p))

    assert_tree_close(operators.hessian_operator(f, params)(v), ref.hvp(f, (params,), (v,))[1], dtype)


def test_operator_falls_back_when_linearize_cannot_trace(setup, dtype, monkeypatch):
    monkeypatch.setattr(operators, "MATERIALIZE_ENTRIES", 0)  # force the linearised form
    monkeypatch.setattr(operators, "_use_graph", lambda p: False)
    params, _, v, forward, loss = setup

    def data_dependent(p):
        z = forward(p)
        return z * 2 if bool(z.sum() > -1e9) else z  # data-dependent branch

    op = operators.ggn_operator(data_dependent, loss, params)
    want = pf.ggnvp(data_dependent, loss, (params,), (v,))[1]
    assert_tree_close(op(v), want, dtype)


def test_cg_with_operator_equals_cg_with_closure(setup, dtype, backend):
    params, _, v, forward, loss = setup
    op = operators.ggn_operator(forward, loss, params, normalize=True)

    def closure(t):
        return pf.ggnvp(forward, loss, (params,), (t,), normalize=True)[1]

    x_op, info_op = pf.cg(op, v, maxiter=15, damping=0.1, backend=backend)
    x_cl, info_cl = pf.cg(closure, v, maxiter=15, damping=0.1, backend=backend)
    assert_tree_close(x_op, x_cl, dtype)
    assert info_op["niter"] == info_cl["niter"]


def test_cg_with_operator_solves_the_damped_system(setup, dtype, backend):
    params, _, v, forward, loss = setup
    op = operators.ggn_operator(forward, loss, params, normalize=True)
    rel = 1e-4 if dtype == torch.float32 else 1e-9
    x, info = pf.cg(op, v, damping=0.1, tol=rel, backend=backend)
    assert bool(info["converged"])
    flat_x, flat_v = tree_ravel(x)[0], tree_ravel(v)[0]
    residual = op.flat_matvec(flat_x) + 0.1 * flat_x - flat_v
    assert float(residual.norm()) <= 10 * rel * float(flat_v.norm())


@pytest.mark.parametrize("form", ["explicit-J", "autograd-graph", "linearized"])
def test_every_operator_form_agrees(setup, dtype, form, monkeypatch):
    params, batch, v, forward, loss = setup
    monkeypatch.setattr(operators, "MATERIALIZE_ENTRIES", 1 << 30 if form == "explicit-J" else 0)
    if form == "linearized":
        monkeypatch.setattr(operators, "_use_graph", lambda p: False)
    ggn = operators.ggn_operator(forward, loss, params, normalize=True)
    assert_tree_close(ggn(v), pf.ggnvp(forward, loss, (params,), (v,), normalize=True)[1], dtype)

    def per_sample(p):
        return -torch.nn.functional.cross_entropy(forward(p), batch["y"], reduction="none")

    fisher = operators.fisher_operator(per_sample, params, normalize=True)
    assert_tree_close(fisher(v), pf.fvp(per_sample, (params,), (v,), normalize=True)[1], dtype)


@pytest.mark.parametrize("form", ["autograd-graph", "linearized"])
def test_hessian_operator_forms(ref, setup, dtype, form, monkeypatch):
    params, _, v, forward, loss = setup
    if form == "linearized":
        monkeypatch.setattr(operators, "_use_graph", lambda p: False)

    def f(p):
        return loss(forward(p))

    op = operators.hessian_operator(f, params)
    assert_tree_close(op(v), ref.hvp(f, (params,), (v,))[1], dtype)
    assert_tree_close(op(v), op(v), dtype)  # the kept graph serves repeated products


def test_ggn_operator_with_coupled_loss(ref, setup, dtype, monkeypatch):
    monkeypatch.setattr(operators, "MATERIALIZE_ENTRIES", 0)
    params, _, v, forward, _ = setup

    def loss(z):
        return z.sum() ** 2 / 100 + (z**2).mean()  # not block diagonal

    op = operators.ggn_operator(forward, loss, params, normalize=True)
    assert_tree_close(op(v), ref.ggnvp(forward, loss, (params,), (v,), normalize=True)[1], dtype)
