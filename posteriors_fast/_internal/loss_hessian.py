"""``H J`` for the Hessian H of a scalar loss in output space (z of shape
(N, ...), d = z.numel()) and an output Jacobian J (d, P), without forming the
(d, d) Hessian.

H is built in row chunks, each from a vmap of forward-over-reverse products
with unit vectors. When every chunk shows H to be block diagonal over the
leading (sample) dimension of z — true, exactly, for any loss that is a sum or
mean of per-sample terms, such as cross-entropy — only the N blocks of size
(c, c), c = d / N, are kept and ``H J`` is a batched product, O(N·c²·P), where
the dense product costs O(d²·P). Otherwise the chunks are multiplied into J as
they come. The check is exact (off-block entries must be exactly zero), so
both paths give the same result up to rounding.
"""

from typing import Callable

import torch
from torch.func import grad, jvp, vmap

#: Hessian entries held at once (rows × d); 4M floats = 16 MB in float32.
_CHUNK_ENTRIES = 1 << 22


def hessian_rows(loss: Callable, z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the Hessian of ``loss`` at ``z``, shape (rows, d)."""
    d = z.numel()
    basis = torch.zeros(stop - start, d, dtype=z.dtype, device=z.device)
    basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
    gradient = grad(loss)

    def product(tangent):
        return jvp(gradient, (z,), (tangent.reshape(z.shape),))[1].reshape(-1)

    # Forward-over-reverse can promote: for a float32 z, the Hessian of
    # (z.sum() - 1.0) ** 2 comes back float64 (a 0-d intermediate's tangent),
    # which the products with the float32 Jacobian then refuse.
    return vmap(product)(basis).to(z.dtype)


def hessian_blocks(loss: Callable, z: torch.Tensor):
    """The (N, c, c) per-sample blocks of the Hessian of ``loss`` at ``z`` when
    it is exactly block diagonal over dimension 0 of z, else None."""
    d = z.numel()
    n = z.shape[0] if z.ndim > 0 else 1
    c = d // n
    samples_per_chunk = max(1, _CHUNK_ENTRIES // max(1, c * d))
    blocks = []
    for s0 in range(0, n, samples_per_chunk):
        s1 = min(n, s0 + samples_per_chunk)
        rows = hessian_rows(loss, z, s0 * c, s1 * c).reshape(s1 - s0, c, n, c)
        own = rows[torch.arange(s1 - s0), :, torch.arange(s0, s1), :]  # (m, c, c)
        rows[torch.arange(s1 - s0), :, torch.arange(s0, s1), :] = 0
        if bool(rows.any()):
            return None
        blocks.append(own)
    return torch.cat(blocks)


def loss_hessian_times(loss: Callable, z: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """``H @ jac`` with H the Hessian of ``loss`` (z ↦ scalar) at ``z``.

    Args:
        loss: Scalar function of z.
        z: Output of the forward function; dimension 0 is the sample dimension.
        jac: (d, P) Jacobian of z (raveled) with respect to the parameters.

    Returns:
        (d, P) tensor.
    """
    blocks = hessian_blocks(loss, z)
    if blocks is None:
        return _dense_times(loss, z, jac)
    n, c, _ = blocks.shape
    return torch.bmm(blocks, jac.reshape(n, c, -1)).reshape(z.numel(), -1)


def _dense_times(loss: Callable, z: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    d = z.numel()
    rows_per_chunk = max(1, _CHUNK_ENTRIES // d)
    out = torch.empty(d, jac.shape[1], dtype=jac.dtype, device=jac.device)
    for r0 in range(0, d, rows_per_chunk):
        r1 = min(d, r0 + rows_per_chunk)
        torch.mm(hessian_rows(loss, z, r0, r1), jac, out=out[r0:r1])
    return out
