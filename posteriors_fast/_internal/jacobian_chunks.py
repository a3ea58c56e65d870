"""The memory budget of per-sample Jacobians, and the chunks that keep them
within it.

An (N, P) per-sample Jacobian takes N·P values: 10 GB in float32 at N = 256,
P = 10⁷. When it would exceed the budget (``POSTERIORS_FAST_JACOBIAN_MB``,
default 1024 MiB; :mod:`posteriors_fast._internal.jacobian_budget`), the methods
that need only sums over samples (the diagonal EKF and Laplace methods,
``utils.diag_ggn``) and those that copy the rows into a panel (the low-rank
methods) build it a chunk of samples at a time with :class:`LogDensityChunks`
or :func:`sample_slices`, so no more than about ``budget`` bytes of Jacobian
exist at once (plus the model's activations for one chunk, and a temporary
of the same size as the chunk while it is reduced).
"""

from typing import Any, Callable, Iterator, List, Tuple

import torch
from optree import tree_leaves, tree_map
from torch.func import vmap

from posteriors_fast._internal import checks
from posteriors_fast._internal.errors import split_aux
from posteriors_fast._internal.jacobian_budget import ENV, budget_bytes, sample_slices, samples_per_chunk, take
from posteriors_fast._internal.loss_hessian import hessian_blocks, hessian_rows
from posteriors_fast.ops.separable_jacobian import log_density_jacobian


def _cat_aux(parts: List[Any]) -> Any:
    """Per-chunk auxes stacked over samples, joined along dimension 0."""
    if parts[0] is None:
        return None
    return tree_map(lambda *xs: torch.cat(xs, 0), parts[0], *parts[1:])


class LogDensityChunks:
    """The (N, P) per-sample Jacobian of a user's log density, a block of
    samples at a time, within the memory budget.

    Iterating yields ``(start, stop, jac)`` with ``jac`` the rows
    ``start:stop`` (float, in ravel order; checked finite). Afterwards
    ``values`` (N,) holds the per-sample values and ``aux`` the auxiliary
    output (stacked over samples for ``per_sample=False``; with
    ``per_sample=True`` and more than one chunk, the batch call's). When the
    whole Jacobian fits there is one chunk, exactly
    :func:`~posteriors_fast.ops.separable_jacobian.log_density_jacobian`.

    With ``per_sample=True`` and several chunks, ``fn`` is also called on the
    whole batch (forward only) for its values and aux; each chunk's values
    must reproduce them, else ``fn`` couples samples and cannot be chunked
    (a ValueError says to raise the budget).
    """

    def __init__(
        self,
        fn: Callable,
        params: Any,
        batch: Any,
        *,
        per_sample: bool,
        what: str,
        backend: str,
        values_must_be_finite: bool = True,
    ):
        self._jacobian = log_density_jacobian
        self.fn, self.params, self.batch = fn, params, batch
        self.per_sample, self.what, self.backend = per_sample, what, backend
        self.values_must_be_finite = values_must_be_finite
        # The size and the raveled dtype's width, without raveling (a copy of P values).
        leaves = tree_leaves(params)
        self.size = sum(x.numel() for x in leaves)
        self.n = checks.common_leading_dim(batch)
        if self.n is None or self.n < 2:
            self.slices = [(0, self.n)]
        else:
            width = max((x.element_size() for x in leaves), default=4)
            per = samples_per_chunk(self.n, 1, self.size, width)
            self.slices = sample_slices(self.n, per)
        self.values: torch.Tensor | None = None
        self.aux: Any = None

    @property
    def chunked(self) -> bool:
        return len(self.slices) > 1

    def __iter__(self) -> Iterator[Tuple[int, int, torch.Tensor]]:
        kwargs = dict(
            per_sample=self.per_sample,
            what=self.what,
            backend=self.backend,
            values_must_be_finite=self.values_must_be_finite,
        )
        if not self.chunked:
            jac, self.values, self.aux = self._jacobian(self.fn, self.params, self.batch, **kwargs)
            yield 0, jac.shape[0], jac
            return
        whole = None
        if self.per_sample:
            whole = self._whole_batch()
        values, auxes = [], []
        for start, stop in self.slices:
            part = take(self.batch, start, stop, self.n)
            jac, chunk_values, chunk_aux = self._jacobian(self.fn, self.params, part, **kwargs)
            if whole is not None:
                self._check_separable(chunk_values, whole[0][start:stop])
            values.append(chunk_values)
            auxes.append(chunk_aux)
            yield start, stop, jac
            del jac
        if whole is not None:
            self.values, self.aux = whole
        else:
            self.values, self.aux = torch.cat(values), _cat_aux(auxes)

    def _whole_batch(self):
        with checks.blame_batch(self.batch, self.what):
            values, aux = split_aux(self.fn(self.params, self.batch), True)
        if not isinstance(values, torch.Tensor) or values.shape != (self.n,):
            got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(
                f"{self.what} must return one value per sample, a tensor of shape ({self.n},) for this "
                f"batch of {self.n}, when per_sample=True; got {got}"
            )
        return values.detach(), aux

    def _check_separable(self, chunk_values: torch.Tensor, want: torch.Tensor) -> None:
        tol = 1e-9 if want.dtype == torch.float64 else 1e-4
        scale = want.abs().max().clamp_min(1.0)
        if not bool(((chunk_values - want).abs() <= tol * scale).all()):
            raise ValueError(
                f"{self.what} couples the samples of a batch (its values on part of the batch differ from "
                f"those on the whole), so its per-sample Jacobian cannot be built in chunks; the whole "
                f"({self.n}, {self.size}) Jacobian exceeds {ENV}={budget_bytes() / 2**20:g}: raise it, "
                "or pass smaller batches"
            )


