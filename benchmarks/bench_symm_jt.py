"""Σ·Jᵀ for a symmetric (P, P) Σ and a (R, P) J: the largest GEMM of the
Woodbury EKF step.

Baseline ``torch.mm(Σ, J.T)`` (MKL on the CPU), which is also the library's
``eager`` implementation; ``cpp`` is the C++ kernel (``csrc/cpu/symm_jt.cpp``).
"""

import torch

from posteriors_fast import _library

PROVIDERS = ("torch.mm", "cpp")
BASELINE = "torch.mm"


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(case.p, case.p, generator=g)
    s = (m + m.T).to(device)
    j = torch.randn(case.n, case.p, generator=g).to(device)
    if provider == "torch.mm":
        return lambda: torch.mm(s, j.T)
    ok, why = _library.load_extension()
    if not ok or device != "cpu":
        raise ImportError(why or "the C++ kernels run on the CPU")
    return lambda: _library.OPS.symm_jt(s, j)


def flops(case) -> float:
    """Nominal 2·R·P²."""
    return 2.0 * case.n * case.p * case.p
