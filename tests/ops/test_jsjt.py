"""``jsjt``: per-sample J diag(v) Jᵀ against a float64 oracle, both backends."""

import pytest
import torch

from posteriors_fast.ops import jsjt
from tests._compare import assert_close_to_oracle


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 40), (64, 10, 257)], ids=str)
def test_matches_float64_oracle(shape, dtype, backend):
    n, c, p = shape
    gen = torch.Generator().manual_seed(p)
    jac = torch.randn(n, c, p, dtype=torch.float64, generator=gen)
    var = torch.rand(p, dtype=torch.float64, generator=gen)
    want = torch.einsum("ncp,p,ndp->ncd", jac, var, jac)
    got = jsjt.jsjt(jac.to(dtype), var.to(dtype), backend=backend)
    assert got.shape == (n, c, c) and got.dtype == dtype
    assert_close_to_oracle(got, want, dtype)
