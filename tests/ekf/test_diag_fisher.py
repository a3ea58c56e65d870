"""ekf.diag_fisher against posteriors 0.0.5 and a float64 formula; bad input and
inplace atomicity; sampling."""

import pytest
import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast.ekf import diag_fisher
from tests._compare import assert_tree_close, tol

from .._trees import KINDS, forward, random_batch, random_params
from ..methods import log_likelihood as _ll
from ..methods import log_likelihood_per_sample as _ll_per_sample


@pytest.mark.parametrize("kind", ["dict", "nested"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference(ref, backend, dtype, kind, per_sample, inplace):
    params, batch = random_params(kind, dtype), random_batch(6, dtype)
    ll = _ll_per_sample if per_sample else _ll
    ours = diag_fisher.build(ll, 0.3, transition_sd=0.1, per_sample=per_sample, init_sds=0.7, backend=backend)
    theirs = ref.ekf.diag_fisher.build(ll, 0.3, transition_sd=0.1, per_sample=per_sample, init_sds=0.7)
    a_state = ours.init(tree_map(torch.clone, params))
    b_state = theirs.init(tree_map(torch.clone, params))
    a = ours.update(a_state, batch, inplace=inplace)
    b = theirs.update(b_state, batch, inplace=inplace)
    assert_tree_close(a.params, b.params, dtype)
    assert_tree_close(a.sd_diag, b.sd_diag, dtype)
    torch.testing.assert_close(a.log_likelihood, b.log_likelihood, **tol(dtype))
    torch.testing.assert_close(a.aux, b.aux, **tol(dtype))
    if inplace:
        assert a.params is a_state.params
        assert_tree_close(a_state.sd_diag, b.sd_diag, dtype)
    else:
        assert_tree_close(a_state.params, params, dtype)  # the input state is untouched


def test_matches_float64_formula(backend):
    params, (x, y) = random_params("dict", torch.float64), random_batch(5, torch.float64)
    lr, tau = 0.5, 0.2
    sds = tree_map(lambda t: torch.rand_like(t) + 0.5, params)
    state = diag_fisher.EKFDiagState(params, sds)
    new = diag_fisher.update(state, (x, y), _ll, lr, tau, backend=backend)
    flat, unravel = tree_ravel(params)

    def one(fp, xi, yi):
        return -torch.nn.functional.cross_entropy(forward(unravel(fp), xi[None]), yi[None])

    jac = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(flat, x, y)
    var = 1.0 / (1.0 / (tree_ravel(sds)[0] ** 2 + tau**2) + lr * (jac**2).mean(0))
    torch.testing.assert_close(tree_ravel(new.sd_diag)[0], var.sqrt())
    torch.testing.assert_close(tree_ravel(new.params)[0], flat + lr * var * jac.mean(0))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_same_seed_as_reference(ref, kind):
    params = random_params(kind, torch.float32)
    state = diag_fisher.init(params, 0.4)
    torch.manual_seed(3)
    a = diag_fisher.sample(state, (5,))
    torch.manual_seed(3)
    b = ref.ekf.diag_fisher.sample(ref.ekf.diag_fisher.init(params, 0.4), (5,))
    assert_tree_close(a, b, torch.float32)
    for leaf, p in zip(tree_leaves(a), tree_leaves(params)):
        assert leaf.shape == (5,) + p.shape


def test_init_copies_tree_init_sds():
    params = random_params("dict", torch.float64)
    sds = tree_map(lambda t: torch.full_like(t, 0.3), params)
    state = diag_fisher.init(params, sds)
    diag_fisher.update(state, random_batch(4, torch.float64), _ll, 0.5, inplace=True)
    assert all(torch.equal(s, torch.full_like(s, 0.3)) for s in tree_leaves(sds))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr must be finite and positive"),
        (dict(lr=float("nan")), "lr must be finite and positive"),
        (dict(transition_sd=-0.1), "transition_sd must be finite and >= 0"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    args = dict(log_likelihood=_ll, lr=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        diag_fisher.build(**args)


def test_bad_init_sds():
    params = random_params("dict", torch.float64)
    with pytest.raises(ValueError, match="init_sds must be finite and positive"):
        diag_fisher.init(params, -1.0)
    with pytest.raises(ValueError, match="init_sds must have the same pytree structure as params"):
        diag_fisher.init(params, {"w1": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="init_sds must be positive everywhere"):
        diag_fisher.init(params, tree_map(torch.zeros_like, params))


def _nan_ll(p, batch):
    value, z = _ll(p, batch)
    return value * float("nan"), z


@pytest.mark.parametrize(
    "ll, match", [(_nan_ll, "log_likelihood returned NaN"), (lambda p, b: _ll(p, b)[0], "Auxiliary output not found")]
)
def test_failed_inplace_update_leaves_state_untouched(ll, match):
    params, batch = random_params("nested", torch.float64), random_batch(4, torch.float64)
    state = diag_fisher.update(diag_fisher.init(params, 0.5), batch, _ll, 0.1)
    before = [(t.clone(), t.data_ptr()) for t in tree_leaves((state.params, state.sd_diag, state.log_likelihood))]
    with pytest.raises((ValueError, RuntimeError), match=match):
        diag_fisher.update(state, batch, ll, 0.1, inplace=True)
    after = tree_leaves((state.params, state.sd_diag, state.log_likelihood))
    assert all(torch.equal(t, old) and t.data_ptr() == ptr for t, (old, ptr) in zip(after, before))


def test_batch_leading_dims_disagree():
    params, (x, y) = random_params("dict", torch.float64), random_batch(4, torch.float64)
    with pytest.raises(ValueError, match="batch leaves disagree"):
        diag_fisher.update(diag_fisher.init(params), (x, y[:2]), _ll, 0.1)
