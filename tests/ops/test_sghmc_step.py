"""posteriors_fast::sghmc_step (C++, noise drawn in the kernel) at every ISA
level against the foreach formulas with its own noise and against each other,
its noise distribution, determinism, opcheck, dispatch."""

import math

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import sghmc_step as ops
from tests.ops._native import F64_ISA_ULPS, at_each_isa, close, needs_ext

OPS = _library.OPS
SHAPES = [(), (1,), (3, 5), (257,), (40, 1000)]
PHI = 0x9E3779B97F4A7C15  # leaf k draws the normal_ stream seed + k·φ (mod 2⁶⁴)


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


def _stream(seed, k):
    s = (seed + k * PHI) % 2**64
    return s - 2**64 if s >= 2**63 else s


#: A leaf large enough that the outputs of a call total more than the 4 MiB
#: above which the AVX-512 float32 path writes them with streaming stores
#: (kStreamBytes in csrc/cpu/sghmc_step.cpp): 2 outputs x 600,001 x 4 bytes =
#: 4.6 MiB in float32 (9.2 MiB in float64, which has no streaming path but
#: the same threshold test). Ragged, so its last block takes the cached path.
STREAMED = (600_001,)


def _realistic_leaves(dtype, seed):
    """Random θ, m, g; ragged leaf sizes (the noise blocks hold 256 float32 /
    128 float64 draws, the AVX-512 path streams whole aligned blocks), a
    transposed (non-contiguous) leaf, and enough entries in all that the
    streaming-store path runs (:data:`STREAMED`)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (3, 5), (257,), (40, 1000), (1000, 3), (70_001,), (513,), STREAMED]
    leaves = [[torch.randn(s, dtype=dtype, generator=gen) for s in shapes] for _ in range(3)]
    for leaf in leaves:
        leaf[5] = leaf[5].T  # (3, 1000) view of a (1000, 3) tensor
    return leaves


# step = lr·prec, keep = 1 - lr·prec·α, lr, scale as sgmcmc.sghmc passes them
# (lr = 0.01, prec = 5, α = 1): all nonzero, as in a chain.
COEFFS = (0.05, 0.95, 0.01, 0.14)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_whole_step_matches_the_formulas_with_its_own_noise(dtype, isa):
    """θ' = θ + step·m and m' = keep·m + lr·g + scale·ξ in float64, where ξ is
    each leaf's stream drawn by normal_ at the same level."""
    params, momenta, grads = _realistic_leaves(dtype, 5)
    step, keep, lr, scale = COEFFS
    seed = -987654321
    new_p, new_m = OPS.sghmc_step(params, momenta, grads, step, keep, lr, scale, seed)
    for k, (p, m, g, p2, m2) in enumerate(zip(params, momenta, grads, new_p, new_m)):
        assert p2.shape == p.shape and m2.shape == p.shape and p2.dtype == m2.dtype == dtype
        xi = torch.empty(p.numel(), dtype=dtype)
        OPS.normal_(xi, _stream(seed, k))
        xi = xi.reshape(p.shape).double()
        close(p2, p.double() + step * m.double(), dtype)
        close(m2, keep * m.double() + lr * g.double() + scale * xi, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_every_isa_level_takes_the_same_step(dtype):
    """On realistic inputs: θ' bit for bit at every level (no FMA contraction in
    the update, also in the AVX-512 streaming path); m' too in float32, whose
    noise is identical; in float64 the noise agrees to glibc's log/sin
    (F64_ISA_ULPS), so m' to that times scale."""
    leaves = _realistic_leaves(dtype, 6)
    results = at_each_isa(lambda: OPS.sghmc_step(*leaves, *COEFFS, 2024))
    (best_p, best_m), *_ = results.values()
    for level, (new_p, new_m) in results.items():
        for a, b in zip(new_p, best_p):
            assert torch.equal(a, b), level
        for a, b in zip(new_m, best_m):
            if dtype == torch.float32:
                assert torch.equal(a, b), level
            else:  # scale·(ξ - ξ_best) with |ξ| < 9, and the rounding of the sum (|m'| < 9)
                assert float((a - b).abs().max()) <= (F64_ISA_ULPS * COEFFS[3] + 1) * 9 * 2.0**-52, level


@needs_ext
def test_same_seed_same_step_for_any_thread_count(isa):
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
def test_leaf_k_draws_the_normal_stream_seed_plus_k_phi_with_mixed_dtypes_in_one_call(isa):
    """All leaves run in one parallel region per dtype; each leaf's noise is
    still the stream ``normal_`` draws for seed + k·φ, whatever the other
    leaves are (empty, tiny, another dtype)."""
    sizes = [(0,), (3,), (1000, 70), (), (257,)]
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
    zeros = [torch.zeros(s, dtype=d) for s, d in zip(sizes, dtypes)]
    seed = 123
    _, noise = OPS.sghmc_step(zeros, zeros, zeros, 0.0, 0.0, 0.0, 1.0, seed)
    for k, (z, d) in enumerate(zip(noise, dtypes)):
        expected = torch.empty(z.numel(), dtype=d)
        OPS.normal_(expected, _stream(seed, k))
        assert z.dtype == d and torch.equal(z.reshape(-1), expected)
