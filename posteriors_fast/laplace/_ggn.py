"""The batch GGN factors shared by ``laplace.dense_ggn``, ``laplace.diag_ggn``
and ``laplace.lowrank_ggn``.

Unlike ``utils.ggn`` (which sees only a closure ``forward(params)``), these
methods call ``forward(params, batch)`` with the batch as an argument, so the
Jacobian can be built one sample at a time when the forward is verified
sample-separable (O(N·C·P) instead of O(N²·C·P)); otherwise the general
Jacobian is used. The loss Hessian is applied through its per-sample blocks.
"""

import itertools

import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast._internal import checks
from posteriors_fast._internal.jacobian import output_jacobian, output_pullback
from posteriors_fast._internal.jacobian_budget import ENV, budget_bytes, sample_slices, take
from posteriors_fast._internal.jacobian_chunks import ggn_diag_rows
from posteriors_fast._internal.loss_hessian import hessian_blocks, hessian_rows, loss_hessian_times
from posteriors_fast.ops.ggn_diag import ggn_diag
from posteriors_fast.ops.separable_jacobian import _separable_output_jacobian, separable_output_jacobian


def _forward_checked(params, batch, forward):
    with checks.blame_batch(batch, "forward"):
        z, aux = forward(params, batch)
    checks.require_finite(
        [
            (params, "state.params hold a non-finite value (NaN or inf)", "leaf"),
            (z, "forward returned NaN or inf"),
        ]
    )
    return z, aux


def batch_ggn_diag(params, batch, forward, outer_log_likelihood, *, backend: str):
    """``(diag(Jᵀ H J), aux)`` for the batch (see :func:`batch_ggn_factors`),
    with J built a block of samples at a time when the whole (d, P) Jacobian
    exceeds the Jacobian memory budget
    (:mod:`posteriors_fast._internal.jacobian_chunks`)."""
    flat = tree_ravel(params)[0]
    size = flat.numel()
    z, aux = _forward_checked(params, batch, forward)
    if z.numel() * size * flat.element_size() <= budget_bytes() or z.numel() < 2:
        jac, hess_jac, aux = batch_ggn_factors(
            params, batch, forward, outer_log_likelihood, backend=backend, z_aux=(z, aux)
        )
        return ggn_diag(jac, hess_jac, backend=backend), aux

    def loss(z_):
        return -outer_log_likelihood(z_, batch)

    with checks.blame_batch(batch, "outer_log_likelihood"):
        blocks = hessian_blocks(loss, z.detach())
    if blocks is not None and z.ndim > 0:
        term = _separable_ggn_diag(params, batch, forward, z, blocks, size, backend)
        if term is not None:
            return term, aux
    # A forward that couples samples: rows of J through the batch forward.
    _, pullback, _, _ = output_pullback(lambda p: forward(p, batch)[0], (params,), 0, False)
    with checks.blame_batch(batch, "outer_log_likelihood"):
        return ggn_diag_rows(pullback, loss, z.detach(), size, False, check=True), aux


