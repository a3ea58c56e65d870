"""``syrk``: symmetric rank-k update in place, ``out ← β·out + α·AᵀA``, for A of
shape (K, P). The core of every empirical Fisher (β = 0) and of the Woodbury
covariance downdate (β = 1, α = -1).

Only the upper-triangle tiles are computed, each with one ATen GEMM, and then
mirrored to the lower triangle, so the result is exactly symmetric and costs
about half the FLOPs of ``AᵀA``. Measured on this 2-core CPU, float32, updating
an existing (P, P) buffer:

=========  ==========  ==============  ================
P, K       ``AᵀA``     ``addmm_``      tiles (1024)
=========  ==========  ==============  ================
5000, 256  180 ms      104 ms          63 ms (incl. mirror)
20000, 64  675 ms      291 ms          370 ms (incl. mirror)
=========  ==========  ==============  ================

``addmm_`` leaves the result unsymmetrised; symmetrising a 20000² matrix with
``(A + Aᵀ)/2`` costs another 2.7 s there, so the tiled form wins whenever the
result must be symmetric.
"""

import torch

from posteriors_fast.backends import implementation, register

#: Tile edge. 1024 measured best of {512, 1024, 2048} at P = 20000, K = 64 and
#: close to best (512) at P = 5000, K = 256.
BLOCK = 1024


def syrk_eager(out: torch.Tensor, a: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``out ← beta·out + alpha·aᵀa`` in place (upper tiles, then mirrored).

    With ``beta == 0`` the previous contents of ``out`` are ignored (NaN-safe),
    so ``out`` may come from ``torch.empty``. Only the upper triangle of ``out``
    is read when ``beta != 0``: ``out`` is assumed symmetric.

    Returns:
        ``out``.
    """
    size = a.shape[1]
    starts = range(0, size, BLOCK)
    for i in starts:
        a_i = a[:, i : i + BLOCK].mT
        for j in starts:
            if j >= i:
                out[i : i + BLOCK, j : j + BLOCK].addmm_(
                    a_i, a[:, j : j + BLOCK], beta=beta, alpha=alpha
                )
    for i in starts:
        diag = out[i : i + BLOCK, i : i + BLOCK]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).mT)
        for j in starts:
            if j > i:
                out[j : j + BLOCK, i : i + BLOCK].copy_(out[i : i + BLOCK, j : j + BLOCK].mT)
    return out


register(
    "syrk",
    "eager",
    syrk_eager,
    doc="out ← β·out + α·AᵀA in place, upper tiles mirrored (Fisher, EKF downdate)",
)


def syrk_(out: torch.Tensor, a: torch.Tensor, alpha: float, beta: float, *, backend: str) -> torch.Tensor:
    """Dispatching entry point (in place on ``out``); ``backend`` already resolved."""
    return implementation("syrk", backend, a.device.type)(out, a, alpha, beta)


def gram(a: torch.Tensor, scale: float, *, backend: str) -> torch.Tensor:
    """``scale · aᵀa`` as a new exactly symmetric (P, P) tensor."""
    out = torch.empty(a.shape[1], a.shape[1], dtype=a.dtype, device=a.device)
    return syrk_(out, a, scale, 0.0, backend=backend)
