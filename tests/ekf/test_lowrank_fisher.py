"""ekf.lowrank_fisher against ekf.dense_fisher (rank >= P) and float64 dense
formulas (rank < P: exact precision diagonal, best rank-r truncation of the
streamed factor plus the batch, Woodbury mean step), exact sampling, bad
input and memory (no P×P)."""

import pytest
import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast.ekf import dense_fisher, lowrank_fisher
from tests._compare import tol

from ._problem import log_likelihood, log_likelihood_per_sample, logits, make_problem

P = 28  # parameters of make_problem's model


def _flat(tree):
    return tree_ravel(tree)[0]


def _precision(state):
    d, u = _flat(state.prec_diag), state.prec_factor
    return torch.diag(d.double()) + u.double() @ u.double().T


def _jacobian(params, batch):
    """(N, P) per-sample gradients of the log-likelihood, float64, by vmap of grad."""
    flat, unravel = tree_ravel(tree_map(lambda t: t.double(), params))

    def one(fp, xi, yi):
        return -torch.nn.functional.cross_entropy(logits(unravel(fp), xi[None]), yi[None])

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(flat, batch["x"].double(), batch["y"])


def _best_rank(matrix, rank):
    vals, vecs = torch.linalg.eigh(matrix)
    vals, vecs = vals[-rank:], vecs[:, -rank:]
    return (vecs * vals) @ vecs.T


