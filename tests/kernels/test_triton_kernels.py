"""Triton kernels (``posteriors_fast.kernels.triton``) on CPU tensors under the
Triton interpreter, against float64 eager oracles.

``conftest.py`` imports the kernel modules with ``TRITON_INTERPRET=1`` set for
that import only (``triton.jit`` reads it when a kernel is decorated).
"""

import importlib.util
import os

import pytest
import torch

from tests._compare import assert_close_to_oracle
from tests.conftest import skip_unless_installed

skip_unless_installed(importlib.util.find_spec("triton") is not None, "triton not installed")

from posteriors_fast.kernels.triton import cg_step, cov_downdate, syrk  # noqa: E402,F401

syrk_op = torch.ops.posteriors_fast.syrk_triton
cov_downdate_op = torch.ops.posteriors_fast.cov_downdate_triton
cg_step_op = torch.ops.posteriors_fast.cg_step_triton

SENTINEL = 123.0
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


def test_kernels_are_interpreted_and_triton_interpret_does_not_leak(triton_interpret_before):
    import triton
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernels = [syrk._syrk_kernel, cg_step._cg_dots_kernel, cg_step._cg_update_kernel, cg_step._cg_direction_kernel]
    for kernel in kernels:
        assert isinstance(kernel, InterpretedFunction), (
            f"{kernel} is compiled: the kernel modules were imported before tests/kernels/conftest.py "
            "without TRITON_INTERPRET=1, and cannot run on CPU tensors"
        )
    # triton's own device functions, which the kernels call (tl.sum).
    assert isinstance(triton.language.standard.sum, InterpretedFunction), (
        "triton was imported before tests/kernels/conftest.py without TRITON_INTERPRET=1: "
        "interpreted kernels cannot call its compiled device functions"
    )
    # The variable is back to what it was (unset, unless the caller set it)...
    assert os.environ.get("TRITON_INTERPRET") == triton_interpret_before
    if triton_interpret_before is None:
        # ...so a kernel decorated from now on, in any later module, is compiled.
        @triton.jit
        def probe(x_ptr):
            pass

        assert isinstance(probe, JITFunction)


def _assert_close(actual, expected, dtype, where=""):
    """``expected`` is float64: the suite's oracle tolerance (tests/_compare.py)."""
    try:
        assert_close_to_oracle(actual, expected, dtype)
    except AssertionError as err:
        raise AssertionError(f"{where}\n{err}" if where else str(err)) from err


def _sym(size, dtype, gen):
    m = torch.randn(size, size, dtype=torch.float64, generator=gen)
    return ((m + m.T) / 2).to(dtype)


# ---------------------------------------------------------------- syrk


@pytest.mark.parametrize("mirror", [True, False], ids=["mirror", "upper"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (7, 70), (33, 65)], ids=str)
def test_syrk_matches_oracle(shape, dtype, beta, mirror):
    depth, size = shape
    gen = torch.Generator().manual_seed(depth * 1000 + size)
    a = torch.randn(depth, size, dtype=dtype, generator=gen)
    h = _sym(depth, dtype, gen)
    sym_c = _sym(size, dtype, gen)
    upper = torch.ones(size, size, dtype=torch.bool).triu()
    strictly_lower = ~upper
    for alpha in (1.0, -1.0):
        # b = H a with H symmetric (K, K): aᵀb = aᵀHa is symmetric.
        for b in (None, h @ a):
            for in_place in (True, False):
                b64 = a.double() if b is None else b.double()
                expected = alpha * a.double().T @ b64
                if beta != 0:
                    expected = expected + beta * sym_c.double()
                if in_place:
                    # Only the upper triangle of C (= out) may be read: the
                    # lower one holds the sentinel.
                    out = torch.where(upper, sym_c, torch.full_like(sym_c, SENTINEL))
                    c = None
                else:
                    out = torch.full((size, size), SENTINEL, dtype=dtype)
                    # Garbage below the diagonal of c must not be read.
                    c = torch.where(upper, sym_c, torch.full_like(sym_c, float("nan")))
                syrk_op(out, a, b, c, alpha, beta, mirror)
                where = f"alpha={alpha} b={'given' if b is not None else None} in_place={in_place}"
                _assert_close(out[upper], expected[upper], dtype, where)
                if mirror:
                    assert torch.equal(out, out.T), where
                else:
                    assert (out[strictly_lower] == SENTINEL).all(), where


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_syrk_beta_zero_ignores_nan_c(dtype):
    a = torch.randn(9, 45, dtype=dtype)
    expected = a.double().T @ a.double()
    # Separate c full of NaN.
    out = torch.full((45, 45), SENTINEL, dtype=dtype)
    syrk_op(out, a, None, torch.full((45, 45), float("nan"), dtype=dtype), 1.0, 0.0, True)
    assert torch.isfinite(out).all()
    _assert_close(out, expected, dtype)
    # In place on a NaN-filled (e.g. torch.empty) output.
    out = torch.full((45, 45), float("nan"), dtype=dtype)
    syrk_op(out, a, None, None, 1.0, 0.0, True)
    assert torch.isfinite(out).all()
    _assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_syrk_non_contiguous_inputs(dtype):
    a = torch.randn(70, 11, dtype=dtype).T  # (11, 70), strides (1, 11)
    assert not a.is_contiguous()
    h = _sym(11, dtype, torch.Generator().manual_seed(0))
    b = (h @ a).T.contiguous().T  # non-contiguous too
    c_base = _sym(70, dtype, torch.Generator().manual_seed(1))
    c = c_base.T  # a transposed (column-major) view
    out = torch.full((70, 70), SENTINEL, dtype=dtype)
    syrk_op(out, a, b, c, -1.0, 0.5, True)
    expected = 0.5 * c_base.double() - a.double().T @ b.double()
    _assert_close(out, expected, dtype)
    assert torch.equal(out, out.T)
    # Non-contiguous output: the upper-left block of a bigger buffer.
    big = torch.full((80, 80), SENTINEL, dtype=dtype)
    out = big[:70, :70]
    syrk_op(out, a, None, None, 1.0, 0.0, True)
    _assert_close(out, a.double().T @ a.double(), dtype)
    assert (big[70:] == SENTINEL).all() and (big[:, 70:] == SENTINEL).all()


