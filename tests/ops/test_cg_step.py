"""``cg_step``: every family's step against the formulas in float64 (the C++
kernel at every ISA level, and the levels against each other), opcheck, and
the CG loop of every family against the general loop."""

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast import _library
from posteriors_fast.ops import cg_step
from tests._compare import assert_close_to_oracle
from tests.ops._native import at_each_isa, needs_ext

OPS = _library.OPS
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _oracle(x, r, p, ap, gamma, damping):
    x, r, p, ap = (t.double().clone() for t in (x, r, p, ap))
    alpha = gamma.double() / (p @ ap + damping * p @ p)
    x += alpha * p
    r -= alpha * (ap + damping * p)
    gamma_new = r @ r
    p = r + gamma_new / gamma.double() * p
    return x, r, p, gamma_new


def _inputs(dtype, size):
    gen = torch.Generator().manual_seed(size)
    x, r, ap = (torch.randn(size, dtype=dtype, generator=gen) for _ in range(3))
    p = r + 0.1 * torch.randn(size, dtype=dtype, generator=gen)
    ap = ap.abs() + p  # keep p·ap away from zero
    return x, r, p, ap, torch.dot(r, r)


def _check_step(step, dtype, size, damping):
    x, r, p, ap, gamma = _inputs(dtype, size)
    ex, er, ep, eg = _oracle(x, r, p, ap, gamma, damping)
    got = step(x, r, p, ap, gamma, damping)
    assert got.shape == () and got.dtype == dtype
    for actual, expected in ((x, ex), (r, er), (p, ep), (got, eg)):
        assert_close_to_oracle(actual, expected, dtype)


# Ragged against every vector width (2-16 lanes) and the 1024-element blocks;
# 70_001 spans several parallel chunks (65_536 each).
SIZES = pytest.mark.parametrize("size", [1, 7, 1025, 70_001])
DAMPING = pytest.mark.parametrize("damping", [0.0, 0.3])


@needs_ext
@DTYPES
@SIZES
@DAMPING
def test_cpp_step_at_each_isa_level_matches_float64_formulas(dtype, size, damping, isa):
    _check_step(cg_step.cg_step_cpp, dtype, size, damping)


@DTYPES
@SIZES
@DAMPING
def test_eager_step_matches_float64_formulas(dtype, size, damping):
    _check_step(cg_step.cg_step_eager, dtype, size, damping)


@DTYPES
@pytest.mark.parametrize("size", [1025, 70_001])  # tiny sizes are specialised: more graphs for nothing
@DAMPING
def test_compiled_step_matches_float64_formulas(dtype, size, damping):
    _check_step(cg_step.cg_step_torch_compile, dtype, size, damping)


@needs_ext
@DTYPES
def test_isa_levels_agree_with_each_other(dtype):
    """Same inputs at every ISA level this CPU has: x, r, p and r·r within the
    oracle tolerance of each other (not bit for bit: the vector width orders
    the sums of the dot products, and avx2/avx512 contract to FMAs)."""
    inputs = _inputs(dtype, 70_001)

    def run():
        x, r, p, ap, gamma = (t.clone() for t in inputs)
        rr = OPS.cg_step_(x, r, p, ap, gamma, 0.3)
        # A second step from the first one's state: differences do not grow.
        rr2 = OPS.cg_step_(x, r, p, ap, rr.clone(), 0.3)
        return x, r, p, rr, rr2

    results = at_each_isa(run)
    if dtype == torch.float64 and len(results) > 1:
        # The switch reaches the loops: each level sums in its own order (and
        # baseline without FMAs), so after two steps no two levels agree bit for bit.
        xs = [outs[0] for outs in results.values()]
        assert not any(torch.equal(a, b) for i, a in enumerate(xs) for b in xs[i + 1 :])
    reference = results.pop(next(iter(results)))
    for outs in results.values():
        for got, want in zip(outs, reference):
            assert_close_to_oracle(got, want.double(), dtype)


@needs_ext
def test_cpp_step_opcheck_and_bad_input():
    x, r, p, ap = (torch.randn(33) for _ in range(4))
    torch.library.opcheck(OPS.cg_step_.default, (x, r, p, ap, torch.dot(r, r), 0.1))
    with pytest.raises(RuntimeError, match="ap must have x's shape"):
        OPS.cg_step_(x, r, p, torch.randn(32), torch.dot(r, r), 0.0)
    with pytest.raises(RuntimeError, match="r must have x's dtype"):
        OPS.cg_step_(x, r.double(), p, ap, torch.dot(r, r), 0.0)
    with pytest.raises(RuntimeError, match="p must be a contiguous CPU tensor"):
        OPS.cg_step_(x, r, torch.randn(66)[::2], ap, torch.dot(r, r), 0.0)
    with pytest.raises(RuntimeError, match="cg_step_ is not differentiable"):
        OPS.cg_step_(x, r, p, ap.requires_grad_(), torch.dot(r, r), 0.0)


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled:cpp", marks=needs_ext)])
@DTYPES
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_fused_loop_agrees_with_general_loop(backend, dtype, damping):
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(60, 60, dtype=torch.float64, generator=gen)
    a = (m @ m.T / 60 + torch.eye(60, dtype=torch.float64)).to(dtype)
    b = torch.randn(60, dtype=dtype, generator=gen)
    x0 = torch.randn(60, dtype=dtype, generator=gen)
    args = (lambda v: a @ v, b, x0, 25, damping, 1e-5, 0.0, None)
    x_g, info_g = cg_step._solve_general(*args)
    x_f, info_f = cg_step.solve(*args, backend=backend)
    assert_close_to_oracle(x_f, x_g.double(), dtype)
    assert info_f["niter"] == info_g["niter"]
    assert info_f["converged"].shape == info_g["converged"].shape == (1,)
    assert torch.equal(x0, args[2])  # x0 not written


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_cg_is_differentiable_and_handles_what_cannot_fuse(backend):
    # As in posteriors 0.0.5, gradients flow through the solve.
    b = torch.randn(5, requires_grad=True)
    x, _ = pf.cg(lambda v: 3 * v, b, backend=backend)
    x.sum().backward()  # autograd through b: the general loop
    torch.testing.assert_close(b.grad, torch.full((5,), 1 / 3))
    bc = torch.randn(4, dtype=torch.complex128)
    xc, _ = pf.cg(lambda v: 2 * v, bc, backend=backend)
    torch.testing.assert_close(xc, bc / 2)


def test_compiled_step_does_not_recompile_for_new_sizes():
    """The torch.compile family compiles one dynamic-shape graph: a second
    step, and a step of another size, reuse it."""

    def run(n):
        gen = torch.Generator().manual_seed(n)
        x, r, p = (torch.randn(n, generator=gen) for _ in range(3))
        ap = 2.0 * p
        return cg_step.cg_step_torch_compile(x, r, p, ap, torch.dot(r, r), 0.25)

    run(50)
    run(51)  # sizes become dynamic here at the latest
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = run(51)
        run(77)
    gen = torch.Generator().manual_seed(51)
    x, r, p = (torch.randn(51, generator=gen) for _ in range(3))
    torch.testing.assert_close(got, cg_step.cg_step_eager(x, r, p, 2.0 * p, torch.dot(r, r), 0.25))
