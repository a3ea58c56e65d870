"""``ggn_diag``: the diagonal of ``Jᵀ H J`` without forming the (P, P) matrix:
``diag_i = Σ_j J[j, i] · (H J)[j, i]``."""

import torch

from posteriors_fast.backends import implementation, register


def ggn_diag_eager(jac: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """Column-wise ``⟨J[:, i], (H J)[:, i]⟩``: (P,)."""
    return (jac * torch.mm(hess, jac)).sum(0)


register(
    "ggn_diag",
    "eager",
    ggn_diag_eager,
    doc="diag(JᵀHJ) column by column, never forming P×P",
)


def ggn_diag(jac: torch.Tensor, hess: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("ggn_diag", backend, jac.device.type)(jac, hess)
