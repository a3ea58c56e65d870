"""``normal``: standard normal draws for a list of leaves (the SG-MCMC noise),
10⁶ float32 entries in 4 leaves.

Baseline ``torch.randn_like`` leaf by leaf (the op's eager family and
posteriors 0.0.5's draws: torch's CPU generator is one serial stream);
``cpp`` draws all leaves in one parallel pass of the Philox generator.
"""

import torch

from benchmarks.kernels import require
from posteriors_fast.ops import normal

PROVIDERS = ("torch.randn_like", "cpp")
BASELINE = "torch.randn_like"
SHAPES = [(500, 1000), (1000,), (400, 1000), (99000,)]  # 1,000,000 entries


def setup(case, provider, device):
    leaves = [torch.empty(s, device=device) for s in SHAPES]
    if provider == BASELINE:
        return lambda: normal.normal_eager(leaves)
    require("cpp", device)
    return lambda: normal.normal_cpp(leaves)


def bytes_moved(case) -> float:
    """One float32 write per draw."""
    return 4.0 * 1_000_000


def flops(case) -> float:
    return 0.0
