"""One test per deliberate difference from posteriors 0.0.5 (README section
"Differences from posteriors 0.0.5"). Each asserts the corrected behaviour,
which the reference does not have."""

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast.ekf import dense_fisher

from .ekf._problem import log_likelihood, make_problem

P = 28


def test_ekf_update_adds_fisher_to_precision(ref):
    params, batch = make_problem(6, torch.float64)
    ours = dense_fisher.build(log_likelihood, 0.5, init_cov=1.0)
    new = ours.update(ours.init(params), batch)
    # Adding lr·F (PSD) to the precision can only shrink the covariance.
    assert float(torch.linalg.eigvalsh(torch.eye(P, dtype=torch.float64) - new.cov).min()) > -1e-12
    theirs = ref.ekf.dense_fisher.build(log_likelihood, 0.5, init_cov=1.0)
    try:
        old = theirs.update(theirs.init(params), batch)
    except torch.linalg.LinAlgError:
        return  # the reference's sign error already broke its Cholesky
    # The reference subtracts lr·F, so its covariance grows instead.
    assert float(old.cov.trace()) > P > float(new.cov.trace())


def test_scalar_transition_cov_means_c_times_identity():
    params, batch = make_problem(3, torch.float64)
    lr, c = 1e-12, 0.25  # tiny lr: the update is (almost) only the prediction Σ + Q
    state = dense_fisher.init(params, init_cov=1.0)
    new = dense_fisher.update(state, batch, log_likelihood, lr, transition_cov=c)
    torch.testing.assert_close(new.cov, 1.25 * torch.eye(P, dtype=torch.float64), rtol=0, atol=1e-9)


def test_identity_on_params_dtype_and_device():
    params, _ = make_problem(1, torch.float64)
    state = dense_fisher.init(params, init_cov=0.5)
    assert state.cov.dtype == torch.float64
    assert state.cov.device == params["w1"].device
    assert state.log_likelihood.device == params["w1"].device


def test_L_from_flat_keeps_dtype():
    flat = torch.arange(1.0, 7.0, dtype=torch.float64)
    L = pf.L_from_flat(flat)
    assert L.dtype == torch.float64
    torch.testing.assert_close(pf.L_to_flat(L), flat)


def test_states_do_not_share_the_default_log_likelihood():
    params_a, batch = make_problem(4, torch.float64)
    params_b, _ = make_problem(4, torch.float64, seed=1)
    a = dense_fisher.EKFDenseState(params_a, torch.eye(P, dtype=torch.float64))
    b = dense_fisher.EKFDenseState(params_b, torch.eye(P, dtype=torch.float64))
    default = dense_fisher.EKFDenseState._field_defaults["log_likelihood"]
    a = dense_fisher.update(a, batch, log_likelihood, 0.1, inplace=True)
    assert a.log_likelihood.shape == () and a.log_likelihood is not default
    assert b.log_likelihood.numel() == 0 and default.numel() == 0
    # States from init never share a tensor either.
    s1, s2 = dense_fisher.init(params_a), dense_fisher.init(params_b)
    assert s1.log_likelihood is not s2.log_likelihood


def test_init_copies_a_tensor_init_cov():
    params, batch = make_problem(4, torch.float64)
    init_cov = 0.3 * torch.eye(P, dtype=torch.float64)
    state = dense_fisher.init(params, init_cov)
    dense_fisher.update(state, batch, log_likelihood, 0.5, inplace=True)
    torch.testing.assert_close(init_cov, 0.3 * torch.eye(P, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(), (2, 3)])
def test_sample_accepts_any_sample_shape(ref, shape):
    params, _ = make_problem(1, torch.float64)
    state = dense_fisher.init(params)
    draws = dense_fisher.sample(state, torch.Size(shape))
    assert draws["w1"].shape == torch.Size(shape) + params["w1"].shape
    with pytest.raises(Exception):
        ref.ekf.dense_fisher.sample(ref.ekf.dense_fisher.EKFDenseState(params, state.cov), torch.Size(shape))
