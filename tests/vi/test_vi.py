"""vi.diag and vi.dense against posteriors 0.0.5 for the same seed, the fixed
defects, sampling and bad input."""

import pytest
import torch
import torchopt
from optree import tree_leaves, tree_map

from posteriors_fast import vi
from tests._compare import assert_tree_close, tol

from .._trees import forward, random_batch, random_params


def _log_post(p, batch):
    x, y = batch
    z = forward(p, x)
    prior = sum((t**2).sum() for t in tree_leaves(p))
    return -torch.nn.functional.cross_entropy(z, y) - 0.05 * prior, z


def _run(module, params, dtype, inplace, seed_offset=0, steps=3, **kwargs):
    transform = module.build(_log_post, torchopt.adam(1e-2), **kwargs)
    state = transform.init(tree_map(torch.clone, params))
    for step in range(steps):
        torch.manual_seed(step + seed_offset)
        state = transform.update(state, random_batch(5, dtype, seed=step), inplace=inplace)
    return state


@pytest.mark.parametrize("kind", ["dict", "nested"])
@pytest.mark.parametrize("stl", [False, True])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_diag_matches_reference(ref, dtype, kind, stl, n_samples):
    params = random_params(kind, dtype)
    ours = _run(vi.diag, params, dtype, False, stl=stl, n_samples=n_samples, init_log_sds=-1.0)
    theirs = _run(ref.vi.diag, params, dtype, False, stl=stl, n_samples=n_samples, init_log_sds=-1.0)
    assert_tree_close(ours.params, theirs.params, dtype)
    assert_tree_close(ours.log_sd_diag, theirs.log_sd_diag, dtype)
    torch.testing.assert_close(ours.nelbo, theirs.nelbo, **tol(dtype))


@pytest.mark.parametrize("n_samples", [1, 3])
def test_dense_matches_reference_without_stl(ref, n_samples):
    # float32 only: posteriors 0.0.5's vi.dense cannot run float64 parameters
    # (its initial L is float32; see test_identity_on_params_dtype).
    dtype = torch.float32
    params = random_params("dict", dtype)
    ours = _run(vi.dense, params, dtype, False, stl=False, n_samples=n_samples, init_L=0.3)
    theirs = _run(ref.vi.dense, params, dtype, False, stl=False, n_samples=n_samples, init_L=0.3)
    assert_tree_close(ours.params, theirs.params, dtype)
    torch.testing.assert_close(ours.L_factor, theirs.L_factor.to(dtype), **tol(dtype))
    torch.testing.assert_close(ours.nelbo, theirs.nelbo.to(dtype), **tol(dtype))


def test_dense_stl_holds_the_mean_constant_in_log_q(ref):
    params = random_params("dict", torch.float32)
    ours = _run(vi.dense, params, torch.float32, False, steps=1, stl=True, init_L=0.3)
    theirs = _run(ref.vi.dense, params, torch.float32, False, steps=1, stl=True, init_L=0.3)
    # One step from the same state: the ELBO values agree and so does the
    # factor's update (its estimator is the same); only the mean's differs.
    torch.testing.assert_close(ours.nelbo, theirs.nelbo, **tol(torch.float32))
    torch.testing.assert_close(ours.L_factor, theirs.L_factor, **tol(torch.float32))


@pytest.mark.parametrize("module", ["diag", "dense"])
def test_inplace_advances_optimizer_state(ref, module):
    dtype = torch.float32  # the reference's vi.dense cannot run float64
    params = random_params("dict", dtype)
    ours = _run(getattr(vi, module), params, dtype, True, stl=False)
    functional = _run(getattr(vi, module), params, dtype, False, stl=False)
    assert_tree_close(ours.params, functional.params, dtype)
    counts = [int(c) for c in tree_leaves(ours.opt_state) if c.dtype == torch.int64]
    assert counts and all(c == 3 for c in counts)
    theirs = _run(getattr(ref.vi, module), params, dtype, True, stl=False)
    assert [int(c) for c in tree_leaves(theirs.opt_state) if c.dtype == torch.int64] != counts


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("module", ["diag", "dense"])
def test_sample_shapes(module, shape):
    params = random_params("nested", torch.float64)
    state = getattr(vi, module).init(params, torchopt.adam(1e-2))
    draws = getattr(vi, module).sample(state, torch.Size(shape))
    for d, p in zip(tree_leaves(draws), tree_leaves(params)):
        assert d.shape == torch.Size(shape) + p.shape


def test_dense_sample_and_log_q_use_L_directly():
    torch.manual_seed(0)
    L = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]], dtype=torch.float64)
    mean = {"a": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)}
    state = vi.dense.VIDenseState(mean, vi.dense.L_to_flat(L), None)
    draws = vi.dense.sample(state, (40000,))["a"]
    torch.testing.assert_close(draws.T.cov(), L @ L.T, rtol=0, atol=0.03)
    x = torch.randn(5, 3, dtype=torch.float64)
    want = torch.distributions.MultivariateNormal(mean["a"], scale_tril=L).log_prob(x)
    torch.testing.assert_close(vi.dense._log_q(x, mean["a"], L), want)


def test_identity_on_params_dtype(ref):
    params = random_params("dict", torch.float64)
    assert vi.dense.init(params, torchopt.adam(1e-2)).L_factor.dtype == torch.float64
    _run(vi.dense, params, torch.float64, False)  # runs in float64
    with pytest.raises(RuntimeError):  # the reference's float32 L meets float64 params
        _run(ref.vi.dense, params, torch.float64, False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-1.0), "temperature must be finite and >= 0"),
        (dict(n_samples=0), "n_samples must be a positive integer"),
    ],
)
@pytest.mark.parametrize("module", ["diag", "dense"])
def test_bad_settings(module, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(vi, module).build(_log_post, torchopt.adam(1e-2), **kwargs)


def _nan_post(p, batch):
    value, z = _log_post(p, batch)
    return value * float("nan"), z


@pytest.mark.parametrize("module", ["diag", "dense"])
def test_failed_inplace_update_leaves_state_untouched(module):
    params = random_params("nested", torch.float64)
    transform = getattr(vi, module).build(_nan_post, torchopt.adam(1e-2))
    state = transform.init(params)
    before = [(t.clone(), t.data_ptr()) for t in tree_leaves(state)]
    with pytest.raises(ValueError, match="NaN or inf"):
        transform.update(state, random_batch(4, torch.float64), inplace=True)
    assert all(torch.equal(t, old) and t.data_ptr() == ptr for t, (old, ptr) in zip(tree_leaves(state), before))
