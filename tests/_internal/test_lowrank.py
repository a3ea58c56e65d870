"""The shared low-rank helpers against float64 dense formulas: the exact
predict step, Woodbury products, the output covariance and the rank check."""

import pytest
import torch

from posteriors_fast._internal import lowrank
from posteriors_fast.ops.jsjt import jsjt
from tests._compare import tol


def _case(size, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(size, generator=g) + 0.2).to(dtype), torch.randn(size, rank, generator=g).to(dtype)


def _dense(diag, factor):
    return torch.diag(diag.double()) + factor.double() @ factor.double().T


@pytest.mark.parametrize("transition", ["scalar", "vector"])
@pytest.mark.parametrize("size, rank", [(23, 4), (5, 9)])
def test_predict_is_exact(dtype, transition, size, rank, monkeypatch):
    monkeypatch.setattr(lowrank, "CHUNK_ROWS", 7)  # several chunks
    diag, factor = _case(size, rank, dtype)
    q = (
        0.3
        if transition == "scalar"
        else (torch.rand(size, generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype)
    )
    new_diag, new_factor = lowrank.predict(diag, factor, q)
    qd = q * torch.eye(size, dtype=torch.float64) if transition == "scalar" else torch.diag(q.double())
    want = torch.linalg.inv(torch.linalg.inv(_dense(diag, factor)) + qd)
    torch.testing.assert_close(_dense(new_diag, new_factor).to(dtype), want.to(dtype), **tol(dtype))
    assert new_factor.shape == factor.shape
    assert lowrank.predict(diag, factor, 0.0) == (diag, factor)


def test_output_covariance(dtype, monkeypatch):
    monkeypatch.setattr(lowrank, "CHUNK_ROWS", 5)
    diag, factor = _case(19, 3, dtype)
    cov = torch.linalg.inv(_dense(diag, factor))
    jac = torch.randn(4, 2, 19, dtype=dtype)
    got = lowrank.output_covariance(jac, diag, factor, lambda j, var: jsjt(j, var, backend="eager"))
    want = torch.einsum("ncp,pq,nkq->nck", jac.double(), cov, jac.double())
    torch.testing.assert_close(got, want.to(dtype), **tol(dtype))


@pytest.mark.parametrize("rank", [True, 1.0, "2", None, [2]])
def test_rank_type_errors(rank):
    with pytest.raises(TypeError, match="rank must be a positive integer"):
        lowrank.check_rank(rank)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_value_errors(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        lowrank.check_rank(rank)


def test_rank_accepts_integer_like():
    assert lowrank.check_rank(3) == 3 and lowrank.check_rank(torch.tensor(4)) == 4
