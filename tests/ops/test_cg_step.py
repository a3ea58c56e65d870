"""``cg_step``: every family's step against the formulas in float64, opcheck,
and the CG loop of every family against the general loop."""

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast import _library
from posteriors_fast.ops import cg_step
from tests._compare import assert_close_to_oracle
from tests.ops._native import needs_ext

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


STEPS = [
    pytest.param(cg_step.cg_step_eager, id="eager"),
    pytest.param(cg_step.cg_step_cpp, marks=needs_ext, id="cpp"),
    pytest.param(cg_step.cg_step_torch_compile, id="torch_compile"),
]


@pytest.mark.parametrize("step", STEPS)
@DTYPES
@pytest.mark.parametrize("size", [1, 1000, 40_001])  # 40_001 spans several parallel chunks
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_step_matches_float64_formulas(step, dtype, size, damping):
    if step is cg_step.cg_step_torch_compile and size == 1:
        pytest.skip("torch.compile specialises size 1: one more graph per dtype and damping, for nothing")
    gen = torch.Generator().manual_seed(size)
    x, r, ap = (torch.randn(size, dtype=dtype, generator=gen) for _ in range(3))
    p = r + 0.1 * torch.randn(size, dtype=dtype, generator=gen)
    ap = ap.abs() + p  # keep p·ap away from zero
    gamma = torch.dot(r, r)
    ex, er, ep, eg = _oracle(x, r, p, ap, gamma, damping)
    got = step(x, r, p, ap, gamma, damping)
    assert got.shape == () and got.dtype == dtype
    for actual, expected in ((x, ex), (r, er), (p, ep), (got, eg)):
        assert_close_to_oracle(actual, expected, dtype)


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
