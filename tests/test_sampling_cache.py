"""Every method that caches a factor of its matrix for ``sample`` draws from
the current matrix after an ``inplace=True`` update, on both backends: the
custom ops that write the matrix advance its version counter as torch's own
in-place ops do, and the cache is keyed on it."""

import pytest
import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast import ekf, laplace

from ._trees import forward, random_batch, random_params


def _log_post(p, batch):
    x, y = batch
    return -torch.nn.functional.cross_entropy(forward(p, x), y, reduction="sum"), torch.tensor([])


def _forward(p, batch):
    return forward(p, batch[0]), torch.tensor([])


def _outer(z, batch):
    return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")


# (module, build kwargs, matrix field, draws from (mean, matrix, noise))
METHODS = {
    "ekf.dense_fisher": (
        ekf.dense_fisher,
        dict(log_likelihood=_log_post, lr=0.5, init_cov=1.0),
        "cov",
        lambda m, cov, e: m + e @ torch.linalg.cholesky(cov).mT,
    ),
    "laplace.dense_fisher": (
        laplace.dense_fisher,
        dict(log_posterior=_log_post, init_prec=1.0),
        "prec",
        lambda m, prec, e: m + torch.linalg.solve_triangular(torch.linalg.cholesky(prec).mT, e.mT, upper=True).mT,
    ),
    "laplace.dense_ggn": (
        laplace.dense_ggn,
        dict(forward=_forward, outer_log_likelihood=_outer, init_prec=1.0),
        "prec",
        None,
    ),
    "laplace.dense_hessian": (
        laplace.dense_hessian,
        dict(log_posterior=_log_post, init_prec=1.0, epsilon=30.0),
        "prec",
        None,
    ),
}


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("n", [4, 40], ids=["N<P", "N>P"])  # EKF: Woodbury downdate / precision form
def test_sample_after_inplace_update_uses_the_new_matrix(name, n, backend):
    module, kwargs, field, draw = METHODS[name]
    draw = draw or METHODS["laplace.dense_fisher"][3]
    params = random_params("nested", torch.float64)
    transform = module.build(**kwargs, **({} if name == "laplace.dense_hessian" else {"backend": backend}))
    state = transform.init(params)
    module.sample(state, (3,))  # caches the factor of the initial matrix
    matrix = getattr(state, field)
    before = matrix.clone()
    version = matrix._version
    for step in range(2):
        state = transform.update(state, random_batch(n, torch.float64, seed=step), inplace=True)
    assert getattr(state, field) is matrix and matrix._version > version
    assert not torch.equal(matrix, before)
    mean = tree_ravel(state.params)[0]
    torch.manual_seed(0)
    got = module.sample(state, (5,))
    torch.manual_seed(0)
    # The same standard normals as sample draws: (5, P) for the EKF's one
    # product, (P, 5) for the Laplace methods' one triangular solve.
    noise = (
        torch.randn(5, mean.numel(), dtype=torch.float64)
        if name.startswith("ekf")
        else torch.randn(mean.numel(), 5, dtype=torch.float64).mT
    )
    want = draw(mean, matrix, noise)
    got = torch.stack([tree_ravel(tree_map(lambda x, i=i: x[i], got))[0] for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
