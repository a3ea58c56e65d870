"""Dense P×P states split by rows across the ranks of a group (the
``sharded`` mode of ``ekf.dense_fisher`` and ``laplace.dense_*``).

Layout: rank r of R holds rows [a_r, b_r) = [r·P // R, (r+1)·P // R) of the
matrix, all P columns, as a :class:`ShardedMatrix`: the covariance Σ for the
EKF, the precision Λ for Laplace, exactly the dense state cut into row
blocks. No rank ever holds the whole matrix; each holds (b_r − a_r)·P entries
plus, while it samples, one other rank's row block of the factor.

Why row blocks of the dense matrix, not a square root A (Σ = A Aᵀ): a square
root makes draws a local product, but it cannot take the EKF's transition
noise Σ + Q, a zero prior precision (Laplace's default) or the full-rank
Hessian term of ``dense_hessian`` without re-factorising the P×P matrix at
every update. Row blocks keep every update exactly the dense one with
O(N·P) communication, and sampling factors the matrix once per state (a
distributed block Cholesky, cached until the next update), which amortises
over all draws from that state.

Communication per step (values; N the global batch, S draws, R ranks):

* EKF update (Woodbury in row blocks): all-gather of the N per-sample
  Jacobian rows (N·(P+1)), all-reduce of the N×N innovation J Σ_p Jᵀ (N²),
  all-gather of the Kalman factor W = L⁻¹ J Σ_p and of Σ_p ḡ in column blocks
  ((N+1)·P): about 2·N·P + N². Compute per rank: 2·N·P²/R + O(N³).
* Fisher / GGN Laplace update: all-gather of the Jacobian rows (N·P; 2·N·C·P
  for the GGN factors); each rank adds its rows of JᵀJ (N·P²/R).
* Hessian Laplace update: each rank's Hessian rows, reduced block by block
  to their owner: P² in total (the term is full rank).
* Factor (first ``sample`` after an update): R broadcasts of the factor's row
  blocks, Σ_k (b_k − a_k)·b_k ≈ P²/2 values received per rank, P³/(3R)
  flops on average per rank. Draws: EKF one all-gather of S·P, Laplace R
  broadcasts of S·(P/R + a_k) (a back substitution through the blocks).
"""

from typing import List, Optional, Tuple

import torch

from posteriors_fast._internal import checks as _checks
from posteriors_fast._internal.cholesky import CholeskyError, robust_cholesky
from posteriors_fast._internal.memo import TensorMemo
from posteriors_fast.distributed._group import Group, _samples, draw_seed

_HINT = "Use a larger init_cov or transition_cov, a smaller lr, or float64 parameters."


def row_bounds(size: int, parts: int) -> List[Tuple[int, int]]:
    """``[(a_r, b_r)]``: the rows of each of ``parts`` ranks, as equal as can be."""
    return [(r * size // parts, (r + 1) * size // parts) for r in range(parts)]


class ShardedMatrix:
    """This rank's rows of a P×P matrix split by rows over a group.

    Attributes:
        local: (b − a, P) tensor, rows [a, b) of the matrix.
        start: a.
        stop: b.
        size: P.
        group: The :class:`~posteriors_fast.distributed.Group` holding the other rows.
    """

    def __init__(self, local: torch.Tensor, start: int, stop: int, size: int, group: Group):
        self.local = local
        self.start = start
        self.stop = stop
        self.size = size
        self.group = group

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.size, self.size))

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def bounds(self) -> List[Tuple[int, int]]:
        return row_bounds(self.size, self.group.size)

    def like(self, local: torch.Tensor) -> "ShardedMatrix":
        """The same layout with other local rows."""
        return ShardedMatrix(local, self.start, self.stop, self.size, self.group)

    def gather(self) -> torch.Tensor:
        """The whole (P, P) matrix on every rank: an all-gather of P² values,
        for tests and small P only."""
        widths = [b - a for a, b in self.bounds()]
        return self.group.gather_columns(self.local.mT.contiguous(), widths).mT.contiguous()

    def __repr__(self) -> str:
        return (
            f"ShardedMatrix(rows {self.start}:{self.stop} of {self.size}, rank {self.group.rank} of "
            f"{self.group.size}, dtype={self.dtype}, device={self.device})"
        )


def shard(value, group: Group, like: torch.Tensor, name: str, allow_zero: bool) -> ShardedMatrix:
    """This rank's rows of ``value``: a scalar c (c·I, never formed whole) or a
    (P, P) symmetric tensor (checked as the dense methods check it, then
    sliced and copied)."""
    size = like.numel()
    matrix = _checks.covariance(value, size, like, name, allow_zero=allow_zero)
    start, stop = row_bounds(size, group.size)[group.rank]
    if isinstance(matrix, float):
        local = torch.zeros(stop - start, size, dtype=like.dtype, device=like.device)
        local.diagonal(start).fill_(matrix)
    else:
        local = matrix[start:stop].clone()
    return ShardedMatrix(local, start, stop, size, group)


