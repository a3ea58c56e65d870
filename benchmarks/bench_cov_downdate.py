"""``cov_downdate``: Σ ← Σ − WᵀW in place for a (P, P) covariance and W (R, P),
the Woodbury EKF step.

Baseline ``Σ - W.T @ W`` (a full GEMM into a new matrix, not symmetric to the
bit). ``eager`` is the op's pure-torch tiles, ``cpp`` the C++ kernel (the syrk
kernel with α = −1, β = 1), ``triton`` the Triton kernel (CUDA). Each timed
call starts from the same Σ (restored untimed).
"""

import torch

from benchmarks.kernels import require
from posteriors_fast.ops import cov_downdate

PROVIDERS = ("Σ - W.T @ W", "eager", "cpp", "triton")
BASELINE = "Σ - W.T @ W"


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(case.p, case.p, generator=g) / case.p**0.5
    cov0 = (m @ m.T + torch.eye(case.p)).to(device)
    w = (0.1 * torch.randn(case.n, case.p, generator=g)).to(device)
    if provider == BASELINE:
        return lambda: cov0 - w.T @ w
    fn = {
        "eager": cov_downdate.cov_downdate_eager,
        "cpp": cov_downdate.cov_downdate_cpp,
        "triton": cov_downdate.cov_downdate_triton,
    }[provider]
    require(provider, device)
    cov = cov0.clone()
    return (lambda: fn(cov, w)), (lambda: cov.copy_(cov0))


def flops(case) -> float:
    """Nominal 2·R·P² (the full product's count, for every provider)."""
    return 2.0 * case.n * case.p * case.p
