"""The Triton kernels compiled for a GPU, on CUDA tensors, against float64
oracles, and the dispatch of the compiled backend on CUDA end to end.

No machine of this project's CI has a GPU, so everything here skips there
(naming why); ``benchmarks/gpu_check.sh`` runs it on a CUDA machine, in a
process of its own (tests/kernels imports the same kernels interpreted).
"""

import importlib.util

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the compiled Triton kernels need one", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install 'posteriors_fast[triton]')", allow_module_level=True)

import posteriors_fast as pf  # noqa: E402
from posteriors_fast.kernels.triton import cg_step, cov_downdate, syrk  # noqa: E402,F401
from tests._compare import tol  # noqa: E402

syrk_op = torch.ops.posteriors_fast.syrk_triton
cov_downdate_op = torch.ops.posteriors_fast.cov_downdate_triton
cg_step_op = torch.ops.posteriors_fast.cg_step_triton
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
CUDA = torch.device("cuda")


def _oracle_close(actual, expected, dtype):
    # float32 dots in IEEE (no TF32): a few roundings per entry, like the CPU kernels.
    rtol = tol(dtype, "method")["rtol"]
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=rtol * scale)


def _sym(size, dtype, gen):
    m = torch.randn(size, size, dtype=torch.float64, generator=gen)
    return ((m + m.T) / 2).to(dtype)


@DTYPES
@pytest.mark.parametrize("shape", [(1, 1), (7, 70), (64, 257), (300, 1001)], ids=str)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_syrk_on_cuda_matches_float64_oracle(shape, dtype, beta):
    depth, size = shape
    gen = torch.Generator().manual_seed(size)
    a = torch.randn(depth, size, dtype=dtype, generator=gen)
    c = _sym(size, dtype, gen)
    h = _sym(depth, dtype, gen)
    for b in (None, h @ a):
        b64 = a.double() if b is None else b.double()
        want = a.double().T @ b64 * 0.5 + beta * c.double()
        out = torch.full((size, size), 123.0, dtype=dtype, device=CUDA)
        syrk_op(out, a.cuda(), None if b is None else b.cuda(), c.cuda(), 0.5, beta, True)
        _oracle_close(out, want, dtype)
        assert torch.equal(out, out.T)


@DTYPES
def test_cov_downdate_on_cuda_matches_float64_oracle(dtype):
    gen = torch.Generator().manual_seed(1)
    w = 0.1 * torch.randn(33, 517, dtype=dtype, generator=gen)
    cov = _sym(517, dtype, gen) + 4 * torch.eye(517, dtype=dtype)
    want = cov.double() - w.double().T @ w.double()
    got = cov.cuda()
    version = got._version
    cov_downdate_op(got, w.cuda())
    _oracle_close(got, want, dtype)
    assert torch.equal(got, got.T) and got._version > version


@DTYPES
@pytest.mark.parametrize("size", [1, 1025, 1 << 20])
def test_cg_step_on_cuda_matches_float64_formulas(dtype, size):
    gen = torch.Generator().manual_seed(size)
    x, r, ap = (torch.randn(size, dtype=dtype, generator=gen) for _ in range(3))
    p = r + 0.1 * torch.randn(size, dtype=dtype, generator=gen)
    ap = ap.abs() + p
    gamma = torch.dot(r, r)
    x64, r64, p64, ap64 = (t.double() for t in (x, r, p, ap))
    alpha = gamma.double() / (p64 @ ap64 + 0.3 * p64 @ p64)
    want_x = x64 + alpha * p64
    want_r = r64 - alpha * (ap64 + 0.3 * p64)
    want_gamma = want_r @ want_r
    want_p = want_r + want_gamma / gamma.double() * p64
    xc, rc, pc = x.cuda(), r.cuda(), p.cuda()
    got = cg_step_op(xc, rc, pc, ap.cuda(), gamma.cuda(), 0.3)
    for actual, expected in ((xc, want_x), (rc, want_r), (pc, want_p), (got, want_gamma)):
        _oracle_close(actual, expected, dtype)


