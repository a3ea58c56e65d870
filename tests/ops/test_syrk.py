"""syrk: out ← β·out + α·AᵀA, exactly symmetric, against a float64 oracle."""

import pytest
import torch

from posteriors_fast.ops import syrk

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.fixture(params=[1024, 7], ids=["block=1024", "block=7"])
def block(request, monkeypatch):
    # A small block exercises the tiling (P not a multiple of the block) cheaply.
    monkeypatch.setattr(syrk, "BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("k, p", [(1, 1), (1, 23), (5, 23), (40, 16), (3, 50)])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-1.0, 1.0), (0.25, 2.0)])
def test_syrk_matches_oracle(backend, dtype, block, k, p, alpha, beta):
    g = torch.Generator().manual_seed(k * 100 + p)
    a = torch.randn(k, p, generator=g, dtype=dtype)
    base = torch.randn(p, p, generator=g, dtype=dtype)
    base = base + base.T
    out = base.clone() if beta != 0 else torch.full((p, p), float("nan"), dtype=dtype)
    want = (beta * base.double() if beta != 0 else 0) + alpha * a.double().T @ a.double()
    got = syrk.syrk_(out, a, None, None, alpha, beta, backend=backend)
    assert got is out
    torch.testing.assert_close(got, want.to(dtype), **TOL[dtype])
    assert torch.equal(got, got.T)


def test_gram_non_contiguous_input(backend, block):
    a = torch.randn(30, 9, dtype=torch.float64).T  # (9, 30), non-contiguous
    got = syrk.gram(a, 0.5, backend=backend)
    torch.testing.assert_close(got, 0.5 * a.T @ a)
    assert torch.equal(got, got.T)


def test_gram_with_symmetric_product(backend, block):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=g, dtype=torch.float64)
    h = torch.randn(12, 12, generator=g, dtype=torch.float64)
    h = h + h.T
    got = syrk.gram(a, 2.0, h @ a, backend=backend)
    torch.testing.assert_close(got, 2.0 * a.T @ h @ a)
    assert torch.equal(got, got.T)
