"""laplace.* against posteriors 0.0.5 (every deterministic output), the fixed
defects, sampling and bad input."""

import pytest
import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast import laplace
from tests._compare import assert_tree_close, tol

from .._trees import forward, random_batch, random_params
from ._models import forward_fn as _forward
from ._models import log_post as _log_post
from ._models import log_post_per_sample as _log_post_per_sample
from ._models import outer as _outer


def _builders(name, per_sample):
    if name in ("dense_fisher", "diag_fisher"):
        return dict(log_posterior=_log_post_per_sample if per_sample else _log_post, per_sample=per_sample)
    if name == "dense_hessian":
        return dict(log_posterior=_log_post, epsilon=0.1, rescale=2.0)
    return dict(forward=_forward, outer_log_likelihood=_outer)


CASES = [
    ("dense_fisher", False),
    ("dense_fisher", True),
    ("diag_fisher", False),
    ("diag_fisher", True),
    ("dense_ggn", False),
    ("dense_hessian", False),
    ("diag_ggn", False),
]


@pytest.mark.parametrize("name, per_sample", CASES)
@pytest.mark.parametrize("kind", ["dict", "nested"])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_reference(ref, backend, dtype, name, per_sample, kind, inplace):
    params = random_params(kind, dtype)
    dense = name.startswith("dense")
    size = tree_ravel(params)[0].numel()
    prior = 0.5 * torch.eye(size, dtype=dtype) if dense else tree_map(lambda t: torch.full_like(t, 0.5), params)
    key = "init_prec" if dense else "init_prec_diag"
    ours = getattr(laplace, name).build(**_builders(name, per_sample), **{key: prior}, backend=backend)
    theirs = getattr(ref.laplace, name).build(
        **_builders(name, per_sample), **{key: prior.clone() if dense else tree_map(torch.clone, prior)}
    )
    a, b = ours.init(params), theirs.init(params)
    for step in range(2):
        batch = random_batch(5, dtype, seed=step)
        a = ours.update(a, batch, inplace=inplace)
        b = theirs.update(b, batch, inplace=inplace)
    if dense:
        tol_ = tol(dtype)
        if name == "dense_hessian" and dtype == torch.float64:
            # The reference's epsilon·I is float32 (0.1 → 0.1000000015): 1.5e-9 per step.
            tol_ = dict(rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(a.prec, b.prec.to(dtype), **tol_)
        assert torch.equal(a.prec, a.prec.T)
    else:
        assert_tree_close(a.prec_diag, b.prec_diag, dtype)
    assert_tree_close(a.aux, b.aux, dtype)
    if dense:
        torch.testing.assert_close(prior, 0.5 * torch.eye(size, dtype=dtype))  # init copied it


@pytest.mark.parametrize("name", ["dense_fisher", "dense_ggn", "dense_hessian"])
def test_dense_identity_on_params_dtype(ref, name):
    params = random_params("dict", torch.float64)
    state = getattr(laplace, name).init(params, 2.0)
    assert state.prec.dtype == torch.float64
    assert getattr(ref.laplace, name).init(params, 2.0).prec.dtype == torch.float32  # the defect


def test_dense_hessian_epsilon_on_params_dtype(ref):
    params, batch = random_params("dict", torch.float64), random_batch(4, torch.float64)
    transform = laplace.dense_hessian.build(_log_post, init_prec=0.0, epsilon=0.3)
    new = transform.update(transform.init(params), batch)
    assert new.prec.dtype == torch.float64
    flat, unravel = tree_ravel(params)
    hess = torch.func.hessian(lambda fp: -_log_post(unravel(fp), batch)[0])(flat)
    torch.testing.assert_close(new.prec, hess + 0.3 * torch.eye(flat.numel(), dtype=torch.float64))


@pytest.mark.parametrize("shape", [(), (7,), (2, 3)])
@pytest.mark.parametrize("name", ["dense_fisher", "diag_fisher"])
def test_sample_shapes_for_multi_dim_params(ref, name, shape):
    params = random_params("nested", torch.float64)  # leaves with 2 dimensions
    state = getattr(laplace, name).init(params, 1.0)
    draws = getattr(laplace, name).sample(state, torch.Size(shape))
    for d, p in zip(tree_leaves(draws), tree_leaves(params)):
        assert d.shape == torch.Size(shape) + p.shape


def test_dense_sample_moments():
    torch.manual_seed(0)
    params = {"a": torch.tensor([1.0, -1.0], dtype=torch.float64), "b": torch.tensor([[0.5]], dtype=torch.float64)}
    prec = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 4.0]], dtype=torch.float64)
    state = laplace.dense_fisher.DenseLaplaceState(params, prec)
    draws = laplace.dense_fisher.sample(state, (40000,))
    flat = torch.cat([draws["a"], draws["b"].reshape(-1, 1)], dim=1)
    # Standard errors at 40k draws: ~0.005 (mean), ~0.01 (covariance entries).
    torch.testing.assert_close(flat.mean(0), tree_ravel(params)[0], rtol=0, atol=0.03)
    torch.testing.assert_close(flat.T.cov(), torch.linalg.inv(prec), rtol=0, atol=0.04)