def _opcheck_cases():
    a = torch.randn(7, 40, device=CUDA)
    h = _sym(7, torch.float32, torch.Generator().manual_seed(0)).cuda()
    size = 40
    return [
        (syrk_op, (torch.randn(size, size, device=CUDA), a, None, None, 1.0, 0.5, True)),
        (
            syrk_op,
            (
                torch.empty(size, size, device=CUDA),
                a,
                h @ a,
                _sym(size, torch.float32, torch.Generator()).cuda(),
                -1.0,
                1.0,
                False,
            ),
        ),
        (cov_downdate_op, (torch.eye(size, device=CUDA) * 4, 0.1 * torch.randn(3, size, device=CUDA))),
        (cg_step_op, (*(torch.randn(size, device=CUDA) for _ in range(4)), torch.tensor(2.0, device=CUDA), 0.3)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_opcheck_with_aot_dispatch(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_the_tensors_device_not_the_current_one():
    with torch.cuda.device(0):
        a = torch.randn(9, 70, device="cuda:1")
        out = torch.empty(70, 70, device="cuda:1")
        syrk_op(out, a, None, None, 1.0, 0.0, True)
        torch.cuda.synchronize(1)
    _oracle_close(out, a.double().T @ a.double(), torch.float32)


@pytest.mark.skipif(
    torch.cuda.get_device_properties(0).total_memory < 20 * 2**30,
    reason="needs a GPU with 20 GB: a (46400, 46400) float32 matrix is 8.6 GB",
)
def test_syrk_addresses_past_two_to_the_31_elements():
    size = 46_400  # row offsets size·row pass 2³¹ past row 46,283
    a = torch.zeros(1, size, device=CUDA)
    a[0, -3:] = torch.tensor([1.0, 2.0, 3.0], device=CUDA)
    out = torch.full((size, size), -1.0, device=CUDA)
    syrk_op(out, a, None, None, 1.0, 0.0, True)
    corner = out[-3:, -3:].cpu()
    torch.testing.assert_close(corner, torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0])))
    assert float(out[0, 0]) == 0.0 and float(out[-1, 0]) == 0.0
    del out


def _problem(dtype):
    g = torch.Generator().manual_seed(0)
    params = {
        "w": (0.3 * torch.randn(5, 40, generator=g, dtype=dtype)).cuda(),
        "v": (0.3 * torch.randn(40, 3, generator=g, dtype=dtype)).cuda(),
    }
    x = torch.randn(16, 5, generator=g, dtype=dtype).cuda()
    y = torch.randint(0, 3, (16,), generator=g).cuda()
    return params, (x, y)


def _ll(p, batch):
    x, y = batch
    z = torch.tanh(x @ p["w"]) @ p["v"]
    return -torch.nn.functional.cross_entropy(z, y), z


@DTYPES
@pytest.mark.parametrize("method", ["ekf.dense_fisher", "laplace.dense_fisher"])
def test_compiled_backend_on_cuda_equals_eager(method, dtype, compile_after):
    compile_after(1)
    params, batch = _problem(dtype)
    module = {"ekf.dense_fisher": pf.ekf.dense_fisher, "laplace.dense_fisher": pf.laplace.dense_fisher}[method]
    kwargs = dict(lr=0.3, init_cov=0.5) if method.startswith("ekf") else dict(init_prec=1.0)
    results = {}
    for backend in ("eager", "compiled"):
        transform = module.build(_ll, backend=backend, **kwargs)
        state = transform.init({k: v.clone() for k, v in params.items()})
        for _ in range(4):  # the policy's after=1 (fixture) compiles the Jacobian on the first
            state = transform.update(state, batch)
        results[backend] = state
        matrix = state.cov if method.startswith("ekf") else state.prec
        assert matrix.device.type == "cuda" and matrix.dtype == dtype
        assert torch.equal(matrix, matrix.T)
    a, b = results["compiled"], results["eager"]
    field = "cov" if method.startswith("ekf") else "prec"
    # Different summation orders (Triton tiles against cuBLAS): method tolerance.
    torch.testing.assert_close(getattr(a, field), getattr(b, field), **tol(dtype))


def test_cg_on_cuda_with_the_compiled_backend():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 300, generator=g, dtype=torch.float64)
    a = (m @ m.T / 300 + torch.eye(300, dtype=torch.float64)).cuda()
    b = torch.randn(300, generator=g, dtype=torch.float64).cuda()
    x, info = pf.cg(lambda v: a @ v, b, backend="compiled", tol=1e-10)
    assert bool(info["converged"])
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-7, atol=1e-8)


def test_explain_on_cuda_names_the_triton_kernels():
    text = pf.backends.explain(device="cuda", backend="compiled")
    for op in ("syrk", "cov_downdate", "cg_step"):
        block = text.split(f"  {op}:")[1].split("\n")[1]
        assert "triton" in block
