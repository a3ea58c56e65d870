"""``cg``: conjugate gradient on one flat vector.

The user's operator is applied to flat vectors (the pytree wrapping happens once,
in ``utils.cg``); the vector updates are fused ``addcmul_`` passes and the only
host synchronisation per iteration is the convergence test.
"""

from typing import Callable, Dict, Optional, Tuple

import torch

from posteriors_fast.backends import implementation, register


def vdot_real(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Real part of ``xᴴy`` for flat vectors (imaginary cross terms dropped:
    every use here is a quadratic form of a Hermitian PD operator)."""
    if x.is_complex() or y.is_complex():
        return torch.dot(x.real, y.real) + torch.dot(x.imag, y.imag)
    return torch.dot(x, y)


def cg_eager(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    maxiter: int,
    damping: float,
    tol: float,
    atol: float,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Tuple[torch.Tensor, Dict]:
    """Solve ``(A + damping·I) x = b``; see :func:`posteriors_fast.utils.cg`."""

    def apply(v):
        out = matvec(v)
        return out + damping * v if damping != 0 else out

    real = b.real if b.is_complex() else b
    threshold = torch.clamp_min(vdot_real(b, b) * tol**2, atol**2).reshape(1)
    threshold = threshold.to(real.dtype)

    x = x0.clone()
    r = b - apply(x)
    z = r if precond is None else precond(r)
    p = z.clone()
    gamma = vdot_real(r, z)
    k = 0

    def residual(r_, gamma_):
        return gamma_ if precond is None else vdot_real(r_, r_)

    while k < maxiter and bool(residual(r, gamma) > threshold):
        ap = apply(p)
        alpha = gamma / vdot_real(p, ap)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1)
        z = r if precond is None else precond(r)
        gamma_next = vdot_real(r, z)
        p.mul_(gamma_next / gamma).add_(z)
        gamma = gamma_next
        k += 1

    err = residual(r, gamma)
    return x, {"error": err, "converged": err <= threshold, "niter": k}


register(
    "cg",
    "eager",
    cg_eager,
    doc="conjugate gradient iterations on one flat vector",
)


def cg(matvec, b, x0, maxiter, damping, tol, atol, precond, *, backend: str):
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("cg", backend, b.device.type)(
        matvec, b, x0, maxiter, damping, tol, atol, precond
    )
