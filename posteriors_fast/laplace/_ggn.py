"""The batch GGN factors shared by ``laplace.dense_ggn`` and ``laplace.diag_ggn``.

Unlike ``utils.ggn`` (which sees only a closure ``forward(params)``), these
methods call ``forward(params, batch)`` with the batch as an argument, so the
Jacobian can be built one sample at a time when the forward is verified
sample-separable (O(N·C·P) instead of O(N²·C·P)); otherwise the general
Jacobian is used. The loss Hessian is applied through its per-sample blocks.
"""

from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast._internal.loss_hessian import loss_hessian_times
from posteriors_fast.ops.separable_jacobian import separable_output_jacobian


def batch_ggn_factors(params, batch, forward, outer_log_likelihood, *, backend: str):
    """``(J, H J, aux)``: J (d, P) the Jacobian of z = forward(params, batch)[0]
    (raveled), H the Hessian of z ↦ −outer_log_likelihood(z, batch), both
    checked finite (the error names the function at fault, or the leaf of
    params holding NaN or inf)."""
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
    jac = jac.reshape(-1, size)
    with checks.blame_batch(batch, "outer_log_likelihood"):
        hess_jac = loss_hessian_times(lambda z_: -outer_log_likelihood(z_, batch), z.detach(), jac)
    checks.require_finite(
        [
            (jac, "the gradient of forward is NaN or inf"),
            (hess_jac, "the Hessian of outer_log_likelihood is NaN or inf"),
        ]
    )
    return jac, hess_jac, aux
