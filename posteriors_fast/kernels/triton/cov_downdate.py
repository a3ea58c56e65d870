"""Triton covariance downdate, ``cov ← cov − WᵀW`` for W of shape (R, P): the
Woodbury step of the low-rank (EKF / Laplace) covariance updates.

It is ``syrk`` with ``b = a = W``, ``c = out = cov``, ``α = -1``, ``β = 1`` and
mirroring: only cov's upper triangle is read and the result is exactly
symmetric. The kernel is launched directly here (``syrk.launch_syrk``, through
``wrap_triton``), not by calling the ``syrk_triton`` custom op.

Registered as the custom op ``posteriors_fast::cov_downdate_triton``.
"""

import torch

from posteriors_fast.kernels.triton._launch import check_factor, check_like
from posteriors_fast.kernels.triton.syrk import launch_syrk


def check_cov_downdate_args(cov: torch.Tensor, w: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    check_factor("w", w, "(R, P)")
    check_like("cov", cov, (w.shape[1], w.shape[1]), w, "w")


@torch.library.triton_op("posteriors_fast::cov_downdate_triton", mutates_args={"cov"})
def cov_downdate_triton(cov: torch.Tensor, w: torch.Tensor) -> None:
    """``cov ← cov − wᵀw`` in place; reads cov's upper triangle, writes both."""
    check_cov_downdate_args(cov, w)
    launch_syrk(cov, w, None, None, -1.0, 1.0, True)
