"""``syrk``: symmetric rank-k update, ``out ← β·C + α·AᵀA`` for A of shape
(K, P) and symmetric C (by default ``out`` itself, i.e. in place). The core
of every empirical Fisher (β = 0) and of the Woodbury covariance downdate
(β = 1, α = -1).

The eager path computes only the upper-triangle tiles, each with one ATen
GEMM, and mirrors them onto the lower triangle, so the result is exactly
symmetric and costs about half the FLOPs of ``AᵀA``; a full ``addmm_`` would
leave the result symmetric only to rounding, and symmetrising it is another
pass over P² entries (``benchmarks/bench_syrk.py``: the eager tiles against
``J.T @ J``).

The C++ op (``"compiled"`` on the CPU) runs the tiles in parallel in its own
AVX-512 micro-kernel where the CPU has it (``csrc/cpu/gemm_avx512.h``; MKL
uses its AVX2 kernels on AMD CPUs), and ATen GEMMs per tile elsewhere
(``benchmarks/bench_syrk.py``, the ``cpp`` rows).
"""

import importlib

import torch

from posteriors_fast import _library
from posteriors_fast._internal.native import accepts
from posteriors_fast.backends import UNMEASURED_ON_CUDA, decline, implementation, register
from posteriors_fast.ops.new_matrix import new_matrix

#: GEMM tile edge of the eager path: of 384, 512, 768 and 1024, 512 was the
#: fastest or tied at P = 1045, 2410 and 4890 (K = 64 and 256) and at
#: P = 20000, K = 64 (P = 2410, K = 64: 10.2 against 11.4 ms with 1024).
BLOCK = 512


def _mirror_block(size: int) -> int:
    # Transposed tile copies (lower ← upperᵀ): blocks of 256 were fastest at
    # P = 1045 and 5000, blocks of 512 at P = 20000, of the edges 128-1024 tried.
    return 256 if size < 10000 else 512


def syrk_eager(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    mirror: bool = True,
) -> torch.Tensor:
    """``out ← beta·c + alpha·aᵀb`` on the upper triangle (upper tiles with
    ATen GEMMs), mirrored onto the lower one with ``mirror`` (otherwise the
    strictly lower triangle of ``out`` is left as it was). ``b`` defaults to
    ``a``; with ``b`` given the caller guarantees that ``aᵀb`` is symmetric
    (e.g. b = H a with H symmetric, the GGN), and only its upper triangle is
    computed (BLAS calls this gemmt). ``c`` defaults to ``out`` (in place).

    Only the upper triangle of ``c`` is read: it is assumed symmetric. With
    ``beta == 0``, ``c`` is ignored (NaN-safe), so ``out`` may come from
    ``torch.empty``. Passing a separate ``c`` fuses the copy into the update
    (a new output costs one pass over memory, not a clone and an update).

    Returns:
        ``out``.
    """
    size = a.shape[1]
    b = a if b is None else b
    starts = range(0, size, BLOCK)
    for i in starts:
        a_i = a[:, i : i + BLOCK].mT
        for j in starts:
            if j < i:
                continue
            tile = out[i : i + BLOCK, j : j + BLOCK]
            below = torch.tril(tile, -1) if j == i and not mirror else None
            b_j = b[:, j : j + BLOCK]
            if c is None or c is out:
                tile.addmm_(a_i, b_j, beta=beta, alpha=alpha)
            else:
                torch.addmm(c[i : i + BLOCK, j : j + BLOCK], a_i, b_j, beta=beta, alpha=alpha, out=tile)
            if below is not None:  # the diagonal tile's strictly lower part stays
                tile.copy_(torch.triu(tile) + below)
    if mirror:
        _mirror_upper_(out, _mirror_block(size))
    return out


def _mirror_upper_(out: torch.Tensor, block: int) -> None:
    """Copy the upper triangle of ``out`` onto its lower triangle, tile by tile."""
    size = out.shape[0]
    for i in range(0, size, block):
        diag = out[i : i + block, i : i + block]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).mT)
        for j in range(i + block, size, block):
            out[j : j + block, i : i + block].copy_(out[i : i + block, j : j + block].mT)


register(
    "syrk",
    "eager",
    syrk_eager,
    doc="out ← β·C + α·AᵀB for symmetric AᵀB (B = A by default), upper tiles mirrored",
)


def syrk_cpp(out, a, b=None, c=None, alpha=1.0, beta=0.0, mirror=True):
    """C++ kernel (``csrc/cpu/syrk.cpp``): upper tiles in parallel, each in
    the AVX-512 micro-kernel (one single-threaded ATen GEMM per tile on other
    CPUs) and mirrored in cache; eager torch for arguments it does not take
    (see :func:`posteriors_fast._internal.native.accepts`)."""
    if not accepts(a, b, c, out=out):
        return syrk_eager(out, a, b, c, alpha, beta, mirror)
    _library.OPS.syrk_(out, a, b, None if c is out else c, float(alpha), float(beta), bool(mirror))
    return out


def syrk_triton(out, a, b=None, c=None, alpha=1.0, beta=0.0, mirror=True):
    """Triton kernel (``kernels/triton/syrk.py``), upper tiles with a mirrored store."""
    if not accepts(a, b, c, out=out):
        return syrk_eager(out, a, b, c, alpha, beta, mirror)
    kernels = importlib.import_module("posteriors_fast.kernels.triton.syrk")
    kernels.syrk_triton(out, a, b, None if c is out else c, float(alpha), float(beta), bool(mirror))
    return out


register("syrk", "cpp", syrk_cpp, devices=("cpu",))
decline(
    "syrk",
    "torch_compile",
    "not provided: Inductor emits one extern GEMM per tile, no fusion to gain over the native kernels",
)
register("syrk", "triton", syrk_triton, devices=("cuda",), note=UNMEASURED_ON_CUDA)


def syrk_(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    alpha: float = 1.0,
    beta: float = 0.0,
    mirror: bool = True,
    *,
    backend: str,
) -> torch.Tensor:
    """Dispatching entry point, in the schema's argument order (see
    :func:`syrk_eager`); writes and returns ``out``; ``backend`` already resolved."""
    return implementation("syrk", backend, a.device.type)(out, a, b, c, alpha, beta, mirror)


def gram(a: torch.Tensor, scale: float, b: torch.Tensor | None = None, *, backend: str) -> torch.Tensor:
    """``scale · aᵀb`` (``b`` defaults to ``a``; ``aᵀb`` must be symmetric) as a
    new exactly symmetric (P, P) tensor."""
    out = new_matrix((a.shape[1], a.shape[1]), a, backend=backend)
    return syrk_(out, a, b, None, scale, 0.0, backend=backend)
