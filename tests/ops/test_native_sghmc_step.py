"""posteriors_fast::sghmc_step (C++, noise drawn in the kernel) against the
foreach formulas, its noise distribution, determinism, opcheck, dispatch."""

import math

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import sghmc_step as ops
from tests.ops._native import close, needs_ext

OPS = _library.OPS
SHAPES = [(), (1,), (3, 5), (257,), (40, 1000)]


def _leaves(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, dtype=dtype, generator=gen) for s in SHAPES] for _ in range(3)]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deterministic_part_matches_the_formulas(dtype):
    params, momenta, grads = _leaves(dtype, 0)
    new_p, new_m = OPS.sghmc_step(params, momenta, grads, 0.1, 0.95, 0.01, 0.0, 3)
    for p, m, g, p2, m2 in zip(params, momenta, grads, new_p, new_m):
        assert p2.shape == p.shape and p2.dtype == dtype
        close(p2, p.double() + 0.1 * m.double(), dtype)
        close(m2, 0.95 * m.double() + 0.01 * g.double(), dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_noise_is_standard_normal_and_independent_across_leaves(dtype):
    n = 200_001
    zeros = [torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)]
    _, (a, b) = OPS.sghmc_step(zeros, zeros, zeros, 0.0, 0.0, 0.0, 1.0, 11)
    se = 1 / math.sqrt(n)
    for z in (a.double(), b.double()):
        assert abs(z.mean()) < 5 * se and abs(z.var() - 1) < 5 * math.sqrt(2) * se
        assert abs(z.pow(4).mean() - 3) < 5 * math.sqrt(96) * se
    assert abs(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]) < 5 * se  # leaves differ


@needs_ext
def test_same_seed_same_step_for_any_thread_count():
    params, momenta, grads = _leaves(torch.float32, 1)
    first = OPS.sghmc_step(params, momenta, grads, 0.1, 0.9, 0.01, 0.3, 42)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        second = OPS.sghmc_step(params, momenta, grads, 0.1, 0.9, 0.01, 0.3, 42)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(x, y)


@needs_ext
def test_opcheck_bad_input_and_autograd():
    params, momenta, grads = _leaves(torch.float64, 2)
    torch.library.opcheck(OPS.sghmc_step.default, (params, momenta, grads, 0.1, 0.9, 0.01, 0.3, 7))
    with pytest.raises(RuntimeError, match="as many leaves"):
        OPS.sghmc_step(params, momenta[:-1], grads, 0.1, 0.9, 0.01, 0.3, 7)
    with pytest.raises(RuntimeError, match=r"grads\[2\] must match params\[2\]"):
        OPS.sghmc_step(params, momenta, grads[:2] + [grads[2].float()] + grads[3:], 0.1, 0.9, 0.01, 0.3, 7)
    with pytest.raises(RuntimeError, match="sghmc_step is not differentiable"):
        OPS.sghmc_step([params[0].requires_grad_()], momenta[:1], grads[:1], 0.1, 0.9, 0.01, 0.3, 7)


@needs_ext
def test_dispatch_falls_back_to_the_reference_draws_for_mixed_dtypes():
    params = [torch.zeros(3), torch.zeros(3, dtype=torch.float64)]
    torch.manual_seed(0)
    _, fast = ops.sghmc_step(params, params, params, 0.0, 0.0, 0.0, 1.0, backend="compiled")
    torch.manual_seed(0)
    _, slow = ops.sghmc_step(params, params, params, 0.0, 0.0, 0.0, 1.0, backend="eager")
    assert all(torch.equal(x, y) for x, y in zip(fast, slow))


@needs_ext
def test_leaf_k_draws_the_normal_stream_seed_plus_k_phi_with_mixed_dtypes_in_one_call():
    """All leaves run in one parallel region per dtype; each leaf's noise is
    still the stream ``normal_`` draws for seed + k·φ, whatever the other
    leaves are (empty, tiny, another dtype)."""
    sizes = [(0,), (3,), (1000, 70), (), (257,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    zeros = [torch.zeros(s, dtype=d) for s, d in zip(sizes, dtypes)]
    seed = 123
    _, noise = OPS.sghmc_step(zeros, zeros, zeros, 0.0, 0.0, 0.0, 1.0, seed)
    for k, (z, d) in enumerate(zip(noise, dtypes)):
        stream = (seed + k * 0x9E3779B97F4A7C15) % 2**64
        expected = torch.empty(z.numel(), dtype=d)
        OPS.normal_(expected, stream - 2**64 if stream >= 2**63 else stream)
        assert z.dtype == d and torch.equal(z.reshape(-1), expected)
