"""``ggn_diag``: diag(JᵀHJ) from J and HJ of shape (d, P), never forming P×P.

Baseline ``torch.einsum("jp,jp->p")`` (which becomes P tiny products);
``eager`` is the op's product-and-column-sum, ``torch_compile`` the same
fused by Inductor (what ``"compiled"`` runs above 8M entries of J).
"""

import torch

from posteriors_fast.ops import ggn_diag

PROVIDERS = ("einsum", "eager", "torch_compile")
BASELINE = "einsum"


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    jac = torch.randn(case.n, case.p, generator=g).to(device)
    hj = torch.randn(case.n, case.p, generator=g).to(device)
    if provider == "einsum":
        return lambda: torch.einsum("jp,jp->p", jac, hj)
    if provider == "eager":
        return lambda: ggn_diag.ggn_diag_eager(jac, hj)
    return lambda: ggn_diag._compiled(jac, hj)


def bytes_moved(case) -> float:
    """Nominal float32 traffic: J and HJ read once, the diagonal written."""
    return 4.0 * (2 * case.n * case.p + case.p)


def flops(case) -> float:
    """Nominal 2·d·P."""
    return 2.0 * case.n * case.p
