"""The native-kernel dispatch as a user meets it: explicit kernel families,
the pure-torch fallback in a fresh process with triton and the extension
blocked, and the custom ops inside ``torch.compile(fullgraph=True)``."""

import subprocess
import sys
import textwrap

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast import _library, backends
from tests.ops._native import needs_ext


def test_explicit_unavailable_family_says_what_to_install():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton family may be available")
    with pytest.raises(backends.BackendUnavailableError, match="triton|CUDA"):
        pf.set_backend("compiled:triton")
    with pytest.raises(backends.BackendUnavailableError, match="compiled:triton"):
        pf.ekf.dense_fisher.build(lambda p, b: (p.sum(), p), 0.1, backend="compiled:triton")
    assert pf.get_backend() == "eager"


@needs_ext
def test_explicit_cpp_family_runs_cpp_where_it_exists_and_eager_elsewhere():
    assert backends.report("syrk", "compiled:cpp", "cpu")[0] == "cpp"
    assert backends.report("ggn_diag", "compiled:cpp", "cpu")[0] == "eager"
    assert backends.report("syrk", "compiled:cpp", "cuda")[0] == "eager"


def test_fresh_process_without_triton_or_extension_runs_pure_torch():
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.util, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton.") or name == "posteriors_fast._C":
                    raise ImportError("blocked for the test: " + name)

        sys.meta_path.insert(0, Block())
        import torch
        import posteriors_fast as pf
        from posteriors_fast import backends

        print("CPP", backends.report("syrk", "compiled", "cpu"))
        print("TRITON", backends.report("syrk", "compiled", "cuda"))
        try:
            pf.set_backend("compiled:cpp")
        except backends.BackendUnavailableError as exc:
            print("ERR", exc)

        torch.manual_seed(0)
        x = torch.randn(40, 6)
        y = x @ torch.randn(6)

        def log_lik(params, batch):
            xb, yb = batch
            return -((xb @ params - yb) ** 2), params

        results = {}
        for backend in ("eager", "compiled"):
            t = pf.ekf.dense_fisher.build(log_lik, lr=0.5, per_sample=True, backend=backend)
            s = t.init(torch.zeros(6))
            for i in range(3):
                s = t.update(s, (x[i::3], y[i::3]))
            results[backend] = s
        same = all(
            torch.equal(getattr(results["eager"], k), getattr(results["compiled"], k)) for k in ("params", "cov")
        )
        print("SAME", same)
        print("TRITON_IMPORTED", "triton" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert (
        "CPP ('eager', 'fell back to eager torch (triton: not for cpu; cpp: C++ extension posteriors_fast._C not loaded"
        in text
    )
    assert "TRITON ('eager'" in text and "triton is not installed" in text
    assert "ERR backend='compiled:cpp' was requested" in text and "--no-build-isolation" in text
    assert "SAME True" in text
    assert "TRITON_IMPORTED False" in text


@needs_ext
def test_custom_ops_compose_with_torch_compile_fullgraph_without_recompiling():
    ops = _library.OPS

    def step(cov, w, a, x, r, p, ap, gamma):
        out = torch.empty_like(cov)
        ops.syrk_(out, a, None, cov, 1.0, 1.0, True)
        ops.cov_downdate_(out, w)
        gamma_new = ops.cg_step_(x, r, p, ap, gamma, 0.0)
        noise = torch.empty_like(x)
        ops.normal_(noise, 7)
        return out * 2, gamma_new + 1, noise + 1

    def inputs(p_size):
        gen = torch.Generator().manual_seed(p_size)
        cov = torch.eye(p_size)
        w = 0.1 * torch.randn(3, p_size, generator=gen)
        a = torch.randn(4, p_size, generator=gen)
        vecs = [torch.randn(p_size, generator=gen) for _ in range(3)]
        ap = vecs[2].abs() + 1
        return [cov, w, a, vecs[0], vecs[1], vecs[1].clone(), ap, vecs[1].dot(vecs[1])]

    compiled = torch.compile(step, fullgraph=True)
    eager_in, compiled_in = inputs(37), inputs(37)
    expected = step(*eager_in)
    got = compiled(*compiled_in)
    for e, g in zip(expected + tuple(eager_in[3:6]), got + tuple(compiled_in[3:6])):
        torch.testing.assert_close(g, e)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(*inputs(37))  # same shapes: no recompilation


def test_setup_skips_the_extension_when_asked(tmp_path):
    """POSTERIORS_FAST_BUILD_EXT=0: setup.py configures a pure-Python build and
    says so (checked without building anything: `setup.py --name`)."""
    import os
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ, POSTERIORS_FAST_BUILD_EXT="0")
    out = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "POSTERIORS_FAST_BUILD_EXT=0: skipping the C++ extension" in out.stderr


def test_triton_kernels_are_imported_only_where_they_run():
    """On the CPU the compiled backend never imports the Triton kernel modules
    (torch itself may import triton when torch._dynamo loads; we do not)."""
    script = (
        "import sys, torch, posteriors_fast as pf\n"
        "x = torch.randn(40)\n"
        "pf.cg(lambda v: 2 * v, x, backend='compiled')\n"
        "pf.empirical_fisher(lambda p: p ** 2, backend='compiled')(torch.ones(3))\n"
        "print(any(m.startswith('posteriors_fast.kernels.triton.') for m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@needs_ext
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_every_mutating_op_advances_the_version_of_what_it_writes(mode):
    """As torch's in-place ops do, in every grad mode: caches keyed on
    (tensor, version) and autograd's saved-tensor checks see the write."""
    ops = _library.OPS
    a = torch.randn(6, 9)
    out = torch.zeros(9, 9)
    cov = torch.eye(9)
    noise = torch.empty(100)
    x, r = torch.zeros(20), torch.randn(20)
    p = r.clone()
    gamma = torch.dot(r, r)
    tensors = (out, cov, noise, x, r, p)
    before = [t._version for t in tensors]
    context = {"grad": torch.enable_grad(), "no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}[mode]
    with context:
        ops.syrk_(out, a, None, None, 1.0, 0.0, True)
        ops.cov_downdate_(cov, a / 10)
        ops.normal_(noise, 7)
        ops.cg_step_(x, r, p, 2 * p, gamma, 0.0)
    assert all(t._version > v for t, v in zip(tensors, before))
    assert a._version == 0 and gamma._version == 0  # arguments only read keep theirs


@needs_ext
def test_autograd_sees_a_native_write_into_a_saved_tensor():
    w = torch.randn(9, 9, requires_grad=True)
    cov = torch.eye(9)
    y = (w * cov).sum()  # saves cov for the backward pass
    _library.OPS.cov_downdate_(cov, torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
