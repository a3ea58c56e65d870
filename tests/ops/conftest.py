"""Fixtures of the native-op tests: ``isa`` runs a test once per ISA level of
the CPU kernels, and no test may leave the level changed."""

import pytest

from tests.ops._native import _C, ISAS, SUPPORTED_ISAS, cpu_isa


@pytest.fixture(params=ISAS)
def isa(request):
    """The test body runs with the CPU kernels at this ISA level (skipped for
    levels this CPU lacks); the level before is restored afterwards."""
    if request.param not in SUPPORTED_ISAS:
        pytest.skip(f"this CPU cannot run ISA level {request.param} (supported: {SUPPORTED_ISAS})")
    with cpu_isa(request.param) as name:
        yield name


@pytest.fixture(autouse=True)
def _isa_does_not_leak():
    if _C is None:
        yield
        return
    before = (_C.cpu_isa(), _C.supported_cpu_isas())
    yield
    assert (_C.cpu_isa(), _C.supported_cpu_isas()) == before, "a test left the CPU ISA level changed"
