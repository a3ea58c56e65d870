"""``cov_downdate``: Σ ← Σ − WᵀW in place, the C++ kernel at every ISA level
against a float64 oracle, opcheck, declared non-differentiability, dispatch."""

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import cov_downdate
from tests.ops._native import close, needs_ext

OPS = _library.OPS


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("r,p", [(1, 1), (1, 600), (8, 1030)])
def test_cov_downdate_matches_oracle_and_is_symmetric(dtype, r, p, isa):
    gen = torch.Generator().manual_seed(r + p)
    m = torch.randn(p + 2, p, dtype=torch.float64, generator=gen)
    cov = (m.T @ m / p + torch.eye(p, dtype=torch.float64)).to(dtype)
    w = (0.1 * torch.randn(r, p, dtype=torch.float64, generator=gen)).to(dtype)
    expected = cov.double() - w.double().T @ w.double()
    OPS.cov_downdate_(cov, w)
    close(cov, expected, dtype)
    assert torch.equal(cov, cov.T)


@needs_ext
def test_cov_downdate_opcheck_and_not_differentiable():
    a = torch.randn(6, 20)
    c = torch.randn(20, 20)
    c = c @ c.T + 20 * torch.eye(20)
    torch.library.opcheck(OPS.cov_downdate_.default, (c.clone(), a))
    with pytest.raises(RuntimeError, match="cov_downdate_ is not differentiable"):
        OPS.cov_downdate_(torch.eye(20), a.requires_grad_())
    with pytest.raises(RuntimeError, match="w must be 2-D"):
        OPS.cov_downdate_(torch.eye(20), torch.randn(20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dispatch_cpp_equals_eager_equals_oracle(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 700, dtype=dtype, generator=gen)
    c = torch.randn(700, 700, dtype=dtype, generator=gen)
    c = c @ c.T / 700 + torch.eye(700, dtype=dtype)
    c = (c + c.T) / 2
    want = c.double() - (a / 30).double().T @ (a / 30).double()
    for backend in ("eager", "compiled"):
        cov = c.clone()
        assert cov_downdate.cov_downdate_(cov, a / 30, backend=backend) is cov
        close(cov, want, dtype)
        assert torch.equal(cov, cov.T)
