"""What the diagonal-plus-low-rank methods share (``ekf.lowrank_fisher``,
``laplace.lowrank_fisher``, ``laplace.lowrank_ggn``, and
``utils.linearized_forward_lowrank``): the ``rank`` check, the state check,
the capacitance matrix, exact sampling
and the output covariance. The precision is Λ = D + U Uᵀ with D = diag(d)
(d > 0 wherever a covariance is needed) and U of shape (P, r); only (r, r)
matrices are ever factored, in float64.
"""

import operator

import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.sampling import unravel_draws


def check_rank(rank) -> int:
    """``rank`` as a Python int >= 1; TypeError for a bool, float or other
    non-integer, ValueError for 0 or a negative value."""
    if isinstance(rank, bool) or isinstance(rank, float):
        raise TypeError(f"rank must be a positive integer, got {rank!r} ({type(rank).__name__})")
    try:
        value = operator.index(rank)
    except TypeError:
        raise TypeError(f"rank must be a positive integer, got {type(rank).__name__}") from None
    if value < 1:
        raise ValueError(f"rank must be a positive integer, got {value}")
    return value


def check_state(state, kind: str, rank: int | None = None):
    """``(flat params, unravel, d, U)`` after checking that ``state`` has
    ``params``, ``prec_diag`` (a tree like params) and ``prec_factor`` (a
    (P, r) tensor, r = ``rank`` when given). ``d`` and ``U`` are detached and
    in the parameters' dtype."""
    if not all(hasattr(state, f) for f in ("params", "prec_diag", "prec_factor", "_replace")):
        raise TypeError(f"state must be a {kind} (a NamedTuple with params, prec_diag and prec_factor)")
    _checks.float_params(state.params, "state.params")
    _checks.same_structure(state.prec_diag, state.params, "state.prec_diag", "state.params")
    flat, unravel = tree_ravel(state.params)
    size = flat.numel()
    factor = state.prec_factor
    if not isinstance(factor, torch.Tensor) or factor.ndim != 2 or factor.shape[0] != size:
        got = tuple(factor.shape) if isinstance(factor, torch.Tensor) else type(factor).__name__
        raise ValueError(f"state.prec_factor must be ({size}, rank) for the {size} parameters, got {got}")
    if rank is not None and factor.shape[1] != rank:
        raise ValueError(f"state.prec_factor has {factor.shape[1]} columns but rank={rank}")
    diag = tree_ravel(state.prec_diag)[0].detach().to(flat.dtype)
    return flat, unravel, diag, factor.detach().to(flat.dtype)


def diagonal_argument(value, params, name: str, *, positive: bool):
    """A scalar or a tree like ``params`` of per-parameter values (variances
    or precisions), finite and > 0 (``positive``) or >= 0; returned as a
    Python float or a flat tensor in the parameters' dtype."""
    bound = "> 0" if positive else ">= 0"
    if _checks.is_number(value):
        number = _checks.scalar_value(value, name)
        if not (number > 0 if positive else number >= 0) or number == float("inf"):
            raise ValueError(f"{name} must be finite and {bound}, got {number}")
        return number
    _checks.same_structure(value, params, name, "params")
    flat = tree_ravel(params)[0]
    values = tree_ravel(tree_map(lambda x: x.detach(), value))[0].to(flat.dtype)
    ok = torch.isfinite(values).all() & ((values > 0) if positive else (values >= 0)).all()
    if not bool(ok):
        raise ValueError(f"{name} must be finite and {bound} everywhere")
    return values


def _symmetric(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix + matrix.mT).mul_(0.5)


#: Rows of U (and columns of R) handled at once: the (rows, r) temporaries
#: and the block of R stay in the cache and no (P, r) temporary is allocated.
#: ops.lowrank_truncate at P = 10⁶, r = 20, N = 64 (float32, two threads,
#: medians of 7, two rounds): 228-262 ms with chunks of 2¹⁴ and 2¹⁵ rows,
#: 254-287 ms with 2¹³, 257-279 ms with 2¹⁶.
CHUNK_ROWS = 1 << 15


def row_chunks(size: int):
    return [(i, min(size, i + CHUNK_ROWS)) for i in range(0, size, CHUNK_ROWS)]


def capacitance(diag: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor (float64) of K = I + UᵀD⁻¹U (>= I, so always
    positive definite), accumulated over row chunks of U."""
    rank = factor.shape[1]
    inner = factor.new_zeros(rank, rank)
    for a, b in row_chunks(factor.shape[0]):
        inner.addmm_(factor[a:b].mT, factor[a:b] / diag[a:b, None])
    inner = inner.to(torch.float64)
    inner.diagonal().add_(1.0)
    return torch.linalg.cholesky(_symmetric(inner))


def sample(flat: torch.Tensor, unravel, diag: torch.Tensor, factor: torch.Tensor, sample_shape) -> object:
    """Exact draws from N(flat, (D + UUᵀ)⁻¹) without a P×P matrix.

    With W = D^{-1/2} U and WᵀW = E diag(λ) Eᵀ (r×r), the symmetric square
    root (I + WWᵀ)^{-1/2} is I + W M Wᵀ with M = E diag(h(λ)) Eᵀ and
    h(λ) = ((1 + λ)^{-1/2} - 1)/λ = -1/(√(1+λ)(1 + √(1+λ))) (finite at
    λ = 0, so a rank-deficient U needs no special case); then

    $$ θ = μ + D^{-1/2}\\big(z + W M Wᵀ z\\big), \\quad z ∼ N(0, I), $$

    has covariance D^{-1/2}(I + WWᵀ)^{-1}D^{-1/2} = (D + UUᵀ)⁻¹.
    """
    if not bool((diag > 0).all()):
        raise ValueError(
            "state.prec_diag must be positive everywhere to sample (the diagonal part of the precision "
            "carries the covariance of the directions the factor does not span): use a prior precision > 0"
        )
    shape = torch.Size(sample_shape)
    inv_sd = diag.rsqrt()
    w = factor * inv_sd[:, None]
    eigvals, eigvecs = torch.linalg.eigh(_symmetric(torch.mm(w.mT, w).to(torch.float64)))
    root = eigvals.clamp_min(0.0).add_(1.0).sqrt_()
    middle = (eigvecs * (-1.0 / (root * (1.0 + root)))) @ eigvecs.mT
    noise = torch.randn(shape.numel(), flat.numel(), dtype=flat.dtype, device=flat.device)
    draws = noise.addmm_(torch.mm(noise, w) @ middle.to(flat.dtype), w.mT)
    draws.mul_(inv_sd).add_(flat)
    return unravel_draws(draws, unravel, shape)


def output_covariance(jac: torch.Tensor, diag: torch.Tensor, factor: torch.Tensor, jsjt) -> torch.Tensor:
    """Per-sample J Σ Jᵀ, shape (N, C, C), for J (N, C, P) and Σ = (D + UUᵀ)⁻¹:

    $$ J Σ Jᵀ = J D^{-1} Jᵀ - Y Yᵀ, \\quad Y = J D^{-1} U L^{-ᵀ},\\ L Lᵀ = K, $$

    ``jsjt(jac, var)`` computing the diagonal-covariance term."""
    n, c, size = jac.shape
    chol = capacitance(diag, factor)
    proj = torch.mm(jac.reshape(n * c, size) / diag, factor).to(torch.float64)
    y = torch.linalg.solve_triangular(chol, proj.mT, upper=False).mT.reshape(n, c, -1)
    cov = jsjt(jac, diag.reciprocal())
    return cov - torch.bmm(y, y.mT).to(cov.dtype)
