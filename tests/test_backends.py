"""Backend selection: names, global default, context manager, environment
variable, per-call keyword, and explain()."""

import subprocess
import sys

import pytest
import torch

import posteriors_fast as pf
from posteriors_fast import _library, backends
from posteriors_fast.backends import selection

HOT_OPS = {"syrk", "symm_jt", "cov_downdate", "lowrank_update", "ggn_diag", "jsjt", "cg_step", "normal", "sghmc_step", "sample_jacobian", "separable_jacobian", "value_grad", "new_matrix"}


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
    calls = []
    backends.register("_probe", "eager", lambda: calls.append("eager"), doc="test op")
    backends.register("_probe", "cpp", lambda: calls.append("cpp"), devices=("cpu",),
                      available=lambda: (False, "extension not built"))
    assert backends.report("_probe", "compiled", "cpu") == (
        "eager", "fell back to eager torch (triton: not implemented for this op; cpp: "
        "extension not built; torch_compile: not implemented for this op)")
    backends.register("_probe", "torch_compile", lambda: calls.append("tc"))
    backends.implementation("_probe", "compiled", "cpu")()
    backends.implementation("_probe", "eager", "cpu")()
    assert calls == ["tc", "eager"]
    from posteriors_fast.backends import registry

    registry._OPS.pop("_probe")


@pytest.mark.parametrize(
    "call",
    [
        lambda b: pf.empirical_fisher(lambda p: p**2, backend=b)(torch.ones(3)),
        lambda b: pf.ggn(lambda p: p[None] * 2, lambda z: (z**2).sum(), backend=b)(torch.ones(3)),
        lambda b: pf.diag_ggn(lambda p: p[None] * 2, lambda z: (z**2).sum(), backend=b)(torch.ones(3)),
        lambda b: pf.cg(lambda x: 2 * x, torch.ones(3), backend=b)[0],
        lambda b: pf.hvp(lambda p: (p**3).sum(), (torch.ones(3),), (torch.ones(3),), backend=b)[1],
        lambda b: pf.fvp(lambda p: p**2, (torch.ones(3),), (torch.ones(3),), backend=b)[1],
        lambda b: pf.ggnvp(lambda p: p * 2, lambda z: (z**2).sum(), (torch.ones(3),), (torch.ones(3),), backend=b)[1],
    ],
    ids=["empirical_fisher", "ggn", "diag_ggn", "cg", "hvp", "fvp", "ggnvp"],
)
def test_every_hot_util_takes_backend_and_backends_agree(call):
    torch.testing.assert_close(call("eager"), call("compiled"))
