"""sgmcmc.sghmc step on a 1M-parameter pytree of several leaves, with a cheap
(Gaussian) log posterior so the step itself dominates: bandwidth-bound work.
The report's GFLOP/s column is not meaningful here; see ``bytes_moved`` and the
``copy`` provider for the machine's copy bandwidth in the same run.

``copy`` follows STREAM's rule: one array copied into another, each at least
four times the last-level cache, so that it measures memory bandwidth in any
timing regime. (A copy of the step's own 4 MB of leaves stays in a 32 MB L3
when repeated, and then measures the cache: 157 GB/s against 38 GB/s right
after another provider's calls.)"""

import functools
import os

import torch
from optree import tree_leaves

from benchmarks.workloads import library

SHAPES = {"a": (500, 1000), "b": (1000,), "c": (400, 1000), "d": (99000,)}  # 1,000,000 entries


def _log_post(params, batch):
    return -0.5 * sum((x * x).sum() for x in tree_leaves(params)), torch.tensor([])


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(*s, generator=g).to(device) for k, s in SHAPES.items()}
    if provider == "copy":
        src = torch.randn(stream_entries(device), generator=g).to(device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
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


#: Bytes assumed for the last-level cache when the system does not say.
_DEFAULT_LLC = 32 << 20


def _last_level_cache(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)) or _DEFAULT_LLC
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, index, "size")) as handle:
                text = handle.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=_DEFAULT_LLC)


@functools.lru_cache(maxsize=None)
def stream_entries(device: str = "cpu") -> int:
    """float32 entries per ``copy`` array: four last-level caches, at least
    128 MiB (STREAM's sizing rule)."""
    return max(4 * _last_level_cache(device), 128 << 20) // 4


def copy_bytes(case, device: str = "cpu") -> float:
    """The ``copy`` provider reads and writes each float32 entry once."""
    return 2 * 4 * stream_entries(device)