def _separable_ggn_diag(params, batch, forward, z, blocks, size, backend):
    """Σ over blocks of samples of diag(J_bᵀ H_b J_b), each J_b from one
    reverse pass per sample of the block; None when the forward is not shown
    to be sample-separable."""
    n, c = z.shape[0], blocks.shape[1]
    per = max(1, budget_bytes() // max(1, c * size * z.element_size()))
    total = torch.zeros(size, dtype=z.dtype, device=z.device)
    for start, stop in sample_slices(n, per):
        part = take(batch, start, stop, n)
        jac = separable_output_jacobian(forward, params, part, z[start:stop], backend=backend)
        if jac is None:
            return None
        jac = jac.reshape(-1, size)
        hess_jac = torch.bmm(blocks[start:stop], jac.reshape(stop - start, c, size)).reshape(-1, size)
        checks.require_finite(
            [
                (jac, "the gradient of forward is NaN or inf"),
                (hess_jac, "the Hessian of outer_log_likelihood is NaN or inf"),
            ]
        )
        total += ggn_diag(jac, hess_jac, backend=backend)
        del jac, hess_jac
    return total


def _output_jacobian(params, batch, forward, *, backend: str, z_aux=None):
    """``(J (d, P), z, aux)`` of z = forward(params, batch)[0] (z and params
    checked finite; J is checked by the callers). ``z_aux``: the checked
    forward call's result, when the caller has made it."""
    size = tree_ravel(params)[0].numel()
    z, aux = _forward_checked(params, batch, forward) if z_aux is None else z_aux
    jac = separable_output_jacobian(forward, params, batch, z, backend=backend)
    if jac is None:
        jac, z, aux = output_jacobian(forward, (params, batch), 0, has_aux=True)
    return jac.reshape(-1, size), z, aux


def batch_ggn_factors(params, batch, forward, outer_log_likelihood, *, backend: str, z_aux=None):
    """``(J, H J, aux)``: J (d, P) the Jacobian of z = forward(params, batch)[0]
    (raveled), H the Hessian of z ↦ −outer_log_likelihood(z, batch), both
    checked finite (the error names the function at fault, or the leaf of
    params holding NaN or inf). ``z_aux`` as in :func:`_output_jacobian`."""
    jac, z, aux = _output_jacobian(params, batch, forward, backend=backend, z_aux=z_aux)
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
    """``(R, aux)`` with RᵀR = Jᵀ H J, the batch GGN (R of shape (d, P)): the
    blocks of :func:`batch_ggn_root_blocks` written into one tensor as they
    come (R and one block exist at a time)."""
    blocks, count, aux = batch_ggn_root_blocks(params, batch, forward, outer_log_likelihood, backend=backend)
    rows, start = None, 0
    for block in blocks:
        if rows is None:
            if block.shape[0] == count:
                return block, aux
            rows = block.new_empty((count, block.shape[1]))
        rows[start : start + block.shape[0]] = block
        start += block.shape[0]
        del block  # before the next block is built
    return rows, aux


def batch_ggn_root_blocks(params, batch, forward, outer_log_likelihood, *, backend: str):
    """``(blocks, rows, aux)``: the rows of R, RᵀR = Jᵀ H J the batch GGN, as
    an iterable of (rows, P) blocks whose Grams sum to it, and how many rows
    they hold in all.

    With H = E diag(λ) Eᵀ, R = diag(√λ) Eᵀ J; H is decomposed per sample
    (N blocks of (c, c)) when it is block diagonal over the samples (any loss
    that sums per-sample terms), else as one (d, d) matrix. Eigenvalues below
    zero by more than rounding (a loss not convex in z) raise a ValueError:
    RᵀR cannot represent them.

    When the (d, P) Jacobian exceeds the Jacobian memory budget, H is block
    diagonal and the forward is shown sample-separable on the first block of
    samples, the blocks are blocks of samples, each computed when the
    iteration reaches it (one reverse pass per sample), so one block of J and
    one of R exist at a time; otherwise there is one block, the whole R.
    """
    flat = tree_ravel(params)[0]
    size = flat.numel()
    z, aux = _forward_checked(params, batch, forward)
    if z.ndim > 0 and z.shape[0] > 1 and z.numel() * size * flat.element_size() > budget_bytes():
        roots = _hessian_roots(outer_log_likelihood, batch, z.detach(), flat.dtype)
        if roots.shape[0] == z.shape[0]:
            blocks = _separable_root_blocks(params, batch, forward, z, roots, size, backend)
            first = next(blocks)
            if first is not None:
                return itertools.chain([first], blocks), z.shape[0] * roots.shape[-1], aux
    jac, z, aux = _output_jacobian(params, batch, forward, backend=backend, z_aux=(z, aux))
    roots = _hessian_roots(outer_log_likelihood, batch, z.detach(), jac.dtype)
    rows = _checked_rows(roots, jac.reshape(roots.shape[0], roots.shape[-1], -1))
    return [rows], rows.shape[0], aux


def _checked_rows(roots, jac):
    """R = roots·J sample by sample ((n, c, c) by (n, c, P): (n·c, P)),
    checked finite with one pass over R: a NaN or inf in J reaches R, so J
    is looked at only when R is not finite, to say which of the two is."""
    rows = torch.bmm(roots, jac).reshape(-1, jac.shape[-1])
    if not checks.all_finite([rows]):
        checks.require_finite(
            [(jac, "the gradient of forward is NaN or inf"), (rows, "the GGN of this batch overflowed (NaN or inf)")]
        )
    return rows


def _hessian_roots(outer_log_likelihood, batch, z, dtype):
    """(B, c, c) roots Eᵀ-scaled by √λ of the Hessian of −outer_log_likelihood
    at z: its N per-sample blocks, or one (d, d) block (B = 1)."""

    def loss(z_):
        return -outer_log_likelihood(z_, batch)

    with checks.blame_batch(batch, "outer_log_likelihood"):
        blocks = hessian_blocks(loss, z)
        if blocks is None:
            blocks = hessian_rows(loss, z, 0, z.numel())[None]
    checks.require_finite([(blocks, "the Hessian of outer_log_likelihood is NaN or inf")])
    blocks = (blocks + blocks.mT) / 2
    eigvals, eigvecs = torch.linalg.eigh(blocks.to(torch.float64))
    # Rounding in the forward-over-reverse Hessian is relative to its O(1)
    # intermediates (softmax probabilities), not to the block's own size: a
    # confident sample's cross-entropy block (largest eigenvalue ~1e-10) came
    # out with an eigenvalue of -1.9e-8 in float32 (examples/lowrank_digits.py).
    scale = eigvals.abs().amax().clamp_min(1.0)
    tol = 100 * torch.finfo(blocks.dtype).eps * blocks.shape[-1] * scale
    if bool((eigvals < -tol).any()):
        raise ValueError(
            "the Hessian of -outer_log_likelihood in z has a negative eigenvalue "
            f"({float(eigvals.min()):.3g}): a low-rank GGN needs outer_log_likelihood concave in z"
        )
    return (eigvecs * eigvals.clamp_min(0.0).sqrt()[..., None, :]).mT.to(dtype)


def _separable_root_blocks(params, batch, forward, z, roots, size, backend):
    """The rows of R a block of samples at a time (each block's J from one
    reverse pass per sample); first yields None when the forward is not
    shown to be sample-separable on the first block. A later block whose
    probe cannot decide (another block size: a batch of one refused, say)
    takes the general Jacobian of its samples, which the first block's
    verdict makes those rows of the batch's; one found coupled raises."""
    n, width = z.shape[0], roots.shape[-1]
    per = max(1, budget_bytes() // max(1, width * size * z.element_size()))
    for index, (start, stop) in enumerate(sample_slices(n, per)):
        part = take(batch, start, stop, n)
        jac, verdict = _separable_output_jacobian(forward, params, part, z[start:stop], backend=backend)
        if jac is None and index == 0:
            yield None
            return
        if jac is None and verdict is False:
            raise ValueError(
                f"forward couples samples {start}:{stop} of the batch with the others (though not the first "
                f"ones), so its GGN cannot be built in blocks of samples; the whole Jacobian exceeds {ENV}="
                f"{budget_bytes() / 2**20:g}: raise it, or pass smaller batches"
            )
        if jac is None:
            jac = output_jacobian(forward, (params, part), 0, has_aux=True)[0]
        rows = _checked_rows(roots[start:stop], jac.reshape(stop - start, width, size))
        del jac
        yield rows
        del rows