@pytest.mark.parametrize("transition", [0.0, 0.05, "tree"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("rank", [P, P + 3])
def test_rank_at_least_p_equals_the_dense_filter(dtype, transition, per_sample, rank):
    params, _ = make_problem(4, dtype)
    ll = log_likelihood_per_sample if per_sample else log_likelihood
    init_var = tree_map(
        lambda t: torch.rand(t.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) + 0.3, params
    )
    if transition == "tree":
        q_tree = tree_map(
            lambda t: torch.full_like(t, 0.02) + 0.01 * torch.arange(t.numel(), dtype=dtype).reshape(t.shape), params
        )
        q_dense = torch.diag(_flat(q_tree))
    else:
        q_tree = q_dense = transition
    dense = dense_fisher.build(
        ll, 0.7, transition_cov=q_dense, per_sample=per_sample, init_cov=torch.diag(_flat(init_var))
    )
    low = lowrank_fisher.build(ll, 0.7, rank, transition_cov=q_tree, per_sample=per_sample, init_cov=init_var)
    s_dense, s_low = dense.init(tree_map(torch.clone, params)), low.init(tree_map(torch.clone, params))
    for step in range(4):
        _, batch = make_problem(5 + step, dtype, seed=10 + step)
        s_dense, s_low = dense.update(s_dense, batch), low.update(s_low, batch)
        cov = torch.linalg.inv(_precision(s_low))
        torch.testing.assert_close(cov.to(dtype), s_dense.cov, **tol(dtype))
        torch.testing.assert_close(_flat(s_low.params), _flat(s_dense.params), **tol(dtype))
        torch.testing.assert_close(s_low.log_likelihood, s_dense.log_likelihood, **tol(dtype))
    assert s_low.prec_factor.shape == (P, rank) and s_low.prec_factor.dtype == dtype
    assert all(t.dtype == dtype for t in tree_leaves(s_low.prec_diag))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_small_rank_step_against_the_dense_formula(dtype, rank):
    """One step from a state with a non-zero factor and transition noise:
    exact predict, best rank-r part of U_pU_pᵀ + (ε/N)JᵀJ, diagonal of the
    precision exact, mean = μ + ε Σ_new ḡ with Σ_new the new precision's inverse."""
    lr, q, n = 0.6, 0.03, 6
    params, _ = make_problem(n, dtype)
    transform = lowrank_fisher.build(log_likelihood, lr, rank, transition_cov=q, init_cov=0.5)
    state = transform.init(params)
    for step in range(2):  # make the factor non-zero
        state = transform.update(state, make_problem(n, dtype, seed=20 + step)[1])
    _, batch = make_problem(n, dtype, seed=30)
    new = transform.update(state, batch)

    prec = _precision(state)
    pred = torch.linalg.inv(torch.linalg.inv(prec) + q * torch.eye(P, dtype=torch.float64))
    # the predicted precision in the state's form: its diagonal part is d/(1+qd)
    d = _flat(state.prec_diag).double()
    pred_diag = d / (1 + q * d)
    jac = _jacobian(state.params, batch)
    lowrank = pred - torch.diag(pred_diag) + lr / n * jac.T @ jac
    want_lowrank = _best_rank(lowrank, rank)
    got_lowrank = new.prec_factor.double() @ new.prec_factor.double().T
    scale = lowrank.abs().max()
    torch.testing.assert_close(got_lowrank / scale, want_lowrank / scale, **tol(dtype))
    # diagonal exact: diag(Λ_new) = diag(Λ_p) + (ε/N) Σ_n J_n²
    want_diag = pred.diagonal() + lr / n * jac.square().sum(0)
    torch.testing.assert_close(_precision(new).diagonal().to(dtype), want_diag.to(dtype), **tol(dtype))
    want_mean = _flat(state.params).double() + lr * torch.linalg.solve(_precision(new), jac.mean(0))
    torch.testing.assert_close(_flat(new.params), want_mean.to(dtype), **tol(dtype))


def test_without_noise_the_diagonal_is_the_sum_over_every_step():
    """With Q = 0: diag(Λ_t) = 1/init_cov + Σ_steps (ε/N) Σ_n J_n², J at the
    filter's own means, however much the truncations dropped."""
    dtype, lr, rank = torch.float64, 0.4, 2
    params, _ = make_problem(5, dtype)
    transform = lowrank_fisher.build(log_likelihood, lr, rank, init_cov=2.0)
    state = transform.init(params)
    want = torch.full((P,), 0.5, dtype=dtype)
    for step in range(5):
        _, batch = make_problem(3 + step, dtype, seed=40 + step)
        jac = _jacobian(state.params, batch)
        want += lr / jac.shape[0] * jac.square().sum(0)
        state = transform.update(state, batch, inplace=step % 2 == 1)
    torch.testing.assert_close(_precision(state).diagonal(), want, **tol(dtype))
    assert bool((_flat(state.prec_diag) > 0.5 - 1e-12).all())  # the dropped part only adds


def test_inplace_writes_into_the_state_and_advances_versions():
    params, batch = make_problem(5, torch.float64)
    transform = lowrank_fisher.build(log_likelihood, 0.5, 4, transition_cov=0.01)
    state = transform.init(params)
    factor, diag_leaf, versions = state.prec_factor, state.prec_diag["w1"], state.prec_factor._version
    functional = transform.update(state, batch)
    new = transform.update(state, batch, inplace=True)
    assert new.prec_factor is factor and new.prec_diag["w1"] is diag_leaf and new.params["w1"] is params["w1"]
    assert factor._version > versions
    torch.testing.assert_close(new.prec_factor, functional.prec_factor, rtol=0, atol=0)
    torch.testing.assert_close(_flat(new.params), _flat(functional.params), rtol=0, atol=0)


def test_sampling_is_exact():
    """The draws are μ + B z for the noise z torch draws; recovering B from P
    draws shows B Bᵀ = (D + UUᵀ)⁻¹ to rounding."""
    dtype = torch.float64
    params, _ = make_problem(5, dtype)
    transform = lowrank_fisher.build(log_likelihood, 0.8, 3, init_cov=0.7)
    state = transform.init(params)
    for step in range(3):
        state = transform.update(state, make_problem(7, dtype, seed=50 + step)[1])
    torch.manual_seed(0)
    draws = lowrank_fisher.sample(state, (P + 5,))
    torch.manual_seed(0)
    noise = torch.randn(P + 5, P, dtype=dtype)
    centred = torch.func.vmap(_flat)(draws) - _flat(state.params)
    factor = torch.linalg.lstsq(noise, centred).solution.T  # centred = noise Bᵀ
    torch.testing.assert_close(factor @ factor.T, torch.linalg.inv(_precision(state)), **tol(dtype))
    single = lowrank_fisher.sample(state)
    assert single["w1"].shape == params["w1"].shape
    assert lowrank_fisher.sample(state, (2, 3))["head"]["w2"].shape == (2, 3) + params["head"]["w2"].shape


@pytest.mark.parametrize(
    "rank, error", [(True, TypeError), (2.0, TypeError), ("3", TypeError), (0, ValueError), (-2, ValueError)]
)
def test_rank_must_be_a_positive_integer(rank, error):
    params, batch = make_problem(3, torch.float64)
    with pytest.raises(error, match="rank"):
        lowrank_fisher.build(log_likelihood, 0.1, rank)
    with pytest.raises(error, match="rank"):
        lowrank_fisher.init(params, rank)
    state = lowrank_fisher.init(params, 2)
    with pytest.raises(error, match="rank"):
        lowrank_fisher.update(state, batch, log_likelihood, 0.1, rank)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(transition_cov=-0.1), "transition_cov"),
        (dict(transition_cov=float("nan")), "transition_cov"),
        (dict(init_cov=0.0), "init_cov"),
        (dict(init_cov=float("inf")), "init_cov"),
        (dict(lr=0.0), "lr"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, match):
    settings = dict(lr=0.1, rank=2, **kwargs) if "lr" not in kwargs else dict(rank=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        lowrank_fisher.build(log_likelihood, **settings)


def test_bad_trees_and_a_mismatched_factor():
    params, batch = make_problem(3, torch.float64)
    negative = tree_map(lambda t: -torch.ones_like(t), params)
    with pytest.raises(ValueError, match="init_cov"):
        lowrank_fisher.init(params, 2, init_cov=negative)
    state = lowrank_fisher.init(params, 2)
    with pytest.raises(ValueError, match="transition_cov"):
        lowrank_fisher.update(state, batch, log_likelihood, 0.1, 2, transition_cov=negative)
    with pytest.raises(ValueError, match="state.prec_factor has 2 columns but rank=3"):
        lowrank_fisher.update(state, batch, log_likelihood, 0.1, 3)
    with pytest.raises(ValueError, match=r"state.prec_factor must be \(28, rank\)"):
        lowrank_fisher.update(state._replace(prec_factor=torch.zeros(5, 2)), batch, log_likelihood, 0.1, 2)


def test_a_million_parameters_never_form_p_by_p():
    """P = 10⁶: a P×P float32 matrix would need 4 TB, so the update passing at
    all shows none is formed; the low-rank part and diagonal stay exact."""
    size, n, rank = 1_000_000, 3, 2
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(size, generator=gen) * 1e-3}
    batch = torch.randn(n, size, generator=gen)

    def ll(p, x):
        return -0.5 * ((x * p["w"]).sum() - 1.0) ** 2, torch.tensor([])

    transform = lowrank_fisher.build(ll, 0.5, rank, transition_cov=1e-3)
    state = transform.update(transform.init(params), batch)
    assert state.prec_factor.shape == (size, rank)
    # the batch's rows span n > rank directions: the diagonal still gets all of them
    resid = (batch @ params["w"] - 1.0)[:, None]
    jac = -resid * batch
    want = 1 / (1 + 1e-3) + 0.5 / n * jac.square().sum(0)
    got = state.prec_diag["w"] + state.prec_factor.square().sum(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
