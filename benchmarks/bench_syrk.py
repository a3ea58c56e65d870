"""Symmetric rank-k product JᵀJ of a (K, P) float matrix into a (P, P) buffer.

Baseline ``J.T @ J`` (a full GEMM into a new tensor, what a naive Fisher does).
``eager`` is posteriors_fast's pure-torch tiled op, ``cpp`` the C++ kernel
(``csrc/cpu/syrk.cpp``) writing the full symmetric result, ``cpp upper`` the
same kernel writing one triangle only (for consumers such as Cholesky that
read one triangle), ``triton`` the Triton kernel on CUDA (full result). All
write into a preallocated buffer, as the library does.
"""

import torch

from benchmarks.kernels import require
from posteriors_fast import _library
from posteriors_fast.ops import syrk

PROVIDERS = ("J.T @ J", "eager", "cpp", "cpp upper", "triton")
BASELINE = "J.T @ J"


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(case.n, case.p, generator=g).to(device)
    if provider == "J.T @ J":
        return lambda: a.T @ a
    out = torch.empty(case.p, case.p, device=device)
    if provider == "eager":
        return lambda: syrk.syrk_eager(out, a, None, None, 1.0, 0.0)
    if provider == "triton":
        require("triton", device)
        return lambda: syrk.syrk_triton(out, a, None, None, 1.0, 0.0)
    require("cpp", device)
    mirror = provider == "cpp"
    return lambda: _library.OPS.syrk_(out, a, None, None, 1.0, 0.0, mirror)


def flops(case) -> float:
    """Nominal 2·K·P² for every provider (the full product's count), so the
    GFLOP/s column compares like with like."""
    return 2.0 * case.n * case.p * case.p
