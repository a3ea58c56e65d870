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

With a transition covariance Q = diag(q) the precision is first predicted,
exactly and at the same rank (Woodbury twice: Λ⁻¹ + Q is a diagonal minus a
rank-m term),

$$ \\big((D + UUᵀ)^{-1} + Q\\big)^{-1} = D_p + U_p U_pᵀ, \\quad
D_p = D (I + QD)^{-1}, \\quad U_p = (I + QD)^{-1} U C, \\quad
C Cᵀ = \\big(I + Uᵀ Q (I + QD)^{-1} U\\big)^{-1}, $$

and the panel is A = [U_p, s Rᵀ]; U_p is never stored: (I + QD)⁻¹U is
formed a chunk of rows at a time for the Gram, and C is folded into the
small matrices.

With ``vector`` g the op also returns Σ_new g for Σ_new = (D_new + U_new
U_newᵀ)⁻¹ (the EKF mean step), by Woodbury through the r×r capacitance
K = I + U_newᵀ D_new⁻¹ U_new, accumulated in the same pass over U_new that
computes the fold.

How the data is touched (P = 1.01·10⁶, m = r = 20, K = N = 64, float32, one
thread, medians under load; the Gram of the concatenated (P, 84) panel alone
takes about 225 ms, the per-sample Jacobian about 700 ms):

* the panel is never formed: copying R into a (P, m + K) buffer costs more
  (a fresh 336 MB buffer, ≈ 300 ms with its page faults) than the Gram
  saves. Its Gram comes in three blocks, UᵀU (≈ 28 ms), R U (≈ 110 ms),
  R Rᵀ (≈ 130 ms), from the tensors as they are;
* the (m + K)² eigendecomposition runs in float64 (≈ 1 ms);
* the new factor comes from two GEMMs into one output, U V₁ + Rᵀ (s V₂)
  (≈ 165 ms with a preallocated output, plus ≈ 65 ms of page faults on the
  fresh (P, r) output, which a new state needs);
* Σ_k R_k² by one multiply-add per row (≈ 60 ms; ``vector_norm(R, dim=0)``
  takes 460 ms, ``(R * R).sum(0)`` 240 ms with its (K, P) temporary);
* one pass over row chunks of U and U_new (2¹⁵ rows, in cache) computes
  rowsum(U²) − rowsum(U_new²), d_new, and K and U_newᵀD_new⁻¹g for the
  Woodbury step: separate passes cost ≈ 55 ms more. A non-finite U_new
  makes K non-finite (its diagonal sums U_new²/d_new), so K stands in
  for an 80 MB finiteness pass over U_new.
