"""lowrank_truncate against a float64 dense oracle: U_new U_newᵀ is the best
rank-r part of UUᵀ + s²RᵀR (Eckart-Young, by a dense eigendecomposition),
the diagonal of the precision is kept exactly, odd shapes."""

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast._internal import lowrank
from posteriors_fast.backends import resolve
from posteriors_fast.ops.lowrank_truncate import lowrank_truncate
from tests._compare import tol
from tests.ops._native import close, needs_ext


def _case(size, m, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    diag = (torch.rand(size, generator=g) + 0.5).to(dtype)
    factor = torch.randn(size, m, generator=g).to(dtype)
    rows = torch.randn(k, size, generator=g).to(dtype)
    return diag, factor, rows


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize(
    "size, m, k, rank", [(37, 5, 1, 5), (37, 5, 9, 3), (50, 4, 7, 12), (6, 8, 3, 8), (129, 1, 1, 1)]
)
def test_best_rank_part_and_exact_diagonal(dtype, backend, size, m, k, rank, monkeypatch):
    monkeypatch.setattr(lowrank, "CHUNK_ROWS", 16)  # several chunks
    diag, factor, rows = _case(size, m, k, dtype)
    scale = 0.7
    vector = torch.randn(size, dtype=dtype)
    new_diag, new_factor, step, witness = lowrank_truncate(
        diag, factor, rows, scale, rank, vector, backend=resolve(backend)
    )
    assert bool(torch.isfinite(witness))
    # the Woodbury step is Σ_new g for the new precision
    new_prec = torch.diag(new_diag.double()) + new_factor.double() @ new_factor.double().T
    torch.testing.assert_close(step, torch.linalg.solve(new_prec, vector.double()).to(dtype), **tol(dtype))
    assert lowrank_truncate(diag, factor, rows, scale, rank, backend=resolve(backend))[2] is None
    assert new_factor.shape == (size, rank) and new_factor.dtype == dtype and new_diag.dtype == dtype
    full = factor.double() @ factor.double().T + scale**2 * rows.double().T @ rows.double()
    vals, vecs = torch.linalg.eigh(full)
    keep = min(rank, size)
    want = (vecs[:, -keep:] * vals[-keep:]) @ vecs[:, -keep:].T
    got = new_factor.double() @ new_factor.double().T
    top = full.abs().max()
    torch.testing.assert_close((got / top).to(dtype), (want / top).to(dtype), **tol(dtype, "method"))
    # the precision's diagonal is exact: d + rowsum(U²) + s² colsum(R²)
    want_diag = diag.double() + full.diagonal()
    got_diag = new_diag.double() + new_factor.double().square().sum(1)
    torch.testing.assert_close(got_diag.to(dtype), want_diag.to(dtype), **tol(dtype, "method"))
    assert bool((new_diag >= diag - 1e-6 * top).all())  # the dropped part is PSD
    # columns orthogonal, in decreasing order of norm
    gram = new_factor.double().T @ new_factor.double()
    off = gram - torch.diag(gram.diagonal())
    assert float(off.abs().max()) <= 1e-4 * float(top) * (1 if dtype == torch.float32 else 1e-6)
    norms = gram.diagonal()
    assert bool((norms[:-1] >= norms[1:] - 1e-5 * float(top)).all())


@pytest.mark.parametrize("transition", ["scalar", "vector"])
@pytest.mark.parametrize("size, m, k, rank", [(23, 4, 3, 4), (5, 9, 2, 9), (40, 3, 5, 2)])
def test_the_prediction_is_exact(dtype, transition, size, m, k, rank, monkeypatch):
    """With Q: the precision is ((D + UUᵀ)⁻¹ + Q)⁻¹ + s²RᵀR truncated, its
    diagonal part starting from D(I + QD)⁻¹; with rank >= m + K nothing is
    dropped and the result is that precision exactly."""
    monkeypatch.setattr(lowrank, "CHUNK_ROWS", 7)
    diag, factor, rows = _case(size, m, k, dtype, seed=2)
    gen = torch.Generator().manual_seed(4)
    q = 0.3 if transition == "scalar" else (torch.rand(size, generator=gen) * 0.5).to(dtype)
    qd = q * torch.eye(size, dtype=torch.float64) if transition == "scalar" else torch.diag(q.double())
    prec = torch.diag(diag.double()) + factor.double() @ factor.double().T
    pred = torch.linalg.inv(torch.linalg.inv(prec) + qd)
    pred_diag = diag.double() / (1 + (q.double() if torch.is_tensor(q) else q) * diag.double())
    vector = torch.randn(size, dtype=dtype)
    new_diag, new_factor, step, _ = lowrank_truncate(diag, factor, rows, 0.5, rank, vector, q, backend="eager")
    lowrank_part = pred - torch.diag(pred_diag) + 0.25 * rows.double().T @ rows.double()
    vals, vecs = torch.linalg.eigh(lowrank_part)
    keep = min(rank, size)
    want = (vecs[:, -keep:] * vals[-keep:]) @ vecs[:, -keep:].T
    got = new_factor.double() @ new_factor.double().T
    top = lowrank_part.abs().max()
    torch.testing.assert_close((got / top).to(dtype), (want / top).to(dtype), **tol(dtype))
    new_prec = torch.diag(new_diag.double()) + got
    want_diag = pred.diagonal() + 0.25 * rows.double().square().sum(0)
    torch.testing.assert_close(new_prec.diagonal().to(dtype), want_diag.to(dtype), **tol(dtype))
    torch.testing.assert_close(step, torch.linalg.solve(new_prec, vector.double()).to(dtype), **tol(dtype))
    wide = lowrank_truncate(diag, factor, rows, 0.5, m + k, None, q, backend="eager")
    full = torch.diag(wide[0].double()) + wide[1].double() @ wide[1].double().T
    want_full = pred + 0.25 * rows.double().T @ rows.double()
    torch.testing.assert_close((full / top).to(dtype), (want_full / top).to(dtype), **tol(dtype))


def test_a_non_finite_input_shows_in_the_witness():
    diag, factor, rows = _case(20, 3, 4, torch.float64)
    ones = torch.ones(20, dtype=torch.float64)
    # finite inputs whose Woodbury step overflows: g / d with d = 1e-300
    zero = torch.zeros_like
    *_, witness = lowrank_truncate(diag * 1e-300, zero(factor), zero(rows), 1.0, 3, ones * 1e300, backend="eager")
    assert not bool(torch.isfinite(witness))
    rows[1, 7] = float("inf")
    with pytest.raises(ValueError, match="Gram of the precision factor and the new columns holds NaN or inf"):
        lowrank_truncate(diag, factor, rows, 1.0, 3, ones, backend="eager")


def test_signs_do_not_depend_on_rounding():
    """The factor is fixed up to rounding, not up to column signs: a
    rounding-level change of the inputs changes it by rounding only."""
    diag, factor, rows = _case(40, 3, 6, torch.float64, seed=3)
    a = lowrank_truncate(diag, factor, rows, 1.0, 3, backend="eager")[1]
    b = lowrank_truncate(diag, factor * (1 + 1e-13), rows, 1.0, 3, backend="eager")[1]
    assert not torch.equal(a, b)  # the inputs did change
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_non_contiguous_inputs():
    diag, factor, rows = _case(33, 4, 5, torch.float64, seed=1)
    want = lowrank_truncate(diag, factor, rows, 0.3, 4, backend="eager")[:2]
    got = lowrank_truncate(diag, factor.T.contiguous().T, rows.T.contiguous().T, 0.3, 4, backend="eager")[:2]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol(torch.float64, "op"))


