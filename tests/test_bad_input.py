"""Bad input to every method of the table (tests/methods.py): a ValueError
that names the argument or the user's function and what is wrong, and with
``inplace=True`` a state left bit for bit as it was."""

import pytest
import torch
from optree import tree_leaves, tree_map

import posteriors_fast
from tests.methods import METHODS

NAN = float("nan")


def _ids(rows):
    return [m.name for m in rows]


def _snapshot(state):
    return [(t.detach().clone(), t.data_ptr()) for t in tree_leaves(state) if isinstance(t, torch.Tensor)]


def _assert_unchanged(state, snapshot):
    now = [t for t in tree_leaves(state) if isinstance(t, torch.Tensor)]
    assert len(now) == len(snapshot)
    for t, (old, ptr) in zip(now, snapshot):
        assert t.data_ptr() == ptr
        assert torch.equal(t.detach(), old) or (
            t.numel() == old.numel()
            and torch.equal(t.isnan(), old.isnan())
            and torch.equal(t.nan_to_num(), old.nan_to_num())
        )


def _state_and_batch(method, backend):
    params, batch = method.problem(torch.float64)
    transform = method.build(posteriors_fast, backend=backend)
    return transform, transform.init(params), batch


def _failed_update_leaves_state(transform, state, batch, match, **replace):
    snapshot = _snapshot(state)
    with pytest.raises(ValueError, match=match):
        transform.update(state, batch, inplace=True)
    _assert_unchanged(state, snapshot)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_init_rejects_non_finite_params_naming_the_leaf(method):
    params, _ = method.problem(torch.float64)
    leaf = tree_leaves(params)[1]
    with torch.no_grad():
        leaf.view(-1)[0] = float("inf")
    with pytest.raises(ValueError, match=r"params hold a non-finite value \(NaN or inf\) \(leaf \["):
        method.build(posteriors_fast).init(params)


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_update_names_non_finite_state_params(method, backend):
    transform, state, batch = _state_and_batch(method, backend)
    with torch.no_grad():
        tree_leaves(state.params)[0].view(-1)[1] = NAN
    _failed_update_leaves_state(transform, state, batch, r"state.params hold a non-finite value \(NaN or inf\)")


@pytest.mark.parametrize("method", METHODS, ids=_ids(METHODS))
def test_batch_leaves_that_disagree_on_the_sample_dimension(method, backend):
    transform, state, (x, y) = _state_and_batch(method, backend)
    _failed_update_leaves_state(transform, state, (x, y[:-2]), r"batch.*leading \(sample\) dimension")


def _broken(function, how):
    def broken(*args):
        out = function(*args)
        value, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        value = value * NAN if how == "nan" else value * float("inf")
        return (value, *rest) if rest is not None else value

    return broken


ROLES = [(m, role) for m in METHODS for role in m.functions]


@pytest.mark.parametrize("method, role", ROLES, ids=[f"{m.name}-{r}" for m, r in ROLES])
@pytest.mark.parametrize("how", ["nan", "inf"])
def test_non_finite_output_names_the_users_function(method, role, how, backend):
    params, batch = method.problem(torch.float64)
    transform = method.build(posteriors_fast, backend=backend, **{role: _broken(method.functions[role], how)})
    state = transform.init(params)
    _failed_update_leaves_state(transform, state, batch, f"{role}.*NaN or inf|NaN or inf.*{role}")


PER_SAMPLE = [m for m in METHODS if m.per_sample]


@pytest.mark.parametrize("method", PER_SAMPLE, ids=_ids(PER_SAMPLE))
@pytest.mark.parametrize("shape", ["scalar", "matrix"])
def test_per_sample_output_of_the_wrong_shape(method, shape, backend):
    ((role, function),) = method.functions.items()

    def wrong(p, batch):
        value, aux = function(p, batch)
        return (value.mean() if shape == "scalar" else torch.stack([value, value], 1)), aux

    params, batch = method.problem(torch.float64)
    transform = method.build(posteriors_fast, backend=backend, **{role: wrong})
    state = transform.init(params)
    got = "shape ()" if shape == "scalar" else r"shape \(6, 2\)"
    _failed_update_leaves_state(
        transform,
        state,
        batch,
        rf"{role} must return one value per sample, a tensor of shape \(6,\).*per_sample=True; got {got}",
    )


SPLITTING = [m for m in METHODS if m.per_sample is False]


@pytest.mark.parametrize("method", SPLITTING, ids=_ids(SPLITTING))
def test_batch_function_returning_one_value_per_sample_without_per_sample(method, backend):
    ((role, function),) = method.functions.items()
    per_sample_fn = tree_map(lambda x: x, method.functions)[role]

    def vector(p, batch):  # per sample (one sample per call): a vector of 2
        value, aux = per_sample_fn(p, batch)
        return torch.stack([value, value]).reshape(-1), aux

    params, batch = method.problem(torch.float64)
    transform = method.build(posteriors_fast, backend=backend, **{role: vector})
    _failed_update_leaves_state(
        transform, transform.init(params), batch, rf"{role} must return a scalar for a batch when per_sample=False"
    )


def _torchopt_adam():
    import torchopt

    return torchopt.adam(1e-2)


# Initial-state hyperparameters holding NaN or inf: refused at init (or at
# build, for the EKF's scalar covariances), naming the argument.
_INIT_CASES = [
    ("vi.diag", {"init_log_sds": NAN}, "init_log_sds must be finite"),
    ("vi.diag", {"init_log_sds": "tree-nan"}, r"init_log_sds hold a non-finite value"),
    ("vi.dense", {"init_L": float("inf")}, "init_L must be finite"),
    ("sgmcmc.sghmc", {"momenta": NAN}, "momenta must be finite"),
    ("sgmcmc.sgnht", {"momenta": NAN}, "momenta must be finite"),
    ("sgmcmc.sghmc", {"momenta": "tree-nan"}, r"momenta hold a non-finite value"),
    ("laplace.diag_fisher", {"init_prec_diag": NAN}, "init_prec_diag must be finite"),
    ("ekf.diag_fisher", {"init_sds": NAN}, "init_sds"),
]


@pytest.mark.parametrize(
    "module, settings, match", _INIT_CASES, ids=[f"{m}-{next(iter(s))}" for m, s, _ in _INIT_CASES]
)
def test_init_rejects_non_finite_initial_values(module, settings, match):
    from tests._trees import random_params
    from tests.methods import log_posterior

    params = random_params("nested", torch.float64)
    settings = {
        k: (tree_map(lambda x: torch.full_like(x, NAN), params) if v == "tree-nan" else v) for k, v in settings.items()
    }
    lib = posteriors_fast
    for part in module.split("."):
        lib = getattr(lib, part)
    if module.startswith("vi."):
        transform = lib.build(log_posterior, _torchopt_adam(), **settings)
    elif module.startswith("sgmcmc."):
        transform = lib.build(log_posterior, lr=1e-2, **settings)
    elif module.startswith("ekf."):
        transform = lib.build(log_posterior, lr=1e-2, **settings)
    else:
        transform = lib.build(log_posterior, **settings)
    with pytest.raises(ValueError, match=match):
        transform.init(params)


@pytest.mark.parametrize("name, value", [("transition_cov", -1.0), ("transition_cov", NAN), ("init_cov", 0.0)])
def test_dense_ekf_build_rejects_a_bad_scalar_covariance(name, value):
    from tests.methods import log_likelihood

    with pytest.raises(ValueError, match=name):
        posteriors_fast.ekf.dense_fisher.build(log_likelihood, lr=0.1, **{name: value})
