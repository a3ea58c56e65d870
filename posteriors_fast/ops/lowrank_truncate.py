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

How the data is touched (P = 9.9·10⁵, m = r = 20, K = N = 64, float32, two
threads, medians on a quiet machine; ``benchmarks/bench_lowrank_truncate.py``
times the op against the plain-torch step with the panel, and
``python -m benchmarks.scale`` the methods; the Gram of a concatenated
(P, 84) panel alone takes about 85 ms, copying R into such a panel 150 ms):

* the panel is never formed. The first pass goes over row chunks of U and
  the same columns of R (2¹⁵ rows: an 8 MB block of R, in cache) and
  accumulates the Gram's blocks UᵀU (≈ 14 ms), R Rᵀ (≈ 43 ms) and (R U)ᵀ
  (≈ 27 ms; R U itself, 42 ms);
* the (m + K)² eigendecomposition runs in float64 (≈ 1 ms);
* the second pass writes the new factor, U V₁ + Rᵀ (s V₂), the fold
  rowsum(U²) − rowsum(U_new²) into d_new, and K and U_newᵀD_new⁻¹g for the
  Woodbury step, and sums Σ_k R_k² while R is read. Eager, it goes over the
  same row chunks with ATen GEMMs and reductions while the chunk's rows are
  in cache (≈ 100 ms, and ≈ 23 ms for Σ_k R_k²; whole-array GEMMs
  and separate passes took 240 ms, most of it the page faults of a
  multi-threaded GEMM writing a fresh 80 MB output: 144 ms for the factor
  GEMM into a fresh output, 46 ms into a touched one). Under ``"compiled"``
  on the CPU the C++ kernel (``posteriors_fast::lowrank_truncate_fold_``)
  reads each block of R once for Rᵀ(s V₂), Σ_k R_k², the fold and the
  Woodbury sums (≈ 50–67 ms with the sums, after one ATen GEMM for U V₁),
  and the outputs come from the extension's block pool, so a loop of updates
  reuses the previous state's memory. With the Woodbury step, in one run of
  the benchmark: 171 ms compiled, 263 ms eager, 521 ms for the plain-torch
  step with the panel. A non-finite U_new makes K non-finite (its diagonal sums
  U_new²/d_new), so K stands in for an 80 MB finiteness pass over U_new.
