"""Backend selection: names, global default, context manager, environment
variable, per-call keyword, and explain()."""

import subprocess
import sys

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast import _library, backends
from posteriors_fast.backends import selection

HOT_OPS = {
    "syrk",
    "symm_jt",
    "cov_downdate",
    "lowrank_truncate",
    "lowrank_update",
    "ggn_diag",
    "jsjt",
    "cg_step",
    "normal",
    "sghmc_step",
    "sample_jacobian",
    "separable_jacobian",
    "value_grad",
    "new_matrix",
}


@pytest.fixture(autouse=True)
def clean_default(monkeypatch):
    monkeypatch.setattr(selection, "_global_default", None)
    monkeypatch.delenv(selection.ENV_VAR, raising=False)


def test_default_is_eager():
    assert pf.get_backend() == "eager"


def test_set_backend_and_context_manager():
    pf.set_backend("compiled")
    assert pf.get_backend() == "compiled"
    with pf.use_backend("eager"):
        assert pf.get_backend() == "eager"
        with pf.use_backend("compiled"):
            assert pf.get_backend() == "compiled"
        assert pf.get_backend() == "eager"
    assert pf.get_backend() == "compiled"


def test_context_manager_restores_on_error():
    with pytest.raises(KeyError):
        with pf.use_backend("compiled"):
            raise KeyError("boom")
    assert pf.get_backend() == "eager"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("POSTERIORS_FAST_BACKEND", "compiled")
    assert pf.get_backend() == "compiled"
    pf.set_backend("eager")  # an explicit setting wins over the environment
    assert pf.get_backend() == "eager"


def test_environment_variable_in_fresh_process():
    code = "import posteriors_fast as p; print(p.get_backend())"
    env = {"POSTERIORS_FAST_BACKEND": "compiled", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "compiled"


@pytest.mark.parametrize("bad", ["triton!", "", "EAGER", 3])
def test_unknown_names_raise_listing_valid_ones(bad):
    with pytest.raises(ValueError, match=r"valid names are 'eager', 'compiled'"):
        pf.set_backend(bad)
    with pytest.raises(ValueError, match=r"backend="):
        pf.empirical_fisher(lambda p: p, backend=bad)
    with pytest.raises(ValueError, match=r"backend="):
        pf.ekf.dense_fisher.build(lambda p, b: (p, p), 0.1, backend=bad)


def test_bad_environment_variable_names_it(monkeypatch):
    monkeypatch.setenv("POSTERIORS_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="POSTERIORS_FAST_BACKEND='gpu'.*valid names"):
        pf.get_backend()


def test_backend_none_uses_current_default():
    assert backends.resolve(None) == "eager"
    with pf.use_backend("compiled"):
        assert backends.resolve(None) == "compiled"
        assert backends.resolve("eager") == "eager"


def test_explain_lists_every_hot_op_for_both_backends():
    text = backends.explain(device="cpu")
    for op in HOT_OPS:
        assert f"  {op}:" in text
    assert text.count("backend='eager'") == len(HOT_OPS)
    assert text.count("backend='compiled'") == len(HOT_OPS)
    # On the CPU the compiled policy picks the C++ kernels when the extension
    # loaded, and says why it fell back otherwise.
    family, reason = backends.report("syrk", "compiled", "cpu")
    if _library.load_extension()[0]:
        assert family == "cpp" and "best available" in reason
    else:
        assert family == "eager" and "cpp: C++ extension posteriors_fast._C not loaded" in reason


def test_compiled_policy_prefers_an_available_family_and_skips_unavailable():
    from posteriors_fast.backends import registry

    calls = []
    try:
        backends.register("_probe", "eager", lambda: calls.append("eager"), doc="test op")
        backends.register(
            "_probe",
            "cpp",
            lambda: calls.append("cpp"),
            devices=("cpu",),
            available=lambda device: (False, "extension not built"),
        )
        assert backends.report("_probe", "compiled", "cpu") == (
            "eager",
            "fell back to eager torch (triton: not implemented for this op; cpp: "
            "extension not built; torch_compile: not implemented for this op)",
        )
        backends.register("_probe", "torch_compile", lambda: calls.append("tc"))
        backends.implementation("_probe", "compiled", "cpu")()
        backends.implementation("_probe", "eager", "cpu")()
        assert calls == ["tc", "eager"]
    finally:
        registry._OPS.pop("_probe", None)
        for key in [k for k in registry._CACHE if k[0] == "_probe"]:
            del registry._CACHE[key]


@pytest.mark.parametrize(
    "call",
    [
        lambda b: pf.empirical_fisher(lambda p: p**2, backend=b)(torch.ones(3)),
        lambda b: pf.ggn(lambda p: p[None] * 2, lambda z: (z**2).sum(), backend=b)(torch.ones(3)),
        lambda b: pf.diag_ggn(lambda p: p[None] * 2, lambda z: (z**2).sum(), backend=b)(torch.ones(3)),
        lambda b: pf.cg(lambda x: 2 * x, torch.ones(3), backend=b)[0],
    ],
    ids=["empirical_fisher", "ggn", "diag_ggn", "cg"],
)
def test_hot_utils_take_backend_and_backends_agree(call):
    torch.testing.assert_close(call("compiled"), call("eager"))


def test_products_take_backend_and_equal_torch_func(monkeypatch):
    """hvp, fvp and ggnvp have no hot op (explain() lists them): every backend
    gives the torch.func products."""
    x, v = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.3, -0.7])
    for b in ("eager", "compiled"):
        torch.testing.assert_close(
            pf.hvp(lambda p: (p**3).sum(), (x,), (v,), backend=b)[1],
            torch.func.jvp(torch.func.grad(lambda p: (p**3).sum()), (x,), (v,))[1],
        )
        jv = torch.func.jvp(lambda p: p**2, (x,), (v,))[1]
        torch.testing.assert_close(
            pf.fvp(lambda p: p**2, (x,), (v,), backend=b)[1], torch.func.vjp(lambda p: p**2, x)[1](jv)[0]
        )
        torch.testing.assert_close(pf.ggnvp(lambda p: p * 2, lambda z: (z**2).sum(), (x,), (v,), backend=b)[1], 8 * v)
    with pytest.raises(ValueError, match="backend="):
        pf.hvp(lambda p: (p**3).sum(), (x,), (v,), backend="gpu")


