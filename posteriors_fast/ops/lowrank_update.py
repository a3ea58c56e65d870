"""``lowrank_update``: the covariance after a rank-R term is added to the
precision of a predicted covariance,

$$ Σ_{new} = \\big((Σ + Q)^{-1} + β JᵀJ\\big)^{-1}, \\quad J ∈ ℝ^{R×P},\\ β > 0, $$

together with ``Σ_new ḡ`` for ḡ the row mean of J (the EKF mean step).

When R < P it runs in Woodbury (Kalman) form, O(R·P²), no P×P inverse and no
P×P temporary:

$$ S = β^{-1} I_R + J Σ_p Jᵀ = L Lᵀ,\\quad W = L^{-1} J Σ_p,\\quad
Σ_{new} = Σ_p - WᵀW,\\quad Σ_{new}\\,ḡ = Σ_p ḡ - Wᵀ(W ḡ), $$

with Σ_p ḡ the row mean of Σ_p Jᵀ. Otherwise it uses the precision form (two
P×P Cholesky factorisations, O(P³)).

The work is split in two phases so callers can update in place atomically:
:func:`lowrank_update` does everything that can fail (Cholesky, finiteness)
and returns an :class:`Update`; :meth:`Update.write` then writes Σ_new into a
buffer, which may be Σ itself, and cannot fail.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from posteriors_fast._internal.checks import first_non_finite
from posteriors_fast._internal.cholesky import robust_cholesky
from posteriors_fast.backends import decline, implementation, register
from posteriors_fast.ops.cov_downdate import cov_downdate_
from posteriors_fast.ops.new_matrix import new_matrix
from posteriors_fast.ops.symm_jt import symm_jt
from posteriors_fast.ops.syrk import syrk_

_HINT = "Use a larger init_cov or transition_cov, a smaller lr, or float64 parameters."


def _add_transition_(matrix: torch.Tensor, transition) -> torch.Tensor:
    if isinstance(transition, torch.Tensor):
        return matrix.add_(transition)
    if transition != 0.0:
        matrix.diagonal().add_(transition)
    return matrix


@dataclass
class Update:
    """Result of :func:`lowrank_update`, not yet written.

    Attributes:
        mean_step: Σ_new ḡ, shape (P,).
    """

    mean_step: torch.Tensor
    _cov: torch.Tensor
    _transition: object
    _w: Optional[torch.Tensor]  # Woodbury factor W (R, P); None in precision form
    _new_cov: Optional[torch.Tensor]  # precision form: Σ_new already computed
    _backend: str

    def write(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Write Σ_new into ``out`` (which may be the input Σ itself) or, with
        ``out=None``, into a new tensor. Returns the tensor written."""
        if self._new_cov is not None:
            return self._new_cov if out is None else out.copy_(self._new_cov)
        cov, q = self._cov, self._transition
        if isinstance(q, torch.Tensor):
            # Σ + Q first (its upper triangle is what the downdate reads).
            if out is None:
                out = new_matrix(cov.shape, cov, backend=self._backend).copy_(cov)
            elif out is not cov:
                out.copy_(cov)
            return cov_downdate_(out.add_(q), self._w, backend=self._backend)
        if out is cov:
            cov_downdate_(cov, self._w, backend=self._backend)
        else:
            if out is None:
                out = new_matrix(cov.shape, cov, backend=self._backend)  # filled by the fused copy-and-downdate
            syrk_(out, self._w, None, cov, -1.0, 1.0, backend=self._backend)
        if q != 0.0:
            out.diagonal().add_(q)  # a scalar Q only touches the diagonal
        return out


def _require_finite(*labelled) -> None:
    """Raise naming the first of the ``(tensor, what)`` pairs that is not finite."""
    bad = first_non_finite(labelled)
    if bad is not None:
        raise ValueError(f"{bad} is not finite (try a smaller lr or float64)")


def lowrank_update_eager(cov, transition, jac, beta, backend) -> Update:
    """See the module docstring. ``transition`` is a float c (c·I) or a (P, P)
    tensor; ``cov`` is read, never written."""
    rows, size = jac.shape
    if rows < size:
        cov_jt = symm_jt(cov, jac, backend=backend)  # (P, R); Σ is symmetric
        if isinstance(transition, torch.Tensor):
            cov_jt.addmm_(transition, jac.mT)
        elif transition != 0.0:
            cov_jt.add_(jac.mT, alpha=transition)
        innovation = torch.mm(jac, cov_jt)
        innovation.diagonal().add_(1.0 / beta)
        chol = robust_cholesky(innovation, "the innovation matrix S = I/(lr/N) + J (Σ + Q) Jᵀ", _HINT)
        # W = L⁻¹ (JΣ_p), solved from the right as Wᵀ Lᵀ = Σ_p Jᵀ on the
        # contiguous (P, R) matrix: about twice as fast as the left solve on
        # its transpose, which reads it with a stride.
        w = torch.linalg.solve_triangular(chol.mT, cov_jt, upper=True, left=False).mT  # (R, P)
        step = cov_jt.mean(1) - torch.mv(w.mT, torch.mv(w, jac.mean(0)))
        _require_finite((w, "the Kalman gain"), (step, "the mean update"))
        return Update(step, cov, transition, w, None, backend)

    pred = _add_transition_(cov.clone(), transition)
    prec = torch.cholesky_inverse(robust_cholesky(pred, "the predicted covariance Σ + Q", _HINT))
    syrk_(prec, jac, None, None, beta, 1.0, backend=backend)
    new_cov = torch.cholesky_inverse(robust_cholesky(prec, "the updated precision (Σ + Q)⁻¹ + lr·F", _HINT))
    new_cov = torch.add(new_cov, new_cov.mT).mul_(0.5)
    step = torch.mv(new_cov, jac.mean(0))
    _require_finite((new_cov, "the updated covariance"), (step, "the mean update"))
    return Update(step, cov, transition, None, new_cov, backend)


register(
    "lowrank_update",
    "eager",
    lowrank_update_eager,
    doc="((Σ+Q)⁻¹ + β JᵀJ)⁻¹ and its mean step: Woodbury when R < P, else precision form",
)


for _family in ("triton", "cpp", "torch_compile"):
    decline(
        "lowrank_update",
        _family,
        "composite: its syrk and cov_downdate steps dispatch on their own; the "
        "Cholesky and triangular solve are LAPACK/cuSOLVER calls",
    )


def lowrank_update(cov, transition, jac, beta, *, backend: str) -> Update:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("lowrank_update", backend, cov.device.type)(cov, transition, jac, beta, backend)
