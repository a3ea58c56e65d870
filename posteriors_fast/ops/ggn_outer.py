"""``ggn_outer``: ``Jᵀ H J`` for a flat output Jacobian J (d, P) and the loss
Hessian H (d, d) in output space."""

import torch

from posteriors_fast.backends import implementation, register


def ggn_outer_eager(jac: torch.Tensor, hess: torch.Tensor) -> torch.Tensor:
    """``jacᵀ (hess jac)``: (P, P)."""
    return torch.mm(jac.mT, torch.mm(hess, jac))


register(
    "ggn_outer",
    "eager",
    ggn_outer_eager,
    doc="JᵀHJ of an output Jacobian and the loss Hessian (dense GGN)",
)


def ggn_outer(jac: torch.Tensor, hess: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("ggn_outer", backend, jac.device.type)(jac, hess)
