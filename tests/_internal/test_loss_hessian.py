"""loss_hessian_times: H J without the (d, d) Hessian, for separable losses
(block path) and coupled ones (dense path), against jacfwd(jacrev) in float64."""

import pytest
import torch
from torch.func import jacfwd, jacrev

from posteriors_fast._internal import loss_hessian
from tests._compare import tol


def _cross_entropy(z):
    return torch.nn.functional.cross_entropy(z, torch.arange(z.shape[0]) % z.shape[1])


def _coupled(z):
    return (z.sum() ** 2) + (z**3).sum()  # couples every sample with every other


def _oracle(loss, z, jac):
    d = z.numel()
    return jacfwd(jacrev(loss))(z).reshape(d, d) @ jac


@pytest.mark.parametrize("loss", [_cross_entropy, _coupled], ids=["separable", "coupled"])
@pytest.mark.parametrize("n, c", [(1, 3), (7, 4), (5, 1)])
@pytest.mark.parametrize("chunk", [1 << 22, 5], ids=["one-chunk", "tiny-chunks"])
def test_matches_dense_hessian(dtype, loss, n, c, chunk, monkeypatch):
    monkeypatch.setattr(loss_hessian, "_CHUNK_ENTRIES", chunk)
    g = torch.Generator().manual_seed(n * 10 + c)
    z = torch.randn(n, c, generator=g, dtype=dtype)
    jac = torch.randn(n * c, 11, generator=g, dtype=dtype)
    got = loss_hessian.loss_hessian_times(loss, z, jac)
    torch.testing.assert_close(got, _oracle(loss, z, jac), **tol(dtype, "op"))


def test_block_path_is_taken_for_separable_losses(monkeypatch):
    called = []
    monkeypatch.setattr(loss_hessian, "_dense_times", lambda *a: called.append(1))
    z = torch.randn(6, 3, dtype=torch.float64)
    loss_hessian.loss_hessian_times(_cross_entropy, z, torch.randn(18, 4, dtype=torch.float64))
    assert called == []
    loss_hessian.loss_hessian_times(_coupled, z, torch.randn(18, 4, dtype=torch.float64))
    assert called == [1]
