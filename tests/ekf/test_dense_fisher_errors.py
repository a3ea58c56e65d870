"""Bad input to ekf.dense_fisher: a clear error naming the argument, and with
inplace=True a failed update leaves every tensor of the state bit for bit as it was."""

import pytest
import torch
from optree import tree_leaves, tree_map

from posteriors_fast._internal.cholesky import CholeskyError
from posteriors_fast.ekf import dense_fisher

from ._problem import log_likelihood, make_problem

P = 28


@pytest.fixture
def problem():
    return make_problem(5, torch.float64)


@pytest.mark.parametrize(
    "init_cov, match",
    [
        (torch.ones(P, P + 1), r"init_cov must be .*square \(28, 28\)"),
        (torch.eye(P - 1), r"init_cov must be .*\(28, 28\).*got shape \(27, 27\)"),
        (torch.ones(P), r"init_cov must be .*got shape \(28,\)"),
        (-torch.eye(P), r"init_cov must be positive definite"),
        (torch.diag(torch.cat([torch.ones(P - 1), torch.zeros(1)])), r"init_cov must be positive definite"),
        (torch.triu(torch.ones(P, P)), r"init_cov must be symmetric"),
        (torch.full((P, P), float("nan")), r"init_cov contains NaN"),
        (-1.0, r"init_cov .* c > 0"),
        (0.0, r"init_cov .* c > 0"),
        (float("inf"), r"init_cov .* finite"),
    ],
)
def test_bad_init_cov(problem, init_cov, match):
    params, _ = problem
    with pytest.raises(ValueError, match=match):
        dense_fisher.init(params, init_cov=init_cov)


def test_init_cov_wrong_type(problem):
    with pytest.raises(TypeError, match="init_cov"):
        dense_fisher.init(problem[0], init_cov="big")


@pytest.mark.parametrize(
    "transition_cov, match",
    [
        (torch.zeros(P, P + 2), r"transition_cov must be .*\(28, 28\)"),
        (torch.zeros(3, 3), r"transition_cov must be .*\(28, 28\)"),
        (-torch.eye(P), r"transition_cov must be positive semi-definite"),
        (-0.1, r"transition_cov .* c >= 0"),
        (float("nan"), r"transition_cov .* finite"),
    ],
)
def test_bad_transition_cov(problem, transition_cov, match):
    params, batch = problem
    state = dense_fisher.init(params)
    with pytest.raises(ValueError, match=match):
        dense_fisher.update(state, batch, log_likelihood, 0.1, transition_cov=transition_cov)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf"), torch.tensor(-2.0)])
def test_bad_lr(problem, lr):
    params, batch = problem
    with pytest.raises(ValueError, match="lr must be finite and positive"):
        dense_fisher.build(log_likelihood, lr)
    with pytest.raises(ValueError, match="lr must be finite and positive"):
        dense_fisher.update(dense_fisher.init(params), batch, log_likelihood, lr)


def test_lr_wrong_type():
    with pytest.raises(TypeError, match="lr must be a number"):
        dense_fisher.build(log_likelihood, "fast")


def test_batch_leading_dims_disagree(problem):
    params, batch = problem
    batch = {"x": batch["x"], "y": batch["y"][:3]}
    with pytest.raises(ValueError, match=r"batch leaves disagree on the leading \(sample\) dimension"):
        dense_fisher.update(dense_fisher.init(params), batch, log_likelihood, 0.1)


def test_non_floating_params():
    params = {"w": torch.ones(3, dtype=torch.int64)}
    with pytest.raises(TypeError, match=r"params must hold floating-point tensors; found dtype torch.int64"):
        dense_fisher.init(params)


def test_state_cov_wrong_shape(problem):
    params, batch = problem
    state = dense_fisher.EKFDenseState(params, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"state.cov must be \(28, 28\)"):
        dense_fisher.update(state, batch, log_likelihood, 0.1)


def _snapshot(state):
    return [(t.clone(), t.data_ptr()) for t in tree_leaves((state.params, state.cov, state.log_likelihood))]


def _assert_unchanged(state, snapshot):
    now = tree_leaves((state.params, state.cov, state.log_likelihood))
    assert len(now) == len(snapshot)
    for t, (old, ptr) in zip(now, snapshot):
        assert t.data_ptr() == ptr
        assert torch.equal(t, old) or (t.numel() == 0 and old.numel() == 0)


def _nan_log_likelihood(p, batch):
    value, z = log_likelihood(p, batch)
    return value * float("nan"), z


def _inf_gradient(p, batch):
    # sqrt at 0: value 0 (finite), derivative +inf.
    value, z = log_likelihood(p, batch)
    return value + torch.sqrt(p["b1"] - p["b1"].detach()).sum(), z


def _no_aux(p, batch):
    return log_likelihood(p, batch)[0]


@pytest.mark.parametrize(
    "ll, error, match",
    [
        (_nan_log_likelihood, ValueError, "log_likelihood returned NaN or inf"),
        (_inf_gradient, ValueError, "the gradient of log_likelihood is NaN or inf"),
        (_no_aux, RuntimeError, "Auxiliary output not found"),
    ],
)
def test_failed_inplace_update_leaves_state_untouched(problem, ll, error, match):
    params, batch = problem
    state = dense_fisher.update(dense_fisher.init(params), batch, log_likelihood, 0.1)
    snap = _snapshot(state)
    with pytest.raises(error, match=match):
        dense_fisher.update(state, batch, ll, 0.1, inplace=True)
    _assert_unchanged(state, snap)


def test_cholesky_failure_names_the_matrix_and_leaves_state(problem):
    # Precision path (N >= P): an indefinite covariance cannot be factored.
    params, batch = make_problem(40, torch.float64)
    state = dense_fisher.EKFDenseState(
        tree_map(torch.clone, params), -torch.eye(P, dtype=torch.float64), torch.tensor(0.0)
    )
    snap = _snapshot(state)
    with pytest.raises(CholeskyError, match=r"predicted covariance .* not positive definite.*init_cov"):
        dense_fisher.update(state, batch, log_likelihood, 0.1, inplace=True)
    _assert_unchanged(state, snap)
    # CholeskyError is torch's LinAlgError, as posteriors 0.0.5 would raise.
    assert issubclass(CholeskyError, torch.linalg.LinAlgError)


def test_woodbury_cholesky_failure_names_the_matrix(problem):
    params, batch = problem  # N = 5 < P: Woodbury path
    state = dense_fisher.EKFDenseState(params, -100.0 * torch.eye(P, dtype=torch.float64))
    with pytest.raises(CholeskyError, match=r"innovation matrix S"):
        dense_fisher.update(state, batch, log_likelihood, 1.0)


def test_sample_from_non_pd_covariance():
    state = dense_fisher.EKFDenseState({"a": torch.zeros(2)}, -torch.eye(2))
    with pytest.raises(CholeskyError, match="state.cov"):
        dense_fisher.sample(state, (3,))


def test_wrong_state_type(problem):
    params, batch = problem
    with pytest.raises(TypeError, match="state must be an EKFDenseState"):
        dense_fisher.update((params, torch.eye(P)), batch, log_likelihood, 0.1)
