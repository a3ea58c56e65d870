"""``lowrank_update``: the covariance after adding a rank-N term to the precision,

$$ Σ_{new} = (Σ^{-1} + β JᵀJ)^{-1}, \\quad J ∈ ℝ^{N×P},\\ β > 0. $$

This is the EKF / Laplace covariance update. When N < P it runs in Woodbury
(Kalman) form, O(N·P²) and no P×P inverse:

$$ S = β^{-1} I_N + J Σ Jᵀ,\\quad W = L_S^{-1} J Σ,\\quad Σ_{new} = Σ - WᵀW, $$

otherwise in precision form, two P×P Cholesky factorisations, O(P³).
"""

import torch

from posteriors_fast.backends import implementation, register
from posteriors_fast.ops.cholesky import robust_cholesky

_HINT = (
    "Use a larger init_cov or transition_cov, a smaller lr, or float64 parameters."
)


def symmetrise(matrix: torch.Tensor) -> torch.Tensor:
    """``(matrix + matrixᵀ) / 2`` as a new tensor."""
    return torch.add(matrix, matrix.mT).mul_(0.5)


def _woodbury(cov: torch.Tensor, jac: torch.Tensor, beta: float) -> torch.Tensor:
    cov_jt = torch.mm(cov, jac.mT)  # (P, N) = Σ Jᵀ
    gram = torch.mm(jac, cov_jt)  # (N, N) = J Σ Jᵀ
    gram.diagonal().add_(1.0 / beta)
    chol = robust_cholesky(gram, "the innovation matrix S = I/(lr/N) + J Σ Jᵀ", _HINT)
    w = torch.linalg.solve_triangular(chol, cov_jt.mT, upper=False)  # (N, P)
    return torch.addmm(cov, w.mT, w, alpha=-1.0)


def _precision(cov: torch.Tensor, jac: torch.Tensor, beta: float) -> torch.Tensor:
    prec = torch.cholesky_inverse(
        robust_cholesky(cov, "the predicted covariance Σ + Q", _HINT)
    )
    prec.addmm_(jac.mT, jac, alpha=beta)
    return torch.cholesky_inverse(
        robust_cholesky(prec, "the updated precision (Σ + Q)⁻¹ + lr·F", _HINT)
    )


def lowrank_update_eager(cov: torch.Tensor, jac: torch.Tensor, beta: float) -> torch.Tensor:
    """``(cov⁻¹ + beta · jacᵀ jac)⁻¹``, symmetrised; a new tensor (``cov`` is not
    modified). Woodbury form when N < P, precision form otherwise."""
    n, p = jac.shape
    out = _woodbury(cov, jac, beta) if n < p else _precision(cov, jac, beta)
    return symmetrise(out)


register(
    "lowrank_update",
    "eager",
    lowrank_update_eager,
    doc="(Σ⁻¹ + β JᵀJ)⁻¹: Woodbury when N < P, precision form otherwise",
)


def lowrank_update(
    cov: torch.Tensor, jac: torch.Tensor, beta: float, *, backend: str
) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("lowrank_update", backend, cov.device.type)(cov, jac, beta)
