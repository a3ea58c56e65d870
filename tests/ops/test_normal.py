"""posteriors_fast::normal_ (C++ Philox + Box-Muller): distribution,
determinism, thread-count invariance and the same draws at every ISA level,
opcheck; and the ``normal`` dispatch."""

import math

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import normal
from tests.ops._native import F64_ISA_ULPS, at_each_isa, needs_ext, ulp_distance

OPS = _library.OPS


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_moments_and_tails_of_a_large_fill(dtype, isa):
    n = 1_000_003  # not a multiple of any block
    x = torch.empty(n, dtype=dtype)
    OPS.normal_(x, 12345)
    x = x.double()
    se = 1 / math.sqrt(n)
    assert abs(x.mean()) < 5 * se
    assert abs(x.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(x.pow(3).mean()) < 5 * math.sqrt(15) * se
    assert abs(x.pow(4).mean() - 3) < 5 * math.sqrt(96) * se
    # Normal quantiles: P(|z| > 1) = 0.3173, P(|z| > 2) = 0.0455, P(|z| > 3) = 0.0027.
    for k, p in ((1, 0.3173), (2, 0.0455), (3, 0.0027)):
        frac = (x.abs() > k).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.isfinite(x).all()


@needs_ext
def test_neighbouring_draws_are_uncorrelated():
    x = torch.empty(400_000, dtype=torch.float64)
    OPS.normal_(x, 1)
    for lag in (1, 2, 64, 128, 256):
        corr = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1]
        assert abs(corr) < 5 / math.sqrt(x.numel())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 255, 257, 70_001])
def test_same_seed_same_draws_for_any_thread_count_and_a_prefix_property(dtype, n, isa):
    threads = torch.get_num_threads()
    a, b = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    OPS.normal_(a, 99)
    try:
        torch.set_num_threads(1)
        OPS.normal_(b, 99)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    longer = torch.empty(n + 300, dtype=dtype)
    OPS.normal_(longer, 99)
    assert torch.equal(longer[:n], a)  # element i depends on (seed, i) only
    OPS.normal_(b, 100)
    assert not torch.equal(a, b)


@needs_ext
def test_opcheck_and_bad_input():
    torch.library.opcheck(OPS.normal_.default, (torch.empty(33), 5))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        OPS.normal_(torch.empty(3, dtype=torch.float16), 1)
    with pytest.raises(RuntimeError, match="contiguous CPU tensor"):
        OPS.normal_(torch.empty(6)[::2], 1)


@needs_ext
def test_dispatch_shapes_seeding_and_fallbacks():
    leaves = [torch.empty(3, 4), torch.empty(()), torch.empty(5)]
    torch.manual_seed(0)
    draws = normal.normal(leaves, backend="compiled")
    assert [d.shape for d in draws] == [x.shape for x in leaves]
    torch.manual_seed(0)
    again = normal.normal(leaves, backend="compiled")
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    torch.manual_seed(0)
    eager = normal.normal(leaves, backend="eager")
    torch.manual_seed(0)
    assert all(torch.equal(a, torch.randn_like(x)) for a, x in zip(eager, leaves))
    mixed = normal.normal([torch.empty(2), torch.empty(2, dtype=torch.float64)], backend="compiled")
    assert [d.dtype for d in mixed] == [torch.float32, torch.float64]
    assert normal.normal([], backend="compiled") == []


@needs_ext
@pytest.mark.parametrize("n", [1, 255, 257, 70_001, 1_000_003])
def test_every_isa_level_draws_the_same_numbers(n):
    """The hand-written AVX-512 Philox (avx512) and the portable engine built
    for AVX2 and for baseline x86-64 give the same generator words, and the
    float32 Box-Muller transform (no FMA contraction) the same draws bit for
    bit; float64 agrees to glibc's log/sin (F64_ISA_ULPS)."""

    def draws():
        out = []
        for dtype in (torch.float32, torch.float64):
            x = torch.empty(n, dtype=dtype)
            OPS.normal_(x, -123456789)
            out.append(x)
        return out

    results = at_each_isa(draws)
    (best_f32, best_f64), *_ = results.values()
    for level, (f32, f64) in results.items():
        assert torch.equal(f32, best_f32), level
        assert int(ulp_distance(f64, best_f64).max()) <= F64_ISA_ULPS, level
