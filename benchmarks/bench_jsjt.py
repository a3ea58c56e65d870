"""``jsjt``: per-sample output covariances J_n diag(v) J_nᵀ, J of shape (N, C, P).

Baseline ``torch.einsum("ncp,p,ndp->ncd")``; ``eager`` is the op's one
batched GEMM (the only family: torch.compile measured no gain).
"""

import torch

from posteriors_fast.ops import jsjt

PROVIDERS = ("einsum", "eager")
BASELINE = "einsum"
CLASSES = 10


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(case.n, CLASSES, case.p, generator=g).to(device)
    var = torch.rand(case.p, generator=g).to(device)
    if provider == "einsum":
        return lambda: torch.einsum("ncp,p,ndp->ncd", jac, var, jac)
    return lambda: jsjt.jsjt_eager(jac, var)


def flops(case) -> float:
    """Nominal 2·N·C²·P."""
    return 2.0 * case.n * CLASSES * CLASSES * case.p