def check(matrix, size: int, name: str) -> None:
    """``matrix`` is a ShardedMatrix of a P×P matrix over its group's layout."""
    if not isinstance(matrix, ShardedMatrix):
        raise TypeError(f"{name} must be a posteriors_fast.distributed.ShardedMatrix, got {type(matrix).__name__}")
    start, stop = row_bounds(size, matrix.group.size)[matrix.group.rank]
    layout = (matrix.size, matrix.start, matrix.stop, tuple(matrix.local.shape))
    if layout != (size, start, stop, (stop - start, size)):
        raise ValueError(
            f"{name} holds rows {matrix.start}:{matrix.stop} ({tuple(matrix.local.shape)}) of a {matrix.size}×"
            f"{matrix.size} matrix; rank {matrix.group.rank} of {matrix.group.size} needs rows {start}:{stop} "
            f"of {size}×{size} for these parameters"
        )


def check_layout(matrix, size: int, group: Optional[Group], name: str) -> bool:
    """True for a (checked) ShardedMatrix, False for anything else (a dense
    state, checked by its method); an error when the state and the group's
    mode do not go together."""
    if isinstance(matrix, ShardedMatrix):
        if group is not None and (not group.sharded or group.pg is not matrix.group.pg):
            raise ValueError(
                f"{name} is split across the ranks of a sharded process group; update it with that group "
                f"(posteriors_fast.distributed.sharded), not a {group.mode!r} one"
            )
        check(matrix, size, name)
        return True
    if group is not None and group.sharded:
        raise ValueError(
            f"{name} is a dense tensor but process_group is sharded: make the state with "
            "init(..., process_group=<the sharded group>)"
        )
    return False


def local_rows(value, matrix: ShardedMatrix):
    """A transition covariance as it applies to this rank's rows: a float, or
    rows [a, b) of a (P, P) tensor."""
    return value if isinstance(value, float) else value[matrix.start : matrix.stop]


class Woodbury:
    """The sharded EKF step, computed and checked but not written (see
    :func:`woodbury`). ``write(out)`` cannot fail."""

    def __init__(self, mean_step, cov: ShardedMatrix, transition, w_local, w):
        self.mean_step = mean_step
        self._cov, self._transition, self._w_local, self._w = cov, transition, w_local, w

    def write(self, out: Optional[ShardedMatrix] = None) -> ShardedMatrix:
        """Rows of Σ_new = Σ + Q − WᵀW into ``out`` (the covariance itself:
        in place) or, with None, new rows."""
        cov = self._cov
        if out is not None:
            out = out.local
        if out is None:
            out = torch.addmm(cov.local, self._w_local.mT, self._w, alpha=-1.0)
        else:
            out.addmm_(self._w_local.mT, self._w, alpha=-1.0)
        q = self._transition
        if isinstance(q, torch.Tensor):
            out.add_(q)
        elif q != 0.0:
            out.diagonal(cov.start).add_(q)
        return cov if out is cov.local else cov.like(out)


def woodbury(cov: ShardedMatrix, transition, jac: torch.Tensor, beta: float) -> Woodbury:
    """The dense EKF step Σ_new = ((Σ + Q)⁻¹ + β JᵀJ)⁻¹ and Σ_new ḡ on row
    blocks, for the global (N, P) ``jac`` every rank holds:

    $$ C_r = (Σ + Q)_{r} Jᵀ,\\quad S = β^{-1} I + \\sum_r J_{:,r} C_r = L Lᵀ,\\quad
    W_{:,r} = L^{-1} C_rᵀ, $$
    $$ Σ_{new,r} = (Σ + Q)_r − W_{:,r}ᵀ W,\\qquad Σ_{new}\\,ḡ = Σ_p ḡ − Wᵀ (W ḡ), $$

    with one all-reduce of S (N² values) and one all-gather of W and the rows
    of Σ_p ḡ (the row means of C_r): (N+1)·P values. Every rank factors the
    same S and gets the same W, so the mean step is bit-identical."""
    group = cov.group
    a, b = cov.start, cov.stop
    local = cov.local
    jac = jac.to(local.dtype)
    q = local_rows(transition, cov)
    cov_jt = torch.mm(local, jac.mT)  # (P_r, N)
    if isinstance(q, torch.Tensor):
        cov_jt.addmm_(q, jac.mT)
    elif q != 0.0:
        cov_jt.add_(jac[:, a:b].mT, alpha=q)
    (innovation,) = group.all_reduce_sum([torch.mm(jac[:, a:b], cov_jt)])
    innovation.diagonal().add_(1.0 / beta)
    chol = robust_cholesky(innovation, "the innovation matrix S = I/(lr/N) + J (Σ + Q) Jᵀ", _HINT)
    w_local = torch.linalg.solve_triangular(chol, cov_jt.mT, upper=False)  # (N, P_r)
    widths = [y - x for x, y in cov.bounds()]
    both = group.gather_columns(torch.cat([w_local, cov_jt.mean(1)[None]], 0), widths)
    w, pred_mean = both[:-1], both[-1]
    step = pred_mean - torch.mv(w.mT, torch.mv(w, jac.mean(0)))
    bad = _checks.first_non_finite([(w, "the Kalman gain"), (step, "the mean update")])
    if bad is not None:
        raise ValueError(f"{bad} is not finite (try a smaller lr or float64); the state was not changed")
    return Woodbury(step, cov, q, w_local, w)


