"""Property tests (hypothesis): random sizes for the covariance update and the
symmetric product, against float64 dense formulas."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posteriors_fast.ops import syrk
from posteriors_fast.ops.lowrank_update import lowrank_update


def _spd(p, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    return a @ a.T / p + 0.3 * torch.eye(p, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    size=st.integers(1, 12),
    beta=st.floats(1e-3, 10.0),
    q=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_lowrank_update_is_the_dense_inverse(rows, size, beta, q, seed):
    cov = _spd(size, seed)
    jac = torch.randn(rows, size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    plan = lowrank_update(cov, q, jac, beta, backend="eager")
    want = torch.linalg.inv(torch.linalg.inv(cov + q * torch.eye(size, dtype=torch.float64)) + beta * jac.T @ jac)
    got = plan.write()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(plan.mean_step, want @ jac.mean(0), rtol=1e-7, atol=1e-9)
    assert torch.equal(got, got.T)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 9),
    size=st.integers(1, 40),
    block=st.integers(1, 17),
    alpha=st.floats(-2.0, 2.0),
    beta=st.sampled_from([0.0, 1.0, -0.5]),
    seed=st.integers(0, 2**16),
)
def test_syrk_any_tiling(k, size, block, alpha, beta, seed):
    original = syrk.BLOCK
    syrk.BLOCK = block
    try:
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(k, size, generator=g, dtype=torch.float64)
        c = _spd(size, seed)
        out = torch.empty(size, size, dtype=torch.float64)
        got = syrk.syrk_(out, a, None, c, alpha, beta, backend="eager")
        torch.testing.assert_close(got, beta * c + alpha * a.T @ a, rtol=1e-10, atol=1e-10)
        assert torch.equal(got, got.T)
    finally:
        syrk.BLOCK = original
