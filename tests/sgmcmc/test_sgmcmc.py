"""SG-MCMC: same chains as posteriors 0.0.5 for the same seed, the right
stationary distribution on a Gaussian target, bad input, inplace atomicity."""

import pytest
import torch
from optree import tree_leaves, tree_map

from posteriors_fast import sgmcmc
from tests._compare import assert_tree_close, tol

from .._trees import forward, random_batch, random_params

METHODS = {
    "sgld": dict(lr=1e-2, beta=0.1, temperature=0.7),
    "sghmc": dict(lr=1e-2, alpha=0.05, beta=0.1, sigma=1.3, temperature=0.7, momenta=0.2),
    "sgnht": dict(lr=1e-2, alpha=0.05, beta=0.1, sigma=1.3, temperature=0.7, momenta=0.2),
}


def _log_post(p, batch):
    x, y = batch
    z = forward(p, x)
    prior = sum((t**2).sum() for t in tree_leaves(p))
    return -torch.nn.functional.cross_entropy(z, y) - 0.01 * prior, z


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("kind", ["dict", "nested"])
@pytest.mark.parametrize("inplace", [False, True])
def test_same_chain_as_reference_for_same_seed(ref, backend, dtype, name, kind, inplace):
    """Eager draws the reference's noise: identical chains. The compiled
    backend draws different (equally distributed) noise, so it is compared
    with the noise switched off (temperature 0): the rest of the step is exact."""
    params = random_params(kind, dtype)
    settings = dict(METHODS[name], **({"temperature": 0.0} if backend == "compiled" else {}))
    ours = getattr(sgmcmc, name).build(_log_post, backend=backend, **settings)
    theirs = getattr(ref.sgmcmc, name).build(_log_post, **settings)
    a, b = ours.init(tree_map(torch.clone, params)), theirs.init(tree_map(torch.clone, params))
    for step in range(3):
        batch = random_batch(5, dtype, seed=step)
        torch.manual_seed(step)
        a = ours.update(a, batch, inplace=inplace)
        torch.manual_seed(step)
        b = theirs.update(b, batch, inplace=False)
    assert_tree_close(a.params, b.params, dtype)
    torch.testing.assert_close(a.log_posterior, b.log_posterior.to(dtype), **tol(dtype))
    if name != "sgld":
        assert_tree_close(a.momenta, b.momenta, dtype)
    if name == "sgnht":
        torch.testing.assert_close(a.xi.to(torch.float64), b.xi.to(torch.float64), rtol=1e-5, atol=1e-6)


CHAINS = 200


def _gaussian_target():
    """A 2-d Gaussian target, run as CHAINS independent chains at once (params
    of shape (CHAINS, 2), log posterior summed over chains)."""
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)

    def log_post(p, batch):
        d = p["x"] - mean
        return -0.5 * ((d @ prec) * d).sum(), torch.tensor([])

    return mean, cov, log_post


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sgld", dict(lr=2e-2)),
        ("sghmc", dict(lr=5e-2, alpha=1.0)),
        ("sgnht", dict(lr=5e-2, alpha=1.0)),
    ],
)
@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_stationary_distribution_matches_gaussian_target(name, kwargs, backend):
    torch.manual_seed(0)
    mean, cov, log_post = _gaussian_target()
    transform = getattr(sgmcmc, name).build(log_post, backend=backend, **kwargs)
    state = transform.init({"x": mean.repeat(CHAINS, 1)})
    draws = []
    for step in range(2500):
        state = transform.update(state, None, inplace=True)
        if step >= 500 and step % 10 == 0:
            draws.append(state.params["x"].clone())
    draws = torch.cat(draws)  # 200 chains x 200 draws
    # Independent chains: the Monte Carlo error of the mean is ~0.02 and of the
    # covariance entries a few %; the discretisation bias at these step sizes
    # is a few % of the covariance.
    torch.testing.assert_close(draws.mean(0), mean, rtol=0, atol=0.1)
    torch.testing.assert_close(draws.T.cov(), cov, rtol=0.12, atol=0.06)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("sgld", dict(lr=0.0), "lr must be finite and > 0"),
        ("sgld", dict(lr=1e-2, temperature=-1.0), "temperature must be finite and >= 0"),
        ("sgld", dict(lr=1.0, beta=5.0), "noise variance .* is negative"),
        ("sghmc", dict(lr=1e-2, sigma=0.0), "sigma must be finite and > 0"),
        ("sghmc", dict(lr=1e-2, alpha=-0.1), "alpha must be finite and >= 0"),
        ("sgnht", dict(lr=float("nan")), "lr must be finite and > 0"),
    ],
)
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(sgmcmc, name).build(_log_post, **kwargs)


