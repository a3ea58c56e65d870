"""utils.linearized_forward_lowrank against the float64 dense formula
J Σ Jᵀ with Σ = (D + UUᵀ)⁻¹, and against linearized_forward_diag when U = 0."""

import pytest
import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf
from tests._compare import tol
from tests._trees import forward, random_batch, random_params


def _fwd(p, x):
    return forward(p, x), x.sum(1)


@pytest.mark.parametrize("kind", ["dict", "tuple", "nested"])
def test_matches_the_dense_predictive(backend, dtype, kind):
    params = random_params(kind, dtype)
    flat, unravel = tree_ravel(params)
    size = flat.numel()
    g = torch.Generator().manual_seed(5)
    diag = (torch.rand(size, generator=g) + 0.5).to(dtype)
    factor = torch.randn(size, 3, generator=g).to(dtype)
    x, _ = random_batch(5, dtype)
    out, chol, aux = pf.linearized_forward_lowrank(_fwd, params, x, unravel(diag), factor, backend=backend)
    jac = torch.func.jacrev(lambda f: forward(unravel(f), x.double()))(flat.double())  # (N, C, P)
    cov = torch.linalg.inv(torch.diag(diag.double()) + factor.double() @ factor.double().T)
    want = torch.einsum("ncp,pq,nkq->nck", jac, cov, jac)
    torch.testing.assert_close(chol @ chol.mT, want.to(dtype), **tol(dtype))
    torch.testing.assert_close(out, forward(params, x))
    torch.testing.assert_close(aux, x.sum(1))
    assert chol.dtype == dtype and torch.equal(chol, chol.tril())


def test_zero_factor_is_the_diagonal_predictive():
    params = random_params("nested", torch.float64)
    prec = tree_map(lambda t: torch.rand(t.shape, dtype=t.dtype) + 0.5, params)
    x, _ = random_batch(4, torch.float64)
    size = tree_ravel(params)[0].numel()
    _, chol, _ = pf.linearized_forward_lowrank(_fwd, params, x, prec, torch.zeros(size, 2, dtype=torch.float64))
    sd = tree_map(lambda t: t.rsqrt(), prec)
    _, want, _ = pf.linearized_forward_diag(_fwd, params, x, sd)
    torch.testing.assert_close(chol, want, **tol(torch.float64))


def test_bad_arguments():
    params = random_params("dict", torch.float64)
    size = tree_ravel(params)[0].numel()
    x, _ = random_batch(4, torch.float64)
    ones = tree_map(torch.ones_like, params)
    with pytest.raises(ValueError, match=rf"prec_factor must be \({size}, rank\)"):
        pf.linearized_forward_lowrank(_fwd, params, x, ones, torch.zeros(size + 1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="prec_diag must be positive"):
        pf.linearized_forward_lowrank(
            _fwd, params, x, tree_map(torch.zeros_like, params), torch.zeros(size, 2, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="prec_diag"):
        pf.linearized_forward_lowrank(_fwd, params, x, {"w1": ones["w1"]}, torch.zeros(size, 2, dtype=torch.float64))