"""

import torch

from posteriors_fast._internal.lowrank import row_chunks
from posteriors_fast.backends import decline, implementation, register


def lowrank_truncate_eager(
    diag: torch.Tensor,
    factor: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    rank: int,
    vector: torch.Tensor | None = None,
    transition: torch.Tensor | float = 0.0,
):
    """``(d_new, U_new, step, witness)`` for the precision diag(d) + U Uᵀ,
    predicted with the transition covariance Q = diag(q) when q != 0, plus
    s²·RᵀR, truncated to rank ``rank`` (see the module docstring).

    Args:
        diag: d, shape (P,), finite and > 0 where ``vector`` or ``transition``
            is given.
        factor: U, shape (P, m).
        rows: R, shape (K, P): the new columns, transposed.
        scale: s, a Python float.
        rank: r >= 1, the width of U_new.
        vector: Optional g, shape (P,).
        transition: q, a float >= 0 or a (P,) tensor of variances >= 0.

    Returns:
        ``d_new (P,)`` and ``U_new (P, r)``, new tensors (columns of U_new
        orthogonal, in decreasing order of norm; zero columns when m + K < r);
        ``step`` = Σ_new g (None without ``vector``); ``witness``, a 0-d
        tensor that is finite only if d_new, U_new and step are (without
        ``vector``: the sum of their entries).
    """
    m, k = factor.shape[1], rows.shape[0]
    dtype = factor.dtype
    size = factor.shape[0]
    noise = not (isinstance(transition, float) and transition == 0.0)
    gram = torch.empty(m + k, m + k, dtype=torch.float64, device=factor.device)
    if not noise:
        base, mix = diag, None
        gram[:m, :m] = torch.mm(factor.mT, factor)
        cross = torch.mm(rows, factor).to(torch.float64)
    else:
        # The predicted factor is U_p = S U C, S = (I + QD)⁻¹, C Cᵀ = (I + UᵀQSU)⁻¹
        # (exact, see the module docstring): S U is formed a chunk at a time
        # and C folded into the small matrices, so U_p is never stored.
        shrink = (diag * transition).add_(1.0).reciprocal_()
        base = diag * shrink
        weight = shrink * transition
        uu, cross, inner = (factor.new_zeros(m, m), factor.new_zeros(k, m), factor.new_zeros(m, m))
        for a, b in row_chunks(size):
            part = factor[a:b] * shrink[a:b, None]
            uu.addmm_(part.mT, part)
            cross.addmm_(rows[:, a:b], part)
            inner.addmm_(factor[a:b].mT, factor[a:b] * weight[a:b, None])
        inner = inner.to(torch.float64)
        inner.diagonal().add_(1.0)
        chol = torch.linalg.cholesky((inner + inner.mT).mul_(0.5))  # >= I: positive definite
        eye = torch.eye(m, dtype=torch.float64, device=factor.device)
        mix = torch.linalg.solve_triangular(chol.mT, eye, upper=True)  # C = L⁻ᵀ
        gram[:m, :m] = mix.mT @ uu.to(torch.float64) @ mix
        cross = cross.to(torch.float64) @ mix
    cross.mul_(scale)
    gram[m:, :m] = cross
    gram[:m, m:] = cross.mT
    gram[m:, m:] = torch.mm(rows, rows.mT).to(torch.float64).mul_(scale * scale)
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(
            "the Gram of the precision factor and the new columns holds NaN or inf (non-finite input, "
            "or an overflow: try float64); the state was not changed"
        )
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
    left = keep[:m] if mix is None else mix @ keep[:m]
    new_factor = torch.mm(factor, left.to(dtype))
    if noise:
        new_factor.mul_(shrink[:, None])
    new_factor.addmm_(rows.mT, keep[m:].mul(scale).to(dtype))
    new_diag = _column_sum_of_squares(rows).mul_(scale * scale).add_(base)
    width = new_factor.shape[1]
    inner = None if vector is None else new_factor.new_zeros(width, width)
    proj = None if vector is None else new_factor.new_zeros(width)
    mix = None if mix is None else mix.to(dtype)
    for a, b in row_chunks(size):
        # d_new = d_p + rowsum(A²) - rowsum(U_new²): the diagonal of the
        # dropped part, PSD, so clamped at d_p against rounding.
        part = new_diag[a:b]
        if mix is None:
            dropped = torch.linalg.vector_norm(factor[a:b], dim=1).square_()
        else:
            dropped = torch.linalg.vector_norm(factor[a:b] @ mix, dim=1).mul_(shrink[a:b]).square_()
        dropped.sub_(torch.linalg.vector_norm(new_factor[a:b], dim=1).square_())
        torch.maximum(part.add_(dropped), base[a:b], out=part)
        if vector is not None:
            scaled = new_factor[a:b] / part[:, None]
            inner.addmm_(new_factor[a:b].mT, scaled)
            proj.addmv_(scaled.mT, vector[a:b])
    if vector is None:
        return new_diag, new_factor, None, torch.stack([new_diag.sum(), new_factor.sum()]).sum()
    inner = inner.to(torch.float64)
    inner.diagonal().add_(1.0)
    chol, info = torch.linalg.cholesky_ex((inner + inner.mT).mul_(0.5))  # K >= I when finite
    solved = torch.cholesky_solve(proj.to(torch.float64)[:, None], chol)[:, 0].to(dtype)
    step = torch.addmv(vector, new_factor, solved, alpha=-1.0).div_(new_diag)  # (g - U z) / d
    witness = torch.stack([new_diag.sum(), inner.sum().to(dtype), step.sum()]).sum()
    if int(info) != 0:
        witness = witness * float("nan")
    return new_diag, new_factor, step, witness


def _column_sum_of_squares(rows: torch.Tensor) -> torch.Tensor:
    """Σ_k rows[k]², (P,), one multiply-add per row (see the module docstring)."""
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


def lowrank_truncate(diag, factor, rows, scale: float, rank: int, vector=None, transition=0.0, *, backend: str):
    """Dispatching entry point; ``backend`` must already be resolved."""
    impl = implementation("lowrank_truncate", backend, factor.device.type)
    return impl(diag, factor, rows, scale, rank, vector, transition)