def log_density_jacobian_rows(
    fn: Callable,
    params: Any,
    batch: Any,
    *,
    per_sample: bool,
    what: str,
    backend: str,
    values_must_be_finite: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """:func:`~posteriors_fast.ops.separable_jacobian.log_density_jacobian`
    (same arguments and result) for the methods that need all N rows (the
    low-rank ones): beyond the budget, the rows are written block by block
    into one (N, P) buffer, so the peak is N·P plus one block instead of the
    whole Jacobian's vmap temporaries and copies."""
    chunks = LogDensityChunks(
        fn,
        params,
        batch,
        per_sample=per_sample,
        what=what,
        backend=backend,
        values_must_be_finite=values_must_be_finite,
    )
    jac = None
    for start, stop, rows in chunks:
        if not chunks.chunked:  # one block: it is the whole Jacobian
            jac = rows
        else:
            if jac is None:
                jac = rows.new_empty((chunks.n, rows.shape[1]))
            jac[start:stop] = rows
        del rows
    return jac, chunks.values, chunks.aux


#: Below this many parameters one fused reduction beats a loop over rows.
_ROW_LOOP_MIN = 1 << 16


def _column_sums(jac: torch.Tensor, square_sum, grad_sum, with_grad: bool):
    """Add Σ_i J_i² (and Σ_i J_i) of the rows of ``jac`` to the accumulators
    (None: start them). Row by row for large P: ``square().sum(0)`` writes an
    (N, P) temporary and reduces across rows, 3x slower than one fused
    multiply-add per row (N = 64, P = 10⁶: 420 ms against 137 ms); Σ J is
    one GEMV."""
    if jac.shape[1] < _ROW_LOOP_MIN:
        square, grad = jac.square().sum(0), jac.sum(0) if with_grad else None
        if square_sum is None:
            return square, grad
        square_sum += square
        if with_grad:
            grad_sum += grad
        return square_sum, grad_sum
    if square_sum is None:
        square_sum = torch.zeros(jac.shape[1], dtype=jac.dtype, device=jac.device)
        grad_sum = torch.zeros_like(square_sum) if with_grad else None
    for row in jac:
        square_sum.addcmul_(row, row)
    if with_grad:
        grad_sum.addmv_(jac.mT, torch.ones(jac.shape[0], dtype=jac.dtype, device=jac.device))
    return square_sum, grad_sum


def fisher_sums(chunks: "LogDensityChunks", with_grad: bool = True) -> Tuple:
    """``(Σ_i J_i², Σ_i J_i, values, aux)`` over the samples of ``chunks``
    (``Σ_i J_i`` is None without ``with_grad``), never holding more than one
    chunk of J."""
    square_sum = grad_sum = None
    for _, _, jac in chunks:
        square_sum, grad_sum = _column_sums(jac, square_sum, grad_sum, with_grad)
        del jac
    return square_sum, grad_sum, chunks.values, chunks.aux


def ggn_diag_rows(
    pullback: Callable, loss: Callable, z: torch.Tensor, size: int, normalize: bool, check: bool = False
) -> torch.Tensor:
    """diag(Jᵀ H J) (``size``,) from the vector-Jacobian product ``pullback``
    of the raveled outputs z (d,) of a forward pass, H the Hessian of
    ``loss`` at z, never holding more than the budget's worth of rows of J.

    When H is block diagonal over samples (any sum of per-sample losses), the
    rows of J come a block of samples at a time and meet their own (c, c)
    blocks. Otherwise H = V Λ Vᵀ (d×d, eigh) and the rows are those of Vᵀ J,
    with diag(Jᵀ H J) = Σ_k λ_k (v_kᵀ J)², the same number of reverse passes
    as the unit rows. ``normalize`` divides by the number of samples;
    ``check`` raises a ValueError when J or H holds NaN or inf.
    """
    d, n = z.numel(), (z.shape[0] if z.ndim > 0 else 1)
    itemsize = z.element_size()
    rows = max(1, budget_bytes() // max(1, size * itemsize))
    out = torch.zeros(size, dtype=z.dtype, device=z.device)
    blocks = hessian_blocks(loss, z)
    if blocks is not None:
        c = blocks.shape[1]
        for s0, s1 in sample_slices(n, max(1, rows // c)):
            basis = torch.zeros((s1 - s0) * c, d, dtype=z.dtype, device=z.device)
            basis[torch.arange((s1 - s0) * c), torch.arange(s0 * c, s1 * c)] = 1.0
            jac = vmap(pullback)(basis)[0]
            hess_jac = torch.bmm(blocks[s0:s1], jac.reshape(s1 - s0, c, size)).reshape(-1, size)
            if check:
                _require_finite_rows(jac, hess_jac)
            out += (jac * hess_jac).sum(0)
            del jac, hess_jac
    else:
        hess = hessian_rows(loss, z, 0, d)
        eigenvalues, eigenvectors = torch.linalg.eigh((hess + hess.mT) / 2)
        for r0, r1 in sample_slices(d, rows):
            rotated = vmap(pullback)(eigenvectors[:, r0:r1].mT.contiguous())[0]
            if check:
                _require_finite_rows(rotated, eigenvalues[r0:r1])
            out += (eigenvalues[r0:r1, None] * rotated.square()).sum(0)
            del rotated
    return out / n if normalize else out


def _require_finite_rows(jac: torch.Tensor, hess_part: torch.Tensor) -> None:
    checks.require_finite(
        [
            (jac, "the gradient of forward is NaN or inf"),
            (hess_part, "the Hessian of the loss is NaN or inf"),
        ]
    )
