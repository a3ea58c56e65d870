"""``fisher_outer``: the scaled symmetric product ``scale · JᵀJ`` of a flat
(N, P) Jacobian, the core of every empirical Fisher."""

import torch

from posteriors_fast.backends import implementation, register


def fisher_outer_eager(jac: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · jacᵀ jac`` for ``jac`` of shape (N, P); returns (P, P)."""
    out = torch.mm(jac.mT, jac)
    if scale != 1:
        out.mul_(scale)
    return out


register(
    "fisher_outer",
    "eager",
    fisher_outer_eager,
    doc="scale·JᵀJ of a flat (N, P) per-sample Jacobian (empirical Fisher)",
)


def fisher_outer(jac: torch.Tensor, scale: float = 1.0, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("fisher_outer", backend, jac.device.type)(jac, scale)
