"""``ggn_diag``: the diagonal of ``Jᵀ H J`` from J (d, P) and ``H J`` (d, P),
column by column, without forming the (P, P) matrix."""

import torch

from posteriors_fast.backends import implementation, register


def ggn_diag_eager(jac: torch.Tensor, hess_jac: torch.Tensor) -> torch.Tensor:
    """``diag_i = Σ_j jac[j, i] · hess_jac[j, i]``: (P,).

    A product and a column sum: at d = 640, P = 4890 this takes 1 ms where
    ``torch.einsum("jp,jp->p", ...)`` takes 46 ms (it becomes P tiny matmuls).
    """
    return (jac * hess_jac).sum(0)


register(
    "ggn_diag",
    "eager",
    ggn_diag_eager,
    doc="diag(JᵀHJ) from J and HJ, never forming P×P",
)


def ggn_diag(jac: torch.Tensor, hess_jac: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("ggn_diag", backend, jac.device.type)(jac, hess_jac)
