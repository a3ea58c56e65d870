"""``ggn_diag``: the diagonal of ``Jᵀ H J`` from J (d, P) and ``H J`` (d, P),
column by column, without forming the (P, P) matrix."""

import torch

from posteriors_fast.backends import implementation, register


def ggn_diag_eager(jac: torch.Tensor, hess_jac: torch.Tensor) -> torch.Tensor:
    """``diag_i = Σ_j jac[j, i] · hess_jac[j, i]``: (P,)."""
    return torch.einsum("jp,jp->p", jac, hess_jac)


register(
    "ggn_diag",
    "eager",
    ggn_diag_eager,
    doc="diag(JᵀHJ) from J and HJ, never forming P×P",
)


def ggn_diag(jac: torch.Tensor, hess_jac: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("ggn_diag", backend, jac.device.type)(jac, hess_jac)