def test_syrk_empty_depth():
    a = torch.zeros(0, 20)
    c = _sym(20, torch.float32, torch.Generator().manual_seed(0))
    out = torch.empty(20, 20)
    syrk_op(out, a, None, c, 1.0, 2.0, True)
    _assert_close(out, 2.0 * c.double(), torch.float32)


# ---------------------------------------------------------------- cov_downdate


@pytest.mark.parametrize("rank", [1, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cov_downdate_matches_oracle(dtype, rank):
    size = 67
    gen = torch.Generator().manual_seed(rank)
    m = torch.randn(size, size, dtype=torch.float64, generator=gen)
    cov64 = m @ m.T / size + torch.eye(size, dtype=torch.float64)
    w = (0.3 * torch.randn(rank, size, dtype=torch.float64, generator=gen)).to(dtype)
    expected = cov64 - w.double().T @ w.double()
    cov = cov64.to(dtype)
    # Only the upper triangle may be read.
    cov = torch.where(torch.ones_like(cov, dtype=torch.bool).triu(), cov, torch.full_like(cov, float("nan")))
    cov_downdate_op(cov, w)
    _assert_close(cov, expected, dtype)
    assert torch.equal(cov, cov.T)


# ---------------------------------------------------------------- cg_step


def _cg_step_oracle(x, r, p, ap, gamma, damping):
    x, r, p, ap, gamma = (t.double().clone() for t in (x, r, p, ap, gamma))
    pap = p @ ap + damping * (p @ p)
    alpha = gamma / pap
    x += alpha * p
    r -= alpha * (ap + damping * p)
    gamma_new = r @ r
    p = r + (gamma_new / gamma) * p
    return x, r, p, gamma_new


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("size", [1, 1000, 4097])
def test_cg_step_matches_oracle(size, dtype, damping):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, dtype=dtype, generator=gen)
    r = torch.randn(size, dtype=dtype, generator=gen)
    p = torch.randn(size, dtype=dtype, generator=gen)
    ap = (1 + torch.rand(size, dtype=dtype, generator=gen)) * p  # A p for a positive diagonal A
    gamma = r @ r
    ex, er, ep, egamma = _cg_step_oracle(x, r, p, ap, gamma, damping)
    ap_before = ap.clone()
    gamma_new = cg_step_op(x, r, p, ap, gamma, damping)
    assert gamma_new.shape == () and gamma_new.dtype == dtype
    _assert_close(x, ex, dtype)
    _assert_close(r, er, dtype)
    _assert_close(p, ep, dtype)
    _assert_close(gamma_new, egamma, dtype)
    assert torch.equal(ap, ap_before)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_cg_step_loop_solves_spd_system(damping):
    size = 50
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(size, size, dtype=torch.float64, generator=gen)
    a = m @ m.T / size + 0.5 * torch.eye(size, dtype=torch.float64)
    b = torch.randn(size, dtype=torch.float64, generator=gen)
    x = torch.zeros(size, dtype=torch.float64)
    r = b.clone()
    p = r.clone()
    gamma = r @ r
    for _ in range(60):
        if gamma.item() == 0:  # converged exactly: the next ratio would be 0/0
            break
        gamma = cg_step_op(x, r, p, a @ p, gamma, damping)
    solution = torch.linalg.solve(a + damping * torch.eye(size, dtype=torch.float64), b)
    residual = b - (a @ x + damping * x)
    assert residual.norm() <= 1e-8 * b.norm()
    torch.testing.assert_close(x, solution, rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------- opcheck


def _opcheck_cases():
    a = torch.randn(7, 40)
    h = _sym(7, torch.float32, torch.Generator().manual_seed(0))
    size = 40
    return [
        (syrk_op, (torch.randn(size, size), a, None, None, 1.0, 0.5, True)),
        (syrk_op, (torch.empty(size, size), a, h @ a, _sym(size, torch.float32, torch.Generator()), -1.0, 1.0, False)),
        (cov_downdate_op, (torch.eye(size) * 4, 0.1 * torch.randn(3, size))),
        (cg_step_op, (*(torch.randn(size) for _ in range(4)), torch.tensor(2.0), 0.3)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck_schema_and_fake(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="only the interpreter path refuses to be traced")
@pytest.mark.parametrize("case", [0, 3])
def test_tracing_interpreted_kernel_raises_instead_of_dropping_it(case):
    # Under the interpreter wrap_triton hands back the raw kernel, which an AOT
    # (functionalized) trace cannot capture: that must fail loudly, never give
    # a graph that runs without the kernel.
    from torch.testing._internal.optests.generate_tests import OpCheckError

    op, args = _opcheck_cases()[case]
    with pytest.raises(OpCheckError, match="cannot trace an interpreted Triton kernel.*needs CUDA"):
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


# ---------------------------------------------------------------- bad inputs


def test_syrk_bad_inputs():
    a = torch.randn(5, 10)
    out = torch.zeros(10, 10)
    with pytest.raises(ValueError, match="^a must"):
        syrk_op(out, torch.randn(10), None, None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^a must"):
        syrk_op(out, a.to(torch.float16), None, None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^b must"):
        syrk_op(out, a, torch.randn(5, 11), None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^b must"):
        syrk_op(out, a, a.double(), None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^out must"):
        syrk_op(torch.zeros(10, 11), a, None, None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^out must"):
        syrk_op(out.double(), a, None, None, 1.0, 0.0, True)
    with pytest.raises(ValueError, match="^c must"):
        syrk_op(out, a, None, torch.zeros(9, 9), 1.0, 1.0, True)
    with pytest.raises(ValueError, match="^c must"):
        syrk_op(out, a, None, torch.zeros(10, 10, dtype=torch.float64), 1.0, 1.0, True)


def test_cov_downdate_bad_inputs():
    with pytest.raises(ValueError, match="^w must"):
        cov_downdate_op(torch.eye(4), torch.randn(4))
    with pytest.raises(ValueError, match="^w must"):
        cov_downdate_op(torch.eye(4), torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="^cov must"):
        cov_downdate_op(torch.eye(5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="^cov must"):
        cov_downdate_op(torch.eye(4, dtype=torch.float64), torch.randn(2, 4))


def test_cg_step_bad_inputs():
    v = [torch.randn(6) for _ in range(4)]
    gamma = torch.tensor(1.0)
    with pytest.raises(ValueError, match="^x must"):
        cg_step_op(torch.randn(6, 1), *v[1:], gamma, 0.0)
    with pytest.raises(ValueError, match="^r must"):
        cg_step_op(v[0], torch.randn(7), v[2], v[3], gamma, 0.0)
    with pytest.raises(ValueError, match="^ap must"):
        cg_step_op(*v[:3], v[3].double(), gamma, 0.0)
    with pytest.raises(ValueError, match="^p must"):
        cg_step_op(v[0], v[1], torch.randn(12)[::2], v[3], gamma, 0.0)
    with pytest.raises(ValueError, match="^gamma must"):
        cg_step_op(*v, gamma.reshape(1), 0.0)
    with pytest.raises(ValueError, match="^gamma must"):
        cg_step_op(*v, gamma.double(), 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatch_glue_runs_the_triton_kernels(dtype):
    """The functions the dispatch layer registers for CUDA, run here on CPU
    tensors through the interpreter, against the eager implementations."""
    from posteriors_fast.ops import cg_step as cg_ops
    from posteriors_fast.ops import cov_downdate as cd_ops
    from posteriors_fast.ops import syrk as syrk_ops

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 45, dtype=dtype, generator=gen)
    c = torch.randn(45, 45, dtype=dtype, generator=gen)
    c = c + c.T
    fast = syrk_ops.syrk_triton(torch.empty_like(c), a, None, c, 0.5, 1.0)
    slow = syrk_ops.syrk_eager(torch.empty_like(c), a, None, c, 0.5, 1.0)
    _assert_close(fast, slow.double(), dtype)
    cov_f, cov_e = c.clone(), c.clone()
    cd_ops.cov_downdate_triton(cov_f, a / 10)
    cd_ops.cov_downdate_eager(cov_e, a / 10)
    _assert_close(cov_f, cov_e.double(), dtype)
    spd = a.T @ a / 5 + torch.eye(45, dtype=dtype)
    b = torch.randn(45, dtype=dtype, generator=gen)
    p = b.clone()
    vectors_t = [torch.zeros_like(b), b.clone(), p.clone()]
    vectors_e = [torch.zeros_like(b), b.clone(), p.clone()]
    gamma = torch.dot(b, b)
    gamma_t = cg_ops.cg_step_triton(*vectors_t, spd @ p, gamma, 0.1)
    gamma_e = cg_ops.cg_step_eager(*vectors_e, spd @ p, gamma, 0.1)
    for got, want in zip(vectors_t + [gamma_t], vectors_e + [gamma_e]):
        _assert_close(got, want.double(), dtype)
