"""``lowrank_truncate``: append columns to the low-rank factor of a
diagonal-plus-low-rank precision, keep the best rank-r part and fold what is
dropped into the diagonal.

With the precision diag(d) + U Uᵀ (U of shape (P, m)) and new columns s·Rᵀ
(R of shape (K, P)), the panel A = [U, s Rᵀ] (P, m + K) gives

$$ A Aᵀ = U Uᵀ + s^2 RᵀR, \\qquad AᵀA = V Λ Vᵀ, \\qquad
U_{new} = A V_{:, 1..r}, \\qquad d_{new} = d + \\mathrm{rowsum}(A^2) - \\mathrm{rowsum}(U_{new}^2), $$

with Λ sorted in decreasing order. The columns of A V are orthogonal with
squared norms Λ, so U_new U_newᵀ is the best rank-r approximation of A Aᵀ
(Eckart-Young, in the Frobenius and spectral norms) and the diagonal of the
precision, d + rowsum(A²), is kept exactly: what the truncation drops,
A V_drop V_dropᵀ Aᵀ, is positive semi-definite and only its diagonal is kept
(the diagonal variant of LoFi, Chang et al. 2023,
https://arxiv.org/abs/2305.19535).

The panel is never formed: its Gram comes in three blocks (UᵀU, R U, R Rᵀ;
2·P·(m² + m·K + K²) FLOPs, fewer than the 2·P·(m + K)² of the concatenated
panel's Gram and without the copy of R into it), the new factor from two
GEMMs into one output (U V₁ + Rᵀ (s V₂)), and the fold from three norm
reductions that write no (K, P) temporary. The (m + K)² eigendecomposition
runs in float64. Per call the P-sized data is read three times (Gram,
projection, norms) and U_new written once.

Measured at P = 1.05·10⁶ (an MLP 1024-1000-10... see
``benchmarks``-free numbers in the module ``ekf.lowrank_fisher``).
"""

import torch

from posteriors_fast.backends import decline, implementation, register


def lowrank_truncate_eager(
    diag: torch.Tensor,
    factor: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    rank: int,
):
    """``(d_new, U_new)`` for the precision diag(d) + U Uᵀ + s²·RᵀR truncated
    to rank ``rank`` (see the module docstring).

    Args:
        diag: d, shape (P,).
        factor: U, shape (P, m).
        rows: R, shape (K, P): the new columns, transposed.
        scale: s, a Python float.
        rank: r >= 1, the width of U_new.

    Returns:
        ``(d_new (P,), U_new (P, r))``, new tensors; columns of U_new in
        decreasing order of norm (zero columns when m + K < r).
    """
    m, k = factor.shape[1], rows.shape[0]
    gram = torch.empty(m + k, m + k, dtype=torch.float64, device=factor.device)
    gram[:m, :m] = torch.mm(factor.mT, factor)
    cross = torch.mm(rows, factor).to(torch.float64).mul_(scale)
    gram[m:, :m] = cross
    gram[:m, m:] = cross.mT
    gram[m:, m:] = torch.mm(rows, rows.mT).to(torch.float64).mul_(scale * scale)
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    keep = vectors[:, -rank:].flip(-1)
    # Eigenvectors are defined up to sign, and which sign LAPACK returns
    # flips with rounding-level changes of the Gram (another batch split,
    # another thread count): fix it so the largest entry of each is positive,
    # and the factor is a function of the precision's data, not of rounding.
    pivot = keep.gather(0, keep.abs().argmax(0, keepdim=True))
    keep = keep * torch.where(pivot < 0, -1.0, 1.0)
    if keep.shape[1] < rank:
        keep = torch.cat([keep, keep.new_zeros(m + k, rank - keep.shape[1])], 1)
    dtype = factor.dtype
    new_factor = torch.mm(factor, keep[:m].to(dtype))
    new_factor.addmm_(rows.mT, keep[m:].mul(scale).to(dtype))
    # rowsum(A²) - rowsum(U_new²): the diagonal of the dropped part, PSD, so
    # clamped at 0 against rounding.
    dropped = torch.linalg.vector_norm(factor, dim=1).square_()
    dropped.sub_(torch.linalg.vector_norm(new_factor, dim=1).square_())
    dropped.add_(_column_sum_of_squares(rows), alpha=scale * scale).clamp_min_(0.0)
    return diag + dropped, new_factor


def _column_sum_of_squares(rows: torch.Tensor) -> torch.Tensor:
    """Σ_k rows[k]², (P,), one multiply-add per row: at K = 64, P = 10⁶
    (float32, one thread) 45 ms, where ``vector_norm(rows, dim=0)`` takes
    460 ms and ``(rows * rows).sum(0)`` 240 ms (it writes a (K, P) temporary)."""
    out = rows[0] * rows[0]
    for row in rows[1:]:
        out.addcmul_(row, row)
    return out


register(
    "lowrank_truncate",
    "eager",
    lowrank_truncate_eager,
    doc="append columns to a diagonal-plus-low-rank precision, truncate by eigh of the panel Gram",
)
for _family in ("triton", "cpp", "torch_compile"):
    decline(
        "lowrank_truncate",
        _family,
        "three ATen GEMMs over P do the work; the small eigendecomposition and the norm reductions are memory-bound",
    )


def lowrank_truncate(diag, factor, rows, scale: float, rank: int, *, backend: str):
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("lowrank_truncate", backend, factor.device.type)(diag, factor, rows, scale, rank)
