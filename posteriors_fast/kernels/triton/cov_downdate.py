"""Triton covariance downdate, ``cov ← cov − WᵀW`` for W of shape (R, P): the
Woodbury step of the low-rank (EKF / Laplace) covariance updates.

It is ``syrk`` with ``b = a = W``, ``c = out = cov``, ``α = -1``, ``β = 1`` and
mirroring: only cov's upper triangle is read and the result is exactly
symmetric. ``_syrk_kernel`` is launched directly here (through
``wrap_triton``, see ``syrk.launch``), not by calling the ``syrk_triton``
custom op.

Registered as the custom op ``posteriors_fast::cov_downdate_triton``.
"""

import torch
import triton

from posteriors_fast.kernels.triton.syrk import BLOCK_K, BLOCK_MN, _syrk_kernel, launch


def check_cov_downdate_args(cov: torch.Tensor, w: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"w must be a 2-D tensor of shape (R, P), got {got}")
    if w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"w must be float32 or float64, got {w.dtype}")
    size = w.shape[1]
    if not isinstance(cov, torch.Tensor) or tuple(cov.shape) != (size, size):
        got = tuple(cov.shape) if isinstance(cov, torch.Tensor) else type(cov).__name__
        raise ValueError(f"cov must have shape ({size}, {size}) to match w, got {got}")
    if cov.dtype != w.dtype:
        raise ValueError(f"cov must have dtype {w.dtype} (that of w), got {cov.dtype}")
    if cov.device != w.device:
        raise ValueError(f"cov must be on device {w.device} (that of w), got {cov.device}")


@torch.library.triton_op("posteriors_fast::cov_downdate_triton", mutates_args={"cov"})
def cov_downdate_triton(cov: torch.Tensor, w: torch.Tensor) -> None:
    """``cov ← cov − wᵀw`` in place; reads cov's upper triangle, writes both."""
    check_cov_downdate_args(cov, w)
    rank, size = w.shape
    if size == 0:
        return
    grid = (triton.cdiv(size, BLOCK_MN), triton.cdiv(size, BLOCK_MN))
    launch(
        _syrk_kernel,
        grid,
        w,
        w,
        cov,
        cov,
        size,
        rank,
        -1.0,
        1.0,
        w.stride(0),
        w.stride(1),
        w.stride(0),
        w.stride(1),
        cov.stride(0),
        cov.stride(1),
        cov.stride(0),
        cov.stride(1),
        HAS_C=True,
        MIRROR=True,
        BLOCK_M=BLOCK_MN,
        BLOCK_N=BLOCK_MN,
        BLOCK_K=BLOCK_K,
    )
