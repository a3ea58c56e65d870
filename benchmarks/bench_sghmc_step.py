"""``sghmc_step``: the elementwise SGHMC update of 10⁶ float32 parameters in 4
leaves, noise drawn inside (the gradient is given: see ``bench_sgmcmc`` for
the whole step).

Baseline ``eager``: the op's ``torch._foreach_*`` passes with
``torch.randn_like`` noise; ``cpp`` one fused pass per leaf with the noise
drawn in registers; ``copy`` a STREAM-sized copy for the machine's bandwidth.
"""

import torch

from benchmarks.bench_sgmcmc import copy_bytes, stream_entries  # noqa: F401  (copy_bytes: the report's)
from benchmarks.kernels import require
from posteriors_fast.ops import sghmc_step

PROVIDERS = ("eager", "cpp")
BASELINE = "eager"
SHAPES = [(500, 1000), (1000,), (400, 1000), (99000,)]


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    if provider == "copy":
        src = torch.randn(stream_entries(device), generator=g).to(device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    params, momenta, grads = ([torch.randn(s, generator=g).to(device) for s in SHAPES] for _ in range(3))
    if provider == "cpp":
        require("cpp", device)
    fn = sghmc_step.sghmc_step_eager if provider == "eager" else sghmc_step.sghmc_step_cpp
    return lambda: fn(params, momenta, grads, 1e-3, 0.99, 1e-3, 0.04)


def bytes_moved(case) -> float:
    """Nominal float32 traffic: read θ, m, g; write θ', m' (5 passes; the
    eager form also writes and reads the noise)."""
    return 5 * 4.0 * 1_000_000


def flops(case) -> float:
    return 6.0 * 1_000_000
