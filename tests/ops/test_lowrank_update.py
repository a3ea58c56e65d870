"""lowrank_update: ((Σ+Q)⁻¹ + β JᵀJ)⁻¹ and its mean step, both forms, against
float64 dense inverses; writing in place into Σ equals writing a new tensor."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posteriors_fast.ops import syrk
from posteriors_fast.ops.lowrank_update import lowrank_update
from tests._compare import tol


def _spd(p, g, dtype):
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    return (a @ a.T / p + 0.5 * torch.eye(p, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("rows, p", [(1, 9), (4, 9), (9, 9), (20, 9), (3, 31)])
@pytest.mark.parametrize("transition", ["zero", "scalar", "matrix"])
def test_matches_dense_inverse(backend, dtype, rows, p, transition, monkeypatch):
    monkeypatch.setattr(syrk, "BLOCK", 8)  # tiles even at these sizes
    g = torch.Generator().manual_seed(rows * 31 + p)
    cov = _spd(p, g, dtype)
    jac = torch.randn(rows, p, generator=g, dtype=dtype)
    q = {"zero": 0.0, "scalar": 0.3, "matrix": _spd(p, g, dtype) * 0.1}[transition]
    beta = 0.7
    q64 = q.double() if torch.is_tensor(q) else q * torch.eye(p, dtype=torch.float64)
    pred = cov.double() + q64
    want = torch.linalg.inv(torch.linalg.inv(pred) + beta * jac.double().T @ jac.double())
    want_step = want @ jac.double().mean(0)

    plan = lowrank_update(cov, q, jac, beta, backend=backend)
    torch.testing.assert_close(plan.mean_step, want_step.to(dtype), **tol(dtype))
    fresh = plan.write()
    assert fresh is not cov
    torch.testing.assert_close(fresh, want.to(dtype), **tol(dtype))
    assert torch.equal(fresh, fresh.T)
    before = cov.clone()
    torch.testing.assert_close(cov, before)  # write() without out leaves Σ alone
    in_place = plan.write(cov)
    assert in_place is cov
    torch.testing.assert_close(in_place, fresh, rtol=0, atol=0)


def _spd_seeded(p, seed):
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
    cov = _spd_seeded(size, seed)
    jac = torch.randn(rows, size, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    plan = lowrank_update(cov, q, jac, beta, backend="eager")
    want = torch.linalg.inv(torch.linalg.inv(cov + q * torch.eye(size, dtype=torch.float64)) + beta * jac.T @ jac)
    got = plan.write()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(plan.mean_step, want @ jac.mean(0), rtol=1e-7, atol=1e-9)
    assert torch.equal(got, got.T)
