"""ekf.dense_fisher against a float64 dense formula, the reference's
log-likelihood/aux, sampling shapes and moments, over both backends."""

import pytest
import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf
from posteriors_fast.ekf import dense_fisher
from tests._compare import tol

from ._problem import (
    log_likelihood,
    log_likelihood_per_sample,
    make_problem,
    oracle_step,
)

# (mean/cov tolerance) per dtype: float32 loses ~1e-5 relative in the solves.
P = 28  # parameters of make_problem's model


def _flat(tree):
    return tree_ravel(tree)[0]


@pytest.mark.parametrize("n", [1, 5, 40], ids=["N=1", "N<P", "N>P"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_update_matches_dense_formula(backend, dtype, n, per_sample, inplace):
    params, batch = make_problem(n, dtype)
    ll = log_likelihood_per_sample if per_sample else log_likelihood
    lr, q = 0.7, 0.05
    transform = dense_fisher.build(ll, lr, transition_cov=q, per_sample=per_sample, init_cov=0.5, backend=backend)
    state = transform.init(tree_map(torch.clone, params))
    want_mean, want_cov, want_ll = oracle_step(params, state.cov, batch, lr, q)

    new = transform.update(state, batch, inplace=inplace)

    assert new.cov.dtype == dtype and new.cov.shape == (P, P)
    torch.testing.assert_close(new.cov, want_cov.to(dtype), **tol(dtype))
    torch.testing.assert_close(_flat(new.params), want_mean.to(dtype), **tol(dtype))
    torch.testing.assert_close(new.log_likelihood, want_ll.to(dtype), **tol(dtype))
    assert new.log_likelihood.shape == ()
    want_aux = (
        log_likelihood_per_sample(params, batch)[1]
        if per_sample
        else torch.stack([log_likelihood(params, tree_map(lambda t, i=i: t[i : i + 1], batch))[1] for i in range(n)])
    )
    torch.testing.assert_close(new.aux, want_aux, **tol(dtype))
    torch.testing.assert_close(new.cov, new.cov.T, rtol=0, atol=0)
    if inplace:
        assert new.cov is state.cov and new.params["w1"] is state.params["w1"]
        torch.testing.assert_close(state.cov, want_cov.to(dtype), **tol(dtype))
    else:
        torch.testing.assert_close(state.cov, 0.5 * torch.eye(P, dtype=dtype))
        torch.testing.assert_close(state.params["w1"], params["w1"])


def test_tensor_transition_and_init_cov(backend):
    params, batch = make_problem(6, torch.float64, seed=3)
    a = torch.randn(P, P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    init_cov = a @ a.T / P + 0.2 * torch.eye(P, dtype=torch.float64)
    q = torch.diag(torch.linspace(0.0, 0.1, P, dtype=torch.float64))
    transform = dense_fisher.build(log_likelihood, 0.3, q, init_cov=init_cov, backend=backend)
    state = transform.init(params)
    assert state.cov is not init_cov
    torch.testing.assert_close(state.cov, init_cov)
    new = transform.update(state, batch)
    want_mean, want_cov, _ = oracle_step(params, init_cov, batch, 0.3, q)
    torch.testing.assert_close(new.cov, want_cov, **tol(torch.float64))
    torch.testing.assert_close(_flat(new.params), want_mean, **tol(torch.float64))


def test_many_steps_stay_positive_definite_and_shrink(backend, dtype):
    params, _ = make_problem(1, dtype)
    transform = dense_fisher.build(log_likelihood, 0.5, init_cov=1.0, backend=backend)
    state = transform.init(params)
    traces = [float(state.cov.trace())]
    for step in range(25):
        _, batch = make_problem(8, dtype, seed=100 + step)
        state = transform.update(state, batch, inplace=step % 2 == 0)
        traces.append(float(state.cov.trace()))
        assert int(torch.linalg.cholesky_ex(state.cov)[1]) == 0
    # Without transition noise the precision only grows: the trace never increases.
    assert all(b <= a * (1 + 1e-5) for a, b in zip(traces, traces[1:]))
    assert traces[-1] < traces[0]


def test_log_likelihood_and_aux_match_reference(ref, backend, dtype):
    params, batch = make_problem(7, dtype, seed=5)
    ours = dense_fisher.build(log_likelihood, 1e-3, init_cov=1e-2, backend=backend)
    theirs = ref.ekf.dense_fisher.build(log_likelihood, 1e-3, init_cov=1e-2)
    a = ours.update(ours.init(params), batch)
    b = theirs.update(theirs.init(params), batch)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood.to(dtype), **tol(dtype))
    torch.testing.assert_close(a.aux, b.aux, **tol(dtype))
    assert type(a).__name__ == type(b).__name__ == "EKFDenseState"
    assert a._fields == b._fields


def test_state_and_build_signatures_match_reference(ref):
    import inspect

    for name in ("build", "init", "update", "sample"):
        ours = inspect.signature(getattr(dense_fisher, name)).parameters
        theirs = inspect.signature(getattr(ref.ekf.dense_fisher, name)).parameters
        extra = [k for k in ours if k not in theirs]
        assert list(theirs) == [k for k in ours if k in theirs], name
        assert extra in ([], ["backend"], ["process_group"], ["backend", "process_group"]), name
        for k, p in theirs.items():
            if k in ("transition_cov", "init_cov", "sample_shape", "per_sample", "inplace"):
                assert ours[k].default == p.default, (name, k)


@pytest.mark.parametrize("shape", [(), (5,), (2, 3)])
def test_sample_shapes(shape, dtype):
    params, batch = make_problem(4, dtype)
    transform = dense_fisher.build(log_likelihood, 0.5)
    state = transform.update(transform.init(params), batch)
    draws = dense_fisher.sample(state, torch.Size(shape))
    for key in ("w1", "b1"):
        assert draws[key].shape == torch.Size(shape) + params[key].shape
        assert draws[key].dtype == dtype
    assert draws["head"]["w2"].shape == torch.Size(shape) + params["head"]["w2"].shape


def test_sample_moments():
    torch.manual_seed(0)
    mean = {"a": torch.tensor([1.0, -2.0], dtype=torch.float64), "b": torch.tensor([0.5], dtype=torch.float64)}
    cov = torch.tensor([[2.0, 0.6, 0.1], [0.6, 1.0, -0.3], [0.1, -0.3, 0.5]], dtype=torch.float64)
    state = dense_fisher.EKFDenseState(mean, cov)
    draws = dense_fisher.sample(state, (40000,))
    flat = torch.cat([draws["a"], draws["b"]], dim=1)
    # Standard errors at 40k draws are ~0.007 for the mean and ~0.015 for the covariance.
    torch.testing.assert_close(flat.mean(0), _flat(mean), rtol=0, atol=0.04)
    torch.testing.assert_close(flat.T.cov(), cov, rtol=0, atol=0.06)


def test_sample_matches_reference_draws_for_same_seed(ref):
    params, batch = make_problem(4, torch.float64)
    transform = dense_fisher.build(log_likelihood, 0.5)
    state = transform.update(transform.init(params), batch)
    ref_state = ref.ekf.dense_fisher.EKFDenseState(state.params, state.cov)
    torch.manual_seed(11)
    ours = dense_fisher.sample(state, (6,))
    torch.manual_seed(11)
    theirs = ref.ekf.dense_fisher.sample(ref_state, (6,))
    for a, b in zip(tree_ravel(ours)[0], tree_ravel(theirs)[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_sample_factor_is_refreshed_after_inplace_update():
    params, batch = make_problem(4, torch.float64)
    transform = dense_fisher.build(log_likelihood, 0.5, init_cov=2.0)
    state = transform.init(params)
    dense_fisher.sample(state, (2,))  # caches the factor of the initial covariance
    transform.update(state, batch, inplace=True)
    torch.manual_seed(0)
    noise = torch.randn(3, P, dtype=torch.float64)
    want = _flat(state.params) + noise @ torch.linalg.cholesky(state.cov).T
    torch.manual_seed(0)
    got = dense_fisher.sample(state, (3,))
    # optree ravel order: sorted keys b1, head.w2, w1.
    got = torch.cat([got["b1"], got["head"]["w2"].reshape(3, -1), got["w1"].reshape(3, -1)], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_default_backend_comes_from_global_setting(monkeypatch):
    monkeypatch.setattr("posteriors_fast.backends.selection._global_default", None)
    with pf.use_backend("compiled"):
        transform = dense_fisher.build(log_likelihood, 0.1)
    assert transform.update.keywords["backend"] == "compiled"
    assert dense_fisher.build(log_likelihood, 0.1).update.keywords["backend"] == "eager"


def test_chunked_jacobian_gives_the_same_update():
    from posteriors_fast._internal import jacobian_budget

    params, batch = make_problem(9, torch.float64)
    transform = dense_fisher.build(log_likelihood, 0.4)
    whole = transform.update(transform.init(params), batch)
    previous = jacobian_budget.set_budget_mb(2 * P * 8 / 2**20)  # two samples per vmap chunk
    try:
        chunked = transform.update(transform.init(params), batch)
    finally:
        jacobian_budget.set_budget_mb(previous)
    torch.testing.assert_close(chunked.cov, whole.cov)
    torch.testing.assert_close(chunked.aux, whole.aux)
