"""``lowrank_update``: ((Σ + Q)⁻¹ + β JᵀJ)⁻¹ and its mean step, J (R, P).

Baseline: the precision form of posteriors 0.0.5's EKF (two P×P Cholesky
inverses and the Fisher product, O(P³)). ``eager`` and ``compiled`` run the
op: the Woodbury form when R < P (O(R·P²)), with its syrk, symm_jt and
cov_downdate steps dispatched by the backend.
"""

import torch

from posteriors_fast.ops.lowrank_update import lowrank_update

PROVIDERS = ("precision form", "eager", "compiled")
BASELINE = "precision form"


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(case.p, case.p, generator=g) / case.p**0.5
    cov = (m @ m.T + torch.eye(case.p)).to(device)
    jac = torch.randn(case.n, case.p, generator=g).to(device)
    beta = 1e-2
    if provider == BASELINE:

        def dense():
            prec = torch.cholesky_inverse(torch.linalg.cholesky(cov + 1e-3 * torch.eye(case.p, device=device)))
            new = torch.cholesky_inverse(torch.linalg.cholesky(prec + beta * jac.T @ jac))
            return new, new @ jac.mean(0)

        return dense
    return lambda: lowrank_update(cov, 1e-3, jac, beta, backend=provider).write()


def flops(case) -> float:
    """Nominal: the Woodbury form's 3·R·P² (Σ·Jᵀ, then half of the downdate's 2·R·P²)."""
    return 3.0 * case.n * case.p * case.p