def _fold_oracle(factor, rows, right, base, prior, scale2, vector):
    """The second pass in float64: what posteriors_fast::lowrank_truncate_fold_ computes."""
    out = factor.double() + rows.double().T @ right.double()
    square = rows.double().square().sum(0)
    diag = torch.maximum(base.double() + scale2 * square + prior.double() - out.square().sum(1), base.double())
    inner = proj = None
    if vector is not None:
        inner = out.T @ (out / diag[:, None])
        proj = out.T @ (vector.double() / diag)
    return out, diag, inner, proj


def _fold_inputs(size, rank, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    factor = torch.randn(size, rank, generator=g).to(dtype)
    wide = torch.randn(k, size + 3, generator=g).to(dtype)
    rows = wide[:, 1 : size + 1]  # unit stride along P, leading stride P + 3
    right = torch.randn(k, rank, generator=g).to(dtype) * 0.3
    base = (torch.rand(size, generator=g) + 0.5).to(dtype)
    # prior large enough that most rows keep a positive dropped part, some clamp
    prior = (factor.double().square().sum(1) * 2 + torch.rand(size, generator=g).double()).to(dtype)
    vector = torch.randn(size, generator=g).to(dtype)
    return factor, rows, right, base, prior, vector


@needs_ext
@pytest.mark.parametrize("size, rank, k", [(1, 1, 1), (17, 8, 3), (40, 20, 64), (4096 + 37, 5, 9), (9000, 20, 2)])
@pytest.mark.parametrize("with_vector", [True, False])
def test_native_fold_at_each_isa_level_matches_float64_formulas(dtype, isa, size, rank, k, with_vector):
    """Ragged against every tile (16 or 8 rows, 8 columns) and the 4096-row tasks."""
    factor, rows, right, base, prior, vector = _fold_inputs(size, rank, k, dtype)
    vector = vector if with_vector else None
    want = _fold_oracle(factor, rows, right, base, prior, 0.49, vector)
    out, diag = factor.clone(), torch.full((size,), float("nan"), dtype=dtype)  # diag is written, not read
    versions = out._version, diag._version
    inner, proj = _library.OPS.lowrank_truncate_fold_(out, diag, rows, right, base, prior, 0.49, vector)
    assert out._version > versions[0] and diag._version > versions[1]
    close(out, want[0], dtype)
    close(diag, want[1], dtype)
    if with_vector:
        assert inner.dtype == proj.dtype == torch.float64 and inner.shape == (rank, rank)
        scale = want[2].abs().max()
        close((inner / scale).to(dtype), want[2] / scale, dtype)
        close((proj / want[3].abs().max()).to(dtype), want[3] / want[3].abs().max(), dtype)
    else:
        assert inner.numel() == 0 and proj.numel() == 0


@needs_ext
def test_native_fold_opcheck_and_bad_arguments():
    factor, rows, right, base, prior, vector = _fold_inputs(33, 4, 5, torch.float64)
    diag = torch.empty_like(base)
    torch.library.opcheck(
        _library.OPS.lowrank_truncate_fold_.default, (factor.clone(), diag, rows, right, base, prior, 0.5, vector)
    )
    with pytest.raises(RuntimeError, match="rows must have unit stride"):
        _library.OPS.lowrank_truncate_fold_(factor, diag, rows.T.contiguous().T, right, base, prior, 0.5, None)
    with pytest.raises(RuntimeError, match="right must be"):
        _library.OPS.lowrank_truncate_fold_(factor, diag, rows, right[:, :3], base, prior, 0.5, None)
    with pytest.raises(RuntimeError, match="prior must be Double, got Float"):
        _library.OPS.lowrank_truncate_fold_(factor, diag, rows, right, base, prior.float(), 0.5, None)


@needs_ext
@pytest.mark.parametrize("transition", [0.0, 0.2, "vector"])
def test_native_second_pass_gives_the_eager_result(dtype, transition):
    diag, factor, rows = _case(300, 6, 11, dtype, seed=7)
    q = transition
    if transition == "vector":
        q = (torch.rand(300, generator=torch.Generator().manual_seed(1)) * 0.4).to(dtype)
    vector = torch.randn(300, dtype=dtype)
    eager = lowrank_truncate(diag, factor, rows, 0.8, 5, vector, q, backend="eager")
    native = lowrank_truncate(diag, factor, rows, 0.8, 5, vector, q, backend="compiled")
    for got, want in zip(native[:3], eager[:3]):
        close(got, want.double(), dtype)
    # R without unit stride along P (the eager passes), or a strided factor and vector: the same result
    strided_vector = torch.randn(600, dtype=dtype)[::2]
    for args in [(factor, rows.T.contiguous().T, vector), (factor.T.contiguous().T, rows, strided_vector)]:
        strided = lowrank_truncate(diag, args[0], args[1], 0.8, 5, args[2], q, backend="compiled")
        want = lowrank_truncate(diag, factor, rows, 0.8, 5, args[2].contiguous(), q, backend="eager")
        for got, expected in zip(strided[:3], want[:3]):
            close(got, expected.double(), dtype)


@needs_ext
def test_native_fold_with_more_rows_than_the_task_cap():
    """Past 256 tasks of 4096 rows the tasks grow: the sums still cover every row once."""
    size = 256 * 4096 + 300
    factor, rows, right, base, prior, vector = _fold_inputs(size, 2, 1, torch.float64, seed=3)
    want = _fold_oracle(factor, rows, right, base, prior, 0.3, vector)
    out, diag = factor.clone(), torch.empty_like(base)
    inner, proj = _library.OPS.lowrank_truncate_fold_(out, diag, rows, right, base, prior, 0.3, vector)
    close(out, want[0], torch.float64)
    close(diag, want[1], torch.float64)
    close(inner, want[2], torch.float64)
    close(proj, want[3], torch.float64)