def _fresh_probe_op(name, cpp_ok):
    from posteriors_fast.backends import registry

    backends.register(name, "eager", lambda: "eager", doc="test op")
    backends.register(
        name,
        "cpp",
        lambda: "cpp",
        devices=("cpu",),
        available=lambda device: (cpp_ok, "" if cpp_ok else "extension not built"),
    )
    return registry


def test_first_fallback_of_an_op_warns_once_and_a_declined_op_never(caplog):
    registry = _fresh_probe_op("_probe_warn", cpp_ok=False)
    backends.register("_probe_declined", "eager", lambda: "eager", doc="test op")
    for family in ("triton", "cpp", "torch_compile"):
        backends.decline("_probe_declined", family, "one GEMM already")
    try:
        with caplog.at_level("WARNING", logger="posteriors_fast"):
            for _ in range(3):
                assert backends.implementation("_probe_warn", "compiled", "cpu")() == "eager"
                assert backends.implementation("_probe_declined", "compiled", "cpu")() == "eager"
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "_probe_warn on cpu under backend='compiled'" in warnings[0].getMessage()
        assert "extension not built" in warnings[0].getMessage()
    finally:
        for op in ("_probe_warn", "_probe_declined"):
            registry._OPS.pop(op, None)
            for key in [k for k in registry._CACHE if k[0] == op]:
                del registry._CACHE[key]


def test_torch_compile_on_cuda_needs_triton(monkeypatch):
    from posteriors_fast.backends import families

    monkeypatch.setattr(families, "_triton_importable", lambda: False)
    family, reason = backends.report("cg_step", "compiled", "cuda")
    assert family == "eager"
    assert "torch.compile on CUDA generates Triton kernels, and triton is not installed" in reason
    assert backends.report("ggn_diag", "compiled", "cuda")[0] == "eager"
    # The CPU is unaffected: Inductor's CPU code needs a C++ compiler, not triton.
    assert backends.report("ggn_diag", "compiled", "cpu")[0] == "torch_compile"


def test_failing_compile_falls_back_with_one_warning(monkeypatch, caplog, compile_after):
    compile_after(1)
    from posteriors_fast.backends.compile_policy import GuardedCompile
    from posteriors_fast.ops import ggn_diag

    def broken_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError("backend compiler failed: no triton\nmore")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    guarded = GuardedCompile(ggn_diag.ggn_diag_eager, "the GGN diagonal", dynamic=True)
    monkeypatch.setattr(ggn_diag, "_compiled", guarded)
    monkeypatch.setattr(ggn_diag, "COMPILE_MIN_NUMEL", 0)
    jac, hj = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="posteriors_fast"):
        for _ in range(3):
            torch.testing.assert_close(ggn_diag.ggn_diag_torch_compile(jac, hj), (jac * hj).sum(0))
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert messages == [
        "posteriors_fast: torch.compile of the GGN diagonal failed (RuntimeError: "
        "backend compiler failed: no triton); running it eagerly, and not compiling it again with these "
        "versions (remembered in this process; posteriors_fast.backends.compile_policy.forget() tries again)"
    ]


def test_explain_says_which_functions_ignore_backend_and_what_is_unmeasured_on_cuda(monkeypatch):
    text = backends.explain(device="cpu")
    for name in (
        "utils.hvp",
        "utils.fvp",
        "utils.ggnvp",
        "vi.diag",
        "vi.dense",
        "optim",
        "torchopt",
        "laplace.dense_hessian",
    ):
        assert f"  {name}: " in text.split("functions whose backend= selects nothing")[1]
    from posteriors_fast.backends import registry

    for op in ("syrk", "cov_downdate", "cg_step"):  # as if triton and a GPU were here
        monkeypatch.setattr(registry._OPS[op].impls["triton"], "available", lambda device: (True, ""))
        family, reason = backends.report(op, "compiled", "cuda")
        assert family == "triton" and "unmeasured" in reason