def test_bad_init_prec():
    params = random_params("dict", torch.float64)
    size = tree_ravel(params)[0].numel()
    with pytest.raises(ValueError, match="init_prec must be positive semi-definite"):
        laplace.dense_fisher.init(params, -torch.eye(size, dtype=torch.float64))
    with pytest.raises(ValueError, match="init_prec .* c >= 0"):
        laplace.dense_ggn.init(params, -1.0)
    with pytest.raises(ValueError, match="init_prec_diag must be finite and >= 0"):
        laplace.diag_fisher.init(params, -1.0)
    with pytest.raises(ValueError, match="epsilon must be finite and >= 0"):
        laplace.dense_hessian.build(_log_post, epsilon=-1.0)


def test_sample_from_zero_precision_says_what_to_do():
    params = random_params("dict", torch.float64)
    with pytest.raises(torch.linalg.LinAlgError, match="init_prec > 0"):
        laplace.dense_fisher.sample(laplace.dense_fisher.init(params), (2,))


def _nan_post(p, batch):
    value, z = _log_post(p, batch)
    return value * float("nan"), z


@pytest.mark.parametrize("name", ["dense_fisher", "diag_fisher", "dense_hessian"])
def test_failed_inplace_update_leaves_state_untouched(name):
    params, batch = random_params("nested", torch.float64), random_batch(4, torch.float64)
    transform = getattr(laplace, name).build(_nan_post)
    state = transform.init(params)
    before = [(t.clone(), t.data_ptr()) for t in tree_leaves(state)]
    with pytest.raises(ValueError, match="NaN or inf"):
        transform.update(state, batch, inplace=True)
    assert all(torch.equal(t, old) and t.data_ptr() == ptr for t, (old, ptr) in zip(tree_leaves(state), before))


@pytest.mark.parametrize("name", ["diag_fisher", "diag_ggn"])
def test_diag_update_names_a_prec_diag_that_does_not_fit_the_params(name):
    params, batch = random_params("dict", torch.float64), random_batch(4, torch.float64)
    transform = (
        laplace.diag_fisher.build(_log_post) if name == "diag_fisher" else laplace.diag_ggn.build(_forward, _outer)
    )
    state = transform.init(params)
    key = next(iter(state.prec_diag))
    wrong_shape = {**state.prec_diag, key: torch.ones(state.prec_diag[key].numel() + 1, dtype=torch.float64)}
    not_tensors = {k: v.numpy() for k, v in state.prec_diag.items()}  # same structure and shapes
    bad = [
        (ValueError, "state.prec_diag leaf shapes must match state.params", wrong_shape),
        (
            ValueError,
            "state.prec_diag must have the same pytree structure as state.params",
            tree_leaves(state.prec_diag),
        ),
        (TypeError, "state.prec_diag must be a pytree of tensors; found a ndarray leaf", not_tensors),
    ]
    for error, message, prec_diag in bad:
        for inplace in (False, True):
            kept = tree_map(lambda x: x.copy() if not isinstance(x, torch.Tensor) else x.clone(), prec_diag)
            with pytest.raises(error, match=message):
                transform.update(state._replace(prec_diag=prec_diag), batch, inplace=inplace)
            same = [(a == b).all() for a, b in zip(tree_leaves(prec_diag), tree_leaves(kept))]
            assert all(bool(x) for x in same), "a failed update wrote into state.prec_diag"


@pytest.mark.parametrize("name", ["dense_ggn", "diag_ggn"])
def test_ggn_with_batch_coupled_forward(ref, name):
    # Centering over the batch couples samples: the per-sample Jacobian must
    # not be used, and the result must still match the reference.
    def coupled(p, batch):
        z = forward(p, batch[0])
        return z - z.mean(0), batch[0].sum()

    params, batch = random_params("nested", torch.float64), random_batch(6, torch.float64)
    key = "init_prec" if name == "dense_ggn" else "init_prec_diag"
    ours = getattr(laplace, name).build(coupled, _outer, **{key: 1.0})
    theirs = getattr(ref.laplace, name).build(coupled, _outer, **{key: 1.0})
    a = ours.update(ours.init(params), batch)
    b = theirs.update(theirs.init(params), batch)
    if name == "dense_ggn":
        torch.testing.assert_close(a.prec, b.prec.to(torch.float64), rtol=1e-6, atol=1e-6)
    else:
        assert_tree_close(a.prec_diag, b.prec_diag, torch.float64)


def _offset_post(p, batch):
    # The offset reaches the value but not the gradient.
    x, y, offset = batch
    return -torch.nn.functional.cross_entropy(forward(p, x), y) + offset.sum(), torch.tensor([])


def test_compiled_fisher_update_checks_the_gradients_from_the_graphs_witness(compile_after, monkeypatch):
    # The compiled per-sample Jacobian returns a finiteness witness of the
    # values and J; only J's exact check decides, as with eager.

    compile_after(1)
    params = random_params("dict", torch.float64)
    x, y = random_batch(5, torch.float64)
    offset = torch.zeros(5, dtype=torch.float64)
    compiled = laplace.dense_fisher.build(_offset_post, init_prec=1.0, backend="compiled")
    eager = laplace.dense_fisher.build(_offset_post, init_prec=1.0, backend="eager")
    state = compiled.init(params)

    nan_value = offset.clone()
    nan_value[2] = float("nan")
    torch.testing.assert_close(
        compiled.update(state, (x, y, nan_value)).prec, eager.update(eager.init(params), (x, y, offset)).prec
    )

    bad_x = x.clone()
    bad_x[3, 0] = float("nan")
    before = state.prec.clone()
    with pytest.raises(
        ValueError, match=r"the gradient of log_posterior is NaN or inf \(first at sample 3 of this batch\)"
    ):
        compiled.update(state, (bad_x, y, offset), inplace=True)
    assert torch.equal(state.prec, before)