def add_product(matrix: ShardedMatrix, left: torch.Tensor, right: torch.Tensor, inplace: bool, what: str):
    """Rows of Λ + leftᵀ right for global (K, P) factors every rank holds
    (JᵀJ, or Jᵀ(HJ) for the GGN): this rank adds left[:, a:b]ᵀ right, once
    every rank has found its rows finite (one small all-gather)."""
    term = torch.mm(left[:, matrix.start : matrix.stop].to(matrix.dtype).mT, right.to(matrix.dtype))
    return add_rows(matrix, term, inplace, what)


def add_rows(matrix: ShardedMatrix, term: torch.Tensor, inplace: bool, what: str) -> ShardedMatrix:
    """``matrix`` plus this rank's rows of a term (every rank's term checked
    finite first, one small all-gather), in place or new."""
    matrix.group.vote(_checks.all_finite([term]), what, "the curvature of this batch overflowed (NaN or inf)")
    if inplace:
        matrix.local.add_(term)
        return matrix
    return matrix.like(term.add_(matrix.local))


def add_row_blocks(matrix: ShardedMatrix, compute_rows, *, what: str, params, batch, kind: str, extra=()):
    """Σ over ranks of every rank's term rows, block by block to the block's
    owner: for k = 0..R−1 every rank runs ``compute_rows(a_k, b_k) -> (rows
    (b_k − a_k, P), aux)`` on its shard (agreeing first, so a failure on any
    rank raises everywhere), weights it (:meth:`Group.weights` of ``kind``)
    and reduces it to rank k. Returns ``(this rank's summed rows, aux)``:
    P² values reduced in all, no rank holding more than one block."""
    group = matrix.group
    n = group.local_rows(batch)
    mine, aux = None, None
    for k, (a, b) in enumerate(matrix.bounds()):
        result, counts, _ = group.agree(
            None if n == 0 else (lambda a=a, b=b: compute_rows(a, b)),
            what=what,
            params=params,
            count=_samples(n),
            extra=extra,
        )
        if sum(counts) == 0:
            raise ValueError(f"{what}: the batch is empty on every rank")
        if result is None:
            rows = matrix.local.new_zeros(b - a, matrix.size)
        else:
            rows, aux = result
            weight = group.weights(counts, kind)
            rows = rows.to(matrix.dtype) * weight if weight != 1.0 else rows.to(matrix.dtype)
        group.reduce_(rows, k)
        if k == group.rank:
            mine = rows
    return mine, aux


# ---- sampling: the distributed block Cholesky ---------------------------------

# Factor rows of sharded matrices already sampled from, keyed on the local rows
# tensor and its version: any update invalidates the entry.
_factors = TensorMemo()


