"""``ggn_diag``: diag(JᵀHJ) from J and HJ, every family against a float64 oracle."""

import pytest
import torch

from posteriors_fast.ops import ggn_diag
from tests._compare import assert_close_to_oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 129)], ids=str)
def test_families_match_float64_oracle(monkeypatch, dtype, shape):
    # Above its size threshold the compiled family fuses the multiply-sum;
    # forced here on small inputs so the compiled graph itself is checked.
    monkeypatch.setattr(ggn_diag, "COMPILE_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(shape[1])
    jac = torch.randn(*shape, dtype=torch.float64, generator=gen)
    hj = torch.randn(*shape, dtype=torch.float64, generator=gen)
    want = torch.einsum("jp,jp->p", jac, hj)
    for family in (ggn_diag.ggn_diag_eager, ggn_diag.ggn_diag_torch_compile):
        got = family(jac.to(dtype), hj.to(dtype))
        assert got.dtype == dtype and got.shape == (shape[1],)
        assert_close_to_oracle(got, want, dtype)


def test_dispatch_and_autograd_stay_eager():
    jac = torch.randn(5, 9, requires_grad=True)
    hj = torch.randn(5, 9)
    out = ggn_diag.ggn_diag(jac, hj, backend="compiled")
    out.sum().backward()
    torch.testing.assert_close(jac.grad, hj)
