"""``symm_jt``: ``S·Jᵀ`` (P, R) for a symmetric S (P, P) and J (R, P), the
``Σ·Jᵀ`` that opens the Woodbury EKF step and its largest GEMM (2·R·P² FLOPs:
3 GFLOP at P = 4890, R = 64).

The C++ kernel uses S's symmetry to read it by rows, as stored, in the
AVX-512 micro-kernel that ``syrk`` uses. It pays off where torch's GEMM does
not run AVX-512 code, as MKL does not on AMD CPUs. On Intel CPUs MKL's own
AVX-512 GEMM is faster at R = 256 and at small P·R, the C++ kernel at R = 64
(``benchmarks/bench_symm_jt.py`` measures both; docs/performance.md has the
sizes): neither wins everywhere, and ``"compiled"`` keeps ``torch.mm`` there.
The C++ kernel's result may differ from ``S @ J.T`` by rounding only, and by
that much more for an S that is symmetric only to within rounding (an EKF
covariance is exactly symmetric after every update; ``init`` accepts a
user's matrix symmetric to within 100 machine epsilons of its largest
entry).
"""

import torch

from posteriors_fast import _library
from posteriors_fast._internal.native import accepts, cpu_vendor
from posteriors_fast.backends import decline, implementation, register


def symm_jt_eager(s: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``s @ j.mT`` with torch."""
    return torch.mm(s, j.mT)


def symm_jt_cpp(s: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """C++ kernel (``csrc/cpu/symm_jt.cpp``); eager torch for arguments it does
    not take (see :func:`posteriors_fast._internal.native.accepts`)."""
    if not accepts(s, j) or s.dim() != 2 or j.dim() != 2:
        return symm_jt_eager(s, j)
    return _library.OPS.symm_jt(s, j)


register("symm_jt", "eager", symm_jt_eager, doc="S·Jᵀ for symmetric S (the Σ·Jᵀ of the Woodbury EKF step)")
if cpu_vendor() == "GenuineIntel":
    decline(
        "symm_jt",
        "cpp",
        "not on Intel CPUs, where MKL's AVX-512 GEMM is faster at R = 256 and small P·R (benchmarks/bench_symm_jt.py)",
    )
else:
    register("symm_jt", "cpp", symm_jt_cpp, devices=("cpu",))
decline("symm_jt", "triton", "not provided: one cuBLAS GEMM already runs at the GPU's speed")
decline("symm_jt", "torch_compile", "not provided: Inductor calls the same extern GEMM")


def symm_jt(s: torch.Tensor, j: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point (see the module docstring); ``backend`` must
    already be resolved."""
    return implementation("symm_jt", backend, s.device.type)(s, j)
