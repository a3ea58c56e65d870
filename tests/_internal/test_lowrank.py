"""The shared low-rank helpers against float64 dense formulas: the output
covariance and the rank check."""

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
