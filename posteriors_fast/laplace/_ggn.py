"""The batch GGN factors shared by ``laplace.dense_ggn``, ``laplace.diag_ggn``
and ``laplace.lowrank_ggn``.

Unlike ``utils.ggn`` (which sees only a closure ``forward(params)``), these
methods call ``forward(params, batch)`` with the batch as an argument, so the
Jacobian can be built one sample at a time when the forward is verified
sample-separable (O(N·C·P) instead of O(N²·C·P)); otherwise the general
Jacobian is used. The loss Hessian is applied through its per-sample blocks.
"""

import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast._internal.loss_hessian import _hessian_rows, hessian_blocks, loss_hessian_times
from posteriors_fast.ops.separable_jacobian import separable_output_jacobian


def _output_jacobian(params, batch, forward, *, backend: str):
    """``(J (d, P), z, aux)`` of z = forward(params, batch)[0] (z and params
    checked finite; J is checked by the callers)."""
    size = tree_ravel(params)[0].numel()
    with checks.blame_batch(batch, "forward"):
        z, aux = forward(params, batch)
    checks.require_finite(
        [
            (params, "state.params hold a non-finite value (NaN or inf)", "leaf"),
            (z, "forward returned NaN or inf"),
        ]
    )
    jac = separable_output_jacobian(forward, params, batch, z, backend=backend)
    if jac is None:
        jac, z, aux = output_jacobian(forward, (params, batch), 0, has_aux=True)
    return jac.reshape(-1, size), z, aux


def batch_ggn_factors(params, batch, forward, outer_log_likelihood, *, backend: str):
    """``(J, H J, aux)``: J (d, P) the Jacobian of z = forward(params, batch)[0]
    (raveled), H the Hessian of z ↦ −outer_log_likelihood(z, batch), both
    checked finite (the error names the function at fault, or the leaf of
    params holding NaN or inf)."""
    jac, z, aux = _output_jacobian(params, batch, forward, backend=backend)
    with checks.blame_batch(batch, "outer_log_likelihood"):
        hess_jac = loss_hessian_times(lambda z_: -outer_log_likelihood(z_, batch), z.detach(), jac)
    checks.require_finite(
        [
            (jac, "the gradient of forward is NaN or inf"),
            (hess_jac, "the Hessian of outer_log_likelihood is NaN or inf"),
        ]
    )
    return jac, hess_jac, aux


def batch_ggn_root(params, batch, forward, outer_log_likelihood, *, backend: str):
    """``(R, aux)`` with RᵀR = Jᵀ H J, the batch GGN (R of shape (d, P)).

    With H = E diag(λ) Eᵀ, R = diag(√λ) Eᵀ J; H is decomposed per sample
    (N blocks of (c, c)) when it is block diagonal over the samples (any loss
    that sums per-sample terms), else as one (d, d) matrix. Eigenvalues below
    zero by more than rounding (a loss not convex in z) raise a ValueError:
    RᵀR cannot represent them.
    """
    jac, z, aux = _output_jacobian(params, batch, forward, backend=backend)
    checks.require_finite([(jac, "the gradient of forward is NaN or inf")])
    z = z.detach()

    def loss(z_):
        return -outer_log_likelihood(z_, batch)

    with checks.blame_batch(batch, "outer_log_likelihood"):
        blocks = hessian_blocks(loss, z)
        if blocks is None:
            blocks = _hessian_rows(loss, z, 0, z.numel())[None]
    checks.require_finite([(blocks, "the Hessian of outer_log_likelihood is NaN or inf")])
    blocks = (blocks + blocks.mT) / 2
    eigvals, eigvecs = torch.linalg.eigh(blocks.to(torch.float64))
    scale = eigvals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    tol = 100 * torch.finfo(blocks.dtype).eps * blocks.shape[-1] * scale
    if bool((eigvals < -tol).any()):
        raise ValueError(
            "the Hessian of -outer_log_likelihood in z has a negative eigenvalue "
            f"({float(eigvals.min()):.3g}): a low-rank GGN needs outer_log_likelihood concave in z"
        )
    roots = (eigvecs * eigvals.clamp_min(0.0).sqrt()[..., None, :]).mT.to(jac.dtype)  # (B, c, c)
    count, width = roots.shape[0], roots.shape[-1]
    rows = torch.bmm(roots, jac.reshape(count, width, -1)).reshape(jac.shape)
    checks.require_finite([(rows, "the GGN of this batch overflowed (NaN or inf)")])
    return rows, aux
