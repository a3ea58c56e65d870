"""laplace.lowrank_fisher and laplace.lowrank_ggn against the dense Laplace
methods (rank >= P) and float64 dense formulas (rank < P: exact diagonal,
best rank-r truncation of the streamed factor plus the batch), the GGN's
square root of the loss Hessian (block diagonal or not), sampling and bad input."""

import pytest
import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast import laplace
from tests._compare import tol

from .._trees import random_batch, random_params
from ._models import forward_fn as _forward
from ._models import log_post as _log_post
from ._models import log_post_per_sample as _log_post_per_sample
from ._models import outer as _outer

P = 31  # parameters of random_params("nested")


def _flat(tree):
    return tree_ravel(tree)[0]


def _precision(state):
    d, u = _flat(state.prec_diag).double(), state.prec_factor.double()
    return torch.diag(d) + u @ u.T


def _coupled_outer(z, batch):
    """Concave in z but coupling the samples: its Hessian is not block diagonal."""
    return -0.5 * (z.sum() - 1.0) ** 2 - 0.1 * (z**2).sum()


def _pair(kind, per_sample=False, outer=_outer):
    """(dense build, low-rank build) of one kind, as functions of the rank."""
    if kind == "fisher":
        fn = _log_post_per_sample if per_sample else _log_post
        return (
            laplace.dense_fisher.build(fn, per_sample=per_sample, init_prec=0.4),
            lambda rank: laplace.lowrank_fisher.build(fn, rank, per_sample=per_sample, init_prec_diag=0.4),
        )
    return (
        laplace.dense_ggn.build(_forward, outer, init_prec=0.4),
        lambda rank: laplace.lowrank_ggn.build(_forward, outer, rank, init_prec_diag=0.4),
    )


KINDS = [("fisher", False, _outer), ("fisher", True, _outer), ("ggn", False, _outer), ("ggn", False, _coupled_outer)]
IDS = ["fisher", "fisher-per_sample", "ggn", "ggn-coupled"]


@pytest.mark.parametrize("kind, per_sample, outer", KINDS, ids=IDS)
@pytest.mark.parametrize("rank", [P, P + 2])
def test_rank_at_least_p_equals_the_dense_precision(dtype, kind, per_sample, outer, rank):
    dense, low = _pair(kind, per_sample, outer)
    low = low(rank)
    params = random_params("nested", dtype)
    s_dense, s_low = dense.init(params), low.init(params)
    for step in range(3):
        batch = random_batch(4 + step, dtype, seed=step)
        s_dense, s_low = dense.update(s_dense, batch), low.update(s_low, batch, inplace=step == 1)
        scale = s_dense.prec.abs().max()
        torch.testing.assert_close((_precision(s_low) / scale).to(dtype), s_dense.prec / scale, **tol(dtype))
    assert s_low.prec_factor.shape == (P, rank) and s_low.prec_factor.dtype == dtype
    torch.testing.assert_close(s_low.aux, s_dense.aux)


@pytest.mark.parametrize("kind, per_sample, outer", KINDS, ids=IDS)
@pytest.mark.parametrize("rank", [1, 4])
def test_small_rank_keeps_the_diagonal_and_truncates_best(dtype, kind, per_sample, outer, rank):
    dense, low = _pair(kind, per_sample, outer)
    low = low(rank)
    params = random_params("nested", dtype)
    s_dense, s_low = dense.init(params), low.init(params)
    for step in range(3):
        batch = random_batch(5, dtype, seed=step)
        before = s_low
        s_dense, s_low = dense.update(s_dense, batch), low.update(s_low, batch)
    scale = s_dense.prec.abs().max()
    # the diagonal is exact: that of the dense precision, whatever was dropped
    torch.testing.assert_close(
        (_precision(s_low).diagonal() / scale).to(dtype), s_dense.prec.diagonal() / scale, **tol(dtype)
    )
    # the last step's low-rank part is the best rank-r part of UUᵀ + (this batch's term)
    term = dense.update(dense.init(params), batch).prec.double() - 0.4 * torch.eye(P, dtype=torch.float64)
    u = before.prec_factor.double()
    vals, vecs = torch.linalg.eigh(u @ u.T + term)
    want = (vecs[:, -rank:] * vals[-rank:]) @ vecs[:, -rank:].T
    got = s_low.prec_factor.double() @ s_low.prec_factor.double().T
    torch.testing.assert_close((got / scale).to(dtype), (want / scale).to(dtype), **tol(dtype))
    # columns in decreasing order of norm
    norms = s_low.prec_factor.norm(dim=0)
    assert bool((norms[:-1] >= norms[1:] - 1e-6 * norms[0]).all())


def test_sampling_is_exact_and_needs_a_positive_diagonal():
    dtype = torch.float64
    params = random_params("nested", dtype)
    transform = laplace.lowrank_ggn.build(_forward, _outer, 3, init_prec_diag=0.3)
    state = transform.init(params)
    for step in range(2):
        state = transform.update(state, random_batch(6, dtype, seed=step))
    torch.manual_seed(1)
    draws = laplace.lowrank_ggn.sample(state, (P + 4,))
    torch.manual_seed(1)
    noise = torch.randn(P + 4, P, dtype=dtype)
    centred = torch.func.vmap(_flat)(draws) - _flat(state.params)
    factor = torch.linalg.lstsq(noise, centred).solution.T
    torch.testing.assert_close(factor @ factor.T, torch.linalg.inv(_precision(state)), **tol(dtype))

    flat_prior = laplace.lowrank_fisher.build(_log_post, 2).init(params)  # prior precision 0
    with pytest.raises(ValueError, match="prec_diag must be positive"):
        laplace.lowrank_fisher.sample(flat_prior)


def test_ggn_with_a_convex_loss_is_refused():
    params = random_params("nested", torch.float64)
    transform = laplace.lowrank_ggn.build(_forward, lambda z, b: (z**2).sum(), 2)
    state = transform.init(params)
    snapshot = [t.clone() for t in (state.prec_factor, *tree_leaves(state.prec_diag))]
    with pytest.raises(ValueError, match="negative eigenvalue.*concave in z"):
        transform.update(state, random_batch(4, torch.float64), inplace=True)
    assert all(torch.equal(a, b) for a, b in zip((state.prec_factor, *tree_leaves(state.prec_diag)), snapshot))


@pytest.mark.parametrize("rank, error", [(False, TypeError), (1.5, TypeError), (None, TypeError), (0, ValueError)])
@pytest.mark.parametrize("module", ["lowrank_fisher", "lowrank_ggn"])
def test_rank_must_be_a_positive_integer(module, rank, error):
    mod = getattr(laplace, module)
    args = (_log_post,) if module == "lowrank_fisher" else (_forward, _outer)
    with pytest.raises(error, match="rank"):
        mod.build(*args, rank)
    with pytest.raises(error, match="rank"):
        mod.init(random_params("nested", torch.float64), rank)


def test_bad_prior_and_state():
    params = random_params("nested", torch.float64)
    with pytest.raises(ValueError, match="init_prec_diag"):
        laplace.lowrank_fisher.init(params, 2, init_prec_diag=-1.0)
    with pytest.raises(ValueError, match="init_prec_diag"):
        laplace.lowrank_fisher.init(
            params, 2, init_prec_diag=tree_map(lambda t: torch.full_like(t, float("nan")), params)
        )
    state = laplace.lowrank_fisher.init(params, 2)
    with pytest.raises(ValueError, match="rank=3"):
        laplace.lowrank_fisher.update(state, random_batch(3, torch.float64), _log_post, 3)