def _nan_post(p, batch):
    value, z = _log_post(p, batch)
    return value * float("nan"), z


@pytest.mark.parametrize("name", list(METHODS))
def test_failed_inplace_update_leaves_state_untouched(name):
    params, batch = random_params("nested", torch.float64), random_batch(4, torch.float64)
    transform = getattr(sgmcmc, name).build(_nan_post, **METHODS[name])
    state = transform.init(params)
    before = [(t.clone(), t.data_ptr()) for t in tree_leaves(state)]
    with pytest.raises(ValueError, match="log_posterior returned NaN or inf"):
        transform.update(state, batch, inplace=True)
    assert all(torch.equal(t, old) and t.data_ptr() == ptr for t, (old, ptr) in zip(tree_leaves(state), before))


@pytest.mark.parametrize("name", ["sghmc", "sgnht"])
def test_init_copies_tree_momenta(name):
    params = random_params("dict", torch.float64)
    momenta = tree_map(torch.ones_like, params)
    transform = getattr(sgmcmc, name).build(_log_post, **{**METHODS[name], "momenta": momenta})
    state = transform.init(params)
    transform.update(state, random_batch(4, torch.float64), inplace=True)
    assert all(torch.equal(m, torch.ones_like(m)) for m in tree_leaves(momenta))


@pytest.mark.parametrize("name", list(METHODS))
def test_states_never_write_into_shared_defaults(name):
    module = getattr(sgmcmc, name)
    params = random_params("dict", torch.float64)
    state_cls = getattr(module, {"sgld": "SGLDState", "sghmc": "SGHMCState", "sgnht": "SGNHTState"}[name])
    fields = {"params": params}
    if name != "sgld":
        fields["momenta"] = tree_map(torch.zeros_like, params)
    if name == "sgnht":
        fields["xi"] = torch.tensor(0.05)
    state = state_cls(**fields)
    kwargs = {k: v for k, v in METHODS[name].items() if k != "momenta"}
    state = module.update(state, random_batch(4, torch.float64), _log_post, inplace=True, **kwargs)
    assert state.log_posterior.shape == ()
    assert state_cls._field_defaults["log_posterior"].numel() == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_compiled_noise_is_reproducible_under_manual_seed(name):
    params = random_params("dict", torch.float32)
    transform = getattr(sgmcmc, name).build(_log_post, backend="compiled", **METHODS[name])
    batch = random_batch(5, torch.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(transform.update(transform.init(tree_map(torch.clone, params)), batch))
    noisy = "params" if name == "sgld" else "momenta"  # where the first step's noise lands
    assert_tree_close(getattr(runs[0], noisy), getattr(runs[1], noisy), torch.float32)
    torch.manual_seed(4)
    other = transform.update(transform.init(tree_map(torch.clone, params)), batch)
    pairs = zip(tree_leaves(getattr(other, noisy)), tree_leaves(getattr(runs[0], noisy)))
    assert not all(torch.equal(a, b) for a, b in pairs)


def test_huge_finite_gradients_are_not_mistaken_for_inf():
    """The finiteness check sums each gradient first; a sum that overflows
    must fall back to the exact check instead of raising."""

    def log_post(p, batch):
        return (p["x"] * 3e38).sum(), torch.tensor([])  # gradient 3e38 everywhere: sum overflows

    transform = sgmcmc.sgld.build(log_post, lr=1e-40)
    state = transform.update(transform.init({"x": torch.zeros(4)}), None)
    assert torch.isfinite(state.params["x"]).all()

    def bad(p, batch):  # finite value 0, gradient NaN at x = 0
        return p["x"].abs().sqrt().sum(), torch.tensor([])

    with pytest.raises(ValueError, match="gradient of log_posterior is NaN or inf"):
        transform_bad = sgmcmc.sgld.build(bad, lr=1e-3)
        transform_bad.update(transform_bad.init({"x": torch.zeros(2)}), None)
