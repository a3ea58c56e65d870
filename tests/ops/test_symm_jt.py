"""symm_jt (S·Jᵀ for a symmetric S): each backend and the C++ kernel at every
ISA level (the AVX-512 micro-kernel at avx512, the ATen GEMM that CPUs without
AVX-512 run at avx2 and baseline) against a float64 oracle and each other;
opcheck, no-autograd guard, bad input, dispatch."""

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import symm_jt
from tests.ops._native import at_each_isa, close, needs_ext

OPS = _library.OPS
# P around the 6-row blocks and the 256-term partial sums; R below 4 (ATen's
# GEMV), at each tile width (1 to 4 vectors: 16 to 64 float32 columns, 8 to
# 32 float64) and around the widest panels.
SHAPES = [
    (1, 1),
    (60, 3),
    (37, 5),
    (150, 17),
    (200, 24),
    (120, 33),
    (97, 65),
    (241, 64),
    (257, 40),
    (300, 129),
    (513, 9),
    (1100, 64),
]


def _inputs(p, r, dtype, seed, j_layout="rows"):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(p, p, dtype=torch.float64, generator=gen)
    s = (m + m.T).to(dtype)
    if j_layout == "rows":
        j = torch.randn(r, p, dtype=dtype, generator=gen)
    else:  # (R, P) view of a (P, R) tensor: column-major
        j = torch.randn(p, r, dtype=dtype, generator=gen).T
    return s, j


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("p,r", SHAPES)
@pytest.mark.parametrize("j_layout", ["rows", "columns"])
def test_kernel_matches_float64_oracle(dtype, p, r, j_layout, isa):
    s, j = _inputs(p, r, dtype, p * 100 + r, j_layout)
    out = OPS.symm_jt(s, j)
    assert out.shape == (p, r) and out.dtype == dtype and out.is_contiguous()
    close(out, s.double() @ j.double().T, dtype)


@needs_ext
def test_s_that_is_not_row_major_takes_the_aten_path(isa):
    s, j = _inputs(50, 7, torch.float32, 1)
    s_t = s.T.contiguous().T  # same values (symmetric), column-major storage
    close(OPS.symm_jt(s_t, j), s.double() @ j.double().T, torch.float32)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_s_with_padded_rows(dtype, isa):
    """S a row-major view whose rows are further apart than P (a block of a
    larger matrix): the kernel follows its row stride."""
    s, j = _inputs(203, 20, dtype, 5)
    big = torch.full((203, 211), float("nan"), dtype=dtype)
    big[:, 3:206] = s
    view = big[:, 3:206]
    assert view.stride() == (211, 1)
    close(OPS.symm_jt(view, j), s.double() @ j.double().T, dtype)


@needs_ext
def test_empty_shapes():
    assert OPS.symm_jt(torch.zeros(4, 4), torch.zeros(0, 4)).shape == (4, 0)
    assert OPS.symm_jt(torch.zeros(0, 0), torch.zeros(3, 0)).shape == (0, 3)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_isa_levels_agree_with_each_other(dtype):
    cases = [
        _inputs(p, r, dtype, 7, layout) for p, r in [(97, 65), (300, 129), (1100, 64)] for layout in ("rows", "columns")
    ]
    results = at_each_isa(lambda: [OPS.symm_jt(s, j) for s, j in cases])
    if {"avx512", "avx2"} <= results.keys():  # the switch reaches the kernel: its own rounding, not ATen's
        assert not all(torch.equal(a, b) for a, b in zip(results["avx512"], results["avx2"]))
    if {"avx2", "baseline"} <= results.keys():  # both levels run ATen's GEMMs: the same code, the same bits
        assert all(torch.equal(a, b) for a, b in zip(results["avx2"], results["baseline"]))
    reference = results.pop(next(iter(results)))
    for outs in results.values():
        for got, want in zip(outs, reference):
            close(got, want.double(), dtype)


@needs_ext
@pytest.mark.parametrize(
    "args,match",
    [
        (lambda: (torch.zeros(3, 3), torch.zeros(3)), "j must be 2-D"),
        (lambda: (torch.zeros(3, 4), torch.zeros(2, 3)), r"s must be \(3, 3\)"),
        (lambda: (torch.zeros(3, 3, dtype=torch.float64), torch.zeros(2, 3)), "j dtype"),
        (lambda: (torch.zeros(3, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.int64)), "float32 or float64"),
    ],
    ids=["j_1d", "s_shape", "dtype_mismatch", "int"],
)
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(RuntimeError, match=match):
        OPS.symm_jt(*args())


@needs_ext
def test_opcheck_and_no_autograd():
    s, j = _inputs(20, 6, torch.float32, 2)
    torch.library.opcheck(OPS.symm_jt.default, (s, j))
    with pytest.raises(RuntimeError, match="posteriors_fast::symm_jt is not differentiable"):
        OPS.symm_jt(s, j.requires_grad_())


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_dispatch_matches_oracle(backend, dtype):
    s, j = _inputs(130, 64, dtype, 3)
    close(symm_jt.symm_jt(s, j, backend=backend), s.double() @ j.double().T, dtype)


def test_dispatch_falls_back_for_arguments_the_kernel_does_not_take():
    s, j = _inputs(9, 2, torch.float32, 4)
    j = j.requires_grad_()
    y = symm_jt.symm_jt(s, j, backend="compiled")  # autograd: eager torch, differentiable
    y.sum().backward()
    # d/dJ Σ_pr (S Jᵀ)_pr = (1ᵀ S)ᵀ broadcast over J's rows.
    torch.testing.assert_close(j.grad, s.sum(0).expand(2, 9))
    s_c, j_c = s.to(torch.complex64), j.detach().to(torch.complex64)
    torch.testing.assert_close(symm_jt.symm_jt(s_c, j_c, backend="compiled"), s_c @ j_c.mT)