"""

from typing import Callable

import torch

from posteriors_fast import _library
from posteriors_fast._internal.lowrank import row_chunks
from posteriors_fast._internal.native import accepts
from posteriors_fast.backends import decline, implementation, register
from posteriors_fast.ops.new_matrix import new_matrix_cpp


def _empty(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


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
    return _truncate(diag, factor, rows, scale, rank, vector, transition, _empty, _factor_pass)


def _truncate(diag, factor, rows, scale, rank, vector, transition, new: Callable, second_pass: Callable):
    """The op with ``new(shape, like)`` allocating d_new and U_new and
    ``second_pass`` (:func:`_factor_pass` or :func:`_factor_pass_cpp`)
    writing them."""
    m, k = factor.shape[1], rows.shape[0]
    dtype, size = factor.dtype, factor.shape[0]
    shrink = mix = weight = None
    base = diag
    if not (isinstance(transition, float) and transition == 0.0):
        # The predicted factor is U_p = S U C, S = (I + QD)⁻¹, C Cᵀ = (I + UᵀQSU)⁻¹
        # (exact, see the module docstring): S U is formed a chunk at a time
        # and C folded into the small matrices, so U_p is never stored.
        shrink = (diag * transition).add_(1.0).reciprocal_()
        base = diag * shrink
        weight = shrink * transition
    new_diag = new((size,), factor)
    gram_u, gram_r, cross, inner = _gram_pass(factor, rows, shrink, weight)
    gram = torch.empty(m + k, m + k, dtype=torch.float64, device=factor.device)
    cross = cross.to(torch.float64)
    if shrink is None:
        gram[:m, :m] = gram_u
    else:
        inner = inner.to(torch.float64)
        inner.diagonal().add_(1.0)
        chol = torch.linalg.cholesky((inner + inner.mT).mul_(0.5))  # >= I: positive definite
        eye = torch.eye(m, dtype=torch.float64, device=factor.device)
        mix = torch.linalg.solve_triangular(chol.mT, eye, upper=True)  # C = L⁻ᵀ
        gram[:m, :m] = mix.mT @ gram_u.to(torch.float64) @ mix
        cross = cross @ mix
    cross.mul_(scale)
    gram[m:, :m] = cross
    gram[:m, m:] = cross.mT
    gram[m:, m:] = gram_r.to(torch.float64).mul_(scale * scale)
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
    left = (keep[:m] if mix is None else mix @ keep[:m]).to(dtype)
    right = keep[m:].mul(scale).to(dtype)
    mix = None if mix is None else mix.to(dtype)
    new_factor = new((size, rank), factor)
    inner, proj = second_pass(factor, rows, new_diag, new_factor, base, shrink, mix, left, right, scale, vector)
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


def _gram_pass(factor, rows, shrink, weight):
    """One pass over row chunks of U (of S U with a transition) and the same
    columns of R: UᵀU, R Rᵀ and R U in the factor's dtype, with a transition
    (``weight`` = S Q) also Uᵀ S Q U (else None)."""
    m, k = factor.shape[1], rows.shape[0]
    gram_u, gram_r, cross = factor.new_zeros(m, m), factor.new_zeros(k, k), factor.new_zeros(m, k)
    inner = None if shrink is None else factor.new_zeros(m, m)
    for a, b in row_chunks(factor.shape[0]):
        r_part = rows[:, a:b]
        u_part = factor[a:b] if shrink is None else factor[a:b] * shrink[a:b, None]
        gram_u.addmm_(u_part.mT, u_part)
        gram_r.addmm_(r_part, r_part.mT)
        cross.addmm_(u_part.mT, r_part.mT)  # (R U)ᵀ: 27 ms where R U takes 42 (P = 10⁶, K = 64, m = 20)
        if shrink is not None:
            inner.addmm_(factor[a:b].mT, factor[a:b] * weight[a:b, None])
    return gram_u, gram_r, cross.mT, inner


def _predicted_part(factor, a, b, shrink, mix, left, out):
    """Rows a:b of the predicted factor U_p = S U C (S = C = I without a
    transition): S U·left written into ``out`` (the U part of the new
    factor's rows, ``left`` having C folded in), and rowsum(U_p²) returned."""
    torch.mm(factor[a:b], left, out=out)
    if shrink is None:
        return torch.linalg.vector_norm(factor[a:b], dim=1).square_()
    out.mul_(shrink[a:b, None])
    return torch.linalg.vector_norm(factor[a:b] @ mix, dim=1).mul_(shrink[a:b]).square_()


def _factor_pass(factor, rows, new_diag, new_factor, base, shrink, mix, left, right, scale, vector):
    """One pass over row chunks: U_new = S U·left + Rᵀ·right (S = I without
    a transition) into ``new_factor``, and d_p + s²·Σ_k R_k² + rowsum(U_p²)
    − rowsum(U_new²) into ``new_diag``; with ``vector`` also
    U_newᵀD_new⁻¹U_new and U_newᵀD_new⁻¹g (else Nones)."""
    width = new_factor.shape[1]
    inner = None if vector is None else new_factor.new_zeros(width, width)
    proj = None if vector is None else new_factor.new_zeros(width)
    chunks = row_chunks(factor.shape[0])
    scratch = rows.new_empty(rows.shape[0], chunks[0][1]) if chunks else None
    for a, b in chunks:
        r_part = rows[:, a:b]
        out = new_factor[a:b]
        dropped = _predicted_part(factor, a, b, shrink, mix, left, out)
        out.addmm_(r_part.mT, right)
        # d_new = d_p + rowsum(A²) - rowsum(U_new²): the diagonal of the
        # dropped part, PSD, so clamped at d_p against rounding. Σ_k R_k²
        # through one chunk-sized scratch while the chunk of R is in cache.
        part = torch.sum(torch.mul(r_part, r_part, out=scratch[:, : b - a]), 0, out=new_diag[a:b])
        part.mul_(scale * scale)
        dropped.sub_(torch.linalg.vector_norm(out, dim=1).square_())
        torch.maximum(part.add_(dropped).add_(base[a:b]), base[a:b], out=part)
        if vector is not None:
            scaled = out / part[:, None]
            inner.addmm_(out.mT, scaled)
            proj.addmv_(scaled.mT, vector[a:b])
    return inner, proj


register(
    "lowrank_truncate",
    "eager",
    lowrank_truncate_eager,
    doc="append columns to a diagonal-plus-low-rank precision, truncate by eigh of the panel Gram",
)


def _factor_pass_cpp(factor, rows, new_diag, new_factor, base, shrink, mix, left, right, scale, vector):
    """:func:`_factor_pass` with the rows of R read once, by the C++ kernel
    (``csrc/cpu/lowrank_truncate.cpp``): the U part of the new factor and
    rowsum(U_p²) come from ATen first."""
    # A chunk of rows at a time: a multi-threaded GEMM writing a fresh output
    # in one call pays the page faults serially, and U_p is never stored.
    prior = torch.empty_like(new_diag)
    for a, b in row_chunks(factor.shape[0]):
        prior[a:b] = _predicted_part(factor, a, b, shrink, mix, left, new_factor[a:b])
    inner, proj = _library.OPS.lowrank_truncate_fold_(
        new_factor,
        new_diag,
        rows,
        right.contiguous(),
        base.contiguous(),
        prior,
        scale * scale,
        None if vector is None else vector.contiguous(),
    )
    return (None, None) if vector is None else (inner, proj)


def lowrank_truncate_cpp(diag, factor, rows, scale, rank, vector=None, transition=0.0):
    """The first pass in ATen and the second in the C++ kernel, d_new and
    U_new from the extension's block pool (:mod:`posteriors_fast.ops.new_matrix`):
    in a loop of updates the previous state's factor is handed out again
    instead of fresh pages that fault on first touch. Eager torch for
    arguments the kernel does not take (R without unit stride along P, mixed
    dtypes or devices)."""
    tensors = [diag, factor, rows, vector] + ([transition] if isinstance(transition, torch.Tensor) else [])
    if not accepts(*tensors, autograd=False) or rows.stride(1) != 1:
        return lowrank_truncate_eager(diag, factor, rows, scale, rank, vector, transition)
    return _truncate(diag, factor, rows, scale, rank, vector, transition, new_matrix_cpp, _factor_pass_cpp)


register("lowrank_truncate", "cpp", lowrank_truncate_cpp, devices=("cpu",))
for _family in ("triton", "torch_compile"):
    decline(
        "lowrank_truncate",
        _family,
        "ATen GEMMs over row chunks do the work; the small eigendecomposition and the norm reductions are memory-bound",
    )


def lowrank_truncate(diag, factor, rows, scale: float, rank: int, vector=None, transition=0.0, *, backend: str):
    """Dispatching entry point; ``backend`` must already be resolved."""
    impl = implementation("lowrank_truncate", backend, factor.device.type)
    return impl(diag, factor, rows, scale, rank, vector, transition)
