"""sgmcmc.sghmc step on a 1M-parameter pytree of several leaves, with a cheap
(Gaussian) log posterior so the step itself dominates: bandwidth-bound work.
The report's GFLOP/s column is not meaningful here; see ``bytes_moved`` and the
``copy`` provider, a plain copy of the same leaves into preallocated ones, for the machine's copy
bandwidth in the same run."""

import torch
from optree import tree_leaves, tree_map

from benchmarks.workloads import library

SHAPES = {"a": (500, 1000), "b": (1000,), "c": (400, 1000), "d": (99000,)}  # 1,000,000 entries


def _log_post(params, batch):
    return -0.5 * sum((x * x).sum() for x in tree_leaves(params)), torch.tensor([])


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(*s, generator=g).to(device) for k, s in SHAPES.items()}
    if provider == "copy":
        dst = tree_map(torch.empty_like, params)
        return lambda: tree_map(lambda d, s: d.copy_(s), dst, params)
    lib, kwargs = library(provider)
    transform = lib.sgmcmc.sghmc.build(_log_post, lr=1e-3, momenta=0.0, **kwargs)
    state = transform.init(params)
    return lambda: transform.update(state, None)


def bytes_moved(case) -> float:
    """Nominal float32 traffic of one step: read params, momenta, gradient and
    noise, write new params, momenta, gradient and noise: 8 · 4 bytes per entry."""
    return 8 * 4 * 1_000_000


def flops(case) -> float:
    """Nominal: 8 floating-point operations per entry."""
    return 8 * 1_000_000


def copy_bytes(case) -> float:
    """The ``copy`` provider reads and writes each float32 entry once."""
    return 2 * 4 * 1_000_000
