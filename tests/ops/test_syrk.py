"""``syrk``: the eager tiles (any tiling) and the C++ CPU kernel at every
ISA level (the AVX-512 micro-kernel at avx512, the ATen-GEMM tiles that CPUs
without AVX-512 run at avx2 and baseline) against a float64 oracle and each
other, opcheck, declared non-differentiability, and dispatch."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posteriors_fast import _library
from posteriors_fast.ops import syrk
from tests._compare import tol
from tests.ops._native import at_each_isa, close, needs_ext

OPS = _library.OPS
# P around the tiles (240 for the AVX-512 kernel, 256/512 for the portable
# one) and K around the AVX-512 kernel's 128-deep chunks.
SHAPES = [(1, 1), (1, 37), (5, 513), (64, 1100), (3, 1025), (129, 241), (300, 481)]


def _sym(p, dtype, gen):
    c = torch.randn(p, p, dtype=dtype, generator=gen)
    return c + c.T


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("variant", ["inplace", "separate_c", "beta0_nan", "with_b"])
def test_syrk_matches_float64_oracle(dtype, k, p, mirror, variant, isa):
    gen = torch.Generator().manual_seed(k * 1000 + p)
    a = torch.randn(k, p, dtype=dtype, generator=gen)
    b, c, alpha, beta = None, None, -0.7, 1.0
    out = _sym(p, dtype, gen)
    base = out.clone()
    if variant == "separate_c":
        c, beta = _sym(p, dtype, gen), 0.5
        out = torch.full((p, p), 123.0, dtype=dtype)
        base = c
    elif variant == "beta0_nan":
        out = torch.full((p, p), float("nan"), dtype=dtype)
        beta, base = 0.0, torch.zeros(p, p, dtype=dtype)
    elif variant == "with_b":
        h = _sym(k, torch.float64, gen).to(dtype)
        b = h @ a  # aᵀ(Ha) is symmetric
    before = out.clone()
    OPS.syrk_(out, a, b, c, alpha, beta, mirror)
    a64 = a.double()
    b64 = a64 if b is None else b.double()
    expected = beta * base.double() + alpha * a64.T @ b64
    upper = torch.ones(p, p, dtype=torch.bool).triu()
    close(out[upper], expected[upper], dtype)
    if mirror:
        assert torch.equal(out, out.T)
    else:
        assert torch.equal(out[~upper], before[~upper]) or (variant == "beta0_nan" and out[~upper].isnan().all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k,p", SHAPES)
@pytest.mark.parametrize("mirror", [True, False])
def test_transposed_operands_match_float64_oracle(dtype, k, p, mirror, isa):
    """a and b stored as row-major (P, K) arrays viewed as (K, P), as the
    EKF's Kalman gain is (the AVX-512 kernel loads them with register
    transposes), with a separate C and an output whose rows are not
    contiguous with each other."""
    gen = torch.Generator().manual_seed(k * 7 + p)
    a = torch.randn(p, k, dtype=dtype, generator=gen).T
    h = _sym(k, torch.float64, gen)
    b = torch.empty(p, k, dtype=dtype).copy_((h @ a.double()).T).T  # aᵀb = aᵀHa is symmetric
    assert a.stride(0) == 1 and b.stride(0) == 1
    c = _sym(p, dtype, gen)
    big = torch.full((p, p + 3), 5.0, dtype=dtype)
    out = big[:, 1 : p + 1]
    OPS.syrk_(out, a, b, c, -0.6, 1.5, mirror)
    expected = 1.5 * c.double() + -0.6 * a.double().T @ b.double()
    upper = torch.ones(p, p, dtype=torch.bool).triu()
    close(out[upper], expected[upper], dtype)
    if mirror:
        assert torch.equal(out, out.T)
    else:
        assert (out[~upper] == 5.0).all()
    assert (big[:, 0] == 5.0).all() and (big[:, p + 1 :] == 5.0).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_empty_k_gives_beta_c(dtype, isa):
    c = _sym(50, dtype, torch.Generator().manual_seed(3))
    out = torch.full((50, 50), float("nan"), dtype=dtype)
    OPS.syrk_(out, torch.zeros(0, 50, dtype=dtype), None, c, 1.0, 2.0, True)
    upper = torch.ones(50, 50, dtype=torch.bool).triu()
    assert torch.equal(out[upper], 2 * c[upper]) and torch.equal(out, out.T)
    OPS.syrk_(out, torch.zeros(0, 50, dtype=dtype), None, None, 1.0, 0.0, True)
    assert torch.equal(out, torch.zeros(50, 50, dtype=dtype))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_isa_levels_agree_with_each_other(dtype):
    """The same calls at every ISA level this CPU has (AVX-512 micro-kernel,
    ATen tiles): results within the oracle tolerance of each other, exactly
    symmetric when mirrored, the lower triangle untouched when not."""
    gen = torch.Generator().manual_seed(7)
    cases = []
    for k, p in [(5, 513), (64, 300), (129, 241), (300, 481)]:
        a = torch.randn(k, p, dtype=dtype, generator=gen)
        c = _sym(p, dtype, gen)
        b = _sym(k, torch.float64, gen).to(dtype) @ a
        cases.append((c.clone(), a, None, None, -0.7, 1.0, True))
        cases.append((torch.full((p, p), float("nan"), dtype=dtype), a, b, c, 0.5, 2.0, True))
        cases.append((torch.full((p, p), 3.0, dtype=dtype), a, None, c, 1.5, -1.0, False))

    def run():
        outs = []
        for out, a, b, c, alpha, beta, mirror in cases:
            out = out.clone()
            OPS.syrk_(out, a, b, c, alpha, beta, mirror)
            outs.append(out)
        cov = cases[0][0].clone()
        OPS.cov_downdate_(cov, cases[0][1] / 10)
        return outs + [cov]

    results = at_each_isa(run)
    if {"avx512", "avx2"} <= results.keys():  # the switch reaches the kernel: its own rounding, not ATen's
        assert not all(torch.equal(a, b) for a, b in zip(results["avx512"], results["avx2"]))
    if {"avx2", "baseline"} <= results.keys():  # both levels run ATen's GEMMs: the same code, the same bits
        assert all(torch.equal(a, b) for a, b in zip(results["avx2"], results["baseline"]))
    reference = results.pop(next(iter(results)))
    for outs in results.values():
        for got, want, case in zip(outs, reference, cases + [cases[0]]):
            upper = torch.ones(want.shape, dtype=torch.bool).triu()
            close(got[upper], want[upper].double(), dtype)
            if case[-1]:
                assert torch.equal(got, got.T)
            else:
                assert torch.equal(got[~upper], torch.full_like(got[~upper], 3.0))


@needs_ext
def test_non_contiguous_a_and_strided_out(isa):
    a = torch.randn(40, 9).T  # (9, 40) view with strides (1, 9)
    big = torch.zeros(40, 50)
    out = big[:, 5:45]  # row-major with stride 50
    OPS.syrk_(out, a, None, None, 1.0, 0.0, True)
    close(out, a.double().T @ a.double(), torch.float32)
    assert torch.equal(big[:, :5], torch.zeros(40, 5))


@needs_ext
@pytest.mark.parametrize(
    "args,match",
    [
        (lambda: (torch.zeros(3, 3), torch.zeros(3), None, None, 1.0, 0.0, True), "a must be 2-D"),
        (lambda: (torch.zeros(4, 4), torch.zeros(2, 3), None, None, 1.0, 0.0, True), r"out must be \(3, 3\)"),
        (lambda: (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3), None, None, 1.0, 0.0, True), "out dtype"),
        (
            lambda: (torch.zeros(3, 3), torch.zeros(2, 3), torch.zeros(2, 4), None, 1.0, 0.0, True),
            "b must have a's shape",
        ),
        (
            lambda: (torch.zeros(3, 3), torch.zeros(2, 3), None, torch.zeros(2, 2), 1.0, 1.0, True),
            r"c must be \(3, 3\)",
        ),
        (
            lambda: (
                torch.zeros(3, 3, dtype=torch.int64),
                torch.zeros(2, 3, dtype=torch.int64),
                None,
                None,
                1.0,
                0.0,
                True,
            ),
            "float32 or float64",
        ),
    ],
    ids=["a_1d", "out_shape", "dtype_mismatch", "b_shape", "c_shape", "int"],
)
def test_syrk_bad_input_names_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        OPS.syrk_(*args())


@needs_ext
def test_syrk_opcheck():
    a = torch.randn(6, 20)
    c = torch.randn(20, 20)
    c = c + c.T
    samples = [
        (torch.zeros(20, 20), a, None, None, 1.0, 0.0, True),
        (torch.zeros(20, 20), a, None, c, -1.0, 0.5, False),
        (c.clone(), a, 2 * a, None, 1.0, 1.0, True),
    ]
    for args in samples:
        torch.library.opcheck(OPS.syrk_.default, args)


@needs_ext
def test_not_differentiable_with_a_clear_error():
    a = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="posteriors_fast::syrk_ is not differentiable"):
        OPS.syrk_(torch.zeros(4, 4), a, None, None, 1.0, 0.0, True)
    with torch.no_grad():  # allowed without grad mode
        OPS.syrk_(torch.zeros(4, 4), a, None, None, 1.0, 0.0, True)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dispatch_cpp_equals_eager(dtype):
    a = torch.randn(30, 700, dtype=dtype)
    c = _sym(700, dtype, torch.Generator().manual_seed(0))
    fast = syrk.syrk_(torch.empty_like(c), a, None, c, 0.3, 1.0, backend="compiled:cpp")
    slow = syrk.syrk_(torch.empty_like(c), a, None, c, 0.3, 1.0, backend="eager")
    close(fast, slow.double(), dtype)


@needs_ext
def test_dispatch_falls_back_for_arguments_the_kernel_does_not_take():
    a = torch.randn(3, 5, dtype=torch.complex64)
    out = torch.zeros(5, 5, dtype=torch.complex64)
    syrk.syrk_(out, a, None, None, 1.0, 0.0, backend="compiled")  # complex: eager path
    torch.testing.assert_close(out.triu(), (a.mT @ a).triu())
    a = torch.randn(3, 5, requires_grad=True)  # autograd: eager path, differentiable
    g = syrk.gram(a, 1.0, backend="compiled")
    g.sum().backward()
    # d/da Σ_ij (aᵀa)_ij = a·(1 + 1ᵀ) = 2 a 1 1ᵀ: each entry twice its row sum.
    torch.testing.assert_close(a.grad, 2 * a.detach().sum(1, keepdim=True).expand(3, 5))


# ---- the eager tiles


@pytest.fixture(params=[1024, 7], ids=["block=1024", "block=7"])
def block(request, monkeypatch):
    # A small block exercises the tiling (P not a multiple of the block) cheaply.
    monkeypatch.setattr(syrk, "BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("k, p", [(1, 1), (1, 23), (5, 23), (40, 16), (3, 50)])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-1.0, 1.0), (0.25, 2.0)])
def test_syrk_matches_oracle(backend, dtype, block, k, p, alpha, beta):
    g = torch.Generator().manual_seed(k * 100 + p)
    a = torch.randn(k, p, generator=g, dtype=dtype)
    base = torch.randn(p, p, generator=g, dtype=dtype)
    base = base + base.T
    out = base.clone() if beta != 0 else torch.full((p, p), float("nan"), dtype=dtype)
    want = (beta * base.double() if beta != 0 else 0) + alpha * a.double().T @ a.double()
    got = syrk.syrk_(out, a, None, None, alpha, beta, backend=backend)
    assert got is out
    torch.testing.assert_close(got, want.to(dtype), **tol(dtype, "op"))
    assert torch.equal(got, got.T)


def test_gram_non_contiguous_input(backend, block):
    a = torch.randn(30, 9, dtype=torch.float64).T  # (9, 30), non-contiguous
    got = syrk.gram(a, 0.5, backend=backend)
    torch.testing.assert_close(got, 0.5 * a.T @ a)
    assert torch.equal(got, got.T)


def test_gram_with_symmetric_product(backend, block):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 20, generator=g, dtype=torch.float64)
    h = torch.randn(12, 12, generator=g, dtype=torch.float64)
    h = h + h.T
    got = syrk.gram(a, 2.0, h @ a, backend=backend)
    torch.testing.assert_close(got, 2.0 * a.T @ h @ a)
    assert torch.equal(got, got.T)


def _spd(p, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, p, generator=g, dtype=torch.float64)
    return a @ a.T / p + 0.3 * torch.eye(p, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 9),
    size=st.integers(1, 40),
    block=st.integers(1, 17),
    alpha=st.floats(-2.0, 2.0),
    beta=st.sampled_from([0.0, 1.0, -0.5]),
    seed=st.integers(0, 2**16),
)
def test_syrk_any_tiling(k, size, block, alpha, beta, seed):
    original = syrk.BLOCK
    syrk.BLOCK = block
    try:
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(k, size, generator=g, dtype=torch.float64)
        c = _spd(size, seed)
        out = torch.empty(size, size, dtype=torch.float64)
        got = syrk.syrk_(out, a, None, c, alpha, beta, backend="eager")
        torch.testing.assert_close(got, beta * c + alpha * a.T @ a, rtol=1e-10, atol=1e-10)
        assert torch.equal(got, got.T)
    finally:
        syrk.BLOCK = original
