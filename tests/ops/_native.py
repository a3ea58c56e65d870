"""Helpers shared by the native-op tests: the oracle comparison, the extension skip, the
ISA level the CPU kernels run at, and ULP distances."""

import contextlib

import pytest
import torch

from posteriors_fast import _library
from tests._compare import assert_close_to_oracle
from tests.conftest import IN_CI

EXT_LOADED, EXT_REASON = _library.load_extension()
needs_ext = pytest.mark.skipif(not EXT_LOADED and not IN_CI, reason=f"extension not built: {EXT_REASON}")

#: float64 normal draws at two ISA levels are at most this many ULP apart: the
#: same uniforms (identical generator words) through glibc's vector log/sin,
#: whose SSE4, AVX2 and AVX-512 builds differ from each other in the last bits
#: (measured over 10⁶ draws: at most 3 ULP).
F64_ISA_ULPS = 16

#: The ISA levels of the CPU kernels, best first (csrc/cpu/multiversion.h), and
#: those this CPU can run.
ISAS = ("avx512", "avx2", "baseline")
if EXT_LOADED:
    from posteriors_fast import _C

    SUPPORTED_ISAS = tuple(_C.supported_cpu_isas())
else:
    _C, SUPPORTED_ISAS = None, ()


#: A kernel's result against a float64 oracle (the suite's one tolerance table).
close = assert_close_to_oracle


@contextlib.contextmanager
def cpu_isa(name: str):
    """Run the CPU kernels at ISA level ``name`` inside the block; the level
    before is restored however the block ends."""
    previous = _C.set_cpu_isa(name)
    try:
        yield name
    finally:
        _C.set_cpu_isa(previous)


def at_each_isa(fn):
    """``{level: fn()}`` for every level this CPU can run."""
    results = {}
    for name in SUPPORTED_ISAS:
        with cpu_isa(name):
            results[name] = fn()
    return results


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between equal-shaped float tensors, elementwise
    (int64): how many representable values lie from a to b."""
    assert a.dtype == b.dtype and a.shape == b.shape
    itype, sign_bit = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}[a.dtype]

    def line(x):  # sign-magnitude bits -> a monotone integer line (-0 and +0 -> 0)
        i = x.contiguous().view(itype).long()
        return torch.where(i < 0, -(i & ((1 << sign_bit) - 1)), i)

    return (line(a) - line(b)).abs()
