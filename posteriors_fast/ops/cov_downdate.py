"""``cov_downdate``: the Woodbury EKF covariance step ``Σ ← Σ − WᵀW`` in place,
for a Kalman factor W of shape (R, P), reading Σ's upper triangle and writing an
exactly symmetric result (the symmetrisation is the mirror of the upper
triangle, free inside the tiled kernel).

It is :mod:`~posteriors_fast.ops.syrk` with α = −1, β = 1 under its own name so
that each kernel family can specialise it (the Triton kernel fuses the
subtraction, the mirror and the store in one pass over Σ).
"""

import importlib

import torch

from posteriors_fast import _library
from posteriors_fast._internal.native import accepts
from posteriors_fast.backends import UNMEASURED_ON_CUDA, decline, implementation, register
from posteriors_fast.ops.syrk import syrk_eager


def cov_downdate_eager(cov: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Upper tiles of ``cov − WᵀW`` with ATen GEMMs, then mirrored."""
    return syrk_eager(cov, w, None, None, -1.0, 1.0)


def cov_downdate_cpp(cov: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """C++ kernel (``csrc/cpu/syrk.cpp``); eager for arguments it does not take."""
    if not accepts(w, out=cov):
        return cov_downdate_eager(cov, w)
    _library.OPS.cov_downdate_(cov, w)
    return cov


def cov_downdate_triton(cov: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Triton kernel (``kernels/triton/cov_downdate.py``); imported on first use
    so that triton is only imported where it runs."""
    if not accepts(w, out=cov):
        return cov_downdate_eager(cov, w)
    importlib.import_module("posteriors_fast.kernels.triton.cov_downdate").cov_downdate_triton(cov, w)
    return cov


register(
    "cov_downdate",
    "eager",
    cov_downdate_eager,
    doc="Σ ← Σ − WᵀW in place, exactly symmetric (Woodbury EKF step)",
)
register("cov_downdate", "cpp", cov_downdate_cpp, devices=("cpu",))
decline(
    "cov_downdate",
    "torch_compile",
    "not provided: Inductor emits one extern GEMM per tile, no fusion to gain over the native kernels",
)
register("cov_downdate", "triton", cov_downdate_triton, devices=("cuda",), note=UNMEASURED_ON_CUDA)


def cov_downdate_(cov: torch.Tensor, w: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point, writes ``cov``; ``backend`` already resolved."""
    return implementation("cov_downdate", backend, cov.device.type)(cov, w)
