"""Shared fixtures. posteriors 0.0.5 imports ``optree.integration.torch``, which
current optree calls ``optree.integrations.torch``: alias it before anything
imports the reference.

``POSTERIORS_FAST_CI=1`` (set by ``.ci/run``) turns the skips that a broken
install would cause (posteriors 0.0.5, triton or the C++ extension missing)
into failures: in CI, everything the test extra installs must be there.
"""

import os
import sys

# Compile-cost estimates in memory only: tests neither read nor write the
# user's cache (backends/compile_policy.py).
os.environ.setdefault("POSTERIORS_FAST_CACHE_DIR", "off")

import optree
import optree.integrations
import optree.integrations.torch
import pytest
import torch

sys.modules.setdefault("optree.integration", optree.integrations)
sys.modules.setdefault("optree.integration.torch", optree.integrations.torch)

#: In CI a missing dependency is an error, not a skip.
IN_CI = os.environ.get("POSTERIORS_FAST_CI") == "1"


def skip_unless_installed(ok: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) when a dependency is missing."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{reason}: in CI every test dependency must be installed", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture
def ref():
    """The reference implementation, posteriors 0.0.5."""
    try:
        import posteriors
    except ImportError as err:
        skip_unless_installed(False, f"posteriors==0.0.5 does not import ({err}); pip install -e .[test]")
    return posteriors


@pytest.fixture
def compile_after():
    """``compile_after(n)``: for this test the compiled backend compiles the
    graphs that run user code on their n-th call (the compile policy's
    ``after`` mode) instead of by the ski-rental rule."""
    from posteriors_fast.backends import compile_policy

    saved = compile_policy.get_compile_policy()
    yield lambda n: compile_policy.set_compile_policy(after=n)
    compile_policy.set_compile_policy(saved.mode, budget=saved.budget, after=saved.after)


@pytest.fixture(params=["eager", "compiled"])
def backend(request):
    return request.param


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request):
    return request.param