def factor(matrix: ShardedMatrix, name: str, hint: str) -> torch.Tensor:
    """This rank's rows of the lower Cholesky factor L (Λ = L Lᵀ), shape
    (b − a, b): row block r of L has no entries right of column b_r.

    Right-looking over row blocks: for k = 0..R−1, rank k factors its
    diagonal block (its rows of the matrix minus what the earlier blocks of
    L explain) and broadcasts its row block of L (with a status flag); every
    rank r > k then solves its block L_rk = (A_rk − L_r,<k L_k,<kᵀ) L_kk⁻ᵀ from
    its own rows and that block. So no rank holds more than its rows plus
    one other row block. Cached per local tensor (every rank asks the others
    whether its cache holds the factor: one small all-gather)."""
    group = matrix.group
    cached = _factors.get(matrix.local)
    hits = group.all_gather(torch.tensor([cached is not None], dtype=torch.int64))
    if all(int(h[0]) for h in hits):
        return cached
    a_me, b_me = matrix.start, matrix.stop
    rows = matrix.local
    factor_rows = rows.new_zeros(b_me - a_me, b_me)
    for k, (a, b) in enumerate(matrix.bounds()):
        buffer = rows.new_empty((b - a) * b + 1)
        if k == group.rank:
            done = factor_rows[:, :a]
            diag = rows[:, a:b] - torch.mm(done, done.mT)
            chol, info = torch.linalg.cholesky_ex(diag)
            factor_rows[:, a:b] = chol
            buffer[:-1] = factor_rows.reshape(-1)
            buffer[-1] = float(int(info) != 0)
        group.broadcast_(buffer, k)
        if float(buffer[-1]) != 0.0:
            raise CholeskyError(
                f"{name} (sharded) is not positive definite: the diagonal block of rows {a}:{b} (rank {k}) has "
                f"no Cholesky factor once the rows above it are eliminated. {hint}"
            )
        if k < group.rank:
            block = buffer[:-1].view(b - a, b)
            diag_factor = block[:, a:b]
            rhs = rows[:, a:b] - torch.mm(factor_rows[:, :a], block[:, :a].mT)
            factor_rows[:, a:b] = torch.linalg.solve_triangular(diag_factor.mT, rhs, upper=True, left=False)
    _factors.put(matrix.local, factor_rows)
    return factor_rows


def shared_normal(group: Group, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Standard normal draws identical on every rank: rank 0 draws a seed from
    its default generator (``torch.manual_seed`` on rank 0 reproduces them)
    and broadcasts it (one int64)."""
    seed = torch.tensor([draw_seed() if group.rank == 0 else 0], dtype=torch.int64)
    return normal_from_seed(int(group.broadcast_(seed, 0)[0]), shape, dtype, device)


def normal_from_seed(seed: int, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


def sample_covariance(mean: torch.Tensor, cov: ShardedMatrix, draws: int) -> torch.Tensor:
    """(draws, P) samples of N(mean, Σ) from row-sharded Σ = L Lᵀ: rank r
    computes its columns mean[a:b] + ε[:, :b] L_rᵀ from noise ε every rank
    shares; one all-gather of draws·P values assembles them on every rank."""
    chol = factor(cov, "state.cov", "The covariance must be positive definite to sample from it.")
    eps = shared_normal(cov.group, (draws, cov.size), mean.dtype, mean.device)
    mine = torch.addmm(mean[cov.start : cov.stop], eps[:, : cov.stop], chol.mT.to(mean.dtype))
    return cov.group.gather_columns(mine, [b - a for a, b in cov.bounds()])


def sample_precision(mean: torch.Tensor, prec: ShardedMatrix, draws: int) -> torch.Tensor:
    """(draws, P) samples of N(mean, Λ⁻¹) from row-sharded Λ = L Lᵀ: the
    rows of X with X L = ε (x = L⁻ᵀ ε has covariance Λ⁻¹), by back
    substitution over the row blocks, last first: rank k solves X_k L_kk
    = ε_k − Σ_{j>k} X_j L_jk, adds its X_k L_k,<k to the running sum and
    broadcasts both (draws·(b_k − a_k + a_k) values)."""
    group = prec.group
    chol = factor(prec, "state.prec", "The precision must be positive definite to sample: add a prior precision.")
    eps = shared_normal(group, (draws, prec.size), mean.dtype, mean.device)
    x = torch.empty_like(eps)
    carried = None  # Σ_{j>k} X_j L_j,:a_j over the columns left of the last block handled
    for k, (a, b) in reversed(list(enumerate(prec.bounds()))):
        buffer = eps.new_empty(draws * b)  # X_k (draws, b − a) then the new carried sum (draws, a)
        if k == group.rank:
            own = chol.to(mean.dtype)
            rhs = eps[:, a:b] if carried is None else eps[:, a:b] - carried[:, a:b]
            x_k = torch.linalg.solve_triangular(own[:, a:b], rhs, upper=False, left=False)
            passed = torch.mm(x_k, own[:, :a])
            if carried is not None:
                passed.add_(carried[:, :a])
            buffer[: draws * (b - a)] = x_k.reshape(-1)
            buffer[draws * (b - a) :] = passed.reshape(-1)
        group.broadcast_(buffer, k)
        x[:, a:b] = buffer[: draws * (b - a)].view(draws, b - a)
        carried = buffer[draws * (b - a) :].view(draws, a)
    return x.add_(mean)
