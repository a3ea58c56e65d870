"""``jsjt``: per-sample output covariances ``J_n diag(v) J_nᵀ`` for a batched
Jacobian J (N, C, P) and a parameter variance vector v (P,)."""

import torch

from posteriors_fast.backends import decline, implementation, register


def jsjt_eager(jac: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(jac · var) @ jacᵀ`` batched over the leading dimension: (N, C, C)."""
    return torch.matmul(jac * var, jac.mT)


register(
    "jsjt",
    "eager",
    jsjt_eager,
    doc="J diag(σ²) Jᵀ per sample (linearised predictive covariance)",
)


for _family in ("triton", "cpp", "torch_compile"):
    decline(
        "jsjt",
        _family,
        "not provided: one batched GEMM already (benchmarks/bench_jsjt.py: it equals einsum's time)",
    )


def jsjt(jac: torch.Tensor, var: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("jsjt", backend, jac.device.type)(jac, var)
