"""Cholesky factorisation with dtype-sized jitter retries and a clear error."""

import warnings

import torch

# Relative jitter (times the mean diagonal) of the first retry; each further
# retry multiplies it by 10. Sized to the dtype's precision, as linear_operator does.
_FIRST_JITTER = {torch.float64: 1e-8, torch.float32: 1e-6}
_RETRIES = 3
_warned: set = set()


class CholeskyError(torch.linalg.LinAlgError):
    """A matrix that must be positive definite is not, even with jitter.

    Subclasses ``torch.linalg.LinAlgError`` so code written against posteriors
    0.0.5 (which let torch raise that error) still catches it.
    """


def robust_cholesky(matrix: torch.Tensor, name: str, hint: str = "") -> torch.Tensor:
    """Lower Cholesky factor of the symmetric positive definite ``matrix``.

    Tries ``torch.linalg.cholesky_ex`` as is; on failure retries with a diagonal
    jitter of 1e-8 (float64), 1e-6 (float32) or 1e-3 (lower precisions) times the mean diagonal,
    growing tenfold per retry, warning once per matrix name.

    Args:
        matrix: (P, P) symmetric matrix.
        name: What the matrix is, for messages (e.g. "predicted covariance").
        hint: What the user can change if it is not positive definite.

    Returns:
        Lower-triangular ``L`` with ``L @ L.T ≈ matrix``.

    Raises:
        CholeskyError: still not positive definite after the retries.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return factor
    if not bool(torch.isfinite(matrix).all()):
        raise CholeskyError(f"{name} contains NaN or inf, so it has no Cholesky factor. {hint}")
    scale = matrix.diagonal().abs().mean()
    if float(scale) == 0.0:  # no scale to size a jitter by: nothing to rescue
        raise CholeskyError(f"{name} has a zero diagonal, so it is not positive definite. {hint}")
    jitter = _FIRST_JITTER.get(matrix.dtype, 1e-3) * scale
    for _ in range(_RETRIES):
        attempt = matrix.clone()
        attempt.diagonal().add_(jitter)
        factor, info_j = torch.linalg.cholesky_ex(attempt)
        if int(info_j) == 0:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"{name} was not numerically positive definite; added "
                    f"{float(jitter):.3g} to its diagonal to factor it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return factor
        jitter = jitter * 10
    raise CholeskyError(
        f"{name} ({matrix.shape[0]}x{matrix.shape[0]}, {matrix.dtype}) is not positive "
        f"definite: Cholesky failed at leading minor {int(info)}, and still failed with "
        f"{float(jitter / 10):.3g} added to the diagonal. {hint}"
    )
